//! One snapshot's copy-on-write store as the server keeps it (format: `sanblk_uapi::cow`): the
//! records loaded into a chunk -> slot table, and the copy that preserves a chunk before its
//! first write.

use std::collections::HashMap;
use std::io;

use sanblk_uapi::cow::{
    CowHeader, CowLayout, Record, RecordSector, HEADER_BYTES, RECORDS_PER_SECTOR, SECTOR_BYTES,
};

use crate::device::{plan, AlignedBuf, DeviceTable, DIRECT_ALIGN};
use crate::store::SnapshotRecord;

/// Why a chunk could not be preserved.
#[derive(Debug)]
pub enum PreserveError {
    /// Every slot is used.
    Full,
    Io(io::Error),
}

pub struct CowStore {
    pub snapshot: SnapshotRecord,
    layout: CowLayout,
    /// Origin chunk -> slot holding its point-in-time content.
    slots: HashMap<u64, u64>,
    /// Records in slot order (the order of the first writes).
    records: Vec<Record>,
    /// The sector the next record goes to, as written so far.
    open_sector: RecordSector,
    /// The highest of [`FILL_MARKS`] the store's use has reached (0: none).
    fill_mark: u8,
}

/// Percentages of a store's slots at which the server warns that its snapshot will become
/// invalid once the store is full.
pub const FILL_MARKS: [u8; 3] = [75, 90, 99];

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl CowStore {
    /// Writes the header of a new store and zeroes its record area (blocking).
    pub fn format(devices: &DeviceTable, snapshot: &SnapshotRecord) -> io::Result<()> {
        let layout = layout_of(snapshot)?;
        let header = CowHeader {
            volume_id: snapshot.volume_id,
            snapshot_id: snapshot.id,
            origin_bytes: snapshot.origin_bytes,
            store_bytes: snapshot.store_bytes,
            chunk_bytes: snapshot.chunk_bytes,
        };
        let records_end = HEADER_BYTES + layout.record_sectors * SECTOR_BYTES as u64;
        let zero_bytes = records_end.next_multiple_of(DIRECT_ALIGN as u64);
        // In pieces of at most 1 MiB, the header in the first one.
        let mut at = 0;
        while at < zero_bytes {
            let length = (zero_bytes - at).min(1 << 20);
            let mut buf = AlignedBuf::zeroed(length as usize)?;
            if at == 0 {
                header
                    .encode(&mut buf)
                    .ok_or_else(|| io::Error::other("header buffer too small"))?;
            }
            write_store(devices, snapshot, at, &buf, false)?;
            at += length;
        }
        sync_store(devices, snapshot)
    }

    /// Reads the header and every record of a snapshot's store (blocking).
    pub fn load(devices: &DeviceTable, snapshot: SnapshotRecord) -> io::Result<CowStore> {
        let layout = layout_of(&snapshot)?;
        let mut block = AlignedBuf::zeroed(HEADER_BYTES as usize)?;
        read_store(devices, &snapshot, 0, &mut block)?;
        CowHeader::decode(&block, snapshot.volume_id, snapshot.id).map_err(|e| {
            invalid(format!(
                "snapshot {}: COW store header: {e:?}",
                snapshot.name
            ))
        })?;
        let mut store = CowStore {
            layout,
            slots: HashMap::new(),
            records: Vec::new(),
            open_sector: RecordSector::empty(0),
            fill_mark: 0,
            snapshot,
        };
        store.scan(devices, 0)?;
        // A restarted server does not warn again about what it warned of before.
        store.crossed_fill_mark();
        Ok(store)
    }

    /// Reads back the records appended since this store was loaded or last absorbed, by a
    /// client that preserves chunks itself (the map's COW store section): they continue the
    /// dense sequence from the open sector (blocking).
    pub fn absorb(&mut self, devices: &DeviceTable) -> io::Result<()> {
        self.scan(devices, u64::from(self.open_sector.index))
    }

    /// Reads record sectors from `first_sector` on, keeping the records not known yet; the
    /// first sector not full ends the list.
    fn scan(&mut self, devices: &DeviceTable, first_sector: u64) -> io::Result<()> {
        let layout = self.layout;
        // One piece when absorbing (the open sector is almost always the last one); up to
        // 1 MiB at a time when loading.
        let sectors_per_read: u64 = if first_sector == 0 { 2048 } else { 8 };
        let mut index = first_sector;
        while index < layout.record_sectors {
            let count = (layout.record_sectors - index).min(sectors_per_read);
            let first_byte = HEADER_BYTES + index * SECTOR_BYTES as u64;
            let start = first_byte - first_byte % DIRECT_ALIGN as u64;
            let end =
                (first_byte + count * SECTOR_BYTES as u64).next_multiple_of(DIRECT_ALIGN as u64);
            let mut buf = AlignedBuf::zeroed((end - start) as usize)?;
            read_store(devices, &self.snapshot, start, &mut buf)?;
            for i in 0..count {
                let at = (first_byte - start) as usize + i as usize * SECTOR_BYTES;
                let mut bytes = [0u8; SECTOR_BYTES];
                bytes.copy_from_slice(&buf[at..at + SECTOR_BYTES]);
                let sector_index = u32::try_from(index + i)
                    .map_err(|_| invalid("record area too large".into()))?;
                let sector =
                    match RecordSector::decode(&bytes, sector_index, &layout, self.snapshot.id) {
                        Ok(sector) => sector,
                        // A sector torn by a crash holds no record that was ever acknowledged.
                        Err(_) => RecordSector::empty(sector_index),
                    };
                // Records are dense in slot order: those not known yet come after the
                // known ones. A chunk's first record holds its point-in-time content: a
                // later one (a host that had not read the first before copying the chunk
                // again) may hold what a write put there since.
                for record in sector.records() {
                    if record.slot >= self.records.len() as u64 {
                        self.slots.entry(record.origin_chunk).or_insert(record.slot);
                        self.records.push(*record);
                    }
                }
                if (sector.count as usize) < RECORDS_PER_SECTOR {
                    self.open_sector = sector;
                    return Ok(());
                }
                self.open_sector = RecordSector::empty(sector_index.saturating_add(1));
            }
            index += count;
        }
        Ok(())
    }

    /// The highest of [`FILL_MARKS`] the use reached since the last call, if it reached one.
    pub fn crossed_fill_mark(&mut self) -> Option<u8> {
        let used = self.records.len() as u64 * 100;
        let reached = FILL_MARKS
            .iter()
            .copied()
            .filter(|mark| used >= u64::from(*mark) * self.layout.slots)
            .max()?;
        (reached > self.fill_mark).then(|| {
            self.fill_mark = reached;
            reached
        })
    }

    pub fn chunk_bytes(&self) -> u64 {
        u64::from(self.layout.chunk_bytes)
    }

    pub fn slot_of(&self, chunk: u64) -> Option<u64> {
        self.slots.get(&chunk).copied()
    }

    /// The chunks of the first `records` records, ascending.
    pub fn chunks(&self, records: usize) -> Vec<u64> {
        let mut chunks: Vec<u64> = self
            .records
            .iter()
            .take(records)
            .map(|r| r.origin_chunk)
            .collect();
        chunks.sort_unstable();
        chunks.dedup();
        chunks
    }

    /// The record sector the next record goes to: every one before it is full.
    pub fn open_sector(&self) -> u32 {
        self.open_sector.index
    }

    pub fn slots_used(&self) -> u64 {
        self.records.len() as u64
    }

    pub fn slots_total(&self) -> u64 {
        self.layout.slots
    }

    /// Keeps `old`, the content of origin chunk `chunk` before its first write since the
    /// snapshot: into the next slot, then its record, synced in that order, so once this
    /// returns the copy survives a crash and the origin may be written (blocking).
    pub fn preserve(
        &mut self,
        devices: &DeviceTable,
        chunk: u64,
        old: &[u8],
    ) -> Result<(), PreserveError> {
        let slot = self.records.len() as u64;
        if slot >= self.layout.slots {
            return Err(PreserveError::Full);
        }
        write_store(
            devices,
            &self.snapshot,
            self.layout.slot_offset(slot),
            old,
            false,
        )
        .and_then(|()| sync_store(devices, &self.snapshot))
        .map_err(PreserveError::Io)?;
        let record = Record {
            origin_chunk: chunk,
            slot,
        };
        let mut sector = self.open_sector;
        if !sector.push(record) {
            return Err(PreserveError::Io(io::Error::other(
                "record sector overflow",
            )));
        }
        let mut bytes = [0u8; SECTOR_BYTES];
        sector.encode(self.snapshot.id, &mut bytes);
        write_store(
            devices,
            &self.snapshot,
            self.layout.record_sector_offset(slot),
            &bytes,
            true,
        )
        .map_err(PreserveError::Io)?;
        self.open_sector = if sector.count as usize == RECORDS_PER_SECTOR {
            RecordSector::empty(sector.index.saturating_add(1))
        } else {
            sector
        };
        self.slots.insert(chunk, slot);
        self.records.push(record);
        Ok(())
    }

    pub fn layout(&self) -> CowLayout {
        self.layout
    }
}

/// Reads `buf.len()` bytes at `offset_in_chunk` of the content kept in `slot` of
/// `snapshot`'s store laid out as `layout` (blocking). A slot's content never changes once
/// its record exists, so this needs no lock.
pub fn read_slot(
    devices: &DeviceTable,
    snapshot: &SnapshotRecord,
    layout: CowLayout,
    slot: u64,
    offset_in_chunk: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    read_store(
        devices,
        snapshot,
        layout.slot_offset(slot) + offset_in_chunk,
        buf,
    )
}

fn layout_of(snapshot: &SnapshotRecord) -> io::Result<CowLayout> {
    snapshot.layout().ok_or_else(|| {
        invalid(format!(
            "snapshot {}: a store of {} bytes holds no {}-byte chunk",
            snapshot.name, snapshot.store_bytes, snapshot.chunk_bytes
        ))
    })
}

fn store_pieces(
    snapshot: &SnapshotRecord,
    offset: u64,
    length: usize,
) -> io::Result<Vec<crate::device::Piece>> {
    plan(&snapshot.store_extents, offset, length as u64).ok_or_else(|| {
        invalid(format!(
            "snapshot {}: {offset}+{length} is outside its COW store",
            snapshot.name
        ))
    })
}

fn read_store(
    devices: &DeviceTable,
    snapshot: &SnapshotRecord,
    offset: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let pieces = store_pieces(snapshot, offset, buf.len())?;
    devices.read(&pieces, buf)
}

fn write_store(
    devices: &DeviceTable,
    snapshot: &SnapshotRecord,
    offset: u64,
    buf: &[u8],
    sync: bool,
) -> io::Result<()> {
    let pieces = store_pieces(snapshot, offset, buf.len())?;
    devices.write(&pieces, buf, sync)
}

fn sync_store(devices: &DeviceTable, snapshot: &SnapshotRecord) -> io::Result<()> {
    devices.flush(&snapshot.store_extents)
}
