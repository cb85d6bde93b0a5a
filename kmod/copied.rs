// SPDX-License-Identifier: GPL-2.0

//! The chunks of a volume known copied for its active snapshots. A chunk's bit is set once
//! every snapshot's store holds it: the server copies a chunk to every store before the
//! first write to it, so once one write covering a chunk came back from the server path,
//! later writes to that chunk may go straight to the SAN devices; the copier sets it once
//! its copies into every store are durable. Until then writes to it go through the server,
//! or the copier. One bit per chunk, set by the server thread or the copier, read by
//! submit_bio (no lock: a bit only goes from 0 to 1, and a stale 0 only sends a write the
//! slow, always correct way).
//!
//! For the copier, one more set of bits per store the map describes: the chunks that store
//! holds, read from its records once per snapshot set and kept up with its own copies.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use kernel::prelude::*;

use crate::abi_map::chunks_touched;

/// Most chunks tracked (16 MiB of bits: 8 TiB in 64 KiB chunks). A larger volume keeps
/// every write on the server path while it has snapshots.
const MAX_CHUNKS: u64 = 1 << 27;

/// One bit per chunk, only ever set.
struct ChunkBits {
    words: KVVec<AtomicU64>,
}

impl ChunkBits {
    fn new(chunks: u64) -> Result<Self> {
        let count = chunks.div_ceil(64) as usize;
        let mut words = KVVec::with_capacity(count, GFP_KERNEL)?;
        for _ in 0..count {
            words.push(AtomicU64::new(0), GFP_KERNEL)?;
        }
        Ok(ChunkBits { words })
    }

    fn contains(&self, chunk: u64) -> bool {
        self.words
            .get((chunk / 64) as usize)
            .is_some_and(|word| word.load(Ordering::Acquire) & (1 << (chunk % 64)) != 0)
    }

    fn insert(&self, chunk: u64) {
        if let Some(word) = self.words.get((chunk / 64) as usize) {
            word.fetch_or(1 << (chunk % 64), Ordering::Release);
        }
    }
}

/// The chunks one snapshot's store holds, as far as this host knows.
pub(crate) struct StoreChunks {
    pub(crate) snapshot_id: u64,
    bits: ChunkBits,
    /// Whether the store's records were read from the first one in this snapshot set.
    scanned: AtomicBool,
}

impl StoreChunks {
    pub(crate) fn holds(&self, chunk: u64) -> bool {
        self.bits.contains(chunk)
    }

    /// Notes a record of the store (read back, or written by the copier).
    pub(crate) fn note(&self, chunk: u64) {
        self.bits.insert(chunk);
    }

    pub(crate) fn scanned(&self) -> bool {
        self.scanned.load(Ordering::Acquire)
    }

    pub(crate) fn set_scanned(&self) {
        self.scanned.store(true, Ordering::Release);
    }
}

pub(crate) struct CopiedChunks {
    /// The set of active snapshots these bits are about (`MapHeader::cow_generation`).
    generation: u64,
    chunk_bytes: u32,
    volume_bytes: u64,
    /// The first epoch of that set: a server acknowledgement of a piece mapped with an
    /// older epoch says nothing about the chunks of this set.
    from_epoch: u64,
    bits: ChunkBits,
    /// One per store of the set's first map, newest first.
    stores: KVec<StoreChunks>,
    /// The module stopped preserving chunks itself for this set (a copy failed, or a
    /// store is full): from then on first writes go through the server, for good, so the
    /// server never appends to a store while the module may.
    copying_stopped: AtomicBool,
}

impl CopiedChunks {
    /// No chunk copied yet, and none known held by the stores of snapshots `store_ids`.
    /// ENOMEM, or EFBIG beyond [`MAX_CHUNKS`].
    pub(crate) fn new(
        generation: u64,
        chunk_bytes: u32,
        volume_bytes: u64,
        from_epoch: u64,
        store_ids: &[u64],
    ) -> Result<Self> {
        let chunks = volume_bytes.div_ceil(u64::from(chunk_bytes.max(1)));
        if chunks > MAX_CHUNKS {
            return Err(EFBIG);
        }
        let mut stores = KVec::with_capacity(store_ids.len(), GFP_KERNEL)?;
        for &snapshot_id in store_ids {
            stores.push(
                StoreChunks {
                    snapshot_id,
                    bits: ChunkBits::new(chunks)?,
                    scanned: AtomicBool::new(false),
                },
                GFP_KERNEL,
            )?;
        }
        Ok(CopiedChunks {
            generation,
            chunk_bytes,
            volume_bytes,
            from_epoch,
            bits: ChunkBits::new(chunks)?,
            stores,
            copying_stopped: AtomicBool::new(false),
        })
    }

    /// Whether these bits hold for a map of this snapshot set, chunk size and volume size
    /// whose stores are those of snapshots `store_ids` (all of them known here).
    pub(crate) fn tracks(
        &self,
        generation: u64,
        chunk_bytes: u32,
        volume_bytes: u64,
        store_ids: &[u64],
    ) -> bool {
        self.generation == generation
            && self.chunk_bytes == chunk_bytes
            && self.volume_bytes == volume_bytes
            && store_ids.iter().all(|&id| self.store(id).is_some())
    }

    /// What this host knows of snapshot `snapshot_id`'s store.
    pub(crate) fn store(&self, snapshot_id: u64) -> Option<&StoreChunks> {
        self.stores.iter().find(|s| s.snapshot_id == snapshot_id)
    }

    /// Whether every chunk `[offset, offset + length)` touches is copied.
    #[inline]
    pub(crate) fn all_copied(&self, offset: u64, length: u64) -> bool {
        let Some((first, last)) = chunks_touched(offset, length, self.chunk_bytes) else {
            return false;
        };
        (first..=last).all(|chunk| self.is_copied(chunk))
    }

    pub(crate) fn is_copied(&self, chunk: u64) -> bool {
        self.bits.contains(chunk)
    }

    /// Records a chunk the module preserved itself (its records in every store are
    /// durable).
    pub(crate) fn mark_chunk(&self, chunk: u64) {
        self.bits.insert(chunk);
    }

    /// Stops the module's own copies for this set; whether this call stopped them.
    pub(crate) fn stop_copying(&self) -> bool {
        !self.copying_stopped.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn copying_stopped(&self) -> bool {
        self.copying_stopped.load(Ordering::Acquire)
    }

    /// Records a write the server acknowledged, mapped with `epoch`.
    pub(crate) fn mark(&self, offset: u64, length: u64, epoch: u64) {
        if epoch < self.from_epoch {
            return;
        }
        let Some((first, last)) = chunks_touched(offset, length, self.chunk_bytes) else {
            return;
        };
        for chunk in first..=last {
            self.bits.insert(chunk);
        }
    }
}
