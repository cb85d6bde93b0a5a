// SPDX-License-Identifier: GPL-2.0

//! Hooked bios: the completion of a bio the data path sends on itself is diverted through a
//! small slab context that keeps what the hook replaced (end_io, private data, device), the
//! server-path piece needed to redirect it, and the start of its block-layer I/O statistics.
//! Used for bios remapped in place (`remap::remap_in_place`) and, for statistics only, for
//! bios whose pieces are cloned.

use core::ptr::addr_of_mut;
use kernel::prelude::*;

use crate::ffi::bio::{Bio, EndIo, Hooked};
use crate::ffi::consts::ReqOp;
use crate::ffi::slab::KmemCache;
use crate::piece::Piece;

/// The context of a bio whose completion this module hooks: one remapped in place, or one
/// cloned whose completion ends its block-layer statistics. Its server-path piece comes first
/// (so a failed in-place bio can be redirected like a failed clone; set up by the data path
/// for in-place bios only), then what the hook replaced, restored on completion.
#[repr(C)]
pub(crate) struct HookedBio {
    pub(crate) piece: Piece,
    hooked: Hooked,
    /// Block-layer statistics: the bio's op and size, and when they started for it (`None`:
    /// not accounted, the disk's `queue/iostats` is off).
    block_op: ReqOp,
    sectors: u32,
    io_start: Option<usize>,
}

/// The slab of [`HookedBio`] contexts, shared by all volumes.
static CACHE: KmemCache<HookedBio> = KmemCache::new();

/// Owns [`CACHE`]: created in module init, destroyed after every volume is gone.
pub(crate) struct HookedBioCache(());

impl HookedBioCache {
    pub(crate) fn create() -> Result<Self> {
        CACHE.create(kernel::c_str!("sanblk_hooked_bio"))?;
        Ok(HookedBioCache(()))
    }
}

impl Drop for HookedBioCache {
    fn drop(&mut self) {
        // Every volume drained its in-flight bios (and so freed their contexts) before the
        // registry that owns them was dropped, which happens before this.
        CACHE.destroy();
    }
}

/// Diverts `bio`'s completion to `E` through a new context, recording what it replaced and
/// starting its block-layer statistics on the sanblk disk (`/sys/block/sanblkN/stat`, what
/// iostat reads) unless they are off in `queue/iostats`. `None` when the slab has no context
/// without waiting (`bio` untouched).
pub(crate) fn hook<E: EndIo>(bio: &mut Bio, op: ReqOp) -> Option<*mut HookedBio> {
    let context = CACHE.alloc_nowait();
    if context.is_null() {
        return None;
    }
    let bdev = bio.bdev();
    let io_start = if bdev.io_stat_enabled() {
        Some(bdev.start_io_acct(op))
    } else {
        None
    };
    let sectors = bio.size() >> 9;
    let hooked = bio.hook::<E>(context.cast());
    // SAFETY: a fresh object of the slab, ours; its fields are written without reading the
    // uninitialised memory (the piece is set up by the data path when it needs one).
    unsafe {
        addr_of_mut!((*context).hooked).write(hooked);
        addr_of_mut!((*context).block_op).write(op);
        addr_of_mut!((*context).sectors).write(sectors);
        addr_of_mut!((*context).io_start).write(io_start);
    }
    Some(context)
}

/// Restores what [`hook`] replaced on `bio` (completed to the hook) and returns its context.
pub(crate) fn unhook(bio: &mut Bio) -> *mut HookedBio {
    let context = bio.private().cast::<HookedBio>();
    // SAFETY: a hooked bio's private pointer is its context, live until `finish`.
    bio.unhook(unsafe { &(*context).hooked });
    context
}

/// Ends the context's statistics and frees it.
///
/// # Safety
///
/// `context` came from [`hook`] and is used no more.
pub(crate) unsafe fn finish(context: *mut HookedBio) {
    // SAFETY: see the function's contract; the sanblk disk outlives its bios.
    unsafe {
        if let Some(start) = (*context).io_start {
            (*context)
                .hooked
                .bdev()
                .end_io_acct((*context).block_op, (*context).sectors, start);
        }
        CACHE.free(context);
    }
}

/// For a bio whose pieces are cloned: hooks its completion to end its block-layer statistics,
/// if they are on. Without a context (the slab gave none without waiting), the bio goes
/// unaccounted; its I/O is unaffected.
pub(crate) fn account_at_completion(bio: &mut Bio, op: ReqOp) {
    if bio.bdev().io_stat_enabled() {
        let _ = hook::<Accounted>(bio, op);
    }
}

/// Completion of a bio hooked by [`account_at_completion`].
struct Accounted;

impl EndIo for Accounted {
    fn end_io(mut bio: Bio) {
        let context = unhook(&mut bio);
        // SAFETY: the context of this completion, used no more.
        unsafe { finish(context) };
        bio.end();
    }
}

/// The server-path piece of a context (its first member).
pub(crate) fn piece_of(context: *mut HookedBio) -> *mut Piece {
    context.cast()
}

/// Releases the context of an in-place piece the server path completed (a [`Piece`] release
/// function).
///
/// # Safety
///
/// `piece` is the `piece` of a live [`HookedBio`] context, used no more after this.
pub(crate) unsafe fn release_in_place(piece: *mut Piece) {
    // SAFETY: `piece` is the first member of a repr(C) HookedBio set up by `hook` (contract).
    unsafe { finish(piece.cast()) };
}
