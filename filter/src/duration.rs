//! Go-style durations ("500ms", "1s", "1m30s"), as Flagger and Istio users write them.

use std::time::Duration;

/// Parses a Go-style duration: one or more `<number><unit>` parts, units `ns`, `us`, `ms`, `s`,
/// `m`, `h`; numbers may have a fraction (`1.5s`). A bare `0` is zero.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err("empty duration; write e.g. \"1s\" or \"500ms\"".to_string());
    }
    let mut total_nanos: f64 = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| {
                format!("`{text}` has a number without a unit; add one of ns, us, ms, s, m, h")
            })?;
        let (number, after) = rest.split_at(number_len);
        let value: f64 = number.parse().map_err(|_| {
            format!("`{text}` is not a duration; write e.g. \"1s\", \"500ms\" or \"1m30s\"")
        })?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let nanos_per_unit = match unit {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            other => {
                return Err(format!(
                    "`{text}` has unknown unit `{other}`; use ns, us, ms, s, m or h"
                ))
            }
        };
        total_nanos += value * nanos_per_unit;
        rest = next;
    }
    if !total_nanos.is_finite() || total_nanos > 1e18 {
        return Err(format!("`{text}` is too long a duration"));
    }
    Ok(Duration::from_nanos(total_nanos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_durations_parse() {
        assert_eq!(parse("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn bad_durations_say_what_to_write() {
        assert!(parse("10").unwrap_err().contains("without a unit"));
        assert!(parse("10x").unwrap_err().contains("unknown unit `x`"));
        assert!(parse("").is_err());
        assert!(parse("s").is_err());
    }
}
