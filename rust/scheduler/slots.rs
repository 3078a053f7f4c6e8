use std::collections::{HashMap, VecDeque};

/// The outcome of asking for an engine slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Run now on this slot index.
    Run(u32),
    /// Every slot is busy; the ticket waits in the model's queue.
    Queued,
    /// The node-wide queue bound is reached: refuse (HTTP 503 + Retry-After).
    Full,
}

#[derive(Debug, Default)]
struct ModelSlots {
    busy: Vec<bool>,
    waiting: VecDeque<u64>,
    /// Monotonic "time" of the last use, fed by the caller, for eviction.
    last_used: u64,
}

impl ModelSlots {
    fn free_slot(&self) -> Option<u32> {
        self.busy.iter().position(|b| !*b).map(|i| i as u32)
    }
    fn in_flight(&self) -> usize {
        self.busy.iter().filter(|b| **b).count()
    }
}

/// Engine slots per model and one bounded wait queue for the node.
#[derive(Debug)]
pub struct SlotPool {
    num_parallel: u32,
    max_queue: usize,
    queued: usize,
    models: HashMap<String, ModelSlots>,
}

impl SlotPool {
    /// `num_parallel` slots per model; at most `max_queue` requests wait node-wide.
    pub fn new(num_parallel: u32, max_queue: usize) -> Self {
        Self {
            num_parallel: num_parallel.max(1),
            max_queue,
            queued: 0,
            models: HashMap::new(),
        }
    }

    /// Change the knobs live (SIGHUP). Busy slots beyond a smaller `num_parallel`
    /// drain naturally: they are released and never handed out again.
    pub fn configure(&mut self, num_parallel: u32, max_queue: usize) {
        self.num_parallel = num_parallel.max(1);
        self.max_queue = max_queue;
    }

    fn entry(&mut self, model: &str) -> &mut ModelSlots {
        let n = self.num_parallel as usize;
        let slots = self.models.entry(model.to_owned()).or_default();
        if slots.busy.len() < n {
            slots.busy.resize(n, false);
        }
        slots
    }

    /// Ask for a slot of `model` for request `ticket` at time `now`.
    pub fn admit(&mut self, model: &str, ticket: u64, now: u64) -> Admit {
        let limit = self.num_parallel as usize;
        let max_queue = self.max_queue;
        let queued = self.queued;
        let slots = self.entry(model);
        slots.last_used = now;
        if slots.waiting.is_empty() {
            if let Some(i) = slots.free_slot().filter(|i| (*i as usize) < limit) {
                slots.busy[i as usize] = true;
                return Admit::Run(i);
            }
        }
        if queued >= max_queue {
            return Admit::Full;
        }
        slots.waiting.push_back(ticket);
        self.queued += 1;
        Admit::Queued
    }

    /// Free `slot` of `model`. When a request waits, the slot passes straight to
    /// it and its ticket is returned so the caller can wake it.
    pub fn release(&mut self, model: &str, slot: u32, now: u64) -> Option<(u64, u32)> {
        let limit = self.num_parallel as usize;
        let slots = self.models.get_mut(model)?;
        slots.last_used = now;
        let idx = slot as usize;
        if idx >= slots.busy.len() || !slots.busy[idx] {
            return None;
        }
        if idx < limit {
            if let Some(ticket) = slots.waiting.pop_front() {
                self.queued -= 1;
                return Some((ticket, slot));
            }
        }
        slots.busy[idx] = false;
        // A shrunk pool may still have waiters and a free in-limit slot.
        if let Some(i) = slots.free_slot().filter(|i| (*i as usize) < limit) {
            if let Some(ticket) = slots.waiting.pop_front() {
                self.queued -= 1;
                slots.busy[i as usize] = true;
                return Some((ticket, i));
            }
        }
        None
    }

    /// Withdraw a waiting ticket (its client went away). True when it was queued.
    pub fn cancel(&mut self, model: &str, ticket: u64) -> bool {
        let Some(slots) = self.models.get_mut(model) else {
            return false;
        };
        let Some(pos) = slots.waiting.iter().position(|t| *t == ticket) else {
            return false;
        };
        slots.waiting.remove(pos);
        self.queued -= 1;
        true
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

    #[test]
    fn runs_until_slots_are_busy_then_queues_then_refuses() {
        let mut pool = SlotPool::new(2, 1);
        assert_eq!(pool.admit("m", 1, 0), Admit::Run(0));
        assert_eq!(pool.admit("m", 2, 0), Admit::Run(1));
        assert_eq!(pool.admit("m", 3, 0), Admit::Queued);
        assert_eq!(pool.admit("m", 4, 0), Admit::Full);
        assert_eq!(pool.queue_depth(), 1);
        assert_eq!(pool.total_in_flight(), 2);
    }

    #[test]
    fn release_hands_the_slot_to_the_oldest_waiter() {
        let mut pool = SlotPool::new(1, 8);
        assert_eq!(pool.admit("m", 1, 0), Admit::Run(0));
        assert_eq!(pool.admit("m", 2, 0), Admit::Queued);
        assert_eq!(pool.admit("m", 3, 0), Admit::Queued);
        assert_eq!(pool.release("m", 0, 1), Some((2, 0)));
        assert_eq!(pool.release("m", 0, 2), Some((3, 0)));
        assert_eq!(pool.release("m", 0, 3), None);
        assert_eq!(pool.in_flight("m"), 0);
        assert_eq!(pool.queue_depth(), 0);
    }

    #[test]
    fn cancel_removes_a_waiter_and_frees_queue_room() {
        let mut pool = SlotPool::new(1, 1);
        pool.admit("m", 1, 0);
        assert_eq!(pool.admit("m", 2, 0), Admit::Queued);
        assert!(pool.cancel("m", 2));
        assert!(!pool.cancel("m", 2));
        assert_eq!(pool.admit("m", 3, 0), Admit::Queued);
        assert_eq!(pool.release("m", 0, 1), Some((3, 0)));
    }

    #[test]
    fn double_release_is_ignored() {
        let mut pool = SlotPool::new(1, 1);
        pool.admit("m", 1, 0);
        assert_eq!(pool.release("m", 0, 1), None);
        assert_eq!(pool.release("m", 0, 1), None);
        assert_eq!(pool.release("other", 0, 1), None);
        assert_eq!(pool.admit("m", 2, 2), Admit::Run(0));
    }

    #[test]
    fn models_have_separate_slots() {
        let mut pool = SlotPool::new(1, 0);
        assert_eq!(pool.admit("a", 1, 0), Admit::Run(0));
        assert_eq!(pool.admit("b", 2, 0), Admit::Run(0));
        assert_eq!(pool.admit("a", 3, 0), Admit::Full);
    }

    #[test]
    fn evicts_the_least_recently_used_idle_model() {
        let mut pool = SlotPool::new(1, 4);
        pool.admit("a", 1, 10);
        pool.release("a", 0, 10);
        pool.admit("b", 2, 20);
        pool.release("b", 0, 20);
        pool.admit("c", 3, 30); // busy
        let loaded: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(pool.evict_candidate(&loaded, 3), Some("a".into()));
        assert_eq!(pool.evict_candidate(&loaded, 4), None);
        pool.admit("a", 4, 40); // now busy
        pool.admit("b", 5, 40);
        assert_eq!(pool.evict_candidate(&loaded, 3), None);
    }

    #[test]
    fn shrinking_num_parallel_drains_extra_slots() {
        let mut pool = SlotPool::new(2, 4);
        assert_eq!(pool.admit("m", 1, 0), Admit::Run(0));
        assert_eq!(pool.admit("m", 2, 0), Admit::Run(1));
        pool.configure(1, 4);
        assert_eq!(pool.admit("m", 3, 0), Admit::Queued);
        // slot 1 is outside the new limit: it is freed, not handed on
        assert_eq!(pool.release("m", 1, 1), None);
        assert_eq!(pool.release("m", 0, 1), Some((3, 0)));
    }
}
