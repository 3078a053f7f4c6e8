//! SWIM membership (the `foca` crate: failure detection by direct and
//! indirect probes, suspicion, dissemination piggybacked on probes) plus
//! adverts by gossip, as one I/O-free state machine per node.
//!
//! Events in, messages out, on the caller's clock: feed it packets
//! ([`Swim::handle_packet`]) and time ([`Swim::tick`] at or after
//! [`Swim::next_deadline`]), then drain [`Swim::take_outbox`] (bytes to send
//! to a peer) and [`Swim::take_events`] (members up and down, adverts that
//! changed). No sockets and no clock: the simulation (`membership::sim`)
//! drives thousands of these in one process; the real cluster will carry the
//! packets as QUIC datagrams (see ARCHITECTURE.md, "Scaling").
//!
//! Adverts travel two ways, both versioned so a stale one loses:
//! - **broadcast** ([`Swim::publish`] with `wide`): piggybacked on SWIM's own
//!   messages through foca's custom broadcasts, `max_transmissions` times per
//!   node, so every node learns it in O(log N) rounds. For rare changes (the
//!   models a node holds); such an advert has no age a receiver can trust.
//! - **push**: every `push_period_ms` a node sends `push_fanout` random peers
//!   its own advert with its age, plus the `push_relay` freshest adverts it
//!   heard, each with its age. Load changes ride this. The bytes per node are
//!   bounded by the config, not by the cluster's size, which is what keeps a
//!   thousand nodes under 10 kbit/s; the price is that a node holds a fresh
//!   (younger than `stale_after_ms`) load advert for a sample of the cluster,
//!   not all of it (ARCHITECTURE.md gives the arithmetic).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Debug;
use std::hash::Hash;
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use foca::{
    BroadcastHandler, Config, Foca, Identity, Invalidates, Member, Notification, PeriodicParams,
    PostcardCodec, Runtime, Timer,
};
use rand_010::rngs::SmallRng;
use rand_010::seq::SliceRandom;
use rand_010::{RngExt, SeedableRng};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::adverts::{Advert, AdvertTable, Offer};

/// A node's identity in SWIM: what foca calls `Identity`, with a stable key
/// (`Identity::Addr`, the node id) that adverts are filed under, and a
/// serde form for the wire.
pub trait SwimIdentity:
    Identity<Addr = Self::Key> + Serialize + DeserializeOwned + Hash + Debug + 'static
{
    type Key: Clone + Eq + Hash + Ord + Debug + Serialize + DeserializeOwned + 'static;
}

/// The real cluster's identity: the node id its certificate proves, the
/// address its QUIC endpoint listens on, and an incarnation that a restarted
/// (or wrongly declared down) node bumps to rejoin.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerId {
    pub id: String,
    pub addr: std::net::SocketAddr,
    pub incarnation: u16,
}

impl Identity for PeerId {
    type Addr = String;
    fn renew(&self) -> Option<Self> {
        Some(Self {
            incarnation: self.incarnation.wrapping_add(1),
            ..self.clone()
        })
    }
    fn addr(&self) -> String {
        self.id.clone()
    }
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.incarnation > adversary.incarnation
    }
}

impl SwimIdentity for PeerId {
    type Key = String;
}

/// Tuning. [`SwimConfig::for_cluster`] gives the values the simulation was
/// measured with (ARCHITECTURE.md, "Scaling").
#[derive(Debug, Clone)]
pub struct SwimConfig {
    /// One random member is probed per period (SWIM's protocol period).
    pub probe_period_ms: u64,
    /// Wait this long for a direct ack before asking others to probe.
    pub probe_rtt_ms: u64,
    /// Members asked to probe indirectly.
    pub indirect_probes: usize,
    /// How long a suspect has to refute before it is declared down.
    pub suspect_to_down_ms: u64,
    /// Updates (and broadcast adverts) are sent this many times by each node.
    pub max_transmissions: u8,
    /// Pending updates also go to `gossip_fanout` members this often.
    pub gossip_period_ms: u64,
    pub gossip_fanout: usize,
    /// Adverts: a push to `push_fanout` random members every period, with
    /// our advert and the `push_relay` freshest others.
    pub push_period_ms: u64,
    pub push_fanout: usize,
    pub push_relay: usize,
    /// Only adverts younger than this are relayed (the scheduler's
    /// `scheduler.stale_after_ms`: older ones count as unknown there).
    pub stale_after_ms: u64,
    /// Added to an advert's age per hop, for the time on the wire.
    pub hop_allowance_ms: u64,
    /// Adverts older than this are forgotten.
    pub forget_after_ms: u64,
    /// Largest packet made or accepted (a QUIC datagram fits 1,200 bytes on
    /// any path; 1,400 on a LAN).
    pub max_packet: usize,
}

impl SwimConfig {
    /// Settings for about `n` nodes on a LAN. The probe period is 1 s (as
    /// SGLang's mesh and memberlist's LAN profile); suspicion lasts 1.5 s
    /// whatever the size: a node refutes within a gossip round or two, and a
    /// longer wait breaks the 5 s detection target at 1,000 nodes. Updates
    /// are repeated 4·log10(n) times (memberlist's rule), at least 6.
    pub fn for_cluster(n: u32) -> Self {
        let log = f64::from(n.max(2)).log10();
        Self {
            probe_period_ms: 1_000,
            probe_rtt_ms: 300,
            indirect_probes: 3,
            suspect_to_down_ms: 1_500,
            max_transmissions: ((4.0 * log).ceil() as u8).max(6),
            gossip_period_ms: 200,
            gossip_fanout: 3,
            push_period_ms: 1_000,
            push_fanout: 2,
            push_relay: 16,
            stale_after_ms: 3_000,
            hop_allowance_ms: 10,
            forget_after_ms: 30_000,
            max_packet: 1_400,
        }
    }

    fn foca(&self) -> Result<Config, SwimError> {
        let nz = |v: usize| NonZeroUsize::new(v).ok_or(SwimError::Config("a count is zero"));
        if self.probe_rtt_ms == 0 || self.probe_rtt_ms >= self.probe_period_ms {
            return Err(SwimError::Config(
                "probe_rtt_ms must be in 1..probe_period_ms",
            ));
        }
        if self.suspect_to_down_ms == 0 || self.gossip_period_ms == 0 || self.push_period_ms == 0 {
            return Err(SwimError::Config("periods must be positive"));
        }
        Ok(Config {
            probe_period: Duration::from_millis(self.probe_period_ms),
            probe_rtt: Duration::from_millis(self.probe_rtt_ms),
            num_indirect_probes: nz(self.indirect_probes)?,
            max_transmissions: NonZeroU8::new(self.max_transmissions)
                .ok_or(SwimError::Config("max_transmissions is zero"))?,
            suspect_to_down_after: Duration::from_millis(self.suspect_to_down_ms),
            // remember the dead for a day: a node id that comes back must
            // renew its incarnation, never reuse an old one
            remove_down_after: Some(Duration::from_secs(24 * 3600)),
            max_packet_size: nz(self.max_packet)?,
            // a node declared down hears so and rejoins with a new incarnation
            notify_down_members: true,
            periodic_announce: Some(PeriodicParams {
                frequency: Duration::from_secs(30),
                num_members: nz(1)?,
            }),
            // how a healed partition finds its way back to one view
            periodic_announce_to_down_members: Some(PeriodicParams {
                frequency: Duration::from_secs(10),
                num_members: nz(2)?,
            }),
            periodic_gossip: Some(PeriodicParams {
                frequency: Duration::from_millis(self.gossip_period_ms),
                num_members: nz(self.gossip_fanout)?,
            }),
        })
    }
}

/// Why a call failed. A bad packet from a peer is an error for the caller to
/// count and drop, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum SwimError {
    #[error("invalid swim config: {0}")]
    Config(&'static str),
    #[error("empty packet")]
    Empty,
    #[error("unknown packet kind {0}")]
    UnknownKind(u8),
    #[error("bad advert push: {0}")]
    Push(#[from] postcard::Error),
    #[error("swim: {0}")]
    Foca(#[from] foca::Error),
}

/// What changed, for the caller to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwimEvent<I: SwimIdentity> {
    /// A member is up (joined, or came back).
    Up(I),
    /// A member was declared down by the cluster.
    Down(I),
    /// A member's identity changed (a new incarnation of the same node id).
    Renamed(I, I),
    /// We were declared down and rejoined as this identity.
    Rejoined(I),
    /// We were declared down and cannot rejoin by ourselves.
    Defunct,
    /// A newer advert of this node arrived (by either path).
    Advert(I::Key, u64),
}

/// Packet kinds on the wire: the first byte.
const KIND_SWIM: u8 = 1;
const KIND_PUSH: u8 = 2;

/// One advert on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct WireAdvert<K> {
    origin: K,
    version: u64,
    /// ms; absent in broadcasts, where no relay can tell its age.
    age_ms: Option<u64>,
    payload: Vec<u8>,
}

/// The broadcast key foca keeps in its backlog: a newer version of the same
/// origin's advert replaces an older one not yet sent out.
#[derive(Debug, Clone)]
struct AdvertKey<K> {
    origin: K,
    version: u64,
}

impl<K: PartialEq> Invalidates for AdvertKey<K> {
    fn invalidates(&self, other: &Self) -> bool {
        self.origin == other.origin && self.version >= other.version
    }
}

type Shared<K> = Arc<Mutex<Inner<K>>>;

/// State the broadcast handler (owned by foca) shares with the node.
#[derive(Debug)]
struct Inner<K> {
    table: AdvertTable<K>,
    now_ms: u64,
    changed: Vec<(K, u64)>,
}

fn lock<K>(s: &Shared<K>) -> MutexGuard<'_, Inner<K>> {
    // nothing panics while holding it; if something did, the table is
    // still consistent (every update is a single insert)
    s.lock().unwrap_or_else(|e| e.into_inner())
}

struct Handler<K>(Shared<K>);

impl<I: SwimIdentity> BroadcastHandler<I> for Handler<I::Key> {
    type Key = AdvertKey<I::Key>;
    type Error = postcard::Error;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&I>,
    ) -> Result<Option<Self::Key>, Self::Error> {
        let w: WireAdvert<I::Key> = postcard::from_bytes(data)?;
        let mut inner = lock(&self.0);
        let now = inner.now_ms;
        let new = match sender {
            // ours, just published: the table has it already
            None => true,
            Some(_) => {
                inner
                    .table
                    .offer(&w.origin, w.version, None, &w.payload, now)
                    == Offer::Newer
            }
        };
        if !new {
            return Ok(None);
        }
        if sender.is_some() {
            inner.changed.push((w.origin.clone(), w.version));
        }
        Ok(Some(AdvertKey {
            origin: w.origin,
            version: w.version,
        }))
    }
}

/// Timers foca asked for, on the caller's clock; ties in arrival order, so
/// a run is a function of its seed.
#[derive(Debug)]
struct Due<I> {
    at_ms: u64,
    seq: u64,
    timer: Timer<I>,
}

impl<I> PartialEq for Due<I> {
    fn eq(&self, o: &Self) -> bool {
        (self.at_ms, self.seq) == (o.at_ms, o.seq)
    }
}
impl<I> Eq for Due<I> {}
impl<I> PartialOrd for Due<I> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<I> Ord for Due<I> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at_ms, self.seq).cmp(&(o.at_ms, o.seq))
    }
}

/// What foca hands out while a call runs: collected, then drained.
struct Io<I: SwimIdentity> {
    now_ms: u64,
    seq: u64,
    timers: BinaryHeap<Reverse<Due<I>>>,
    outbox: Vec<(I, Vec<u8>)>,
    events: Vec<SwimEvent<I>>,
    bytes_sent: u64,
    packets_sent: u64,
}

impl<I: SwimIdentity> Runtime<I> for Io<I> {
    fn notify(&mut self, n: Notification<'_, I>) {
        let e = match n {
            Notification::MemberUp(m) => SwimEvent::Up(m.clone()),
            Notification::MemberDown(m) => SwimEvent::Down(m.clone()),
            Notification::Rename(a, b) => SwimEvent::Renamed(a.clone(), b.clone()),
            Notification::Rejoin(m) => SwimEvent::Rejoined(m.clone()),
            Notification::Defunct => SwimEvent::Defunct,
            Notification::Active | Notification::Idle => return,
        };
        self.events.push(e);
    }

    fn send_to(&mut self, to: I, data: &[u8]) {
        let mut p = Vec::with_capacity(data.len() + 1);
        p.push(KIND_SWIM);
        p.extend_from_slice(data);
        self.bytes_sent += p.len() as u64;
        self.packets_sent += 1;
        self.outbox.push((to, p));
    }

    fn submit_after(&mut self, timer: Timer<I>, after: Duration) {
        self.seq += 1;
        self.timers.push(Reverse(Due {
            at_ms: self.now_ms + after.as_millis() as u64,
            seq: self.seq,
            timer,
        }));
    }
}

/// Traffic a node sent, by kind (bytes include the kind byte).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub swim_bytes: u64,
    pub swim_packets: u64,
    pub push_bytes: u64,
    pub push_packets: u64,
}

/// One node's membership and adverts.
pub struct Swim<I: SwimIdentity> {
    cfg: SwimConfig,
    foca: Foca<I, PostcardCodec, SmallRng, Handler<I::Key>>,
    shared: Shared<I::Key>,
    io: Io<I>,
    rng: SmallRng,
    next_push_ms: u64,
    next_expire_ms: u64,
    push_bytes: u64,
    push_packets: u64,
}

impl<I: SwimIdentity> Swim<I> {
    /// A node that knows nobody yet. `seed` makes its random choices
    /// repeatable (the simulation); a real node seeds from the OS.
    pub fn new(me: I, cfg: SwimConfig, seed: u64, now_ms: u64) -> Result<Self, SwimError> {
        let config = cfg.foca()?;
        let shared = Arc::new(Mutex::new(Inner {
            // the relay ring holds a few pushes' worth of arrivals
            table: AdvertTable::new(
                me.addr(),
                cfg.hop_allowance_ms,
                cfg.forget_after_ms,
                cfg.push_relay * 4 + 8,
            ),
            now_ms,
            changed: Vec::new(),
        }));
        let foca = Foca::with_custom_broadcast(
            me,
            config,
            SmallRng::seed_from_u64(seed),
            PostcardCodec,
            Handler(shared.clone()),
        );
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        // spread pushes over the period so nodes started together do not
        // push in lockstep
        let first_push = now_ms + rng.random_range(0..cfg.push_period_ms);
        Ok(Self {
            next_expire_ms: now_ms + cfg.forget_after_ms,
            cfg,
            foca,
            shared,
            io: Io {
                now_ms,
                seq: 0,
                timers: BinaryHeap::new(),
                outbox: Vec::new(),
                events: Vec::new(),
                bytes_sent: 0,
                packets_sent: 0,
            },
            rng,
            next_push_ms: first_push,
            push_bytes: 0,
            push_packets: 0,
        })
    }

    pub fn identity(&self) -> &I {
        self.foca.identity()
    }

    pub fn config(&self) -> &SwimConfig {
        &self.cfg
    }

    fn set_now(&mut self, now_ms: u64) {
        self.io.now_ms = now_ms;
        lock(&self.shared).now_ms = now_ms;
    }

    /// Ask `seed` (any member) to let us in.
    pub fn join(&mut self, seed: I, now_ms: u64) -> Result<(), SwimError> {
        self.set_now(now_ms);
        self.foca.announce(seed, &mut self.io)?;
        Ok(())
    }

    /// Members we already know to be up (from the join RPC's roster, or a
    /// restart), taken without re-broadcasting them.
    pub fn seed_members(
        &mut self,
        members: impl IntoIterator<Item = I>,
        now_ms: u64,
    ) -> Result<(), SwimError> {
        self.set_now(now_ms);
        // foca probes members round-robin in the order it learned them and
        // shuffles only after a full pass: every node given the same roster
        // in the same order would probe the same member at the same time,
        // then leave it unprobed for a whole pass (a dead node found ~N/2
        // seconds late)
        let mut members: Vec<I> = members.into_iter().collect();
        members.shuffle(&mut self.rng);
        self.foca
            .apply_many(members.into_iter().map(Member::alive), false, &mut self.io)?;
        Ok(())
    }

    /// Leave on purpose: tell a few members we are going.
    pub fn leave(&mut self, now_ms: u64) -> Result<(), SwimError> {
        self.set_now(now_ms);
        self.foca.leave_cluster(&mut self.io)?;
        Ok(())
    }

    /// Our advert changed. `wide`: spread it by broadcast to every node
    /// (rare changes: the models held); otherwise it rides the pushes.
    pub fn publish(&mut self, payload: Vec<u8>, wide: bool, now_ms: u64) -> Result<u64, SwimError> {
        self.set_now(now_ms);
        let version = lock(&self.shared).table.publish(payload.clone(), now_ms);
        if wide {
            let w = WireAdvert {
                origin: self.foca.identity().addr(),
                version,
                age_ms: None,
                payload,
            };
            let data = postcard::to_allocvec(&w)?;
            self.foca.add_broadcast(&data)?;
        }
        Ok(version)
    }

    /// A packet from a peer.
    pub fn handle_packet(&mut self, data: &[u8], now_ms: u64) -> Result<(), SwimError> {
        self.set_now(now_ms);
        let (&kind, body) = data.split_first().ok_or(SwimError::Empty)?;
        match kind {
            KIND_SWIM => self.foca.handle_data(body, &mut self.io)?,
            KIND_PUSH => self.handle_push(body, now_ms)?,
            k => return Err(SwimError::UnknownKind(k)),
        }
        self.collect_changes();
        Ok(())
    }

    fn handle_push(&mut self, body: &[u8], now_ms: u64) -> Result<(), SwimError> {
        let adverts: Vec<WireAdvert<I::Key>> = postcard::from_bytes(body)?;
        let mut inner = lock(&self.shared);
        for w in adverts {
            let age = w.age_ms;
            if inner
                .table
                .offer(&w.origin, w.version, age, &w.payload, now_ms)
                == Offer::Newer
            {
                inner.changed.push((w.origin, w.version));
            }
        }
        Ok(())
    }

    fn collect_changes(&mut self) {
        let changed = std::mem::take(&mut lock(&self.shared).changed);
        self.io
            .events
            .extend(changed.into_iter().map(|(k, v)| SwimEvent::Advert(k, v)));
    }

    /// When [`Swim::tick`] next has something to do.
    pub fn next_deadline(&self) -> u64 {
        let t = self.io.timers.peek().map_or(u64::MAX, |Reverse(d)| d.at_ms);
        t.min(self.next_push_ms).min(self.next_expire_ms)
    }

    /// Run everything due at `now_ms`: foca's timers, the advert push.
    pub fn tick(&mut self, now_ms: u64) -> Result<(), SwimError> {
        self.set_now(now_ms);
        let mut first_err = None;
        while self
            .io
            .timers
            .peek()
            .is_some_and(|Reverse(d)| d.at_ms <= now_ms)
        {
            let Some(Reverse(due)) = self.io.timers.pop() else {
                break;
            };
            if !self.still_suspect(&due.timer) {
                continue;
            }
            // a timer error must not stop the later timers from running
            if let Err(e) = self.foca.handle_timer(due.timer, &mut self.io) {
                first_err.get_or_insert(SwimError::Foca(e));
            }
        }
        if now_ms >= self.next_push_ms {
            self.next_push_ms = now_ms + self.cfg.push_period_ms;
            if let Err(e) = self.push(now_ms) {
                first_err.get_or_insert(e);
            }
        }
        if now_ms >= self.next_expire_ms {
            self.next_expire_ms = now_ms + self.cfg.forget_after_ms / 4;
            lock(&self.shared).table.expire(now_ms);
        }
        self.collect_changes();
        first_err.map_or(Ok(()), Err)
    }

    /// A suspicion's timer is only worth handing to foca while the member is
    /// still suspect at that incarnation. foca 2.0.0 checks that before it
    /// declares the member down, but then sends it TurnUndead even when the
    /// suspicion was refuted (with `notify_down_members`, which a healed
    /// partition needs): the refuting node believed it was declared down and
    /// rejoined under a new incarnation, about once a minute per 100 nodes at
    /// 5% loss in the simulation. A refuted suspicion's timer is dropped here.
    fn still_suspect(&self, timer: &Timer<I>) -> bool {
        let Timer::ChangeSuspectToDown {
            member_id,
            incarnation,
            ..
        } = timer
        else {
            return true;
        };
        self.foca.iter_membership_state().any(|m| {
            m.id() == member_id
                && m.incarnation() == *incarnation
                && m.state() == foca::State::Suspect
        })
    }

    fn push(&mut self, now_ms: u64) -> Result<(), SwimError> {
        let n = self.foca.num_members();
        if n == 0 {
            return Ok(());
        }
        let fanout = self.cfg.push_fanout.min(n);
        let mut picks: Vec<usize> = Vec::with_capacity(fanout);
        while picks.len() < fanout {
            let i = self.rng.random_range(0..n);
            if !picks.contains(&i) {
                picks.push(i);
            }
        }
        picks.sort_unstable();
        let targets: Vec<I> = self
            .foca
            .iter_members()
            .enumerate()
            .filter(|(i, _)| picks.binary_search(i).is_ok())
            .map(|(_, m)| m.id().clone())
            .collect();
        let inner = lock(&self.shared);
        for to in targets {
            let skip = to.addr();
            let mut list: Vec<WireAdvert<I::Key>> = Vec::with_capacity(self.cfg.push_relay + 1);
            if let Some(a) = inner.table.local() {
                list.push(wire(self.foca.identity().addr(), a, now_ms));
            }
            for (origin, _) in
                inner
                    .table
                    .freshest(self.cfg.push_relay, self.cfg.stale_after_ms, &skip, now_ms)
            {
                if let Some(a) = inner.table.get(&origin) {
                    list.push(wire(origin, a, now_ms));
                }
            }
            if list.is_empty() {
                continue;
            }
            let mut p = vec![KIND_PUSH];
            p.extend(postcard::to_allocvec(&list)?);
            if p.len() > self.cfg.max_packet {
                // never happens with sane payloads; say so rather than send
                // what a peer will refuse
                return Err(SwimError::Config("push_relay adverts exceed max_packet"));
            }
            self.push_bytes += p.len() as u64;
            self.push_packets += 1;
            self.io.outbox.push((to, p));
        }
        Ok(())
    }

    /// Packets to send: (to, bytes). Drain after every call.
    pub fn take_outbox(&mut self) -> Vec<(I, Vec<u8>)> {
        std::mem::take(&mut self.io.outbox)
    }

    /// Events since the last drain.
    pub fn take_events(&mut self) -> Vec<SwimEvent<I>> {
        std::mem::take(&mut self.io.events)
    }

    /// Members up (alive or suspect), not us.
    pub fn members(&self) -> impl Iterator<Item = &I> {
        self.foca.iter_members().map(|m| m.id())
    }

    pub fn num_members(&self) -> usize {
        self.foca.num_members()
    }

    /// A copy of the adverts held (ours included), for the scheduler.
    pub fn adverts(&self) -> Vec<(I::Key, Advert)> {
        lock(&self.shared)
            .table
            .iter()
            .map(|(k, a)| (k.clone(), a.clone()))
            .collect()
    }

    /// The advert held for one node.
    pub fn advert(&self, key: &I::Key) -> Option<Advert> {
        lock(&self.shared).table.get(key).cloned()
    }

    /// Offers of adverts older than one held, since start.
    pub fn stale_rejected(&self) -> u64 {
        lock(&self.shared).table.stale_rejected
    }

    pub fn traffic(&self) -> Traffic {
        Traffic {
            swim_bytes: self.io.bytes_sent,
            swim_packets: self.io.packets_sent,
            push_bytes: self.push_bytes,
            push_packets: self.push_packets,
        }
    }
}

fn wire<K>(origin: K, a: &Advert, now_ms: u64) -> WireAdvert<K> {
    WireAdvert {
        origin,
        version: a.version,
        age_ms: a.age_ms(now_ms),
        payload: a.payload.clone(),
    }
}
