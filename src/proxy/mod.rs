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

/// Put `value` in `slot`, over a value the `http` crate made as a default
/// (`Request::new`'s and `Response::new`'s map and URI), or over an empty
/// request body, without running its drop: those own no memory
/// (`HeaderMap::new` does not allocate; the default URI is `/`, static
/// bytes; `RequestBody::Empty` holds nothing), and their drop code is an
/// out-of-line call a request otherwise makes for nothing. Anything else
/// put over this way would leak.
#[inline]
pub(crate) fn over_default<T>(slot: &mut T, value: T) {
    std::mem::forget(std::mem::replace(slot, value));
}
