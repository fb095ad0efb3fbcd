//! Traffic control: how the engine's routes reach the data plane. Weir's way is a directive to
//! every filter (pushed by the ingest on the same stream the reports come up); the plan decides the
//! hosts, the split mode and the routing header.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use weir_proto::v1::{self, canary_route::Mode, header_rule};

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
        // Session affinity, when set, rides on the weighted split: see `directive_entry`.
        _ => Mode::Weighted(v1::Weighted {}),
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

/// The directive entry for one canary routed as `route`, with its session cookies (which
/// depend on the revision under analysis: each run has cookies of its own).
pub fn directive_entry(plan: &CanaryPlan, route: Route, revision: &str) -> v1::CanaryRoute {
    let mut entry = canary_route(plan, route);
    entry.session_affinity = session_cookies(plan, route, revision).map(|s| s.to_wire());
    entry
}

/// One session cookie: its name, a value only the controller and the filters know, and its
/// lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    /// The cookie's name, from the spec.
    pub name: String,
    /// Its value: hex, derived from the canary's secret routing value.
    pub value: String,
    /// Its `Max-Age`, in seconds.
    pub max_age_seconds: u32,
}

impl Cookie {
    /// The `Set-Cookie` value that gives the cookie, as Flagger writes it.
    pub fn set_cookie(&self) -> String {
        format!(
            "{}={}; Max-Age={}",
            self.name, self.value, self.max_age_seconds
        )
    }

    /// The `Set-Cookie` value that clears it.
    pub fn clear_cookie(&self) -> String {
        format!("{}={}; Max-Age=-1", self.name, self.value)
    }
}

/// Flagger's session affinity for one route: the cookies, and whether they are given and
/// honoured (`active`, while traffic shifts) or cleared (the rollout is over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCookies {
    /// Given and honoured (true) or cleared (false).
    pub active: bool,
    /// The canary's cookie (`cookieName`), one value per run.
    pub canary: Cookie,
    /// The primary's (`primaryCookieName`), one value per step and valid for one analysis
    /// interval, as in Flagger (a primary client is split again at the next step).
    pub primary: Option<Cookie>,
}

impl SessionCookies {
    /// As the directive carries them.
    pub fn to_wire(&self) -> v1::SessionAffinity {
        let primary = self.primary.clone().unwrap_or(Cookie {
            name: String::new(),
            value: String::new(),
            max_age_seconds: 0,
        });
        v1::SessionAffinity {
            active: self.active,
            cookie_name: self.canary.name.clone(),
            cookie_value: self.canary.value.clone(),
            max_age_seconds: self.canary.max_age_seconds,
            primary_cookie_name: primary.name,
            primary_cookie_value: primary.value,
            primary_max_age_seconds: primary.max_age_seconds,
        }
    }
}

/// The session cookies of `plan` routed as `route` while `revision` is (or was last) analysed;
/// None without `sessionAffinity` or for an A/B route. Active while the canary has a weight (as
/// Flagger: `canaryWeight != 0`); once the route is back on the primary, the cookies of the
/// last run are cleared.
pub fn session_cookies(plan: &CanaryPlan, route: Route, revision: &str) -> Option<SessionCookies> {
    let affinity = plan.analysis.session_affinity.as_ref()?;
    let active = match route {
        Route::Weighted(w) => w.basis_points() > 0,
        Route::Primary => false,
        Route::Matches => return None,
    };
    let seconds = |d: std::time::Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1);
    let secret = |what: &str| {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            format!("weir-session:{}:{revision}:{what}", plan.canary_route_value).as_bytes(),
        );
        digest.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    Some(SessionCookies {
        active,
        canary: Cookie {
            name: affinity.cookie_name.clone(),
            value: secret("canary"),
            max_age_seconds: seconds(affinity.max_age),
        },
        primary: affinity.primary_cookie_name.as_ref().map(|name| Cookie {
            name: name.clone(),
            value: secret(&format!("primary:{}", route.canary_weight_bp())),
            max_age_seconds: seconds(plan.analysis.interval),
        }),
    })
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
