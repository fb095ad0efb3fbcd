//! The three Services of a canary, as Flagger names them: `<service>` (the apex, what clients
//! address), `<service>-primary` and `<service>-canary` (what the VirtualService routes to).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::spec::{CanaryPlan, PortRef};

/// Name of the Service in front of the primary pods.
pub fn primary_name(plan: &CanaryPlan) -> String {
    format!("{}-primary", plan.service.name)
}

/// Name of the Service in front of the canary (target) pods.
pub fn canary_name(plan: &CanaryPlan) -> String {
    format!("{}-canary", plan.service.name)
}

/// A ClusterIP Service for `plan`'s port selecting `selector`. `owner` is set on the primary and
/// canary Services (they go with the Canary) but not on the apex: clients use it, so it must
/// outlive the Canary (after a `revertOnDeletion` it selects the target's pods).
pub fn service(
    plan: &CanaryPlan,
    name: String,
    selector: BTreeMap<String, String>,
    owner: Option<OwnerReference>,
) -> Service {
    let target_port = match &plan.service.target_port {
        PortRef::Number(n) => IntOrString::Int(i32::from(*n)),
        PortRef::Name(name) => IntOrString::String(name.clone()),
    };
    Service {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(plan.namespace.clone()),
            labels: Some([("app.kubernetes.io/managed-by".to_owned(), "weir".to_owned())].into()),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some(plan.service.port_name.clone()),
                port: i32::from(plan.service.port),
                target_port: Some(target_port),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}
