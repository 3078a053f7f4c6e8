use std::collections::HashMap;

use super::fair::{Class, TenantView, Tenants};

/// The outcome of asking for an engine slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Run now on this slot index.
    Run(u32),
    /// Every slot is busy; the ticket waits in the model's queue.
    Queued,
    /// The node-wide queue bound is reached: refuse (HTTP 503 + Retry-After).
    Full,
    /// This tenant already holds its share of the queue: refuse it (HTTP 429 +
    /// Retry-After) while other tenants are still admitted.
    TenantFull,
}

/// Who asks for a slot, and for how much work.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub tenant: &'a str,
    /// The tenant's weight: its share of tokens is proportional to it (> 0).
    pub weight: f64,
    pub class: Class,
    /// Estimated tokens, prompt + generated, charged on admission.
    pub tokens: u64,
}

impl Default for Ask<'_> {
    fn default() -> Self {
        Self {
            tenant: "",
            weight: 1.0,
            class: Class::Interactive,
            tokens: 0,
        }
    }
}

#[derive(Debug, Clone)]
struct Work {
    ticket: u64,
    tenant: String,
    weight: f64,
    class: Class,
    tokens: u64,
    /// When it arrived (queued) or started (running), in the caller's clock.
    since: u64,
}

impl Work {
    fn new(ticket: u64, ask: &Ask<'_>, since: u64) -> Self {
        Self {
            ticket,
            tenant: ask.tenant.to_owned(),
            weight: sane_weight(ask.weight),
            class: ask.class,
            tokens: ask.tokens,
            since,
        }
    }
}

/// Is the (counter, waiting) key `a` served before `b`? Strictly: a tie
/// leaves the earlier waiter first.
fn earlier(a: (f64, usize), b: (f64, usize)) -> bool {
    a.0 < b.0 || (a.0 == b.0 && a.1 < b.1)
}

fn sane_weight(w: f64) -> f64 {
    if w.is_finite() && w > 0.0 {
        w
    } else {
        1.0
    }
}

#[derive(Debug, Default)]
struct ModelSlots {
    busy: Vec<Option<Work>>,
    /// In arrival order; the order served is `SlotPool::pick`'s.
    waiting: Vec<Work>,
    /// Monotonic "time" of the last use, fed by the caller, for eviction.
    last_used: u64,
}

impl ModelSlots {
    fn free_slot(&self, limit: usize) -> Option<u32> {
        self.busy
            .iter()
            .take(limit)
            .position(Option::is_none)
            .map(|i| i as u32)
    }
    fn in_flight(&self) -> usize {
        self.busy.iter().filter(|b| b.is_some()).count()
    }
}

/// One request in the queue listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub model: String,
    pub ticket: u64,
    pub tenant: String,
    pub class: Class,
    /// Running: the slot; queued: the 1-based position it would be served in.
    pub running: bool,
    pub slot_or_position: u32,
    pub tokens: u64,
    pub age: u64,
}

/// Engine slots per model and one bounded wait queue for the node, served
/// fairly across tenants by tokens (see `fair`), interactive before batch.
#[derive(Debug)]
pub struct SlotPool {
    num_parallel: u32,
    max_queue: usize,
    /// The fraction of `max_queue` one tenant of weight 1 may fill.
    tenant_share: f64,
    /// A batch request waiting this long competes as interactive.
    promote_after: u64,
    queued: usize,
    models: HashMap<String, ModelSlots>,
    tenants: Tenants,
}

/// Defaults: one tenant may fill half of the queue, so another always finds
/// room; batch work waits at most 15 s (in the caller's milliseconds) before it
/// competes with interactive work, about the time an interactive answer of a
/// small model on a CPU takes.
pub const DEFAULT_TENANT_SHARE: f64 = 0.5;
pub const DEFAULT_PROMOTE_AFTER: u64 = 15_000;

impl SlotPool {
    /// `num_parallel` slots per model; at most `max_queue` requests wait node-wide.
    pub fn new(num_parallel: u32, max_queue: usize) -> Self {
        Self {
            num_parallel: num_parallel.max(1),
            max_queue,
            tenant_share: DEFAULT_TENANT_SHARE,
            promote_after: DEFAULT_PROMOTE_AFTER,
            queued: 0,
            models: HashMap::new(),
            tenants: Tenants::default(),
        }
    }

    /// Change the knobs live (SIGHUP). Busy slots beyond a smaller `num_parallel`
    /// drain naturally: they are released and never handed out again.
    pub fn configure(&mut self, num_parallel: u32, max_queue: usize) {
        self.num_parallel = num_parallel.max(1);
        self.max_queue = max_queue;
    }

    /// The fairness knobs: a tenant's share of the queue (0 < share <= 1, per
    /// unit of weight) and the age at which batch work is promoted.
    pub fn configure_fairness(&mut self, tenant_share: f64, promote_after: u64) {
        self.tenant_share = if tenant_share.is_finite() && tenant_share > 0.0 {
            tenant_share.min(1.0)
        } else {
            DEFAULT_TENANT_SHARE
        };
        self.promote_after = promote_after;
    }

    /// How many requests one tenant of `weight` may keep waiting.
    pub fn tenant_cap(&self, weight: f64) -> usize {
        let cap = (self.max_queue as f64 * self.tenant_share * sane_weight(weight)).ceil();
        (cap as usize).clamp(1, self.max_queue.max(1))
    }

    fn entry(&mut self, model: &str) -> &mut ModelSlots {
        let n = self.num_parallel as usize;
        let slots = self.models.entry(model.to_owned()).or_default();
        if slots.busy.len() < n {
            slots.busy.resize(n, None);
        }
        slots
    }

    /// Ask for a slot of `model` for request `ticket` at time `now`.
    pub fn admit(&mut self, model: &str, ticket: u64, now: u64, ask: Ask<'_>) -> Admit {
        let limit = self.num_parallel as usize;
        let cap = self.tenant_cap(ask.weight);
        let (max_queue, queued) = (self.max_queue, self.queued);
        let tenant_queued = self.tenants.queued(ask.tenant);
        let slots = self.entry(model);
        slots.last_used = now;
        if slots.waiting.is_empty() {
            if let Some(i) = slots.free_slot(limit) {
                slots.busy[i as usize] = Some(Work::new(ticket, &ask, now));
                self.tenants
                    .start(ask.tenant, ask.tokens, sane_weight(ask.weight), false);
                return Admit::Run(i);
            }
        }
        // a full queue refuses everyone alike (503); short of that, a tenant
        // holding its share is refused alone (429) so others still get in
        if queued >= max_queue {
            return Admit::Full;
        }
        if tenant_queued >= cap {
            return Admit::TenantFull;
        }
        slots.waiting.push(Work::new(ticket, &ask, now));
        self.tenants.enqueue(ask.tenant);
        self.queued += 1;
        Admit::Queued
    }

    /// Is `w` served with interactive work at `now` (interactive, or batch old
    /// enough to be promoted)?
    fn urgent(&self, w: &Work, now: u64) -> bool {
        w.class == Class::Interactive || now.saturating_sub(w.since) >= self.promote_after
    }

    /// The waiter a free slot goes to: interactive (or promoted) work first;
    /// among it the tenant with the smallest virtual counter; on equal
    /// counters the tenant with fewer requests waiting (a tenant arriving
    /// while another is backlogged is lifted to that one's counter: it goes
    /// first rather than behind the backlog); then the oldest.
    fn pick(&self, waiting: &[Work], now: u64) -> Option<usize> {
        let any_urgent = waiting.iter().any(|w| self.urgent(w, now));
        let mut best: Option<(usize, (f64, usize))> = None;
        for (i, w) in waiting.iter().enumerate() {
            if any_urgent && !self.urgent(w, now) {
                continue;
            }
            let key = (
                self.tenants.counter(&w.tenant),
                self.tenants.queued(&w.tenant),
            );
            // strictly smaller: the earlier (older) waiter wins a tie
            if best.map_or(true, |(_, b)| earlier(key, b)) {
                best = Some((i, key));
            }
        }
        best.map(|(i, _)| i)
    }

    /// Hand slot `idx` of `model` to the waiter `pick` chooses, if any.
    fn hand_over(&mut self, model: &str, idx: usize, now: u64) -> Option<u64> {
        let slots = self.models.get(model)?;
        let i = self.pick(&slots.waiting, now)?;
        let slots = self.models.get_mut(model)?;
        let mut w = slots.waiting.remove(i);
        self.queued -= 1;
        self.tenants.start(&w.tenant, w.tokens, w.weight, true);
        let ticket = w.ticket;
        w.since = now;
        slots.busy[idx] = Some(w);
        Some(ticket)
    }

    /// Free `slot` of `model`; `tokens` is what the request really took
    /// (prompt + generated), or None to keep the estimate charged on
    /// admission. When a request waits, the slot passes straight to the one
    /// chosen fairly and its ticket is returned so the caller can wake it.
    pub fn release(
        &mut self,
        model: &str,
        slot: u32,
        now: u64,
        tokens: Option<u64>,
    ) -> Option<(u64, u32)> {
        let limit = self.num_parallel as usize;
        let slots = self.models.get_mut(model)?;
        slots.last_used = now;
        let idx = slot as usize;
        let done = slots.busy.get_mut(idx)?.take()?;
        self.tenants
            .finish(&done.tenant, done.tokens, tokens, done.weight);
        if idx < limit {
            if let Some(ticket) = self.hand_over(model, idx, now) {
                return Some((ticket, slot));
            }
            return None;
        }
        // A shrunk pool may still have waiters and a free in-limit slot.
        let free = self.models.get(model)?.free_slot(limit)?;
        self.hand_over(model, free as usize, now)
            .map(|ticket| (ticket, free))
    }

    /// Withdraw a waiting ticket (its client went away). True when it was queued.
    pub fn cancel(&mut self, model: &str, ticket: u64) -> bool {
        let Some(slots) = self.models.get_mut(model) else {
            return false;
        };
        let Some(pos) = slots.waiting.iter().position(|w| w.ticket == ticket) else {
            return false;
        };
        let w = slots.waiting.remove(pos);
        self.queued -= 1;
        self.tenants.dequeue(&w.tenant);
        true
    }

    /// The order `model`'s waiters would be served in if nothing else
    /// arrived: `pick`'s rule run over copies of the counters. O(n^2) in the
    /// waiters with plain arithmetic inside (about a millisecond for 512).
    fn order(&self, model: &str, now: u64) -> Vec<usize> {
        let Some(slots) = self.models.get(model) else {
            return Vec::new();
        };
        let w = &slots.waiting;
        let mut ids: HashMap<&str, usize> = HashMap::new();
        let mut keys: Vec<(f64, usize)> = Vec::new();
        let tenant_of: Vec<usize> = w
            .iter()
            .map(|x| {
                *ids.entry(x.tenant.as_str()).or_insert_with(|| {
                    keys.push((
                        self.tenants.counter(&x.tenant),
                        self.tenants.queued(&x.tenant),
                    ));
                    keys.len() - 1
                })
            })
            .collect();
        let urgent: Vec<bool> = w.iter().map(|x| self.urgent(x, now)).collect();
        let mut left: Vec<usize> = (0..w.len()).collect();
        let mut out = Vec::with_capacity(left.len());
        while !left.is_empty() {
            let any_urgent = left.iter().any(|&i| urgent[i]);
            let mut best: Option<(usize, (f64, usize))> = None;
            for (p, &i) in left.iter().enumerate() {
                if any_urgent && !urgent[i] {
                    continue;
                }
                let key = keys[tenant_of[i]];
                if best.map_or(true, |(_, b)| earlier(key, b)) {
                    best = Some((p, key));
                }
            }
            let Some((p, _)) = best else { break };
            let i = left.remove(p);
            let k = &mut keys[tenant_of[i]];
            k.0 += w[i].tokens as f64 / w[i].weight;
            k.1 = k.1.saturating_sub(1);
            out.push(i);
        }
        out
    }

    /// 1-based place of a waiting ticket in the order it would be served.
    pub fn position(&self, model: &str, ticket: u64, now: u64) -> Option<u32> {
        let slots = self.models.get(model)?;
        let i = slots.waiting.iter().position(|w| w.ticket == ticket)?;
        self.order(model, now)
            .iter()
            .position(|&j| j == i)
            .map(|p| p as u32 + 1)
    }

    /// Every running and queued request, per model (by name): running ones
    /// first by slot, then the queue in the order it would be served.
    pub fn entries(&self, now: u64) -> Vec<Entry> {
        let mut names: Vec<&String> = self.models.keys().collect();
        names.sort();
        let mut out = Vec::new();
        for model in names {
            let slots = &self.models[model];
            let row = |w: &Work, running: bool, n: u32| Entry {
                model: model.clone(),
                ticket: w.ticket,
                tenant: w.tenant.clone(),
                class: w.class,
                running,
                slot_or_position: n,
                tokens: w.tokens,
                age: now.saturating_sub(w.since),
            };
            for (i, w) in slots.busy.iter().enumerate() {
                if let Some(w) = w {
                    out.push(row(w, true, i as u32));
                }
            }
            for (p, i) in self.order(model, now).into_iter().enumerate() {
                out.push(row(&slots.waiting[i], false, p as u32 + 1));
            }
        }
        out
    }

    /// Every tenant's counter, queued and running requests.
    pub fn tenants(&self) -> Vec<TenantView> {
        self.tenants.view()
    }

    /// Requests waiting for `model`.
    pub fn waiting(&self, model: &str) -> usize {
        self.models.get(model).map_or(0, |s| s.waiting.len())
    }

    /// Requests of `tenant` waiting node-wide.
    pub fn tenant_queued(&self, tenant: &str) -> usize {
        self.tenants.queued(tenant)
    }

    /// Requests running on `model`'s slots.
    pub fn in_flight(&self, model: &str) -> usize {
        self.models.get(model).map_or(0, ModelSlots::in_flight)
    }

    /// Requests running on every model.
    pub fn total_in_flight(&self) -> usize {
        self.models.values().map(ModelSlots::in_flight).sum()
    }

    /// Requests waiting for a slot, node-wide.
    pub fn queue_depth(&self) -> usize {
        self.queued
    }

    /// Which loaded model to unload so that one more fits within `max_loaded`:
    /// the least recently used model with nothing running or waiting. `None`
    /// when nothing needs evicting, or when every loaded model is busy.
    pub fn evict_candidate(&self, loaded: &[String], max_loaded: usize) -> Option<String> {
        if loaded.len() < max_loaded.max(1) {
            return None;
        }
        loaded
            .iter()
            .filter(|m| {
                self.models
                    .get(m.as_str())
                    .map_or(true, |s| s.in_flight() == 0 && s.waiting.is_empty())
            })
            .min_by_key(|m| self.models.get(m.as_str()).map_or(0, |s| s.last_used))
            .cloned()
    }

    /// Forget a model's bookkeeping once it is unloaded and idle.
    pub fn forget(&mut self, model: &str) {
        if let Some(s) = self.models.get(model) {
            if s.in_flight() == 0 && s.waiting.is_empty() {
                self.models.remove(model);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(tenant: &str, tokens: u64) -> Ask<'_> {
        Ask {
            tenant,
            tokens,
            ..Ask::default()
        }
    }

    fn batch(tenant: &str, tokens: u64) -> Ask<'_> {
        Ask {
            tenant,
            tokens,
            class: Class::Batch,
            ..Ask::default()
        }
    }

    #[test]
    fn runs_until_slots_are_busy_then_queues_then_refuses() {
        let mut pool = SlotPool::new(2, 1);
        pool.configure_fairness(1.0, DEFAULT_PROMOTE_AFTER);
        assert_eq!(pool.admit("m", 1, 0, Ask::default()), Admit::Run(0));
        assert_eq!(pool.admit("m", 2, 0, Ask::default()), Admit::Run(1));
        assert_eq!(pool.admit("m", 3, 0, Ask::default()), Admit::Queued);
        assert_eq!(pool.admit("m", 4, 0, Ask::default()), Admit::Full);
        assert_eq!(pool.admit("m", 5, 0, ask("other", 1)), Admit::Full);
        assert_eq!(pool.queue_depth(), 1);
        assert_eq!(pool.total_in_flight(), 2);
    }

    #[test]
    fn release_hands_the_slot_to_the_oldest_waiter_of_one_tenant() {
        let mut pool = SlotPool::new(1, 8);
        assert_eq!(pool.admit("m", 1, 0, Ask::default()), Admit::Run(0));
        assert_eq!(pool.admit("m", 2, 0, Ask::default()), Admit::Queued);
        assert_eq!(pool.admit("m", 3, 0, Ask::default()), Admit::Queued);
        assert_eq!(pool.release("m", 0, 1, None), Some((2, 0)));
        assert_eq!(pool.release("m", 0, 2, None), Some((3, 0)));
        assert_eq!(pool.release("m", 0, 3, None), None);
        assert_eq!(pool.in_flight("m"), 0);
        assert_eq!(pool.queue_depth(), 0);
    }

    #[test]
    fn cancel_removes_a_waiter_and_frees_queue_room() {
        let mut pool = SlotPool::new(1, 1);
        pool.configure_fairness(1.0, DEFAULT_PROMOTE_AFTER);
        pool.admit("m", 1, 0, Ask::default());
        assert_eq!(pool.admit("m", 2, 0, Ask::default()), Admit::Queued);
        assert!(pool.cancel("m", 2));
        assert!(!pool.cancel("m", 2));
        assert_eq!(pool.tenant_queued(""), 0);
        assert_eq!(pool.admit("m", 3, 0, Ask::default()), Admit::Queued);
        assert_eq!(pool.release("m", 0, 1, None), Some((3, 0)));
    }

    #[test]
    fn double_release_is_ignored() {
        let mut pool = SlotPool::new(1, 1);
        pool.admit("m", 1, 0, Ask::default());
        assert_eq!(pool.release("m", 0, 1, None), None);
        assert_eq!(pool.release("m", 0, 1, None), None);
        assert_eq!(pool.release("m", 7, 1, None), None);
        assert_eq!(pool.release("other", 0, 1, None), None);
        assert_eq!(pool.admit("m", 2, 2, Ask::default()), Admit::Run(0));
    }

    #[test]
    fn models_have_separate_slots() {
        let mut pool = SlotPool::new(1, 0);
        assert_eq!(pool.admit("a", 1, 0, Ask::default()), Admit::Run(0));
        assert_eq!(pool.admit("b", 2, 0, Ask::default()), Admit::Run(0));
        assert_eq!(pool.admit("a", 3, 0, ask("x", 1)), Admit::Full);
    }

    #[test]
    fn evicts_the_least_recently_used_idle_model() {
        let mut pool = SlotPool::new(1, 4);
        pool.admit("a", 1, 10, Ask::default());
        pool.release("a", 0, 10, None);
        pool.admit("b", 2, 20, Ask::default());
        pool.release("b", 0, 20, None);
        pool.admit("c", 3, 30, Ask::default()); // busy
        let loaded: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(pool.evict_candidate(&loaded, 3), Some("a".into()));
        assert_eq!(pool.evict_candidate(&loaded, 4), None);
        pool.admit("a", 4, 40, Ask::default()); // now busy
        pool.admit("b", 5, 40, Ask::default());
        assert_eq!(pool.evict_candidate(&loaded, 3), None);
    }

    #[test]
    fn shrinking_num_parallel_drains_extra_slots() {
        let mut pool = SlotPool::new(2, 4);
        assert_eq!(pool.admit("m", 1, 0, Ask::default()), Admit::Run(0));
        assert_eq!(pool.admit("m", 2, 0, Ask::default()), Admit::Run(1));
        pool.configure(1, 4);
        assert_eq!(pool.admit("m", 3, 0, Ask::default()), Admit::Queued);
        // slot 1 is outside the new limit: it is freed, not handed on
        assert_eq!(pool.release("m", 1, 1, None), None);
        assert_eq!(pool.release("m", 0, 1, None), Some((3, 0)));
    }

    /// One slot, every tenant kept backlogged with `depth` requests of its own
    /// size; returns the tokens each tenant was served over `rounds` releases.
    fn backlogged(
        pool: &mut SlotPool,
        tenants: &[(&str, u64, f64)],
        depth: usize,
        rounds: usize,
    ) -> HashMap<String, u64> {
        let mut ticket = 0u64;
        let mut owner: HashMap<u64, (String, u64)> = HashMap::new();
        let mut now = 0;
        let mut running: Option<u64> = None;
        for _ in 0..depth {
            for &(t, tokens, weight) in tenants {
                ticket += 1;
                owner.insert(ticket, (t.to_owned(), tokens));
                let a = Ask {
                    tenant: t,
                    weight,
                    tokens,
                    class: Class::Interactive,
                };
                match pool.admit("m", ticket, now, a) {
                    Admit::Run(_) => running = Some(ticket),
                    Admit::Queued => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        let mut served: HashMap<String, u64> = HashMap::new();
        for _ in 0..rounds {
            now += 1;
            let done = running.expect("a request runs");
            let (t, tokens) = owner[&done].clone();
            *served.entry(t.clone()).or_default() += tokens;
            let next = pool.release("m", 0, now, Some(tokens));
            running = next.map(|(tk, _)| tk);
            // the tenant whose request ended sends another: still backlogged
            let &(tn, tok, weight) = tenants.iter().find(|x| x.0 == t).unwrap();
            ticket += 1;
            owner.insert(ticket, (tn.to_owned(), tok));
            let a = Ask {
                tenant: tn,
                weight,
                tokens: tok,
                class: Class::Interactive,
            };
            match pool.admit("m", ticket, now, a) {
                Admit::Run(_) => running = Some(ticket),
                Admit::Queued => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        served
    }

    #[test]
    fn backlogged_tenants_get_equal_tokens_not_equal_requests() {
        let mut pool = SlotPool::new(1, 1000);
        // "big" sends 10x longer requests than "small"
        let served = backlogged(
            &mut pool,
            &[("big", 1000, 1.0), ("small", 100, 1.0)],
            20,
            2000,
        );
        let (big, small) = (served["big"] as f64, served["small"] as f64);
        assert!(
            (big - small).abs() <= 1000.0,
            "tokens served: big {big}, small {small}"
        );
        // by requests, small got about ten times as many
        assert!(small / 100.0 > 8.0 * big / 1000.0);
    }

    #[test]
    fn weights_split_tokens_in_proportion() {
        let mut pool = SlotPool::new(1, 1000);
        let served = backlogged(
            &mut pool,
            &[("gold", 100, 3.0), ("free", 100, 1.0)],
            10,
            4000,
        );
        let ratio = served["gold"] as f64 / served["free"] as f64;
        assert!((ratio - 3.0).abs() < 0.1, "gold/free = {ratio}");
    }

    #[test]
    fn many_tenants_one_heavy_each_gets_its_share() {
        let mut pool = SlotPool::new(1, 1000);
        let served = backlogged(
            &mut pool,
            &[
                ("heavy", 500, 1.0),
                ("a", 50, 1.0),
                ("b", 80, 1.0),
                ("c", 200, 1.0),
            ],
            30,
            3000,
        );
        let v: Vec<f64> = served.values().map(|x| *x as f64).collect();
        let (sum, sq) = (v.iter().sum::<f64>(), v.iter().map(|x| x * x).sum::<f64>());
        let jain = sum * sum / (v.len() as f64 * sq);
        assert!(jain > 0.99, "Jain's index {jain}: {served:?}");
    }

    #[test]
    fn the_estimate_is_corrected_on_release() {
        let mut pool = SlotPool::new(1, 100);
        assert_eq!(pool.admit("m", 1, 0, ask("a", 10)), Admit::Run(0));
        // a guessed 10 tokens, took 5000: a's counter says 5000 once released
        assert_eq!(pool.admit("m", 2, 0, ask("a", 10)), Admit::Queued);
        assert_eq!(pool.admit("m", 3, 0, ask("b", 10)), Admit::Queued);
        let counter =
            |p: &SlotPool, t: &str| p.tenants().iter().find(|v| v.name == t).unwrap().counter;
        assert_eq!(counter(&pool, "a"), 10.0);
        assert_eq!(
            pool.release("m", 0, 1, Some(5000)),
            Some((3, 0)),
            "b goes before a's second"
        );
        assert_eq!(counter(&pool, "a"), 5000.0);
    }

    #[test]
    fn an_idle_tenant_does_not_bank_credit() {
        let mut pool = SlotPool::new(1, 100);
        let served = backlogged(&mut pool, &[("a", 100, 1.0), ("b", 100, 1.0)], 5, 200);
        assert!(served["a"] > 0);
        // "late" arrives after 20,000 tokens were served: it starts at the
        // backlogged tenants' level, so it takes turns with them instead of
        // running 100 requests in a row
        let mut next = 10_000;
        assert_eq!(pool.admit("m", next, 1000, ask("late", 100)), Admit::Queued);
        let mut lates_in_a_row = 0;
        for i in 0..6 {
            let (t, _) = pool.release("m", 0, 1001 + i, Some(100)).unwrap();
            if t >= 10_000 {
                lates_in_a_row += 1;
                next += 1;
                assert_eq!(
                    pool.admit("m", next, 1001 + i, ask("late", 100)),
                    Admit::Queued
                );
            }
        }
        assert!(lates_in_a_row <= 3, "late ran {lates_in_a_row} of 6 turns");
        assert!(lates_in_a_row >= 1);
    }

    #[test]
    fn batch_waits_while_interactive_work_queues() {
        let mut pool = SlotPool::new(1, 100);
        assert_eq!(pool.admit("m", 1, 0, ask("u", 10)), Admit::Run(0));
        assert_eq!(pool.admit("m", 2, 0, batch("webui", 1000)), Admit::Queued);
        assert_eq!(pool.admit("m", 3, 1, ask("u", 10)), Admit::Queued);
        assert_eq!(pool.admit("m", 4, 2, ask("u", 10)), Admit::Queued);
        // the batch request is older, and its tenant's counter is lower
        assert_eq!(pool.position("m", 3, 2), Some(1));
        assert_eq!(pool.position("m", 2, 2), Some(3));
        assert_eq!(pool.release("m", 0, 3, None), Some((3, 0)));
        assert_eq!(pool.release("m", 0, 4, None), Some((4, 0)));
        assert_eq!(pool.release("m", 0, 5, None), Some((2, 0)));
    }

    #[test]
    fn old_batch_work_is_promoted() {
        let mut pool = SlotPool::new(1, 100);
        pool.configure_fairness(0.5, 1000);
        assert_eq!(pool.admit("m", 1, 0, ask("u", 10)), Admit::Run(0));
        assert_eq!(pool.admit("m", 2, 0, batch("bg", 10)), Admit::Queued);
        assert_eq!(pool.admit("m", 3, 500, ask("u", 10)), Admit::Queued);
        assert_eq!(pool.position("m", 2, 999), Some(2));
        // at 1000 ms the batch request competes as interactive, and bg's counter
        // is below u's
        assert_eq!(pool.position("m", 2, 1000), Some(1));
        assert_eq!(pool.release("m", 0, 1000, None), Some((2, 0)));
    }

    #[test]
    fn batch_is_never_starved_by_a_stream_of_interactive_work() {
        let mut pool = SlotPool::new(1, 1000);
        pool.configure_fairness(0.5, 100);
        assert_eq!(pool.admit("m", 1, 0, ask("u0", 50)), Admit::Run(0));
        assert_eq!(pool.admit("m", 2, 0, batch("bg", 50)), Admit::Queued);
        let mut ticket = 2;
        let mut served_at = None;
        for now in 1..1000u64 {
            // three interactive tenants keep the queue full
            for t in ["u0", "u1", "u2"] {
                ticket += 1;
                pool.admit("m", ticket, now, ask(t, 50));
            }
            let (got, _) = pool.release("m", 0, now, Some(50)).unwrap();
            if got == 2 {
                served_at = Some(now);
                break;
            }
        }
        let at = served_at.expect("the batch request was starved");
        assert!((100..110).contains(&at), "served at {at}");
    }

    #[test]
    fn a_tenant_over_its_share_gets_429_while_others_are_admitted() {
        let mut pool = SlotPool::new(1, 10);
        assert_eq!(pool.tenant_cap(1.0), 5);
        assert_eq!(pool.tenant_cap(4.0), 10);
        assert_eq!(pool.admit("m", 1, 0, ask("heavy", 10)), Admit::Run(0));
        for t in 2..7 {
            assert_eq!(pool.admit("m", t, 0, ask("heavy", 10)), Admit::Queued);
        }
        assert_eq!(pool.admit("m", 7, 0, ask("heavy", 10)), Admit::TenantFull);
        for t in 8..13 {
            assert_eq!(
                pool.admit("m", t, 0, ask(&format!("light{t}"), 10)),
                Admit::Queued
            );
        }
        assert_eq!(pool.queue_depth(), 10);
        assert_eq!(pool.admit("m", 13, 0, ask("light", 10)), Admit::Full);
        // the light tenants arrived while heavy was backlogged: lifted to its
        // counter, they tie with it and, waiting with fewer requests, go first
        for t in 8..13 {
            assert_eq!(pool.release("m", 0, 1, None).map(|x| x.0), Some(t));
        }
        assert_eq!(pool.release("m", 0, 1, None).map(|x| x.0), Some(2));
    }

    #[test]
    fn entries_list_running_then_queued_in_serving_order() {
        let mut pool = SlotPool::new(1, 10);
        pool.admit("m", 1, 0, ask("a", 100));
        pool.admit("m", 2, 1, ask("a", 100));
        pool.admit("m", 3, 2, batch("b", 100));
        pool.admit("m", 4, 3, ask("c", 100));
        let e = pool.entries(10);
        let got: Vec<(u64, bool, u32, u64)> = e
            .iter()
            .map(|x| (x.ticket, x.running, x.slot_or_position, x.age))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, true, 0, 10),
                (2, false, 1, 9),
                (4, false, 2, 7),
                (3, false, 3, 8)
            ]
        );
        // b and c were lifted to a's counter on arrival: a tie, and each
        // tenant waits with one request, so a's older one goes first, then
        // c's; b's batch request goes last
        assert_eq!(e[3].class, Class::Batch);
        assert_eq!(e[2].tenant, "c");
        let t = pool.tenants();
        assert_eq!(
            t.iter()
                .map(|v| (v.name.as_str(), v.queued, v.running))
                .collect::<Vec<_>>(),
            vec![("a", 1, 1), ("b", 1, 0), ("c", 1, 0)]
        );
    }

    #[test]
    fn idle_tenants_are_forgotten() {
        let mut pool = SlotPool::new(1, 10);
        for i in 0..100u64 {
            let name = format!("10.0.0.{i}");
            assert_eq!(pool.admit("m", i, i, ask(&name, 10)), Admit::Run(0));
            pool.release("m", 0, i, Some(10));
        }
        assert!(pool.tenants().len() <= 1, "{:?}", pool.tenants());
    }
}
