//! Go-style durations (`30s`, `1m`, `1m30s`, `500ms`, `1.5h`), as Flagger's fields use them.
//!
//! Parsing follows Go's `time.ParseDuration` (without negative values, which no Canary field
//! accepts); formatting follows Go's `Duration.String`, so event messages read exactly like
//! Flagger's (`1.2s`, `500ms`, `1m30s`, `1h0m0s`).

use std::time::Duration;

/// Why a string is not a Go duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Nothing to parse.
    #[error("empty duration")]
    Empty,
    /// A leading `-`: no Canary duration may be negative.
    #[error("negative durations are not allowed")]
    Negative,
    /// A number without a unit, like `30`.
    #[error("missing unit after `{0}` (use ns, us, ms, s, m or h)")]
    MissingUnit(String),
    /// A unit Go does not know, like `30sec`.
    #[error("unknown unit `{0}` (use ns, us, ms, s, m or h)")]
    UnknownUnit(String),
    /// Something that is not a number where a number must be.
    #[error("expected a number at `{0}`")]
    ExpectedNumber(String),
    /// Larger than about 584 years.
    #[error("too large")]
    Overflow,
}

/// Parses a Go duration string: a sequence of decimal numbers, each with an optional fraction and
/// a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`), like `1h15m30.5s`. `0` alone is allowed.
pub fn parse_go_duration(text: &str) -> Result<Duration, DurationError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let s = match s.strip_prefix('+') {
        Some(rest) => rest,
        None if s.starts_with('-') => return Err(DurationError::Negative),
        None => s,
    };
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after_int) = rest.split_at(int_len);
        let (frac_part, after_num) = match after_int.strip_prefix('.') {
            Some(f) => {
                let n = f.bytes().take_while(u8::is_ascii_digit).count();
                f.split_at(n)
            }
            None => ("", after_int),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(DurationError::ExpectedNumber(rest.to_string()));
        }
        let unit_len = after_num
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(after_num.len(), |(i, _)| i);
        let (unit, next) = after_num.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(DurationError::MissingUnit(s.to_string())),
            other => return Err(DurationError::UnknownUnit(other.to_string())),
        };
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| DurationError::Overflow)?
        };
        let mut nanos = int.checked_mul(scale).ok_or(DurationError::Overflow)?;
        // Fractions beyond nanosecond precision are truncated, as Go does.
        let mut place = scale;
        for digit in frac_part.bytes() {
            place /= 10;
            if place == 0 {
                break;
            }
            nanos += u128::from(digit - b'0') * place;
        }
        total = total.checked_add(nanos).ok_or(DurationError::Overflow)?;
        rest = next;
    }
    let total = u64::try_from(total).map_err(|_| DurationError::Overflow)?;
    Ok(Duration::from_nanos(total))
}

/// Formats a duration as Go's `Duration.String` does: `0s`, `1.5µs`, `500ms`, `1.2s`, `1m30s`,
/// `1h0m0s`.
pub fn format_go_duration(d: Duration) -> String {
    let n = d.as_nanos();
    if n == 0 {
        return "0s".to_string();
    }
    if n < 1_000_000_000 {
        let (unit, div) = if n < 1_000 {
            ("ns", 1)
        } else if n < 1_000_000 {
            ("µs", 1_000)
        } else {
            ("ms", 1_000_000)
        };
        return format!("{}{unit}", decimal(n, div));
    }
    let hours = n / 3_600_000_000_000;
    let minutes = (n / 60_000_000_000) % 60;
    let second_nanos = n % 60_000_000_000;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    out.push_str(&decimal(second_nanos, 1_000_000_000));
    out.push('s');
    out
}

/// `n / div` with the remainder as a decimal fraction without trailing zeros.
fn decimal(n: u128, div: u128) -> String {
    let int = n / div;
    let rem = n % div;
    if rem == 0 {
        return int.to_string();
    }
    let width = div.to_string().len() - 1;
    let frac = format!("{rem:0width$}");
    format!("{int}.{}", frac.trim_end_matches('0'))
}

/// Serde helpers for `Duration` fields stored as Go duration strings.
pub mod serde_go {
    use super::{format_go_duration, parse_go_duration};
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes a duration as a Go duration string.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_go_duration(*d))
    }

    /// Reads a Go duration string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse_go_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn parses_the_forms_flagger_users_write() {
        let cases = [
            ("30s", ms(30_000)),
            ("1m", ms(60_000)),
            ("1m30s", ms(90_000)),
            ("500ms", ms(500)),
            ("1h", ms(3_600_000)),
            ("1.5h", ms(5_400_000)),
            ("1h15m30.5s", ms(4_530_500)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("7ns", Duration::from_nanos(7)),
            (".5s", ms(500)),
            ("+2s", ms(2000)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_go_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_what_go_rejects_with_a_reason() {
        assert_eq!(parse_go_duration(""), Err(DurationError::Empty));
        assert_eq!(parse_go_duration("-1s"), Err(DurationError::Negative));
        assert_eq!(
            parse_go_duration("30"),
            Err(DurationError::MissingUnit("30".into()))
        );
        assert_eq!(
            parse_go_duration("30sec"),
            Err(DurationError::UnknownUnit("sec".into()))
        );
        assert_eq!(
            parse_go_duration("s"),
            Err(DurationError::ExpectedNumber("s".into()))
        );
        assert_eq!(
            parse_go_duration("99999999999h"),
            Err(DurationError::Overflow)
        );
    }

    #[test]
    fn formats_like_go_duration_string() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(7), "7ns"),
            (Duration::from_nanos(1_500), "1.5µs"),
            (ms(500), "500ms"),
            (Duration::from_micros(523_456), "523.456ms"),
            (ms(1_200), "1.2s"),
            (ms(30_000), "30s"),
            (ms(90_000), "1m30s"),
            (ms(120_000), "2m0s"),
            (ms(3_600_000), "1h0m0s"),
            (ms(4_530_500), "1h15m30.5s"),
        ];
        for (d, want) in cases {
            assert_eq!(format_go_duration(d), want);
        }
    }

    #[test]
    fn formatting_then_parsing_gives_back_the_same_duration() {
        for nanos in [
            1u64,
            999,
            1_000,
            1_234_567,
            59_999_999_999,
            3_723_000_000_001,
        ] {
            let d = Duration::from_nanos(nanos);
            assert_eq!(parse_go_duration(&format_go_duration(d)), Ok(d));
        }
    }
}
