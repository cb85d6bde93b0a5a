// SPDX-License-Identifier: GPL-2.0

//! The volume's copier thread: while the volume has exactly one active snapshot, whose COW
//! store the map describes, it preserves each chunk a write is the first to touch since the
//! snapshot, as `sand` would: reads the chunk from the origin, writes it into the next free
//! slot of the store (FUA), appends the record (chunk, slot) to the store's record sectors
//! (FUA, so it is durable before the origin write is issued), sets the chunk's bit, then
//! re-submits the write, which now goes straight to the SAN devices. A host that crashes at
//! any moment leaves the snapshot reading back its point in time: until the record is
//! durable the origin is untouched, and a slot without a record is free.
//!
//! Only writes to chunks not preserved yet come here (submit_bio queues them, nothing
//! waits); writes to a chunk being copied wait behind it in the queue, reads and writes to
//! preserved chunks never do. The records continue the store's dense sequence, found by
//! reading the record sectors from where the map says to start; `sand` reads them back
//! before it needs them (its own copies, point-in-time reads, changed-chunk lists). The
//! thread reads its record block again after a new map, or when it has not for a second:
//! another host may only have appended after this one's lease lapsed.
//!
//! While the thread copies, it is the store's only appender: the server copies only the
//! first writes that come through it, and none does while the thread copies. A copy that
//! fails (a device error, a full store) therefore stops the thread's copies for the snapshot
//! set for good (`CopiedChunks::stop_copying`), and the write goes through the server, which
//! reads the records back and copies from then on (invalidating the snapshot if the store
//! is full). Nothing is copied while the volume is quiesced or its lease has lapsed: the
//! write is re-submitted and held like any other.

use kernel::prelude::*;

use crate::abi_cow::{Record, RecordSector, HEADER_BYTES, RECORDS_PER_SECTOR, SECTOR_BYTES};
use crate::abi_map::chunks_touched;
use crate::copied::CopiedChunks;
use crate::cow_store::StoreInfo;
use crate::ffi::bio::Bio;
use crate::ffi::consts::{Opf, GFP_NOIO, REQ_FUA, REQ_OP_READ, REQ_OP_WRITE};
use crate::ffi::kthread::{forbid_io_in_reclaim, should_stop};
use crate::ffi::pages::PageBuf;
use crate::ffi::sync::{wait_until, TASK_INTERRUPTIBLE};
use crate::ffi::time::now_ns;
use crate::remap::{device_healthy, resubmit_copied};
use crate::volume::{MapState, Volume};

/// Bytes of a record block: the record sectors are read and written in blocks this large
/// and aligned (the largest logical block size of the SAN devices).
const RECORD_BLOCK: u64 = 4096;
/// Most bytes one bio of the copier carries.
const MAX_BIO_BYTES: u64 = 512 << 10;

/// The body of a volume's copier thread; returns when asked to stop.
pub(crate) fn run(volume: &Volume) {
    forbid_io_in_reclaim();
    let mut copier = Copier {
        chunk: PageBuf::new(),
        record_block: PageBuf::new(),
        cursor: None,
    };
    loop {
        wait_until(&[&volume.copies.wakeup], TASK_INTERRUPTIBLE, None, || {
            !volume.copies.is_empty() || should_stop()
        });
        while let Some((bio, _inflight)) = volume.copies.pop(&volume.inflight) {
            copier.handle(volume, bio);
        }
        if should_stop() {
            return;
        }
    }
}

/// How long a cursor is trusted without reading its record block again. Another host can
/// only append to the store after this one's lease has lapsed (seconds), and a new map may
/// come from another host's changes: either makes the copier look again.
const CURSOR_TRUST_NS: i64 = 1_000_000_000;

/// Where the next record goes.
struct Cursor {
    snapshot_id: u64,
    /// The map epoch and time at which the records were last read.
    epoch: u64,
    checked_ns: i64,
    next_slot: u64,
    /// The record sector `next_slot` belongs to, as written so far.
    sector: RecordSector,
    /// Store offset of the record block holding that sector; its bytes are in
    /// `Copier::record_block`.
    block_offset: u64,
}

struct Copier {
    chunk: PageBuf,
    record_block: PageBuf,
    cursor: Option<Cursor>,
}

impl Copier {
    fn handle(&mut self, volume: &Volume, bio: Bio) {
        let offset = bio.sector() << 9;
        let length = u64::from(bio.size());
        let map = volume.current_map();
        let now = now_ns();
        if !volume.hold.is_quiesced() && !volume.hold.lease_lapsed(now) {
            if let Some((store, copied)) = map.copy_target() {
                let preserved = self.preserve(volume, &map, store, copied, offset, length);
                // Re-submitting a write still not preserved would bring it back here.
                let outcome = preserved.and_then(|()| {
                    if map.write_needs_copy(offset, length) {
                        Err(EINVAL)
                    } else {
                        Ok(())
                    }
                });
                if let Err(err) = outcome {
                    self.cursor = None;
                    if copied.stop_copying() {
                        pr_warn!(
                            "volume {}: snapshot {}: chunks no longer preserved by this host (errno {}): first writes go through the server\n",
                            volume.id,
                            store.snapshot_id,
                            -err.to_errno()
                        );
                    }
                }
            }
        }
        resubmit_copied(volume, bio);
    }

    /// Preserves every chunk of `[offset, offset + length)` not preserved yet.
    fn preserve(
        &mut self,
        volume: &Volume,
        map: &MapState,
        store: &StoreInfo,
        copied: &CopiedChunks,
        offset: u64,
        length: u64,
    ) -> Result {
        let Some((first, last)) = chunks_touched(offset, length, map.chunk_bytes()) else {
            return Ok(());
        };
        for chunk in first..=last {
            if copied.is_copied(chunk) {
                continue;
            }
            self.copy_chunk(volume, map, store, chunk)?;
            copied.mark_chunk(chunk);
            volume.copies.count_preserved();
        }
        Ok(())
    }

    fn copy_chunk(
        &mut self,
        volume: &Volume,
        map: &MapState,
        store: &StoreInfo,
        chunk: u64,
    ) -> Result {
        let now = now_ns();
        let fresh = matches!(&self.cursor, Some(c) if c.snapshot_id == store.snapshot_id
            && c.epoch == map.epoch
            && now - c.checked_ns < CURSOR_TRUST_NS);
        if !fresh {
            // Records before the cursor's sector are full and never change: look from there.
            let from = match self.cursor.take() {
                Some(c) if c.snapshot_id == store.snapshot_id => {
                    u64::from(c.sector.index).max(store.scan_from_sector)
                }
                _ => store.scan_from_sector,
            };
            self.cursor = Some(self.find_end(volume, map, store, from, now)?);
        }
        let layout = &store.layout;
        let chunk_bytes = u64::from(layout.chunk_bytes);
        let (slot, mut sector, block_offset) = match &self.cursor {
            Some(c) => (c.next_slot, c.sector, c.block_offset),
            None => return Err(EINVAL),
        };
        if slot >= layout.slots {
            return Err(ENOSPC);
        }
        // The chunk as it is now (the part of a last chunk beyond the volume reads as zero).
        self.chunk.reserve(chunk_bytes as usize)?;
        let start = chunk * chunk_bytes;
        let valid = map.size.saturating_sub(start).min(chunk_bytes);
        read_origin(volume, map, &self.chunk, start, valid)?;
        if valid < chunk_bytes {
            self.chunk
                .zero(valid as usize, (chunk_bytes - valid) as usize)?;
        }
        store_io(
            volume,
            map,
            store,
            &self.chunk,
            layout.slot_offset(slot),
            chunk_bytes,
            REQ_OP_WRITE | REQ_FUA,
        )?;
        if !sector.push(Record {
            origin_chunk: chunk,
            slot,
        }) {
            return Err(EINVAL);
        }
        let mut bytes = [0u8; SECTOR_BYTES];
        sector.encode(store.snapshot_id, &mut bytes);
        let in_block = layout.record_sector_offset(slot) - block_offset;
        self.record_block.write(in_block as usize, &bytes)?;
        self.record_block_io(volume, map, store, block_offset, REQ_OP_WRITE | REQ_FUA)?;
        // Durable: on to the next slot (and sector, and block, once they are full).
        let (epoch, checked_ns) = match &self.cursor {
            Some(c) => (c.epoch, c.checked_ns),
            None => return Err(EINVAL),
        };
        let mut next = Cursor {
            snapshot_id: store.snapshot_id,
            epoch,
            checked_ns,
            next_slot: slot + 1,
            sector,
            block_offset,
        };
        if sector.count as usize == RECORDS_PER_SECTOR {
            next.sector = RecordSector::empty(sector.index.saturating_add(1));
            let next_offset = layout.record_sector_offset(next.next_slot);
            if next_offset >= block_offset + RECORD_BLOCK {
                // Sectors past the last record were never written (the store was formatted
                // with zeroes), and this thread is the only appender.
                next.block_offset = block_offset + RECORD_BLOCK;
                self.record_block.zero(0, RECORD_BLOCK as usize)?;
            }
        }
        self.cursor = Some(next);
        Ok(())
    }

    /// Reads or writes the record block at store offset `block_offset`.
    fn record_block_io(
        &self,
        volume: &Volume,
        map: &MapState,
        store: &StoreInfo,
        block_offset: u64,
        opf: Opf,
    ) -> Result {
        let block = &self.record_block;
        store_io(volume, map, store, block, block_offset, RECORD_BLOCK, opf)
    }

    /// Reads the record sectors from sector `from` (every one before it is full) until the
    /// first one not full: the end of the dense sequence, where the next record goes.
    fn find_end(
        &mut self,
        volume: &Volume,
        map: &MapState,
        store: &StoreInfo,
        from: u64,
        now: i64,
    ) -> Result<Cursor> {
        let layout = &store.layout;
        self.record_block.reserve(RECORD_BLOCK as usize)?;
        let mut index = from;
        loop {
            if index >= layout.record_sectors {
                // Every slot is used.
                return Err(ENOSPC);
            }
            let sector_offset = HEADER_BYTES + index * SECTOR_BYTES as u64;
            let block_offset = sector_offset - sector_offset % RECORD_BLOCK;
            self.record_block_io(volume, map, store, block_offset, REQ_OP_READ)?;
            let block_end = block_offset + RECORD_BLOCK;
            while index < layout.record_sectors
                && HEADER_BYTES + index * (SECTOR_BYTES as u64) < block_end
            {
                let at = HEADER_BYTES + index * SECTOR_BYTES as u64 - block_offset;
                let mut bytes = [0u8; SECTOR_BYTES];
                self.record_block.read(at as usize, &mut bytes)?;
                let sector_index = u32::try_from(index).map_err(|_| EINVAL)?;
                // A sector torn by a crash holds no record that was ever acknowledged: the
                // list ends there, as `sand` reads it.
                let sector = RecordSector::decode(&bytes, sector_index, layout, store.snapshot_id)
                    .unwrap_or(RecordSector::empty(sector_index));
                if (sector.count as usize) < RECORDS_PER_SECTOR {
                    return Ok(Cursor {
                        snapshot_id: store.snapshot_id,
                        epoch: map.epoch,
                        checked_ns: now,
                        next_slot: index * RECORDS_PER_SECTOR as u64 + u64::from(sector.count),
                        sector,
                        block_offset,
                    });
                }
                index += 1;
            }
        }
    }
}

/// Reads `length` bytes of the origin at volume `offset` into the start of `buf`, from a
/// healthy replica of each piece (synchronous bios).
fn read_origin(volume: &Volume, map: &MapState, buf: &PageBuf, offset: u64, length: u64) -> Result {
    let mut done = 0u64;
    while done < length {
        let piece = map.map(offset + done, length - done).ok_or(EINVAL)?;
        let targets = &piece.targets[..usize::from(piece.target_count).min(piece.targets.len())];
        let target = targets
            .iter()
            .find(|t| device_healthy(volume, map.slot_of(t.device)))
            .ok_or(EIO)?;
        let step = piece.length.min(MAX_BIO_BYTES);
        sync_io(
            volume,
            map.slot_of(target.device),
            target.offset,
            buf,
            done,
            step,
            REQ_OP_READ,
        )?;
        done += step;
    }
    Ok(())
}

/// Reads or writes `length` bytes at store `offset` from or into the start of `buf`.
fn store_io(
    volume: &Volume,
    map: &MapState,
    store: &StoreInfo,
    buf: &PageBuf,
    offset: u64,
    length: u64,
    opf: Opf,
) -> Result {
    let mut done = 0u64;
    while done < length {
        let (device, device_offset, here) =
            store.locate(offset + done, length - done).ok_or(EINVAL)?;
        let step = here.min(MAX_BIO_BYTES);
        sync_io(
            volume,
            map.slot_of(device),
            device_offset,
            buf,
            done,
            step,
            opf,
        )?;
        done += step;
    }
    Ok(())
}

/// One synchronous bio of `length` bytes at `device_offset` of the volume's device `slot`,
/// on `buf` from byte `at`.
fn sync_io(
    volume: &Volume,
    slot: u32,
    device_offset: u64,
    buf: &PageBuf,
    at: u64,
    length: u64,
    opf: Opf,
) -> Result {
    let device = volume.devices.get(slot).ok_or(ENODEV)?;
    let vecs = PageBuf::vecs(at as usize, length as usize);
    let mut bio = Bio::alloc(
        device.bdev(),
        u16::try_from(vecs).map_err(|_| EINVAL)?,
        opf,
        GFP_NOIO,
        None,
    )
    .ok_or(ENOMEM)?;
    bio.set_sector(device_offset >> 9);
    let result = buf
        .add_to(&mut bio, at as usize, length as usize)
        .and_then(|()| bio.submit_and_wait());
    bio.put();
    if result.is_err() {
        device.note_error();
    }
    result
}
