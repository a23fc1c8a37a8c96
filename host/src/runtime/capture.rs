//! Bounded capture of a guest's stdout/stderr. Past the bound the write
//! traps the guest and the task fails with `output_too_large`, instead of
//! the host buffering without limit.

use bytes::Bytes;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// A shared, resettable, size-capped byte sink.
#[derive(Clone, Debug)]
pub(super) struct OutputCapture(Arc<Mutex<Buffer>>);

#[derive(Debug, Default)]
struct Buffer {
    bytes: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

/// The error a guest write past the limit traps with.
#[derive(Debug, thiserror::Error)]
#[error("output limit of {0} bytes exceeded")]
struct OutputOverflow(usize);

impl OutputCapture {
    pub(super) fn new(limit: usize) -> Self {
        OutputCapture(Arc::new(Mutex::new(Buffer {
            limit,
            ..Buffer::default()
        })))
    }

    /// Start a new task: empty buffer, fresh limit.
    pub(super) fn reset(&self, limit: usize) {
        *self.lock() = Buffer {
            limit,
            ..Buffer::default()
        };
    }

    /// The captured bytes, leaving the buffer empty.
    pub(super) fn take(&self) -> Vec<u8> {
        std::mem::take(&mut self.lock().bytes)
    }

    /// A copy of the captured bytes, leaving them in place.
    pub(super) fn snapshot(&self) -> Vec<u8> {
        self.lock().bytes.clone()
    }

    pub(super) fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        // A poisoned lock only means a panic elsewhere; the bytes are still fine.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Append what fits; report whether everything did.
    fn append(&self, data: &[u8]) -> Result<(), usize> {
        let mut buf = self.lock();
        let room = buf.limit.saturating_sub(buf.bytes.len());
        if data.len() > room {
            buf.bytes.extend_from_slice(&data[..room]);
            buf.overflowed = true;
            return Err(buf.limit);
        }
        buf.bytes.extend_from_slice(data);
        Ok(())
    }
}

impl IsTerminal for OutputCapture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for OutputCapture {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for OutputCapture {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.append(&bytes)
            .map_err(|limit| StreamError::Trap(wasmtime::Error::new(OutputOverflow(limit))))
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always offer room: a write past the limit is what fails the task.
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for OutputCapture {
    async fn ready(&mut self) {}
}

impl AsyncWrite for OutputCapture {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(
            self.append(data)
                .map(|()| data.len())
                .map_err(|limit| io::Error::other(OutputOverflow(limit))),
        )
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_fits_and_flags_overflow_until_reset() {
        let capture = OutputCapture::new(4);
        assert!(capture.append(b"ab").is_ok());
        assert_eq!(capture.append(b"cdef"), Err(4));
        assert!(capture.overflowed());
        assert_eq!(capture.take(), b"abcd");
        capture.reset(8);
        assert!(!capture.overflowed());
        assert!(capture.append(b"12345678").is_ok());
    }
}
