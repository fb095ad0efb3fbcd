//! Traffic control: how the engine's routes reach the data plane. Weir's way is a directive to
//! every filter (pushed by the ingest on the same stream the reports come up); the plan decides the
//! hosts, the split mode and the routing header.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use weir_proto::v1::{self, canary_route::Mode, header_rule, sticky};

use crate::analysis::Route;
use crate::ingest::{Ingest, PublishError};
use crate::spec::{CanaryPlan, Strategy, StringMatcher};

/// The authorities a canary covers: the service name in its short and cluster-qualified forms
/// (how mesh clients address it), plus `spec.service.hosts` (gateways' public names).
pub fn hosts(plan: &CanaryPlan) -> Vec<String> {
    let service = &plan.service.name;
    let namespace = &plan.namespace;
    let mut hosts = vec![
        service.clone(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    for host in &plan.service.hosts {
        if host != "*" && !hosts.contains(host) {
            hosts.push(host.clone());
        }
    }
    hosts
}

/// The directive entry for one canary routed as `route`.
pub fn canary_route(plan: &CanaryPlan, route: Route) -> v1::CanaryRoute {
    let mode = match (route, &plan.analysis.strategy) {
        (Route::Matches, Strategy::AbTesting { matches, .. }) => {
            Mode::HeaderMatch(v1::HeaderMatch {
                any_of: matches
                    .iter()
                    .map(|group| v1::MatchGroup {
                        all_of: group
                            .headers
                            .iter()
                            .map(|rule| v1::HeaderRule {
                                name: rule.name.clone(),
                                value: Some(match &rule.value {
                                    StringMatcher::Exact(v) => header_rule::Value::Exact(v.clone()),
                                    StringMatcher::Prefix(v) => {
                                        header_rule::Value::Prefix(v.clone())
                                    }
                                    StringMatcher::Regex(v) => header_rule::Value::Regex(v.clone()),
                                }),
                            })
                            .collect(),
                    })
                    .collect(),
            })
        }
        // With session affinity, users carrying the cookie keep their version as the weight grows.
        _ => match &plan.analysis.session_affinity {
            Some(affinity) => Mode::Sticky(v1::Sticky {
                key: Some(sticky::Key::Cookie(affinity.cookie_name.clone())),
            }),
            None => Mode::Weighted(v1::Weighted {}),
        },
    };
    v1::CanaryRoute {
        key: plan.key(),
        hosts: hosts(plan),
        canary_weight_bp: route.canary_weight_bp(),
        mode: Some(mode),
        canary_value: plan.canary_route_value.clone(),
        ..Default::default()
    }
}

/// A canary's secret routing-header value, derived from something only the API (or the state
/// folder) knows: the Canary's uid in Kubernetes, a random key in local mode. The routes send a
/// request to the canary only with this value, and the filters set it; a client that sends the
/// header itself does not know it, so whatever it sends takes the primary. (A filter strips or
/// overwrites the header for every host it covers anyway; the secret is what protects a
/// canary from clients without the filter.)
pub fn route_secret(seed: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, &[b"weir-route:", seed].concat());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("canary-{}", &hex[..32])
}

/// Every canary's current route, published as one complete directive on each change.
#[derive(Clone)]
pub struct Directives {
    ingest: Ingest,
    routes: Arc<Mutex<BTreeMap<String, v1::CanaryRoute>>>,
}

impl Directives {
    /// Directives published through `ingest`.
    pub fn new(ingest: Ingest) -> Self {
        Self {
            ingest,
            routes: Arc::default(),
        }
    }

    /// Sets (or, with `None`, removes) one canary's route and publishes; returns the generation.
    pub fn set(&self, key: &str, route: Option<v1::CanaryRoute>) -> Result<u64, PublishError> {
        let routes = {
            let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            match route {
                Some(route) => routes.insert(key.to_owned(), route),
                None => routes.remove(key),
            };
            routes.values().cloned().collect()
        };
        self.ingest.publish(routes)
    }

    /// The ingest behind these directives.
    pub fn ingest(&self) -> &Ingest {
        &self.ingest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{self, Weight};

    #[test]
    fn routes_become_directive_entries_for_the_canarys_hosts() {
        use weir_proto::v1 as wire;
        let plan = spec::load_yaml(include_str!("spec/testdata/flagger-istio-mhs.yaml"))
            .unwrap()
            .plan;
        let entry = canary_route(&plan, Route::Weighted(Weight::try_new(30).unwrap()));
        assert_eq!(entry.key, "application/mhs");
        assert_eq!(
            entry.hosts.last().map(String::as_str),
            Some("mhs.example.com")
        );
        assert!(entry
            .hosts
            .contains(&"mhs.application.svc.cluster.local".to_owned()));
        assert_eq!(entry.canary_weight_bp, 3000);
        assert_eq!(
            entry.mode,
            Some(wire::canary_route::Mode::Weighted(wire::Weighted {}))
        );
        assert_eq!(canary_route(&plan, Route::Primary).canary_weight_bp, 0);

        let ab = spec::load_yaml(include_str!("spec/testdata/weir-ab-testing.yaml"))
            .unwrap()
            .plan;
        let entry = canary_route(&ab, Route::Matches);
        assert!(entry.hosts.contains(&"shop".to_owned()));
        let Some(wire::canary_route::Mode::HeaderMatch(m)) = entry.mode else {
            panic!("expected a header match, got {:?}", entry.mode)
        };
        assert_eq!(
            m.any_of[0].all_of,
            vec![wire::HeaderRule {
                name: "x-canary".into(),
                value: Some(wire::header_rule::Value::Exact("insider".into()))
            }]
        );
        assert_eq!(
            m.any_of[1].all_of[0].value,
            Some(wire::header_rule::Value::Regex(
                "^(.*?;)?(canary=always)(;.*)?$".into()
            ))
        );
    }
}
