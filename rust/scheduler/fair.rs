//! Tenant fairness by tokens: a virtual token counter per tenant (VTC, from
//! "Fairness in Serving Large Language Models", Sheng et al., OSDI '24, as
//! AIBrix implements it).
//!
//! Each tenant's counter grows by the tokens (prompt + generated) it was
//! served, divided by its weight. A free slot goes to the waiting tenant with
//! the smallest counter, so over time every backlogged tenant gets the same
//! weighted share of tokens, whatever the number or size of its requests. A
//! tenant that was idle is lifted to the smallest counter among the
//! backlogged ones on arrival (or to the last one served when none waits), so
//! it cannot bank credit while away and then monopolise the node.

use std::collections::HashMap;

/// A request's priority class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A user waits on it (the default): served before batch work.
    Interactive,
    /// Background work (titles, tags, summaries): waits while interactive
    /// work queues, until its age promotes it.
    Batch,
}

#[derive(Debug, Default, Clone)]
struct Tenant {
    counter: f64,
    queued: usize,
    running: usize,
}

/// Every tenant's virtual token counter and its queued and running requests,
/// node-wide (across models: the node's compute is what is shared).
#[derive(Debug, Default)]
pub struct Tenants {
    tenants: HashMap<String, Tenant>,
    /// The counter of the last tenant served: where an idle tenant starts when
    /// nobody is backlogged.
    floor: f64,
}

/// One tenant's state, for the queue listing.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantView {
    pub name: String,
    pub counter: f64,
    pub queued: usize,
    pub running: usize,
}

impl Tenants {
    /// The tenant's counter (0 for one never seen).
    pub fn counter(&self, tenant: &str) -> f64 {
        self.tenants.get(tenant).map_or(self.floor, |t| t.counter)
    }

    /// Requests of `tenant` waiting node-wide.
    pub fn queued(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).map_or(0, |t| t.queued)
    }

    /// The VTC lift, for a tenant about to queue or run with nothing queued:
    /// up to the smallest counter among backlogged tenants, else the floor.
    fn lift(&mut self, tenant: &str) {
        if self.queued(tenant) > 0 {
            return;
        }
        let backlogged = self
            .tenants
            .iter()
            .filter(|(n, t)| t.queued > 0 && n.as_str() != tenant)
            .map(|(_, t)| t.counter)
            .fold(f64::INFINITY, f64::min);
        let to = if backlogged.is_finite() {
            backlogged
        } else {
            self.floor
        };
        let floor = self.floor;
        let t = self
            .tenants
            .entry(tenant.to_owned())
            .or_insert_with(|| Tenant {
                counter: floor,
                ..Tenant::default()
            });
        t.counter = t.counter.max(to);
    }

    /// A request of `tenant` joins the queue.
    pub fn enqueue(&mut self, tenant: &str) {
        self.lift(tenant);
        if let Some(t) = self.tenants.get_mut(tenant) {
            t.queued += 1;
        }
    }

    /// A queued request leaves the queue without running (cancelled).
    pub fn dequeue(&mut self, tenant: &str) {
        if let Some(t) = self.tenants.get_mut(tenant) {
            t.queued = t.queued.saturating_sub(1);
        }
        self.prune(tenant);
    }

    /// A request of `tenant` starts on a slot, charged `tokens / weight` now
    /// (the estimate; `correct` settles it at the end). `from_queue` when it
    /// waited (it leaves the queue now).
    pub fn start(&mut self, tenant: &str, tokens: u64, weight: f64, from_queue: bool) {
        if !from_queue {
            self.lift(tenant);
        }
        let floor = self.floor;
        let t = self
            .tenants
            .entry(tenant.to_owned())
            .or_insert_with(|| Tenant {
                counter: floor,
                ..Tenant::default()
            });
        if from_queue {
            t.queued = t.queued.saturating_sub(1);
        }
        self.floor = self.floor.max(t.counter);
        t.counter += tokens as f64 / weight;
        t.running += 1;
    }

    /// A request of `tenant` ended: its charge moves from the estimate to the
    /// tokens it really took (`actual`, or the estimate kept when unknown).
    pub fn finish(&mut self, tenant: &str, charged: u64, actual: Option<u64>, weight: f64) {
        if let Some(t) = self.tenants.get_mut(tenant) {
            if let Some(actual) = actual {
                t.counter += (actual as f64 - charged as f64) / weight;
            }
            t.running = t.running.saturating_sub(1);
        }
        // Nobody waits: the node is not contended, and the next arrival starts
        // from here (an idle tenant's lower counter is no credit to spend).
        if !self.tenants.values().any(|t| t.queued > 0) {
            self.floor = self.floor.max(self.counter(tenant));
        }
        self.prune(tenant);
    }

    /// Forget an idle tenant whose counter the lift would restore anyway, so
    /// a node seeing many client addresses keeps a bounded map.
    fn prune(&mut self, tenant: &str) {
        if let Some(t) = self.tenants.get(tenant) {
            if t.queued == 0 && t.running == 0 && t.counter <= self.floor {
                self.tenants.remove(tenant);
            }
        }
    }

    /// Every tenant known, by name.
    pub fn view(&self) -> Vec<TenantView> {
        let mut out: Vec<TenantView> = self
            .tenants
            .iter()
            .map(|(n, t)| TenantView {
                name: n.clone(),
                counter: t.counter,
                queued: t.queued,
                running: t.running,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}
