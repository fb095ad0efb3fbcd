//! What the fuzz targets check on one input. The libFuzzer targets (`fuzz_targets/`) and the
//! plain loop (`weir-fuzz-loop`) call the same two functions; each panics on a broken property.

use std::time::{Duration, Instant};

use prost::Message;
use weir_controller::ingest::{Ingest, IngestConfig, Outcome};
use weir_controller::spec::{from_json, from_yaml};
use weir_proto::codec::{Precheck, MAX_STATS_PER_REPORT};
use weir_proto::v1::{CanaryRoute, Report, Version, VersionStats};

/// The canaries the fuzzed reports are checked against (also in the seeds).
pub const CANARIES: [&str; 2] = ["shop/web", "shop/api"];

/// The most a report may take decoded, for `wire` bytes of it: 16 bytes per wire byte (a
/// packed histogram count is one byte on the wire, 8 decoded, and a growing Vec may have twice
/// the room it uses), plus the entries' own structs, at most weir.v1's 1024 (twice, for the
/// same reason). docs/security.md uses this bound.
pub fn decoded_bound(wire: usize) -> usize {
    16 * wire
        + 2 * MAX_STATS_PER_REPORT * std::mem::size_of::<VersionStats>()
        + std::mem::size_of::<Report>()
}

/// What a decoded report takes on the heap and in its struct, in bytes.
pub fn decoded_size(report: &Report) -> usize {
    let reporter = report.reporter.as_ref().map_or(0, |r| {
        r.node_id.capacity() + r.namespace.capacity() + r.workload.capacity()
    });
    let stats: usize = report
        .stats
        .iter()
        .map(|s| {
            s.canary.capacity()
                + s.latency
                    .as_ref()
                    .map_or(0, |h| h.counts.capacity() * std::mem::size_of::<i64>())
        })
        .sum();
    std::mem::size_of::<Report>()
        + reporter
        + report.stats.capacity() * std::mem::size_of::<VersionStats>()
        + stats
}

fn ingest() -> Ingest {
    let ingest = Ingest::try_new(IngestConfig::default()).expect("the default configuration");
    let routes = CANARIES
        .iter()
        .map(|key| CanaryRoute {
            key: (*key).to_owned(),
            hosts: vec![format!("{}.example", key.replace('/', "-"))],
            canary_weight_bp: 1_000,
            ..Default::default()
        })
        .collect();
    ingest.publish(routes).expect("the fuzz directive");
    ingest
}

/// Report validation: the wire checks the server's codec runs before decoding, prost's
/// decoding, and the ingest's validation and accounting of the decoded report.
///
/// Properties: the wire check refuses a report prost decodes only for having too many entries;
/// a report it lets through has at most 1024 entries and decodes within [`decoded_bound`];
/// the ingest counts exactly the requests of a report it applies, the windows agree, and a
/// second copy is a duplicate that counts nothing.
pub fn report(data: &[u8]) {
    let checked = Report::precheck(data);
    let decoded = Report::decode(data);
    let report = match (checked, decoded) {
        (Ok(()), Ok(report)) => report,
        (Err(status), Ok(report)) => {
            assert!(
                report.stats.len() > MAX_STATS_PER_REPORT,
                "the wire check refused a Report prost decodes, with {} entries: {status:?}",
                report.stats.len()
            );
            return;
        }
        (_, Err(_)) => return,
    };
    assert!(report.stats.len() <= MAX_STATS_PER_REPORT);
    let size = decoded_size(&report);
    assert!(
        size <= decoded_bound(data.len()),
        "{} wire bytes decoded to {size} bytes, more than the bound {}",
        data.len(),
        decoded_bound(data.len())
    );

    let ingest = ingest();
    let now = Instant::now();
    let before = ingest.counters().snapshot().requests_applied;
    let outcome = ingest.ingest(&report, now);
    let applied = ingest.counters().snapshot().requests_applied - before;
    let Ok(ingested) = outcome else {
        assert_eq!(applied, 0, "a refused report counted requests");
        return;
    };
    match &ingested.outcome {
        Outcome::Applied | Outcome::Dropped(_) if applied > 0 => {
            let requests = report
                .stats
                .iter()
                .filter(|s| CANARIES.contains(&s.canary.as_str()))
                .fold(0u64, |sum, s| sum.saturating_add(s.requests));
            assert_eq!(
                applied, requests,
                "the ingest applied other requests than sent"
            );
            let mut windows = 0u64;
            for canary in CANARIES {
                for version in [Version::Primary, Version::Canary] {
                    let window = ingest.window(canary, version, Duration::from_secs(60), now);
                    windows = windows.saturating_add(window.map_or(0, |w| w.requests));
                }
            }
            assert_eq!(windows, applied, "the windows disagree with the counters");
            let again = ingest.ingest(&report, now);
            assert!(
                matches!(
                    again,
                    Ok(ref i) if i.outcome == Outcome::Duplicate
                ),
                "the same report again: {again:?}"
            );
            assert_eq!(
                ingest.counters().snapshot().requests_applied - before,
                applied,
                "a duplicate counted"
            );
        }
        _ => assert_eq!(
            applied, 0,
            "{:?} counted {applied} requests",
            ingested.outcome
        ),
    }
}

/// Canary parsing: YAML to a Canary, validation, and a round trip through JSON (what the
/// Kubernetes API server stores and hands back).
///
/// Properties: nothing panics; a Canary that parses also serializes, parses back from its JSON
/// to the same value, and gets the same verdict from validation.
pub fn canary(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(canary) = from_yaml(text) else {
        return;
    };
    let valid = canary.compile();
    let json = serde_json::to_string(&canary).expect("a parsed Canary serializes to JSON");
    let back = from_json(&json).unwrap_or_else(|e| {
        panic!("a parsed Canary does not parse back from its JSON: {e}\n{json}")
    });
    assert_eq!(
        back, canary,
        "the JSON round trip changed the Canary\n{json}"
    );
    assert_eq!(
        back.compile().is_ok(),
        valid.is_ok(),
        "validation changed its verdict after the JSON round trip\n{json}"
    );
}
