//! Where workloads run: the platform seam.
//!
//! The analysis engine decides; a [`Platform`] carries out what concerns the workloads (create the
//! primary, copy the template on promotion, scale the canary) and answers what the engine needs to
//! know (the target's revision, readiness). Traffic is not the platform's job: weights go to the
//! filters as directives (see `crate::ingest`).
//!
//! - [`local`]: workloads are processes on 127.0.0.1 behind a real Envoy (local mode, the demo).
//! - `kubernetes` (later): Deployments, Services and Istio routes.

pub mod kubernetes;
pub mod local;

use std::future::Future;

/// Identifies a canary: `namespace/name`, and the target workload it rolls out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CanaryRef {
    /// The Canary's namespace.
    pub namespace: String,
    /// The Canary's name.
    pub name: String,
    /// The target workload's name (`spec.targetRef.name`).
    pub target: String,
}

impl CanaryRef {
    /// The stable key used on the wire and in windows: `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Whether the two workloads can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// The primary serves; otherwise why not.
    pub primary: Result<(), String>,
    /// The canary serves; otherwise why not (e.g. scaled to zero, still starting).
    pub canary: Result<(), String>,
}

/// A platform operation that failed. The message says what and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The target workload does not exist.
    #[error("target workload `{target}` not found: {hint}")]
    TargetNotFound {
        /// Its name.
        target: String,
        /// Where it was looked for and how to create it.
        hint: String,
    },
    /// The target's definition cannot be used.
    #[error("target workload `{target}` is invalid: {reason}")]
    InvalidTarget {
        /// Its name.
        target: String,
        /// What is wrong.
        reason: String,
    },
    /// Starting, stopping or probing a workload failed.
    #[error("{action} for `{target}` failed: {reason}")]
    Operation {
        /// What was attempted.
        action: String,
        /// The workload.
        target: String,
        /// Why it failed.
        reason: String,
    },
}

/// Where workloads run. One implementation per platform, one file (or folder) each.
pub trait Platform: Send + Sync {
    /// The revision (a hash of the template) of the target workload as the user last defined it.
    fn target_revision(
        &self,
        canary: &CanaryRef,
    ) -> impl Future<Output = Result<String, PlatformError>> + Send;

    /// The revision the primary workload already runs, if there is one (it outlived an earlier
    /// Canary for the same target). Asked before the first step only.
    fn primary_revision(
        &self,
        _canary: &CanaryRef,
    ) -> impl Future<Output = Result<Option<String>, PlatformError>> + Send {
        // Local mode: the primary's processes never outlive the controller's state folder.
        async { Ok(None) }
    }

    /// Makes the primary run the target's current template (initialization and promotion), and
    /// returns once it serves or fails.
    fn promote_to_primary(
        &self,
        canary: &CanaryRef,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;

    /// Runs (`up`) or stops the canary workload with the target's current template.
    fn scale_canary(
        &self,
        canary: &CanaryRef,
        up: bool,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;

    /// Whether primary and canary serve.
    fn readiness(&self, canary: &CanaryRef) -> impl Future<Output = Readiness> + Send;

    /// Platform routing that accompanies a directive (called after each route change, and on
    /// start). The weight itself travels to the filters as a directive; a platform may need
    /// routes that send the routing header's values to the right backends, or (Kubernetes, when
    /// no filter reports) a weighted fallback. `None`: the canary is no longer routed.
    fn apply_route(
        &self,
        _canary: &CanaryRef,
        _route: Option<crate::analysis::Route>,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send {
        // Local mode: Envoy's routes are static (by header), nothing to do.
        async { Ok(()) }
    }
}
