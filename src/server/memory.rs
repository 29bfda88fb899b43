//! Giving memory back after a burst.
//!
//! A burst of requests (hundreds in flight on one worker at once) allocates
//! a request state, buffers and an upstream connection for each; when it
//! ends they are freed, but glibc's allocator keeps the freed pages: it
//! only returns the top of a heap to the system, and the connections that
//! stay open hold chunks between the freed ones. The process then stays at
//! its peak resident size for as long as it runs (measured: 1,000
//! keep-alive connections after one request each held 15.5 KiB each, 9.2
//! KiB once the freed pages were given back; bench/RESULTS.md).
//!
//! So every request counts itself in flight on its worker thread
//! ([`InFlight`], a thread-local counter: no atomic, no lock), and when a
//! burst ends (the worker had at least [`BURST`] requests in flight and is
//! down to an eighth of its peak) a background thread waits [`SETTLE`] for
//! the last responses to be freed and calls glibc's `malloc_trim(0)`, which
//! hands every free page of every arena back with `madvise`. At most one
//! trim per [`COOLDOWN`]; a burst that ends meanwhile is trimmed after it.
//! Steady load never triggers it (the in-flight count does not fall to an
//! eighth of its peak), nor does traffic that never reaches [`BURST`].
//!
//! The trim runs on its own thread, started at the first burst, never on a
//! worker: it walks the arenas under their locks (about a millisecond for
//! tens of MiB), so a worker allocating meanwhile waits that long at most.
//! `memory_trim off;` (top level) turns it off; a reload applies it.
//! The same trim follows every config load ([`dispose_after_load`]):
//! parsing a large config frees far more than the compiled config keeps.
//! Counted in `gateway_memory_trims_total` and
//! `gateway_memory_released_bytes_total` (resident bytes before minus
//! after). Built with mimalloc (`--features mimalloc`) the worker whose
//! burst ended collects its own heap instead (see `mi` below). Elsewhere than
//! on glibc the allocator returns memory itself (or has no such call) and
//! nothing is done.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(not(feature = "mimalloc"))]
use std::sync::{
    OnceLock,
    mpsc::{Receiver, SyncSender, sync_channel},
};
use std::time::Duration;

use crate::observe::metrics::METRICS;

/// A burst: at least this many requests in flight at once on one worker.
pub const BURST: u32 = 128;
/// How long after a burst ended the trim waits for the last responses.
pub const SETTLE: Duration = Duration::from_millis(50);
/// At most one trim per this long.
pub const COOLDOWN: Duration = Duration::from_secs(2);

/// `memory_trim` of the config being served.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turn the trim after bursts on or off (`memory_trim on|off;`).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

thread_local! {
    /// (requests in flight on this thread, their peak since the last burst).
    static LOAD: Cell<(u32, u32)> = const { Cell::new((0, 0)) };
}

/// One request in flight on this thread, from its head to the end of its
/// response; dropping it counts the request out.
#[derive(Debug)]
pub struct InFlight {
    _private: (),
}

impl InFlight {
    pub fn begin() -> InFlight {
        let _ = LOAD.try_with(|l| {
            let (n, peak) = l.get();
            let n = n.saturating_add(1);
            l.set((n, peak.max(n)));
        });
        InFlight { _private: () }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let _ = LOAD.try_with(|l| {
            let (state, burst_ended) = request_ended(l.get());
            l.set(state);
            if burst_ended && ENABLED.load(Ordering::Relaxed) {
                SIGNALS.fetch_add(1, Ordering::Relaxed);
                #[cfg(not(feature = "mimalloc"))]
                trim_soon();
                #[cfg(feature = "mimalloc")]
                mi::collect_soon();
            }
        });
    }
}

/// Whether the trims are on (`memory_trim` of the config being served).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Drop what a config load leaves behind (its syntax tree and sources)
/// and give back what parsing freed (`trim`: `memory_trim` of the config
/// that will be served). Parsing builds a token queue and a syntax tree
/// far larger than the compiled config (a config of 10,000 locations
/// peaked at ~40 MiB of heap for ~10 MiB kept), and glibc keeps freed
/// pages: without the trim the process stayed at the load's peak for as
/// long as it ran. With glibc both happen on a thread of their own, off
/// the load's path (dropping that tree took 10–15 ms); with mimalloc on
/// the loading thread, whose heap holds the freed pages.
pub fn dispose_after_load<T: Send + 'static>(garbage: T, trim: bool) {
    #[cfg(not(feature = "mimalloc"))]
    {
        let spawned = std::thread::Builder::new()
            .name("tollgate-unload".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                drop(garbage);
                if trim {
                    released(release);
                }
            });
        if let Err(e) = spawned {
            // The closure (and the garbage with it) is dropped already.
            tracing::warn!(error = %e, "cannot start a thread to give memory back; trimming here");
            if trim {
                released(release);
            }
        }
    }
    #[cfg(feature = "mimalloc")]
    {
        drop(garbage);
        if trim {
            released(|| {
                // SAFETY: as in `mi::collect_soon`: no pointer, no
                // precondition; it collects the calling thread's heap.
                #[allow(unsafe_code)]
                unsafe {
                    libmimalloc_sys::mi_collect(true);
                }
                true
            });
        }
    }
}

/// The counter after one request ended, and whether a burst just did.
fn request_ended((n, peak): (u32, u32)) -> ((u32, u32), bool) {
    let n = n.saturating_sub(1);
    if peak >= BURST && n <= peak / 8 {
        ((n, n), true)
    } else {
        ((n, peak), false)
    }
}

/// Bursts that woke the trimming thread (for the tests).
static SIGNALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Wake the trimming thread (started on the first call).
#[cfg(not(feature = "mimalloc"))]
fn trim_soon() {
    static TRIMMER: OnceLock<Option<SyncSender<()>>> = OnceLock::new();
    let tx = TRIMMER.get_or_init(|| {
        let (tx, rx) = sync_channel(1);
        std::thread::Builder::new()
            .name("tollgate-trim".into())
            .stack_size(256 * 1024)
            .spawn(move || trimmer(rx))
            .map_err(|e| tracing::warn!(error = %e, "cannot start the memory trimming thread"))
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = tx {
        // Full: a trim is already due, which covers this burst too.
        let _ = tx.try_send(());
    }
}

#[cfg(not(feature = "mimalloc"))]
fn trimmer(rx: Receiver<()>) {
    while rx.recv().is_ok() {
        std::thread::sleep(SETTLE);
        released(release);
        std::thread::sleep(COOLDOWN);
    }
}

/// Run `release` and count what it gave back (resident bytes before minus
/// after) when it did anything.
fn released(release: impl FnOnce() -> bool) {
    let before = resident_bytes();
    if release() {
        let after = resident_bytes();
        METRICS.memory_trims.inc();
        METRICS.memory_released.inc_by(before.saturating_sub(after));
        tracing::debug!(
            resident_before = before,
            resident_after = after,
            "gave freed memory back"
        );
    }
}

/// With mimalloc (`--features mimalloc`) the freed pages are the worker's
/// own: its thread-local heap keeps them until the thread itself collects,
/// and the arenas purge what was handed back only after a delay, and only
/// when some thread allocates. So the collect runs on the worker whose
/// burst ended, as a task of its runtime ([`SETTLE`] later, at most one per
/// [`COOLDOWN`] per worker): `mi_collect(true)` frees its empty pages to the
/// arenas and purges them at once.
#[cfg(feature = "mimalloc")]
mod mi {
    use std::cell::Cell;
    use std::time::Instant;

    use super::{COOLDOWN, SETTLE, released};

    thread_local! {
        /// A collect is scheduled on this worker.
        static DUE: Cell<bool> = const { Cell::new(false) };
        /// When this worker last collected.
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }

    pub(super) fn collect_soon() {
        // One already scheduled covers this burst too.
        if DUE.replace(true) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            DUE.set(false);
            return;
        };
        let wait = LAST.get().map_or(SETTLE, |last| {
            SETTLE.max(COOLDOWN.saturating_sub(last.elapsed()))
        });
        runtime.spawn(async move {
            tokio::time::sleep(wait).await;
            released(|| {
                // SAFETY: `mi_collect` takes no pointer and has no
                // precondition; it collects the calling thread's heap and
                // purges the shared arenas under their own locks.
                #[allow(unsafe_code)]
                unsafe {
                    libmimalloc_sys::mi_collect(true);
                }
                true
            });
            DUE.set(false);
            LAST.set(Some(Instant::now()));
        });
    }
}

/// The process's resident set size (`VmRSS`), 0 when unknown.
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// glibc's `malloc_trim(0)`: every free page of every arena back to the
/// system. Returns whether a trim was done (not whether memory came back).
#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
#[allow(unsafe_code)] // one FFI call, audited here
fn release() -> bool {
    // SAFETY: `malloc_trim` takes no pointer and has no precondition;
    // glibc takes each arena's lock itself, so it is safe to call while
    // other threads allocate.
    unsafe {
        libc::malloc_trim(0);
    }
    true
}

#[cfg(all(
    not(all(target_os = "linux", target_env = "gnu")),
    not(feature = "mimalloc")
))]
fn release() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_ends_when_an_eighth_of_its_peak_is_left() {
        // Below BURST nothing ever triggers.
        assert_eq!(request_ended((100, 100)), ((99, 100), false));
        assert_eq!(request_ended((1, BURST - 1)), ((0, BURST - 1), false));
        // A burst of 1,000 winds down: nothing until 125 are left.
        assert_eq!(request_ended((127, 1000)), ((126, 1000), false));
        assert_eq!(request_ended((126, 1000)), ((125, 125), true));
        // The peak starts again from what was left.
        assert_eq!(request_ended((125, 125)), ((124, 125), false));
        // Never below zero (a request counted out on another thread).
        assert_eq!(request_ended((0, 0)), ((0, 0), false));
    }

    #[test]
    fn in_flight_counts_on_this_thread() {
        std::thread::spawn(|| {
            let reqs: Vec<InFlight> = (0..10).map(|_| InFlight::begin()).collect();
            assert_eq!(LOAD.with(Cell::get), (10, 10));
            drop(reqs);
            assert_eq!(LOAD.with(Cell::get), (0, 10));
        })
        .join()
        .expect("the counting thread");
    }

    #[test]
    fn a_burst_wakes_the_trimmer_only_when_enabled() {
        let burst = || {
            std::thread::spawn(|| {
                let reqs: Vec<InFlight> = (0..BURST + 10).map(|_| InFlight::begin()).collect();
                drop(reqs);
            })
            .join()
            .expect("the burst thread");
        };
        set_enabled(false);
        let before = SIGNALS.load(Ordering::Relaxed);
        burst();
        assert_eq!(SIGNALS.load(Ordering::Relaxed), before, "trimmed while off");
        set_enabled(true);
        burst();
        assert_eq!(SIGNALS.load(Ordering::Relaxed), before + 1);
    }

    #[test]
    fn resident_size_is_read() {
        assert!(resident_bytes() > 0);
    }
}
