//! The input of a fan-in task (`"input": {"results_of": JOB}`): the job's
//! completed results, read a page at a time from wherever the task came
//! from, so a million results never sit in memory at once, neither in the
//! host nor in the guest.
//!
//! - A component calls `kwq:task/inputs.next-results` (WIT 0.2.0); each
//!   call reads at most one page.
//! - A WASI command reads them on stdin as NDJSON, one
//!   `{"task_id": ..., "result": ...}` per line (the lines of `GET
//!   /v1/jobs/{id}/results`), written into a bounded pipe as it reads.

use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;

/// Results read from the store per page while feeding a command's stdin.
const STDIN_PAGE: usize = 256;
/// Bytes the stdin pipe holds before the feeder waits for the guest.
const STDIN_PIPE_BYTES: usize = 64 * 1024;

/// One completed task of the job a fan-in task reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputResult {
    /// Where the next page starts (the store's order of the job's tasks).
    pub cursor: u64,
    /// The task that produced it.
    pub task_id: String,
    /// Its result bytes.
    pub result: Vec<u8>,
}

/// Pages of one job's completed results, in task order. The dispatcher
/// implements it over its work queue, so the runtime never knows the store.
#[async_trait]
pub trait ResultPages: Send + Sync {
    /// Up to `limit` results after `after` (0: from the first). An empty
    /// page means there are no more.
    async fn page(&self, after: u64, limit: usize) -> Result<Vec<InputResult>, String>;
}

/// A fan-in task's read position: every attempt starts a new one, so a
/// retry reads the results again from the first.
pub(super) struct InputCursor {
    pages: Arc<dyn ResultPages>,
    after: u64,
    done: bool,
}

impl InputCursor {
    pub(super) fn new(pages: Arc<dyn ResultPages>) -> Self {
        InputCursor {
            pages,
            after: 0,
            done: false,
        }
    }

    /// Up to `max` more results; empty once all are read.
    pub(super) async fn next(&mut self, max: usize) -> Result<Vec<InputResult>, String> {
        if self.done || max == 0 {
            return Ok(Vec::new());
        }
        let page = self
            .pages
            .page(self.after, max.min(crate::model::MAX_RESULTS_PER_PAGE))
            .await?;
        match page.last() {
            Some(last) => self.after = last.cursor,
            None => self.done = true,
        }
        Ok(page)
    }
}

/// Why a command's stdin feed stopped early, if it did: read after the run,
/// so a command that saw a cut-short input fails instead of returning a
/// result computed from part of it.
#[derive(Clone, Default)]
pub(super) struct FeedFailure(Arc<Mutex<Option<String>>>);

impl FeedFailure {
    fn set(&self, why: String) {
        *self.0.lock().expect("feed failure lock") = Some(why);
    }

    /// The reason the feed stopped, if it failed.
    pub(super) fn take(&self) -> Option<String> {
        self.0.lock().expect("feed failure lock").take()
    }
}

/// A pipe whose read end becomes a command's stdin, written as NDJSON from
/// `pages` by a tokio task. At most one page and the pipe's buffer are in
/// memory. The task stops when the results end (closing the pipe: EOF),
/// when the guest stops reading (the pipe's read end is dropped), or when a
/// page cannot be read (recorded in the returned [`FeedFailure`]).
pub(super) fn ndjson_stdin(pages: Arc<dyn ResultPages>) -> (tokio::io::DuplexStream, FeedFailure) {
    let (mut writer, reader) = tokio::io::duplex(STDIN_PIPE_BYTES);
    let failure = FeedFailure::default();
    let failed = failure.clone();
    tokio::spawn(async move {
        let mut cursor = InputCursor::new(pages);
        loop {
            let page = match cursor.next(STDIN_PAGE).await {
                Ok(page) if page.is_empty() => break,
                Ok(page) => page,
                Err(why) => {
                    failed.set(why);
                    break;
                }
            };
            let mut chunk = Vec::new();
            for entry in &page {
                chunk.extend(crate::model::result_line(&entry.task_id, &entry.result));
            }
            if writer.write_all(&chunk).await.is_err() {
                // The guest exited without reading everything: its choice.
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    (reader, failure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// `n` results, `task_id` t-1 .. t-n, result `{"i": i}`.
    struct Numbers {
        n: u64,
        fail_after: Option<u64>,
    }

    #[async_trait]
    impl ResultPages for Numbers {
        async fn page(&self, after: u64, limit: usize) -> Result<Vec<InputResult>, String> {
            if self.fail_after.is_some_and(|at| after >= at) {
                return Err("store unavailable".into());
            }
            Ok((after + 1..=self.n)
                .take(limit)
                .map(|i| InputResult {
                    cursor: i,
                    task_id: format!("t-{i}"),
                    result: format!("{{\"i\":{i}}}").into_bytes(),
                })
                .collect())
        }
    }

    #[tokio::test]
    async fn a_cursor_reads_every_result_once_in_order() {
        let mut cursor = InputCursor::new(Arc::new(Numbers {
            n: 10,
            fail_after: None,
        }));
        let mut seen = Vec::new();
        loop {
            let page = cursor.next(3).await.unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 3);
            seen.extend(page.into_iter().map(|r| r.cursor));
        }
        assert_eq!(seen, (1..=10).collect::<Vec<_>>());
        assert!(cursor.next(3).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn stdin_is_ndjson_of_every_result_then_eof() {
        let (mut stdin, failure) = ndjson_stdin(Arc::new(Numbers {
            n: 1000,
            fail_after: None,
        }));
        let mut text = String::new();
        stdin.read_to_string(&mut text).await.unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        assert_eq!(lines[0], r#"{"result":{"i":1},"task_id":"t-1"}"#);
        assert_eq!(lines[999], r#"{"result":{"i":1000},"task_id":"t-1000"}"#);
        assert_eq!(failure.take(), None);
    }

    #[tokio::test]
    async fn a_failed_page_is_reported_not_hidden_as_eof() {
        let (mut stdin, failure) = ndjson_stdin(Arc::new(Numbers {
            n: 1000,
            fail_after: Some(512),
        }));
        let mut text = String::new();
        stdin.read_to_string(&mut text).await.unwrap();
        assert_eq!(text.lines().count(), 512);
        assert_eq!(failure.take().as_deref(), Some("store unavailable"));
    }
}
