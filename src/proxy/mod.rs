//! Upstream I/O: connection pools, balancing, health, forwarding.

pub mod aggregate;
pub mod balance;
pub mod body;
pub mod client;
pub mod forward;
pub mod headers;
pub mod health;
pub mod pool;
pub mod vars;
