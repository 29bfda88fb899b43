//! Per-route policies, one file per directive family (DESIGN.md layout):
//! each is a self-contained engine that the request pipeline
//! (`proxy::forward`) calls between routing and the upstream.
//!
//! State that must outlive a config reload (cache contents) lives in
//! registries keyed by the identity of its block, handed to each new
//! snapshot.

pub mod cache;
pub mod wrap;
