// SPDX-License-Identifier: GPL-2.0

//! Where the COW stores of a volume's active snapshots lie (the map's COW store sections)
//! and how they are laid out (uapi `cow.rs`): what the copier needs to preserve chunks
//! itself.

use kernel::prelude::*;

use crate::abi_cow::CowLayout;
use crate::abi_map::{MapView, StoreExtent};

pub(crate) struct StoreInfo {
    /// Part of each record sector's checksum.
    pub(crate) snapshot_id: u64,
    pub(crate) layout: CowLayout,
    /// The record sector to start looking for the end of the records at.
    pub(crate) scan_from_sector: u64,
    /// In store order; devices as indexes of the map's device table.
    extents: KVec<StoreExtent>,
}

impl StoreInfo {
    /// The stores a parsed map describes, by ascending chunk size (the copier takes the
    /// stores of one chunk size together); none without sections, or when a store holds no
    /// chunk of its size (the server then makes every copy).
    pub(crate) fn all_from_view(view: &MapView<'_>) -> Result<KVec<StoreInfo>> {
        let count = view.cow_store_count();
        let mut stores = KVec::with_capacity(count as usize, GFP_KERNEL)?;
        for index in 0..count {
            let Some(section) = view.cow_store(index) else {
                return Ok(KVec::new());
            };
            let Some(layout) = CowLayout::new(section.store_bytes, section.chunk_bytes) else {
                return Ok(KVec::new());
            };
            let mut extents = KVec::with_capacity(section.extent_count as usize, GFP_KERNEL)?;
            for extent in 0..section.extent_count {
                extents.push(view.store_extent(index, extent), GFP_KERNEL)?;
            }
            stores.push(
                StoreInfo {
                    snapshot_id: section.snapshot_id,
                    layout,
                    scan_from_sector: u64::from(section.scan_from_sector),
                    extents,
                },
                GFP_KERNEL,
            )?;
        }
        stores.sort_unstable_by_key(StoreInfo::chunk_bytes);
        Ok(stores)
    }

    /// The store's chunk size: its records count chunks of this size.
    pub(crate) fn chunk_bytes(&self) -> u32 {
        self.layout.chunk_bytes
    }

    /// Where `length` bytes at store `offset` begin: the map device index, the device offset
    /// and how many of the bytes lie there; `None` beyond the store.
    pub(crate) fn locate(&self, offset: u64, length: u64) -> Option<(u32, u64, u64)> {
        let mut start = 0u64;
        for extent in self.extents.iter() {
            let end = start + extent.length;
            if offset < end {
                let within = offset.checked_sub(start)?;
                return Some((
                    extent.device,
                    extent.offset + within,
                    (end - offset).min(length),
                ));
            }
            start = end;
        }
        None
    }
}
