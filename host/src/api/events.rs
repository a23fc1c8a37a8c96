//! `GET /v1/events`: server-sent events of every task transition, resumable
//! from an offset (`?from=N` or the `Last-Event-ID` header).
//!
//! Every event is turned into its SSE frame once, by one [`EventFeed`] per
//! host, and shared by all connected clients: three hundred dashboards cost
//! three hundred copies of ready bytes per event, not three hundred
//! serialisations. Whatever has arrived for a client goes out as one HTTP
//! chunk (the frames are unchanged: one `task` message per event). With
//! `?batch=true` a client gets one `tasks` message per burst instead (a JSON
//! array of up to [`BATCH_MAX`] events, `id` the last offset), for clients
//! such as a browser page that pay per message.

use super::AppState;
use super::error::{ApiQuery, AppError};
use super::views;
use crate::model::Event;
use crate::queue::ReadStore;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

/// Most events in one batched message.
pub(super) const BATCH_MAX: usize = 1000;

/// Events read back from the store per replay page.
const REPLAY_PAGE: usize = 1000;

/// A comment line sent after this long without events, so proxies and
/// clients see the connection alive.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One event as every client sends it.
#[derive(Debug)]
struct SharedEvent {
    offset: u64,
    job: Option<String>,
    /// The event as JSON (one line).
    json: Bytes,
    /// Its SSE message: `id`, `event: task`, `data`.
    frame: Bytes,
}

impl SharedEvent {
    fn of(event: &Event) -> Self {
        let json = views::event_json(event);
        let mut frame = BytesMut::with_capacity(json.len() + 48);
        frame.put_slice(format!("id: {}\nevent: task\ndata: ", event.offset).as_bytes());
        frame.put_slice(json.as_bytes());
        frame.put_slice(b"\n\n");
        SharedEvent {
            offset: event.offset,
            job: event.job_id.clone(),
            json: Bytes::from(json),
            frame: frame.freeze(),
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

    fn subscribe(&self, queue: &Arc<dyn ReadStore>) -> broadcast::Receiver<FeedItem> {
        self.sender
            .get_or_init(|| {
                // Room for a few seconds of a busy grid's events: a client
                // that falls further behind catches up from the store.
                let (sender, _) = broadcast::channel(1 << 18);
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
) -> Result<Response, AppError> {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let reader = Reader {
        queue: state.reads.clone(),
        // Subscribe before replaying, so nothing falls between the two.
        live: state.events.subscribe(&state.reads),
        last: resume.or(query.from),
        replaying: resume.or(query.from).is_some(),
        job: query.job,
        batch: if query.batch { BATCH_MAX } else { 1 },
        buffered: Vec::new(),
    };
    let stream = futures::stream::unfold(reader, |mut reader| async move {
        let chunk = match tokio::time::timeout(KEEP_ALIVE, reader.next()).await {
            Ok(chunk) => chunk?,
            Err(_) => Bytes::from_static(b":\n\n"),
        };
        Some((Ok::<_, Infallible>(chunk), reader))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .map_err(|e| AppError::internal(e.to_string()))
}

/// One client's position in the event stream.
struct Reader {
    queue: Arc<dyn ReadStore>,
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
    /// The next chunk of messages, or `None` when the stream ends. (A
    /// future dropped by the keep-alive timeout loses nothing: events move
    /// to `buffered` before any await point that could be cut.)
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if !self.buffered.is_empty() {
                return Some(self.chunk());
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
            // Take what else has arrived meanwhile: one chunk for all of it.
            while self.buffered.len() < BATCH_MAX && !self.replaying {
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

    /// What is buffered, as one chunk: the events' own messages, or one
    /// `tasks` message per [`BATCH_MAX`] events for a batching client.
    fn chunk(&mut self) -> Bytes {
        let events: Vec<_> = self.buffered.drain(..).collect();
        let size: usize = events.iter().map(|e| e.frame.len() + 1).sum();
        let mut out = BytesMut::with_capacity(size + 64);
        if self.batch == 1 {
            for event in &events {
                out.put_slice(&event.frame);
            }
            return out.freeze();
        }
        for group in events.chunks(self.batch) {
            let last = group.last().map_or(0, |e| e.offset);
            out.put_slice(format!("id: {last}\nevent: tasks\ndata: [").as_bytes());
            for (i, event) in group.iter().enumerate() {
                if i > 0 {
                    out.put_u8(b',');
                }
                out.put_slice(&event.json);
            }
            out.put_slice(b"]\n\n");
        }
        out.freeze()
    }
}
