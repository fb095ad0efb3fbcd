//! ConfigMaps and Secrets a target's pods use, tracked as Flagger does: their contents are part of
//! the target's revision (a changed ConfigMap is a new version, analysed like a new image), and a
//! promotion copies each one to `<name>-primary` and points the primary's pods at the copies, so
//! the primary keeps the configuration that was analysed while the target's changes.
//!
//! References are found where a pod spec can name them: volumes (`configMap`, `secret`,
//! `projected` sources), and `envFrom` / `env[].valueFrom` of containers and init containers.
//!
//! Changes are picked up at the Canary's next step (every reconcile recomputes the revision, at
//! least once per analysis interval), not through a watch: a watch on every Secret of the cluster
//! would keep all of their data in the controller's memory.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde_json::Value;

use super::deployments::PRIMARY_SUFFIX;

/// Which kind of object a reference names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConfigKind {
    /// A ConfigMap.
    ConfigMap,
    /// A Secret.
    Secret,
}

/// A ConfigMap or Secret named by a pod template.
pub type ConfigRef = (ConfigKind, String);

/// The value at `path` under `v`, without creating anything on the way (indexing a `Value`
/// mutably would insert every missing key).
fn at<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, key| v.get_mut(*key))
}

fn items<'a>(v: &'a mut Value, key: &str) -> impl Iterator<Item = &'a mut Value> {
    v.get_mut(key)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

/// Calls `f` on every string in `pod_spec` that names a ConfigMap or Secret.
fn visit(pod_spec: &mut Value, f: &mut dyn FnMut(ConfigKind, &mut Value)) {
    use ConfigKind::{ConfigMap, Secret};
    let mut name = |kind, v: Option<&mut Value>| {
        if let Some(v) = v.filter(|v| v.is_string()) {
            f(kind, v)
        }
    };
    for volume in items(pod_spec, "volumes") {
        name(ConfigMap, at(volume, &["configMap", "name"]));
        name(Secret, at(volume, &["secret", "secretName"]));
        if let Some(projected) = volume.get_mut("projected") {
            for source in items(projected, "sources") {
                name(ConfigMap, at(source, &["configMap", "name"]));
                name(Secret, at(source, &["secret", "name"]));
            }
        }
    }
    for list in ["containers", "initContainers"] {
        for container in items(pod_spec, list) {
            for from in items(container, "envFrom") {
                name(ConfigMap, at(from, &["configMapRef", "name"]));
                name(Secret, at(from, &["secretRef", "name"]));
            }
            for env in items(container, "env") {
                name(
                    ConfigMap,
                    at(env, &["valueFrom", "configMapKeyRef", "name"]),
                );
                name(Secret, at(env, &["valueFrom", "secretKeyRef", "name"]));
            }
        }
    }
}

fn pod_spec(template: &PodTemplateSpec) -> Value {
    template
        .spec
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Value::Null)
}

/// The ConfigMaps and Secrets `template` uses.
pub fn references(template: &PodTemplateSpec) -> BTreeSet<ConfigRef> {
    let mut spec = pod_spec(template);
    let mut found = BTreeSet::new();
    visit(&mut spec, &mut |kind, v| {
        if let Some(name) = v.as_str() {
            found.insert((kind, name.to_owned()));
        }
    });
    found
}

/// `template` with every ConfigMap and Secret reference renamed to its primary copy.
pub fn to_primary(template: &PodTemplateSpec) -> PodTemplateSpec {
    let mut spec = pod_spec(template);
    if spec.is_null() {
        return template.clone();
    }
    visit(&mut spec, &mut |_, v| {
        if let Some(name) = v.as_str() {
            *v = Value::String(format!("{name}{PRIMARY_SUFFIX}"));
        }
    });
    PodTemplateSpec {
        metadata: template.metadata.clone(),
        spec: serde_json::from_value(spec)
            .ok()
            .or_else(|| template.spec.clone()),
    }
}

fn fnv(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The revision of a template together with the contents of the configuration it uses (`None`:
/// the object does not exist). Without references it is the template's own revision, so adding
/// this tracking changed no existing revision.
pub fn revision(template: &PodTemplateSpec, configs: &[(ConfigRef, Option<Value>)]) -> String {
    let own = super::deployments::revision(template);
    if configs.is_empty() {
        return own;
    }
    let mut text = own;
    for ((kind, name), content) in configs {
        let content = content
            .as_ref()
            .map_or_else(|| "absent".to_owned(), Value::to_string);
        text.push_str(&format!("\n{kind:?}/{name}={content}"));
    }
    format!("{:016x}", fnv(&text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template() -> PodTemplateSpec {
        serde_json::from_value(json!({
            "metadata": {"labels": {"app": "mhs"}},
            "spec": {
                "volumes": [
                    {"name": "config", "configMap": {"name": "mhs-config"}},
                    {"name": "tls", "secret": {"secretName": "mhs-tls"}},
                    {"name": "all", "projected": {"sources": [
                        {"configMap": {"name": "shared"}}, {"secret": {"name": "token"}},
                        {"downwardAPI": {"items": []}}]}},
                    {"name": "scratch", "emptyDir": {}},
                ],
                "initContainers": [{"name": "init", "image": "busybox",
                    "envFrom": [{"secretRef": {"name": "init-env"}}]}],
                "containers": [{"name": "mhs", "image": "mhs:1",
                    "envFrom": [{"configMapRef": {"name": "mhs-env"}}],
                    "env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "api", "key": "k"}}},
                            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "modes", "key": "m"}}},
                            {"name": "PLAIN", "value": "x"}]}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn every_place_a_pod_names_a_config_map_or_secret_is_found() {
        let refs = references(&template());
        let want: BTreeSet<ConfigRef> = [
            (ConfigKind::ConfigMap, "mhs-config"),
            (ConfigKind::ConfigMap, "shared"),
            (ConfigKind::ConfigMap, "mhs-env"),
            (ConfigKind::ConfigMap, "modes"),
            (ConfigKind::Secret, "mhs-tls"),
            (ConfigKind::Secret, "token"),
            (ConfigKind::Secret, "init-env"),
            (ConfigKind::Secret, "api"),
        ]
        .into_iter()
        .map(|(k, n)| (k, n.to_owned()))
        .collect();
        assert_eq!(refs, want);
    }

    #[test]
    fn the_primary_template_names_the_primary_copies() {
        let primary = to_primary(&template());
        let names: BTreeSet<String> = references(&primary).into_iter().map(|(_, n)| n).collect();
        assert!(names.iter().all(|n| n.ends_with("-primary")), "{names:?}");
        assert_eq!(names.len(), 8);
        let spec = serde_json::to_value(primary.spec.unwrap()).unwrap();
        assert_eq!(
            spec["volumes"][3],
            json!({"name": "scratch", "emptyDir": {}})
        );
        assert_eq!(spec["containers"][0]["env"][2]["value"], "x");
    }

    #[test]
    fn the_revision_follows_the_configuration_contents() {
        let t = template();
        let refs: Vec<ConfigRef> = references(&t).into_iter().collect();
        let with = |v: &str| -> Vec<(ConfigRef, Option<Value>)> {
            refs.iter()
                .map(|r| (r.clone(), Some(json!({"data": {"k": v}}))))
                .collect()
        };
        assert_eq!(revision(&t, &with("a")), revision(&t, &with("a")));
        assert_ne!(revision(&t, &with("a")), revision(&t, &with("b")));
        let mut missing = with("a");
        missing[0].1 = None;
        assert_ne!(revision(&t, &with("a")), revision(&t, &missing));
        assert_eq!(revision(&t, &[]), super::super::deployments::revision(&t));
    }
}
