//! How result and payload bytes look inside JSON: inline when they are
//! JSON, base64 otherwise. One rule for the API's views, `GET
//! /v1/jobs/{id}/results` and the NDJSON a fan-in command reads on stdin, so
//! a line means the same wherever it is read.

use base64::Engine;
use serde_json::{Map, Value};

/// Most results one page of a fan-in task's input holds: what one
/// `kwq:task/inputs.next-results` call returns at most, and the largest
/// page a worker machine may ask its host for.
pub const MAX_RESULTS_PER_PAGE: usize = 4096;

/// Bytes as JSON when they are JSON, else as base64: one of the pair is set.
pub fn json_or_base64(bytes: &[u8]) -> (Option<Value>, Option<String>) {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => (Some(value), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

/// Put bytes into `map` as `{"<name>": json}` or `{"<name>_base64": "..."}`.
pub fn bytes_field(map: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    match json_or_base64(bytes) {
        (Some(value), _) => {
            map.insert(name.into(), value);
        }
        (None, Some(text)) => {
            map.insert(format!("{name}_base64"), Value::String(text));
        }
        (None, None) => {}
    }
}

/// One line of a job's results as NDJSON: `{"task_id": ..., "result": ...}`
/// and a newline.
pub fn result_line(task_id: &str, result: &[u8]) -> Vec<u8> {
    let mut line = Map::new();
    line.insert("task_id".into(), Value::String(task_id.to_string()));
    bytes_field(&mut line, "result", result);
    let mut bytes = serde_json::to_vec(&Value::Object(line)).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_results_are_inline_and_others_base64() {
        assert_eq!(
            result_line("t-1", br#"{"x":1}"#),
            b"{\"result\":{\"x\":1},\"task_id\":\"t-1\"}\n".to_vec()
        );
        assert_eq!(
            result_line("t-2", b"\xff"),
            b"{\"result_base64\":\"/w==\",\"task_id\":\"t-2\"}\n".to_vec()
        );
    }
}
