//! One acting Weir filter per Envoy, however many times it is installed.
//!
//! The filter can end up twice in the same filter chain: a WasmPlugin for a labelled namespace
//! beside the mesh-wide one for labelled Pods, or a WasmPlugin beside the EnvoyFilter alternative.
//! Two instances would each split and each count every request. So each instance (each plugin
//! configuration, known by its name) keeps a heartbeat in a shared list, and only the fresh
//! instance whose name sorts first acts; the others pass requests through untouched (not even
//! stripping the routing header, which the acting one may have set already). When the acting
//! one goes away, the next takes over within [`STALE_AFTER_TICKS`] ticks.
//!
//! The list is tiny (one entry per installed instance), read and written once per tick per root
//! context with compare-and-swap, and never on the request path.

use crate::ownership::SharedData;

/// Shared-data key of the list.
pub const INSTANCES_KEY: &str = "weir.instances";
/// An entry not renewed for this many of its own ticks is gone.
pub const STALE_AFTER_TICKS: u64 = 4;
/// Entries kept at most (anything beyond is not a real installation).
const MAX_INSTANCES: usize = 16;
/// Longest plugin name kept.
const MAX_NAME: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    heartbeat_ns: u64,
}

fn decode(bytes: &[u8]) -> Vec<Entry> {
    // Lines of `<heartbeat> <name>`: small, and readable in a debugger.
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|line| {
            let (beat, name) = line.split_once(' ')?;
            if name.is_empty() {
                return None;
            }
            Some(Entry {
                name: name.to_string(),
                heartbeat_ns: beat.parse().ok()?,
            })
        })
        .take(MAX_INSTANCES)
        .collect()
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    entries
        .iter()
        .map(|e| format!("{} {}\n", e.heartbeat_ns, e.name))
        .collect::<String>()
        .into_bytes()
}

/// Renews this instance's heartbeat and says whether it should act (true) or pass requests
/// through (false). `tick_ns` is the caller's tick period; on a shared-data failure the answer
/// is "act", so that the filter never silently stops working.
pub fn renew(shared: &mut impl SharedData, name: &str, now_ns: u64, tick_ns: u64) -> bool {
    let name: String = name.chars().take(MAX_NAME).collect();
    let stale_after = tick_ns.saturating_mul(STALE_AFTER_TICKS);
    for _ in 0..3 {
        let (mut entries, cas) = match shared.get(INSTANCES_KEY) {
            Some((bytes, cas)) => (decode(&bytes), Some(cas)),
            None => (Vec::new(), None),
        };
        entries.retain(|e| e.name == name || now_ns.saturating_sub(e.heartbeat_ns) <= stale_after);
        if let Some(entry) = entries.iter_mut().find(|e| e.name == name) {
            entry.heartbeat_ns = entry.heartbeat_ns.max(now_ns);
        } else if entries.len() < MAX_INSTANCES {
            entries.push(Entry {
                name: name.clone(),
                heartbeat_ns: now_ns,
            });
        } else {
            return true;
        }
        if shared.set(INSTANCES_KEY, &encode(&entries), cas).is_ok() {
            return entries.iter().map(|e| &e.name).min() == Some(&name);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::ownership::Refused;

    #[derive(Default)]
    struct Host {
        data: HashMap<String, (Vec<u8>, u32)>,
        next: u32,
    }

    impl SharedData for Host {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.data.get(key).cloned()
        }
        fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Refused> {
            if let (Some((_, stamp)), Some(cas)) = (self.data.get(key), cas) {
                if *stamp != cas {
                    return Err(Refused);
                }
            }
            self.next += 1;
            self.data.insert(key.into(), (value.to_vec(), self.next));
            Ok(())
        }
    }

    const TICK: u64 = 250_000_000;

    #[test]
    fn a_single_instance_acts() {
        let mut host = Host::default();
        assert!(renew(&mut host, "istio-system.weir", 0, TICK));
        assert!(renew(&mut host, "istio-system.weir", TICK, TICK));
    }

    #[test]
    fn of_two_instances_in_one_envoy_only_the_first_by_name_acts() {
        let mut host = Host::default();
        assert!(renew(&mut host, "istio-system.weir", 0, TICK));
        assert!(!renew(&mut host, "istio-system.weir-envoyfilter", 0, TICK));
        assert!(renew(&mut host, "istio-system.weir", TICK, TICK));
        // An instance that sorts first takes over at once; the previous one stands down.
        assert!(renew(&mut host, "application.weir", TICK, TICK));
        assert!(!renew(&mut host, "istio-system.weir", 2 * TICK, TICK));
    }

    #[test]
    fn when_the_acting_instance_goes_away_the_next_one_takes_over() {
        let mut host = Host::default();
        assert!(renew(&mut host, "a.weir", 0, TICK));
        assert!(!renew(&mut host, "b.weir", 0, TICK));
        let mut now = 0;
        let mut ticks = 0;
        while !renew(&mut host, "b.weir", now, TICK) {
            now += TICK;
            ticks += 1;
            assert!(ticks <= STALE_AFTER_TICKS + 1, "never took over");
        }
        assert!(ticks >= STALE_AFTER_TICKS, "took over from a live instance");
    }

    #[test]
    fn a_garbage_list_does_not_stop_the_filter() {
        let mut host = Host::default();
        host.set(INSTANCES_KEY, b"\xff\xfe nonsense\n12 \n", None)
            .unwrap();
        assert!(renew(&mut host, "istio-system.weir", 0, TICK));
    }
}
