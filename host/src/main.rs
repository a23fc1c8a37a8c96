//! The `kwq` binary: parse the command line and hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    kwq::cli::main(kwq::cli::Cli::parse())
}
