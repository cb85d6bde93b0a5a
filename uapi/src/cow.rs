//! The on-disk format of a snapshot's copy-on-write (COW) store.
//!
//! A snapshot keeps the point-in-time content of every chunk of its volume that was written
//! after it was taken: before the first such write, the chunk's old content is copied into a
//! free *slot* of the COW store and a *record* (origin chunk, slot) is made durable; only then
//! is the write let through. The records are the ground truth of a snapshot: which chunks
//! changed since it was taken, and where their old content is.
//!
//! Layout of a store of `store_bytes` (the concatenation of its extents):
//! - byte 0: the header ([`CowHeader`], one 4 KiB block);
//! - from byte [`HEADER_BYTES`]: `record_sectors` sectors of 512 bytes, each holding up to
//!   [`RECORDS_PER_SECTOR`] records. Records are appended in slot order, so record `i`
//!   describes slot `i` and lives in sector `i / RECORDS_PER_SECTOR`. Appending rewrites one
//!   sector only: a sector write is atomic on the devices this runs on (the assumption
//!   dm-snapshot and the file systems make), so a crash never loses a record made durable
//!   before; a sector that does not check out ends the list;
//! - from `data_start` (chunk-aligned): the slots, one chunk each.

/// First bytes of a COW store.
pub const COW_MAGIC: [u8; 8] = *b"SANBLKCW";
pub const COW_VERSION: u32 = 1;
/// Size of the header block.
pub const HEADER_BYTES: u64 = 4096;
/// Size of a record sector.
pub const SECTOR_BYTES: usize = 512;
/// Bytes of one record: origin chunk and slot, little-endian u64 each.
pub const RECORD_BYTES: usize = 16;
/// Bytes before the records in a sector: magic, sector index, record count, checksum.
const SECTOR_HEADER_BYTES: usize = 16;
pub const RECORDS_PER_SECTOR: usize = (SECTOR_BYTES - SECTOR_HEADER_BYTES) / RECORD_BYTES;
const SECTOR_MAGIC: u32 = 0x5342_4352;
// Chunk sizes a snapshot may use: the map's copy-on-write tracking shares them (and the
// module, which includes map.rs alone, sees them there).
pub use crate::map::{valid_chunk_bytes, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES};
pub const DEFAULT_CHUNK_BYTES: u32 = 64 << 10;
/// Bytes of the encoded header (the rest of the header block is zero).
const HEADER_ENCODED_BYTES: usize = 64;

/// Why a COW store's bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CowError {
    /// Not a COW store, or of another version.
    BadMagic,
    /// A field is out of range or the checksum does not match.
    Corrupt,
    /// Not this store (another volume or snapshot).
    Foreign,
}

/// Where everything lies in a store of a given size and chunk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CowLayout {
    pub chunk_bytes: u32,
    pub slots: u64,
    pub record_sectors: u64,
    pub data_start: u64,
}

impl CowLayout {
    /// The layout with the most slots that fits `store_bytes`; `None` for a bad chunk size or
    /// a store too small for one slot.
    pub fn new(store_bytes: u64, chunk_bytes: u32) -> Option<CowLayout> {
        if !valid_chunk_bytes(chunk_bytes) {
            return None;
        }
        let chunk = u64::from(chunk_bytes);
        // Each slot costs its chunk plus a record; the data area starts chunk-aligned.
        let per_slot = chunk + RECORD_BYTES as u64 + 1;
        let mut slots = store_bytes.checked_sub(HEADER_BYTES)? / per_slot;
        while slots > 0 {
            let layout = CowLayout::with_slots(chunk_bytes, slots);
            if layout.end() <= store_bytes {
                return Some(layout);
            }
            slots -= 1;
        }
        None
    }

    /// The smallest store that holds one chunk of `chunk_bytes` (a valid chunk size): the
    /// header, a record sector, and the slot, which starts chunk-aligned.
    pub fn min_store_bytes(chunk_bytes: u32) -> u64 {
        CowLayout::with_slots(chunk_bytes, 1).end()
    }

    fn with_slots(chunk_bytes: u32, slots: u64) -> CowLayout {
        let record_sectors = slots.div_ceil(RECORDS_PER_SECTOR as u64);
        let records_end = HEADER_BYTES + record_sectors * SECTOR_BYTES as u64;
        CowLayout {
            chunk_bytes,
            slots,
            record_sectors,
            data_start: records_end.next_multiple_of(u64::from(chunk_bytes)),
        }
    }

    /// First byte past the last slot.
    pub fn end(&self) -> u64 {
        self.data_start + self.slots * u64::from(self.chunk_bytes)
    }

    /// Store offset of slot `slot`'s data.
    pub fn slot_offset(&self, slot: u64) -> u64 {
        self.data_start + slot * u64::from(self.chunk_bytes)
    }

    /// Store offset of the sector holding the record of slot `slot`.
    pub fn record_sector_offset(&self, slot: u64) -> u64 {
        HEADER_BYTES + (slot / RECORDS_PER_SECTOR as u64) * SECTOR_BYTES as u64
    }
}

/// The header block: what the store belongs to and how it is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CowHeader {
    pub volume_id: u64,
    pub snapshot_id: u64,
    /// Size of the volume when the snapshot was taken.
    pub origin_bytes: u64,
    pub store_bytes: u64,
    pub chunk_bytes: u32,
}

impl CowHeader {
    /// The layout the header describes.
    pub fn layout(&self) -> Option<CowLayout> {
        CowLayout::new(self.store_bytes, self.chunk_bytes)
    }

    /// Writes the header into the first bytes of `block` (at least 64 bytes; the caller
    /// zeroes the rest of the header block).
    pub fn encode(&self, block: &mut [u8]) -> Option<()> {
        let out = block.get_mut(..HEADER_ENCODED_BYTES)?;
        out.fill(0);
        out[0..8].copy_from_slice(&COW_MAGIC);
        out[8..12].copy_from_slice(&COW_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.chunk_bytes.to_le_bytes());
        out[16..24].copy_from_slice(&self.volume_id.to_le_bytes());
        out[24..32].copy_from_slice(&self.snapshot_id.to_le_bytes());
        out[32..40].copy_from_slice(&self.origin_bytes.to_le_bytes());
        out[40..48].copy_from_slice(&self.store_bytes.to_le_bytes());
        let checksum = crc32c(&out[..60]);
        out[60..64].copy_from_slice(&checksum.to_le_bytes());
        Some(())
    }

    /// Reads a header, checking it belongs to `volume_id`'s snapshot `snapshot_id`.
    pub fn decode(block: &[u8], volume_id: u64, snapshot_id: u64) -> Result<CowHeader, CowError> {
        let bytes = block.get(..HEADER_ENCODED_BYTES).ok_or(CowError::Corrupt)?;
        if bytes[0..8] != COW_MAGIC || le_u32(bytes, 8) != COW_VERSION {
            return Err(CowError::BadMagic);
        }
        if le_u32(bytes, 60) != crc32c(&bytes[..60]) {
            return Err(CowError::Corrupt);
        }
        let header = CowHeader {
            chunk_bytes: le_u32(bytes, 12),
            volume_id: le_u64(bytes, 16),
            snapshot_id: le_u64(bytes, 24),
            origin_bytes: le_u64(bytes, 32),
            store_bytes: le_u64(bytes, 40),
        };
        if header.layout().is_none() {
            return Err(CowError::Corrupt);
        }
        if header.volume_id != volume_id || header.snapshot_id != snapshot_id {
            return Err(CowError::Foreign);
        }
        Ok(header)
    }
}

/// One copied chunk: the origin chunk number and the slot holding its old content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Record {
    pub origin_chunk: u64,
    pub slot: u64,
}

/// One record sector: up to [`RECORDS_PER_SECTOR`] records of consecutive slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordSector {
    /// Position of the sector in the record area.
    pub index: u32,
    pub count: u32,
    pub records: [Record; RECORDS_PER_SECTOR],
}

impl RecordSector {
    pub fn empty(index: u32) -> RecordSector {
        RecordSector {
            index,
            count: 0,
            records: [Record::default(); RECORDS_PER_SECTOR],
        }
    }

    /// The valid records.
    pub fn records(&self) -> &[Record] {
        &self.records[..(self.count as usize).min(RECORDS_PER_SECTOR)]
    }

    /// Adds a record; false if the sector is full.
    pub fn push(&mut self, record: Record) -> bool {
        let Some(free) = self.records.get_mut(self.count as usize) else {
            return false;
        };
        *free = record;
        self.count += 1;
        true
    }

    /// Encodes the sector of snapshot `snapshot_id` (part of the checksum, so a sector left
    /// by an earlier store in the same space never passes for one of this store).
    pub fn encode(&self, snapshot_id: u64, out: &mut [u8; SECTOR_BYTES]) {
        out.fill(0);
        out[0..4].copy_from_slice(&SECTOR_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.index.to_le_bytes());
        out[8..12].copy_from_slice(&self.count.to_le_bytes());
        for (i, record) in self.records().iter().enumerate() {
            let at = SECTOR_HEADER_BYTES + i * RECORD_BYTES;
            out[at..at + 8].copy_from_slice(&record.origin_chunk.to_le_bytes());
            out[at + 8..at + 16].copy_from_slice(&record.slot.to_le_bytes());
        }
        let checksum = sector_checksum(snapshot_id, out);
        out[12..16].copy_from_slice(&checksum.to_le_bytes());
    }

    /// Reads sector `index` of a store of `layout`. A sector never written (all zero) is
    /// empty; one whose magic, index, checksum or records do not check out is `Corrupt` (a
    /// torn or foreign write: the list ends before it).
    pub fn decode(
        sector: &[u8; SECTOR_BYTES],
        index: u32,
        layout: &CowLayout,
        snapshot_id: u64,
    ) -> Result<RecordSector, CowError> {
        if sector.iter().all(|&b| b == 0) {
            return Ok(RecordSector::empty(index));
        }
        if le_u32(sector, 0) != SECTOR_MAGIC
            || le_u32(sector, 4) != index
            || le_u32(sector, 12) != sector_checksum(snapshot_id, sector)
        {
            return Err(CowError::Corrupt);
        }
        let count = le_u32(sector, 8);
        if count as usize > RECORDS_PER_SECTOR {
            return Err(CowError::Corrupt);
        }
        let mut decoded = RecordSector::empty(index);
        let first_slot = u64::from(index) * RECORDS_PER_SECTOR as u64;
        for i in 0..count as usize {
            let at = SECTOR_HEADER_BYTES + i * RECORD_BYTES;
            let record = Record {
                origin_chunk: le_u64(sector, at),
                slot: le_u64(sector, at + 8),
            };
            // Records are appended in slot order; anything else is not ours.
            if record.slot != first_slot + i as u64 || record.slot >= layout.slots {
                return Err(CowError::Corrupt);
            }
            decoded.push(record);
        }
        Ok(decoded)
    }
}

fn sector_checksum(snapshot_id: u64, sector: &[u8; SECTOR_BYTES]) -> u32 {
    let mut copy = *sector;
    copy[12..16].fill(0);
    crc32c_extend(crc32c(&snapshot_id.to_le_bytes()), &copy)
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// CRC-32C (Castagnoli), the checksum of ext4 and btrfs metadata.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_extend(0, data)
}

/// The CRC-32C of the bytes whose CRC is `crc` followed by `data`.
pub fn crc32c_extend(crc: u32, data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = crc32c_table();
    let mut crc = !crc;
    for &byte in data {
        crc = TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn the_smallest_store_holds_one_chunk() {
        let mut chunk = MIN_CHUNK_BYTES;
        while chunk <= MAX_CHUNK_BYTES {
            let least = CowLayout::min_store_bytes(chunk);
            assert_eq!(CowLayout::new(least, chunk).map(|l| l.slots), Some(1));
            assert_eq!(CowLayout::new(least - 1, chunk), None);
            chunk *= 2;
        }
        assert_eq!(CowLayout::min_store_bytes(64 << 10), 128 << 10);
    }

    #[test]
    fn layouts_fit_their_store_and_use_it() {
        let layout = CowLayout::new(64 << 20, 64 << 10).expect("layout");
        assert!(layout.end() <= 64 << 20);
        assert_eq!(layout.data_start % (64 << 10), 0);
        assert!(layout.data_start >= HEADER_BYTES + layout.record_sectors * 512);
        // Nearly all of it holds data: one chunk of alignment and the records aside.
        assert!(layout.slots >= 1021, "{layout:?}");
        assert_eq!(CowLayout::new(4096, 4096), None);
        assert_eq!(CowLayout::new(64 << 20, 3000), None);
        assert_eq!(CowLayout::new(64 << 20, 2 << 20), None);
    }

    #[test]
    fn a_header_round_trips_and_refuses_another_snapshot() {
        let header = CowHeader {
            volume_id: 3,
            snapshot_id: 9,
            origin_bytes: 1 << 30,
            store_bytes: 64 << 20,
            chunk_bytes: 64 << 10,
        };
        let mut block = [0u8; 4096];
        header.encode(&mut block).expect("room");
        assert_eq!(CowHeader::decode(&block, 3, 9), Ok(header));
        assert_eq!(CowHeader::decode(&block, 3, 8), Err(CowError::Foreign));
        block[20] ^= 1;
        assert_eq!(CowHeader::decode(&block, 3, 9), Err(CowError::Corrupt));
        assert_eq!(
            CowHeader::decode(&[0u8; 4096], 3, 9),
            Err(CowError::BadMagic)
        );
    }

    proptest! {
        #[test]
        fn record_sectors_round_trip(index in 0u32..1000, count in 0usize..=RECORDS_PER_SECTOR, chunk in any::<u64>()) {
            let layout = CowLayout::new(1 << 40, 64 << 10).expect("layout");
            let mut sector = RecordSector::empty(index);
            let first = u64::from(index) * RECORDS_PER_SECTOR as u64;
            for i in 0..count {
                let record = Record { origin_chunk: chunk ^ i as u64, slot: first + i as u64 };
                prop_assert!(sector.push(record), "sector full");
            }
            let mut bytes = [0u8; SECTOR_BYTES];
            sector.encode(7, &mut bytes);
            prop_assert_eq!(RecordSector::decode(&bytes, index, &layout, 7), Ok(sector));
            // Another store's sector in the same place is not ours.
            prop_assert!(count == 0 || RecordSector::decode(&bytes, index, &layout, 8).is_err());
        }

        /// Any corruption of a written sector is detected, never read as other records.
        #[test]
        fn a_damaged_sector_is_refused(byte in 0usize..SECTOR_BYTES, flip in 1u8..=255) {
            let layout = CowLayout::new(1 << 30, 64 << 10).expect("layout");
            let mut sector = RecordSector::empty(2);
            for i in 0..5u64 {
                sector.push(Record { origin_chunk: 100 + i, slot: 2 * RECORDS_PER_SECTOR as u64 + i });
            }
            let mut bytes = [0u8; SECTOR_BYTES];
            sector.encode(7, &mut bytes);
            bytes[byte] ^= flip;
            let decoded = RecordSector::decode(&bytes, 2, &layout, 7);
            prop_assert!(decoded.is_err(), "damage not detected: {:?}", decoded);
        }
    }
}
