//! The adverts a node holds about its peers, one per origin, each with a
//! version (a newer one replaces it, an older one loses) and an honest age.
//!
//! Clocks of different machines disagree, so an advert never carries "made
//! at" on its maker's clock: it carries its age when it was sent. A holder
//! records that age and its own clock at receipt, and adds one hop allowance
//! per hop for the time on the wire it cannot see; so the age it reports is
//! never less than the true one while a hop takes less than the allowance.
//! An advert that arrived by SWIM broadcast (piggybacked, held in a backlog
//! for an unknown time by each relay) has no known age at all: the scheduler
//! counts it as stale until a push brings the same or a newer version with
//! its age.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// One advert as the table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    /// The origin's counter: higher wins. [`AdvertTable::publish`] makes it
    /// at least the caller's clock in ms, so a restarted node's first advert
    /// beats the ones its previous life left in the cluster.
    pub version: u64,
    /// Opaque bytes: what the node advertises (load, models).
    pub payload: Vec<u8>,
    /// Its age when it reached us (hop allowance included); `None` when it
    /// came by broadcast, with no age to trust.
    age_at_rx: Option<u64>,
    /// Our clock when it reached us (or when its age was last improved).
    rx_at_ms: u64,
}

impl Advert {
    /// Its age now, in ms: `None` when unknown (counts as stale).
    pub fn age_ms(&self, now_ms: u64) -> Option<u64> {
        self.age_at_rx
            .map(|a| a.saturating_add(now_ms.saturating_sub(self.rx_at_ms)))
    }

    /// When it was made, on our clock, as the scheduler's `advert_at_ms`
    /// wants it: `now - age`, or 0 (long stale) when the age is unknown.
    pub fn made_at_ms(&self, now_ms: u64) -> u64 {
        self.age_ms(now_ms)
            .map_or(0, |age| now_ms.saturating_sub(age))
    }
}

/// What [`AdvertTable::offer`] did with an advert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// A version we did not have: it replaced the one we held (or none).
    Newer,
    /// The version we hold, now with a known or smaller age.
    Fresher,
    /// Nothing new: the same version, no younger.
    Same,
    /// An older version than ours: it lost.
    Stale,
}

/// Adverts by origin, plus the order recent ones arrived in (what a periodic
/// push relays).
#[derive(Debug)]
pub struct AdvertTable<K> {
    local: K,
    entries: HashMap<K, Advert>,
    /// Origins whose advert arrived (newer or fresher) recently, newest last.
    /// Bounded: a push relays only the freshest few, so older arrivals are
    /// dropped rather than scanned.
    recent: VecDeque<(K, u64)>,
    recent_cap: usize,
    /// Per hop, the wire time the receiver adds to an advert's age.
    hop_allowance_ms: u64,
    /// Adverts older than this (or of unknown age and received longer ago)
    /// are forgotten: they no longer say anything about load, and a table of
    /// every node ever heard from would grow with the cluster's history.
    forget_after_ms: u64,
    /// Offers that lost to a newer version, for metrics and tests.
    pub stale_rejected: u64,
}

impl<K: Clone + Eq + Hash> AdvertTable<K> {
    pub fn new(local: K, hop_allowance_ms: u64, forget_after_ms: u64, recent_cap: usize) -> Self {
        Self {
            local,
            entries: HashMap::new(),
            recent: VecDeque::with_capacity(recent_cap),
            recent_cap: recent_cap.max(1),
            hop_allowance_ms,
            forget_after_ms,
            stale_rejected: 0,
        }
    }

    /// Our own advert changed: a new version with age 0. Returns its version.
    pub fn publish(&mut self, payload: Vec<u8>, now_ms: u64) -> u64 {
        let version = self
            .entries
            .get(&self.local)
            .map_or(now_ms, |a| (a.version + 1).max(now_ms));
        self.entries.insert(
            self.local.clone(),
            Advert {
                version,
                payload,
                age_at_rx: Some(0),
                rx_at_ms: now_ms,
            },
        );
        version
    }

    /// A peer's advert arrived with `age_at_send` (`None`: by broadcast).
    pub fn offer(
        &mut self,
        origin: &K,
        version: u64,
        age_at_send: Option<u64>,
        payload: &[u8],
        now_ms: u64,
    ) -> Offer {
        if *origin == self.local {
            // what others say about us is never newer than what we are
            return Offer::Same;
        }
        let age = age_at_send.map(|a| a.saturating_add(self.hop_allowance_ms));
        let outcome = match self.entries.get_mut(origin) {
            None => Offer::Newer,
            Some(cur) if version > cur.version => Offer::Newer,
            Some(cur) if version < cur.version => {
                self.stale_rejected += 1;
                return Offer::Stale;
            }
            Some(cur) => match (age, cur.age_ms(now_ms)) {
                (Some(a), Some(b)) if a >= b => return Offer::Same,
                (None, _) => return Offer::Same,
                (Some(a), _) => {
                    cur.age_at_rx = Some(a);
                    cur.rx_at_ms = now_ms;
                    Offer::Fresher
                }
            },
        };
        if outcome == Offer::Newer {
            self.entries.insert(
                origin.clone(),
                Advert {
                    version,
                    payload: payload.to_vec(),
                    age_at_rx: age,
                    rx_at_ms: now_ms,
                },
            );
        }
        if age.is_some() {
            if self.recent.len() == self.recent_cap {
                self.recent.pop_front();
            }
            self.recent.push_back((origin.clone(), version));
        }
        outcome
    }

    pub fn get(&self, origin: &K) -> Option<&Advert> {
        self.entries.get(origin)
    }

    pub fn local(&self) -> Option<&Advert> {
        self.entries.get(&self.local)
    }

    /// Every advert held, ours included.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &Advert)> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forget a peer's advert (it left, or was declared down).
    pub fn remove(&mut self, origin: &K) {
        if *origin != self.local {
            self.entries.remove(origin);
        }
    }

    /// Up to `n` of the most recently arrived adverts younger than
    /// `max_age_ms`, newest first, none from `skip`: what a push relays.
    pub fn freshest(&self, n: usize, max_age_ms: u64, skip: &K, now_ms: u64) -> Vec<(K, u64)> {
        let mut out: Vec<(K, u64)> = Vec::with_capacity(n);
        for (origin, version) in self.recent.iter().rev() {
            if out.len() == n {
                break;
            }
            if origin == skip || out.iter().any(|(o, _)| o == origin) {
                continue;
            }
            let Some(a) = self.entries.get(origin) else {
                continue;
            };
            if a.version == *version && a.age_ms(now_ms).is_some_and(|age| age < max_age_ms) {
                out.push((origin.clone(), *version));
            }
        }
        out
    }

    /// Drop adverts past `forget_after_ms` (by age, or by time since receipt
    /// when the age is unknown). Ours is kept.
    pub fn expire(&mut self, now_ms: u64) {
        let limit = self.forget_after_ms;
        let local = &self.local;
        self.entries.retain(|k, a| {
            k == local
                || a.age_ms(now_ms)
                    .unwrap_or_else(|| now_ms.saturating_sub(a.rx_at_ms))
                    <= limit
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> AdvertTable<u32> {
        AdvertTable::new(0, 10, 30_000, 16)
    }

    #[test]
    fn stale_versions_lose_and_newer_ones_replace() {
        let mut t = table();
        assert_eq!(t.offer(&1, 5, Some(100), b"five", 1_000), Offer::Newer);
        assert_eq!(t.offer(&1, 4, Some(0), b"four", 1_000), Offer::Stale);
        assert_eq!(t.get(&1).unwrap().payload, b"five");
        assert_eq!(t.stale_rejected, 1);
        assert_eq!(t.offer(&1, 6, None, b"six", 2_000), Offer::Newer);
        assert_eq!(t.get(&1).unwrap().payload, b"six");
        // the same version again, no younger: nothing new to relay
        assert_eq!(t.offer(&1, 6, None, b"six", 2_100), Offer::Same);
    }

    #[test]
    fn age_is_age_at_send_plus_hops_plus_time_held() {
        let mut t = table();
        t.offer(&1, 1, Some(200), b"x", 1_000);
        // 200 at send + 10 for the hop + 500 held
        assert_eq!(t.get(&1).unwrap().age_ms(1_500), Some(710));
        assert_eq!(t.get(&1).unwrap().made_at_ms(1_500), 790);
        // a younger copy of the same version improves the age
        assert_eq!(t.offer(&1, 1, Some(50), b"x", 1_500), Offer::Fresher);
        assert_eq!(t.get(&1).unwrap().age_ms(1_500), Some(60));
        // an older copy does not
        assert_eq!(t.offer(&1, 1, Some(900), b"x", 1_500), Offer::Same);
    }

    #[test]
    fn a_broadcast_advert_has_no_age_until_a_push_brings_one() {
        let mut t = table();
        t.offer(&1, 3, None, b"m", 1_000);
        assert_eq!(t.get(&1).unwrap().age_ms(1_000), None);
        assert_eq!(t.get(&1).unwrap().made_at_ms(1_000), 0);
        assert_eq!(t.offer(&1, 3, Some(0), b"m", 1_200), Offer::Fresher);
        assert_eq!(t.get(&1).unwrap().age_ms(1_200), Some(10));
    }

    #[test]
    fn our_own_advert_is_never_replaced_by_hearsay() {
        let mut t = table();
        let v = t.publish(b"me".to_vec(), 5_000);
        assert_eq!(v, 5_000);
        assert_eq!(t.offer(&0, v + 100, Some(0), b"old me", 5_000), Offer::Same);
        assert_eq!(t.local().unwrap().payload, b"me");
        // versions keep rising even if the clock does not
        assert_eq!(t.publish(b"me2".to_vec(), 5_000), 5_001);
    }

    #[test]
    fn freshest_is_newest_first_without_superseded_or_old_ones() {
        let mut t = table();
        t.offer(&1, 1, Some(0), b"a", 1_000);
        t.offer(&2, 1, Some(0), b"b", 1_000);
        t.offer(&3, 1, Some(2_900), b"c", 1_000);
        t.offer(&1, 2, Some(0), b"a2", 1_000);
        let f = t.freshest(8, 1_000, &2, 1_000);
        assert_eq!(f, vec![(1, 2)]); // 2 skipped, 3 too old, (1,1) superseded
        t.expire(40_000);
        assert!(t.get(&1).is_none());
    }
}
