//! Validated config → the immutable [`crate::gateway::Gateway`] snapshot.
//! Sync, no sockets.

pub mod normalize;
pub mod router;
