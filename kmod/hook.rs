// SPDX-License-Identifier: GPL-2.0

//! Hooked bios: the completion of a bio the data path sends on itself is diverted through a
//! small slab context that keeps what the hook replaced (end_io, private data, device), the
//! server-path piece needed to redirect it, and the start of its block-layer I/O statistics.
//! Used for bios remapped in place (`remap::remap_in_place`) and, for statistics only, for
//! bios whose pieces are cloned.

use core::ffi::c_void;
use core::ptr::addr_of;
use core::sync::atomic::{AtomicPtr, Ordering};
use kernel::bindings;
use kernel::prelude::*;

use crate::server::Piece as ServerPiece;

/// Never waits; a failure is handled by the caller (cloning instead, or not accounting).
const GFP_NOWAIT: bindings::gfp_t =
    (1 << bindings::___GFP_KSWAPD_RECLAIM_BIT) | (1 << bindings::___GFP_NOWARN_BIT);
const BLK_FEAT_IO_STAT: bindings::blk_features_t = 1 << 4;

/// The context of a bio whose completion this module hooks: one remapped in place, or one
/// cloned whose completion ends its block-layer statistics. Its server-path piece comes first
/// (so a failed in-place bio can be redirected like a failed clone), then what the hook
/// replaced, restored on completion.
#[repr(C)]
pub(crate) struct HookedBio {
    pub(crate) piece: ServerPiece,
    pub(crate) end_io: bindings::bio_end_io_t,
    pub(crate) private: *mut c_void,
    /// The sanblk disk's block device the bio was addressed to.
    pub(crate) bdev: *mut bindings::block_device,
    /// The volume device slot it was sent to (in place only).
    pub(crate) slot: u32,
    /// Block-layer statistics: the bio's op and size, and when they started for it (`None`:
    /// not accounted, the disk's `queue/iostats` is off).
    block_op: bindings::req_op,
    sectors: u32,
    io_start: Option<usize>,
}

/// A context from the slab, or null (never waits).
pub(crate) fn alloc_context() -> *mut HookedBio {
    let cache = HOOKED_BIO_CACHE.load(Ordering::Relaxed);
    if cache.is_null() {
        return core::ptr::null_mut();
    }
    // SAFETY: a live cache; GFP_NOWAIT never sleeps.
    unsafe { bindings::kmem_cache_alloc_noprof(cache, GFP_NOWAIT) }.cast::<HookedBio>()
}

/// Records `bio`'s end_io, private data, device and size in `context` and starts its
/// block-layer statistics on the sanblk disk (`/sys/block/sanblkN/stat`, what iostat reads),
/// unless they are switched off in `queue/iostats`.
///
/// # Safety
///
/// `context` is ours; `bio` is live, addressed to a sanblk disk, and not yet sent on.
pub(crate) unsafe fn hook(context: *mut HookedBio, bio: *mut bindings::bio, op: bindings::req_op) {
    // SAFETY: see the function's contract; the disk and its queue live while the bio does.
    unsafe {
        let bdev = (*bio).bi_bdev;
        (*context).end_io = (*bio).bi_end_io;
        (*context).private = (*bio).bi_private;
        (*context).bdev = bdev;
        (*context).block_op = op;
        (*context).sectors = (*bio).bi_iter.bi_size >> 9;
        (*context).io_start = if io_stat_enabled(bdev) {
            Some(bindings::bdev_start_io_acct(bdev, op, core::ptr::read_volatile(addr_of!(bindings::jiffies))))
        } else {
            None
        };
    }
}

/// Whether the sanblk disk of `bdev` keeps I/O statistics (its `queue/iostats`).
fn io_stat_enabled(bdev: *mut bindings::block_device) -> bool {
    // SAFETY: callers pass the block device of a live bio addressed to a sanblk disk, whose
    // disk and queue live while the bio does.
    unsafe { (*(*(*bdev).bd_disk).queue).limits.features & BLK_FEAT_IO_STAT != 0 }
}

/// Ends the context's statistics and frees it.
///
/// # Safety
///
/// `context` came from [`alloc_context`], was set up by [`hook`], and is used no more.
pub(crate) unsafe fn finish(context: *mut HookedBio) {
    // SAFETY: see the function's contract; the sanblk disk outlives its bios.
    unsafe {
        if let Some(start) = (*context).io_start {
            bindings::bdev_end_io_acct((*context).bdev, (*context).block_op, (*context).sectors, start);
        }
        bindings::kmem_cache_free(HOOKED_BIO_CACHE.load(Ordering::Relaxed), context.cast());
    }
}

/// For a bio whose pieces are cloned: hooks its completion to end its block-layer statistics,
/// if they are on. Without a context (the slab gave none without waiting), the bio goes
/// unaccounted; its I/O is unaffected.
pub(crate) fn account_at_completion(bio: *mut bindings::bio, op: bindings::req_op) {
    // SAFETY: `bio` is live and ours until its submission reference is dropped.
    if !io_stat_enabled(unsafe { (*bio).bi_bdev }) {
        return;
    }
    let context = alloc_context();
    if context.is_null() {
        return;
    }
    // SAFETY: `context` is ours; the bio cannot complete before the caller drops its
    // submission reference, so its end_io is not read before it is replaced here.
    unsafe {
        hook(context, bio, op);
        (*bio).bi_end_io = Some(accounted_endio);
        (*bio).bi_private = context.cast();
    }
}

/// # Safety
///
/// Completion of a bio hooked by [`account_at_completion`]: `bi_private` is its context.
unsafe extern "C" fn accounted_endio(bio: *mut bindings::bio) {
    // SAFETY: see the function's contract.
    unsafe {
        let context = (*bio).bi_private.cast::<HookedBio>();
        (*bio).bi_end_io = (*context).end_io;
        (*bio).bi_private = (*context).private;
        finish(context);
        bindings::bio_endio(bio);
    }
}

/// The slab of [`HookedBio`] contexts, shared by all volumes; null outside the module's life.
static HOOKED_BIO_CACHE: AtomicPtr<bindings::kmem_cache> = AtomicPtr::new(core::ptr::null_mut());

/// Owns [`HOOKED_BIO_CACHE`]: created in module init, destroyed after every volume is gone.
pub(crate) struct HookedBioCache(());

impl HookedBioCache {
    pub(crate) fn create() -> Result<Self> {
        // SAFETY: zero is "no alignment, no usercopy region, no constructor".
        let mut args: bindings::kmem_cache_args = unsafe { core::mem::zeroed() };
        // SAFETY: the name is a static string; the cache is destroyed in drop.
        let cache = unsafe {
            bindings::__kmem_cache_create_args(
                kernel::c_str!("sanblk_hooked_bio").as_char_ptr(),
                core::mem::size_of::<HookedBio>() as u32,
                &mut args,
                0,
            )
        };
        if cache.is_null() {
            return Err(ENOMEM);
        }
        HOOKED_BIO_CACHE.store(cache, Ordering::Release);
        Ok(HookedBioCache(()))
    }
}

impl Drop for HookedBioCache {
    fn drop(&mut self) {
        let cache = HOOKED_BIO_CACHE.swap(core::ptr::null_mut(), Ordering::AcqRel);
        // SAFETY: every volume drained its in-flight bios (and so freed their contexts)
        // before the registry that owns them was dropped, which happens before this.
        unsafe { bindings::kmem_cache_destroy(cache) };
    }
}

/// Releases the context of a piece the server path completed.
///
/// # Safety
///
/// `piece` is the `piece` of a live [`HookedBio`] context, used no more after this.
pub(crate) unsafe fn release_in_place(piece: *mut ServerPiece) {
    // SAFETY: `piece` is the first member of a repr(C) HookedBio set up by `hook` (contract).
    unsafe { finish(piece.cast()) };
}

