//! MetricTemplates from the cluster into the Prometheus source's [`Templates`]: a watcher keeps
//! them current (and the credentials of each template's `secretRef`), so a Canary's
//! `templateRef` checks run the template as it is now.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};

use crate::metrics::prometheus::Credentials;
use crate::metrics::template::Templates;

use super::crd::MetricTemplateResource;

/// Stores one template (with its credentials); a template that cannot be used is left out, and
/// the reason logged: a check naming it then says the template is missing.
pub async fn store(client: &Client, templates: &Templates, object: &MetricTemplateResource) {
    let namespace = object.namespace().unwrap_or_default();
    let (plan, warnings) = match object.to_spec_template().compile(&namespace) {
        Ok(compiled) => compiled,
        Err(e) => {
            tracing::warn!(error = %e, "MetricTemplate left out");
            templates.remove(&namespace, &object.name_any());
            return;
        }
    };
    for warning in warnings {
        tracing::warn!(template = %plan.id(), %warning, "MetricTemplate");
    }
    let credentials = match &plan.provider.secret_ref {
        None => None,
        Some(secret) => match credentials(client, &namespace, secret).await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(template = %plan.id(), error = %e, "MetricTemplate left out");
                templates.remove(&namespace, &object.name_any());
                return;
            }
        },
    };
    templates.upsert(plan, credentials);
}

async fn credentials(client: &Client, namespace: &str, name: &str) -> Result<Credentials, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get(name)
        .await
        .map_err(|e| format!("cannot read Secret {namespace}/{name}: {e}"))?;
    let data: BTreeMap<String, Vec<u8>> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    Credentials::from_secret_data(&data).map_err(|e| format!("Secret {namespace}/{name}: {e}"))
}

/// Keeps `templates` in step with the MetricTemplates of `namespace` (all when `None`) until the
/// watch ends. After a (re)list, templates deleted meanwhile are dropped.
pub async fn watch(client: Client, namespace: Option<String>, templates: Templates) {
    let api: Api<MetricTemplateResource> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut known: BTreeSet<(String, String)> = BTreeSet::new();
    let mut listed: BTreeSet<(String, String)> = BTreeSet::new();
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let key = |o: &MetricTemplateResource| (o.namespace().unwrap_or_default(), o.name_any());
        match event {
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitApply(o)) => {
                listed.insert(key(&o));
                store(&client, &templates, &o).await;
            }
            Ok(watcher::Event::InitDone) => {
                for (ns, name) in known.difference(&listed) {
                    templates.remove(ns, name);
                }
                known = std::mem::take(&mut listed);
            }
            Ok(watcher::Event::Apply(o)) => {
                known.insert(key(&o));
                store(&client, &templates, &o).await;
            }
            Ok(watcher::Event::Delete(o)) => {
                let (ns, name) = key(&o);
                templates.remove(&ns, &name);
                known.remove(&(ns, name));
            }
            Err(e) => tracing::warn!(error = %e, "watching MetricTemplates"),
        }
    }
}
