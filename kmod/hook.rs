// SPDX-License-Identifier: GPL-2.0

//! Hooked bios: the slabs of the contexts that hook the completion of a bio the data path
//! sends on itself. A bio remapped in place carries its server-path piece there
//! (`piece::IN_PLACE`); a bio whose pieces are cloned is hooked only to end its block-layer
//! statistics (`/sys/block/sanblkN/stat`, what iostat reads) when it completes.

use kernel::prelude::*;

use crate::ffi::bio::Bio;
use crate::ffi::consts::ReqOp;
use crate::ffi::context::{HookCache, HookEndIo, Owned};
use crate::piece::IN_PLACE;

/// Contexts that only time a bio's statistics.
static ACCOUNTED: HookCache<()> = HookCache::new();

/// Owns both slabs: created in module init, destroyed after every volume is gone.
pub(crate) struct HookCaches(());

impl HookCaches {
    pub(crate) fn create() -> Result<Self> {
        IN_PLACE.create(kernel::c_str!("sanblk_in_place"))?;
        if let Err(error) = ACCOUNTED.create(kernel::c_str!("sanblk_accounted")) {
            IN_PLACE.destroy();
            return Err(error);
        }
        Ok(HookCaches(()))
    }
}

impl Drop for HookCaches {
    fn drop(&mut self) {
        // Every volume drained its in-flight bios (and so freed their contexts) before the
        // registry that owns them was dropped, which happens before this.
        ACCOUNTED.destroy();
        IN_PLACE.destroy();
    }
}

/// For a bio whose pieces are cloned: hooks its completion to end its block-layer statistics,
/// if they are on. Without a context (the slab gave none without waiting), the bio goes
/// unaccounted; its I/O is unaffected.
pub(crate) fn account_at_completion(bio: &mut Bio, op: ReqOp) {
    if bio.bdev().io_stat_enabled() {
        ACCOUNTED.hook::<Accounted>(bio, op, |_| ());
    }
}

/// Completion of a bio hooked by [`account_at_completion`].
struct Accounted;

impl HookEndIo<()> for Accounted {
    fn end_io(bio: Bio, context: Owned<()>) {
        // Ends the statistics, then completes the bio to its submitter.
        context.finish();
        bio.end();
    }
}
