//! A task module built against `kwq:task@0.1.0` (`wit/v0.1.0`), the
//! contract before `inputs`, straight from `wit-bindgen` rather than the
//! SDK (which follows the current contract). It echoes its payload and
//! logs its task id, so a test can see that hosts speaking 0.2.0 still
//! link, run and hear modules built against 0.1.0.

#[allow(missing_docs, unreachable_pub, clippy::all)]
mod bindings {
    wit_bindgen::generate!({
        world: "kwq-task",
        path: "../../wit/v0.1.0",
    });
}

use bindings::exports::kwq::task::task::Guest;
use bindings::kwq::task::context;

struct Echo;

impl Guest for Echo {
    fn init(_config: Vec<u8>) -> Result<(), String> {
        Ok(())
    }

    fn run(payload: Vec<u8>) -> Result<Vec<u8>, String> {
        context::log(
            context::Level::Info,
            &format!("0.1.0 module running {}", context::task_id()),
        );
        Ok(payload)
    }
}

bindings::export!(Echo with_types_in bindings);
