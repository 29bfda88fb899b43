//! Observability: access log lines, Prometheus metrics, W3C trace context,
//! and (cargo feature `otlp`) spans exported over OTLP.
//!
//! Nothing here blocks a request: access log lines go through a bounded
//! channel to a writer thread (dropped and counted when it is full), and
//! metrics are atomics behind pre-registered families.

pub mod access_log;
pub mod metrics;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod trace;
