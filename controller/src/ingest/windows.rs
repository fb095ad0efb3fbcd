//! Per-canary, per-version time buckets that accepted reports merge into, and the window queries
//! the analysis reads.
//!
//! Buckets are keyed by the controller's receipt time (reports are deltas sent every interval, so
//! receipt time is as fine as the data allows). Each (canary, version) keeps a deque of buckets
//! ordered by index; one covering `bucket_width`, at most `retention / bucket_width` of them.
//! A report merge locks only its canary and costs O(histogram entries): latency slots live in
//! lazily allocated pages of 128 (one HDR power of two), so a bucket pays only for the latency
//! range it saw, and nothing walks all 3328 slots except a query.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use weir_proto::latency::{slot_of, DecodeError, SLOTS};
use weir_proto::v1::{Histogram, Version, VersionStats};
use weir_proto::LatencyHistogram;

use super::counters::lock;
use crate::analysis::judge::{BucketPair, VersionCounts, LATENCY_THRESHOLDS_US};

/// Slots per page: one HDR power of two, so a narrow latency range touches few pages.
const PAGE: usize = 128;
const PAGES: usize = SLOTS.div_ceil(PAGE);

/// Requests, failures and latency of one version of one canary over a window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VersionWindow {
    /// Requests routed to this version.
    pub requests: u64,
    /// Of those, the ones that failed.
    pub failures: u64,
    /// Their latency, merged exactly from every reporter's histograms.
    pub latency: LatencyHistogram,
    /// Distinct Envoys (node ids) that reported this version in the window.
    pub reporters: usize,
}

impl VersionWindow {
    /// Share of requests that did not fail, in percent; None without requests.
    pub fn success_rate_percent(&self) -> Option<f64> {
        if self.requests == 0 {
            return None;
        }
        let successes = self.requests.saturating_sub(self.failures);
        Some(successes as f64 * 100.0 / self.requests as f64)
    }

    /// The 99th percentile latency in milliseconds; None without samples.
    pub fn p99_ms(&self) -> Option<f64> {
        self.latency.quantile(0.99).map(|micros| micros / 1000.0)
    }
}

/// Index of a version in the per-canary arrays.
pub(crate) fn version_index(version: Version) -> Option<usize> {
    match version {
        Version::Primary => Some(0),
        Version::Canary => Some(1),
        Version::Unspecified => None,
    }
}

/// Checks a wire histogram exactly as [`LatencyHistogram::merge_wire`] does and returns its sample
/// count, without allocating the 26 KB dense histogram that merge_wire would build.
pub(crate) fn wire_total(wire: &Histogram) -> Result<u64, DecodeError> {
    let mut slot: usize = 0;
    let mut total: u64 = 0;
    for &entry in &wire.counts {
        match entry {
            0 => return Err(DecodeError::ZeroRun),
            n if n < 0 => slot = slot.saturating_add(n.unsigned_abs() as usize),
            n => {
                if slot >= SLOTS {
                    return Err(DecodeError::TooManySlots {
                        slots: slot.saturating_add(1),
                    });
                }
                total = total
                    .checked_add(n.unsigned_abs())
                    .ok_or(DecodeError::Overflow)?;
                slot += 1;
            }
        }
    }
    Ok(total)
}

/// A latency histogram in pages allocated on first use.
#[derive(Debug, Default)]
struct PagedHistogram {
    pages: [Option<Box<[u64; PAGE]>>; PAGES],
}

impl PagedHistogram {
    /// Adds a wire histogram that [`wire_total`] accepted; O(entries).
    fn add_wire(&mut self, wire: &Histogram) {
        let mut slot: usize = 0;
        for &entry in &wire.counts {
            if entry < 0 {
                slot = slot.saturating_add(entry.unsigned_abs() as usize);
                continue;
            }
            if let Some(page) = self.pages.get_mut(slot / PAGE) {
                let page = page.get_or_insert_with(|| Box::new([0; PAGE]));
                let count = &mut page[slot % PAGE];
                *count = count.saturating_add(entry.unsigned_abs());
            }
            slot = slot.saturating_add(1);
        }
    }

    fn add_into(&self, dense: &mut [u64]) {
        for (page_index, page) in self.pages.iter().enumerate() {
            let Some(page) = page else { continue };
            let start = page_index * PAGE;
            for (target, &n) in dense.iter_mut().skip(start).zip(page.iter()) {
                *target = target.saturating_add(n);
            }
        }
    }

    /// Samples in slots after `slot` (slower than the slot's values).
    fn count_above(&self, slot: usize) -> u64 {
        let mut total: u64 = 0;
        for (page_index, page) in self.pages.iter().enumerate() {
            let Some(page) = page else { continue };
            let start = page_index * PAGE;
            if start + PAGE <= slot + 1 {
                continue;
            }
            let skip = (slot + 1).saturating_sub(start);
            total = total.saturating_add(page.iter().skip(skip).sum::<u64>());
        }
        total
    }

    fn pages_in_use(&self) -> usize {
        self.pages.iter().filter(|p| p.is_some()).count()
    }
}

/// The sparse wire form of dense slot counts (the inverse of the run-length decoding).
fn encode_dense(dense: &[u64]) -> Histogram {
    let mut counts = Vec::new();
    let mut zeros: i64 = 0;
    for &n in dense {
        if n == 0 {
            zeros += 1;
            continue;
        }
        if zeros > 0 {
            counts.push(-zeros);
            zeros = 0;
        }
        counts.push(i64::try_from(n).unwrap_or(i64::MAX));
    }
    Histogram { counts }
}

#[derive(Debug)]
struct Bucket {
    index: u64,
    requests: u64,
    failures: u64,
    latency: PagedHistogram,
}

impl Bucket {
    fn new(index: u64) -> Self {
        Self {
            index,
            requests: 0,
            failures: 0,
            latency: PagedHistogram::default(),
        }
    }
}

#[derive(Debug, Default)]
struct VersionSeries {
    buckets: VecDeque<Bucket>,
    /// Node id -> index of the newest bucket it contributed to. A reporter contributed within a
    /// window exactly when its newest contribution is inside it, so this answers "distinct
    /// reporters" without a set per bucket.
    reporters: HashMap<Arc<str>, u64>,
    /// Every request and failure ever merged (never expired): the `/metrics` counters.
    totals: Totals,
}

/// Requests and failures of one version since the canary was first tracked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Requests routed to the version.
    pub requests: u64,
    /// Of those, the ones that failed.
    pub failures: u64,
}

impl VersionSeries {
    /// The bucket for `index`, created if needed; None when `index` is already past retention.
    fn bucket_mut(&mut self, index: u64, retention_buckets: u64) -> Option<&mut Bucket> {
        let newest = self.buckets.back().map(|b| b.index);
        match newest {
            Some(newest) if newest == index => {}
            Some(newest) if newest > index => {
                // Reports handled concurrently can reach the lock slightly out of receipt order.
                if index + retention_buckets <= newest {
                    return None;
                }
                let position = self.buckets.partition_point(|b| b.index < index);
                if self.buckets.get(position).map(|b| b.index) != Some(index) {
                    self.buckets.insert(position, Bucket::new(index));
                }
                return self.buckets.get_mut(position);
            }
            _ => {
                self.buckets.push_back(Bucket::new(index));
                self.expire(index, retention_buckets);
            }
        }
        self.buckets.back_mut()
    }

    /// Drops buckets that no query reaching back `retention_buckets` from `now_index` can see.
    fn expire(&mut self, now_index: u64, retention_buckets: u64) {
        while let Some(front) = self.buckets.front() {
            if front.index + retention_buckets <= now_index {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
        // Runs once per new bucket, not per report, so walking every reporter is affordable.
        self.reporters
            .retain(|_, newest| *newest + retention_buckets > now_index);
    }
}

#[derive(Debug, Default)]
struct CanaryWindows {
    versions: [VersionSeries; 2],
    first_report: Option<Instant>,
    last_report: Option<Instant>,
}

/// One canary's windows behind their own lock.
#[derive(Debug, Default)]
pub(crate) struct CanaryCell {
    state: Mutex<CanaryWindows>,
}

#[derive(Debug)]
struct Tracked {
    cell: Arc<CanaryCell>,
    /// When the canary left the directive; its reports are still accepted for a grace period
    /// (reports sealed under the previous generation are in flight) and its windows readable
    /// until they expire.
    retired_at: Option<Instant>,
}

/// A stats entry that passed validation, bound to its canary.
#[derive(Debug)]
pub(crate) struct ValidEntry<'a> {
    pub(crate) cell: Arc<CanaryCell>,
    pub(crate) version: usize,
    pub(crate) stats: &'a VersionStats,
}

/// Every tracked canary's windows.
#[derive(Debug)]
pub(crate) struct Windows {
    origin: Instant,
    bucket_nanos: u128,
    retention_buckets: u64,
    retention: Duration,
    retired_grace: Duration,
    canaries: RwLock<HashMap<Arc<str>, Tracked>>,
}

impl Windows {
    /// `bucket_width` must be non-zero and `retention` at least one bucket (checked by the config).
    pub(crate) fn new(
        origin: Instant,
        bucket_width: Duration,
        retention: Duration,
        retired_grace: Duration,
    ) -> Self {
        let bucket_nanos = bucket_width.as_nanos().max(1);
        let retention_buckets = u64::try_from(retention.as_nanos().div_ceil(bucket_nanos))
            .unwrap_or(u64::MAX)
            .max(1);
        Self {
            origin,
            bucket_nanos,
            retention_buckets,
            retention,
            retired_grace,
            canaries: RwLock::new(HashMap::new()),
        }
    }

    fn index_of(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since / self.bucket_nanos).unwrap_or(u64::MAX)
    }

    /// Makes exactly `keys` the current canaries: new ones start empty, missing ones are retired.
    pub(crate) fn set_current<'k>(&self, keys: impl IntoIterator<Item = &'k str>, now: Instant) {
        let mut canaries = self.canaries.write().unwrap_or_else(|e| e.into_inner());
        for tracked in canaries.values_mut() {
            tracked.retired_at.get_or_insert(now);
        }
        for key in keys {
            match canaries.get_mut(key) {
                Some(tracked) => tracked.retired_at = None,
                None => {
                    canaries.insert(
                        Arc::from(key),
                        Tracked {
                            cell: Arc::default(),
                            retired_at: None,
                        },
                    );
                }
            }
        }
    }

    /// The canary's cell if reports for it are accepted at `now`.
    pub(crate) fn accepting(&self, key: &str, now: Instant) -> Option<Arc<CanaryCell>> {
        let canaries = self.canaries.read().unwrap_or_else(|e| e.into_inner());
        let tracked = canaries.get(key)?;
        match tracked.retired_at {
            Some(retired) if now.saturating_duration_since(retired) >= self.retired_grace => None,
            _ => Some(tracked.cell.clone()),
        }
    }

    /// Merges validated entries (from one report by `reporter`) into the bucket for `now`.
    pub(crate) fn apply(&self, entries: &[ValidEntry<'_>], reporter: &Arc<str>, now: Instant) {
        let index = self.index_of(now);
        for entry in entries {
            let mut state = lock(&entry.cell.state);
            // An entry without requests says nothing about this canary's traffic: it must not
            // make the canary look covered by a filter (routing mode, metric source).
            if entry.stats.requests > 0 && state.last_report.is_none_or(|last| last < now) {
                state.last_report = Some(now);
            }
            if state.first_report.is_none_or(|first| first > now) {
                state.first_report = Some(now);
            }
            let Some(series) = state.versions.get_mut(entry.version) else {
                continue;
            };
            series.totals.requests = series.totals.requests.saturating_add(entry.stats.requests);
            series.totals.failures = series.totals.failures.saturating_add(entry.stats.failures);
            let Some(bucket) = series.bucket_mut(index, self.retention_buckets) else {
                continue;
            };
            bucket.requests = bucket.requests.saturating_add(entry.stats.requests);
            bucket.failures = bucket.failures.saturating_add(entry.stats.failures);
            if let Some(latency) = &entry.stats.latency {
                bucket.latency.add_wire(latency);
            }
            match series.reporters.get_mut(&**reporter) {
                Some(newest) => *newest = (*newest).max(index),
                None => {
                    series.reporters.insert(reporter.clone(), index);
                }
            }
        }
    }

    /// The last `window` (rounded up to whole buckets, including the current partial one, and
    /// capped at retention) of one version of one canary. None if the canary is not tracked.
    pub(crate) fn window(
        &self,
        key: &str,
        version: Version,
        window: Duration,
        now: Instant,
    ) -> Option<VersionWindow> {
        let cell = {
            let canaries = self.canaries.read().unwrap_or_else(|e| e.into_inner());
            canaries.get(key)?.cell.clone()
        };
        let Some(version) = version_index(version) else {
            return Some(VersionWindow::default());
        };
        let now_index = self.index_of(now);
        let span = u64::try_from(window.as_nanos().div_ceil(self.bucket_nanos))
            .unwrap_or(u64::MAX)
            .clamp(1, self.retention_buckets);
        let first = now_index.saturating_sub(span - 1);

        let mut result = VersionWindow::default();
        let mut dense = vec![0u64; SLOTS];
        {
            let state = lock(&cell.state);
            let series = &state.versions[version];
            for bucket in series
                .buckets
                .iter()
                .filter(|b| (first..=now_index).contains(&b.index))
            {
                result.requests = result.requests.saturating_add(bucket.requests);
                result.failures = result.failures.saturating_add(bucket.failures);
                bucket.latency.add_into(&mut dense);
            }
            result.reporters = series
                .reporters
                .values()
                .filter(|&&newest| (first..=now_index).contains(&newest))
                .count();
        }
        result.latency = LatencyHistogram::decode(&encode_dense(&dense)).unwrap_or_else(|error| {
            // Only reachable if a window holds more than 2^64 samples.
            tracing::error!(canary = key, %error, "merged latency window does not fit a histogram");
            LatencyHistogram::new()
        });
        Some(result)
    }

    /// Everything one version of one canary served since it was first tracked. None if the
    /// canary is not tracked.
    pub(crate) fn totals(&self, key: &str, version: Version) -> Option<Totals> {
        let cell = {
            let canaries = self.canaries.read().unwrap_or_else(|e| e.into_inner());
            canaries.get(key)?.cell.clone()
        };
        let Some(version) = version_index(version) else {
            return Some(Totals::default());
        };
        let totals = lock(&cell.state).versions[version].totals;
        Some(totals)
    }

    /// When the newest report with requests for the canary arrived; None if never (or not
    /// tracked).
    pub(crate) fn last_report(&self, key: &str) -> Option<Instant> {
        let canaries = self.canaries.read().unwrap_or_else(|e| e.into_inner());
        let cell = canaries.get(key)?.cell.clone();
        drop(canaries);
        let last = lock(&cell.state).last_report;
        last
    }

    /// When the first report for the canary arrived; None if never (or not tracked).
    pub(crate) fn first_report(&self, key: &str) -> Option<Instant> {
        let canaries = self.canaries.read().unwrap_or_else(|e| e.into_inner());
        let cell = canaries.get(key)?.cell.clone();
        drop(canaries);
        let first = lock(&cell.state).first_report;
        first
    }

    /// Where bucket time starts: when the ingest was built.
    pub(crate) fn origin(&self) -> Instant {
        self.origin
    }

    /// Drops expired buckets everywhere and forgets retired canaries whose data has expired.
    pub(crate) fn sweep(&self, now: Instant) {
        let now_index = self.index_of(now);
        let keep_retired = self.retention.max(self.retired_grace);
        let cells: Vec<Arc<CanaryCell>> = {
            let mut canaries = self.canaries.write().unwrap_or_else(|e| e.into_inner());
            canaries.retain(|_, tracked| {
                tracked
                    .retired_at
                    .is_none_or(|retired| now.saturating_duration_since(retired) < keep_retired)
            });
            canaries.values().map(|t| t.cell.clone()).collect()
        };
        for cell in cells {
            let mut state = lock(&cell.state);
            for series in &mut state.versions {
                series.expire(now_index, self.retention_buckets);
            }
        }
    }

    /// The buckets of both versions of one canary as they are at `now`, the one `now` falls in
    /// included (still filling), from the one `since` falls in, and from bucket index `from`
    /// on: for the comparative judge, which absorbs what each bucket gained since its last
    /// look. A canary request is slow at a threshold `t` when it took longer than
    /// `latency_ratio × t`, a primary request when it took longer than `t`. None if the canary
    /// is not tracked.
    pub(crate) fn judge_buckets(
        &self,
        key: &str,
        since: Instant,
        from: Option<u64>,
        now: Instant,
        latency_ratio: Option<f64>,
    ) -> Option<Vec<(u64, BucketPair)>> {
        let cell = {
            let canaries = self.canaries.read().unwrap_or_else(|e| e.into_inner());
            canaries.get(key)?.cell.clone()
        };
        let first = from.unwrap_or(0).max(self.index_of(since));
        let last = self.index_of(now);
        let slots = |ratio: f64| -> Vec<usize> {
            LATENCY_THRESHOLDS_US
                .iter()
                .map(|&t| slot_of((t as f64 * ratio).round() as u64))
                .collect()
        };
        let (primary_slots, canary_slots) = match latency_ratio {
            Some(ratio) => (slots(1.0), slots(ratio)),
            None => (Vec::new(), Vec::new()),
        };
        let state = lock(&cell.state);
        let counts = |version: usize, index: u64, slow_slots: &[usize]| -> VersionCounts {
            let series = &state.versions[version];
            let position = series.buckets.partition_point(|b| b.index < index);
            match series.buckets.get(position).filter(|b| b.index == index) {
                Some(b) => VersionCounts {
                    requests: b.requests,
                    failures: b.failures,
                    slow: slow_slots
                        .iter()
                        .map(|&slot| b.latency.count_above(slot))
                        .collect(),
                },
                None => VersionCounts {
                    slow: vec![0; slow_slots.len()],
                    ..VersionCounts::default()
                },
            }
        };
        let mut indexes: Vec<u64> = state
            .versions
            .iter()
            .flat_map(|series| series.buckets.iter().map(|b| b.index))
            .filter(|index| (first..=last).contains(index))
            .collect();
        indexes.sort_unstable();
        indexes.dedup();
        Some(
            indexes
                .into_iter()
                .map(|index| {
                    (
                        index,
                        BucketPair {
                            primary: counts(0, index, &primary_slots),
                            canary: counts(1, index, &canary_slots),
                        },
                    )
                })
                .collect(),
        )
    }

    /// Buckets held across every canary and version, and latency pages they use (for metrics).
    pub(crate) fn footprint(&self) -> (usize, usize) {
        let cells: Vec<Arc<CanaryCell>> = {
            let canaries = self.canaries.read().unwrap_or_else(|e| e.into_inner());
            canaries.values().map(|t| t.cell.clone()).collect()
        };
        let mut buckets = 0;
        let mut pages = 0;
        for cell in cells {
            let state = lock(&cell.state);
            for series in &state.versions {
                buckets += series.buckets.len();
                pages += series
                    .buckets
                    .iter()
                    .map(|b| b.latency.pages_in_use())
                    .sum::<usize>();
            }
        }
        (buckets, pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(samples: &[u64]) -> LatencyHistogram {
        let mut h = LatencyHistogram::new();
        samples.iter().for_each(|&s| h.record(s));
        h
    }

    fn stats(samples: &[u64], failures: u64) -> VersionStats {
        VersionStats {
            canary: "shop/web".into(),
            version: Version::Canary as i32,
            requests: samples.len() as u64,
            failures,
            latency: Some(histogram(samples).encode()),
        }
    }

    fn windows(t0: Instant) -> Windows {
        let w = Windows::new(
            t0,
            Duration::from_secs(1),
            Duration::from_secs(60),
            Duration::from_secs(5),
        );
        w.set_current(["shop/web"], t0);
        w
    }

    fn apply(w: &Windows, stats: &VersionStats, reporter: &str, at: Instant) {
        let cell = w.accepting("shop/web", at).expect("tracked");
        let entry = ValidEntry {
            cell,
            version: 1,
            stats,
        };
        w.apply(&[entry], &Arc::from(reporter), at);
    }

    #[test]
    fn the_judge_reads_the_buckets_as_they_fill_with_slow_counts_per_threshold() {
        let t0 = Instant::now();
        let w = windows(t0);
        let primary = |samples: &[u64], failures: u64| VersionStats {
            version: Version::Primary as i32,
            ..stats(samples, failures)
        };
        let put = |s: &VersionStats, version: usize, at: Instant| {
            let cell = w.accepting("shop/web", at).expect("tracked");
            w.apply(
                &[ValidEntry {
                    cell,
                    version,
                    stats: s,
                }],
                &Arc::from("envoy-1"),
                at,
            );
        };
        // Second 0: canary 3 requests (one of 30 ms, one failed), primary 2 of 1.5 ms.
        put(&stats(&[500, 30_000, 900], 1), 1, t0);
        put(&primary(&[1_500, 1_500], 0), 0, t0);
        // Second 1: primary only; second 2 is still filling.
        put(&primary(&[5_000], 1), 0, t0 + Duration::from_millis(1500));
        put(&stats(&[100], 0), 1, t0 + Duration::from_millis(2100));
        let now = t0 + Duration::from_millis(2200);
        let buckets = w
            .judge_buckets("shop/web", t0, None, now, Some(1.2))
            .expect("tracked");
        let indexes: Vec<u64> = buckets.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, vec![0, 1, 2], "the filling bucket too");
        let first = &buckets[0].1;
        assert_eq!((first.canary.requests, first.canary.failures), (3, 1));
        assert_eq!((first.primary.requests, first.primary.failures), (2, 0));
        // Thresholds 1, 2, 4, 8, 16, 32 ms...: the canary's are 1.2x (1.2, 2.4, ... 38.4 ms).
        assert_eq!(&first.canary.slow[..6], &[1, 1, 1, 1, 1, 0]);
        assert_eq!(&first.primary.slow[..3], &[2, 0, 0]);
        assert_eq!(
            buckets[1].1.canary,
            VersionCounts {
                slow: vec![0; 14],
                ..VersionCounts::default()
            }
        );
        assert_eq!(buckets[2].1.canary.requests, 1);
        // Asked again from bucket 2 while it fills: bucket 2 alone, with what it gained.
        put(&stats(&[100, 100], 1), 1, t0 + Duration::from_millis(2500));
        let again = w
            .judge_buckets(
                "shop/web",
                t0,
                Some(2),
                t0 + Duration::from_millis(2600),
                None,
            )
            .expect("tracked");
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!(again[0].0, 2);
        let (whole, seen) = (&again[0].1, &buckets[2].1);
        assert_eq!(
            (whole.canary.requests, whole.canary.failures),
            (3, 1),
            "every report of the bucket so far"
        );
        let gained = whole.since(seen);
        assert_eq!((gained.canary.requests, gained.canary.failures), (2, 1));
        assert!(whole.canary.slow.is_empty(), "no latency asked for");
        // Nothing arrives after the bucket ended: a look in the next bucket finds bucket 2 as it
        // was, and an empty bucket 3 is not listed.
        let later = w
            .judge_buckets("shop/web", t0, Some(2), t0 + Duration::from_secs(3), None)
            .expect("tracked");
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].1.since(whole), BucketPair::default());
    }

    #[test]
    fn wire_total_agrees_with_merge_wire_on_good_and_hostile_histograms() {
        let cases: Vec<Vec<i64>> = vec![
            vec![],
            histogram(&[1, 5, 5, 300, 70_000, 4_000_000_000])
                .encode()
                .counts,
            vec![0],
            vec![3, 0, 1],
            vec![-(SLOTS as i64), 1],
            vec![-(SLOTS as i64 - 1), 1],
            vec![-(SLOTS as i64 - 1), 1, 1],
            vec![i64::MIN, 1],
            vec![i64::MAX, i64::MAX, i64::MAX],
            vec![i64::MAX, 1],
            vec![-5],
        ];
        for counts in cases {
            let wire = Histogram {
                counts: counts.clone(),
            };
            let mut reference = LatencyHistogram::new();
            let expected = reference.merge_wire(&wire).map(|()| reference.count());
            assert_eq!(wire_total(&wire), expected, "{counts:?}");
        }
    }

    #[test]
    fn wire_total_survives_skips_that_overflow_the_slot_index() {
        // merge_wire computes `slot + 1` here, which overflows; the validator must not.
        let wire = Histogram {
            counts: vec![i64::MIN, i64::MIN, i64::MIN, 1],
        };
        assert!(matches!(
            wire_total(&wire),
            Err(DecodeError::TooManySlots { .. })
        ));
    }

    #[test]
    fn paged_merge_equals_dense_merge() {
        let a = histogram(&[1, 2, 3, 130, 129, 5_000, 5_000, 99_999, u64::MAX]);
        let b = histogram(&[7, 5_000, 1_234_567]);
        let mut paged = PagedHistogram::default();
        paged.add_wire(&a.encode());
        paged.add_wire(&b.encode());
        let mut dense = vec![0; SLOTS];
        paged.add_into(&mut dense);
        let mut expected = a.clone();
        expected.merge(&b);
        assert_eq!(
            LatencyHistogram::decode(&encode_dense(&dense)).unwrap(),
            expected
        );
        assert!(
            paged.pages_in_use() < PAGES / 2,
            "pages: {}",
            paged.pages_in_use()
        );
    }

    #[test]
    fn a_window_sums_only_the_buckets_inside_it() {
        let t0 = Instant::now();
        let w = windows(t0);
        let s = Duration::from_secs;
        apply(&w, &stats(&[1_000, 2_000], 1), "a", t0);
        apply(&w, &stats(&[3_000], 0), "b", t0 + s(10));
        apply(&w, &stats(&[4_000, 4_000, 4_000], 3), "a", t0 + s(20));

        let last_15 = w
            .window("shop/web", Version::Canary, s(15), t0 + s(20))
            .unwrap();
        assert_eq!(
            (last_15.requests, last_15.failures, last_15.reporters),
            (4, 3, 2)
        );
        assert_eq!(last_15.latency, histogram(&[3_000, 4_000, 4_000, 4_000]));

        let all = w
            .window("shop/web", Version::Canary, s(60), t0 + s(20))
            .unwrap();
        assert_eq!((all.requests, all.failures, all.reporters), (6, 4, 2));
        assert_eq!(all.success_rate_percent(), Some(200.0 / 6.0));

        let primary = w
            .window("shop/web", Version::Primary, s(60), t0 + s(20))
            .unwrap();
        assert_eq!(primary, VersionWindow::default());
        assert_eq!(w.window("shop/other", Version::Canary, s(60), t0), None);
        assert_eq!(w.last_report("shop/web"), Some(t0 + s(20)));
        assert_eq!(w.first_report("shop/web"), Some(t0));
    }

    #[test]
    fn an_entry_without_requests_does_not_count_as_a_report_for_the_canary() {
        let t0 = Instant::now();
        let w = windows(t0);
        let s = Duration::from_secs;
        apply(&w, &stats(&[], 0), "a", t0 + s(1));
        assert_eq!(w.last_report("shop/web"), None);
        apply(&w, &stats(&[1_000], 0), "a", t0 + s(2));
        apply(&w, &stats(&[], 0), "a", t0 + s(3));
        assert_eq!(w.last_report("shop/web"), Some(t0 + s(2)));
    }

    #[test]
    fn buckets_expire_after_retention_and_memory_is_released() {
        let t0 = Instant::now();
        let w = windows(t0);
        let s = Duration::from_secs;
        for second in 0..60 {
            apply(&w, &stats(&[1_000], 0), "a", t0 + s(second));
        }
        assert_eq!(w.footprint().0, 60);
        // The next bucket pushes the oldest one out on the write path already.
        apply(&w, &stats(&[1_000], 0), "b", t0 + s(60));
        assert_eq!(w.footprint().0, 60);
        let window = w
            .window("shop/web", Version::Canary, s(600), t0 + s(60))
            .unwrap();
        assert_eq!((window.requests, window.reporters), (60, 2));

        // Idle time: queries no longer see old data, and a sweep frees it.
        let later = t0 + s(60 + 30);
        let window = w.window("shop/web", Version::Canary, s(60), later).unwrap();
        assert_eq!((window.requests, window.reporters), (30, 2));
        w.sweep(later);
        assert_eq!(w.footprint().0, 30);
        w.sweep(t0 + s(600));
        assert_eq!(w.footprint(), (0, 0));
        let window = w
            .window("shop/web", Version::Canary, s(60), t0 + s(600))
            .unwrap();
        assert_eq!(window, VersionWindow::default());
    }

    #[test]
    fn retired_canaries_accept_reports_for_a_grace_period_then_disappear() {
        let t0 = Instant::now();
        let w = windows(t0);
        let s = Duration::from_secs;
        apply(&w, &stats(&[1_000], 0), "a", t0);
        w.set_current([], t0 + s(1));
        assert!(w.accepting("shop/web", t0 + s(5)).is_some());
        assert!(w.accepting("shop/web", t0 + s(6)).is_none());
        assert_eq!(
            w.window("shop/web", Version::Canary, s(60), t0 + s(6))
                .unwrap()
                .requests,
            1
        );
        w.set_current(["shop/web"], t0 + s(7));
        assert!(w.accepting("shop/web", t0 + s(100)).is_some());
        w.set_current([], t0 + s(8));
        w.sweep(t0 + s(8 + 60));
        assert_eq!(
            w.window("shop/web", Version::Canary, s(60), t0 + s(70)),
            None
        );
    }

    #[test]
    fn a_late_report_lands_in_its_own_bucket() {
        let t0 = Instant::now();
        let w = windows(t0);
        let s = Duration::from_secs;
        apply(&w, &stats(&[1_000], 0), "a", t0 + s(10));
        apply(&w, &stats(&[1_000], 0), "a", t0 + s(5));
        apply(&w, &stats(&[1_000], 0), "a", t0 + s(5));
        assert_eq!(w.footprint().0, 2);
        let window = w
            .window("shop/web", Version::Canary, s(5), t0 + s(10))
            .unwrap();
        assert_eq!(window.requests, 1);
        let window = w
            .window("shop/web", Version::Canary, s(6), t0 + s(10))
            .unwrap();
        assert_eq!(window.requests, 3);
    }
}
