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
//! Not used with `--features mimalloc`, which serves aligned blocks from
//! its own size classes. No crate does just this: mimalloc (above) and
//! jemalloc replace the whole allocator, and the default build keeps
//! glibc for its memory figures (bench/RESULTS.md).
#![allow(unsafe_code)] // a global allocator; every unsafe block says why it holds

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks aligned to more than this come from `malloc` as they are
/// (glibc's `malloc` alignment on 64-bit targets).
const MALLOC_ALIGN: usize = 16;
/// Blocks aligned to more than this go to the system allocator's own
/// aligned path (a page-aligned block would waste most of a page here).
pub const MAX_CARVED: usize = 512;

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
// allocated.
unsafe impl GlobalAlloc for Carved {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
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
