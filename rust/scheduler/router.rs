use rustc_hash::FxHashMap as HashMap;

use super::policy::{Candidate, Policy, PrefixAware};
use super::prefix::{chain_into, PrefixIndex};

/// What the scheduler knows about one node, from its latest advert (or, for the
/// local node, from itself). Times are milliseconds on the caller's clock.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeState {
    pub id: String,
    /// Membership says the node is up.
    pub alive: bool,
    /// When the advert this state came from was received.
    pub advert_at_ms: u64,
    /// Models the node holds a verified copy of.
    pub models: Vec<String>,
    /// Models loaded in its engine right now.
    pub loaded: Vec<String>,
    /// Loaded models with requests running on them: unloading one would hurt
    /// a client, so a node whose loaded models are all busy (and at
    /// `max_loaded`) is a poor place to load another model.
    pub busy: Vec<String>,
    /// The engine's bound on loaded models (`engine.max_loaded_models`);
    /// 0 when the node did not say, taken as "room to load".
    pub max_loaded: u32,
    /// Requests running on the node.
    pub in_flight: u32,
    /// Requests waiting for a slot on the node.
    pub queue_depth: u32,
    /// The node's queue bound; at it the node is saturated.
    pub max_queue: u32,
}

impl NodeState {
    pub(crate) fn has_loaded(&self, model: &str) -> bool {
        self.loaded.iter().any(|m| m == model)
    }
    /// `model` is loaded, or loading it needs no eviction of a busy model: the
    /// engine has a free model slot, or one of its loaded models is idle.
    pub(crate) fn can_load_without_evicting_busy(&self, model: &str) -> bool {
        self.has_loaded(model)
            || self.max_loaded == 0
            || self.loaded.len() < self.max_loaded as usize
            || self.loaded.iter().any(|m| !self.busy.contains(m))
    }
    /// Its queue is full. `max_queue` 0 means "no queue" (a request runs at
    /// once or is refused with 503), never "always full": such a node is tried
    /// and a refusal moves the request to the next holder.
    pub(crate) fn saturated(&self) -> bool {
        self.max_queue > 0 && self.queue_depth >= self.max_queue
    }
}

/// Why no node can take a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("model '{0}' not found")]
    UnknownModel(String),
    #[error("every node holding '{0}' is busy")]
    Saturated(String),
}

/// Why a request went where it did, counted per decision
/// (`ollama_distributed_routing_decisions_total{reason}`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Decisions {
    /// To the node with the longest warm prefix, longer than another candidate's.
    pub prefix_hit: u64,
    /// No candidate had more of the prefix than another: load decided.
    pub load: u64,
    /// A node with more of the prefix warm was passed over for its load: the
    /// prefix spreads to a second node.
    pub spread: u64,
}

/// Node ids [`Router::route_prompt`] returns at most: a request is tried on
/// at most `1 + scheduler.retries + scheduler.migration_limit` nodes (6 by
/// default), and turning a 1,000-node cluster's whole order into strings
/// (and Python objects) cost more than the decision.
pub const ROUTE_PROMPT_MAX: usize = 16;

/// A match shorter than this many blocks counts as none. The head of every
/// rendered prompt is the chat template's (`<|im_start|>system\n...`, a
/// default system prompt), the same for all tenants: one or two shared
/// blocks made every node that had served anything look "warmer" than an
/// idle one, and kept new tenants on the nodes that served first. Four
/// blocks (256 bytes, ~64 tokens) save about a quarter of a second of prompt
/// evaluation on a CPU node, less than one request queued there costs.
pub const MIN_MATCH_BLOCKS: u32 = 4;

/// The last routed request's prefix (its chain is `Router::chain`), until
/// [`Router::dispatched`] says where it went.
struct Pending {
    best: u32,
    worst: u32,
    at_ms: u64,
}

/// One known node: its state and what the router keeps beside it.
struct Slot {
    state: NodeState,
    /// Its id is the deciding node's.
    local: bool,
    /// Its place in id order.
    order: u32,
    /// Requests this router sent to it and not yet finished: a lower bound
    /// on its load that an advert taken before they arrived must not erase
    /// (a burst would land on one node again).
    sent: u32,
}

/// The cluster view the scheduler decides on.
///
/// Nodes live in a slab of slots (a small integer per node, reused after it
/// leaves): the model -> holders index, the prefix index and a decision's
/// candidates all name nodes by slot, so a decision hashes no node id and
/// allocates nothing but its answer. Its cost is one binary search over the
/// prompt's block chain in the global block -> nodes index, plus one pass
/// over the model's holders and a selection of the best few: O(prompt blocks
/// + candidates).
pub struct Router {
    local: String,
    stale_after_ms: u64,
    ids: HashMap<String, u32>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// model -> slots of the nodes that hold it, so a decision looks at the
    /// holders only instead of scanning every node's model list.
    /// FxHash, not SipHash: the keys are names from our own adverts.
    holders: HashMap<String, Vec<u32>>,
    policy: Box<dyn Policy>,
    prefixes: PrefixIndex,
    pending: Option<Pending>,
    decisions: Decisions,
    /// Reused per decision: the prompt's chain and the candidates.
    chain: Vec<u64>,
    candidates: Vec<Candidate>,
}

impl Router {
    /// `stale_after_ms`: an advert older than this counts as unknown, not idle.
    pub fn new(local: impl Into<String>, stale_after_ms: u64) -> Self {
        Self {
            local: local.into(),
            stale_after_ms,
            ids: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            holders: HashMap::default(),
            policy: Box::new(PrefixAware),
            prefixes: PrefixIndex::default(),
            pending: None,
            decisions: Decisions::default(),
            chain: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// Swap the ranking policy.
    pub fn set_policy(&mut self, policy: Box<dyn Policy>) {
        self.policy = policy;
    }

    /// The ranking policy's name.
    pub fn policy(&self) -> &'static str {
        self.policy.name()
    }

    /// Tune staleness live.
    pub fn set_stale_after(&mut self, ms: u64) {
        self.stale_after_ms = ms;
    }

    /// Replace the prefix index with an empty one holding `blocks` per node.
    pub fn set_prefix_capacity(&mut self, blocks: usize) {
        self.prefixes = PrefixIndex::new(blocks);
        self.pending = None;
    }

    /// Decisions so far, by reason.
    pub fn decisions(&self) -> Decisions {
        self.decisions
    }

    /// Blocks of the prefix index held for node `id`.
    pub fn prefix_len(&self, id: &str) -> usize {
        self.ids.get(id).map_or(0, |&s| self.prefixes.len(s))
    }

    /// Blocks held in the prefix index over all nodes.
    pub fn prefix_total(&self) -> usize {
        self.prefixes.total()
    }

    /// How many of `chain`'s leading blocks node `id` has warm, as far as the
    /// router knows.
    pub fn prefix_matched(&self, id: &str, chain: &[u64]) -> u32 {
        self.ids
            .get(id)
            .map_or(0, |&s| self.prefixes.matched(s, chain))
    }

    fn slot_of(&mut self, id: &str) -> u32 {
        if let Some(&s) = self.ids.get(id) {
            return s;
        }
        let s = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            (self.slots.len() - 1) as u32
        });
        self.ids.insert(id.to_owned(), s);
        s
    }

    /// Keep `Slot::order` the id order after a join or a departure (rare;
    /// decisions read the order).
    fn reorder(&mut self) {
        let mut by_id: Vec<(&String, u32)> = self.ids.iter().map(|(k, &v)| (k, v)).collect();
        by_id.sort_unstable();
        let order: Vec<(u32, u32)> = by_id
            .into_iter()
            .enumerate()
            .map(|(i, (_, s))| (s, i as u32))
            .collect();
        for (s, i) in order {
            if let Some(Some(slot)) = self.slots.get_mut(s as usize) {
                slot.order = i;
            }
        }
    }

    /// Insert or replace a node's state.
    pub fn update(&mut self, mut state: NodeState) {
        let s = self.slot_of(&state.id);
        let known = self.slots[s as usize].is_some();
        if !known {
            let local = state.id == self.local;
            self.slots[s as usize] = Some(Slot {
                state: NodeState::default(),
                local,
                order: 0,
                sent: 0,
            });
            self.reorder();
        }
        let Some(slot) = self.slots[s as usize].as_mut() else {
            return;
        };
        state.in_flight = state.in_flight.max(slot.sent);
        let unchanged = known && slot.state.models == state.models;
        let old = std::mem::replace(&mut slot.state, state);
        if !unchanged {
            self.unindex(s, &old.models);
            let Some(slot) = self.slots[s as usize].as_ref() else {
                return;
            };
            for m in &slot.state.models {
                let ids = self.holders.entry(m.clone()).or_default();
                if !ids.contains(&s) {
                    ids.push(s);
                }
            }
        }
    }

    /// What node `id` keeps warm, from its advert taken at `advert_at_ms`
    /// (chain hashes, [`super::prefix::chain`]): it replaces the router's guess
    /// for that node, routes sent there since then kept.
    pub fn set_warm(&mut self, id: &str, warm: &[u64], advert_at_ms: u64) {
        let s = self.slot_of(id);
        self.prefixes.replace(s, warm, advert_at_ms);
    }

    /// Forget a node that left the cluster.
    pub fn remove(&mut self, id: &str) {
        let Some(s) = self.ids.remove(id) else {
            return;
        };
        if let Some(slot) = self.slots[s as usize].take() {
            self.unindex(s, &slot.state.models);
        }
        self.prefixes.remove(s);
        self.free.push(s);
        self.reorder();
    }

    fn unindex(&mut self, s: u32, models: &[String]) {
        for m in models {
            if let Some(ids) = self.holders.get_mut(m) {
                ids.retain(|&x| x != s);
                if ids.is_empty() {
                    self.holders.remove(m);
                }
            }
        }
    }

    /// Membership changed a node's liveness.
    pub fn set_alive(&mut self, id: &str, alive: bool) {
        if let Some(slot) = self.slot_mut(id) {
            slot.state.alive = alive;
        }
    }

    fn slot_mut(&mut self, id: &str) -> Option<&mut Slot> {
        let &s = self.ids.get(id)?;
        self.slots[s as usize].as_mut()
    }

    /// Count a request sent to `id` before its next advert arrives, so a burst
    /// spreads instead of landing on the node that looked idlest. The prefix
    /// of the request last routed with [`Router::route_prompt`] is now (about
    /// to be) warm there, and the decision is counted by its reason.
    pub fn dispatched(&mut self, id: &str) {
        let s = self.ids.get(id).copied();
        if let Some(slot) = self.slot_mut(id) {
            slot.state.in_flight += 1;
            slot.sent += 1;
        }
        self.policy.dispatched();
        if let (Some(p), Some(s)) = (self.pending.take(), s) {
            let got = self
                .prefixes
                .last_match(s)
                .unwrap_or_else(|| self.prefixes.matched(s, &self.chain));
            let got = if got < MIN_MATCH_BLOCKS { 0 } else { got };
            if got < p.best {
                self.decisions.spread += 1;
            } else if got > p.worst {
                self.decisions.prefix_hit += 1;
            } else {
                self.decisions.load += 1;
            }
            self.prefixes.routed(s, &self.chain, p.at_ms);
        }
    }

    /// Undo [`Router::dispatched`] on completion, error or cancellation.
    pub fn finished(&mut self, id: &str) {
        if let Some(slot) = self.slot_mut(id) {
            slot.state.in_flight = slot.state.in_flight.saturating_sub(1);
            slot.sent = slot.sent.saturating_sub(1);
        }
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeState> {
        self.slots.iter().flatten().map(|s| &s.state)
    }

    /// Fill `self.candidates` with the open holders of `model`; with
    /// `prefix`, their matches from the last [`PrefixIndex::compute`].
    fn open(&mut self, model: &str, now_ms: u64, prefix: bool) -> Result<(), RouteError> {
        self.candidates.clear();
        let Some(holders) = self.holders.get(model) else {
            return Err(RouteError::UnknownModel(model.to_owned()));
        };
        let mut usable = 0usize;
        for &s in holders {
            let Some(slot) = self.slots[s as usize].as_ref() else {
                continue;
            };
            let n = &slot.state;
            if !(slot.local
                || (n.alive && now_ms.saturating_sub(n.advert_at_ms) <= self.stale_after_ms))
            {
                continue;
            }
            usable += 1;
            if n.saturated() {
                continue;
            }
            let loaded = n.has_loaded(model);
            let (matched, cached) = if prefix {
                let m = self.prefixes.last_match(s).unwrap_or(0);
                (
                    if m < MIN_MATCH_BLOCKS { 0 } else { m },
                    self.prefixes.len(s) as u32,
                )
            } else {
                (0, 0)
            };
            self.candidates.push(Candidate {
                slot: s,
                order: slot.order,
                in_flight: n.in_flight,
                load: n.in_flight + n.queue_depth,
                loaded,
                can_load: loaded || n.can_load_without_evicting_busy(model),
                local: slot.local,
                matched,
                cached,
            });
        }
        if usable == 0 {
            return Err(RouteError::UnknownModel(model.to_owned()));
        }
        if self.candidates.is_empty() {
            return Err(RouteError::Saturated(model.to_owned()));
        }
        Ok(())
    }

    fn ids_of_best(&self, top: usize) -> Vec<String> {
        self.candidates
            .iter()
            .take(top)
            .filter_map(|c| self.slots[c.slot as usize].as_ref())
            .map(|s| s.state.id.clone())
            .collect()
    }

    /// Node ids that can serve `model`, best first, with no prompt to match;
    /// the caller tries them in order, moving on while no token has been sent.
    pub fn route(&mut self, model: &str, now_ms: u64) -> Result<Vec<String>, RouteError> {
        self.open(model, now_ms, false)?;
        let all = self.candidates.len();
        self.policy.rank(&mut self.candidates, all);
        Ok(self.ids_of_best(all))
    }

    /// As [`Router::route`], for a request whose prompt is `prompt` (the
    /// rendered prompt, or the canonical message list): nodes that have more
    /// of it warm rank higher under `prefix_aware`. The best
    /// [`ROUTE_PROMPT_MAX`] only. The next [`Router::dispatched`] records
    /// where it went.
    pub fn route_prompt(
        &mut self,
        model: &str,
        prompt: &str,
        now_ms: u64,
    ) -> Result<Vec<String>, RouteError> {
        self.pending = None;
        chain_into(model, prompt, &mut self.chain);
        self.prefixes.compute(&self.chain);
        self.open(model, now_ms, true)?;
        let best = self.candidates.iter().map(|c| c.matched).max().unwrap_or(0);
        let worst = self.candidates.iter().map(|c| c.matched).min().unwrap_or(0);
        self.policy.rank(&mut self.candidates, ROUTE_PROMPT_MAX);
        self.pending = Some(Pending {
            best,
            worst,
            at_ms: now_ms,
        });
        Ok(self.ids_of_best(ROUTE_PROMPT_MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::super::policy::LeastLoaded;
    use super::*;

    fn node(id: &str, models: &[&str], loaded: &[&str], in_flight: u32) -> NodeState {
        NodeState {
            id: id.into(),
            alive: true,
            advert_at_ms: 1_000,
            models: models.iter().map(|s| s.to_string()).collect(),
            loaded: loaded.iter().map(|s| s.to_string()).collect(),
            in_flight,
            queue_depth: 0,
            max_queue: 8,
            ..NodeState::default()
        }
    }

    /// `n` with its engine's bound on loaded models and its busy models.
    fn engine(mut n: NodeState, max_loaded: u32, busy: &[&str]) -> NodeState {
        n.max_loaded = max_loaded;
        n.busy = busy.iter().map(|s| s.to_string()).collect();
        n
    }

    fn router(nodes: Vec<NodeState>) -> Router {
        let mut r = Router::new("a", 3_000);
        r.set_policy(Box::new(LeastLoaded));
        for n in nodes {
            r.update(n);
        }
        r
    }

    #[test]
    fn an_advert_taken_before_a_burst_arrived_does_not_erase_it() {
        let mut r = router(vec![
            node("b", &["m"], &["m"], 0),
            node("c", &["m"], &["m"], 0),
        ]);
        r.dispatched("c");
        r.dispatched("c");
        r.update(node("c", &["m"], &["m"], 0)); // c's advert from before the two arrived
        assert_eq!(r.route("m", 1_000).unwrap()[0], "b");
        r.finished("c");
        r.finished("c");
        r.update(node("c", &["m"], &["m"], 0));
        r.update(node("b", &["m"], &["m"], 1));
        assert_eq!(r.route("m", 1_000).unwrap()[0], "c");
    }

    #[test]
    fn unknown_model_is_an_error() {
        let mut r = router(vec![node("a", &["x"], &[], 0)]);
        assert_eq!(
            r.route("y", 1_000),
            Err(RouteError::UnknownModel("y".into()))
        );
    }

    #[test]
    fn prefers_loaded_then_fewest_in_flight_then_local() {
        let mut r = router(vec![
            node("a", &["m"], &[], 0),
            node("b", &["m"], &["m"], 1),
            node("c", &["m"], &["m"], 0),
        ]);
        assert_eq!(r.route("m", 1_000).unwrap(), vec!["c", "b", "a"]);
        let mut r = router(vec![node("a", &["m"], &[], 0), node("b", &["m"], &[], 0)]);
        assert_eq!(r.route("m", 1_000).unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn a_node_with_an_idle_loaded_model_beats_one_full_of_busy_models() {
        // m is loaded nowhere; a (local, 1 in flight) would have to unload its
        // busy x, b (2 in flight) can unload its idle z
        let mut r = router(vec![
            engine(node("a", &["m"], &["x"], 1), 1, &["x"]),
            engine(node("b", &["m"], &["y", "z"], 2), 2, &["y"]),
        ]);
        assert_eq!(r.route("m", 1_000).unwrap(), vec!["b", "a"]);
    }

    #[test]
    fn a_node_with_a_free_model_slot_beats_one_full_of_busy_models() {
        let mut r = router(vec![
            engine(node("a", &["m"], &["x"], 1), 1, &["x"]),
            engine(node("b", &["m"], &["y"], 2), 2, &["y"]),
        ]);
        assert_eq!(r.route("m", 1_000).unwrap(), vec!["b", "a"]);
        // with the slot taken by another busy model, b is as full as a: fewest
        // in flight decides again
        let mut r = router(vec![
            engine(node("a", &["m"], &["x"], 1), 1, &["x"]),
            engine(node("b", &["m"], &["y", "w"], 2), 2, &["y", "w"]),
        ]);
        assert_eq!(r.route("m", 1_000).unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn among_nodes_that_can_load_fewest_in_flight_then_local() {
        // b can unload its idle y, a has a free slot, c must unload its busy w
        let mut r = router(vec![
            engine(node("a", &["m"], &["x"], 2), 2, &["x"]),
            engine(node("b", &["m"], &["y"], 1), 1, &[]),
            engine(node("c", &["m"], &["w"], 1), 1, &["w"]),
        ]);
        assert_eq!(r.route("m", 1_000).unwrap(), vec!["b", "a", "c"]);
        let mut r = router(vec![
            engine(node("b", &["m"], &[], 0), 1, &[]),
            engine(node("a", &["m"], &["x"], 0), 2, &[]),
        ]);
        assert_eq!(r.route("m", 1_000).unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn loaded_still_beats_room_to_load() {
        // a holds m loaded and every model of it is busy; b has free slots
        let mut r = router(vec![
            engine(node("a", &["m"], &["m", "x"], 2), 2, &["m", "x"]),
            engine(node("b", &["m"], &[], 0), 3, &[]),
        ]);
        assert_eq!(r.route("m", 1_000).unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn bounded_load_overrides_room_to_load() {
        // mean in flight is 4, bound 6: b has a free slot but 9 in flight;
        // c can unload its idle z, a must unload its busy x
        let mut r = router(vec![
            engine(node("a", &["m"], &["x"], 1), 1, &["x"]),
            engine(node("b", &["m"], &[], 9), 2, &[]),
            engine(node("c", &["m"], &["y", "z"], 2), 2, &["y"]),
        ]);
        assert_eq!(r.route("m", 1_000).unwrap(), vec!["c", "a", "b"]);
    }

    #[test]
    fn a_node_that_did_not_advertise_its_bound_is_not_passed_over() {
        // an advert without max_loaded (0): no guess that it must evict
        let mut r = router(vec![
            engine(node("a", &["m"], &["x"], 1), 0, &["x"]),
            engine(node("b", &["m"], &[], 2), 2, &[]),
        ]);
        assert_eq!(r.route("m", 1_000).unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn bounded_load_overrides_warmth() {
        // mean in flight is 3, bound 4.75: the warm node with 9 is passed over
        let mut r = router(vec![
            node("a", &["m"], &[], 0),
            node("b", &["m"], &["m"], 9),
            node("c", &["m"], &[], 0),
        ]);
        assert_eq!(r.route("m", 1_000).unwrap()[2], "b");
    }

    #[test]
    fn dead_stale_and_saturated_nodes_are_skipped() {
        let mut dead = node("b", &["m"], &["m"], 0);
        dead.alive = false;
        let mut stale = node("c", &["m"], &["m"], 0);
        stale.advert_at_ms = 0;
        let mut full = node("d", &["m"], &["m"], 0);
        full.queue_depth = 8;
        let mut r = router(vec![node("a", &["m"], &[], 5), dead, stale, full]);
        assert_eq!(r.route("m", 4_000).unwrap(), vec!["a"]);
    }

    #[test]
    fn all_saturated_is_distinct_from_unknown() {
        let mut full = node("a", &["m"], &["m"], 0);
        full.queue_depth = 8;
        let mut r = router(vec![full]);
        assert_eq!(r.route("m", 1_000), Err(RouteError::Saturated("m".into())));
    }

    #[test]
    fn max_queue_zero_means_no_queue_not_always_full() {
        let mut a = node("a", &["m"], &["m"], 1);
        a.max_queue = 0;
        let mut b = node("b", &["m"], &["m"], 0);
        b.max_queue = 0;
        let mut r = router(vec![a, b]);
        assert_eq!(r.route("m", 1_000).unwrap(), vec!["b", "a"]);
    }

    #[test]
    fn dispatch_and_finish_count_load() {
        let mut r = router(vec![
            node("a", &["m"], &["m"], 0),
            node("b", &["m"], &["m"], 0),
        ]);
        r.dispatched("a");
        assert_eq!(r.route("m", 1_000).unwrap()[0], "b");
        r.finished("a");
        r.finished("a");
        assert_eq!(r.route("m", 1_000).unwrap()[0], "a");
    }

    #[test]
    fn model_index_follows_updates_and_removals() {
        let mut r = router(vec![
            node("a", &["m"], &[], 0),
            node("b", &["m", "n"], &[], 0),
        ]);
        assert_eq!(r.route("n", 1_000).unwrap(), vec!["b"]);
        // b drops n and gains o; a leaves
        r.update(node("b", &["m", "o"], &[], 0));
        assert_eq!(
            r.route("n", 1_000),
            Err(RouteError::UnknownModel("n".into()))
        );
        assert_eq!(r.route("o", 1_000).unwrap(), vec!["b"]);
        r.remove("a");
        assert_eq!(r.route("m", 1_000).unwrap(), vec!["b"]);
        r.remove("b");
        assert!(r.holders.is_empty());
    }
}
