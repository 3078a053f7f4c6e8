//! `ollama_distributed._core`: the Rust core of ollama-distributed.
//!
//! The scheduler's decision logic lives in [`scheduler`] as plain Rust with no
//! I/O. The cluster core is [`transport`] (QUIC, mTLS, framing), [`membership`]
//! (liveness and adverts; SWIM and gossiped adverts for large clusters, so far
//! only simulated: `membership::swim`, `membership::sim`), [`consensus`] (openraft), [`forward`] (request
//! relay), [`blobs`] (model blobs between peers), tied together per node by [`cluster`]. With the `python` feature (enabled by maturin) this crate is also the
//! Python extension module; `python.rs` is its whole Python-visible surface.

pub mod blobs;
pub mod cluster;
pub mod consensus;
pub mod forward;
pub mod membership;
pub mod scheduler;
pub mod transport;
pub mod tunnel;

#[cfg(feature = "python")]
mod py_cluster;
#[cfg(feature = "python")]
mod python;
