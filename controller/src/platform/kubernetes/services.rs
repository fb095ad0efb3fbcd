//! The three Services of a canary, as Flagger names them: `<service>` (the apex, what clients
//! address), `<service>-primary` and `<service>-canary` (what the VirtualService routes to).
//!
//! Each carries what Flagger's Kubernetes router writes: the service port (with `appProtocol`),
//! `headless` and `trafficDistribution`, the target's other container ports under
//! `portDiscovery`, the `apex`/`primary`/`canary` labels and annotations of `spec.service`, and
//! the label `<selector key>: <service name>`.
//! Keys listed in `spec.service.unmanagedMetadata` are never written: someone else sets them,
//! and a server-side apply leaves keys it does not write to their owners (Flagger, which
//! replaces the whole map on update, copies them over from the live Service instead).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::spec::{CanaryPlan, ObjectMetadata, PortRef};

/// Name of the Service in front of the primary pods.
pub fn primary_name(plan: &CanaryPlan) -> String {
    format!("{}-primary", plan.service.name)
}

/// Name of the Service in front of the canary (target) pods.
pub fn canary_name(plan: &CanaryPlan) -> String {
    format!("{}-canary", plan.service.name)
}

/// Which of the three Services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `<service>`: what clients address.
    Apex,
    /// `<service>-primary`.
    Primary,
    /// `<service>-canary`.
    Canary,
}

impl Role {
    /// The Service's name.
    pub fn name(self, plan: &CanaryPlan) -> String {
        match self {
            Role::Apex => plan.service.name.clone(),
            Role::Primary => primary_name(plan),
            Role::Canary => canary_name(plan),
        }
    }

    fn metadata(self, plan: &CanaryPlan) -> &ObjectMetadata {
        match self {
            Role::Apex => &plan.service.apex,
            Role::Primary => &plan.service.primary,
            Role::Canary => &plan.service.canary,
        }
    }
}

/// Containers whose ports `portDiscovery` skips: the mesh's proxies (Flagger's list).
const SIDECARS: [&str; 2] = ["istio-proxy", "envoy"];

/// Flagger marks its own bookkeeping keys with this; they are never copied.
const TOOLKIT_MARKER: &str = "toolkit.fluxcd.io";

/// The ports `portDiscovery` adds, by name, as Flagger finds them: every container port of the
/// target's containers but the sidecars', except the one the service port targets; a port
/// without a name is called `tcp-<container>-<index>`.
pub fn discovered_ports(plan: &CanaryPlan, containers: &[Container]) -> BTreeMap<String, i32> {
    let mut ports = BTreeMap::new();
    if !plan.service.port_discovery {
        return ports;
    }
    for container in containers {
        if SIDECARS.contains(&container.name.as_str()) {
            continue;
        }
        for (i, port) in container.ports.iter().flatten().enumerate() {
            let targeted = match &plan.service.target_port {
                PortRef::Number(n) => port.container_port == i32::from(*n),
                PortRef::Name(name) => port.name.as_deref() == Some(name.as_str()),
            };
            if targeted {
                continue;
            }
            let name = port
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| format!("tcp-{}-{i}", container.name));
            ports.insert(name, port.container_port);
        }
    }
    ports
}

/// The `role` Service for `plan`, selecting `selector`. `owner` is set on the primary and
/// canary Services (they go with the Canary) but not on the apex: clients use it, so it must
/// outlive the Canary (after a `revertOnDeletion` it selects the target's pods). `discovered`
/// are the extra ports of [`discovered_ports`].
pub fn service(
    plan: &CanaryPlan,
    role: Role,
    selector: BTreeMap<String, String>,
    owner: Option<OwnerReference>,
    discovered: &BTreeMap<String, i32>,
) -> Service {
    let name = role.name(plan);
    let target_port = match &plan.service.target_port {
        PortRef::Number(n) => IntOrString::Int(i32::from(*n)),
        PortRef::Name(name) => IntOrString::String(name.clone()),
    };
    let mut ports = vec![ServicePort {
        name: Some(plan.service.port_name.clone()),
        port: i32::from(plan.service.port),
        target_port: Some(target_port),
        protocol: Some("TCP".to_owned()),
        app_protocol: plan.service.app_protocol.clone(),
        ..ServicePort::default()
    }];
    ports.extend(discovered.iter().map(|(port_name, number)| ServicePort {
        name: Some(port_name.clone()),
        port: *number,
        target_port: Some(IntOrString::Int(*number)),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }));

    let custom = role.metadata(plan);
    let unmanaged = &plan.service.unmanaged;
    let mut labels: BTreeMap<String, String> = custom.labels.clone();
    // Flagger labels each Service with its selector label set to the Service's own name.
    for key in selector.keys() {
        labels.insert(key.clone(), name.clone());
    }
    labels.insert("app.kubernetes.io/managed-by".to_owned(), "weir".to_owned());
    labels.retain(|k, _| !unmanaged.labels.contains(k));
    let annotations: BTreeMap<String, String> = custom
        .annotations
        .iter()
        .filter(|(k, _)| !k.contains(TOOLKIT_MARKER) && !unmanaged.annotations.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();

    Service {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(plan.namespace.clone()),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            // Set only when asked: a Service's cluster IP cannot change once assigned, so a
            // Service that exists with one refuses it (the API server's error then says so).
            cluster_ip: plan.service.headless.then(|| "None".to_owned()),
            selector: Some(selector),
            ports: Some(ports),
            traffic_distribution: plan.service.traffic_distribution.clone(),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}
