// SPDX-License-Identifier: GPL-2.0

//! The chunks of a volume the server has acknowledged a write to since its active snapshots
//! were taken. The server copies a chunk to every snapshot's store before the first write to
//! it, so once one write covering a chunk came back from the server path, later writes to
//! that chunk may go straight to the SAN devices; until then they go through the server. One
//! bit per chunk, set by the server thread, read by submit_bio (no lock: a bit only goes
//! from 0 to 1, and a stale 0 only sends a write the slow, always correct way).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use kernel::prelude::*;

use crate::abi_map::chunks_touched;

/// Most chunks tracked (16 MiB of bits: 8 TiB in 64 KiB chunks). A larger volume keeps
/// every write on the server path while it has snapshots.
const MAX_CHUNKS: u64 = 1 << 27;

pub(crate) struct CopiedChunks {
    /// The set of active snapshots these bits are about (`MapHeader::cow_generation`).
    generation: u64,
    chunk_bytes: u32,
    volume_bytes: u64,
    /// The first epoch of that set: a server acknowledgement of a piece mapped with an
    /// older epoch says nothing about the chunks of this set.
    from_epoch: u64,
    bits: KVVec<AtomicU64>,
    /// The module stopped preserving chunks itself for this set (a copy failed, or the
    /// store is full): from then on first writes go through the server, for good, so the
    /// server never appends to a store while the module may.
    copying_stopped: AtomicBool,
}

impl CopiedChunks {
    /// No chunk copied yet. ENOMEM, or EFBIG beyond [`MAX_CHUNKS`].
    pub(crate) fn new(
        generation: u64,
        chunk_bytes: u32,
        volume_bytes: u64,
        from_epoch: u64,
    ) -> Result<Self> {
        let chunks = volume_bytes.div_ceil(u64::from(chunk_bytes.max(1)));
        if chunks > MAX_CHUNKS {
            return Err(EFBIG);
        }
        let words = chunks.div_ceil(64) as usize;
        let mut bits = KVVec::with_capacity(words, GFP_KERNEL)?;
        for _ in 0..words {
            bits.push(AtomicU64::new(0), GFP_KERNEL)?;
        }
        Ok(CopiedChunks {
            generation,
            chunk_bytes,
            volume_bytes,
            from_epoch,
            bits,
            copying_stopped: AtomicBool::new(false),
        })
    }

    /// Whether these bits hold for a map of this snapshot set, chunk size and volume size.
    pub(crate) fn tracks(&self, generation: u64, chunk_bytes: u32, volume_bytes: u64) -> bool {
        self.generation == generation
            && self.chunk_bytes == chunk_bytes
            && self.volume_bytes == volume_bytes
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
        self.bits
            .get((chunk / 64) as usize)
            .is_some_and(|word| word.load(Ordering::Acquire) & (1 << (chunk % 64)) != 0)
    }

    /// Records a chunk the module preserved itself (its record is durable).
    pub(crate) fn mark_chunk(&self, chunk: u64) {
        if let Some(word) = self.bits.get((chunk / 64) as usize) {
            word.fetch_or(1 << (chunk % 64), Ordering::Release);
        }
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
            if let Some(word) = self.bits.get((chunk / 64) as usize) {
                word.fetch_or(1 << (chunk % 64), Ordering::Release);
            }
        }
    }
}
