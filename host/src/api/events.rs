//! `GET /v1/events`: server-sent events of every task transition, resumable
//! from an offset (`?from=N` or the `Last-Event-ID` header).
//!
//! Every event is turned into JSON once, by one [`EventFeed`] per host, and
//! shared by all connected clients: three hundred dashboards cost three
//! hundred pointer copies per event, not three hundred serialisations. With
//! `?batch=true` a client gets one `tasks` message per burst (a JSON array
//! of up to [`BATCH_MAX`] events, `id` the last offset) instead of one
//! `task` message per event, which is what keeps a client from lagging
//! behind a job of a hundred thousand short tasks.

use super::AppState;
use super::error::{ApiQuery, AppError};
#[allow(unused_imports)]
use super::openapi::{Created, ErrorBody, JobSubmission, PriorityChange, TaskSubmission};
use super::views;
use crate::model::Event;
use crate::queue::Queue;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

/// Most events in one batched message.
pub(super) const BATCH_MAX: usize = 1000;

/// Events read back from the store per replay page.
const REPLAY_PAGE: usize = 1000;

/// One event as every client sends it.
#[derive(Debug)]
struct SharedEvent {
    offset: u64,
    job: Option<String>,
    json: Box<str>,
}

impl SharedEvent {
    fn of(event: &Event) -> Self {
        SharedEvent {
            offset: event.offset,
            job: event.job_id.clone(),
            json: views::event(event).to_string().into(),
        }
    }
}

/// What the feed passes on: an event, or word that the feed itself fell
/// behind the store (clients catch up from the store).
#[derive(Debug, Clone)]
enum FeedItem {
    Event(Arc<SharedEvent>),
    Gap,
}

/// The host's one subscription to stored events, serialised once and
/// fanned out to every SSE client. Started by the first client.
#[derive(Clone, Default)]
pub struct EventFeed {
    sender: Arc<OnceLock<broadcast::Sender<FeedItem>>>,
}

impl EventFeed {
    /// A feed that starts with its first subscriber.
    pub fn new() -> Self {
        Self::default()
    }

    fn subscribe(&self, queue: &Arc<dyn Queue>) -> broadcast::Receiver<FeedItem> {
        self.sender
            .get_or_init(|| {
                let (sender, _) = broadcast::channel(65_536);
                let mut stored = queue.subscribe();
                let out = sender.clone();
                tokio::spawn(async move {
                    loop {
                        let item = match stored.recv().await {
                            Ok(event) => FeedItem::Event(Arc::new(SharedEvent::of(&event))),
                            Err(RecvError::Lagged(_)) => FeedItem::Gap,
                            Err(RecvError::Closed) => return,
                        };
                        // No receivers is fine: the next client subscribes anew.
                        let _ = out.send(item);
                    }
                });
                sender
            })
            .subscribe()
    }
}

/// Query of the event stream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    /// Replay stored events after this offset first.
    from: Option<u64>,
    /// Only this job's events.
    job: Option<String>,
    /// One `tasks` message (a JSON array) per burst of events.
    #[serde(default)]
    batch: bool,
}

/// Replays stored events after the offset, then follows live ones, without
/// gaps or repeats (live events at or below the last replayed offset are skipped).
#[utoipa::path(get, path = "/v1/events", tag = "events", params(("from" = Option<u64>, Query, description = "replay stored events after this offset"), ("job" = Option<String>, Query), ("batch" = Option<bool>, Query, description = "one `tasks` message (a JSON array of up to 1000 events, id = the last offset) per burst instead of one `task` message per event"), ("Last-Event-ID" = Option<u64>, Header)), responses((status = 200, description = "server-sent events; id is the offset, data is the event (or, batched, an array of events)", content_type = "text/event-stream", body = String)))]
pub(super) async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, AppError> {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let reader = Reader {
        queue: state.queue.clone(),
        // Subscribe before replaying, so nothing falls between the two.
        live: state.events.subscribe(&state.queue),
        last: resume.or(query.from),
        replaying: resume.or(query.from).is_some(),
        job: query.job,
        batch: if query.batch { BATCH_MAX } else { 1 },
        buffered: Vec::new(),
    };
    let stream = futures::stream::unfold(reader, |mut reader| async move {
        let message = reader.next().await?;
        Some((Ok(message), reader))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// One client's position in the event stream.
struct Reader {
    queue: Arc<dyn Queue>,
    live: broadcast::Receiver<FeedItem>,
    /// The last offset sent (or replayed past); `None` before any when the
    /// client asked for live events only.
    last: Option<u64>,
    replaying: bool,
    job: Option<String>,
    /// Events per message.
    batch: usize,
    /// Events waiting to be sent, oldest first.
    buffered: Vec<Arc<SharedEvent>>,
}

impl Reader {
    /// The next message, or `None` when the stream ends.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if !self.buffered.is_empty() {
                let take = self.buffered.len().min(self.batch);
                let events: Vec<_> = self.buffered.drain(..take).collect();
                return Some(self.message(&events));
            }
            if self.replaying {
                let from = self.last.unwrap_or(0);
                match self.queue.events_since(from, REPLAY_PAGE).await {
                    Ok(page) if !page.is_empty() => {
                        self.last = page.last().map(|e| e.offset);
                        for event in page {
                            self.keep(Arc::new(SharedEvent::of(&event)));
                        }
                        continue;
                    }
                    Ok(_) => self.replaying = false,
                    Err(_) => return None,
                }
            }
            match self.live.recv().await {
                Ok(item) => self.take_live(item),
                // Too slow a reader: catch up from the store.
                Err(RecvError::Lagged(_)) => self.fall_back(),
                Err(RecvError::Closed) => return None,
            }
            // A batching client takes what else has arrived meanwhile.
            while self.batch > 1 && self.buffered.len() < self.batch && !self.replaying {
                match self.live.try_recv() {
                    Ok(item) => self.take_live(item),
                    Err(TryRecvError::Lagged(_)) => self.fall_back(),
                    Err(_) => break,
                }
            }
        }
    }

    fn take_live(&mut self, item: FeedItem) {
        match item {
            FeedItem::Event(event) => {
                if self.last.is_some_and(|last| event.offset <= last) {
                    return;
                }
                self.last = Some(event.offset);
                self.keep(event);
            }
            FeedItem::Gap => self.fall_back(),
        }
    }

    /// Events were missed: read them from the store (a client that asked
    /// for live events only, with nothing sent yet, just goes on).
    fn fall_back(&mut self) {
        if self.last.is_some() {
            self.replaying = true;
        }
    }

    fn keep(&mut self, event: Arc<SharedEvent>) {
        if self.job.is_none() || event.job == self.job {
            self.buffered.push(event);
        }
    }

    fn message(&self, events: &[Arc<SharedEvent>]) -> SseEvent {
        let last = events.last().map_or(0, |e| e.offset);
        let message = SseEvent::default().id(last.to_string());
        if self.batch == 1 {
            return message.event("task").data(&*events[0].json);
        }
        let mut data = String::with_capacity(events.iter().map(|e| e.json.len() + 1).sum());
        data.push('[');
        for (i, event) in events.iter().enumerate() {
            if i > 0 {
                data.push(',');
            }
            data.push_str(&event.json);
        }
        data.push(']');
        message.event("tasks").data(data)
    }
}
