//! Parsers for human-friendly flag values (`30s`, `256MiB`).

use super::CliError;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `path` made absolute against the working directory (without resolving
/// symbolic links or requiring it to exist yet). Paths from flags and
/// environment variables go through this once, at start: wasmtime's compile
/// cache rejects relative paths, and a store must not move if the process
/// changes directory later.
pub(super) fn absolute(path: &Path) -> Result<PathBuf, CliError> {
    std::path::absolute(path).map_err(|e| {
        CliError::usage(format!(
            "cannot make {} an absolute path: {e}",
            path.display()
        ))
    })
}

/// `30s`, `1500ms`, `2m`.
pub(super) fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like 30s or 500ms: {e}"))
}

/// `256MiB`, `1GiB`, `65536` (bytes), `64KiB`; `MB`/`KB`/`GB` mean the same as the binary units.
pub(super) fn bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 256MiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?}; use KiB, MiB or GiB"
            ));
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A duration given in µs, for people: `152 µs`, `1.25 ms`, `2.50 s`.
pub(super) fn micros(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(bytes("256MiB"), Ok(256 << 20));
        assert_eq!(bytes("64kb"), Ok(64 << 10));
        assert_eq!(bytes("100"), Ok(100));
        assert!(bytes("12 parsecs").unwrap_err().contains("parsecs"));
        assert_eq!(duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(duration("soon").is_err());
    }

    #[test]
    fn durations_read_at_their_own_scale() {
        assert_eq!(micros(152.4), "152 µs");
        assert_eq!(micros(1_250.0), "1.25 ms");
        assert_eq!(micros(2_500_000.0), "2.50 s");
    }

    #[test]
    fn relative_paths_become_absolute_against_the_working_directory() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            absolute(Path::new("kwq-data")).unwrap(),
            cwd.join("kwq-data")
        );
        assert_eq!(
            absolute(Path::new("/srv/kwq")).unwrap(),
            Path::new("/srv/kwq")
        );
        assert!(absolute(Path::new("")).is_err());
    }
}
