//! The Python-visible surface of `_core`, in one place.

use std::sync::OnceLock;

use pyo3::prelude::*;

use crate::scheduler::{
    policy_by_name, prefix, Admit, Ask, Class, NodeState, RouteError, Router, SlotPool, POLICIES,
};

pyo3::import_exception!(ollama_distributed.errors, ModelNotFoundError);
pyo3::import_exception!(ollama_distributed.errors, OverloadedError);

impl From<RouteError> for PyErr {
    fn from(e: RouteError) -> PyErr {
        match e {
            RouteError::UnknownModel(m) => ModelNotFoundError::new_err(m),
            RouteError::Saturated(_) => OverloadedError::new_err(e.to_string()),
        }
    }
}

/// `Scheduler.admit` answers with a slot index (>= 0) or one of these.
const QUEUED: i64 = -1;
const FULL: i64 = -2;
const TENANT_FULL: i64 = -3;

fn class_name(c: Class) -> &'static str {
    match c {
        Class::Interactive => "interactive",
        Class::Batch => "batch",
    }
}

/// One row of `Scheduler.queue`: (model, ticket, tenant, priority, running,
/// slot or 1-based position, estimated tokens, age in the caller's unit).
type QueueRow = (String, u64, String, &'static str, bool, u32, u64, u64);

/// The node's scheduler: local engine slots and the cluster router.
///
/// Called only from the asyncio thread, so a plain `&mut self` is enough.
#[pyclass(module = "ollama_distributed._core")]
struct Scheduler {
    slots: SlotPool,
    router: Router,
}

#[pymethods]
impl Scheduler {
    #[new]
    #[pyo3(signature = (node_id, num_parallel, max_queue, stale_after_ms=3000))]
    fn new(node_id: String, num_parallel: u32, max_queue: usize, stale_after_ms: u64) -> Self {
        Self {
            slots: SlotPool::new(num_parallel, max_queue),
            router: Router::new(node_id, stale_after_ms),
        }
    }

    /// Retune live (SIGHUP).
    fn configure(&mut self, num_parallel: u32, max_queue: usize, stale_after_ms: u64) {
        self.slots.configure(num_parallel, max_queue);
        self.router.set_stale_after(stale_after_ms);
    }

    /// The fairness knobs: one tenant's share of the queue per unit of weight,
    /// and the wait (in `admit`'s `now` unit) after which batch work is promoted.
    fn configure_fairness(&mut self, tenant_share: f64, promote_after: u64) {
        self.slots.configure_fairness(tenant_share, promote_after);
    }

    /// Ask for an engine slot for `tenant`'s request of about `tokens` tokens:
    /// the slot index, -1 when queued, -2 when the queue is full, -3 when the
    /// tenant holds its share of the queue.
    #[pyo3(signature = (model, ticket, now, tenant="", weight=1.0, batch=false, tokens=0))]
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        model: &str,
        ticket: u64,
        now: u64,
        tenant: &str,
        weight: f64,
        batch: bool,
        tokens: u64,
    ) -> i64 {
        let class = if batch {
            Class::Batch
        } else {
            Class::Interactive
        };
        let ask = Ask {
            tenant,
            weight,
            class,
            tokens,
        };
        match self.slots.admit(model, ticket, now, ask) {
            Admit::Run(slot) => i64::from(slot),
            Admit::Queued => QUEUED,
            Admit::Full => FULL,
            Admit::TenantFull => TENANT_FULL,
        }
    }

    /// Free a slot, charging the tokens the request really took (None: keep
    /// the estimate); returns (ticket, slot) of the waiter it passes to, if any.
    #[pyo3(signature = (model, slot, now, tokens=None))]
    fn release(
        &mut self,
        model: &str,
        slot: u32,
        now: u64,
        tokens: Option<u64>,
    ) -> Option<(u64, u32)> {
        self.slots.release(model, slot, now, tokens)
    }

    /// A waiting ticket's 1-based place in the order it would be served.
    fn position(&self, model: &str, ticket: u64, now: u64) -> Option<u32> {
        self.slots.position(model, ticket, now)
    }

    /// Every running and queued request (see `QueueRow`).
    fn queue(&self, now: u64) -> Vec<QueueRow> {
        self.slots
            .entries(now)
            .into_iter()
            .map(|e| {
                (
                    e.model,
                    e.ticket,
                    e.tenant,
                    class_name(e.class),
                    e.running,
                    e.slot_or_position,
                    e.tokens,
                    e.age,
                )
            })
            .collect()
    }

    /// Every tenant known: (name, virtual token counter, queued, running).
    fn tenants(&self) -> Vec<(String, f64, usize, usize)> {
        self.slots
            .tenants()
            .into_iter()
            .map(|t| (t.name, t.counter, t.queued, t.running))
            .collect()
    }

    /// Requests of `tenant` waiting node-wide.
    fn tenant_queued(&self, tenant: &str) -> usize {
        self.slots.tenant_queued(tenant)
    }

    /// How many requests one tenant of `weight` may keep waiting.
    fn tenant_cap(&self, weight: f64) -> usize {
        self.slots.tenant_cap(weight)
    }

    /// Withdraw a waiting ticket; True when it was still queued.
    fn cancel(&mut self, model: &str, ticket: u64) -> bool {
        self.slots.cancel(model, ticket)
    }

    fn in_flight(&self, model: &str) -> usize {
        self.slots.in_flight(model)
    }

    fn total_in_flight(&self) -> usize {
        self.slots.total_in_flight()
    }

    fn queue_depth(&self) -> usize {
        self.slots.queue_depth()
    }

    /// The loaded model to unload so one more fits, or None.
    fn evict_candidate(&self, loaded: Vec<String>, max_loaded: usize) -> Option<String> {
        self.slots.evict_candidate(&loaded, max_loaded)
    }

    fn forget(&mut self, model: &str) {
        self.slots.forget(model)
    }

    /// Replace what the router knows of one node. `max_loaded_models` is its
    /// engine's bound on loaded models (0: not known) and `busy` its loaded
    /// models with requests running; together they tell whether it can load
    /// a model without evicting a busy one.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (id, alive, advert_at_ms, models, loaded, in_flight, queue_depth, max_queue,
                        max_loaded_models=0, busy=Vec::new()))]
    fn update_node(
        &mut self,
        id: String,
        alive: bool,
        advert_at_ms: u64,
        models: Vec<String>,
        loaded: Vec<String>,
        in_flight: u32,
        queue_depth: u32,
        max_queue: u32,
        max_loaded_models: u32,
        busy: Vec<String>,
    ) {
        self.router.update(NodeState {
            id,
            alive,
            advert_at_ms,
            models,
            loaded,
            busy,
            max_loaded: max_loaded_models,
            in_flight,
            queue_depth,
            max_queue,
        });
    }

    fn remove_node(&mut self, id: &str) {
        self.router.remove(id)
    }

    fn set_alive(&mut self, id: &str, alive: bool) {
        self.router.set_alive(id, alive)
    }

    fn dispatched(&mut self, id: &str) {
        self.router.dispatched(id)
    }

    fn finished(&mut self, id: &str) {
        self.router.finished(id)
    }

    /// Node ids able to serve `model`, best first. Raises ModelNotFoundError
    /// or OverloadedError. With `prompt` (the rendered prompt, or the
    /// canonical message list), nodes with more of it warm rank higher under
    /// `prefix_aware`, and the next `dispatched` records where it went.
    #[pyo3(signature = (model, now_ms, prompt=None))]
    fn route(&mut self, model: &str, now_ms: u64, prompt: Option<&str>) -> PyResult<Vec<String>> {
        Ok(match prompt {
            Some(p) => self.router.route_prompt(model, p, now_ms)?,
            None => self.router.route(model, now_ms)?,
        })
    }

    /// Choose the routing policy by its `scheduler.policy` name; ValueError
    /// for an unknown one.
    fn set_policy(&mut self, name: &str) -> PyResult<()> {
        let policy = policy_by_name(name).ok_or_else(|| {
            pyo3::exceptions::PyValueError::new_err(format!(
                "unknown scheduler policy {name:?}; expected one of {}",
                POLICIES.join(", ")
            ))
        })?;
        self.router.set_policy(policy);
        Ok(())
    }

    /// The routing policy's name.
    #[getter]
    fn policy(&self) -> &'static str {
        self.router.policy()
    }

    /// What node `id` keeps warm, from its advert taken at `advert_at_ms`:
    /// the chain hashes of its warm prompts (`prefix_hashes`). They replace
    /// the router's guess for that node; routes sent there since are kept.
    fn set_warm(&mut self, id: &str, hashes: Vec<u64>, advert_at_ms: u64) {
        self.router.set_warm(id, &hashes, advert_at_ms)
    }

    /// Routing decisions so far, by reason: prefix_hit, load, spread.
    fn routing_decisions(&self) -> std::collections::HashMap<&'static str, u64> {
        let d = self.router.decisions();
        [
            ("prefix_hit", d.prefix_hit),
            ("load", d.load),
            ("spread", d.spread),
        ]
        .into_iter()
        .collect()
    }
}

/// The chain hashes of `text`'s whole blocks for `model`, as the router
/// indexes prompts: what a node advertises for the prompts it keeps warm.
#[pyfunction]
fn prefix_hashes(model: &str, text: &str) -> Vec<u64> {
    prefix::chain(model, text)
}

pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            // Two workers: the QUIC endpoint and relays are I/O bound, and the
            // engines need the cores.
            .worker_threads(2)
            .thread_name("od-core")
            .enable_all()
            .build()
            .expect("failed to start the core's tokio runtime")
    })
}

/// An awaitable round trip through the core's tokio runtime. The systemd
/// watchdog pings only after it returns, so a wedged core stops the pings.
#[pyfunction]
fn ping(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let handle = runtime().handle().clone();
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        handle
            .spawn(async { tokio::task::yield_now().await })
            .await
            .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
        Ok(true)
    })
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Scheduler>()?;
    crate::py_cluster::register(m)?;
    m.add_function(wrap_pyfunction!(ping, m)?)?;
    m.add_function(wrap_pyfunction!(prefix_hashes, m)?)?;
    m.add("POLICIES", POLICIES.to_vec())?;
    Ok(())
}
