//! A plain WASI preview-1 command, built without the KWQ SDK: reads the
//! payload from stdin and writes it upper-cased to stdout. A payload of
//! `fail` writes a message to stderr and exits with code 3, to prove that
//! exit codes reach the task's error.

use std::io::{Read, Write};

fn main() {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("cannot read stdin: {e}");
        std::process::exit(2);
    }
    if input.trim() == "fail" {
        eprintln!("asked to fail");
        std::process::exit(3);
    }
    let mut out = std::io::stdout();
    if out.write_all(input.to_uppercase().as_bytes()).is_err() {
        std::process::exit(4);
    }
}
