//! Request policies: the engines a route's pipeline runs between routing
//! and the upstream, one file per directive family.
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
//! 3. [`cache`]: `cache` — a hit is answered from memory; misses for one key
//!    are coalesced into one upstream request.
//! 4. [`wrap`]: `wrap_response` — a JSON answer is wrapped with a timestamp
//!    and the correlation id.
//!
//! State that must survive a reload (rate-limit counters, cache contents)
//! lives in stores keyed by the block's content, handed to `compile`
//! (DESIGN.md §5).

pub mod cache;
pub mod jwt;
pub mod rate_limit;
pub mod wrap;
