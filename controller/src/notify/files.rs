//! Local mode's AlertProviders: YAML files in the Canary's folder, as for MetricTemplates. Any
//! `.yaml`/`.yml` file there may hold `kind: AlertProvider` documents (and the `kind: Secret`
//! manifests their `secretRef`s name); the folder is read again at each alert, so an edited
//! provider is used from the next alert on, without a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{BoxFuture, ProviderSource};
use crate::spec::{AlertPlan, AlertProvider, AlertProviderPlan, CanaryPlan, ResolvedProvider};

/// The providers in one folder.
#[derive(Debug, Clone)]
pub struct DirProviders {
    dir: PathBuf,
    default_namespace: String,
}

/// What one read of the folder found.
#[derive(Debug, Default)]
struct Found {
    providers: BTreeMap<String, Result<AlertProviderPlan, String>>,
    secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    warnings: Vec<String>,
}

impl DirProviders {
    /// The providers in `dir`; those without a namespace are in `default_namespace` (the
    /// Canary's).
    pub fn new(dir: &Path, default_namespace: &str) -> Self {
        Self {
            dir: dir.to_owned(),
            default_namespace: default_namespace.to_owned(),
        }
    }

    fn read(&self) -> Found {
        let mut found = Found::default();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.is_file()
                            && matches!(
                                p.extension().and_then(|e| e.to_str()),
                                Some("yaml" | "yml")
                            )
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            for document in serde_yaml::Deserializer::from_str(&text) {
                let Ok(value) = serde_yaml::Value::deserialize(document) else {
                    // Another tool's file: providers are found by kind.
                    break;
                };
                let meta = |key: &str| {
                    value
                        .get("metadata")
                        .and_then(|m| m.get(key))
                        .and_then(serde_yaml::Value::as_str)
                        .map(str::to_owned)
                };
                let key = format!(
                    "{}/{}",
                    meta("namespace").unwrap_or_else(|| self.default_namespace.clone()),
                    meta("name").unwrap_or_default()
                );
                match value.get("kind").and_then(serde_yaml::Value::as_str) {
                    Some("AlertProvider") => {
                        let plan = serde_yaml::from_value::<AlertProvider>(value)
                            .map_err(|e| {
                                format!(
                                    "{}: an AlertProvider that cannot be read: {e}",
                                    file.display()
                                )
                            })
                            .and_then(|p| {
                                p.compile(&self.default_namespace)
                                    .map_err(|e| format!("{}: {e}", file.display()))
                            })
                            .map(|(plan, warnings)| {
                                found.warnings.extend(warnings.into_iter().map(|w| {
                                    format!("{} (AlertProvider {}): {w}", file.display(), plan.id())
                                }));
                                plan
                            });
                        found.providers.insert(key, plan);
                    }
                    Some("Secret") => {
                        if let Ok(data) = crate::metrics::template::secret_data(&value) {
                            found.secrets.insert(key, data);
                        }
                    }
                    _ => {}
                }
            }
        }
        found
    }

    fn lookup(
        &self,
        found: &Found,
        namespace: &str,
        name: &str,
    ) -> Result<ResolvedProvider, String> {
        let id = format!("{namespace}/{name}");
        let plan = found.providers.get(&id).ok_or_else(|| {
            format!(
                "AlertProvider {id} not found: write it (kind: AlertProvider) into a YAML file in {}",
                self.dir.display()
            )
        })?;
        let plan = plan.as_ref().map_err(Clone::clone)?;
        let secret = plan
            .secret_ref
            .as_ref()
            .and_then(|s| found.secrets.get(&format!("{}/{s}", plan.namespace)));
        plan.resolve(secret).map_err(|e| {
            if plan.secret_ref.is_some() && secret.is_none() {
                format!(
                    "{e}: write the Secret manifest into a YAML file in {}",
                    self.dir.display()
                )
            } else {
                e
            }
        })
    }

    /// Checks that every alert of `plan` names a usable provider here; the warnings (unknown
    /// keys) of those it names, or every problem.
    pub fn check_plan(&self, plan: &CanaryPlan) -> Result<Vec<String>, String> {
        let found = self.read();
        let problems: Vec<String> = plan
            .analysis
            .alerts
            .iter()
            .enumerate()
            .filter_map(|(i, alert): (usize, &AlertPlan)| {
                self.lookup(&found, &alert.provider_namespace, &alert.provider_name)
                    .err()
                    .map(|e| format!("spec.analysis.alerts[{i}] ({}): {e}", alert.name))
            })
            .collect();
        if problems.is_empty() {
            Ok(found.warnings)
        } else {
            Err(problems.join("; "))
        }
    }
}

impl ProviderSource for DirProviders {
    fn resolve<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<ResolvedProvider, String>> {
        Box::pin(async move {
            let this = self.clone();
            let (namespace, name) = (namespace.to_owned(), name.to_owned());
            // Reading files blocks: off the runtime's threads.
            tokio::task::spawn_blocking(move || {
                let found = this.read();
                this.lookup(&found, &namespace, &name)
            })
            .await
            .unwrap_or_else(|e| Err(format!("reading the AlertProviders failed: {e}")))
        })
    }
}
