//! Selectors: which endpoint serves the next call.

use crate::sync::Lock;
use std::{
    collections::HashMap,
    fmt,
    hash::{Hash, Hasher},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::discovery::Endpoint;

/// One endpoint a selector may pick, with what the client knows about it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The endpoint.
    pub endpoint: &'a Endpoint,
    /// The QUIC connection's smoothed round-trip time, once connected.
    pub rtt: Option<Duration>,
}

/// What the call looks like, for selectors that route by content.
#[derive(Debug, Clone, Copy)]
pub struct SelectInfo<'a> {
    /// Service path.
    pub service_path: &'a str,
    /// Method.
    pub service_method: &'a str,
    /// The encoded arguments.
    pub args: &'a [u8],
    /// A routing key the caller chose ([`CallOptions::route_key`](crate::CallOptions::route_key),
    /// never sent on the wire), which [`ConsistentHash`] prefers over path/method/args.
    pub key: Option<&'a str>,
}

/// Picks one of the candidates for a call. Implement it to plug in your own policy
/// ([`SelectMode::Custom`]).
pub trait Selector: Send + Sync + fmt::Debug {
    /// Returns the index of the chosen candidate. `candidates` is never empty.
    fn select(&self, candidates: &[Candidate<'_>], info: &SelectInfo<'_>) -> usize;
}

/// rpcx's select modes.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum SelectMode {
    /// Uniformly at random.
    #[default]
    RandomSelect,
    /// Each endpoint in turn.
    RoundRobin,
    /// Smooth weighted round robin (nginx's): endpoint weights decide the share, picks are
    /// spread evenly.
    WeightedRoundRobin,
    /// The same key always goes to the same endpoint while it is present and usable
    /// (rendezvous hashing: when an endpoint leaves, only its keys move). While an XClient's
    /// endpoint is still connecting or cooling down after a failure, its keys go to the others
    /// and come back once it is usable again.
    ConsistentHash,
    /// Prefers endpoints with a lower QUIC round-trip time (weight ∝ 1/rtt²); endpoints not yet
    /// measured are tried as if they were the fastest.
    LatencyBased,
    /// Your own selector.
    Custom(Arc<dyn Selector>),
}

impl fmt::Debug for SelectMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RandomSelect => f.write_str("RandomSelect"),
            Self::RoundRobin => f.write_str("RoundRobin"),
            Self::WeightedRoundRobin => f.write_str("WeightedRoundRobin"),
            Self::ConsistentHash => f.write_str("ConsistentHash"),
            Self::LatencyBased => f.write_str("LatencyBased"),
            Self::Custom(s) => write!(f, "Custom({s:?})"),
        }
    }
}

impl SelectMode {
    /// The selector implementing this mode.
    pub fn selector(&self) -> Arc<dyn Selector> {
        match self {
            Self::RandomSelect => Arc::new(RandomSelect),
            Self::RoundRobin => Arc::new(RoundRobin::default()),
            Self::WeightedRoundRobin => Arc::new(WeightedRoundRobin::default()),
            Self::ConsistentHash => Arc::new(ConsistentHash),
            Self::LatencyBased => Arc::new(LatencyBased),
            Self::Custom(s) => s.clone(),
        }
    }
}

/// [`SelectMode::RandomSelect`].
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomSelect;

impl Selector for RandomSelect {
    fn select(&self, candidates: &[Candidate<'_>], _info: &SelectInfo<'_>) -> usize {
        rand::random_range(0..candidates.len())
    }
}

/// [`SelectMode::RoundRobin`].
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Selector for RoundRobin {
    fn select(&self, candidates: &[Candidate<'_>], _info: &SelectInfo<'_>) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % candidates.len()
    }
}

/// [`SelectMode::WeightedRoundRobin`]: smooth weighted round robin. Endpoints of weight 0 are
/// picked only when all weights are 0.
#[derive(Debug, Default)]
pub struct WeightedRoundRobin {
    current: Mutex<HashMap<String, i64>>,
}

impl Selector for WeightedRoundRobin {
    fn select(&self, candidates: &[Candidate<'_>], _info: &SelectInfo<'_>) -> usize {
        let mut current = self.current.locked();
        current.retain(|address, _| candidates.iter().any(|c| c.endpoint.address == *address));
        let total: i64 = candidates
            .iter()
            .map(|c| i64::from(c.endpoint.weight))
            .sum();
        if total == 0 {
            return 0;
        }
        let mut best = 0;
        let mut best_weight = i64::MIN;
        for (i, c) in candidates.iter().enumerate() {
            // Weight 0 drains an endpoint: never picked while another has weight (its running
            // value would tie with a positive one's after the pool changed).
            if c.endpoint.weight == 0 {
                continue;
            }
            let w = current.entry(c.endpoint.address.clone()).or_insert(0);
            *w += i64::from(c.endpoint.weight);
            if *w > best_weight {
                best_weight = *w;
                best = i;
            }
        }
        if let Some(w) = current.get_mut(&candidates[best].endpoint.address) {
            *w -= total;
        }
        best
    }
}

/// [`SelectMode::ConsistentHash`]: rendezvous (highest random weight) hashing of the routing
/// key — the caller's [`CallOptions::route_key`](crate::CallOptions::route_key), else service
/// path, method and arguments.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConsistentHash;

impl Selector for ConsistentHash {
    fn select(&self, candidates: &[Candidate<'_>], info: &SelectInfo<'_>) -> usize {
        let mut key = std::hash::DefaultHasher::new();
        match info.key {
            Some(k) => k.hash(&mut key),
            None => (info.service_path, info.service_method, info.args).hash(&mut key),
        }
        let key = key.finish();
        candidates
            .iter()
            .enumerate()
            .max_by_key(|(_, c)| {
                let mut h = std::hash::DefaultHasher::new();
                (key, &c.endpoint.address).hash(&mut h);
                h.finish()
            })
            .map_or(0, |(i, _)| i)
    }
}

/// [`SelectMode::LatencyBased`].
#[derive(Debug, Default, Clone, Copy)]
pub struct LatencyBased;

impl Selector for LatencyBased {
    fn select(&self, candidates: &[Candidate<'_>], _info: &SelectInfo<'_>) -> usize {
        let fastest = candidates
            .iter()
            .filter_map(|c| c.rtt)
            .min()
            .unwrap_or(Duration::from_millis(1));
        let weight = |c: &Candidate<'_>| {
            let rtt = c.rtt.unwrap_or(fastest).as_secs_f64().max(1e-6);
            1.0 / (rtt * rtt)
        };
        let total: f64 = candidates.iter().map(weight).sum();
        let mut point = rand::random::<f64>() * total;
        for (i, c) in candidates.iter().enumerate() {
            point -= weight(c);
            if point <= 0.0 {
                return i;
            }
        }
        candidates.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Endpoint::parse(&format!("10.0.0.{i}:8972"))
                    .unwrap()
                    .with_weight(*w)
            })
            .collect()
    }

    fn candidates(endpoints: &[Endpoint]) -> Vec<Candidate<'_>> {
        endpoints
            .iter()
            .map(|endpoint| Candidate {
                endpoint,
                rtt: None,
            })
            .collect()
    }

    const INFO: SelectInfo<'static> = SelectInfo {
        service_path: "Arith",
        service_method: "Mul",
        args: &[1, 2],
        key: None,
    };

    fn counts(selector: &dyn Selector, c: &[Candidate<'_>], n: usize) -> Vec<usize> {
        let mut counts = vec![0; c.len()];
        for _ in 0..n {
            counts[selector.select(c, &INFO)] += 1;
        }
        counts
    }

    #[test]
    fn random_spreads_evenly() {
        let e = endpoints(&[1, 1, 1, 1]);
        let counts = counts(&RandomSelect, &candidates(&e), 40_000);
        for c in counts {
            // Expected 10,000 each; 6 sigma is about 520.
            assert!((9_400..=10_600).contains(&c), "{c}");
        }
    }

    #[test]
    fn round_robin_cycles() {
        let e = endpoints(&[1, 1, 1]);
        let c = candidates(&e);
        let rr = RoundRobin::default();
        let picks: Vec<usize> = (0..7).map(|_| rr.select(&c, &INFO)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_proportional() {
        let e = endpoints(&[5, 1, 1]);
        let c = candidates(&e);
        let wrr = WeightedRoundRobin::default();
        let picks: Vec<usize> = (0..7).map(|_| wrr.select(&c, &INFO)).collect();
        // nginx's example sequence for weights 5,1,1: a a b a c a a.
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&wrr, &c, 7_000), [5_000, 1_000, 1_000]);
    }

    #[test]
    fn weighted_round_robin_never_picks_weight_zero_while_others_have_weight() {
        let e = endpoints(&[0, 1, 1]);
        let wrr = WeightedRoundRobin::default();
        assert_eq!(wrr.select(&candidates(&e), &INFO), 1);
        // Endpoint 2 leaves the pool (cooling down): endpoint 1's running value is back at 0.
        let fewer = [e[0].clone(), e[1].clone()];
        for _ in 0..10 {
            assert_eq!(wrr.select(&candidates(&fewer), &INFO), 1);
        }
        // All weights 0: the first.
        assert_eq!(wrr.select(&candidates(&endpoints(&[0, 0])), &INFO), 0);
    }

    #[test]
    fn consistent_hash_is_stable_and_moves_only_removed_keys() {
        let e = endpoints(&[1, 1, 1, 1, 1]);
        let c = candidates(&e);
        let info = |k: &'static str| SelectInfo {
            key: Some(k),
            ..INFO
        };
        let keys: Vec<&'static str> = (0..200).map(|i| &*format!("device-{i}").leak()).collect();
        let first: Vec<usize> = keys
            .iter()
            .map(|k| ConsistentHash.select(&c, &info(k)))
            .collect();
        let again: Vec<usize> = keys
            .iter()
            .map(|k| ConsistentHash.select(&c, &info(k)))
            .collect();
        assert_eq!(first, again, "same key, same endpoint");
        assert!(
            first.iter().collect::<std::collections::HashSet<_>>().len() == 5,
            "spread"
        );
        // Remove endpoint 2: keys that were elsewhere stay where they were.
        let fewer: Vec<Endpoint> = e
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, e)| e.clone())
            .collect();
        let c2 = candidates(&fewer);
        for (k, before) in keys.iter().zip(&first) {
            let after = &fewer[ConsistentHash.select(&c2, &info(k))].address;
            if *before != 2 {
                assert_eq!(after, &e[*before].address, "key {k} moved needlessly");
            }
        }
        // Without a key, path/method/args decide, stably.
        assert_eq!(
            ConsistentHash.select(&c, &INFO),
            ConsistentHash.select(&c, &INFO)
        );
    }

    #[test]
    fn latency_based_prefers_the_lower_rtt() {
        let e = endpoints(&[1, 1]);
        let c = vec![
            Candidate {
                endpoint: &e[0],
                rtt: Some(Duration::from_millis(20)),
            },
            Candidate {
                endpoint: &e[1],
                rtt: Some(Duration::from_millis(2)),
            },
        ];
        let picks = counts(&LatencyBased, &c, 10_000);
        assert!(picks[1] > 9_800, "{picks:?}");
        assert!(
            picks[0] > 0,
            "the slow endpoint still gets a trickle: {picks:?}"
        );
        // An endpoint with no measurement yet is tried as if it were fast.
        let fresh = vec![
            c[0],
            Candidate {
                endpoint: &e[1],
                rtt: None,
            },
        ];
        let picks = counts(&LatencyBased, &fresh, 1_000);
        assert!(picks[1] > 400, "{picks:?}");
    }
}
