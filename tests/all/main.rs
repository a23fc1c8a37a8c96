//! Integration tests of the `kwq` crate, in one binary so the linker runs once.

mod runtime;
