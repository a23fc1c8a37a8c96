//! `GET /v1/events`: server-sent events of every task transition, resumable
//! from an offset (`?from=N` or the `Last-Event-ID` header).

use super::AppState;
use super::error::{ApiQuery, AppError};
#[allow(unused_imports)]
use super::openapi::{Created, ErrorBody, JobSubmission, PriorityChange, TaskSubmission};
use super::views;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use std::convert::Infallible;
use tokio::sync::broadcast::error::RecvError;

/// Query of the event stream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    /// Replay stored events after this offset first.
    from: Option<u64>,
    /// Only this job's events.
    job: Option<String>,
}

/// Replays stored events after the offset, then follows live ones, without
/// gaps or repeats (live events at or below the last replayed offset are skipped).
#[utoipa::path(get, path = "/v1/events", tag = "events", params(("from" = Option<u64>, Query, description = "replay stored events after this offset"), ("job" = Option<String>, Query), ("Last-Event-ID" = Option<u64>, Header)), responses((status = 200, description = "server-sent events; id is the offset, data is the event", content_type = "text/event-stream", body = String)))]
pub(super) async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, AppError> {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let from = resume.or(query.from);
    // Subscribe before replaying, so nothing falls between the two.
    let live = state.queue.subscribe();
    let stream = event_stream(state.queue.clone(), from, query.job, live);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn event_stream(
    queue: std::sync::Arc<dyn crate::queue::Queue>,
    from: Option<u64>,
    job: Option<String>,
    live: tokio::sync::broadcast::Receiver<crate::model::Event>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    // State: (offset reached, replaying?, live receiver).
    futures::stream::unfold(
        (
            from.unwrap_or(u64::MAX),
            from.is_some(),
            live,
            Vec::new().into_iter(),
        ),
        move |(mut last, mut replaying, mut live, mut buffered)| {
            let queue = queue.clone();
            let job = job.clone();
            async move {
                loop {
                    if let Some(event) = buffered.next() {
                        return Some((Ok(to_sse(&event)), (last, replaying, live, buffered)));
                    }
                    if replaying {
                        match queue.events_since(last, 1000).await {
                            Ok(page) if !page.is_empty() => {
                                last = page.last().map(|e| e.offset).unwrap_or(last);
                                let page: Vec<_> = page
                                    .into_iter()
                                    .filter(|e| job.is_none() || e.job_id == job)
                                    .collect();
                                buffered = page.into_iter();
                                continue;
                            }
                            Ok(_) => replaying = false,
                            Err(_) => return None,
                        }
                    }
                    match live.recv().await {
                        Ok(event) => {
                            if last != u64::MAX && event.offset <= last {
                                continue;
                            }
                            last = event.offset;
                            if job.is_some() && event.job_id != job {
                                continue;
                            }
                            return Some((Ok(to_sse(&event)), (last, replaying, live, buffered)));
                        }
                        // Too slow a reader: catch up from the store.
                        Err(RecvError::Lagged(_)) if last != u64::MAX => replaying = true,
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => return None,
                    }
                }
            }
        },
    )
}

fn to_sse(event: &crate::model::Event) -> SseEvent {
    SseEvent::default()
        .id(event.offset.to_string())
        .event("task")
        .data(views::event(event).to_string())
}
