//! Where a request is split: the directive compiled into a routing table, and the per-request
//! decision (weighted, sticky, or header match) between primary and canary.

use std::borrow::Cow;
use std::collections::HashMap;
use std::rc::Rc;

use weir_proto::v1::{self, canary_route::Mode, header_rule::Value, sticky::Key};
use weir_proto::FULL_WEIGHT_BP;

/// The version a request is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// The stable version.
    Primary,
    /// The version under analysis.
    Canary,
}

impl Version {
    /// The wire enum.
    pub fn to_wire(self) -> v1::Version {
        match self {
            Version::Primary => v1::Version::Primary,
            Version::Canary => v1::Version::Canary,
        }
    }

    /// Index for per-version arrays.
    pub fn index(self) -> usize {
        match self {
            Version::Primary => 0,
            Version::Canary => 1,
        }
    }

    /// Lower-case name, as used in stats.
    pub fn name(self) -> &'static str {
        match self {
            Version::Primary => "primary",
            Version::Canary => "canary",
        }
    }
}

/// Read access to the request's headers, fetched lazily so a weighted split costs no host call.
pub trait RequestHeaders {
    /// The value of header `name` (lower case), if present.
    fn header(&self, name: &str) -> Option<String>;
}

/// A header-value matcher.
#[derive(Debug, Clone)]
enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(regex_lite::Regex),
}

impl Matcher {
    fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(v) => value == v,
            Matcher::Prefix(p) => value.starts_with(p.as_str()),
            Matcher::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    header: String,
    matcher: Matcher,
}

#[derive(Debug, Clone)]
enum StickyKey {
    Header(String),
    Cookie(String),
}

#[derive(Debug, Clone)]
enum Split {
    Weighted,
    Sticky(StickyKey),
    /// Any group matches (every rule of the group matches) → canary.
    HeaderMatch(Vec<Vec<Rule>>),
}

/// One session cookie of Flagger's session affinity, with its `Set-Cookie` values ready.
#[derive(Debug, Clone)]
struct SessionCookie {
    name: String,
    value: String,
    /// `name=value; Max-Age=<seconds>`.
    give: Rc<str>,
    /// `name=value; Max-Age=-1`.
    clear: Rc<str>,
}

impl SessionCookie {
    fn compile(name: &str, value: &str, max_age_seconds: u32) -> Result<Self, String> {
        // Both go into a response header: nothing that could end the cookie or the header.
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
        };
        if !token(name) || !token(value) {
            return Err(format!(
                "session cookie `{name}` with value `{value}` is not a valid cookie"
            ));
        }
        Ok(SessionCookie {
            name: name.to_owned(),
            value: value.to_owned(),
            give: Rc::from(format!("{name}={value}; Max-Age={max_age_seconds}")),
            clear: Rc::from(format!("{name}={value}; Max-Age=-1")),
        })
    }
}

/// Flagger's session affinity for one canary, compiled.
#[derive(Debug, Clone)]
struct Affinity {
    /// Cookies are given and honoured (true), or cleared (the rollout ended).
    active: bool,
    canary: SessionCookie,
    primary: Option<SessionCookie>,
}

/// The decision for one request: the version, and a `Set-Cookie` value for its response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Where the request goes.
    pub version: Version,
    /// A session cookie to give or clear in the response.
    pub set_cookie: Option<Rc<str>>,
}

/// One canary's compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    /// The canary's stable key, `namespace/name`.
    pub key: Rc<str>,
    weight_bp: u32,
    split: Split,
    affinity: Option<Affinity>,
    /// The routing header to set; empty means the filter's configured one.
    pub routing_header: String,
    primary_value: String,
    canary_value: String,
}

impl Route {
    /// The routing header value for `version`.
    pub fn value_for(&self, version: Version) -> &str {
        match version {
            Version::Primary => &self.primary_value,
            Version::Canary => &self.canary_value,
        }
    }

    /// Decides one request, session cookies included: while the affinity is active, a request
    /// carrying the canary's (or the primary's) cookie with the controller's value keeps its
    /// version, and any other is split and gets the cookie of the version it went to; once the
    /// rollout ended, a request still carrying a cookie gets it cleared. In fail-safe every
    /// request goes to the primary and no cookie is honoured or given.
    pub fn decide_request(
        &self,
        headers: &impl RequestHeaders,
        rng: &mut Rng,
        fail_safe: bool,
    ) -> Decision {
        let plain = |version| Decision {
            version,
            set_cookie: None,
        };
        let Some(affinity) = self.affinity.as_ref().filter(|_| !fail_safe) else {
            return plain(self.decide(headers, rng, fail_safe));
        };
        let cookies = headers.header("cookie");
        let cookies = cookies.as_deref().unwrap_or_default();
        if !affinity.active {
            let carried = std::iter::once(&affinity.canary)
                .chain(&affinity.primary)
                .find(|c| cookie_value(cookies, &c.name).is_some());
            return Decision {
                version: self.decide(headers, rng, fail_safe),
                set_cookie: carried.map(|c| c.clear.clone()),
            };
        }
        if cookie_value(cookies, &affinity.canary.name) == Some(affinity.canary.value.as_str()) {
            return plain(Version::Canary);
        }
        if let Some(primary) = &affinity.primary {
            if cookie_value(cookies, &primary.name) == Some(primary.value.as_str()) {
                return plain(Version::Primary);
            }
        }
        let version = self.decide(headers, rng, fail_safe);
        let cookie = match version {
            Version::Canary => Some(&affinity.canary),
            Version::Primary => affinity.primary.as_ref(),
        };
        Decision {
            version,
            set_cookie: cookie.map(|c| c.give.clone()),
        }
    }

    /// Decides the version of one request by the split alone. With `fail_safe` (the controller
    /// has been silent for longer than the grace period) every request goes to primary.
    pub fn decide(&self, headers: &impl RequestHeaders, rng: &mut Rng, fail_safe: bool) -> Version {
        if fail_safe {
            return Version::Primary;
        }
        let canary = match &self.split {
            Split::Weighted => rng.below(FULL_WEIGHT_BP) < self.weight_bp,
            Split::Sticky(key) => {
                let value = match key {
                    StickyKey::Header(name) => headers.header(name),
                    StickyKey::Cookie(name) => headers
                        .header("cookie")
                        .and_then(|c| cookie_value(&c, name).map(str::to_owned)),
                };
                match value {
                    Some(v) => sticky_bucket(&self.key, &v) < self.weight_bp,
                    // Without a key there is nothing to stick to: split at random.
                    None => rng.below(FULL_WEIGHT_BP) < self.weight_bp,
                }
            }
            Split::HeaderMatch(groups) => groups.iter().any(|group| {
                group.iter().all(|rule| {
                    headers
                        .header(&rule.header)
                        .is_some_and(|value| rule.matcher.matches(&value))
                })
            }),
        };
        if canary {
            Version::Canary
        } else {
            Version::Primary
        }
    }
}

/// A directive compiled for lookups by authority.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    /// The directive's generation.
    pub generation: u64,
    routes: Vec<Route>,
    by_authority: HashMap<String, usize>,
    by_host: HashMap<String, usize>,
}

impl RoutingTable {
    /// Compiles a directive. Canaries that cannot be compiled (bad regex, out-of-range weight,
    /// missing mode) are left out, so their hosts see no canary, and each is described in the
    /// returned problems.
    pub fn compile(directive: &v1::Directive) -> (Self, Vec<String>) {
        let mut table = RoutingTable {
            generation: directive.generation,
            ..Default::default()
        };
        let mut problems = Vec::new();
        for canary in &directive.canaries {
            match compile_route(canary) {
                Ok(route) => {
                    let index = table.routes.len();
                    for host in &canary.hosts {
                        let host = host.trim().to_ascii_lowercase();
                        let map = if host.contains(':') {
                            &mut table.by_authority
                        } else {
                            &mut table.by_host
                        };
                        if map.insert(host.clone(), index).is_some() {
                            problems.push(format!(
                                "weir: host `{host}` is claimed by more than one canary; `{}` wins",
                                canary.key
                            ));
                        }
                    }
                    table.routes.push(route);
                }
                Err(reason) => problems.push(format!(
                    "weir: canary `{}` ignored (its hosts go to primary): {reason}",
                    canary.key
                )),
            }
        }
        (table, problems)
    }

    /// The route covering `authority` (`host` or `host:port`, any case).
    pub fn find(&self, authority: &str) -> Option<&Route> {
        if self.routes.is_empty() {
            return None;
        }
        // Authorities are almost always lower case already: copy only when they are not.
        let authority: Cow<'_, str> = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(authority.to_ascii_lowercase())
        } else {
            Cow::Borrowed(authority)
        };
        let index = self.by_authority.get(authority.as_ref()).or_else(|| {
            let host = match authority.rsplit_once(':') {
                // Not an IPv6 literal's colon: the part after it is a port.
                Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
                _ => authority.as_ref(),
            };
            self.by_host.get(host)
        })?;
        self.routes.get(*index)
    }

    /// Every compiled route.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

fn compile_route(canary: &v1::CanaryRoute) -> Result<Route, String> {
    if canary.key.is_empty() {
        return Err("empty key".to_string());
    }
    if canary.canary_weight_bp > FULL_WEIGHT_BP {
        return Err(format!(
            "canary_weight_bp {} is above {FULL_WEIGHT_BP}",
            canary.canary_weight_bp
        ));
    }
    let split = match &canary.mode {
        None | Some(Mode::Weighted(_)) => Split::Weighted,
        Some(Mode::Sticky(sticky)) => match &sticky.key {
            Some(Key::Header(h)) if !h.is_empty() => {
                Split::Sticky(StickyKey::Header(h.to_ascii_lowercase()))
            }
            Some(Key::Cookie(c)) if !c.is_empty() => Split::Sticky(StickyKey::Cookie(c.clone())),
            _ => return Err("sticky mode needs a header or cookie name".to_string()),
        },
        Some(Mode::HeaderMatch(m)) => {
            let mut groups = Vec::with_capacity(m.any_of.len());
            for group in &m.any_of {
                let mut rules = Vec::with_capacity(group.all_of.len());
                for rule in &group.all_of {
                    let matcher = match &rule.value {
                        Some(Value::Exact(v)) => Matcher::Exact(v.clone()),
                        Some(Value::Prefix(p)) => Matcher::Prefix(p.clone()),
                        Some(Value::Regex(r)) => Matcher::Regex(
                            regex_lite::Regex::new(r)
                                .map_err(|e| format!("header `{}` regex `{r}`: {e}", rule.name))?,
                        ),
                        None => {
                            return Err(format!(
                                "header `{}` rule has no exact, prefix or regex",
                                rule.name
                            ))
                        }
                    };
                    rules.push(Rule {
                        header: rule.name.to_ascii_lowercase(),
                        matcher,
                    });
                }
                groups.push(rules);
            }
            Split::HeaderMatch(groups)
        }
    };
    let affinity = match &canary.session_affinity {
        None => None,
        Some(sa) => Some(Affinity {
            active: sa.active,
            canary: SessionCookie::compile(&sa.cookie_name, &sa.cookie_value, sa.max_age_seconds)?,
            primary: if sa.primary_cookie_name.is_empty() {
                None
            } else {
                Some(SessionCookie::compile(
                    &sa.primary_cookie_name,
                    &sa.primary_cookie_value,
                    sa.primary_max_age_seconds,
                )?)
            },
        }),
    };
    let or_default = |value: &str, default: &str| {
        if value.is_empty() {
            default.to_string()
        } else {
            value.to_string()
        }
    };
    Ok(Route {
        key: Rc::from(canary.key.as_str()),
        weight_bp: canary.canary_weight_bp,
        split,
        affinity,
        routing_header: canary.routing_header.to_ascii_lowercase(),
        primary_value: or_default(&canary.primary_value, "primary"),
        canary_value: or_default(&canary.canary_value, "canary"),
    })
}

/// The value of cookie `name` in a Cookie header.
fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The sticky bucket of a user, in [0, 10000): stable for a (canary, key value) pair, so raising
/// the weight only ever moves users from primary to canary, never back.
pub fn sticky_bucket(canary: &str, value: &str) -> u32 {
    // FNV-1a over the canary key and the value, then a SplitMix64 finaliser for an even spread.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in canary.bytes().chain([0xff]).chain(value.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (mix64(hash) % u64::from(FULL_WEIGHT_BP)) as u32
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small, fast pseudo-random generator (SplitMix64) for weighted splits. Seeded per worker.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (e.g. the start time in nanoseconds mixed with the context id).
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// A number in [0, n).
    pub fn below(&mut self, n: u32) -> u32 {
        // Multiply-shift: unbiased enough for n <= 10_000 against 64 random bits.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap as Map;

    struct Headers(Map<&'static str, &'static str>);

    impl RequestHeaders for Headers {
        fn header(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    fn no_headers() -> Headers {
        Headers(Map::new())
    }

    fn route(key: &str, hosts: &[&str], weight: u32, mode: Option<Mode>) -> v1::CanaryRoute {
        v1::CanaryRoute {
            key: key.to_string(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            canary_weight_bp: weight,
            mode,
            ..Default::default()
        }
    }

    fn table(routes: Vec<v1::CanaryRoute>) -> RoutingTable {
        let (table, problems) = RoutingTable::compile(&v1::Directive {
            generation: 7,
            canaries: routes,
        });
        assert!(problems.is_empty(), "{problems:?}");
        table
    }

    #[test]
    fn hosts_match_with_or_without_port_ignoring_case() {
        let t = table(vec![
            route("app/a", &["a.app"], 0, None),
            route("app/b", &["b.app:8080"], 0, None),
        ]);
        assert_eq!(&*t.find("a.app").unwrap().key, "app/a");
        assert_eq!(&*t.find("A.App:80").unwrap().key, "app/a");
        assert_eq!(&*t.find("b.app:8080").unwrap().key, "app/b");
        assert!(t.find("b.app").is_none());
        assert!(t.find("b.app:9090").is_none());
        assert!(t.find("c.app").is_none());
        assert_eq!(t.generation, 7);
    }

    #[test]
    fn weighted_split_follows_the_weight() {
        let t = table(vec![route(
            "app/a",
            &["a"],
            3000,
            Some(Mode::Weighted(v1::Weighted {})),
        )]);
        let r = t.find("a").unwrap();
        let mut rng = Rng::new(42);
        let canary = (0..100_000)
            .filter(|_| r.decide(&no_headers(), &mut rng, false) == Version::Canary)
            .count();
        assert!((29_000..31_000).contains(&canary), "{canary}");
    }

    #[test]
    fn weight_zero_and_full_are_absolute() {
        let mut rng = Rng::new(1);
        let zero = table(vec![route("app/a", &["a"], 0, None)]);
        let full = table(vec![route("app/a", &["a"], 10_000, None)]);
        for _ in 0..10_000 {
            assert_eq!(
                zero.find("a")
                    .unwrap()
                    .decide(&no_headers(), &mut rng, false),
                Version::Primary
            );
            assert_eq!(
                full.find("a")
                    .unwrap()
                    .decide(&no_headers(), &mut rng, false),
                Version::Canary
            );
        }
    }

    #[test]
    fn fail_safe_sends_everything_to_primary() {
        let t = table(vec![route("app/a", &["a"], 10_000, None)]);
        let mut rng = Rng::new(1);
        assert_eq!(
            t.find("a").unwrap().decide(&no_headers(), &mut rng, true),
            Version::Primary
        );
    }

    #[test]
    fn sticky_users_never_leave_the_canary_as_the_weight_grows() {
        let sticky = || {
            Some(Mode::Sticky(v1::Sticky {
                key: Some(Key::Header("x-user".to_string())),
            }))
        };
        let at_10 = table(vec![route("app/a", &["a"], 1000, sticky())]);
        let at_20 = table(vec![route("app/a", &["a"], 2000, sticky())]);
        let mut rng = Rng::new(3);
        let mut in_canary_at_10 = 0;
        for user in 0..2000 {
            let name: &'static str = Box::leak(format!("user-{user}").into_boxed_str());
            let headers = Headers(Map::from([("x-user", name)]));
            let first = at_10.find("a").unwrap().decide(&headers, &mut rng, false);
            for _ in 0..5 {
                assert_eq!(
                    at_10.find("a").unwrap().decide(&headers, &mut rng, false),
                    first
                );
            }
            if first == Version::Canary {
                in_canary_at_10 += 1;
                assert_eq!(
                    at_20.find("a").unwrap().decide(&headers, &mut rng, false),
                    Version::Canary
                );
            }
        }
        assert!((120..280).contains(&in_canary_at_10), "{in_canary_at_10}");
    }

    #[test]
    fn sticky_by_cookie_reads_the_named_cookie() {
        assert_eq!(
            cookie_value("a=1; session=abc; b=2", "session"),
            Some("abc")
        );
        assert_eq!(cookie_value("a=1", "session"), None);
        let t = table(vec![route(
            "app/a",
            &["a"],
            10_000,
            Some(Mode::Sticky(v1::Sticky {
                key: Some(Key::Cookie("session".to_string())),
            })),
        )]);
        let headers = Headers(Map::from([("cookie", "session=abc")]));
        assert_eq!(
            t.find("a")
                .unwrap()
                .decide(&headers, &mut Rng::new(1), false),
            Version::Canary
        );
    }

    #[test]
    fn header_match_sends_matching_requests_to_canary_only() {
        let rule = |name: &str, value: Value| v1::HeaderRule {
            name: name.to_string(),
            value: Some(value),
        };
        let mode = Mode::HeaderMatch(v1::HeaderMatch {
            any_of: vec![
                v1::MatchGroup {
                    all_of: vec![rule("x-canary", Value::Exact("insider".into()))],
                },
                v1::MatchGroup {
                    all_of: vec![rule(
                        "cookie",
                        Value::Regex("^(.*?;)?(canary=always)(;.*)?$".into()),
                    )],
                },
                v1::MatchGroup {
                    all_of: vec![
                        rule("user-agent", Value::Prefix("Mozilla".into())),
                        rule("x-region", Value::Exact("eu".into())),
                    ],
                },
            ],
        });
        let t = table(vec![route("app/a", &["a"], 0, Some(mode))]);
        let r = t.find("a").unwrap();
        let mut rng = Rng::new(1);
        let cases: [(&[(&'static str, &'static str)], Version); 6] = [
            (&[("x-canary", "insider")], Version::Canary),
            (&[("x-canary", "outsider")], Version::Primary),
            (&[("cookie", "canary=always; a=b")], Version::Canary),
            (
                &[("user-agent", "Mozilla/5"), ("x-region", "eu")],
                Version::Canary,
            ),
            (&[("user-agent", "Mozilla/5")], Version::Primary),
            (&[], Version::Primary),
        ];
        for (headers, expected) in cases {
            let headers = Headers(headers.iter().copied().collect());
            assert_eq!(
                r.decide(&headers, &mut rng, false),
                expected,
                "{:?}",
                headers.0
            );
        }
    }

    #[test]
    fn bad_canaries_are_left_out_with_a_reason() {
        let bad_regex = Mode::HeaderMatch(v1::HeaderMatch {
            any_of: vec![v1::MatchGroup {
                all_of: vec![v1::HeaderRule {
                    name: "x".into(),
                    value: Some(Value::Regex("(".into())),
                }],
            }],
        });
        let (t, problems) = RoutingTable::compile(&v1::Directive {
            generation: 1,
            canaries: vec![
                route("app/bad", &["bad"], 0, Some(bad_regex)),
                route("app/heavy", &["heavy"], 10_001, None),
                route("app/good", &["good"], 100, None),
            ],
        });
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("app/bad") && problems[0].contains("regex"));
        assert!(problems[1].contains("app/heavy"));
        assert!(t.find("bad").is_none() && t.find("heavy").is_none());
        assert!(t.find("good").is_some());
    }

    fn with_affinity(weight: u32, active: bool, primary: bool) -> RoutingTable {
        let mut r = route("app/a", &["a"], weight, None);
        r.session_affinity = Some(v1::SessionAffinity {
            active,
            cookie_name: "flagger-cookie".into(),
            cookie_value: "c0ffee".into(),
            max_age_seconds: 120,
            primary_cookie_name: if primary {
                "flagger-primary".into()
            } else {
                String::new()
            },
            primary_cookie_value: if primary {
                "beef".into()
            } else {
                String::new()
            },
            primary_max_age_seconds: 10,
        });
        table(vec![r])
    }

    #[test]
    fn a_request_split_to_the_canary_gets_the_session_cookie_and_keeps_the_canary_with_it() {
        let t = with_affinity(10_000, true, false);
        let r = t.find("a").unwrap();
        let mut rng = Rng::new(1);
        let first = r.decide_request(&no_headers(), &mut rng, false);
        assert_eq!(first.version, Version::Canary);
        assert_eq!(
            first.set_cookie.as_deref(),
            Some("flagger-cookie=c0ffee; Max-Age=120")
        );
        // Later, at a weight of 0 bp (the step is still running): the cookie keeps the canary.
        let t = with_affinity(0, true, false);
        let r = t.find("a").unwrap();
        let cookie = Headers(Map::from([("cookie", "a=1; flagger-cookie=c0ffee")]));
        let again = r.decide_request(&cookie, &mut rng, false);
        assert_eq!((again.version, again.set_cookie), (Version::Canary, None));
        // Without a primary cookie name, the primary's responses set nothing.
        let primary = r.decide_request(&no_headers(), &mut rng, false);
        assert_eq!(
            (primary.version, primary.set_cookie),
            (Version::Primary, None)
        );
        // In fail-safe no cookie is honoured.
        assert_eq!(
            r.decide_request(&cookie, &mut rng, true).version,
            Version::Primary
        );
    }

    #[test]
    fn a_forged_session_cookie_is_split_like_any_request() {
        let t = with_affinity(0, true, false);
        let r = t.find("a").unwrap();
        let forged = Headers(Map::from([("cookie", "flagger-cookie=guess")]));
        let d = r.decide_request(&forged, &mut Rng::new(1), false);
        assert_eq!((d.version, d.set_cookie), (Version::Primary, None));
    }

    #[test]
    fn the_primary_cookie_keeps_a_client_on_the_primary() {
        let t = with_affinity(0, true, true);
        let r = t.find("a").unwrap();
        let d = r.decide_request(&no_headers(), &mut Rng::new(1), false);
        assert_eq!(d.version, Version::Primary);
        assert_eq!(
            d.set_cookie.as_deref(),
            Some("flagger-primary=beef; Max-Age=10")
        );
        let t = with_affinity(10_000, true, true);
        let r = t.find("a").unwrap();
        let pinned = Headers(Map::from([("cookie", "flagger-primary=beef")]));
        let d = r.decide_request(&pinned, &mut Rng::new(1), false);
        assert_eq!((d.version, d.set_cookie), (Version::Primary, None));
    }

    #[test]
    fn after_the_rollout_a_carried_session_cookie_is_cleared_and_not_honoured() {
        let t = with_affinity(0, false, true);
        let r = t.find("a").unwrap();
        let cookie = Headers(Map::from([("cookie", "flagger-cookie=c0ffee")]));
        let d = r.decide_request(&cookie, &mut Rng::new(1), false);
        assert_eq!(d.version, Version::Primary);
        assert_eq!(
            d.set_cookie.as_deref(),
            Some("flagger-cookie=c0ffee; Max-Age=-1")
        );
        let d = r.decide_request(&no_headers(), &mut Rng::new(1), false);
        assert_eq!(d.set_cookie, None);
    }

    #[test]
    fn a_session_cookie_that_could_break_the_header_is_refused() {
        let mut r = route("app/a", &["a"], 0, None);
        r.session_affinity = Some(v1::SessionAffinity {
            active: true,
            cookie_name: "c".into(),
            cookie_value: "x; Domain=evil".into(),
            ..Default::default()
        });
        let (t, problems) = RoutingTable::compile(&v1::Directive {
            generation: 1,
            canaries: vec![r],
        });
        assert!(t.find("a").is_none());
        assert!(problems[0].contains("not a valid cookie"), "{problems:?}");
    }

    #[test]
    fn routing_values_default_to_primary_and_canary() {
        let t = table(vec![route("app/a", &["a"], 0, None)]);
        let r = t.find("a").unwrap();
        assert_eq!(r.value_for(Version::Primary), "primary");
        assert_eq!(r.value_for(Version::Canary), "canary");
    }
}
