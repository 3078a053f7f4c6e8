//! Scheduling decisions: pure logic with no I/O, no clock and no Python.
//!
//! Two layers, both driven by events and read back as decisions:
//! - [`SlotPool`] admits a request on one node: it hands out one of a model's
//!   `num_parallel` engine slots, queues the request when all are busy, and
//!   refuses it once `max_queue` requests wait (the API answers 503), or once
//!   its tenant holds its share of the queue (429). The queue is served fairly
//!   across tenants by tokens (a virtual token counter, [`fair`]), interactive
//!   work before batch work, old batch work promoted.
//! - [`Router`] picks the node that serves a request across the cluster, behind
//!   the [`Policy`] trait (`scheduler.policy`): [`PrefixAware`] (the default:
//!   the node with the longest warm prompt prefix, within a bounded load, as
//!   kept by the [`prefix::PrefixIndex`]), [`LeastLoaded`] or [`RoundRobin`].

mod fair;
mod policy;
pub mod prefix;
mod router;
#[cfg(test)]
mod sim_tests;
mod slots;

pub use fair::{Class, TenantView};
pub use policy::{
    by_name as policy_by_name, Candidate, LeastLoaded, Policy, PrefixAware, RoundRobin, POLICIES,
};
pub use router::{Decisions, NodeState, RouteError, Router};
pub use slots::{Admit, Ask, Entry, SlotPool};
