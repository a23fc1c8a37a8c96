//! `wasi:http` linked, every outgoing request refused.
//!
//! The sandbox has no network, but some toolchains import `wasi:http` even
//! when the task never makes a request: a componentize-js build with its
//! default settings imports `wasi:http/types` and `wasi:http/outgoing-handler`
//! for `fetch`. Without an implementation such a component cannot be
//! instantiated at all. With this one it loads, and a request it does make
//! fails inside the guest with `HTTP-request-denied`, as a refused
//! connection would, instead of reaching the network.

use std::future::Future;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// The `wasi:http` hooks of a task: every `send_request` is denied.
#[derive(Debug, Default)]
pub(super) struct RefuseOutgoing;

/// What `send_request` promises back: a response and its I/O future.
type SendResult = wasmtime_wasi_http::Result<(
    http::Response<WasiBody>,
    Box<dyn Future<Output = Result<(), Error>> + Send>,
)>;

impl WasiHttpHooks for RefuseOutgoing {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _io: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        tracing::debug!(uri = %request.uri(), "guest HTTP request refused: tasks have no network");
        Box::new(async { Err(Error::HttpRequestDenied) })
    }
}
