//! `ollama_distributed._core`: the Rust core of ollama-distributed.
//!
//! The scheduler's decision logic lives in [`scheduler`] as plain Rust with no
//! I/O. With the `python` feature (enabled by maturin) this crate is also the
//! Python extension module; `python.rs` is its whole Python-visible surface.

pub mod scheduler;

#[cfg(feature = "python")]
mod python;
