//! Integration tests of the `kwq` crate, in one binary so the linker runs once.

mod api;
mod browser;
mod cli_run;
mod conformance;
mod dependencies;
mod fan_in;
mod grid;
mod invoke;
mod kafka;
mod kafka_dependencies;
mod kafka_expand;
mod kafka_grid;
mod kafka_roles;
mod kafka_streams;
mod languages;
mod paths;
mod process;
mod queue;
mod readme;
mod runtime;
mod safety;
mod scale;
mod support;
mod workers;
mod workflows;
