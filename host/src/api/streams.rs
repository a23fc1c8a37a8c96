//! `POST /v1/jobs/stream`: a job whose payloads are streamed as NDJSON, one
//! payload per line after a first line that is the job itself (module,
//! name, options). The body is read as it arrives and handed to the store
//! in batches, so a host never holds a whole upload: on Kafka a stream has
//! no cap on its length (its tasks are written as the job drains); on the
//! other stores it is capped as a JSON job's payloads are (their schedulers
//! hold every waiting task). A bad line fails the request with its line
//! number and nothing of the job is accepted.

use super::error::AppError;
use super::wire::{ErrorBody, JobSubmission, JobView};
use super::{AppState, modules, views};
use crate::model::NewJob;
use crate::queue::StreamItem;
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;

/// The longest line (one payload) a stream may have: one payload chunk on
/// Kafka.
const MAX_LINE_BYTES: usize = 512 * 1024;

/// Payloads handed to the store at a time.
const BATCH: usize = 4096;

/// `POST /v1/jobs/stream`: 201 with the job once it and all its payloads are durable.
#[utoipa::path(post, path = "/v1/jobs/stream", tag = "jobs",
    request_body(content = String, content_type = "application/x-ndjson",
        description = "line 1: the job as in POST /v1/jobs without payloads, payloads_base64 or sweep (module, name, priority, tags, ...); every further line: one payload (a JSON value); blank lines are skipped; lines up to 512 KiB"),
    responses((status = 201, description = "the job with its counts", body = JobView),
        (status = 400, description = "a bad line (its number is in the message), no payloads, or more than this store takes", body = ErrorBody),
        (status = 415, description = "not application/x-ndjson", body = ErrorBody)))]
pub(super) async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<JobView>), AppError> {
    require_ndjson(&headers)?;
    let mut lines = Lines::new(body);
    let Some(first) = lines.next().await? else {
        return Err(AppError::bad_request(
            "invalid_job",
            "the stream is empty: its first line is the job (module and options)",
        ));
    };
    let header: JobSubmission = serde_json::from_slice(&first).map_err(|e| {
        AppError::bad_request("invalid_json", format!("line {}: {e}", lines.number))
    })?;
    if header.payloads.is_some() || header.payloads_base64.is_some() || header.sweep.is_some() {
        return Err(AppError::bad_request(
            "invalid_job",
            "line 1 is the job without payloads, payloads_base64 or sweep; each further line is one payload",
        ));
    }
    let options = header.options.into_options()?;
    super::jobs::check_name(header.name.as_deref())?;
    super::tasks::check_dependencies(&state, &options).await?;
    let module = modules::resolve(&state, &header.module).await?;
    let cap = if state.work.streams_lazily() {
        u64::MAX
    } else {
        state.limits.job_tasks as u64
    };
    let job = NewJob {
        id: format!("j-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        name: header.name,
        module,
        options,
        payloads: Vec::new(),
        sweep: None,
    };
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let feed = feed(lines, sender, cap);
    let (fed, submitted) = tokio::join!(feed, state.work.submit_job_stream(job, receiver));
    // The feed's error first: it says why the store saw the stream cut off.
    if let Err(Some(e)) = fed {
        return Err(e);
    }
    let record = submitted?;
    let stats = state.tracker.job(&record.id);
    Ok((StatusCode::CREATED, Json(views::job(&record, &stats))))
}

/// Read payload lines and hand them on in batches, then `End`. `Err(None)`:
/// the store stopped taking them (it says why).
async fn feed(
    mut lines: Lines,
    sender: tokio::sync::mpsc::Sender<StreamItem>,
    cap: u64,
) -> Result<(), Option<AppError>> {
    let mut batch = Vec::with_capacity(BATCH);
    let mut count = 0u64;
    while let Some(line) = lines.next().await.map_err(Some)? {
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&line) {
            return Err(Some(AppError::bad_request(
                "invalid_json",
                format!("line {}: {e}", lines.number),
            )));
        }
        count += 1;
        if count > cap {
            return Err(Some(AppError::bad_request(
                "invalid_job",
                format!(
                    "at most {cap} payloads per job on this store; use a sweep, several jobs, or a Kafka grid"
                ),
            )));
        }
        batch.push(line.to_vec());
        if batch.len() >= BATCH {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            sender
                .send(StreamItem::Payloads(full))
                .await
                .map_err(|_| None)?;
        }
    }
    if count == 0 {
        return Err(Some(AppError::bad_request(
            "invalid_job",
            "a job needs at least one payload (one line each after the first)",
        )));
    }
    if !batch.is_empty() {
        sender
            .send(StreamItem::Payloads(batch))
            .await
            .map_err(|_| None)?;
    }
    sender.send(StreamItem::End).await.map_err(|_| None)
}

/// The body's non-blank lines, trimmed, numbered from 1.
struct Lines {
    body: axum::body::BodyDataStream,
    buffer: Vec<u8>,
    /// Where the part of `buffer` not returned yet starts.
    start: usize,
    /// Where the part of `buffer` not searched for a newline starts.
    searched: usize,
    ended: bool,
    /// The number of the line returned last.
    number: u64,
}

impl Lines {
    fn new(body: Body) -> Self {
        Lines {
            body: body.into_data_stream(),
            buffer: Vec::new(),
            start: 0,
            searched: 0,
            ended: false,
            number: 0,
        }
    }

    /// The next non-blank line, or `None` at the end of the body.
    async fn next(&mut self) -> Result<Option<Bytes>, AppError> {
        loop {
            if let Some(at) = self.buffer[self.searched..]
                .iter()
                .position(|b| *b == b'\n')
            {
                let end = self.searched + at;
                let line = self.buffer[self.start..end].trim_ascii();
                let line = (!line.is_empty()).then(|| Bytes::copy_from_slice(line));
                self.start = end + 1;
                self.searched = end + 1;
                self.number += 1;
                match line {
                    Some(line) => return Ok(Some(line)),
                    None => continue,
                }
            }
            self.searched = self.buffer.len();
            if self.buffer.len() - self.start > MAX_LINE_BYTES {
                return Err(AppError::bad_request(
                    "line_too_long",
                    format!(
                        "line {}: longer than {MAX_LINE_BYTES} bytes",
                        self.number + 1
                    ),
                ));
            }
            if self.ended {
                let line = self.buffer[self.start..].trim_ascii();
                if line.is_empty() {
                    return Ok(None);
                }
                let line = Bytes::copy_from_slice(line);
                self.start = self.buffer.len();
                self.number += 1;
                return Ok(Some(line));
            }
            match self.body.next().await {
                Some(Ok(data)) => {
                    // Drop what was returned before taking more.
                    self.buffer.drain(..self.start);
                    self.searched -= self.start;
                    self.start = 0;
                    self.buffer.extend_from_slice(&data);
                }
                Some(Err(e)) => {
                    return Err(AppError::bad_request(
                        "invalid_body",
                        format!("reading the body after line {}: {e}", self.number),
                    ));
                }
                None => self.ended = true,
            }
        }
    }
}

/// Streams are `application/x-ndjson` (or `application/jsonl`): a form or
/// a mistaken client is refused before anything is read.
fn require_ndjson(headers: &HeaderMap) -> Result<(), AppError> {
    match super::guard::media_type(headers).as_deref() {
        Some("application/x-ndjson" | "application/jsonl") => Ok(()),
        other => Err(AppError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            message: format!(
                "a job stream is application/x-ndjson (one JSON value per line), not {}",
                other.unwrap_or("a body without a Content-Type")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(chunks: Vec<&'static str>) -> Result<Vec<(u64, String)>, AppError> {
        let stream = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c.as_bytes()))),
        );
        let mut lines = Lines::new(Body::from_stream(stream));
        let mut out = Vec::new();
        while let Some(line) = lines.next().await? {
            out.push((lines.number, String::from_utf8(line.to_vec()).unwrap()));
        }
        Ok(out)
    }

    #[tokio::test]
    async fn lines_split_across_chunks_are_joined_blank_ones_skipped_and_numbered() {
        let lines = lines_of(vec!["{\"a\"", ":1}\r\n\n  2 \n[3", "]"])
            .await
            .unwrap();
        assert_eq!(
            lines,
            [
                (1, "{\"a\":1}".to_string()),
                (3, "2".to_string()),
                (4, "[3]".to_string())
            ]
        );
    }

    #[tokio::test]
    async fn a_line_over_the_limit_is_refused_with_its_number() {
        let long: &'static str =
            Box::leak(format!("1\n{}", "7".repeat(MAX_LINE_BYTES + 1)).into_boxed_str());
        let e = lines_of(vec![long]).await.unwrap_err();
        assert_eq!(e.code, "line_too_long");
        assert!(e.message.contains("line 2"), "{}", e.message);
    }
}
