//! Istio routing objects: a DestinationRule per routed Service and the VirtualService.
//!
//! Weir's VirtualService does not carry the weight: the filter decides per request and sets the
//! routing header, and the VirtualService sends a request carrying the canary value to the
//! canary Service and every other request to the primary. When no filter reports for the canary
//! (no EnvoyFilter installed, or its stream is down), [`RoutingMode::Weights`] writes Flagger's
//! routes instead: the weight (or the A/B match) in the VirtualService itself.

use serde_json::{json, Value};

use crate::analysis::Route;
use crate::spec::{CanaryPlan, StringMatcher};

use super::services;

/// API version of the VirtualService and DestinationRule Weir writes (served by every Istio
/// release Flagger supports; `v1` needs Istio 1.22 or later).
pub const ISTIO_API_VERSION: &str = "networking.istio.io/v1beta1";

/// Where the split happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingMode {
    /// The filters split by the directive's weight and set the routing header; the
    /// VirtualService routes by that header. Clients cannot choose: the filter strips the header.
    Filters,
    /// No filter reports for the canary: the VirtualService carries the weights (Flagger's way).
    Weights,
}

/// The DestinationRule for one routed Service (Flagger creates one per primary and canary
/// Service), with `spec.service.trafficPolicy` as written.
pub fn destination_rule(plan: &CanaryPlan, service: &str, owner: &Value) -> Value {
    let mut spec = json!({"host": service});
    if let Some(policy) = &plan.service.traffic_policy {
        spec["trafficPolicy"] = policy.clone();
    }
    json!({
        "apiVersion": ISTIO_API_VERSION,
        "kind": "DestinationRule",
        "metadata": {
            "name": service,
            "namespace": plan.namespace,
            "labels": {"app.kubernetes.io/managed-by": "weir"},
            "ownerReferences": [owner],
        },
        "spec": spec,
    })
}

fn destination(plan: &CanaryPlan, host: String, weight: Option<u8>) -> Value {
    let mut d = json!({"destination": {"host": host, "port": {"number": plan.service.port}}});
    if let Some(w) = weight {
        d["weight"] = json!(w);
    }
    d
}

fn header_match(rule: &crate::spec::HeaderRule) -> (String, Value) {
    let value = match &rule.value {
        StringMatcher::Exact(v) => json!({"exact": v}),
        StringMatcher::Prefix(v) => json!({"prefix": v}),
        StringMatcher::Regex(v) => json!({"regex": v}),
    };
    (rule.name.clone(), value)
}

/// The VirtualService for `plan`, routing as `route` says in `mode`. Hosts are the apex Service
/// and `spec.service.hosts`; gateways are `spec.service.gateways` (none: the mesh).
pub fn virtual_service(
    plan: &CanaryPlan,
    route: Route,
    mode: RoutingMode,
    routing_header: &str,
    canary_value: &str,
    owner: &Value,
) -> Value {
    let primary = services::primary_name(plan);
    let canary = services::canary_name(plan);
    let http = match mode {
        RoutingMode::Filters => json!([
            {
                "name": "weir-canary",
                "match": [{"headers": {routing_header: {"exact": canary_value}}}],
                "route": [destination(plan, canary, None)],
            },
            {"name": "weir-primary", "route": [destination(plan, primary, None)]},
        ]),
        RoutingMode::Weights => match (route, &plan.analysis.strategy) {
            (Route::Matches, crate::spec::Strategy::AbTesting { matches, .. }) => {
                let any_of: Vec<Value> = matches
                    .iter()
                    .map(|group| {
                        let headers: serde_json::Map<String, Value> =
                            group.headers.iter().map(header_match).collect();
                        json!({"headers": headers})
                    })
                    .collect();
                json!([
                    {"name": "weir-canary", "match": any_of, "route": [destination(plan, canary, None)]},
                    {"name": "weir-primary", "route": [destination(plan, primary, None)]},
                ])
            }
            _ => {
                let w = match route {
                    Route::Weighted(w) => w.percent(),
                    Route::Primary | Route::Matches => 0,
                };
                json!([{
                    "name": "weir-weighted",
                    "route": [
                        destination(plan, primary, Some(100 - w)),
                        destination(plan, canary, Some(w)),
                    ],
                }])
            }
        },
    };
    let mut spec = json!({"http": http});
    if plan.service.delegation {
        // A delegate: the root VirtualService that names it has the hosts and gateways, and
        // Istio ignores a delegate that has its own. `spec.service.hosts` still tell the
        // filters which authorities are the canary's.
        spec["hosts"] = json!([]);
        spec["gateways"] = json!([]);
    } else {
        let mut hosts = vec![plan.service.name.clone()];
        for host in &plan.service.hosts {
            if !hosts.contains(host) {
                hosts.push(host.clone());
            }
        }
        spec["hosts"] = json!(hosts);
        if !plan.service.gateways.is_empty() {
            spec["gateways"] = json!(plan.service.gateways);
        }
    }
    // Flagger gives the VirtualService the apex metadata.
    let mut labels = plan.service.apex.labels.clone();
    labels.insert("app.kubernetes.io/managed-by".to_owned(), "weir".to_owned());
    let mut metadata = json!({
        "name": plan.service.name,
        "namespace": plan.namespace,
        "labels": labels,
        "ownerReferences": [owner],
    });
    let annotations: serde_json::Map<String, Value> = plan
        .service
        .apex
        .annotations
        .iter()
        .filter(|(k, _)| !k.contains("toolkit.fluxcd.io"))
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    if !annotations.is_empty() {
        metadata["annotations"] = Value::Object(annotations);
    }
    json!({
        "apiVersion": ISTIO_API_VERSION,
        "kind": "VirtualService",
        "metadata": metadata,
        "spec": spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{self, Weight};

    fn plan(file: &str) -> CanaryPlan {
        spec::load_yaml(file).unwrap().plan
    }

    #[test]
    fn with_filters_the_virtual_service_routes_by_the_routing_header_only() {
        let p = plan(include_str!("../../spec/testdata/flagger-istio-mhs.yaml"));
        let vs = virtual_service(
            &p,
            Route::Weighted(Weight::try_new(30).unwrap()),
            RoutingMode::Filters,
            "x-weir-route",
            "canary",
            &json!({}),
        );
        let http = &vs["spec"]["http"];
        assert_eq!(
            http[0]["match"][0]["headers"]["x-weir-route"]["exact"],
            "canary"
        );
        assert_eq!(http[0]["route"][0]["destination"]["host"], "mhs-canary");
        assert_eq!(http[1]["route"][0]["destination"]["host"], "mhs-primary");
        assert!(http[1]["route"][0].get("weight").is_none());
        assert!(!vs.to_string().contains("\"weight\""));
        assert_eq!(vs["spec"]["hosts"], json!(["mhs", "mhs.example.com"]));
    }

    #[test]
    fn without_filters_the_virtual_service_carries_flaggers_weights() {
        let p = plan(include_str!("../../spec/testdata/flagger-istio-mhs.yaml"));
        let vs = virtual_service(
            &p,
            Route::Weighted(Weight::try_new(30).unwrap()),
            RoutingMode::Weights,
            "x-weir-route",
            "canary",
            &json!({}),
        );
        let route = &vs["spec"]["http"][0]["route"];
        assert_eq!(route[0]["destination"]["host"], "mhs-primary");
        assert_eq!(route[0]["weight"], 70);
        assert_eq!(route[1]["destination"]["host"], "mhs-canary");
        assert_eq!(route[1]["weight"], 30);
        // Without a filter nothing strips a client's routing header: no route may honour it.
        assert!(!vs.to_string().contains("x-weir-route"));
    }

    #[test]
    fn without_filters_an_ab_test_matches_headers_in_the_virtual_service() {
        let p = plan(include_str!("../../spec/testdata/weir-ab-testing.yaml"));
        let vs = virtual_service(
            &p,
            Route::Matches,
            RoutingMode::Weights,
            "x-weir-route",
            "canary",
            &json!({}),
        );
        let canary = &vs["spec"]["http"][0];
        assert_eq!(
            canary["match"][0]["headers"]["x-canary"]["exact"],
            "insider"
        );
        assert_eq!(
            canary["match"][1]["headers"]["cookie"]["regex"],
            "^(.*?;)?(canary=always)(;.*)?$"
        );
        assert_eq!(canary["route"][0]["destination"]["host"], "shop-canary");
    }
}
