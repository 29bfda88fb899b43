//! The global allocator of the default build: glibc's `malloc`, with
//! over-aligned blocks carved out of plain ones.
//!
//! Why: every new connection allocates two blocks aligned to 128 bytes,
//! tokio's task (896 bytes here) and the socket's I/O registration (256),
//! both padded to a cache line pair on purpose. Rust's system allocator
//! hands any alignment above 16 to `posix_memalign`, and glibc serves that
//! on its slow path every time: it never looks in the per-thread cache
//! (`tcache`), allocates `size + alignment` from the bins, splits off and
//! frees the part before and after the aligned block. Callgrind counted
//! 1,715 instructions per `Connection: close` request in `_int_memalign`
//! alone, and the freed blocks spill the per-thread cache on free.
//!
//! Here a block aligned to `A` (32 to [`MAX_CARVED`] bytes) is a plain
//! `malloc(size + A)`, rounded up inside to the next multiple of `A`, with
//! the address `malloc` returned kept in the 8 bytes just before the
//! aligned block (there are at least 16: `malloc`'s blocks are 16-aligned
//! and the aligned block starts past the block's start). Both blocks above
//! come to at most 1,024 bytes that way, which glibc serves from its
//! per-thread cache. The price is up to `A` bytes per such block (256 per
//! connection for the two above). Every other layout goes to the system
//! allocator unchanged; which path a block took is decided by its layout's
//! alignment alone, so `dealloc` always takes the same path as `alloc`.
//!
//! Blocks past that cache (over 1,024 bytes, up to [`KEEP_UP_TO`]) are
//! kept for the next block of the same layout on threads that ask for it
//! ([`keep_on_this_thread`]: the workers): a few per thread, given back
//! to `malloc` when the thread ends. Two such blocks are made and freed
//! over and over here: each request's state (~5.4 KiB) and each
//! connection's (~1.3 KiB), and glibc serves both from its bins, not its
//! cache (~400 instructions for the pair of calls, callgrind).
//!
//! Not used with `--features mimalloc`, which serves aligned blocks from
//! its own size classes. No crate does just this: mimalloc (above) and
//! jemalloc replace the whole allocator, and the default build keeps
//! glibc for its memory figures (bench/RESULTS.md).
#![allow(unsafe_code)] // a global allocator; every unsafe block says why it holds

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Blocks aligned to more than this come from `malloc` as they are
/// (glibc's `malloc` alignment on 64-bit targets).
const MALLOC_ALIGN: usize = 16;
/// Blocks aligned to more than this go to the system allocator's own
/// aligned path (a page-aligned block would waste most of a page here).
pub const MAX_CARVED: usize = 512;

/// Blocks larger than this (glibc's per-thread cache serves up to 1,032
/// bytes with its header) and up to [`KEEP_UP_TO`] may be kept.
const KEEP_ABOVE: usize = 1024;
/// The largest block kept for reuse.
pub const KEEP_UP_TO: usize = 16 * 1024;
/// How many blocks a thread keeps (any layouts, one block each slot).
const SLOTS: usize = 16;

/// A kept block and its layout (size 0: the slot is empty).
#[derive(Clone, Copy)]
struct Slot {
    size: usize,
    align: usize,
    ptr: *mut u8,
}

impl Slot {
    const EMPTY: Slot = Slot {
        size: 0,
        align: 0,
        ptr: std::ptr::null_mut(),
    };
}

/// A thread's kept blocks. No destructor of its own (a global allocator
/// must not register one, that allocates): [`Flush`] gives them back.
struct Keep {
    /// Blocks are kept on this thread (set by [`keep_on_this_thread`],
    /// cleared when the thread ends).
    on: Cell<bool>,
    slots: [Cell<Slot>; SLOTS],
    /// The slot the next block goes to when all are taken (its block is
    /// freed): blocks of a layout no longer asked for do not stay.
    next: Cell<usize>,
}

thread_local! {
    static KEEP: Keep = const {
        Keep {
            on: Cell::new(false),
            slots: [const { Cell::new(Slot::EMPTY) }; SLOTS],
            next: Cell::new(0),
        }
    };
    static FLUSH: Flush = const { Flush };
}

/// Gives a thread's kept blocks back to `malloc` when the thread ends.
struct Flush;

impl Drop for Flush {
    fn drop(&mut self) {
        let _ = KEEP.try_with(|k| {
            // Blocks freed from here on go straight back.
            k.on.set(false);
            for s in &k.slots {
                let slot = s.replace(Slot::EMPTY);
                if slot.size != 0 {
                    // SAFETY: a block `Carved` allocated with this layout
                    // (kept by `dealloc`, which got it with it).
                    unsafe {
                        let layout = Layout::from_size_align_unchecked(slot.size, slot.align);
                        free(slot.ptr, layout);
                    }
                }
            }
        });
    }
}

/// Keep freed blocks of over 1,024 bytes on this thread for the next of
/// the same layout (see the module's doc). For threads that live as long
/// as the process serves (the workers); its blocks go back to `malloc`
/// when the thread ends. Does nothing for blocks of another allocator.
pub fn keep_on_this_thread() {
    // Registers the thread's `Flush` (outside the allocator: that
    // registration may allocate).
    let _ = FLUSH.try_with(|_| ());
    let _ = KEEP.try_with(|k| k.on.set(true));
}

/// Whether blocks of `layout`'s size may be kept.
#[inline]
fn keepable(layout: Layout) -> bool {
    layout.size() > KEEP_ABOVE && layout.size() <= KEEP_UP_TO
}

/// A kept block of exactly `layout`, if this thread keeps one.
#[inline]
fn take_kept(layout: Layout) -> Option<*mut u8> {
    KEEP.try_with(|k| {
        // An empty slot's size (0) matches no keepable layout.
        for s in &k.slots {
            let slot = s.get();
            if slot.size == layout.size() && slot.align == layout.align() {
                s.set(Slot::EMPTY);
                return Some(slot.ptr);
            }
        }
        None
    })
    .ok()
    .flatten()
}

/// Keeps the block at `ptr` of `layout` when this thread keeps blocks
/// (false: it is to be freed). With every slot taken, the oldest-placed
/// block makes room (freed).
#[inline]
fn put_kept(ptr: *mut u8, layout: Layout) -> bool {
    KEEP.try_with(|k| {
        if !k.on.get() {
            return false;
        }
        let new = Slot {
            size: layout.size(),
            align: layout.align(),
            ptr,
        };
        for s in &k.slots {
            if s.get().size == 0 {
                s.set(new);
                return true;
            }
        }
        let at = k.next.get();
        k.next.set((at + 1) % SLOTS);
        let old = k.slots[at].replace(new);
        // SAFETY: a block `Carved` allocated with this layout (kept by
        // `dealloc`, which got it with it).
        unsafe {
            free(
                old.ptr,
                Layout::from_size_align_unchecked(old.size, old.align),
            )
        };
        true
    })
    .unwrap_or(false)
}

/// Frees a block of `layout` (never keeps it).
///
/// # Safety
/// `ptr` came from `Carved`'s `alloc`, `alloc_zeroed` or `realloc` with
/// `layout`.
#[inline]
unsafe fn free(ptr: *mut u8, layout: Layout) {
    if !carved(layout) {
        // SAFETY: the caller's guarantees, passed on.
        return unsafe { System.dealloc(ptr, layout) };
    }
    // SAFETY: a carved layout's block was carved by `alloc`, whose
    // `outer` succeeded for this very layout.
    unsafe {
        let o = outer(layout).unwrap_unchecked();
        System.dealloc(raw_of(ptr), o);
    }
}

/// `alloc` of a block that may be kept: out of line, so that the usual
/// small block's path stays short enough to inline.
///
/// # Safety
/// As `GlobalAlloc::alloc`.
#[inline(never)]
unsafe fn alloc_keepable(layout: Layout) -> *mut u8 {
    match take_kept(layout) {
        Some(p) => p,
        // SAFETY: the caller's guarantees, passed on to `System.alloc`.
        None => unsafe { get(layout, |l| System.alloc(l)) },
    }
}

/// `dealloc` of a block that may be kept (out of line, as above).
///
/// # Safety
/// As `GlobalAlloc::dealloc`.
#[inline(never)]
unsafe fn dealloc_keepable(ptr: *mut u8, layout: Layout) {
    if !put_kept(ptr, layout) {
        // SAFETY: the caller's guarantees, passed on.
        unsafe { free(ptr, layout) }
    }
}

/// The allocator (see the module's doc).
pub struct Carved;

/// Whether blocks of `layout` are carved out of a larger plain block.
#[inline]
fn carved(layout: Layout) -> bool {
    layout.align() > MALLOC_ALIGN && layout.align() <= MAX_CARVED
}

/// The plain block a carved block of `layout` lives in.
#[inline]
fn outer(layout: Layout) -> Option<Layout> {
    let size = layout.size().checked_add(layout.align())?;
    Layout::from_size_align(size, MALLOC_ALIGN).ok()
}

/// The carved block inside the plain block at `raw` (null stays null),
/// with `raw` kept just before it.
///
/// # Safety
/// `raw` is null or a block of `outer(layout)` from [`System`].
#[inline]
unsafe fn carve(raw: *mut u8, layout: Layout) -> *mut u8 {
    if raw.is_null() {
        return raw;
    }
    let align = layout.align();
    // The next multiple of `align` strictly after `raw`: at least
    // `MALLOC_ALIGN` bytes past it (both are multiples of it), at most
    // `align`, so `size` bytes from it end inside the `size + align` block.
    let skip = align - (raw as usize & (align - 1));
    // SAFETY: `skip <= align`, inside the block; `skip >= 16` leaves room
    // for the address before the carved block, which is aligned to at
    // least 32, so the `usize` slot 8 bytes before it is aligned too.
    unsafe {
        let ptr = raw.add(skip);
        ptr.cast::<usize>().sub(1).write(raw as usize);
        ptr
    }
}

/// The plain block a carved block at `ptr` was cut from.
///
/// # Safety
/// `ptr` came from [`carve`].
#[inline]
unsafe fn raw_of(ptr: *mut u8) -> *mut u8 {
    // SAFETY: `carve` wrote the address in the `usize` just before `ptr`;
    // provenance comes from `ptr`, which points into the same block.
    unsafe {
        let addr = ptr.cast::<usize>().sub(1).read();
        ptr.wrapping_sub(ptr as usize - addr)
    }
}

/// A block of `layout` from `system` (the system allocator's `alloc` or
/// `alloc_zeroed`): as it is, or carved out of a larger plain one.
///
/// # Safety
/// `layout` has a non-zero size; `system` allocates the layout it is given.
#[inline]
unsafe fn get(layout: Layout, system: impl FnOnce(Layout) -> *mut u8) -> *mut u8 {
    if !carved(layout) {
        return system(layout);
    }
    match outer(layout) {
        // SAFETY: `outer` has a non-zero size; `carve` gets its block.
        Some(o) => unsafe { carve(system(o), layout) },
        None => std::ptr::null_mut(),
    }
}

// SAFETY: every block is a block of the system allocator, or lies inside
// one at least `size` bytes past its aligned start (see `carve`); `dealloc`
// and `realloc` choose the path by the layout the block was allocated with,
// which the caller must pass back unchanged, so they free what was
// allocated. A kept block is handed out again only for the very layout it
// was allocated with, so the same holds for it.
unsafe impl GlobalAlloc for Carved {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if keepable(layout) {
            // SAFETY: the caller's guarantees, passed on.
            return unsafe { alloc_keepable(layout) };
        }
        // SAFETY: the caller's guarantees, passed on to `System.alloc`.
        unsafe { get(layout, |l| System.alloc(l)) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`; a carved block's whole plain block is
        // zeroed, the carved part included (the address goes before it).
        unsafe { get(layout, |l| System.alloc_zeroed(l)) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if keepable(layout) {
            // SAFETY: the caller's guarantees, passed on.
            return unsafe { dealloc_keepable(ptr, layout) };
        }
        // SAFETY: the caller's guarantees, passed on.
        unsafe { free(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !carved(layout) {
            // SAFETY: the caller's guarantees, passed on.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // A new carved block and a copy (what `GlobalAlloc`'s default does).
        // SAFETY: the caller guarantees `new_size` is non-zero and fits the
        // alignment; the old block holds `layout.size()` bytes.
        unsafe {
            let new = Layout::from_size_align_unchecked(new_size, layout.align());
            let fresh = self.alloc(new);
            if !fresh.is_null() {
                std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            fresh
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lay(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).expect("a valid layout")
    }

    /// Fill `n` bytes at `p` with a pattern of `seed`, check it is there.
    fn fill(p: *mut u8, n: usize, seed: u8) {
        for i in 0..n {
            // SAFETY: `p` holds `n` bytes.
            unsafe { p.add(i).write(seed.wrapping_add(i as u8)) };
        }
    }
    fn holds(p: *const u8, n: usize, seed: u8) -> bool {
        // SAFETY: `p` holds `n` initialised bytes.
        (0..n).all(|i| unsafe { p.add(i).read() } == seed.wrapping_add(i as u8))
    }

    #[test]
    fn every_alignment_and_size_gets_an_aligned_block_it_can_use() {
        let a = Carved;
        for align in [1, 8, 16, 32, 64, 128, 256, 512, 1024, 4096] {
            for size in [1, 7, 16, 100, 256, 896, 1000, 4096, 70_000] {
                let layout = lay(size, align);
                // SAFETY: a non-zero size; freed with the same layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "{size} bytes aligned to {align}");
                    fill(p, size, 3);
                    // Other blocks do not overlap it.
                    let q = a.alloc(layout);
                    fill(q, size, 9);
                    assert!(holds(p, size, 3));
                    a.dealloc(q, layout);

                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| z.add(i).read() == 0));
                    a.dealloc(z, layout);

                    // Grown and shrunk, the contents stay.
                    let g = a.realloc(p, layout, size * 3);
                    assert_eq!(g as usize % align, 0);
                    assert!(holds(g, size, 3));
                    fill(g, size * 3, 5);
                    let grown = lay(size * 3, align);
                    let s = a.realloc(g, grown, size.div_ceil(2));
                    assert_eq!(s as usize % align, 0);
                    assert!(holds(s, size.div_ceil(2), 5));
                    a.dealloc(s, lay(size.div_ceil(2), align));
                }
            }
        }
    }

    #[test]
    fn the_connection_blocks_fit_glibcs_per_thread_cache() {
        // glibc serves blocks of up to 1,032 bytes from its per-thread
        // cache; tokio's task (896) and I/O registration (256), both
        // aligned to 128, come to 1,024 and 384.
        for size in [256, 896] {
            let l = lay(size, 128);
            assert!(carved(l));
            assert!(outer(l).expect("fits").size() <= 1032);
        }
        // Sizes that cannot be served are refused, not wrapped.
        let huge = lay(isize::MAX as usize - 1000, 256);
        // SAFETY: a non-zero size.
        assert!(unsafe { Carved.alloc(huge) }.is_null());
    }

    #[test]
    fn kept_blocks_come_back_for_their_layout_only_and_go_back_when_the_thread_ends() {
        std::thread::spawn(|| {
            let a = Carved;
            let big = lay(5456, 128);
            let plain = lay(4096, 8);
            // SAFETY: non-zero sizes; each block freed once with its layout.
            unsafe {
                // Not kept before the thread asks.
                let p = a.alloc(big);
                a.dealloc(p, big);
                assert!(take_kept(big).is_none());

                keep_on_this_thread();
                let p = a.alloc(big);
                fill(p, 5456, 1);
                a.dealloc(p, big);
                // Same layout: the same block. Another size or alignment:
                // not it.
                let other = a.alloc(lay(5456, 64));
                assert_ne!(other, p);
                let q = a.alloc(big);
                assert_eq!(q, p);
                assert_eq!(q as usize % 128, 0);
                a.dealloc(other, lay(5456, 64));

                // No more than SLOTS are kept: the latest, the older ones
                // freed to make room.
                let blocks: Vec<*mut u8> = (0..SLOTS + 4).map(|_| a.alloc(plain)).collect();
                for (i, &b) in blocks.iter().enumerate() {
                    fill(b, 4096, i as u8);
                }
                for &b in &blocks {
                    a.dealloc(b, plain);
                }
                let kept: Vec<*mut u8> = KEEP.with(|k| {
                    k.slots
                        .iter()
                        .filter(|s| s.get().size != 0)
                        .map(|s| s.get().ptr)
                        .collect()
                });
                assert_eq!(kept.len(), SLOTS);
                assert!(blocks[4..].iter().all(|b| kept.contains(b)));
                // Small and huge blocks are never kept.
                for l in [lay(1024, 8), lay(KEEP_UP_TO + 1, 8)] {
                    let b = a.alloc(l);
                    a.dealloc(b, l);
                    assert!(take_kept(l).is_none());
                }
                // Zeroed blocks come zeroed even when one is kept.
                let z = a.alloc_zeroed(plain);
                assert!((0..4096).all(|i| z.add(i).read() == 0));
                a.dealloc(z, plain);
                a.dealloc(q, big);
            }
        })
        .join()
        .expect("the keeping thread");
        // A thread's kept blocks went back when it ended: `valgrind
        // --leak-check=full` on this test finds nothing lost, and the 16
        // kept blocks lost when `Flush` does nothing. A new thread keeps
        // none.
        std::thread::spawn(|| {
            assert!(take_kept(lay(4096, 8)).is_none());
            assert!(!KEEP.with(|k| k.on.get()));
        })
        .join()
        .expect("a new thread");
    }

    #[test]
    fn threads_free_what_other_threads_allocated() {
        let layout = lay(896, 128);
        let blocks: Vec<usize> = (0..64)
            .map(|i| {
                // SAFETY: a non-zero size.
                let p = unsafe { Carved.alloc(layout) };
                fill(p, 896, i);
                p as usize
            })
            .collect();
        std::thread::spawn(move || {
            for (i, p) in blocks.into_iter().enumerate() {
                assert!(holds(p as *const u8, 896, i as u8));
                // SAFETY: allocated above with this layout.
                unsafe { Carved.dealloc(p as *mut u8, layout) };
            }
        })
        .join()
        .expect("the freeing thread");
    }
}
