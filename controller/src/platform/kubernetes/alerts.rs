//! AlertProviders from the cluster for the [`Notifier`](crate::notify::Notifier): read when an
//! alert is sent (as Flagger does from its informer), with the Secret a provider's `secretRef`
//! names, so an edited provider or a rotated webhook URL is used from the next alert on.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::crd::AlertProviderResource;
use crate::notify::{BoxFuture, ProviderSource};
use crate::spec::ResolvedProvider;

/// Looks AlertProviders (`weir.dev/v1alpha1`) and their Secrets up through `client`.
#[derive(Clone)]
pub struct ClusterProviders {
    client: Client,
}

impl ClusterProviders {
    /// Providers read through `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    async fn lookup(&self, namespace: &str, name: &str) -> Result<ResolvedProvider, String> {
        let id = format!("{namespace}/{name}");
        let providers: Api<AlertProviderResource> = Api::namespaced(self.client.clone(), namespace);
        let resource = providers
            .get_opt(name)
            .await
            .map_err(|e| format!("cannot read AlertProvider {id}: {e}"))?
            .ok_or_else(|| {
                format!("AlertProvider {id} not found; create it in namespace {namespace}")
            })?;
        let (plan, warnings) = resource
            .to_spec_provider()
            .compile(namespace)
            .map_err(|e| e.to_string())?;
        for warning in warnings {
            tracing::warn!(provider = %id, %warning, "AlertProvider");
        }
        let secret = match &plan.secret_ref {
            None => None,
            Some(secret) => {
                let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
                secrets
                    .get_opt(secret)
                    .await
                    .map_err(|e| format!("cannot read Secret {namespace}/{secret}: {e}"))?
                    .map(|s| {
                        s.data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.0))
                            .collect::<BTreeMap<String, Vec<u8>>>()
                    })
            }
        };
        plan.resolve(secret.as_ref())
    }
}

impl ProviderSource for ClusterProviders {
    fn resolve<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<ResolvedProvider, String>> {
        Box::pin(self.lookup(namespace, name))
    }
}
