//! Upstream I/O: connection pools, balancing, health, forwarding.

pub mod balance;
