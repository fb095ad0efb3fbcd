//! Who is speaking on a stream, and for which canaries it may speak.
//!
//! The identity comes from the connection, never from a message: the SPIFFE id in the URI SAN of
//! the client certificate that the TLS handshake verified against the mesh's root CA
//! (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, as Istio issues them), or, for
//! a controller serving plaintext on loopback (local mode), the machine itself. Authorisation is a
//! separate, explicit table ([`ReporterPolicy`]): who may report for a canary.

use std::fmt;

/// The verified peer of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerIdentity {
    /// A workload identity proven by a client certificate.
    Spiffe(SpiffeId),
    /// A plaintext connection to a controller that serves only loopback (local mode): the
    /// machine's own processes, trusted as such.
    Loopback,
}

impl PeerIdentity {
    /// The namespace the identity belongs to (None for [`PeerIdentity::Loopback`]).
    pub fn namespace(&self) -> Option<&str> {
        match self {
            PeerIdentity::Spiffe(id) => Some(&id.namespace),
            PeerIdentity::Loopback => None,
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::Spiffe(id) => id.fmt(f),
            PeerIdentity::Loopback => f.write_str("loopback (plaintext)"),
        }
    }
}

/// An Istio-shaped SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The trust domain (`cluster.local` by default in Istio).
    pub trust_domain: String,
    /// The workload's namespace.
    pub namespace: String,
    /// The workload's service account.
    pub service_account: String,
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// The longest SPIFFE id accepted (the SPIFFE spec allows 2048 bytes).
const MAX_ID: usize = 2048;

impl SpiffeId {
    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn parse(uri: &str) -> Result<Self, String> {
        if uri.len() > MAX_ID {
            return Err(format!("a SPIFFE id of {} bytes is too long", uri.len()));
        }
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("`{uri}` is not a spiffe:// URI"))?;
        let mut parts = rest.split('/');
        let valid = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(domain), Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if valid(domain) && valid(ns) && valid(sa) =>
            {
                Ok(Self {
                    trust_domain: domain.to_owned(),
                    namespace: ns.to_owned(),
                    service_account: sa.to_owned(),
                })
            }
            _ => Err(format!(
                "`{uri}` is not an Istio workload id (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
            )),
        }
    }

    /// The SPIFFE id in the URI SANs of a DER certificate. Exactly one `spiffe://` URI is
    /// required, as the SPIFFE X.509-SVID spec says.
    pub fn from_certificate(der: &[u8]) -> Result<Self, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("the client certificate does not parse: {e}"))?;
        let sans = cert
            .subject_alternative_name()
            .map_err(|e| format!("the client certificate's subjectAltName is malformed: {e}"))?;
        let uris: Vec<&str> = sans
            .into_iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [uri] => Self::parse(uri),
            [] => Err(
                "the client certificate has no spiffe:// URI SAN (a workload certificate as Istio issues it)"
                    .to_owned(),
            ),
            _ => Err(format!(
                "the client certificate has {} spiffe:// URI SANs; an X.509-SVID has exactly one",
                uris.len()
            )),
        }
    }
}

/// One entry of who may report: a namespace, and a service account there or any (`*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReporterRule {
    /// The namespace.
    pub namespace: String,
    /// The service account, or None for any in the namespace.
    pub service_account: Option<String>,
}

impl ReporterRule {
    /// Parses `namespace/service-account` or `namespace/*` (or a bare `namespace`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (namespace, sa) = match text.split_once('/') {
            Some((ns, "*")) | Some((ns, "")) => (ns, None),
            Some((ns, sa)) => (ns, Some(sa.to_owned())),
            None => (text, None),
        };
        if namespace.is_empty() || namespace.contains('/') {
            return Err(format!(
                "`{text}` is not a reporter rule; write namespace/service-account or namespace/*"
            ));
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            service_account: sa,
        })
    }

    fn matches(&self, id: &SpiffeId) -> bool {
        self.namespace == id.namespace
            && self
                .service_account
                .as_ref()
                .is_none_or(|sa| *sa == id.service_account)
    }
}

/// Who may report for canaries: the trust domain, the identities trusted for every canary (the
/// ingress gateways'), and per canary its own namespace plus what its spec adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReporterPolicy {
    /// The mesh's trust domain; identities of another are refused.
    pub trust_domain: String,
    /// Identities that may report for any canary (Istio's ingress gateway by default).
    pub everywhere: Vec<ReporterRule>,
}

impl Default for ReporterPolicy {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".to_owned(),
            everywhere: vec![ReporterRule {
                namespace: "istio-system".to_owned(),
                service_account: Some("istio-ingressgateway-service-account".to_owned()),
            }],
        }
    }
}

impl ReporterPolicy {
    /// Whether `peer` may report for the canary `key` (`namespace/name`), given the canary's own
    /// extra `rules` (`spec.analysis.reporters`).
    pub fn allows(&self, peer: &PeerIdentity, key: &str, rules: &[ReporterRule]) -> bool {
        let PeerIdentity::Spiffe(id) = peer else {
            return true;
        };
        let namespace = key.split_once('/').map_or(key, |(ns, _)| ns);
        id.trust_domain == self.trust_domain
            && (id.namespace == namespace
                || self.everywhere.iter().any(|r| r.matches(id))
                || rules.iter().any(|r| r.matches(id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ns: &str, sa: &str) -> PeerIdentity {
        PeerIdentity::Spiffe(SpiffeId {
            trust_domain: "cluster.local".into(),
            namespace: ns.into(),
            service_account: sa.into(),
        })
    }

    #[test]
    fn istio_workload_ids_parse_and_anything_else_is_refused() {
        let parsed = SpiffeId::parse("spiffe://cluster.local/ns/application/sa/default").unwrap();
        assert_eq!(parsed.namespace, "application");
        assert_eq!(parsed.service_account, "default");
        assert_eq!(
            parsed.to_string(),
            "spiffe://cluster.local/ns/application/sa/default"
        );
        for bad in [
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns/a b/sa/c",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
        assert!(SpiffeId::parse(&format!("spiffe://{}/ns/a/sa/b", "x".repeat(3000))).is_err());
    }

    #[test]
    fn a_canary_hears_its_own_namespace_the_gateway_and_what_its_spec_adds() {
        let policy = ReporterPolicy::default();
        assert!(policy.allows(&id("application", "default"), "application/mhs", &[]));
        assert!(policy.allows(
            &id("istio-system", "istio-ingressgateway-service-account"),
            "application/mhs",
            &[]
        ));
        assert!(!policy.allows(&id("istio-system", "istiod"), "application/mhs", &[]));
        assert!(!policy.allows(&id("intruder", "default"), "application/mhs", &[]));
        let rules = [
            ReporterRule::parse("frontend/*").unwrap(),
            ReporterRule::parse("batch/reports").unwrap(),
        ];
        assert!(policy.allows(&id("frontend", "web"), "application/mhs", &rules));
        assert!(policy.allows(&id("batch", "reports"), "application/mhs", &rules));
        assert!(!policy.allows(&id("batch", "other"), "application/mhs", &rules));
        let foreign = PeerIdentity::Spiffe(SpiffeId {
            trust_domain: "elsewhere".into(),
            namespace: "application".into(),
            service_account: "default".into(),
        });
        assert!(!policy.allows(&foreign, "application/mhs", &[]));
        assert!(policy.allows(&PeerIdentity::Loopback, "application/mhs", &[]));
        assert!(ReporterRule::parse("/x").is_err());
    }
}
