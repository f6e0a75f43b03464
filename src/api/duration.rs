//! Duration strings as users write them: `500ms`, `3s`, `2m`, `1h`, or `0`.
//!
//! A deliberate subset of Go's `time.ParseDuration`, so the CRD schema's CEL
//! `duration()` reads the same strings the same way.

use std::time::Duration;

/// A string that is not a duration; carries the text as written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("must be a duration like 500ms, 3s or 2m, got {0:?}")]
pub struct DurationError(pub String);

/// Parses `500ms`, `3s`, `2m`, `1h` or `0`; the error says what was expected.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let bad = || DurationError(text.to_string());
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(bad()),
    };
    millis.map(Duration::from_millis).ok_or_else(bad)
}

/// Formats a duration the way users write it (`1500ms`, `3s`, `2m`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_everything_else_with_the_value() {
        for bad in [
            "",
            "3",
            "3 s",
            "1.5s",
            "-1s",
            "3sec",
            "s",
            "ms",
            "1d",
            "99999999999999999999s",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert_eq!(err.0, bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for text in ["500ms", "3s", "2m", "1h", "0", "1500ms"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}
