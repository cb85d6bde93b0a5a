// SPDX-License-Identifier: GPL-2.0

//! The attached volumes. Netlink commands look volumes up here; the data path never does
//! (a bio finds its volume through its disk).

use kernel::new_mutex;
use kernel::prelude::*;
use kernel::sync::{Arc, Mutex};

use crate::volume::Volume;

/// Most volumes attached at once (minor numbers 0..MAX_VOLUMES).
pub(crate) const MAX_VOLUMES: u32 = 256;

#[pin_data(PinnedDrop)]
pub(crate) struct Registry {
    #[pin]
    volumes: Mutex<KVec<Arc<Volume>>>,
}

impl Registry {
    pub(crate) fn new() -> impl PinInit<Self, Error> {
        try_pin_init!(Registry { volumes <- new_mutex!(KVec::new(), "sanblk_registry") })
    }

    pub(crate) fn lock(
        &self,
    ) -> kernel::sync::lock::Guard<'_, KVec<Arc<Volume>>, kernel::sync::lock::mutex::MutexBackend>
    {
        self.volumes.lock()
    }
}

/// `volumes` without the entry at `position` (KVec in 6.12 has no `remove`).
pub(crate) fn without(volumes: &[Arc<Volume>], position: usize) -> Result<KVec<Arc<Volume>>> {
    let mut rest = KVec::with_capacity(volumes.len(), GFP_KERNEL)?;
    for (i, volume) in volumes.iter().enumerate() {
        if i != position {
            rest.push(volume.clone(), GFP_KERNEL)?;
        }
    }
    Ok(rest)
}

/// Lowest minor not used by an attached volume.
pub(crate) fn free_index(volumes: &[Arc<Volume>]) -> Option<u32> {
    (0..MAX_VOLUMES).find(|i| !volumes.iter().any(|v| v.index == *i))
}

#[pinned_drop]
impl PinnedDrop for Registry {
    fn drop(self: Pin<&mut Self>) {
        // Module unload: netlink is already unregistered and no disk is open (open disks pin
        // the module), so every volume can be torn down.
        let volumes = core::mem::take(&mut *self.volumes.lock());
        for volume in volumes.iter() {
            volume.remove_disk();
        }
    }
}
