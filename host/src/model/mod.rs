//! Plain data types shared by every layer: no I/O, no Wasm, no queues.

mod bytes;
mod sweep;
mod task;

pub use bytes::{MAX_RESULTS_PER_PAGE, bytes_field, json_or_base64, result_line};

pub use sweep::{MAX_SWEEP_BASE_BYTES, MAX_SWEEP_POINTS, Sweep, SweepAxis, SweepError};
pub use task::{
    Event, JobCounts, JobId, JobRecord, Micros, Millis, NewJob, NewTask, OnFailure, TaskId,
    TaskOptions, TaskRecord, TaskState, now_ms, now_us,
};

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// A module's identity: the lowercase hex SHA-256 of its bytes, so the same
/// bytes uploaded twice are the same module on every host. Shared, not
/// copied, by the many waiting tasks that name it (cloning is a count).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = String, example = "9a22a189530288391b7c29d5ea83832937461339d8f36f29002ffe7efad07eab")]
pub struct ModuleId(std::sync::Arc<str>);

impl ModuleId {
    /// The id of these module bytes.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        ModuleId(hex::encode(Sha256::digest(bytes)).into())
    }

    /// Parse a user-supplied id: 64 hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        let ok = text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then(|| ModuleId(text.to_ascii_lowercase().into()))
    }

    /// The prefix of the modules no Wasm worker runs: tasks of
    /// `external:NAME` wait for a worker that asked for that kind (a GPU
    /// job, a legacy pricer) and carry no uploaded module.
    pub const EXTERNAL_PREFIX: &'static str = "external:";

    /// The module of tasks reserved for external workers of `kind`
    /// (`external:pricer-gpu`), or `None` if the text is not one: after the
    /// prefix, 1 to 64 letters, digits, `-`, `_` or `.`.
    pub fn external(text: &str) -> Option<Self> {
        let kind = text.strip_prefix(Self::EXTERNAL_PREFIX)?;
        let ok = (1..=64).contains(&kind.len())
            && kind
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        ok.then(|| ModuleId(text.into()))
    }

    /// An id as stored or sent between hosts: a digest, or an external kind.
    pub fn read(text: &str) -> Option<Self> {
        Self::parse(text).or_else(|| Self::external(text))
    }

    /// Whether tasks of this module are for external workers (no Wasm).
    pub fn is_external(&self) -> bool {
        self.0.starts_with(Self::EXTERNAL_PREFIX)
    }

    /// The hex digest (or `external:KIND`).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which guest contract a module follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    /// A component exporting `kwq:task/task` (built with `kwq-guest`).
    Component,
    /// A plain WASI preview-1 command: payload on stdin, result on stdout.
    WasiCommand,
}

/// Why a task failed, as a stable name users can filter and alert on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Ran past its wall-clock timeout.
    Timeout,
    /// Tried to grow linear memory past its cap.
    MemoryLimit,
    /// Used up its fuel budget.
    FuelExhausted,
    /// Trapped (panic, unreachable, stack overflow, bad memory access...).
    Trap,
    /// Wrote more stdout/stderr or returned a bigger result than allowed.
    OutputTooLarge,
    /// The module bytes are not a usable task module.
    InvalidModule,
    /// The module is not known to this host.
    UnknownModule,
    /// The guest returned an error (or a command exited non-zero).
    GuestError,
    /// The guest's `init` failed for this affinity key.
    InitFailed,
    /// A host-side failure unrelated to the guest.
    Internal,
}

impl ErrorKind {
    /// The snake_case name used on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::MemoryLimit => "memory_limit",
            ErrorKind::FuelExhausted => "fuel_exhausted",
            ErrorKind::Trap => "trap",
            ErrorKind::OutputTooLarge => "output_too_large",
            ErrorKind::InvalidModule => "invalid_module",
            ErrorKind::UnknownModule => "unknown_module",
            ErrorKind::GuestError => "guest_error",
            ErrorKind::InitFailed => "init_failed",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Severity of a guest log line (mirrors `kwq:task/context.level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Finest detail.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal progress.
    Info,
    /// Something odd.
    Warn,
    /// Something failed.
    Error,
}

/// One line a guest logged through `kwq:task/context.log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// Severity.
    pub level: LogLevel,
    /// Text, truncated to the host's per-line bound.
    pub message: String,
}

/// Resource limits for one task run. Every field has a default a user can
/// override per task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskLimits {
    /// Wall-clock limit for `init` + `run`.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Cap on each linear memory, in bytes.
    pub memory_bytes: u64,
    /// Fuel (roughly, Wasm instructions) budget; `None` for unmetered.
    pub fuel: Option<u64>,
    /// Cap on captured stdout and on captured stderr, each, in bytes.
    pub max_output_bytes: usize,
    /// Cap on the result's size in bytes.
    pub max_result_bytes: usize,
}

impl Default for TaskLimits {
    fn default() -> Self {
        TaskLimits {
            timeout: Duration::from_secs(60),
            memory_bytes: 256 << 20,
            fuel: None,
            max_output_bytes: 64 << 10,
            max_result_bytes: 4 << 20,
        }
    }
}

/// Serialise a `Duration` as whole milliseconds.
mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Bytes as one base64 string in serialised records (the invocation
/// journal's), a third bigger than the bytes instead of four times.
pub(crate) mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    /// `bytes` as base64.
    pub(crate) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    /// Bytes from base64.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }

    /// The same for optional bytes.
    pub(crate) mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        /// `bytes`, if any, as base64.
        pub(crate) fn serialize<S: Serializer>(
            bytes: &Option<Vec<u8>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match bytes {
                Some(bytes) => super::serialize(bytes, s),
                None => s.serialize_none(),
            }
        }

        /// Optional bytes from base64.
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Vec<u8>>, D::Error> {
            use base64::Engine;
            Option::<String>::deserialize(d)?
                .map(|text| {
                    super::STANDARD
                        .decode(text)
                        .map_err(serde::de::Error::custom)
                })
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_id_is_sha256_hex_and_parses_back() {
        let id = ModuleId::of(b"abc");
        assert_eq!(
            id.as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(ModuleId::parse(&id.as_str().to_uppercase()), Some(id));
        assert_eq!(ModuleId::parse("xyz"), None);
    }
}
