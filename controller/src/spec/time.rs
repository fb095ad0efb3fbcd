//! Points in time for the persisted status.
//!
//! The engine never reads a clock: the executor passes `now` in. Times are stored as milliseconds
//! since the Unix epoch and serialized as RFC 3339 in UTC (`2024-05-01T10:00:00Z`, with `.mmm`
//! only when the milliseconds are not zero), the format Kubernetes uses for `metav1.Time`, so the
//! same status can be written to a local state file and to a Canary's status subresource.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time, in whole milliseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

/// Why a string is not an RFC 3339 time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not an RFC 3339 time like 2024-05-01T10:00:00Z: {reason}")]
pub struct TimestampError {
    text: String,
    reason: &'static str,
}

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A time given in milliseconds since the Unix epoch.
    pub const fn from_unix_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn unix_millis(self) -> u64 {
        self.0
    }

    /// Converts a wall-clock reading (the executor's `SystemTime::now()`); times before the epoch
    /// become the epoch.
    pub fn from_system_time(t: SystemTime) -> Self {
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Timestamp(ms)
    }

    /// This time plus `d` (saturating).
    pub fn saturating_add(self, d: Duration) -> Self {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(ms))
    }

    /// How long after `earlier` this is; zero if it is not later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// Parses RFC 3339 (`2024-05-01T10:00:00Z`, `2024-05-01T12:00:00.250+02:00`); fractions
    /// below a millisecond are truncated.
    pub fn parse_rfc3339(text: &str) -> Result<Self, TimestampError> {
        let err = |reason| TimestampError {
            text: text.to_string(),
            reason,
        };
        let b = text.as_bytes();
        if b.len() < 20 {
            return Err(err("too short"));
        }
        let num = |range: std::ops::Range<usize>| -> Result<u64, TimestampError> {
            let part = text.get(range).ok_or_else(|| err("bad digits"))?;
            if !part.bytes().all(|c| c.is_ascii_digit()) {
                return Err(err("expected digits"));
            }
            part.parse().map_err(|_| err("expected digits"))
        };
        if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
            return Err(err("expected YYYY-MM-DDTHH:MM:SS"));
        }
        if b[13] != b':' || b[16] != b':' {
            return Err(err("expected YYYY-MM-DDTHH:MM:SS"));
        }
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return Err(err("no such date"));
        }
        if hour > 23 || minute > 59 || second > 60 {
            return Err(err("no such time of day"));
        }
        let mut i = 19;
        let mut millis = 0u64;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                if i - start < 3 {
                    millis = millis * 10 + u64::from(b[i] - b'0');
                }
                i += 1;
            }
            if i == start {
                return Err(err("expected digits after `.`"));
            }
            for _ in (i - start)..3 {
                millis *= 10;
            }
        }
        let offset_secs: i64 = match b.get(i) {
            Some(b'Z' | b'z') if i + 1 == b.len() => 0,
            Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
                let h = num(i + 1..i + 3)?;
                let m = num(i + 4..i + 6)?;
                if h > 23 || m > 59 {
                    return Err(err("bad UTC offset"));
                }
                let secs = i64::try_from(h * 3600 + m * 60).map_err(|_| err("bad UTC offset"))?;
                if *sign == b'+' {
                    secs
                } else {
                    -secs
                }
            }
            _ => return Err(err("expected `Z` or an offset like +02:00 at the end")),
        };
        let days = days_from_civil(year, month, day);
        let local_secs = days * 86_400
            + i64::try_from(hour * 3600 + minute * 60 + second).map_err(|_| err("overflow"))?;
        let utc_secs = local_secs - offset_secs;
        let utc_secs = u64::try_from(utc_secs).map_err(|_| err("before 1970"))?;
        Ok(Timestamp(utc_secs * 1000 + millis))
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC; milliseconds only when not zero.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0 / 1000;
        let millis = self.0 % 1000;
        let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX);
        let rem = secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
            rem / 3600,
            (rem / 60) % 60,
            rem % 60
        )?;
        if millis != 0 {
            write!(f, ".{millis:03}")?;
        }
        f.write_str("Z")
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Timestamp::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Timestamp {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Timestamp".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "format": "date-time"})
    }
}

fn is_leap(y: u64) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's days_from_civil / civil_from_days (proleptic Gregorian calendar).
fn days_from_civil(y: u64, m: u64, d: u64) -> i64 {
    let (y, m, d) = (y as i64, m as i64, d as i64);
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_rfc3339_with_millis_only_when_present() {
        assert_eq!(Timestamp::EPOCH.to_string(), "1970-01-01T00:00:00Z");
        let t = Timestamp::from_unix_millis(1_714_557_600_000);
        assert_eq!(t.to_string(), "2024-05-01T10:00:00Z");
        let t = Timestamp::from_unix_millis(1_709_209_845_250);
        assert_eq!(t.to_string(), "2024-02-29T12:30:45.250Z");
    }

    #[test]
    fn parses_what_it_formats_and_what_kubernetes_writes() {
        for ms in [
            0u64,
            1,
            999,
            951_782_400_000,
            1_709_209_845_250,
            4_102_444_800_000,
        ] {
            let t = Timestamp::from_unix_millis(ms);
            assert_eq!(Timestamp::parse_rfc3339(&t.to_string()), Ok(t));
        }
        assert_eq!(
            Timestamp::parse_rfc3339("2024-05-01T12:00:00.5+02:00"),
            Ok(Timestamp::from_unix_millis(1_714_557_600_500))
        );
        assert_eq!(
            Timestamp::parse_rfc3339("2024-05-01T10:00:00.123456789Z"),
            Ok(Timestamp::from_unix_millis(1_714_557_600_123))
        );
    }

    #[test]
    fn rejects_times_that_are_not_rfc3339() {
        for bad in [
            "",
            "2024-05-01",
            "2024-05-01T10:00:00",
            "2024-13-01T10:00:00Z",
            "2023-02-29T10:00:00Z",
            "2024-05-01T25:00:00Z",
            "2024-05-01T10:00:00.Z",
            "1714557600000",
        ] {
            assert!(Timestamp::parse_rfc3339(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serializes_as_a_json_string() {
        let t = Timestamp::from_unix_millis(1_714_557_600_000);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2024-05-01T10:00:00Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
    }

    #[test]
    fn arithmetic_saturates_instead_of_wrapping() {
        let t = Timestamp::from_unix_millis(1000);
        assert_eq!(t.saturating_add(Duration::from_secs(2)).unix_millis(), 3000);
        assert_eq!(t.since(Timestamp::from_unix_millis(5000)), Duration::ZERO);
        assert_eq!(
            Timestamp::from_unix_millis(u64::MAX).saturating_add(Duration::from_secs(1)),
            Timestamp::from_unix_millis(u64::MAX)
        );
    }
}
