//! Request policies: the engines a route's pipeline runs before it proxies.
//!
//! Each engine is built from its validated block (`config::model`) when a
//! config is compiled and shared by every route that names the block. The
//! request pipeline (`proxy::forward`) runs them in this order:
//!
//! 1. [`jwt`]: `auth_jwt` — the token is extracted and verified; a refusal
//!    answers 401; the claims become `$jwt_claim_NAME`.
//! 2. [`rate_limit`]: every `rate_limit` of the route — the key is rendered
//!    (claims included) and counted; a refusal answers 429, a store failure
//!    allows or answers 503 as `on_store_error` says.
//!
//! State that must survive a reload (rate-limit counters) lives in a store
//! keyed by the block's content, handed to `compile` (DESIGN.md §5).

pub mod jwt;
pub mod rate_limit;
