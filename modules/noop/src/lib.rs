//! Does nothing and returns an empty result: measures per-task overhead.

fn run(_payload: Vec<u8>) -> Result<Vec<u8>, String> {
    Ok(Vec::new())
}

kwq_guest::raw_task!(run);
