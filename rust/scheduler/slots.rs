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
    fn free(&self, limit: usize) -> usize {
        self.busy.iter().take(limit).filter(|b| b.is_none()).count()
    }
    fn running_of(&self, tenant: &str) -> usize {
        self.busy
            .iter()
            .flatten()
            .filter(|w| w.tenant == tenant)
            .count()
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
    /// Tenants seen lately: name -> (last admission asked, weight).
    recent: HashMap<String, (u64, f64)>,
}

/// A tenant that asked for a slot within this many milliseconds is "recent":
/// a slot may be kept free for its next request ([`SlotPool::admit`]). 10 s
/// covers a few of an interactive user's requests (think time between
/// turns), and a tenant gone longer than that gives its slot back.
pub const RECENT_MS: u64 = 10_000;

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
            recent: HashMap::new(),
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
    ///
    /// A request runs at once on a free slot when no waiter may take it and
    /// its tenant [`may_start`](Self::may_start): a tenant already holding
    /// its share of the slots leaves a few free for the other recent tenants,
    /// since a stream that has begun is never preempted and a victim's
    /// request would otherwise wait for a whole answer of the heavy tenant.
    pub fn admit(&mut self, model: &str, ticket: u64, now: u64, ask: Ask<'_>) -> Admit {
        let limit = self.num_parallel as usize;
        let cap = self.tenant_cap(ask.weight);
        self.saw(ask.tenant, sane_weight(ask.weight), now);
        self.entry(model).last_used = now;
        let (max_queue, queued) = (self.max_queue, self.queued);
        let tenant_queued = self.tenants.queued(ask.tenant);
        let slots = &self.models[model];
        if let Some(i) = slots.free_slot(limit) {
            let waiter_first = self.pick(model, &slots.waiting, now).is_some();
            if !waiter_first && self.may_start(model, ask.tenant, sane_weight(ask.weight), now) {
                let slots = self.entry(model);
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
        let slots = self.entry(model);
        slots.waiting.push(Work::new(ticket, &ask, now));
        self.tenants.enqueue(ask.tenant);
        self.queued += 1;
        Admit::Queued
    }

    /// Remember that `tenant` asked at `now`; forget tenants not seen for
    /// [`RECENT_MS`] (the map stays as small as the set of active tenants).
    fn saw(&mut self, tenant: &str, weight: f64, now: u64) {
        match self.recent.get_mut(tenant) {
            Some(e) => *e = (now, weight),
            None => {
                self.recent.insert(tenant.to_owned(), (now, weight));
            }
        }
        if self.recent.len() > 16 {
            self.recent
                .retain(|_, (at, _)| now.saturating_sub(*at) < RECENT_MS);
        }
    }

    /// May `tenant` take one of `model`'s free slots at `now`?
    ///
    /// Yes while it runs fewer than its weighted share of the slots among the
    /// recent tenants (at least one: nobody is ever shut out). Beyond its
    /// share, only if it leaves free one slot per other recent tenant that
    /// has nothing queued or running (at most half the slots): such a tenant's next
    /// request then starts at once instead of waiting for a running answer to
    /// end. Tenants with work queued are not reserved for: they take the next
    /// free slot in the fair order anyway, so backlogged tenants alone keep
    /// every slot busy.
    fn may_start(&self, model: &str, tenant: &str, weight: f64, now: u64) -> bool {
        let Some(slots) = self.models.get(model) else {
            return true;
        };
        let limit = self.num_parallel as usize;
        let recent = |at: u64| now.saturating_sub(at) < RECENT_MS;
        let mut weights = weight;
        let mut idle_others = 0usize;
        for (name, &(at, w)) in &self.recent {
            if name == tenant || !recent(at) {
                continue;
            }
            weights += w;
            if self.tenants.queued(name) == 0 && slots.running_of(name) == 0 {
                idle_others += 1;
            }
        }
        if idle_others == 0 {
            return true;
        }
        let share = ((limit as f64 * weight / weights).floor() as usize).max(1);
        if slots.running_of(tenant) < share {
            return true;
        }
        let reserve = idle_others.min(limit / 2);
        slots.free(limit) > reserve
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
    /// first rather than behind the backlog); then the oldest. Only waiters
    /// whose tenant [`may_start`](Self::may_start) on the slot.
    fn pick(&self, model: &str, waiting: &[Work], now: u64) -> Option<usize> {
        let mut best: Option<(usize, (bool, f64, usize))> = None;
        // a tenant's eligibility is the same for all its waiters
        let mut verdicts: Vec<(&str, bool)> = Vec::new();
        for (i, w) in waiting.iter().enumerate() {
            let ok = match verdicts.iter().find(|(t, _)| *t == w.tenant) {
                Some(&(_, ok)) => ok,
                None => {
                    let ok = self.may_start(model, &w.tenant, w.weight, now);
                    verdicts.push((&w.tenant, ok));
                    ok
                }
            };
            if !ok {
                continue;
            }
            let key = (
                !self.urgent(w, now),
                self.tenants.counter(&w.tenant),
                self.tenants.queued(&w.tenant),
            );
            // strictly smaller: the earlier (older) waiter wins a tie
            if best.is_none_or(|(_, b)| {
                (!key.0 && b.0) || (key.0 == b.0 && earlier((key.1, key.2), (b.1, b.2)))
            }) {
                best = Some((i, key));
            }
        }
        best.map(|(i, _)| i)
    }

    /// Hand slot `idx` of `model` to the waiter `pick` chooses, if any.
    fn hand_over(&mut self, model: &str, idx: usize, now: u64) -> Option<u64> {
        let slots = self.models.get(model)?;
        let i = self.pick(model, &slots.waiting, now)?;
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
                if best.is_none_or(|(_, b)| earlier(key, b)) {
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
                    .is_none_or(|s| s.in_flight() == 0 && s.waiting.is_empty())
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
#[path = "slots_tests.rs"]
mod tests;
