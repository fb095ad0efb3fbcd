//! Istio routing objects: a DestinationRule per routed Service and the VirtualService.
//!
//! Weir's VirtualService does not carry the weight: the filter decides per request and sets the
//! routing header, and the VirtualService sends a request carrying the canary value to the
//! canary Service and every other request to the primary. When no filter reports for the canary
//! (no EnvoyFilter installed, or its stream is down), [`RoutingMode::Weights`] writes Flagger's
//! routes instead: the weight (or the A/B match) in the VirtualService itself.

use serde_json::{json, Value};

use crate::analysis::Route;
use crate::spec::{CanaryPlan, RouteMatch, RouteOptions, StringMatcher};
use crate::traffic::{Cookie, SessionCookies};

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

/// A destination whose responses set `cookie` (Flagger's session affinity).
fn setting_cookie(mut destination: Value, cookie: Option<&Cookie>) -> Value {
    if let Some(cookie) = cookie {
        destination["headers"] = json!({"response": {"add": {"Set-Cookie": cookie.set_cookie()}}});
    }
    destination
}

fn string_match(m: &StringMatcher) -> Value {
    match m {
        StringMatcher::Exact(v) => json!({"exact": v}),
        StringMatcher::Prefix(v) => json!({"prefix": v}),
        StringMatcher::Regex(v) => json!({"regex": v}),
    }
}

fn header_match(rule: &crate::spec::HeaderRule) -> (String, Value) {
    (rule.name.clone(), string_match(&rule.value))
}

/// `spec.service.match` as Istio `HTTPMatchRequest`s.
fn service_matches(options: &RouteOptions) -> Vec<Value> {
    options.matches.iter().map(route_match).collect()
}

fn route_match(m: &RouteMatch) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(name) = &m.name {
        out.insert("name".into(), json!(name));
    }
    for (key, value) in [
        ("uri", &m.uri),
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(v) = value {
            out.insert(key.into(), string_match(v));
        }
    }
    if !m.headers.is_empty() {
        let headers: serde_json::Map<String, Value> = m.headers.iter().map(header_match).collect();
        out.insert("headers".into(), Value::Object(headers));
    }
    if !m.query_params.is_empty() {
        let params: serde_json::Map<String, Value> = m
            .query_params
            .iter()
            .map(|(k, v)| (k.clone(), string_match(v)))
            .collect();
        out.insert("queryParams".into(), Value::Object(params));
    }
    if m.ignore_uri_case {
        out.insert("ignoreUriCase".into(), json!(true));
    }
    for (k, v) in &m.istio_only {
        out.insert(k.clone(), v.clone());
    }
    Value::Object(out)
}

/// Flagger's `mergeMatchConditions`: every `spec.service.match` entry with its headers replaced by
/// each of `headers` (the A/B groups, or a session cookie); just `headers` without a service match.
fn with_headers_replaced(service: &[Value], headers: &[Value]) -> Vec<Value> {
    if service.is_empty() {
        return headers.iter().map(|h| json!({"headers": h})).collect();
    }
    let mut merged = Vec::new();
    for h in headers {
        for s in service {
            let mut m = s.clone();
            m["headers"] = h.clone();
            merged.push(m);
        }
    }
    merged
}

/// Every `spec.service.match` entry with the header `name` added (Weir's routing header, which
/// must hold as well as the user's own conditions), or just that header without a service match.
fn with_header_added(service: &[Value], name: &str, value: Value) -> Vec<Value> {
    if service.is_empty() {
        return vec![json!({"headers": {name: value}})];
    }
    service
        .iter()
        .map(|s| {
            let mut m = s.clone();
            match m.get_mut("headers").and_then(Value::as_object_mut) {
                Some(headers) => {
                    headers.insert(name.to_owned(), value.clone());
                }
                None => m["headers"] = json!({name: value.clone()}),
            }
            m
        })
        .collect()
}

/// The regex Flagger matches a session cookie with in the `cookie` header (`.*name.*value.*`;
/// regex operators in the name are escaped, which Flagger does not do).
fn cookie_regex(cookie: &Cookie) -> Value {
    json!({"cookie": {"regex": format!(".*{}.*{}.*", regex_escape(&cookie.name), cookie.value)}})
}

fn regex_escape(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One HTTP route with `spec.service`'s route options, as Flagger writes every route.
fn http_route(options: &RouteOptions, name: &str, matches: Vec<Value>, route: Vec<Value>) -> Value {
    let mut r = json!({"name": name});
    if !matches.is_empty() {
        r["match"] = json!(matches);
    }
    r["route"] = json!(route);
    if let Some(rewrite) = &options.rewrite {
        let mut w = json!({});
        if let Some(uri) = &rewrite.uri {
            w["uri"] = json!(uri);
        }
        if let Some(authority) = &rewrite.authority {
            w["authority"] = json!(authority);
        }
        r["rewrite"] = w;
    }
    if let Some(timeout) = &options.timeout {
        r["timeout"] = json!(timeout.text);
    }
    if let Some(retries) = &options.retries {
        let mut w = json!({"attempts": retries.attempts});
        if let Some(t) = &retries.per_try_timeout {
            w["perTryTimeout"] = json!(t.text);
        }
        if let Some(on) = &retries.retry_on {
            w["retryOn"] = json!(on);
        }
        r["retries"] = w;
    }
    if let Some(cors) = &options.cors {
        let mut w = json!({});
        if !cors.allow_origins.is_empty() {
            w["allowOrigins"] = json!(cors
                .allow_origins
                .iter()
                .map(string_match)
                .collect::<Vec<_>>());
        }
        for (key, list) in [
            ("allowMethods", &cors.allow_methods),
            ("allowHeaders", &cors.allow_headers),
            ("exposeHeaders", &cors.expose_headers),
        ] {
            if !list.is_empty() {
                w[key] = json!(list);
            }
        }
        if let Some(max_age) = &cors.max_age {
            w["maxAge"] = json!(max_age.text);
        }
        if let Some(credentials) = cors.allow_credentials {
            w["allowCredentials"] = json!(credentials);
        }
        r["corsPolicy"] = w;
    }
    if let Some(headers) = &options.headers {
        let mut w = json!({});
        for (key, ops) in [
            ("request", &headers.request),
            ("response", &headers.response),
        ] {
            if ops.is_empty() {
                continue;
            }
            let mut o = json!({});
            if !ops.set.is_empty() {
                o["set"] = json!(ops.set);
            }
            if !ops.add.is_empty() {
                o["add"] = json!(ops.add);
            }
            if !ops.remove.is_empty() {
                o["remove"] = json!(ops.remove);
            }
            w[key] = o;
        }
        r["headers"] = w;
    }
    r
}

/// The VirtualService for `plan`, routing as `route` says in `mode`. Hosts are the apex Service
/// and `spec.service.hosts`; gateways are `spec.service.gateways` (none: the mesh). Every route
/// carries `spec.service`'s route options and serves only what `spec.service.match` matches, as
/// in Flagger. `session` is used without filters only (with them, the filter sets and reads the
/// cookies): Flagger's cookie routes.
pub fn virtual_service(
    plan: &CanaryPlan,
    route: Route,
    mode: RoutingMode,
    routing_header: &str,
    canary_value: &str,
    session: Option<&SessionCookies>,
    owner: &Value,
) -> Value {
    let primary = services::primary_name(plan);
    let canary = services::canary_name(plan);
    let options = &plan.service.routes;
    let service = service_matches(options);
    let http = match mode {
        RoutingMode::Filters => vec![
            http_route(
                options,
                "weir-canary",
                with_header_added(&service, routing_header, json!({"exact": canary_value})),
                vec![destination(plan, canary, None)],
            ),
            http_route(
                options,
                "weir-primary",
                service.clone(),
                vec![destination(plan, primary, None)],
            ),
        ],
        RoutingMode::Weights => match (route, &plan.analysis.strategy) {
            (Route::Matches, crate::spec::Strategy::AbTesting { matches, .. }) => {
                let groups: Vec<Value> = matches
                    .iter()
                    .map(|group| {
                        let headers: serde_json::Map<String, Value> =
                            group.headers.iter().map(header_match).collect();
                        Value::Object(headers)
                    })
                    .collect();
                vec![
                    http_route(
                        options,
                        "weir-canary",
                        with_headers_replaced(&service, &groups),
                        vec![destination(plan, canary, None)],
                    ),
                    http_route(
                        options,
                        "weir-primary",
                        service.clone(),
                        vec![destination(plan, primary, None)],
                    ),
                ]
            }
            _ => {
                let w = match route {
                    Route::Weighted(w) => w.percent(),
                    Route::Primary | Route::Matches => 0,
                };
                let active = session.filter(|s| s.active);
                let weighted = http_route(
                    options,
                    "weir-weighted",
                    service.clone(),
                    vec![
                        setting_cookie(
                            destination(plan, primary.clone(), Some(100 - w)),
                            active.and_then(|s| s.primary.as_ref()),
                        ),
                        setting_cookie(
                            destination(plan, canary.clone(), Some(w)),
                            active.map(|s| &s.canary),
                        ),
                    ],
                );
                let mut http = Vec::new();
                match session {
                    Some(s) if s.active => {
                        http.push(http_route(
                            options,
                            "weir-session-canary",
                            with_headers_replaced(&service, &[cookie_regex(&s.canary)]),
                            vec![
                                destination(plan, primary.clone(), Some(0)),
                                destination(plan, canary.clone(), Some(100)),
                            ],
                        ));
                        if let Some(p) = &s.primary {
                            http.push(http_route(
                                options,
                                "weir-session-primary",
                                with_headers_replaced(&service, &[cookie_regex(p)]),
                                vec![
                                    destination(plan, primary.clone(), Some(100)),
                                    destination(plan, canary.clone(), Some(0)),
                                ],
                            ));
                        }
                    }
                    Some(s) => {
                        // The run is over: clients still carrying its cookie get it cleared.
                        let mut expire = http_route(
                            options,
                            "weir-session-expire",
                            with_headers_replaced(&service, &[cookie_regex(&s.canary)]),
                            vec![
                                destination(plan, primary.clone(), Some(100 - w)),
                                destination(plan, canary.clone(), Some(w)),
                            ],
                        );
                        let add = &mut expire["headers"]["response"]["add"];
                        add["Set-Cookie"] = json!(s.canary.clear_cookie());
                        http.push(expire);
                    }
                    None => {}
                }
                http.push(weighted);
                http
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
            None,
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
            None,
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
            None,
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

    const ROUTE_OPTIONS: &str = include_str!("../../spec/testdata/weir-route-options.yaml");

    /// The options Flagger copies into every route of its VirtualService.
    fn assert_flaggers_route_options(route: &Value) {
        assert_eq!(route["timeout"], "5s");
        assert_eq!(
            route["retries"],
            json!({"attempts": 3, "perTryTimeout": "1s", "retryOn": "gateway-error,connect-failure,refused-stream"})
        );
        assert_eq!(
            route["rewrite"],
            json!({"uri": "/v2/", "authority": "podinfo.internal"})
        );
        assert_eq!(
            route["headers"],
            json!({
                "request": {"add": {"x-some-header": "value"}, "set": {"x-forwarded-by": "weir"}, "remove": ["x-debug"]},
                "response": {"remove": ["x-envoy-upstream-service-time"]},
            })
        );
        assert_eq!(
            route["corsPolicy"],
            json!({
                "allowOrigins": [{"exact": "https://example.com"}],
                "allowMethods": ["GET", "POST"],
                "allowHeaders": ["x-some-header"],
                "maxAge": "24h",
                "allowCredentials": true,
            })
        );
    }

    #[test]
    fn with_filters_every_route_carries_the_route_options_and_the_service_match() {
        let p = plan(ROUTE_OPTIONS);
        let vs = virtual_service(
            &p,
            Route::Weighted(Weight::try_new(30).unwrap()),
            RoutingMode::Filters,
            "x-weir-route",
            "secret",
            None,
            &json!({}),
        );
        let http = vs["spec"]["http"].as_array().unwrap();
        assert_eq!(http.len(), 2);
        for route in http {
            assert_flaggers_route_options(route);
        }
        // The canary route: the user's conditions and the routing header, in each match.
        assert_eq!(
            http[0]["match"],
            json!([
                {"uri": {"prefix": "/api"}, "headers": {"x-weir-route": {"exact": "secret"}}},
                {"uri": {"exact": "/healthz"}, "headers": {"x-region": {"exact": "eu"}, "x-weir-route": {"exact": "secret"}}},
            ])
        );
        assert_eq!(
            http[1]["match"],
            json!([{"uri": {"prefix": "/api"}}, {"uri": {"exact": "/healthz"}, "headers": {"x-region": {"exact": "eu"}}}])
        );
        // The filter sets the session cookies: nothing about them in the routes.
        assert!(!vs.to_string().contains("flagger-cookie"));
    }

    #[test]
    fn without_filters_session_affinity_is_flaggers_cookie_routes_and_set_cookie_headers() {
        let p = plan(ROUTE_OPTIONS);
        let route = Route::Weighted(Weight::try_new(30).unwrap());
        let cookies = crate::traffic::session_cookies(&p, route, "rev1").unwrap();
        let vs = virtual_service(
            &p,
            route,
            RoutingMode::Weights,
            "x-weir-route",
            "secret",
            Some(&cookies),
            &json!({}),
        );
        let http = vs["spec"]["http"].as_array().unwrap();
        assert_eq!(http.len(), 3, "{http:#?}");
        for route in http {
            assert_flaggers_route_options(route);
        }
        let canary_cookie = format!("flagger-cookie={}", cookies.canary.value);
        let primary = cookies.primary.as_ref().unwrap();
        // 1. A request with the canary cookie goes to the canary (the service match with its
        //    headers replaced by the cookie, as Flagger merges them).
        assert_eq!(
            http[0]["match"],
            json!([
                {"uri": {"prefix": "/api"}, "headers": {"cookie": {"regex": format!(".*flagger-cookie.*{}.*", cookies.canary.value)}}},
                {"uri": {"exact": "/healthz"}, "headers": {"cookie": {"regex": format!(".*flagger-cookie.*{}.*", cookies.canary.value)}}},
            ])
        );
        assert_eq!(http[0]["route"][0]["weight"], 0);
        assert_eq!(http[0]["route"][1]["destination"]["host"], "podinfo-canary");
        assert_eq!(http[0]["route"][1]["weight"], 100);
        // 2. One with the primary cookie to the primary.
        assert_eq!(
            http[1]["route"][0]["destination"]["host"],
            "podinfo-primary"
        );
        assert!(http[1]["match"][0]["headers"]["cookie"]["regex"]
            .as_str()
            .unwrap()
            .contains(&primary.value));
        // 3. The weighted route gives each version's cookie.
        let weighted = &http[2]["route"];
        assert_eq!(weighted[0]["weight"], 70);
        assert_eq!(
            weighted[0]["headers"]["response"]["add"]["Set-Cookie"],
            format!("flagger-primary-cookie={}; Max-Age=60", primary.value)
        );
        assert_eq!(weighted[1]["weight"], 30);
        assert_eq!(
            weighted[1]["headers"]["response"]["add"]["Set-Cookie"],
            format!("{canary_cookie}; Max-Age=21600")
        );

        // After the rollout: the cookie of the run is cleared on the primary.
        let done = crate::traffic::session_cookies(&p, Route::Primary, "rev1").unwrap();
        let vs = virtual_service(
            &p,
            Route::Primary,
            RoutingMode::Weights,
            "x-weir-route",
            "secret",
            Some(&done),
            &json!({}),
        );
        let http = vs["spec"]["http"].as_array().unwrap();
        assert_eq!(http.len(), 2);
        assert_eq!(
            http[0]["route"][0]["destination"]["host"],
            "podinfo-primary"
        );
        assert_eq!(
            http[0]["headers"]["response"]["add"]["Set-Cookie"],
            format!("{canary_cookie}; Max-Age=-1")
        );
        // The user's own response header operations stay.
        assert_eq!(
            http[0]["headers"]["response"]["remove"],
            json!(["x-envoy-upstream-service-time"])
        );
        assert_eq!(http[1]["route"][1]["weight"], 0);
        assert!(http[1]["route"][1].get("headers").is_none());
    }

    #[test]
    fn without_filters_an_ab_match_is_merged_into_the_service_match_as_flagger_merges_it() {
        let yaml = format!(
            "{}  service:\n    port: 80\n    match:\n    - uri: {{prefix: /api}}\n      headers: {{x-dropped: {{exact: yes}}}}\n    timeout: 2s\n",
            "apiVersion: weir.dev/v1alpha1\nkind: Canary\nmetadata: {name: shop, namespace: app}\nspec:\n  targetRef: {apiVersion: apps/v1, kind: Deployment, name: shop}\n  analysis:\n    iterations: 3\n    match:\n    - headers: {x-canary: {exact: insider}}\n    - headers: {cookie: {regex: \"^(.*?;)?(canary=always)(;.*)?$\"}}\n"
        );
        let p = plan(&yaml);
        let vs = virtual_service(
            &p,
            Route::Matches,
            RoutingMode::Weights,
            "x-weir-route",
            "secret",
            None,
            &json!({}),
        );
        let http = &vs["spec"]["http"];
        assert_eq!(
            http[0]["match"],
            json!([
                {"uri": {"prefix": "/api"}, "headers": {"x-canary": {"exact": "insider"}}},
                {"uri": {"prefix": "/api"}, "headers": {"cookie": {"regex": "^(.*?;)?(canary=always)(;.*)?$"}}},
            ])
        );
        assert_eq!(
            http[1]["match"],
            json!([{"uri": {"prefix": "/api"}, "headers": {"x-dropped": {"exact": "yes"}}}])
        );
        assert_eq!(http[0]["timeout"], "2s");
        assert_eq!(http[1]["timeout"], "2s");
    }
}
