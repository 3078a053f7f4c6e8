//! A deterministic network for [`Swim`] nodes: virtual time, seeded latency,
//! loss and partitions, thousands of nodes in one process. Used by the tests
//! below and by the `sim` example (`bench/sim.rs`), which prints the scaling
//! table in ARCHITECTURE.md.
//!
//! Every random choice comes from seeded generators and every tie is broken
//! by arrival order, so a run is a function of its seed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use foca::Identity;
use rand_010::rngs::SmallRng;
use rand_010::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::swim::{Swim, SwimConfig, SwimEvent, SwimIdentity, Traffic};

/// A simulated node's identity: its index and incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SimId {
    pub n: u32,
    pub incarnation: u16,
}

impl Identity for SimId {
    type Addr = u32;
    fn renew(&self) -> Option<Self> {
        Some(Self {
            n: self.n,
            incarnation: self.incarnation.wrapping_add(1),
        })
    }
    fn addr(&self) -> u32 {
        self.n
    }
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.incarnation > adversary.incarnation
    }
}

impl SwimIdentity for SimId {
    type Key = u32;
}

/// The simulated network.
#[derive(Debug, Clone)]
pub struct Net {
    /// One-way latency, uniform in this range (ms).
    pub latency_ms: (u64, u64),
    /// Chance a packet is lost.
    pub loss: f64,
}

impl Default for Net {
    fn default() -> Self {
        Self {
            latency_ms: (1, 10),
            loss: 0.0,
        }
    }
}

enum Item {
    Deliver { to: u32, data: Vec<u8> },
    Wake { node: u32 },
}

struct Queued {
    at: u64,
    seq: u64,
    item: Item,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// Nodes, a network between them, and a virtual clock.
pub struct Sim {
    pub now_ms: u64,
    pub net: Net,
    cfg: SwimConfig,
    seed: u64,
    nodes: Vec<Option<Swim<SimId>>>,
    /// When each node's pending wake-up is queued for (u64::MAX: none).
    wake_at: Vec<u64>,
    /// Side of the partition per node; packets between sides are dropped.
    side: Vec<u8>,
    queue: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    rng: SmallRng,
    /// Traffic of nodes that were stopped, so totals stay whole.
    gone_traffic: Traffic,
    /// Packets dropped by loss or partition.
    pub dropped: u64,
    /// Errors nodes returned (bad packets, timer errors): none expected.
    pub errors: u64,
}

impl Sim {
    /// Room for `n` nodes, none started.
    pub fn new(n: u32, cfg: SwimConfig, net: Net, seed: u64) -> Self {
        Self {
            now_ms: 0,
            net,
            cfg,
            seed,
            nodes: (0..n).map(|_| None).collect(),
            wake_at: vec![u64::MAX; n as usize],
            side: vec![0; n as usize],
            queue: BinaryHeap::new(),
            seq: 0,
            rng: SmallRng::seed_from_u64(seed),
            gone_traffic: Traffic::default(),
            dropped: 0,
            errors: 0,
        }
    }

    pub fn size(&self) -> u32 {
        self.nodes.len() as u32
    }

    /// Start node `n` (a fresh incarnation if it ran before).
    pub fn start(&mut self, n: u32, incarnation: u16) {
        let id = SimId { n, incarnation };
        let seed =
            self.seed.wrapping_mul(0x100_0000_01b3) ^ u64::from(n) << 16 ^ u64::from(incarnation);
        // the config was checked when the sim was built; an invalid one is
        // the caller's bug, so say it loudly
        let node = Swim::new(id, self.cfg.clone(), seed, self.now_ms).expect("valid swim config");
        self.nodes[n as usize] = Some(node);
        self.wake_at[n as usize] = u64::MAX;
        self.schedule_wake(n);
    }

    /// Start nodes `ns`, each already knowing all of them (a converged
    /// cluster, as a join RPC's roster would give it). Their starts are
    /// spread over one probe period, as machines never start in the same
    /// millisecond (nodes probing in lockstep would be a kinder network
    /// than any real one).
    pub fn start_converged(&mut self, ns: std::ops::Range<u32>) {
        let ids: Vec<SimId> = ns.clone().map(|n| SimId { n, incarnation: 0 }).collect();
        let base = self.now_ms;
        let count = u64::from(ns.len().max(1) as u32);
        for (i, n) in ns.clone().enumerate() {
            let at = base + i as u64 * self.cfg.probe_period_ms / count;
            self.run_until(at, &mut |_, _, _| {});
            self.start(n, 0);
            let now = self.now_ms;
            let others = ids.iter().copied().filter(|i| i.n != n);
            let r = self.node_mut(n).map(|s| s.seed_members(others, now));
            if let Some(Err(_)) = r {
                self.errors += 1;
            }
            self.after_call(n, &mut |_, _, _| {});
        }
    }

    /// Stop node `n` as kill -9 would: no goodbye.
    pub fn kill(&mut self, n: u32) {
        if let Some(s) = self.nodes[n as usize].take() {
            let t = s.traffic();
            self.gone_traffic.swim_bytes += t.swim_bytes;
            self.gone_traffic.swim_packets += t.swim_packets;
            self.gone_traffic.push_bytes += t.push_bytes;
            self.gone_traffic.push_packets += t.push_packets;
        }
        self.wake_at[n as usize] = u64::MAX;
    }

    pub fn is_running(&self, n: u32) -> bool {
        self.nodes[n as usize].is_some()
    }

    pub fn node(&self, n: u32) -> Option<&Swim<SimId>> {
        self.nodes[n as usize].as_ref()
    }

    pub fn node_mut(&mut self, n: u32) -> Option<&mut Swim<SimId>> {
        self.nodes[n as usize].as_mut()
    }

    /// Put each node on a side; packets between sides are dropped.
    pub fn partition(&mut self, side_of: impl Fn(u32) -> u8) {
        for n in 0..self.size() {
            self.side[n as usize] = side_of(n);
        }
    }

    pub fn heal(&mut self) {
        self.side.iter_mut().for_each(|s| *s = 0);
    }

    pub fn side(&self, n: u32) -> u8 {
        self.side[n as usize]
    }

    /// Node `n` asks `seed` to let it in.
    pub fn join(&mut self, n: u32, seed: u32) {
        let now = self.now_ms;
        let Some(seed_id) = self.node(seed).map(|s| *s.identity()) else {
            return;
        };
        if let Some(Err(_)) = self.node_mut(n).map(|s| s.join(seed_id, now)) {
            self.errors += 1;
        }
        self.after_call(n, &mut |_, _, _| {});
    }

    /// Node `n` publishes an advert.
    pub fn publish(&mut self, n: u32, payload: Vec<u8>, wide: bool) -> Option<u64> {
        let now = self.now_ms;
        let v = match self.node_mut(n)?.publish(payload, wide, now) {
            Ok(v) => Some(v),
            Err(_) => {
                self.errors += 1;
                None
            }
        };
        self.after_call(n, &mut |_, _, _| {});
        v
    }

    /// Sum of what every node (stopped ones included) sent.
    pub fn traffic(&self) -> Traffic {
        let mut t = self.gone_traffic;
        for s in self.nodes.iter().flatten() {
            let x = s.traffic();
            t.swim_bytes += x.swim_bytes;
            t.swim_packets += x.swim_packets;
            t.push_bytes += x.push_bytes;
            t.push_packets += x.push_packets;
        }
        t
    }

    fn schedule_wake(&mut self, n: u32) {
        let Some(s) = self.nodes[n as usize].as_ref() else {
            return;
        };
        let at = s.next_deadline().max(self.now_ms);
        if at < self.wake_at[n as usize] {
            self.wake_at[n as usize] = at;
            self.seq += 1;
            self.queue.push(Reverse(Queued {
                at,
                seq: self.seq,
                item: Item::Wake { node: n },
            }));
        }
    }

    /// Send what node `n` queued, hand its events to `obs`, re-arm its wake.
    fn after_call(&mut self, n: u32, obs: &mut dyn FnMut(u64, u32, &SwimEvent<SimId>)) {
        let Some(s) = self.nodes[n as usize].as_mut() else {
            return;
        };
        let out = s.take_outbox();
        let events = s.take_events();
        for e in &events {
            obs(self.now_ms, n, e);
        }
        for (to, data) in out {
            let to = to.n;
            if self.side[n as usize] != self.side[to as usize]
                || (self.net.loss > 0.0 && self.rng.random_bool(self.net.loss))
            {
                self.dropped += 1;
                continue;
            }
            let (lo, hi) = self.net.latency_ms;
            let at = self.now_ms + self.rng.random_range(lo..=hi);
            self.seq += 1;
            self.queue.push(Reverse(Queued {
                at,
                seq: self.seq,
                item: Item::Deliver { to, data },
            }));
        }
        self.schedule_wake(n);
    }

    /// Run until virtual time `until_ms`, handing every node event to `obs`
    /// as (time, node, event).
    pub fn run_until(&mut self, until_ms: u64, obs: &mut dyn FnMut(u64, u32, &SwimEvent<SimId>)) {
        while let Some(Reverse(q)) = self.queue.peek() {
            if q.at > until_ms {
                break;
            }
            let Some(Reverse(q)) = self.queue.pop() else {
                break;
            };
            self.now_ms = q.at;
            let now = q.at;
            let n = match q.item {
                Item::Deliver { to, data } => {
                    let Some(s) = self.nodes[to as usize].as_mut() else {
                        continue; // to a dead node: lost
                    };
                    if s.handle_packet(&data, now).is_err() {
                        self.errors += 1;
                    }
                    to
                }
                Item::Wake { node } => {
                    if self.wake_at[node as usize] != now {
                        continue; // superseded by an earlier wake
                    }
                    self.wake_at[node as usize] = u64::MAX;
                    let Some(s) = self.nodes[node as usize].as_mut() else {
                        continue;
                    };
                    if s.tick(now).is_err() {
                        self.errors += 1;
                    }
                    node
                }
            };
            self.after_call(n, obs);
        }
        self.now_ms = self.now_ms.max(until_ms);
    }
}

#[cfg(test)]
mod tests {
    //! Small clusters, seconds of virtual time: each test runs in well under
    //! a second of wall time.
    use super::*;

    fn sim(n: u32, loss: f64, seed: u64) -> Sim {
        let net = Net {
            latency_ms: (1, 10),
            loss,
        };
        Sim::new(n, SwimConfig::for_cluster(n), net, seed)
    }

    fn nop(_: u64, _: u32, _: &SwimEvent<SimId>) {}

    #[test]
    fn a_joining_node_becomes_known_to_all() {
        let mut s = sim(50, 0.0, 1);
        s.start_converged(0..49);
        s.run_until(2_000, &mut nop);
        s.start(49, 0);
        s.join(49, 0);
        let mut knew = [false; 50];
        s.run_until(5_000, &mut |_, n, e| {
            if matches!(e, SwimEvent::Up(id) if id.n == 49) {
                knew[n as usize] = true;
            }
        });
        assert_eq!(knew[..49].iter().filter(|k| **k).count(), 49);
        assert_eq!(s.node(49).unwrap().num_members(), 49);
        assert_eq!(s.errors, 0);
    }

    #[test]
    fn a_killed_node_is_declared_down_by_all() {
        let mut s = sim(50, 0.0, 2);
        s.start_converged(0..50);
        s.run_until(3_000, &mut nop);
        s.kill(7);
        let mut down = vec![None; 50];
        s.run_until(15_000, &mut |t, n, e| {
            if matches!(e, SwimEvent::Down(id) if id.n == 7) && down[n as usize].is_none() {
                down[n as usize] = Some(t);
            }
        });
        let missing: Vec<usize> = (0..50).filter(|&n| n != 7 && down[n].is_none()).collect();
        assert!(missing.is_empty(), "never declared 7 down: {missing:?}");
        for n in 0..50u32 {
            if n != 7 {
                assert!(s.node(n).unwrap().members().all(|m| m.n != 7));
            }
        }
    }

    #[test]
    fn no_false_positives_under_five_percent_loss() {
        let mut s = sim(50, 0.05, 3);
        s.start_converged(0..50);
        let mut downs = 0;
        s.run_until(40_000, &mut |_, _, e| {
            if matches!(
                e,
                SwimEvent::Down(_) | SwimEvent::Defunct | SwimEvent::Rejoined(_)
            ) {
                downs += 1;
            }
        });
        assert_eq!(downs, 0);
        assert!(s.dropped > 0, "the loss model dropped nothing");
        for n in 0..50 {
            assert_eq!(s.node(n).unwrap().num_members(), 49);
        }
    }

    #[test]
    fn adverts_spread_by_push_and_broadcast_and_stale_ones_lose() {
        let mut s = sim(30, 0.0, 4);
        s.start_converged(0..30);
        for n in 0..30 {
            s.publish(n, vec![n as u8, 0], false);
        }
        // a wide advert (models changed) reaches everyone by broadcast
        s.run_until(1_000, &mut nop);
        let v = s.publish(5, vec![5, 1], true).unwrap();
        s.run_until(4_000, &mut nop);
        for n in 0..30 {
            let a = s.node(n).unwrap().advert(&5).expect("advert of 5");
            assert_eq!(a.version, v, "node {n}");
            assert_eq!(a.payload, vec![5, 1]);
        }
        // load changes ride the pushes; a node never goes back to an older
        // version of anyone's advert, however late a relayed copy arrives
        let mut seen = std::collections::HashMap::new();
        let mut regressions = 0;
        for round in 0..10u8 {
            for n in 0..30 {
                s.publish(n, vec![n as u8, 2 + round], false);
            }
            let until = s.now_ms + 1_000;
            s.run_until(until, &mut |_, n, e| {
                if let SwimEvent::Advert(origin, v) = e {
                    let last = seen.entry((n, *origin)).or_insert(0u64);
                    if *v <= *last {
                        regressions += 1;
                    }
                    *last = *v;
                }
            });
        }
        assert_eq!(regressions, 0);
        let now = s.now_ms;
        let mut fresh = 0;
        for n in 0..30 {
            for (origin, a) in s.node(n).unwrap().adverts() {
                // each version is its publish time (ms): ages are never
                // told younger than they are
                if let Some(age) = a.age_ms(now) {
                    assert!(age >= now - a.version, "{n} holds {origin} too young");
                    fresh += usize::from(n == 0 && origin != 0 && age <= 3_000);
                }
            }
        }
        assert!(fresh >= 5, "node 0 holds {fresh} adverts younger than 3 s");
    }

    #[test]
    fn a_partition_gives_two_views_and_healing_one() {
        let mut s = sim(40, 0.0, 5);
        s.start_converged(0..40);
        s.run_until(2_000, &mut nop);
        s.partition(|n| u8::from(n >= 24));
        // each side stops seeing the other (bounded: 60 virtual s)
        let split = |s: &Sim| {
            (0..40u32).all(|n| {
                let want = if n < 24 { 23 } else { 15 };
                let node = s.node(n).unwrap();
                node.num_members() == want && node.members().all(|m| (m.n >= 24) == (n >= 24))
            })
        };
        let mut t = s.now_ms;
        while !split(&s) && t < 62_000 {
            t += 1_000;
            s.run_until(t, &mut nop);
        }
        assert!(split(&s), "two views within 60 s of the cut");
        s.heal();
        let healed = |s: &Sim| (0..40u32).all(|n| s.node(n).unwrap().num_members() == 39);
        let until = s.now_ms + 90_000;
        while !healed(&s) && s.now_ms < until {
            let next = s.now_ms + 1_000;
            s.run_until(next, &mut nop);
        }
        for n in 0..40u32 {
            assert_eq!(
                s.node(n).unwrap().num_members(),
                39,
                "node {n} after healing"
            );
        }
    }

    #[test]
    fn a_run_is_a_function_of_its_seed() {
        let run = |seed| {
            let mut s = sim(20, 0.05, seed);
            s.start_converged(0..20);
            s.run_until(10_000, &mut nop);
            (s.traffic(), s.dropped)
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }
}
