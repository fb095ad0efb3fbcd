//! Command-line flags and the two value syntaxes they use: Go-style durations and an error rate.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::istio::parse_port_workload;

/// A tiny HTTP app for demos and tests: answers 200, or the status asked for in `X-Mirror-Code`.
#[derive(Debug, Parser)]
#[command(name = "mirror")]
pub struct Flags {
    /// Address to listen on; port 0 picks a free port (the first stdout line names the bound one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Version this instance reports in the `x-mirror-version` header and in the body.
    #[arg(long, default_value = "v1.0.0")]
    pub version: String,
    /// Share of requests (0.0..=1.0) answered with 500, spread evenly: after n requests exactly
    /// floor(n × rate) have failed.
    #[arg(long, default_value = "0", value_parser = parse_rate)]
    pub error_rate: f64,
    /// Delay added to every response, Go-style (`50ms`, `1s`, `1m30s`); `X-Mirror-Delay` overrides it.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub latency: Duration,
    /// Publish what an Istio sidecar would for the requests served (`istio_requests_total`,
    /// `istio_request_duration_milliseconds`, reporter="destination") at `GET /stats/prometheus`.
    #[arg(long)]
    pub istio_metrics: bool,
    /// `destination_workload_namespace` of the Istio series.
    #[arg(long, default_value = "default")]
    pub istio_namespace: String,
    /// `destination_workload` of the Istio series: `<target>-primary` or `<target>`, as Flagger
    /// names the Deployments.
    #[arg(long, default_value = "mirror")]
    pub istio_workload: String,
    /// `PORT=NAME`: the workload name when listening on PORT, over --istio-workload (one
    /// command line for both roles, as local mode starts them); repeatable.
    #[arg(long = "istio-workload-for-port", value_parser = parse_port_workload)]
    pub istio_workload_for_port: Vec<(u16, String)>,
}

impl Flags {
    /// The Istio workload name for a process listening on `port`.
    pub fn istio_workload_on(&self, port: u16) -> String {
        self.istio_workload_for_port
            .iter()
            .find(|(p, _)| *p == port)
            .map_or_else(|| self.istio_workload.clone(), |(_, name)| name.clone())
    }
}

/// Parses an error rate: a number from 0.0 to 1.0.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("error rate {text:?} is not a number; give a share such as 0.25"))?;
    if !(0.0..=1.0).contains(&rate) {
        return Err(format!(
            "error rate {rate} is outside 0.0..=1.0; give a share such as 0.25"
        ));
    }
    Ok(rate)
}

/// Parses a Go-style duration: one or more `<number><unit>` terms (`1h2m3.5s`, `120ms`), units
/// `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h`; a bare `0` is zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = |why: &str| {
        format!("duration {text:?} {why}; write it like 50ms, 1.5s or 1m30s (units ns, us, ms, s, m, h)")
    };
    let mut rest = text.trim();
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad("is empty"));
    }
    let mut total_nanos: f64 = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| bad("has a number without a unit"))?;
        if number_len == 0 {
            return Err(bad("has a unit without a number"));
        }
        let number: f64 = rest[..number_len]
            .parse()
            .map_err(|_| bad("has a malformed number"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad("has an unknown unit")),
        };
        rest = &rest[unit_len..];
        total_nanos += number * nanos_per_unit;
    }
    // Rounding, not truncation: 0.1s is 100ms, not 99.999999ms.
    Ok(Duration::from_nanos(total_nanos.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_durations_parse_to_their_exact_value() {
        let cases = [
            ("0", Duration::ZERO),
            ("0ms", Duration::ZERO),
            ("120ms", Duration::from_millis(120)),
            ("1s", Duration::from_secs(1)),
            ("1.5s", Duration::from_millis(1500)),
            ("0.1s", Duration::from_millis(100)),
            ("1m30s", Duration::from_secs(90)),
            ("1h2m3s", Duration::from_secs(3723)),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("7ns", Duration::from_nanos(7)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn malformed_durations_are_refused_with_the_expected_syntax() {
        for text in ["", "10", "ms", "1x", "1.2.3s", "-1s", "5 s"] {
            let err = parse_duration(text).expect_err(text);
            assert!(err.contains("50ms"), "{text}: {err}");
        }
    }

    #[test]
    fn error_rate_must_be_a_share() {
        assert_eq!(parse_rate("0.25"), Ok(0.25));
        assert_eq!(parse_rate("1"), Ok(1.0));
        assert!(parse_rate("1.5").is_err());
        assert!(parse_rate("-0.1").is_err());
        assert!(parse_rate("half").is_err());
    }

    #[test]
    fn flags_parse_from_a_command_line() {
        let flags = Flags::try_parse_from([
            "mirror",
            "--listen",
            "127.0.0.1:0",
            "--version",
            "v1.1.1",
            "--error-rate",
            "0.5",
            "--latency",
            "50ms",
        ])
        .unwrap();
        assert_eq!(flags.listen.port(), 0);
        assert_eq!(flags.version, "v1.1.1");
        assert_eq!(flags.error_rate, 0.5);
        assert_eq!(flags.latency, Duration::from_millis(50));
        assert!(Flags::try_parse_from(["mirror", "--latency", "fast"]).is_err());
    }

    #[test]
    fn the_istio_workload_follows_the_listening_port() {
        let flags = Flags::try_parse_from([
            "mirror",
            "--istio-metrics",
            "--istio-workload",
            "mhs",
            "--istio-workload-for-port",
            "8081=mhs-primary",
            "--istio-workload-for-port",
            "8082=mhs-primary",
        ])
        .unwrap();
        assert!(flags.istio_metrics);
        assert_eq!(flags.istio_workload_on(8082), "mhs-primary");
        assert_eq!(flags.istio_workload_on(8083), "mhs");
        assert!(Flags::try_parse_from(["mirror", "--istio-workload-for-port", "mhs"]).is_err());
    }
}
