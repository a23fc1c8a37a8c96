//! Requests a browser page on another site must not be able to make.
//!
//! - **DNS rebinding**: a page on `evil.example` whose name is re-pointed at
//!   127.0.0.1 reaches a host listening on loopback with `Host:
//!   evil.example`. A host on a loopback address answers only to the names
//!   of [`AllowedHosts`] (localhost names and its own address, plus any
//!   `--allowed-host`).
//! - **Cross-site writes**: a page may POST to any address (a form, or
//!   `fetch` with `no-cors`), and the browser sends its `Origin`. A write
//!   whose `Origin` is not this host's own is refused; programs (curl, the
//!   CLI, workers) send no `Origin` and are not affected.
//! - **Content types**: writes carry their documented type (JSON bodies are
//!   checked by the JSON extractor; module uploads here), so a plain HTML
//!   form (`text/plain`, `multipart/form-data`) cannot smuggle one in.

use super::AppState;
use super::error::AppError;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use std::net::SocketAddr;

/// Which `Host` headers this host answers to.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    /// `None`: any (a host listening on a routable address, reached by
    /// whatever names its operators give it). `Some`: only these names
    /// (lowercase, without port).
    names: Option<Vec<String>>,
}

impl AllowedHosts {
    /// Any `Host` header.
    pub fn any() -> Self {
        AllowedHosts { names: None }
    }

    /// For a host listening on `listen`: on a loopback address, the
    /// localhost names, the address itself and `extra`; elsewhere any name
    /// unless `extra` lists some (then those, plus the localhost names and
    /// the address).
    pub fn for_listener(listen: SocketAddr, extra: &[String]) -> Self {
        if !listen.ip().is_loopback() && extra.is_empty() {
            return AllowedHosts::any();
        }
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "[::1]", "::1"]
            .iter()
            .map(|n| n.to_string())
            .collect();
        names.push(host_of(&listen.to_string()).to_string());
        names.extend(extra.iter().map(|n| n.to_ascii_lowercase()));
        AllowedHosts { names: Some(names) }
    }

    fn allows(&self, host: &str) -> bool {
        match &self.names {
            None => true,
            Some(names) => {
                let host = host_of(host).to_ascii_lowercase();
                names.contains(&host) || host.ends_with(".localhost")
            }
        }
    }
}

/// `name` of `name:port` or `[v6]` of `[v6]:port`.
fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.split_inclusive(']').next().unwrap_or(authority);
    }
    authority.split(':').next().unwrap_or(authority)
}

fn forbidden(code: &'static str, message: String) -> AppError {
    AppError {
        status: StatusCode::FORBIDDEN,
        code,
        message,
    }
}

/// Whether the request's `Origin` (if any) is this host itself.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true; // not a browser's cross-site request
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin_authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    !host.is_empty() && origin_authority.eq_ignore_ascii_case(host)
}

/// The middleware: Host on every request, Origin on every write.
pub(super) async fn check(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, AppError> {
    let headers = request.headers();
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok())
        && !state.allowed_hosts.allows(host)
    {
        return Err(forbidden(
            "host_not_allowed",
            format!(
                "this host does not answer to {host:?}; start it with --allowed-host {}",
                host_of(host)
            ),
        ));
    }
    let write = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if write && !same_origin(headers) {
        return Err(forbidden(
            "cross_origin",
            "writes from another site's pages are refused (Origin is not this host)".into(),
        ));
    }
    Ok(next.run(request).await)
}

/// A request's media type (its `Content-Type` without parameters,
/// lower-case), if it says one.
pub(super) fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|t| t.to_str().ok())
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

/// Module uploads are `application/wasm` or `application/octet-stream`.
pub(super) fn require_wasm_body(headers: &HeaderMap) -> Result<(), AppError> {
    match media_type(headers).as_deref() {
        None | Some("application/wasm" | "application/octet-stream") => Ok(()),
        Some(other) => Err(AppError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            message: format!(
                "a module upload is application/wasm or application/octet-stream, not {other}"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_host_answers_only_to_local_names() {
        let local = AllowedHosts::for_listener("127.0.0.1:7700".parse().unwrap(), &[]);
        for host in [
            "127.0.0.1:7700",
            "localhost:7700",
            "LOCALHOST",
            "[::1]:7700",
            "app.localhost:7700",
        ] {
            assert!(local.allows(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:7700",
            "127.0.0.1.evil.example",
        ] {
            assert!(!local.allows(host), "{host}");
        }
        let named = AllowedHosts::for_listener(
            "127.0.0.1:7700".parse().unwrap(),
            &["grid.internal".into()],
        );
        assert!(named.allows("grid.internal:7700"));
        let open = AllowedHosts::for_listener("0.0.0.0:7700".parse().unwrap(), &[]);
        assert!(open.allows("grid-host-1:7700"));
    }

    #[test]
    fn only_this_hosts_own_origin_may_write() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "127.0.0.1:7700".parse().unwrap());
        assert!(
            same_origin(&headers),
            "no Origin: not a browser's cross-site request"
        );
        headers.insert(header::ORIGIN, "http://127.0.0.1:7700".parse().unwrap());
        assert!(same_origin(&headers));
        headers.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(!same_origin(&headers));
        headers.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(!same_origin(&headers));
    }
}
