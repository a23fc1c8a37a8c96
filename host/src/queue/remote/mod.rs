//! Worker machines: the HTTP protocol by which a `kwq worker` (or any
//! program) leases tasks from a scheduler host and reports how they went.
//! [`wire`] holds its bodies, [`Hub`] the host's side (registered workers,
//! remote leases that lapse), [`RemoteQueue`] the worker's side (the work
//! trait over HTTP). The protocol is in the OpenAPI document under
//! `/v1/workers` and described for people in `docs/worker-protocol.md`.

mod client;
mod hub;
pub mod wire;

pub use client::{RemoteConfig, RemoteQueue};
pub use hub::{Hub, HubConfig, HubError, MAX_LEASE_BATCH, MAX_WAIT_MS};
