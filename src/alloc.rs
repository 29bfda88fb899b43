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
//! ([`keep_on_this_thread`]: the workers): up to `DEPTH` (64) blocks of each
//! of `CLASSES` (4) layouts and [`KEEP_BYTES`] in all per thread, given back
//! to `malloc` when the thread ends. Two such blocks are made and freed
//! over and over here: each request's state (~5.4 KiB) and each
//! connection's (~1.3 KiB), and glibc serves both from its bins, not its
//! cache (~400 instructions for the pair of calls, callgrind).
//!
//! Small blocks (up to `SMALL_UP_TO` (1,024) bytes, aligned to at most 16, and
//! the plain blocks carved ones are cut from) are asked of `malloc` with
//! their size rounded up to a multiple of 16, so that any block of a
//! rounded size serves any request that rounds to it, and worker threads
//! keep up to `SMALL_DEPTH` (128) freed blocks of each such size
//! ([`SMALL_BYTES`] in all), in a list threaded through the blocks
//! themselves (64 a size and 256 KiB in all left a tenth of the blocks
//! of new connections to glibc's slow path at 64 clients: more than 64
//! connections' tasks and registrations end together there, the new ones
//! accepted before the old ones' tasks are freed). glibc's per-thread cache does the same with 7 blocks a
//! size: a worker answering 64 clients at once frees and then allocates
//! 64 blocks of a size in a row, and past the 7th glibc takes its slow
//! path both ways (`_int_free`, `_int_malloc`: 3,400 instructions per
//! `Connection: close` request at 64 connections, a ninth of all; 600 for
//! a keep-alive one). A kept block is also handed out in fewer
//! instructions than glibc's cache takes (no checks on its headers).
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
/// Plain blocks (aligned to at most 16) of up to this size are allocated
/// with their size rounded up to a multiple of 16, and kept per thread in
/// one list per such size (see the module's doc).
const SMALL_UP_TO: usize = 1024;
/// The number of small sizes (16, 32, ..., [`SMALL_UP_TO`]).
const SMALL_CLASSES: usize = SMALL_UP_TO / 16;
/// How many blocks of one small size a thread keeps (glibc's per-thread
/// cache keeps 7; 64 here still sent ~400 instructions per new connection
/// at 64 clients to glibc's slow path).
const SMALL_DEPTH: u32 = 128;
/// The most a thread keeps in small blocks, in bytes.
pub const SMALL_BYTES: usize = 512 * 1024;
/// How many layouts a thread keeps blocks of at once.
const CLASSES: usize = 4;
/// How many blocks of one layout a thread keeps: as many as requests or
/// connections end together in one turn of a busy worker (64 clients
/// answered in one batch freed 64 request states, and 16 kept blocks of
/// any layout served half of the next batch).
const DEPTH: usize = 64;
/// The most a thread keeps, in bytes (all layouts together).
pub const KEEP_BYTES: usize = 512 * 1024;

/// The kept blocks of one layout (`len` 0: the class is free for any).
struct Class {
    size: Cell<usize>,
    align: Cell<usize>,
    len: Cell<usize>,
    blocks: [Cell<*mut u8>; DEPTH],
}

impl Class {
    const fn empty() -> Class {
        Class {
            size: Cell::new(0),
            align: Cell::new(0),
            len: Cell::new(0),
            blocks: [const { Cell::new(std::ptr::null_mut()) }; DEPTH],
        }
    }

    fn is(&self, layout: Layout) -> bool {
        self.size.get() == layout.size() && self.align.get() == layout.align()
    }
}

/// A thread's kept blocks. No destructor of its own (a global allocator
/// must not register one, that allocates): [`Flush`] gives them back.
struct Keep {
    /// Blocks are kept on this thread (set by [`keep_on_this_thread`],
    /// cleared when the thread ends).
    on: Cell<bool>,
    classes: [Class; CLASSES],
    /// Bytes kept, all classes together (at most [`KEEP_BYTES`]).
    bytes: Cell<usize>,
    /// Kept small blocks: for each size, the last freed (null: none), which
    /// holds the address of the one freed before it in its first 8 bytes.
    small: [Cell<*mut u8>; SMALL_CLASSES],
    /// How many small blocks of each size are kept.
    small_len: [Cell<u32>; SMALL_CLASSES],
    /// Bytes kept in small blocks (at most [`SMALL_BYTES`]).
    small_bytes: Cell<usize>,
}

thread_local! {
    static KEEP: Keep = const {
        Keep {
            on: Cell::new(false),
            classes: [const { Class::empty() }; CLASSES],
            bytes: Cell::new(0),
            small: [const { Cell::new(std::ptr::null_mut()) }; SMALL_CLASSES],
            small_len: [const { Cell::new(0) }; SMALL_CLASSES],
            small_bytes: Cell::new(0),
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
            for c in &k.classes {
                for b in &c.blocks[..c.len.replace(0)] {
                    // SAFETY: a block `Carved` allocated with this class's
                    // layout (kept by `dealloc`, which got it with it).
                    unsafe {
                        let layout = Layout::from_size_align_unchecked(c.size.get(), c.align.get());
                        free(b.get(), layout);
                    }
                }
            }
            k.bytes.set(0);
            for (i, head) in k.small.iter().enumerate() {
                let mut b = head.replace(std::ptr::null_mut());
                while !b.is_null() {
                    // SAFETY: a kept small block of this size, whose first
                    // 8 bytes `put_small` wrote: the next one's address.
                    unsafe {
                        let next = b.cast::<*mut u8>().read();
                        System.dealloc(b, small_layout(small_size(i)));
                        b = next;
                    }
                }
                k.small_len[i].set(0);
            }
            k.small_bytes.set(0);
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

/// A kept block of exactly `layout`, if this thread keeps one (the one
/// freed last: the likeliest still in the cache).
#[inline]
fn take_kept(layout: Layout) -> Option<*mut u8> {
    KEEP.try_with(|k| {
        let c = k.classes.iter().find(|c| c.len.get() > 0 && c.is(layout))?;
        let len = c.len.get() - 1;
        c.len.set(len);
        k.bytes.set(k.bytes.get() - layout.size());
        Some(c.blocks[len].get())
    })
    .ok()
    .flatten()
}

/// Keeps the block at `ptr` of `layout` when this thread keeps blocks
/// and has room for it (false: it is to be freed). A layout takes a class
/// of its own while it has blocks kept; with every class taken by other
/// layouts, or [`DEPTH`] blocks of it or [`KEEP_BYTES`] in all kept, the
/// block is freed.
#[inline]
fn put_kept(ptr: *mut u8, layout: Layout) -> bool {
    KEEP.try_with(|k| {
        if !k.on.get() || k.bytes.get() + layout.size() > KEEP_BYTES {
            return false;
        }
        let c = match k.classes.iter().find(|c| c.len.get() > 0 && c.is(layout)) {
            Some(c) => c,
            None => match k.classes.iter().find(|c| c.len.get() == 0) {
                Some(c) => {
                    c.size.set(layout.size());
                    c.align.set(layout.align());
                    c
                }
                None => return false,
            },
        };
        let len = c.len.get();
        if len == DEPTH {
            return false;
        }
        c.blocks[len].set(ptr);
        c.len.set(len + 1);
        k.bytes.set(k.bytes.get() + layout.size());
        true
    })
    .unwrap_or(false)
}

/// The list index of a small block of `size` bytes (1 to [`SMALL_UP_TO`]).
#[inline]
fn small_index(size: usize) -> usize {
    (size - 1) >> 4
}

/// The size small blocks of list `i` are allocated with.
#[inline]
fn small_size(i: usize) -> usize {
    (i + 1) << 4
}

/// The layout small blocks of `size` bytes are allocated with.
#[inline]
fn small_layout(size: usize) -> Layout {
    // SAFETY: at most `SMALL_UP_TO` bytes aligned to 16: a valid layout.
    unsafe { Layout::from_size_align_unchecked(size, MALLOC_ALIGN) }
}

/// A kept small block for `size` bytes, if this thread keeps one (the one
/// freed last).
#[inline]
fn take_small(size: usize) -> Option<*mut u8> {
    KEEP.try_with(|k| {
        let i = small_index(size);
        let head = k.small[i].get();
        if head.is_null() {
            return None;
        }
        // SAFETY: a kept block: `put_small` wrote the next one's address
        // in its first 8 bytes (it holds at least 16, aligned to 16).
        let next = unsafe { head.cast::<*mut u8>().read() };
        k.small[i].set(next);
        k.small_len[i].set(k.small_len[i].get() - 1);
        k.small_bytes.set(k.small_bytes.get() - small_size(i));
        Some(head)
    })
    .ok()
    .flatten()
}

/// Keeps the small block at `ptr` for `size` bytes when this thread keeps
/// blocks and has room (false: it is to be freed).
#[inline]
fn put_small(ptr: *mut u8, size: usize) -> bool {
    KEEP.try_with(|k| {
        let i = small_index(size);
        let len = k.small_len[i].get();
        if !k.on.get() || len >= SMALL_DEPTH || k.small_bytes.get() + small_size(i) > SMALL_BYTES {
            return false;
        }
        // SAFETY: the block is the caller's to free, so no one else uses
        // it; it holds at least 16 bytes and is aligned to 16 (a `malloc`
        // block), room for an address.
        unsafe { ptr.cast::<*mut u8>().write(k.small[i].get()) };
        k.small[i].set(ptr);
        k.small_len[i].set(len + 1);
        k.small_bytes.set(k.small_bytes.get() + small_size(i));
        true
    })
    .unwrap_or(false)
}

/// A block of `layout` that is not carved: a small one kept on this
/// thread, or one from the system allocator (small sizes rounded up);
/// blocks aligned to more than 16 as the system allocator makes them.
///
/// # Safety
/// `layout` has a non-zero size.
#[inline]
unsafe fn plain_alloc(layout: Layout) -> *mut u8 {
    let size = layout.size();
    if size > SMALL_UP_TO || layout.align() > MALLOC_ALIGN {
        // SAFETY: the caller's guarantees, passed on.
        return unsafe { System.alloc(layout) };
    }
    match take_small(size) {
        Some(p) => p,
        // SAFETY: a non-zero size.
        None => unsafe { System.alloc(small_layout(small_size(small_index(size)))) },
    }
}

/// [`plain_alloc`], zeroed (never a kept block: `calloc` zeroes for free
/// where it can).
///
/// # Safety
/// As [`plain_alloc`].
#[inline]
unsafe fn plain_alloc_zeroed(layout: Layout) -> *mut u8 {
    let size = layout.size();
    if size > SMALL_UP_TO || layout.align() > MALLOC_ALIGN {
        // SAFETY: the caller's guarantees, passed on.
        return unsafe { System.alloc_zeroed(layout) };
    }
    // SAFETY: a non-zero size.
    unsafe { System.alloc_zeroed(small_layout(small_size(small_index(size)))) }
}

/// Frees (or keeps) a block of `layout` that is not carved.
///
/// # Safety
/// `ptr` came from [`plain_alloc`], [`plain_alloc_zeroed`] or
/// [`plain_realloc`] with `layout`.
#[inline]
unsafe fn plain_dealloc(ptr: *mut u8, layout: Layout) {
    let size = layout.size();
    if size > SMALL_UP_TO || layout.align() > MALLOC_ALIGN {
        // SAFETY: the caller's guarantees, passed on.
        return unsafe { System.dealloc(ptr, layout) };
    }
    if !put_small(ptr, size) {
        // SAFETY: allocated with this rounded layout (see `plain_alloc`).
        unsafe { System.dealloc(ptr, small_layout(small_size(small_index(size)))) }
    }
}

/// Resizes a block of `layout` that is not carved to `new_size` (rounded up as
/// [`plain_alloc`] does when small, so that it can be kept when freed).
///
/// # Safety
/// As `GlobalAlloc::realloc`, for a block from the functions above.
#[inline]
unsafe fn plain_realloc(ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
    let new_size = if new_size <= SMALL_UP_TO && layout.align() <= MALLOC_ALIGN {
        small_size(small_index(new_size))
    } else {
        new_size
    };
    // SAFETY: the caller's guarantees; a rounded size still fits the
    // alignment (a multiple of 16). glibc frees and resizes by the block's
    // own header, whatever size it was asked for.
    unsafe { System.realloc(ptr, layout, new_size) }
}

/// Frees a block of `layout`: never kept among the larger blocks (small
/// ones are, by [`plain_dealloc`], on a thread that keeps blocks).
///
/// # Safety
/// `ptr` came from `Carved`'s `alloc`, `alloc_zeroed` or `realloc` with
/// `layout`.
#[inline]
unsafe fn free(ptr: *mut u8, layout: Layout) {
    if !carved(layout) {
        // SAFETY: the caller's guarantees, passed on.
        return unsafe { plain_dealloc(ptr, layout) };
    }
    // SAFETY: a carved layout's block was carved by `alloc`, whose
    // `outer` succeeded for this very layout.
    unsafe {
        let o = outer(layout).unwrap_unchecked();
        plain_dealloc(raw_of(ptr), o);
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
        None => unsafe { get(layout, |l| plain_alloc(l)) },
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
        // SAFETY: the caller's guarantees, passed on to `plain_alloc`.
        unsafe { get(layout, |l| plain_alloc(l)) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`; a carved block's whole plain block is
        // zeroed, the carved part included (the address goes before it).
        unsafe { get(layout, |l| plain_alloc_zeroed(l)) }
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
            return unsafe { plain_realloc(ptr, layout, new_size) };
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

                // Up to DEPTH of a layout are kept (the first freed; the
                // rest go back), and handed out last freed first.
                let blocks: Vec<*mut u8> = (0..DEPTH + 4).map(|_| a.alloc(plain)).collect();
                for (i, &b) in blocks.iter().enumerate() {
                    fill(b, 4096, i as u8);
                }
                for &b in &blocks {
                    a.dealloc(b, plain);
                }
                let kept = |l: Layout| -> Vec<*mut u8> {
                    KEEP.with(|k| {
                        k.classes
                            .iter()
                            .filter(|c| c.len.get() > 0 && c.is(l))
                            .flat_map(|c| c.blocks[..c.len.get()].iter().map(Cell::get))
                            .collect()
                    })
                };
                assert_eq!(kept(plain), blocks[..DEPTH]);
                assert_eq!(take_kept(plain), Some(blocks[DEPTH - 1]));
                a.dealloc(blocks[DEPTH - 1], plain);
                // No more than KEEP_BYTES in all.
                let largest = lay(KEEP_UP_TO, 8);
                let many: Vec<*mut u8> = (0..40).map(|_| a.alloc(largest)).collect();
                for &b in &many {
                    a.dealloc(b, largest);
                }
                let held = kept(largest).len();
                assert_eq!(held, (KEEP_BYTES - DEPTH * 4096 - 5456) / KEEP_UP_TO);
                assert_eq!(
                    KEEP.with(|k| k.bytes.get()),
                    DEPTH * 4096 + 5456 + held * KEEP_UP_TO
                );
                // Four layouts at once: (5456, 64), `plain`, `largest`, and
                // one more; a fifth is freed.
                let fourth = lay(2000, 8);
                let fifth = lay(3000, 8);
                let (f4, f5) = (a.alloc(fourth), a.alloc(fifth));
                a.dealloc(f4, fourth);
                a.dealloc(f5, fifth);
                assert_eq!(kept(fourth), [f4]);
                assert!(kept(fifth).is_empty());
                // A class emptied is free for another layout.
                assert_eq!(take_kept(fourth), Some(f4));
                a.dealloc(f4, fourth);
                let f5 = a.alloc(fifth);
                assert_eq!(take_kept(fourth), Some(f4));
                a.dealloc(f5, fifth);
                assert_eq!(kept(fifth), [f5]);
                a.dealloc(f4, fourth);
                assert!(kept(fourth).is_empty());
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
        // --leak-check=full` on this test finds nothing lost, and the
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
    fn small_blocks_are_kept_by_rounded_size_within_bounds() {
        /// Bytes `malloc` made room for at `p`.
        fn usable(p: *mut u8) -> usize {
            // SAFETY: a live block of glibc's `malloc`.
            unsafe { libc::malloc_usable_size(p.cast()) }
        }
        let small_kept = |size: usize| KEEP.with(|k| k.small_len[small_index(size)].get());
        std::thread::spawn(move || {
            let a = Carved;
            // SAFETY: non-zero sizes; each block freed once with the layout
            // it was allocated (or last resized) with.
            unsafe {
                // Every small block has room for its rounded size, however
                // it was made: allocated, zeroed or resized.
                for size in [1, 15, 17, 100, 1000, 1024] {
                    let rounded = small_size(small_index(size));
                    assert!(rounded >= size && rounded.is_multiple_of(16) && rounded - size < 16);
                    let l = lay(size, 1);
                    let p = a.alloc(l);
                    assert!(usable(p) >= rounded);
                    let z = a.alloc_zeroed(l);
                    assert!(usable(z) >= rounded);
                    let r = a.realloc(z, l, size.div_ceil(2));
                    assert!(usable(r) >= small_size(small_index(size.div_ceil(2))));
                    let g = a.realloc(r, lay(size.div_ceil(2), 1), 2000);
                    let r = a.realloc(g, lay(2000, 1), size);
                    assert!(usable(r) >= rounded);
                    a.dealloc(r, l);
                    a.dealloc(p, l);
                }
                // Not kept before the thread asks.
                assert_eq!(small_kept(20), 0);

                keep_on_this_thread();
                // A block freed for 20 bytes serves 30 (both round to 32),
                // the last freed first; 40 bytes is another size.
                let (p, q) = (a.alloc(lay(20, 4)), a.alloc(lay(20, 4)));
                a.dealloc(p, lay(20, 4));
                a.dealloc(q, lay(20, 4));
                assert_eq!(small_kept(30), 2);
                let other = a.alloc(lay(40, 8));
                assert!(other != p && other != q);
                let r = a.alloc(lay(30, 8));
                assert_eq!(r, q);
                fill(r, 30, 7);
                assert!(holds(r, 30, 7));
                assert_eq!(a.alloc(lay(32, 16)), p);
                a.dealloc(p, lay(32, 16));
                a.dealloc(r, lay(30, 8));
                a.dealloc(other, lay(40, 8));

                // The plain block a carved one is cut from is kept too:
                // tokio's task (896 aligned to 128) comes back where it was.
                let task = lay(896, 128);
                let t = a.alloc(task);
                a.dealloc(t, task);
                assert_eq!(small_kept(1024), 1);
                assert_eq!(a.alloc(task), t);
                a.dealloc(t, task);

                // At most SMALL_DEPTH of a size: the rest go back.
                let size = 100;
                let blocks: Vec<*mut u8> = (0..SMALL_DEPTH + 5)
                    .map(|_| a.alloc(lay(size, 8)))
                    .collect();
                for &b in &blocks {
                    a.dealloc(b, lay(size, 8));
                }
                assert_eq!(small_kept(size), SMALL_DEPTH);
                // At most SMALL_BYTES in all.
                let bytes = || KEEP.with(|k| k.small_bytes.get());
                let mut held = Vec::new();
                for size in (512..=SMALL_UP_TO).step_by(16) {
                    held.extend((0..SMALL_DEPTH).map(|_| (a.alloc(lay(size, 8)), size)));
                }
                for &(b, size) in &held {
                    a.dealloc(b, lay(size, 8));
                }
                assert!(bytes() <= SMALL_BYTES);
                assert!(bytes() > SMALL_BYTES - SMALL_UP_TO);
                let counted: usize = (0..SMALL_CLASSES)
                    .map(|i| KEEP.with(|k| k.small_len[i].get()) as usize * small_size(i))
                    .sum();
                assert_eq!(counted, bytes());
                // Taken again, they are whole blocks that hold their size.
                let again: Vec<*mut u8> = (0..10).map(|_| a.alloc(lay(1000, 8))).collect();
                for (i, &b) in again.iter().enumerate() {
                    fill(b, 1008, i as u8);
                }
                for (i, &b) in again.iter().enumerate() {
                    assert!(holds(b, 1008, i as u8));
                    a.dealloc(b, lay(1000, 8));
                }
            }
        })
        .join()
        .expect("the keeping thread");
        // What the thread kept went back when it ended (valgrind
        // `--leak-check=full` on this test: nothing lost); a new thread
        // keeps none.
        std::thread::spawn(move || {
            assert_eq!(small_kept(100), 0);
            assert_eq!(KEEP.with(|k| k.small_bytes.get()), 0);
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
