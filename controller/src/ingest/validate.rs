//! Checks a report completely before anything of it is applied, so a bad report never half-applies
//! and never reaches the windows.
//!
//! Rules, per stats entry:
//! - the canary key is `namespace/name` (both parts non-empty, one slash);
//! - the version is primary or canary;
//! - failures <= requests (failures are a subset of the requests);
//! - the latency histogram decodes under the weir.v1 layout, and its sample count equals
//!   `requests`: the filter records the latency of every request it routed, so a difference means
//!   samples were lost or invented (a missing histogram counts as empty);
//! - the canary is in the current directive (or left it less than the grace period ago).
//!
//! and at most `max_entries` entries per report. The first violation rejects the whole report.
//! Entries for a canary the reporter may not speak for are set aside (the caller drops them and
//! applies the rest): the report is well-formed, only some of its claims are refused.

use std::time::Instant;

use weir_proto::v1::{Report, Version, VersionStats};

use super::counters::{RejectReason, Rejection};
use super::windows::{version_index, wire_total, ValidEntry, Windows};

/// True for a `namespace/name` key.
pub(crate) fn is_canary_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((namespace, name)) => !namespace.is_empty() && !name.is_empty() && !name.contains('/'),
        None => false,
    }
}

fn describe(stats: &VersionStats) -> String {
    let version = match Version::try_from(stats.version) {
        Ok(Version::Primary) => "primary",
        Ok(Version::Canary) => "canary",
        _ => "unspecified",
    };
    format!("stats for canary {:?} ({version})", stats.canary)
}

/// A report's entries, checked: those to apply, and the canaries of the entries the reporter may
/// not speak for.
pub(crate) struct Validated<'r> {
    pub(crate) entries: Vec<ValidEntry<'r>>,
    pub(crate) not_allowed: Vec<&'r str>,
}

/// Validates every stats entry of `report` (a report with sequence > 0) and binds each to its
/// canary's windows; `allowed` says whether the reporter may speak for a canary. `generation` is
/// only used to make the unknown-canary message precise.
pub(crate) fn validate<'r>(
    report: &'r Report,
    windows: &Windows,
    max_entries: usize,
    generation: u64,
    allowed: impl Fn(&str) -> bool,
    now: Instant,
) -> Result<Validated<'r>, Rejection> {
    if report.stats.len() > max_entries {
        return Err(Rejection::new(
            RejectReason::TooManyEntries,
            format!(
                "report carries {} stats entries, more than the controller's limit of {max_entries}; \
                 raise the controller's max entries per report or route fewer canaries through one Envoy",
                report.stats.len()
            ),
        ));
    }
    let mut entries = Vec::with_capacity(report.stats.len());
    let mut not_allowed = Vec::new();
    for stats in &report.stats {
        if !is_canary_key(&stats.canary) {
            return Err(Rejection::new(
                RejectReason::BadCanaryKey,
                format!(
                    "stats entry names canary {:?}, which is not a `namespace/name` key; \
                     the reporter must use the keys of the directive it received",
                    stats.canary
                ),
            ));
        }
        let Some(version) = Version::try_from(stats.version)
            .ok()
            .and_then(version_index)
        else {
            return Err(Rejection::new(
                RejectReason::UnspecifiedVersion,
                format!(
                    "stats entry for canary {:?} has version {} (VERSION_UNSPECIFIED or unknown); \
                     every entry must be VERSION_PRIMARY or VERSION_CANARY",
                    stats.canary, stats.version
                ),
            ));
        };
        if stats.failures > stats.requests {
            return Err(Rejection::new(
                RejectReason::FailuresExceedRequests,
                format!(
                    "{}: {} failures out of {} requests; failures must be a subset of requests",
                    describe(stats),
                    stats.failures,
                    stats.requests
                ),
            ));
        }
        let samples = match stats.latency.as_ref().map(wire_total) {
            None => 0,
            Some(Ok(samples)) => samples,
            Some(Err(error)) => {
                return Err(Rejection::new(
                    RejectReason::BadHistogram,
                    format!("{}: {error}", describe(stats)),
                ))
            }
        };
        if samples != stats.requests {
            return Err(Rejection::new(
                RejectReason::HistogramCountMismatch,
                format!(
                    "{}: the latency histogram holds {samples} samples but requests is {}; \
                     every routed request must record its latency exactly once",
                    describe(stats),
                    stats.requests
                ),
            ));
        }
        let Some(cell) = windows.accepting(&stats.canary, now) else {
            return Err(Rejection::new(
                RejectReason::UnknownCanary,
                format!(
                    "report names canary {:?}, which is not in the current directive \
                     (generation {generation}); reporters may only report canaries they were told \
                     to route (a reporter on an old directive catches up on its own)",
                    stats.canary
                ),
            ));
        };
        if !allowed(&stats.canary) {
            if !not_allowed.contains(&stats.canary.as_str()) {
                not_allowed.push(stats.canary.as_str());
            }
            continue;
        }
        entries.push(ValidEntry {
            cell,
            version,
            stats,
        });
    }
    Ok(Validated {
        entries,
        not_allowed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_keys_are_namespace_slash_name() {
        assert!(is_canary_key("shop/web"));
        for bad in ["", "web", "/web", "shop/", "a/b/c", "/"] {
            assert!(!is_canary_key(bad), "{bad:?}");
        }
    }
}
