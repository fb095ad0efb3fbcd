//! A test mesh's certificates, made per test with rcgen: a root CA, the controller's server
//! certificate (for `weir.weir-system.svc.cluster.local`, as Istio's auto mTLS would check), and
//! workload certificates with `spiffe://cluster.local/ns/<ns>/sa/<sa>` URI SANs, as Istio issues
//! them. Written as PEM files into a test's folder.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use weir_controller::ingest::transport::TlsFiles;
use weir_controller::local::LocalTls;

/// The controller Service's host name, which its certificate names.
pub const CONTROLLER_HOST: &str = "weir.weir-system.svc.cluster.local";

/// A certificate and key on disk.
#[derive(Debug, Clone)]
pub struct Pem {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
}

/// A test mesh's CA, able to issue certificates into `dir`.
pub struct TestCa {
    cert: Certificate,
    key: KeyPair,
    dir: PathBuf,
    /// The CA certificate (PEM): the mesh's root.
    pub root: PathBuf,
}

impl TestCa {
    /// A new CA, its certificate written to `<dir>/root-cert.pem`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "weir test mesh root");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let root = dir.join("root-cert.pem");
        std::fs::write(&root, cert.pem())
            .with_context(|| format!("cannot write {}", root.display()))?;
        Ok(Self {
            cert,
            key,
            dir: dir.to_owned(),
            root,
        })
    }

    fn issue(&self, name: &str, dns: Vec<String>, uri: Option<&str>) -> anyhow::Result<Pem> {
        let mut params = CertificateParams::new(dns)?;
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().context("a URI SAN")?));
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let pem = Pem {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        std::fs::write(&pem.cert, cert.pem())?;
        std::fs::write(&pem.key, key.serialize_pem())?;
        Ok(pem)
    }

    /// The controller's certificate, for its Service's host name (and 127.0.0.1).
    pub fn controller(&self) -> anyhow::Result<Pem> {
        self.issue(
            "controller",
            vec![CONTROLLER_HOST.to_owned(), "127.0.0.1".to_owned()],
            Some("spiffe://cluster.local/ns/weir-system/sa/weir"),
        )
    }

    /// The controller's certificate as Istio issues it: the SPIFFE id
    /// `spiffe://cluster.local/ns/weir-system/sa/weir` and no DNS name, as `<name>.pem`.
    pub fn controller_as_istio_issues_it(&self, name: &str) -> anyhow::Result<Pem> {
        self.issue(
            name,
            Vec::new(),
            Some("spiffe://cluster.local/ns/weir-system/sa/weir"),
        )
    }

    /// A workload's certificate: `spiffe://cluster.local/ns/<namespace>/sa/<account>`.
    pub fn workload(&self, namespace: &str, account: &str) -> anyhow::Result<Pem> {
        self.issue(
            &format!("{namespace}-{account}"),
            Vec::new(),
            Some(&format!(
                "spiffe://cluster.local/ns/{namespace}/sa/{account}"
            )),
        )
    }

    /// A web server's certificate for 127.0.0.1 and localhost (an https webhook, an alert
    /// receiver, a Prometheus), written as `<name>.pem` and `<name>-key.pem`.
    pub fn server(&self, name: &str) -> anyhow::Result<Pem> {
        self.issue(
            name,
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            None,
        )
    }

    /// A certificate from this CA with no SPIFFE id at all.
    pub fn without_identity(&self) -> anyhow::Result<Pem> {
        self.issue("anonymous", vec!["anonymous.example".to_owned()], None)
    }

    /// Local mode over TLS: the controller's files, and Envoy with the workload certificate of
    /// `namespace`'s default service account.
    pub fn local_tls(&self, namespace: &str) -> anyhow::Result<LocalTls> {
        let controller = self.controller()?;
        let envoy = self.workload(namespace, "default")?;
        Ok(LocalTls {
            controller: TlsFiles {
                cert_chain: controller.cert,
                private_key: controller.key,
                client_ca: self.root.clone(),
            },
            envoy_cert: envoy.cert,
            envoy_key: envoy.key,
        })
    }
}
