//! Integration tests of the `kwq` crate, in one binary so the linker runs once.

mod cli_run;
mod runtime;
mod support;
