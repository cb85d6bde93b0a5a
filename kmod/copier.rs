// SPDX-License-Identifier: GPL-2.0

//! The volume's copier thread: while the map describes the COW stores of the volume's
//! active snapshots, it preserves each chunk a write is the first to touch since the newest
//! snapshot, as `sand` would, in every store that does not hold it yet, each store in
//! chunks of its own snapshot's size (the stores of one size together): reads the chunk
//! from the origin, writes it into the next free slot of the store, appends the record
//! (chunk, slot) to the store's record sectors with PREFLUSH (the slot is durable before
//! the record is written) and FUA (the record is durable before the origin write is
//! issued); once every store holds it, sets the chunk's bit, then re-submits the write,
//! which now goes straight to the SAN devices. A host that crashes at any moment leaves
//! every snapshot reading back its point in time: until the records are durable the origin
//! is untouched, and a slot without a record is free. The writes queued while it copies are
//! taken as one batch: their chunks are read once, go into consecutive slots of each store
//! lacking them, and their records into one write of each store's record block, so one
//! pair of flushes per store serves them all; the reads, then the slot writes, then the
//! record writes of every store are in flight together (as kcopyd's are). Which chunks an
//! older store holds (copied before a newer snapshot was taken) the thread learns by
//! reading that store's records once per snapshot set.
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
//! set, into every store, for good (`CopiedChunks::stop_copying`), and the write goes through the server, which
//! reads the records back and copies from then on (invalidating the snapshot if the store
//! is full). Nothing is copied while the volume is quiesced or its lease has lapsed: the
//! write is re-submitted and held like any other.

use kernel::prelude::*;

use crate::abi::{Attr, Command, EventKind, MAX_EVENT_CHUNKS};
use crate::abi_cow::{Record, RecordSector, HEADER_BYTES, RECORDS_PER_SECTOR, SECTOR_BYTES};
use crate::abi_map::{chunks_touched, MAX_COW_STORES};
use crate::copied::{CopiedChunks, StoreChunks};
use crate::cow_store::StoreInfo;
use crate::device::SanDevice;
use crate::ffi::bio::{Bio, BioList};
use crate::ffi::consts::{Opf, GFP_NOIO, REQ_FUA, REQ_OP_READ, REQ_OP_WRITE, REQ_PREFLUSH};
use crate::ffi::genl::Event;
use crate::ffi::kthread::{forbid_io_in_reclaim, should_stop};
use crate::ffi::pages::PageBuf;
use crate::ffi::sync::{wait_until, TASK_INTERRUPTIBLE};
use crate::ffi::time::{msecs_to_jiffies, now_ns};
use crate::remap::{device_healthy, resubmit_copied};
use crate::volume::{MapState, Volume};

/// Bytes of a record block: the record sectors are read and written in blocks this large
/// and aligned (the largest logical block size of the SAN devices).
const RECORD_BLOCK: u64 = 4096;
/// Most bytes one bio of the copier carries.
const MAX_BIO_BYTES: u64 = 512 << 10;
/// Most queued writes copied as one batch.
const MAX_BATCH_WRITES: usize = 32;
/// Most chunks gathered from a batch before they are copied.
const MAX_GROUP_CHUNKS: usize = 64;
/// Most bytes of chunks copied in one group (one slot write, one record write).
const MAX_GROUP_BYTES: u64 = 4 << 20;

/// The body of a volume's copier thread; returns when asked to stop.
pub(crate) fn run(volume: &Volume) {
    forbid_io_in_reclaim();
    let mut copier = Copier {
        chunk: PageBuf::new(),
        cursors: slots(|| None),
        report: slots(|| PendingReport::new(volume.id)),
    };
    loop {
        // With chunks to report, wake up to send them once they have waited long enough.
        let pending = copier.report.iter().any(|r| !r.is_empty());
        let timeout = pending.then(|| msecs_to_jiffies(REPORT_AFTER_MS));
        wait_until(
            &[&volume.copies.wakeup],
            TASK_INTERRUPTIBLE,
            timeout,
            || !volume.copies.is_empty() || should_stop(),
        );
        copier.flush_reports(false);
        while let Some((first, _inflight)) = volume.copies.pop(&volume.inflight) {
            // The writes queued now, copied as one batch; the first one's in-flight
            // reference covers them all until they are re-submitted.
            let mut batch = BioList::new();
            batch.push(first);
            while batch.len() < MAX_BATCH_WRITES {
                let Some((bio, _also)) = volume.copies.pop(&volume.inflight) else {
                    break;
                };
                batch.push(bio);
            }
            copier.handle(volume, batch);
        }
        if should_stop() {
            copier.flush_reports(true);
            return;
        }
    }
}

/// One entry per store the map may describe ([`MAX_COW_STORES`]), kept off the thread's
/// stack; fewer if memory is short (a store without an entry is not copied into: the
/// copy fails and the server takes over).
fn slots<T>(make: impl Fn() -> T) -> KVec<T> {
    let mut entries = KVec::new();
    for _ in 0..MAX_COW_STORES {
        if entries.push(make(), GFP_KERNEL).is_err() {
            break;
        }
    }
    entries
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
    /// Store offset of the record block holding that sector.
    block_offset: u64,
    /// That block's bytes as written so far: each store has its own, as the whole block is
    /// written with every new record.
    block: PageBuf,
}

struct Copier {
    chunk: PageBuf,
    /// Where the next record goes, per store appended to (found by snapshot id).
    cursors: KVec<Option<Cursor>>,
    /// Preserved chunks not multicast yet, per snapshot.
    report: KVec<PendingReport>,
}

impl Copier {
    fn handle(&mut self, volume: &Volume, mut batch: BioList) {
        let mut ranges = [(0u64, 0u64); MAX_BATCH_WRITES];
        let mut count = 0;
        let mut writes = BioList::new();
        while let Some(bio) = batch.pop() {
            if let Some(range) = ranges.get_mut(count) {
                *range = (bio.sector() << 9, u64::from(bio.size()));
                count += 1;
            }
            writes.push(bio);
        }
        let ranges = &ranges[..count];
        let map = volume.current_map();
        let now = now_ns();
        if !volume.hold.is_quiesced() && !volume.hold.lease_lapsed(now) {
            if let Some((stores, copied)) = map.copy_target() {
                let preserved = self.preserve(volume, &map, stores, copied, ranges);
                // Re-submitting a write still not preserved would bring it back here.
                let outcome = preserved.and_then(|()| {
                    if ranges
                        .iter()
                        .any(|&(offset, length)| map.write_needs_copy(offset, length))
                    {
                        Err(EINVAL)
                    } else {
                        Ok(())
                    }
                });
                if let Err(err) = outcome {
                    for cursor in self.cursors.iter_mut() {
                        *cursor = None;
                    }
                    if copied.stop_copying() {
                        pr_warn!(
                            "volume {}: snapshots up to {}: chunks no longer preserved by this host (errno {}): first writes go through the server\n",
                            volume.id,
                            stores.iter().map(|s| s.snapshot_id).max().unwrap_or(0),
                            -err.to_errno()
                        );
                    }
                }
            }
        }
        while let Some(bio) = writes.pop() {
            resubmit_copied(volume, bio);
        }
    }

    /// Preserves every chunk the writes `ranges` touch that is not preserved yet in every
    /// store, the stores of one chunk size together (`stores` is sorted by it), each store
    /// in chunks of its own size, in groups of consecutive slots whose records share one
    /// record block; then marks the map's chunks the writes touch copied.
    fn preserve(
        &mut self,
        volume: &Volume,
        map: &MapState,
        stores: &[StoreInfo],
        copied: &CopiedChunks,
        ranges: &[(u64, u64)],
    ) -> Result {
        let mut rest = stores;
        while let Some(first) = rest.first() {
            let chunk_bytes = first.chunk_bytes();
            let same = rest
                .iter()
                .take_while(|s| s.chunk_bytes() == chunk_bytes)
                .count();
            let (sized, after) = rest.split_at(same);
            self.preserve_sized(volume, map, (sized, stores), copied, ranges)?;
            rest = after;
        }
        // Every store holds each chunk of its size the writes touch, so each map chunk they
        // touch.
        for &(offset, length) in ranges {
            if let Some((first, last)) = chunks_touched(offset, length, map.chunk_bytes()) {
                for chunk in first..=last {
                    copied.mark_chunk(chunk);
                }
            }
        }
        Ok(())
    }

    /// [`Self::preserve`] into the stores `sized`, all of one chunk size (a power of two
    /// times the map's), among all of the map's (`all`).
    fn preserve_sized(
        &mut self,
        volume: &Volume,
        map: &MapState,
        (sized, all): (&[StoreInfo], &[StoreInfo]),
        copied: &CopiedChunks,
        ranges: &[(u64, u64)],
    ) -> Result {
        let Some(chunk_bytes) = sized.first().map(StoreInfo::chunk_bytes) else {
            return Ok(());
        };
        if map.chunk_bytes() == 0 || chunk_bytes < map.chunk_bytes() {
            return Err(EINVAL);
        }
        // Map chunks per chunk of these stores, as a shift.
        let shift = (chunk_bytes / map.chunk_bytes()).trailing_zeros();
        let mut chunks = [0u64; MAX_GROUP_CHUNKS];
        let mut count = 0;
        for &(offset, length) in ranges {
            let (Some((first, last)), Some((map_first, map_last))) = (
                chunks_touched(offset, length, chunk_bytes),
                chunks_touched(offset, length, map.chunk_bytes()),
            ) else {
                continue;
            };
            for chunk in first..=last {
                // Every store holds it if one map chunk of it is copied: those the write
                // touches tell.
                let from = (chunk << shift).max(map_first);
                let to = ((chunk + 1) << shift).saturating_sub(1).min(map_last);
                if (from..=to).all(|c| copied.is_copied(c)) || chunks[..count].contains(&chunk) {
                    continue;
                }
                if count == chunks.len() {
                    self.copy_everywhere(volume, map, (sized, all), copied, &chunks[..count])?;
                    count = 0;
                }
                chunks[count] = chunk;
                count += 1;
            }
        }
        self.copy_everywhere(volume, map, (sized, all), copied, &chunks[..count])
    }

    /// Copies `chunks` (at most [`MAX_GROUP_CHUNKS`], of the stores' chunk size) into each
    /// of the stores `stores` (one chunk size, among all of the map's, `all`) that lacks
    /// them; returns once every store's records of them are durable.
    fn copy_everywhere(
        &mut self,
        volume: &Volume,
        map: &MapState,
        (stores, all): (&[StoreInfo], &[StoreInfo]),
        copied: &CopiedChunks,
        chunks: &[u64],
    ) -> Result {
        if chunks.is_empty() {
            return Ok(());
        }
        if stores.len() > MAX_COW_STORES as usize || chunks.len() > MAX_GROUP_CHUNKS {
            return Err(EINVAL);
        }
        // Bit `s` of `lacking[i]`: store `s` lacks `chunks[i]`.
        let mut lacking = [0u8; MAX_GROUP_CHUNKS];
        let mut entries = [0usize; MAX_COW_STORES as usize];
        for (s, store) in stores.iter().enumerate() {
            let held = copied.store(store.snapshot_id).ok_or(EINVAL)?;
            let entry = self.cursor_index(store.snapshot_id, all)?;
            entries[s] = entry;
            // Which of them the store holds: its records read once per snapshot set, and
            // again (from the cursor) when it lacks one, as another host may have appended.
            // Every store gets its cursor here, so the next one finds another entry.
            let no_cursor = !matches!(self.cursors.get(entry), Some(Some(_)));
            if no_cursor || !held.scanned() || chunks.iter().any(|&chunk| !held.holds(chunk)) {
                self.refresh(volume, map, store, held, entry)?;
            }
            for (mask, &chunk) in lacking.iter_mut().zip(chunks) {
                if !held.holds(chunk) {
                    *mask |= 1 << s;
                }
            }
        }
        let entries = &entries[..stores.len()];
        let lacking = &lacking[..chunks.len()];
        let mut done = 0;
        while done < chunks.len() {
            let group = self.copy_group(
                volume,
                map,
                stores,
                entries,
                &chunks[done..],
                &lacking[done..],
            )?;
            // The records are durable: the server hears of them (through the agent).
            let mut preserved = [0u64; MAX_GROUP_CHUNKS];
            for (s, store) in stores.iter().enumerate() {
                let held = copied.store(store.snapshot_id).ok_or(EINVAL)?;
                let mut count = 0;
                for (&chunk, _) in chunks[done..done + group]
                    .iter()
                    .zip(&lacking[done..])
                    .filter(|(_, mask)| **mask & (1 << s) != 0)
                {
                    held.note(chunk);
                    volume.copies.count_preserved();
                    if let Some(slot) = preserved.get_mut(count) {
                        *slot = chunk;
                        count += 1;
                    }
                }
                if count > 0 {
                    self.add_report(store.snapshot_id, &preserved[..count]);
                }
            }
            done += group;
        }
        Ok(())
    }

    /// The entry of `cursors` for snapshot `snapshot_id`'s store: its own, a free one, or
    /// one of a store no longer in `stores`.
    fn cursor_index(&mut self, snapshot_id: u64, stores: &[StoreInfo]) -> Result<usize> {
        let entries = &mut self.cursors;
        let found = entries
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.snapshot_id == snapshot_id))
            .or_else(|| entries.iter().position(Option::is_none))
            .or_else(|| {
                entries.iter().position(|c| {
                    c.as_ref()
                        .is_some_and(|c| !stores.iter().any(|s| s.snapshot_id == c.snapshot_id))
                })
            })
            .ok_or(ENOMEM)?;
        if let Some(entry) = entries.get_mut(found) {
            if entry.as_ref().is_some_and(|c| c.snapshot_id != snapshot_id) {
                *entry = None;
            }
        }
        Ok(found)
    }

    /// The cursor in entry `entry` (EINVAL if it has none).
    fn cursor(&self, entry: usize) -> Result<&Cursor> {
        self.cursors
            .get(entry)
            .and_then(Option::as_ref)
            .ok_or(EINVAL)
    }

    fn cursor_mut(&mut self, entry: usize) -> Result<&mut Cursor> {
        self.cursors
            .get_mut(entry)
            .and_then(Option::as_mut)
            .ok_or(EINVAL)
    }

    /// Reads `store`'s records again unless the cursor is fresh: from the first one when
    /// this snapshot set has not read them yet, else from the cursor's sector; every record
    /// read is noted in `held`.
    fn refresh(
        &mut self,
        volume: &Volume,
        map: &MapState,
        store: &StoreInfo,
        held: &StoreChunks,
        cursor: usize,
    ) -> Result {
        let now = now_ns();
        let entry = self.cursors.get_mut(cursor).ok_or(EINVAL)?;
        let fresh = held.scanned()
            && matches!(entry, Some(c) if c.snapshot_id == store.snapshot_id
                && c.epoch == map.epoch
                && now - c.checked_ns < CURSOR_TRUST_NS);
        if fresh {
            return Ok(());
        }
        // Records before the cursor's sector are full and never change: look from there.
        let old = entry.take();
        let from = match &old {
            _ if !held.scanned() => 0,
            Some(c) if c.snapshot_id == store.snapshot_id => {
                u64::from(c.sector.index).max(store.scan_from_sector)
            }
            _ => store.scan_from_sector,
        };
        let block = old.map_or_else(PageBuf::new, |c| c.block);
        let found = find_end(volume, map, store, held, from, now, block)?;
        held.set_scanned();
        if let Some(entry) = self.cursors.get_mut(cursor) {
            *entry = Some(found);
        }
        Ok(())
    }

    /// Adds preserved chunks of `snapshot_id` to its pending report (a free one, else the
    /// one pending longest, sent first).
    fn add_report(&mut self, snapshot_id: u64, chunks: &[u64]) {
        let now = now_ns();
        let reports = &mut self.report;
        let index = reports
            .iter()
            .position(|r| !r.is_empty() && r.snapshot_id == snapshot_id)
            .or_else(|| reports.iter().position(PendingReport::is_empty))
            .or_else(|| {
                (0..reports.len()).min_by_key(|&i| reports.get(i).map_or(0, |r| r.since_ns))
            });
        if let Some(report) = index.and_then(|i| reports.get_mut(i)) {
            report.add(snapshot_id, chunks, now);
        }
    }

    /// Sends the pending reports that have waited long enough (or all, with `force`).
    fn flush_reports(&mut self, force: bool) {
        let now = now_ns();
        for report in self.report.iter_mut() {
            report.flush(now, force);
        }
    }

    /// Copies the first chunks of `chunks` into the stores that lack them (`lacking`, a
    /// bit per store), into consecutive slots of each: the chunks read once, every store's
    /// slots written, then each store's records in one write of its record block with
    /// PREFLUSH (its slots are durable before it) and FUA (the records are durable before
    /// any write is re-submitted); the reads, then the slot writes, then the record writes
    /// of all the stores in flight at once. Returns how many chunks it took (at least one).
    fn copy_group(
        &mut self,
        volume: &Volume,
        map: &MapState,
        stores: &[StoreInfo],
        entries: &[usize],
        chunks: &[u64],
        lacking: &[u8],
    ) -> Result<usize> {
        let chunk_bytes = u64::from(stores.first().ok_or(EINVAL)?.chunk_bytes());
        // Each store's next slot and room: its free slots, and the records its record block
        // still takes.
        let mut first_slots = [0u64; MAX_COW_STORES as usize];
        let mut room = [0u64; MAX_COW_STORES as usize];
        for (s, (&entry, store)) in entries.iter().zip(stores).enumerate() {
            let cursor = self.cursor(entry)?;
            let layout = &store.layout;
            first_slots[s] = cursor.next_slot;
            if cursor.next_slot < layout.slots {
                let block_end = cursor.block_offset + RECORD_BLOCK;
                let sectors_left = (block_end - layout.record_sector_offset(cursor.next_slot))
                    / SECTOR_BYTES as u64;
                let records_left =
                    sectors_left * RECORDS_PER_SECTOR as u64 - u64::from(cursor.sector.count);
                room[s] = (layout.slots - cursor.next_slot).min(records_left);
            }
        }
        // As many chunks as every store lacking them has room for, within the buffer bound.
        let mut used = [0u64; MAX_COW_STORES as usize];
        let max = (MAX_GROUP_BYTES / chunk_bytes).max(1) as usize;
        let mut count = 0;
        for &mask in lacking.iter().take(max.min(chunks.len())) {
            let lacks = |s: usize| mask & (1 << s) != 0;
            if (0..stores.len()).any(|s| lacks(s) && used[s] >= room[s]) {
                break;
            }
            for (s, used) in used.iter_mut().enumerate().take(stores.len()) {
                if lacks(s) {
                    *used += 1;
                }
            }
            count += 1;
        }
        if count == 0 {
            // A store lacking the first chunk has no free slot.
            return Err(ENOSPC);
        }
        let (group, lacking) = (&chunks[..count], &lacking[..count]);
        // The chunks as they are now (the part of a last chunk beyond the volume reads as
        // zero), chunk i at i chunks into the buffer. Should the bios in flight together
        // fail, once more one bio at a time, which finds the device that failed (and marks
        // it so).
        self.chunk.reserve(count * chunk_bytes as usize)?;
        let chunks_read = (group, lacking, chunk_bytes);
        if self.read_chunks(volume, map, chunks_read, true).is_err() {
            self.read_chunks(volume, map, chunks_read, false)?;
        }
        let mut chain = Chain::new();
        let together = self
            .write_slots(volume, map, stores, &first_slots, lacking, Some(&mut chain))
            .and_then(|()| chain.wait());
        if together.is_err() {
            self.write_slots(volume, map, stores, &first_slots, lacking, None)?;
        }
        // Each store's records, in its record block.
        for (s, (&entry, store)) in entries.iter().zip(stores).enumerate() {
            let cursor = self.cursor_mut(entry)?;
            let lacked = group
                .iter()
                .zip(lacking)
                .filter(|(_, mask)| **mask & (1 << s) != 0);
            for (slot, (&chunk, _)) in (first_slots[s]..).zip(lacked) {
                if !cursor.sector.push(Record {
                    origin_chunk: chunk,
                    slot,
                }) {
                    return Err(EINVAL);
                }
                let mut bytes = [0u8; SECTOR_BYTES];
                cursor.sector.encode(store.snapshot_id, &mut bytes);
                let in_block = store.layout.record_sector_offset(slot) - cursor.block_offset;
                cursor.block.write(in_block as usize, &bytes)?;
                if cursor.sector.count as usize == RECORDS_PER_SECTOR {
                    cursor.sector = RecordSector::empty(cursor.sector.index.saturating_add(1));
                }
            }
        }
        let mut chain = Chain::new();
        let together = self
            .write_records(volume, map, stores, entries, &used, Some(&mut chain))
            .and_then(|()| chain.wait());
        if together.is_err() {
            self.write_records(volume, map, stores, entries, &used, None)?;
        }
        // Durable: each store on to its next slot (and block, once this one is full).
        for ((&entry, store), &used) in entries.iter().zip(stores).zip(&used) {
            let cursor = self.cursor_mut(entry)?;
            cursor.next_slot += used;
            let block_end = cursor.block_offset + RECORD_BLOCK;
            if store.layout.record_sector_offset(cursor.next_slot) >= block_end {
                // Sectors past the last record were never written (the store was formatted
                // with zeroes), and this thread is the only appender.
                cursor.block_offset = block_end;
                cursor.block.zero(0, RECORD_BLOCK as usize)?;
            }
        }
        Ok(count)
    }

    /// Writes each store's runs of the buffer's chunks it lacks into its slots from
    /// `first_slots`: into `chain` (in flight together), or one bio at a time.
    fn write_slots(
        &self,
        volume: &Volume,
        map: &MapState,
        stores: &[StoreInfo],
        first_slots: &[u64],
        lacking: &[u8],
        mut chain: Option<&mut Chain>,
    ) -> Result {
        for (s, (store, &first_slot)) in stores.iter().zip(first_slots).enumerate() {
            let lacks = |i: usize| lacking.get(i).is_some_and(|mask| mask & (1 << s) != 0);
            let chunk_bytes = u64::from(store.chunk_bytes());
            let mut slot = first_slot;
            let mut i = 0;
            while i < lacking.len() {
                if !lacks(i) {
                    i += 1;
                    continue;
                }
                // A run of chunks the store lacks: consecutive in the buffer and in its slots.
                let start = i;
                while lacks(i) {
                    i += 1;
                }
                let run = (i - start) as u64;
                store_io(
                    volume,
                    map,
                    store,
                    (&self.chunk, start as u64 * chunk_bytes),
                    (store.layout.slot_offset(slot), run * chunk_bytes),
                    REQ_OP_WRITE,
                    chain.as_deref_mut(),
                )?;
                slot += run;
            }
        }
        Ok(())
    }

    /// Writes the record block of each store that took records (`used`), with PREFLUSH and
    /// FUA: into `chain` (in flight together), or one after the other.
    fn write_records(
        &self,
        volume: &Volume,
        map: &MapState,
        stores: &[StoreInfo],
        entries: &[usize],
        used: &[u64],
        mut chain: Option<&mut Chain>,
    ) -> Result {
        for ((&entry, store), &used) in entries.iter().zip(stores).zip(used) {
            if used == 0 {
                continue;
            }
            let cursor = self.cursor(entry)?;
            store_io(
                volume,
                map,
                store,
                (&cursor.block, 0),
                (cursor.block_offset, RECORD_BLOCK),
                REQ_OP_WRITE | REQ_PREFLUSH | REQ_FUA,
                chain.as_deref_mut(),
            )?;
        }
        Ok(())
    }

    /// Reads the `chunks` (of `chunk_bytes`) some store lacks (`lacking`) from the origin as
    /// they are now, chunk i at i chunks into the buffer (the part of a last chunk beyond
    /// the volume reads as zero): with `together`, every bio in flight at once, else one
    /// after the other.
    fn read_chunks(
        &self,
        volume: &Volume,
        map: &MapState,
        (chunks, lacking, chunk_bytes): (&[u64], &[u8], u64),
        together: bool,
    ) -> Result {
        let mut chain = Chain::new();
        for (i, (&chunk, _)) in chunks
            .iter()
            .zip(lacking)
            .enumerate()
            .filter(|(_, (_, mask))| **mask != 0)
        {
            let at = i as u64 * chunk_bytes;
            let start = chunk * chunk_bytes;
            let valid = map.size.saturating_sub(start).min(chunk_bytes);
            read_origin(
                volume,
                map,
                start,
                valid,
                |slot, device_offset, done, length| {
                    let at = at + done;
                    if together {
                        let device = volume.devices.get(slot).ok_or(ENODEV)?;
                        chain.add(device_bio(
                            device,
                            device_offset,
                            &self.chunk,
                            at,
                            length,
                            REQ_OP_READ,
                        )?);
                        Ok(())
                    } else {
                        sync_io(
                            volume,
                            slot,
                            device_offset,
                            &self.chunk,
                            at,
                            length,
                            REQ_OP_READ,
                        )
                    }
                },
            )?;
            if valid < chunk_bytes {
                self.chunk
                    .zero((at + valid) as usize, (chunk_bytes - valid) as usize)?;
            }
        }
        chain.wait()
    }
}

/// Reads the record sectors from sector `from` (every one before it is full) until the
/// first one not full: the end of the dense sequence, where the next record goes. Notes
/// the chunk of every record read in `held`.
fn find_end(
    volume: &Volume,
    map: &MapState,
    store: &StoreInfo,
    held: &StoreChunks,
    from: u64,
    now: i64,
    mut block: PageBuf,
) -> Result<Cursor> {
    let layout = &store.layout;
    block.reserve(RECORD_BLOCK as usize)?;
    let mut index = from;
    loop {
        if index >= layout.record_sectors {
            // Every slot is used.
            return Err(ENOSPC);
        }
        let sector_offset = HEADER_BYTES + index * SECTOR_BYTES as u64;
        let block_offset = sector_offset - sector_offset % RECORD_BLOCK;
        record_block_io(volume, map, store, &block, block_offset, REQ_OP_READ)?;
        let block_end = block_offset + RECORD_BLOCK;
        while index < layout.record_sectors
            && HEADER_BYTES + index * (SECTOR_BYTES as u64) < block_end
        {
            let at = HEADER_BYTES + index * SECTOR_BYTES as u64 - block_offset;
            let mut bytes = [0u8; SECTOR_BYTES];
            block.read(at as usize, &mut bytes)?;
            let sector_index = u32::try_from(index).map_err(|_| EINVAL)?;
            // A sector torn by a crash holds no record that was ever acknowledged: the
            // list ends there, as `sand` reads it.
            let sector = RecordSector::decode(&bytes, sector_index, layout, store.snapshot_id)
                .unwrap_or(RecordSector::empty(sector_index));
            for record in sector.records() {
                held.note(record.origin_chunk);
            }
            if (sector.count as usize) < RECORDS_PER_SECTOR {
                return Ok(Cursor {
                    snapshot_id: store.snapshot_id,
                    epoch: map.epoch,
                    checked_ns: now,
                    next_slot: index * RECORDS_PER_SECTOR as u64 + u64::from(sector.count),
                    sector,
                    block_offset,
                    block,
                });
            }
            index += 1;
        }
    }
}

/// How long preserved chunks wait to be multicast with more: an event wakes the agent, and
/// one per first write would cost the guest a process wake-up per copy.
const REPORT_AFTER_MS: u32 = 250;
const REPORT_AFTER_NS: i64 = REPORT_AFTER_MS as i64 * 1_000_000;

/// Preserved chunks of one snapshot not yet multicast in a CHUNKS_PRESERVED event. A lost
/// event loses nothing: the server reads the records back.
struct PendingReport {
    volume_id: u64,
    snapshot_id: u64,
    chunks: [u64; MAX_EVENT_CHUNKS],
    count: usize,
    /// When the oldest pending chunk was preserved (ktime ns).
    since_ns: i64,
}

impl PendingReport {
    fn new(volume_id: u64) -> Self {
        PendingReport {
            volume_id,
            snapshot_id: 0,
            chunks: [0; MAX_EVENT_CHUNKS],
            count: 0,
            since_ns: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds `chunks` of `snapshot_id`, sending what is pending first if it is about another
    /// snapshot or full, and at the end if it has waited long enough.
    fn add(&mut self, snapshot_id: u64, chunks: &[u64], now: i64) {
        for &chunk in chunks {
            if self.count > 0
                && (self.snapshot_id != snapshot_id || self.count == self.chunks.len())
            {
                self.send();
            }
            if self.count == 0 {
                self.snapshot_id = snapshot_id;
                self.since_ns = now;
            }
            if let Some(slot) = self.chunks.get_mut(self.count) {
                *slot = chunk;
                self.count += 1;
            }
        }
        if self.count > 0 && now - self.since_ns >= REPORT_AFTER_NS {
            self.send();
        }
    }

    /// Sends what is pending if it has waited long enough (or `force`).
    fn flush(&mut self, now: i64, force: bool) {
        if self.count > 0 && (force || now - self.since_ns >= REPORT_AFTER_NS) {
            self.send();
        }
    }

    fn send(&mut self) {
        let count = self.count;
        self.count = 0;
        if self
            .multicast(&self.chunks[..count.min(self.chunks.len())])
            .is_err()
        {
            pr_warn!(
                "volume {}: cannot multicast {} preserved chunk(s)\n",
                self.volume_id,
                count
            );
        }
    }

    /// One CHUNKS_PRESERVED event (process context).
    fn multicast(&self, chunks: &[u64]) -> Result {
        let mut bytes = [0u8; MAX_EVENT_CHUNKS * 8];
        let mut length = 0;
        for chunk in chunks {
            if let Some(slot) = bytes.get_mut(length..length + 8) {
                slot.copy_from_slice(&chunk.to_le_bytes());
                length += 8;
            }
        }
        let mut event = Event::new(Command::Event as u8, 128 + length)?;
        event.put_u32(Attr::EventKind as u16, EventKind::ChunksPreserved as u32)?;
        event.put_u64(Attr::VolumeId as u16, self.volume_id)?;
        event.put_u64(Attr::SnapshotId as u16, self.snapshot_id)?;
        event.put_bytes(Attr::Chunks as u16, &bytes[..length])?;
        event.send();
        Ok(())
    }
}

/// Issues the reads of `length` bytes of the origin at volume `offset`, from a healthy
/// replica of each piece: `read(device slot, device offset, bytes done before, length)`.
fn read_origin(
    volume: &Volume,
    map: &MapState,
    offset: u64,
    length: u64,
    mut read: impl FnMut(u32, u64, u64, u64) -> Result,
) -> Result {
    let mut done = 0u64;
    while done < length {
        let piece = map.map(offset + done, length - done).ok_or(EINVAL)?;
        let targets = &piece.targets[..usize::from(piece.target_count).min(piece.targets.len())];
        let target = targets
            .iter()
            .find(|t| device_healthy(volume, map.slot_of(t.device)))
            .ok_or(EIO)?;
        let step = piece.length.min(MAX_BIO_BYTES);
        read(map.slot_of(target.device), target.offset, done, step)?;
        done += step;
    }
    Ok(())
}

/// Reads or writes the record block at store offset `block_offset` from or into `block`.
fn record_block_io(
    volume: &Volume,
    map: &MapState,
    store: &StoreInfo,
    block: &PageBuf,
    block_offset: u64,
    opf: Opf,
) -> Result {
    store_io(
        volume,
        map,
        store,
        (block, 0),
        (block_offset, RECORD_BLOCK),
        opf,
        None,
    )
}

/// Reads or writes `length` bytes at store `offset` from or into `buf` from byte `at`: into
/// `chain` (in flight with the rest of it), or one bio after the other.
fn store_io(
    volume: &Volume,
    map: &MapState,
    store: &StoreInfo,
    (buf, at): (&PageBuf, u64),
    (offset, length): (u64, u64),
    opf: Opf,
    mut chain: Option<&mut Chain>,
) -> Result {
    let mut done = 0u64;
    while done < length {
        let (device, device_offset, here) =
            store.locate(offset + done, length - done).ok_or(EINVAL)?;
        let step = here.min(MAX_BIO_BYTES);
        let slot = map.slot_of(device);
        match chain.as_deref_mut() {
            Some(chain) => {
                let device = volume.devices.get(slot).ok_or(ENODEV)?;
                chain.add(device_bio(
                    device,
                    device_offset,
                    buf,
                    at + done,
                    step,
                    opf,
                )?);
            }
            None => sync_io(volume, slot, device_offset, buf, at + done, step, opf)?,
        }
        done += step;
    }
    Ok(())
}

/// One synchronous bio of `length` bytes at `device_offset` of the volume's device `slot`,
/// on `buf` from byte `at`; a failure marks the device failed.
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
    let mut chain = Chain::new();
    chain.add(device_bio(device, device_offset, buf, at, length, opf)?);
    let result = chain.wait();
    if result.is_err() {
        device.note_error();
    }
    result
}

/// A bio of `length` bytes at `device_offset` of `device`, on `buf` from byte `at`.
fn device_bio(
    device: &SanDevice,
    device_offset: u64,
    buf: &PageBuf,
    at: u64,
    length: u64,
    opf: Opf,
) -> Result<Bio> {
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
    match buf.add_to(&mut bio, at as usize, length as usize) {
        Ok(()) => Ok(bio),
        Err(err) => {
            bio.put();
            Err(err)
        }
    }
}

/// Bios in flight together and waited for as one: each is chained into the one added after
/// it and submitted, and the last is submitted and waited for by [`Chain::wait`] (or when
/// the chain is dropped), which fails if any of them failed.
struct Chain {
    last: Option<Bio>,
}

impl Chain {
    fn new() -> Self {
        Chain { last: None }
    }

    fn add(&mut self, mut bio: Bio) {
        if let Some(previous) = self.last.take() {
            previous.submit_chained(&mut bio);
        }
        self.last = Some(bio);
    }

    fn wait(mut self) -> Result {
        self.finish()
    }

    fn finish(&mut self) -> Result {
        let Some(mut last) = self.last.take() else {
            return Ok(());
        };
        let result = last.submit_and_wait();
        last.put();
        result
    }
}

impl Drop for Chain {
    /// A chain left on an error still completes the bios already submitted into it.
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
