//! tollgate: an API gateway configured by an NGINX-shaped `gateway.conf`.
//!
//! The pipeline, and the module that owns each step:
//!
//! ```text
//! gateway.conf ──parse──▶ AST (spans) ──validate──▶ Validated (typed settings, spans)
//!               config::parse        config::schema + validate      │
//!                                                                compile
//!                                                                  ▼
//!                     Gateway snapshot (no spans, no strings left to parse)
//!                     router + per-route pipelines + upstream pools
//!                                                                  │ Arc, swapped atomically
//!  client ──hyper──▶ server ──▶ router.lookup ──▶ pipeline ──▶ upstream pool ──▶ service
//! ```
//!
//! `config` imports no tokio, hyper or tower: it turns text into a
//! validated model or into diagnostics. `compile` turns the model into the
//! immutable [`gateway::Gateway`] snapshot, which `server` serves.

pub mod compile;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod gateway;
pub mod observe;
pub mod policy;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod tls;
