//! The current directive, its fan-out to every connected Envoy, and which generation each one
//! says it runs.
//!
//! A `tokio::sync::watch` holds the directive: each stream task waits on it next to its inbound
//! reports, and since directives are complete (not patches) a stream that misses an intermediate
//! generation loses nothing by receiving only the newest. The directive is encoded once, when it
//! is published: every stream sends the same bytes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use weir_proto::codec::Encoded;
use weir_proto::v1::controller_message::Kind;
use weir_proto::v1::{CanaryRoute, ControllerMessage, Directive};
use weir_proto::FULL_WEIGHT_BP;

use super::counters::lock;
use super::validate::is_canary_key;

/// Why a directive was not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// A route's key is not `namespace/name`.
    #[error("canary route key {0:?} is not a `namespace/name` key")]
    BadKey(String),
    /// Two routes share a key.
    #[error("canary {0:?} appears twice in the directive; each canary needs exactly one route")]
    DuplicateKey(String),
    /// A relay's directives are the leader's; it publishes none of its own.
    #[error("this replica is a relay: only the leader publishes directives")]
    Relay,
    /// A weight above 100%.
    #[error("canary {key:?} has weight {weight_bp} basis points; the maximum is {FULL_WEIGHT_BP} (100%)")]
    WeightOutOfRange {
        /// The canary.
        key: String,
        /// The weight asked for.
        weight_bp: u32,
    },
}

/// How many connected Envoys run a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmation {
    /// Connected Envoys whose latest report says they applied the generation (or a later one).
    pub confirmed: usize,
    /// Envoys with an open stream.
    pub connected: usize,
}

impl Confirmation {
    /// True when every connected Envoy confirmed (vacuously true with none connected).
    pub fn all(&self) -> bool {
        self.confirmed == self.connected
    }
}

/// The directive in force and its encoded `ControllerMessage`, shared by every stream.
#[derive(Debug, Clone)]
pub(crate) struct Published {
    pub(crate) directive: Arc<Directive>,
    pub(crate) encoded: Encoded,
}

impl Published {
    fn new(directive: Directive) -> Self {
        let encoded = Encoded::of(&ControllerMessage {
            kind: Some(Kind::Directive(directive.clone())),
        });
        Self {
            directive: Arc::new(directive),
            encoded,
        }
    }
}

#[derive(Debug)]
struct Connected {
    stream: u64,
    applied_generation: u64,
}

/// Holds the directive and the connected set.
#[derive(Debug)]
pub(crate) struct Publisher {
    current: watch::Sender<Published>,
    /// Serializes publishes so generations go out in order.
    publishing: Mutex<()>,
    /// Keyed by node id: one Envoy counts once even while a dead stream of it lingers.
    connected: Mutex<HashMap<Arc<str>, Connected>>,
    next_stream: AtomicU64,
}

impl Publisher {
    pub(crate) fn new(initial_generation: u64) -> Self {
        let (current, _) = watch::channel(Published::new(Directive {
            generation: initial_generation,
            canaries: Vec::new(),
        }));
        Self {
            current,
            publishing: Mutex::new(()),
            connected: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
        }
    }

    pub(crate) fn current(&self) -> Arc<Directive> {
        self.current.borrow().directive.clone()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.current.borrow().directive.generation
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Published> {
        self.current.subscribe()
    }

    /// Checks routes before they become a directive.
    pub(crate) fn check(canaries: &[CanaryRoute]) -> Result<(), PublishError> {
        let mut seen = HashSet::new();
        for route in canaries {
            if !is_canary_key(&route.key) {
                return Err(PublishError::BadKey(route.key.clone()));
            }
            if !seen.insert(route.key.as_str()) {
                return Err(PublishError::DuplicateKey(route.key.clone()));
            }
            if route.canary_weight_bp > FULL_WEIGHT_BP {
                return Err(PublishError::WeightOutOfRange {
                    key: route.key.clone(),
                    weight_bp: route.canary_weight_bp,
                });
            }
        }
        Ok(())
    }

    /// Publishes `canaries` (already checked) under the next generation. `before_send` runs under
    /// the publish lock just before the directive becomes visible, so the caller can start
    /// accepting reports for new canaries before any Envoy can route them.
    pub(crate) fn publish(
        &self,
        canaries: Vec<CanaryRoute>,
        before_send: impl FnOnce(&[CanaryRoute]),
    ) -> u64 {
        let _serial = lock(&self.publishing);
        let generation = self.generation().saturating_add(1);
        before_send(&canaries);
        self.current.send_replace(Published::new(Directive {
            generation,
            canaries,
        }));
        generation
    }

    /// Makes `directive` (a leader's, on a relay) the one in force, generation and all, unless it
    /// is already; true if it was new.
    pub(crate) fn republish(
        &self,
        directive: Directive,
        before_send: impl FnOnce(&[CanaryRoute]),
    ) -> bool {
        let _serial = lock(&self.publishing);
        if directive.generation == self.generation() {
            return false;
        }
        before_send(&directive.canaries);
        self.current.send_replace(Published::new(directive));
        true
    }

    /// Registers a stream for `node`; returns its stream id.
    pub(crate) fn connect(&self, node: Arc<str>, applied_generation: u64) -> u64 {
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        lock(&self.connected).insert(
            node,
            Connected {
                stream,
                applied_generation,
            },
        );
        stream
    }

    /// Records the generation a stream's latest report echoed.
    pub(crate) fn applied(&self, node: &str, stream: u64, applied_generation: u64) {
        if let Some(entry) = lock(&self.connected).get_mut(node) {
            if entry.stream == stream {
                entry.applied_generation = applied_generation;
            }
        }
    }

    /// Removes a stream, unless a newer stream of the same Envoy replaced it.
    pub(crate) fn disconnect(&self, node: &str, stream: u64) {
        let mut connected = lock(&self.connected);
        if connected
            .get(node)
            .is_some_and(|entry| entry.stream == stream)
        {
            connected.remove(node);
        }
    }

    /// Counts connected Envoys running `generation` or later. Later means up to the current
    /// generation: a larger number is left over from another controller life and proves nothing.
    pub(crate) fn confirmed(&self, generation: u64) -> Confirmation {
        let current = self.generation();
        let connected = lock(&self.connected);
        Confirmation {
            confirmed: connected
                .values()
                .filter(|entry| (generation..=current).contains(&entry.applied_generation))
                .count(),
            connected: connected.len(),
        }
    }

    #[cfg(test)]
    pub(crate) fn is_connected(&self, node: &str) -> bool {
        lock(&self.connected).contains_key(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(key: &str, weight_bp: u32) -> CanaryRoute {
        CanaryRoute {
            key: key.into(),
            canary_weight_bp: weight_bp,
            ..Default::default()
        }
    }

    #[test]
    fn routes_with_bad_keys_duplicates_or_weights_are_refused() {
        assert_eq!(
            Publisher::check(&[route("shop/web", 500), route("shop/api", 10_000)]),
            Ok(())
        );
        assert_eq!(
            Publisher::check(&[route("web", 0)]),
            Err(PublishError::BadKey("web".into()))
        );
        assert_eq!(
            Publisher::check(&[route("shop/web", 0), route("shop/web", 1)]),
            Err(PublishError::DuplicateKey("shop/web".into()))
        );
        assert!(matches!(
            Publisher::check(&[route("shop/web", 10_001)]),
            Err(PublishError::WeightOutOfRange {
                weight_bp: 10_001,
                ..
            })
        ));
    }

    #[test]
    fn confirmation_counts_envoys_between_the_generation_and_the_current_one() {
        let publisher = Publisher::new(100);
        let g1 = publisher.publish(vec![route("shop/web", 100)], |_| {});
        let g2 = publisher.publish(vec![route("shop/web", 200)], |_| {});
        assert_eq!((g1, g2), (101, 102));
        let a = publisher.connect(Arc::from("a"), 100);
        let b = publisher.connect(Arc::from("b"), 5_000);
        assert_eq!(
            publisher.confirmed(g1),
            Confirmation {
                confirmed: 0,
                connected: 2
            }
        );
        publisher.applied("a", a, g1);
        assert_eq!(
            publisher.confirmed(g1),
            Confirmation {
                confirmed: 1,
                connected: 2
            }
        );
        assert_eq!(
            publisher.confirmed(g2),
            Confirmation {
                confirmed: 0,
                connected: 2
            }
        );
        publisher.applied("b", b, g2);
        assert_eq!(
            publisher.confirmed(g1),
            Confirmation {
                confirmed: 2,
                connected: 2
            }
        );
        publisher.disconnect("a", a);
        assert!(publisher.confirmed(g2).all());
    }

    #[test]
    fn a_replaced_stream_does_not_disconnect_its_successor() {
        let publisher = Publisher::new(1);
        let old = publisher.connect(Arc::from("a"), 1);
        let new = publisher.connect(Arc::from("a"), 1);
        publisher.applied("a", old, 7);
        publisher.disconnect("a", old);
        assert!(publisher.is_connected("a"));
        assert_eq!(publisher.confirmed(1).connected, 1);
        publisher.disconnect("a", new);
        assert!(!publisher.is_connected("a"));
    }
}
