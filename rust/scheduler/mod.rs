//! Scheduling decisions: pure logic with no I/O, no clock and no Python.
//!
//! Two layers, both driven by events and read back as decisions:
//! - [`SlotPool`] admits a request on one node: it hands out one of a model's
//!   `num_parallel` engine slots, queues the request when all are busy, and
//!   refuses it once `max_queue` requests wait (the API answers 503).
//! - [`Router`] picks the node that serves a request across the cluster, behind
//!   the [`Policy`] trait (`scheduler.policy`): [`PrefixAware`] (the default:
//!   the node with the longest warm prompt prefix, within a bounded load, as
//!   kept by the [`prefix::PrefixIndex`]), [`LeastLoaded`] or [`RoundRobin`].

mod policy;
pub mod prefix;
mod router;
#[cfg(test)]
mod sim_tests;
mod slots;

pub use policy::{
    by_name as policy_by_name, Candidate, LeastLoaded, Policy, PrefixAware, RoundRobin, POLICIES,
};
pub use router::{Decisions, NodeState, RouteError, Router};
pub use slots::{Admit, SlotPool};
