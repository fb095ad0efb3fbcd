//! One worker's state: the routing table it applies, the fail-safe, and the per-version recording
//! that it hands to the singleton reporter on every tick.

use std::rc::Rc;

use prost::Message;
use weir_proto::v1;
use weir_proto::LatencyHistogram;

use crate::config::FilterConfig;
use crate::routing::{RequestHeaders, Rng, RoutingTable, Version};

/// What the filter does with one request's headers. Borrows from the worker: deciding a
/// request allocates nothing but the ticket's reference count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestPlan<'a> {
    /// No canary covers the host: the request passes untouched. A routing header a client sent
    /// stays, and routes nowhere: the routes that send a request to a canary match only that
    /// canary's secret value (see the controller's `traffic::route_secret`), which only the
    /// filters know.
    PassThrough,
    /// Set (replacing any client-sent value) the routing header, and record the outcome.
    Route {
        /// The routing header.
        header: &'a str,
        /// Its value for the chosen version.
        value: &'a str,
        /// What to record the outcome under.
        ticket: Ticket,
        /// A session cookie for the response (`Set-Cookie` value), to give or to clear.
        set_cookie: Option<Rc<str>>,
    },
}

/// Identifies where a routed request's outcome is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The canary key.
    pub canary: Rc<str>,
    /// The version chosen.
    pub version: Version,
}

#[derive(Debug, Default)]
struct Counts {
    requests: u64,
    failures: u64,
    latency: LatencyHistogram,
}

#[derive(Debug)]
struct Entry {
    canary: Rc<str>,
    versions: [Counts; 2],
}

/// Per-worker recording since the last hand-over.
#[derive(Debug, Default)]
pub struct Recorder {
    entries: Vec<Entry>,
}

impl Recorder {
    /// Records one finished request.
    pub fn record(&mut self, ticket: &Ticket, failed: bool, latency_micros: u64) {
        let position = self
            .entries
            .iter()
            .position(|e| Rc::ptr_eq(&e.canary, &ticket.canary) || e.canary == ticket.canary);
        let entry = match position {
            Some(i) => self.entries.get_mut(i),
            None => {
                self.entries.push(Entry {
                    canary: ticket.canary.clone(),
                    versions: Default::default(),
                });
                self.entries.last_mut()
            }
        };
        if let Some(counts) = entry.and_then(|e| e.versions.get_mut(ticket.version.index())) {
            counts.requests += 1;
            counts.failures += u64::from(failed);
            counts.latency.record(latency_micros);
        }
    }

    /// Takes everything recorded as wire stats, leaving the recorder empty (allocations kept).
    pub fn drain(&mut self) -> Vec<v1::VersionStats> {
        let mut stats = Vec::new();
        for entry in &mut self.entries {
            for (counts, version) in entry
                .versions
                .iter_mut()
                .zip([Version::Primary, Version::Canary])
            {
                if counts.requests == 0 {
                    continue;
                }
                stats.push(v1::VersionStats {
                    canary: entry.canary.to_string(),
                    version: version.to_wire() as i32,
                    requests: counts.requests,
                    failures: counts.failures,
                    latency: Some(counts.latency.encode()),
                });
                counts.requests = 0;
                counts.failures = 0;
                counts.latency.clear();
            }
        }
        stats
    }

    /// Forgets canaries no longer routed, so a long-lived worker's memory stays bounded.
    pub fn retain(&mut self, table: &RoutingTable) {
        self.entries.retain(|e| {
            table.routes().iter().any(|r| r.key == e.canary)
                || e.versions.iter().any(|c| c.requests > 0)
        });
    }
}

/// One worker (one Wasm VM on one Envoy thread).
#[derive(Debug)]
pub struct Worker {
    config: FilterConfig,
    id: u64,
    batches: u64,
    table: RoutingTable,
    directive_cas: Option<u32>,
    fail_safe: bool,
    rng: Rng,
    recorder: Recorder,
}

impl Worker {
    /// A worker with no directive yet; `id` is random per VM, `seed` seeds its splits.
    pub fn new(config: FilterConfig, id: u64, seed: u64) -> Self {
        Self {
            config,
            id,
            batches: 0,
            table: RoutingTable::default(),
            directive_cas: None,
            fail_safe: true,
            rng: Rng::new(seed),
            recorder: Recorder::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &FilterConfig {
        &self.config
    }

    /// Version stamp of the directive applied last (the shared-data CAS), to skip re-decoding.
    pub fn directive_cas(&self) -> Option<u32> {
        self.directive_cas
    }

    /// The generation of the directive applied.
    pub fn generation(&self) -> u64 {
        self.table.generation
    }

    /// True when every canary is routed to primary because the controller has gone silent.
    pub fn fail_safe(&self) -> bool {
        self.fail_safe
    }

    /// Applies a directive shared by the reporter. Returns problems worth a log line (canaries that
    /// could not be compiled). On a decode error the previous table stays.
    pub fn apply_directive(
        &mut self,
        bytes: &[u8],
        cas: Option<u32>,
    ) -> Result<Vec<String>, String> {
        let directive = v1::Directive::decode(bytes)
            .map_err(|e| format!("weir: shared directive does not decode: {e}"))?;
        let (table, problems) = RoutingTable::compile(&directive);
        self.table = table;
        self.directive_cas = cas;
        self.recorder.retain(&self.table);
        Ok(problems)
    }

    /// Updates the fail-safe from the time of the controller's last message. Returns true when the
    /// fail-safe state changed (worth a log line).
    pub fn observe_contact(&mut self, last_contact_ns: Option<u64>, now_ns: u64) -> bool {
        let grace = self.config.directive_grace_period.as_nanos() as u64;
        let fail_safe = match last_contact_ns {
            None => true,
            Some(t) => now_ns.saturating_sub(t) > grace,
        };
        let changed = fail_safe != self.fail_safe;
        self.fail_safe = fail_safe;
        changed
    }

    /// True when no canary is routed: then no request needs its authority read.
    pub fn routes_nothing(&self) -> bool {
        self.table.routes().is_empty()
    }

    /// Decides what to do with a request for `authority`.
    pub fn plan(
        &mut self,
        authority: Option<&str>,
        headers: &impl RequestHeaders,
    ) -> RequestPlan<'_> {
        let Some(route) = authority.and_then(|a| self.table.find(a)) else {
            return RequestPlan::PassThrough;
        };
        let decision = route.decide_request(headers, &mut self.rng, self.fail_safe);
        let version = decision.version;
        let header = if route.routing_header.is_empty() {
            &self.config.routing_header
        } else {
            &route.routing_header
        };
        RequestPlan::Route {
            header,
            value: route.value_for(version),
            ticket: Ticket {
                canary: route.key.clone(),
                version,
            },
            set_cookie: decision.set_cookie,
        }
    }

    /// Records a finished request; returns whether it counted as a failure.
    pub fn record(
        &mut self,
        ticket: &Ticket,
        status: u16,
        grpc_status: Option<u32>,
        duration_ns: u64,
    ) -> bool {
        let failed = self.config.failure.is_failure(status, grpc_status);
        self.recorder.record(ticket, failed, duration_ns / 1_000);
        failed
    }

    /// Seals what was recorded since the last batch into a hand-over for the reporter. The batch
    /// reuses the wire `Report`: `epoch` carries the worker id, `sequence` counts batches.
    pub fn seal_batch(&mut self) -> v1::Report {
        self.batches += 1;
        v1::Report {
            reporter: None,
            epoch: self.id,
            sequence: self.batches,
            applied_generation: self.table.generation,
            stats: self.recorder.drain(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoHeaders;
    impl RequestHeaders for NoHeaders {
        fn header(&self, _: &str) -> Option<String> {
            None
        }
    }

    fn directive(generation: u64, weight: u32) -> Vec<u8> {
        v1::Directive {
            generation,
            canaries: vec![v1::CanaryRoute {
                key: "app/mhs".into(),
                hosts: vec!["mhs".into()],
                canary_weight_bp: weight,
                ..Default::default()
            }],
        }
        .encode_to_vec()
    }

    fn worker() -> Worker {
        Worker::new(FilterConfig::default(), 9, 1)
    }

    #[test]
    fn uncovered_hosts_pass_untouched() {
        let mut w = worker();
        assert!(w.routes_nothing());
        assert_eq!(w.plan(Some("other"), &NoHeaders), RequestPlan::PassThrough);
        assert_eq!(w.plan(None, &NoHeaders), RequestPlan::PassThrough);
        w.apply_directive(&directive(3, 10_000), Some(1)).unwrap();
        assert!(!w.routes_nothing());
        assert_eq!(w.plan(Some("other"), &NoHeaders), RequestPlan::PassThrough);
    }

    #[test]
    fn covered_hosts_get_the_routing_header_for_the_chosen_version() {
        let mut w = worker();
        w.apply_directive(&directive(3, 10_000), Some(1)).unwrap();
        w.observe_contact(Some(1_000), 2_000);
        match w.plan(Some("mhs:80"), &NoHeaders) {
            RequestPlan::Route {
                header,
                value,
                ticket,
                set_cookie,
            } => {
                assert_eq!((header, value), ("x-weir-route", "canary"));
                assert_eq!(set_cookie, None);
                assert_eq!(ticket.version, Version::Canary);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(w.generation(), 3);
        assert_eq!(w.directive_cas(), Some(1));
    }

    #[test]
    fn silence_longer_than_the_grace_period_routes_everything_to_primary() {
        let mut w = worker();
        w.apply_directive(&directive(1, 10_000), None).unwrap();
        let grace = w.config().directive_grace_period.as_nanos() as u64;
        assert!(w.observe_contact(Some(0), 1));
        assert!(!w.fail_safe());
        assert!(w.observe_contact(Some(0), grace + 1));
        assert!(w.fail_safe());
        match w.plan(Some("mhs"), &NoHeaders) {
            RequestPlan::Route { value, ticket, .. } => {
                assert_eq!(value, "primary");
                assert_eq!(ticket.version, Version::Primary);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn batches_carry_exact_counts_and_then_start_empty() {
        let mut w = worker();
        w.apply_directive(&directive(4, 5_000), None).unwrap();
        let canary = Ticket {
            canary: Rc::from("app/mhs"),
            version: Version::Canary,
        };
        let primary = Ticket {
            canary: Rc::from("app/mhs"),
            version: Version::Primary,
        };
        assert!(w.record(&canary, 500, None, 2_000_000));
        assert!(!w.record(&canary, 200, None, 3_000_000));
        assert!(!w.record(&primary, 200, None, 1_000_000));
        let batch = w.seal_batch();
        assert_eq!(
            (batch.epoch, batch.sequence, batch.applied_generation),
            (9, 1, 4)
        );
        assert_eq!(batch.stats.len(), 2);
        let c = batch
            .stats
            .iter()
            .find(|s| s.version == v1::Version::Canary as i32)
            .unwrap();
        assert_eq!((c.requests, c.failures), (2, 1));
        let latency = LatencyHistogram::decode(c.latency.as_ref().unwrap()).unwrap();
        assert_eq!(latency.count(), 2);
        assert!((latency.quantile(1.0).unwrap() - 3_000.0).abs() < 3_000.0 / 128.0);
        let next = w.seal_batch();
        assert_eq!(next.sequence, 2);
        assert!(next.stats.is_empty());
    }

    #[test]
    fn a_bad_shared_directive_keeps_the_previous_table() {
        let mut w = worker();
        w.apply_directive(&directive(2, 100), None).unwrap();
        assert!(w.apply_directive(&[0xff, 0xff, 0xff], None).is_err());
        assert_eq!(w.generation(), 2);
    }
}
