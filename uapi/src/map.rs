//! Binary encoding of a volume map, as the agent hands it to the kernel module, and the
//! lookup the module does for every bio.
//!
//! Layout (little-endian):
//! - header, [`HEADER_LEN`] bytes: magic "SBLM", version u16, flags u16, volume id u64,
//!   epoch u64, size in bytes u64, block size u32, lease in ms u32, device count u32,
//!   extent count u32, copy-on-write generation u64, copy-on-write chunk size in bytes u32,
//!   COW store section count u32 (zero without [`MAP_FLAG_COW_STORE`], the only flag);
//! - device table, [`DEVICE_LEN`] bytes each: device UUID [16], usable size in bytes u64
//!   (the device must be at least this large);
//! - extent table, [`EXTENT_LEN`] bytes each, sorted, contiguous from 0 to the volume size:
//!   volume offset u64, length u64, kind u8 ([`ExtentKind`]), member count u8, flags u16
//!   (`EXTENT_*`; any other bit is refused), stripe unit in bytes u32, then [`MAX_MEMBERS`]
//!   members of (device index u32, reserved u32, device offset u64);
//! - with [`MAP_FLAG_COW_STORE`]: 1..=[`MAX_COW_STORES`] COW store sections, one after the
//!   other, each [`COW_STORE_LEN`] bytes (snapshot id u64, store size in bytes u64, record
//!   sector to start scanning at u32, store extent count u32, the store's chunk size in bytes
//!   u32 (0: the header's), reserved (zero) u32), then
//!   [`STORE_EXTENT_LEN`] bytes per store extent: device index u32, reserved u32, device
//!   offset u64, length u64, in store order. The first section is the newest snapshot's (its
//!   id is the header's copy-on-write generation), the others older ones' (smaller ids).
//!
//! A mirrored extent's members are replicas holding the same data; a striped extent's members
//! take `stripe_unit` bytes in turn. A syncing extent ([`EXTENT_SYNCING`]) is being copied
//! by the server to a new place: it is read from its members as usual, but every write to it
//! goes through the server, which writes both places.
//!
//! A non-zero copy-on-write generation says the volume has active snapshots (see
//! [`MapHeader::cow_generation`]): the first write to each chunk goes through the server,
//! which preserves the chunk before writing it; once the server has acknowledged a write
//! covering a chunk, later writes to it go direct.
//!
//! The COW store sections say where each snapshot's store (format: `cow.rs`) lies on the
//! devices and its chunk size (a multiple of the map's, which is the smallest), so a client
//! may preserve chunks into them itself: append records to each store that does not hold the
//! chunk (of that store's size) yet, after the last record it finds (scanning from the given
//! record sector), each slot's data before its record, every record durable before the
//! origin write. The server reads such records back before anything that depends on them.

/// Magic of an encoded map.
pub const MAP_MAGIC: u32 = u32::from_le_bytes(*b"SBLM");
/// Encoding version.
pub const MAP_VERSION: u16 = 1;
/// Encoded header size.
pub const HEADER_LEN: usize = 64;
/// Encoded device record size.
pub const DEVICE_LEN: usize = 24;
/// Most members (replicas or stripes) of one extent.
pub const MAX_MEMBERS: usize = 4;
/// Encoded extent record size.
pub const EXTENT_LEN: usize = 24 + MAX_MEMBERS * 16;
/// Most devices one map may reference.
pub const MAX_DEVICES: u32 = 64;

/// Extent flag: the server is copying this extent to a new place. Reads go to its members
/// as usual; writes must go through the server (which serialises them with its copy and
/// writes the old place and the new one), never straight to the members.
pub const EXTENT_SYNCING: u16 = 1 << 0;
/// Every extent flag this encoding version defines; a map with any other bit is refused.
pub const EXTENT_KNOWN_FLAGS: u16 = EXTENT_SYNCING;

/// Header flag: COW store sections follow the extent table.
pub const MAP_FLAG_COW_STORE: u16 = 1 << 0;
/// Most COW store sections one map may carry (a volume's active snapshots).
pub const MAX_COW_STORES: u32 = 8;
/// Encoded COW store section size (before its extents).
pub const COW_STORE_LEN: usize = 32;
/// Encoded store extent size.
pub const STORE_EXTENT_LEN: usize = 24;
/// Most extents a COW store section may list.
pub const MAX_STORE_EXTENTS: u32 = 16;
/// Smallest store a section may describe: the store's header block.
const MIN_STORE_BYTES: u64 = 4096;

/// Chunk sizes a snapshot (and the map's copy-on-write tracking) may use: powers of two in
/// this range.
pub const MIN_CHUNK_BYTES: u32 = 4096;
pub const MAX_CHUNK_BYTES: u32 = 1 << 20;

/// Whether `chunk_bytes` is a chunk size a snapshot may use.
pub fn valid_chunk_bytes(chunk_bytes: u32) -> bool {
    chunk_bytes.is_power_of_two() && (MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_bytes)
}

/// How an extent's members hold its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExtentKind {
    /// Every member holds the whole extent (one member: linear; several: mirror).
    Replicated = 0,
    /// Members hold `stripe_unit` bytes in turn.
    Striped = 1,
}

/// One device a map references.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Device {
    /// UUID from the device's label.
    pub uuid: [u8; 16],
    /// Bytes of the device the map may address.
    pub size: u64,
}

/// One member of an extent: where (a share of) its data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Member {
    /// Index into the map's device table.
    pub device: u32,
    /// Byte offset on that device.
    pub offset: u64,
}

/// One extent of the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset in the volume.
    pub volume_offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Replicated or striped.
    pub kind: ExtentKind,
    /// Stripe unit in bytes (striped extents; 0 otherwise).
    pub stripe_unit: u32,
    /// Number of valid entries in `members`.
    pub member_count: u8,
    /// `EXTENT_*` flags.
    pub flags: u16,
    /// Members; only the first `member_count` are meaningful.
    pub members: [Member; MAX_MEMBERS],
}

impl Extent {
    /// The valid members.
    pub fn members(&self) -> &[Member] {
        &self.members[..self.member_count as usize]
    }

    /// Whether writes to this extent must go through the server ([`EXTENT_SYNCING`]).
    pub fn syncing(&self) -> bool {
        self.flags & EXTENT_SYNCING != 0
    }

    /// The first piece of an I/O of `length` bytes starting `within` bytes into this extent
    /// (`within` < `length` of the extent): its targets and how much of the I/O it covers.
    #[inline]
    pub fn piece(&self, within: u64, length: u64) -> Piece {
        let mut piece = Piece::EMPTY;
        piece.flags = self.flags;
        match self.kind {
            ExtentKind::Replicated => {
                piece.length = length.min(self.length - within);
                for (slot, member) in piece.targets.iter_mut().zip(self.members()) {
                    *slot = Target {
                        device: member.device,
                        offset: member.offset + within,
                    };
                }
                piece.target_count = self.member_count;
            }
            ExtentKind::Striped => {
                let unit = self.stripe_unit as u64;
                let count = self.member_count as u64;
                let chunk = within / unit;
                let member = self.members[(chunk % count) as usize];
                let member_offset = (chunk / count) * unit + within % unit;
                piece.length = length.min(unit - within % unit);
                piece.targets[0] = Target {
                    device: member.device,
                    offset: member.offset + member_offset,
                };
                piece.target_count = 1;
            }
        }
        piece
    }

    /// Bytes of each member's device this extent occupies.
    pub fn member_span(&self) -> u64 {
        match self.kind {
            ExtentKind::Replicated => self.length,
            ExtentKind::Striped => self.length / self.member_count.max(1) as u64,
        }
    }
}

/// A COW store section: the store of one of the volume's active snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCowStore {
    /// The snapshot (the first section's equals the header's `cow_generation`, the others'
    /// are smaller; part of each record sector's checksum).
    pub snapshot_id: u64,
    /// Size of the store: the sum of its extents.
    pub store_bytes: u64,
    /// The record sector a client starts looking for the end of the records at (every
    /// sector before it is full).
    pub scan_from_sector: u32,
    /// Entries in the store extent table.
    pub extent_count: u32,
    /// The store's chunk size: a power of two of at least the header's
    /// `cow_chunk_bytes`, at most [`MAX_CHUNK_BYTES`]; encoded as 0 when it is the header's.
    pub chunk_bytes: u32,
}

/// One piece of a COW store: `length` bytes at `offset` of device `device`, in store order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StoreExtent {
    /// Index into the map's device table.
    pub device: u32,
    pub offset: u64,
    pub length: u64,
}

/// Map header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapHeader {
    /// Volume identifier.
    pub volume_id: u64,
    /// Epoch; every change makes a new one.
    pub epoch: u64,
    /// Volume size in bytes.
    pub size: u64,
    /// Block size in bytes (logical block size of the block device).
    pub block_size: u32,
    /// Lease duration in milliseconds.
    pub lease_ms: u32,
    /// Entries in the device table.
    pub device_count: u32,
    /// Entries in the extent table.
    pub extent_count: u32,
    /// Non-zero while the volume has active snapshots: identifies their set (the newest
    /// snapshot's id), so a module keeps what it learnt about copied chunks across epochs
    /// of one set and forgets it when a snapshot is taken. A write to a chunk the server has
    /// not acknowledged a write to since the set began goes through the server (which
    /// copies the chunk to every snapshot's store first); later ones go direct.
    pub cow_generation: u64,
    /// Chunk size of that tracking (the smallest chunk of the active snapshots; a power of
    /// two in [`MIN_CHUNK_BYTES`]`..=`[`MAX_CHUNK_BYTES`]); 0 without snapshots.
    pub cow_chunk_bytes: u32,
}

/// Why a map was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// Buffer shorter than its tables, or longer.
    BadLength,
    /// Not a map.
    BadMagic,
    /// Unknown encoding version or flags, or non-zero reserved bytes.
    BadVersion,
    /// Block size not a power of two in 512..=65536.
    BadBlockSize,
    /// Zero or too many devices or extents, or a duplicate device.
    BadCounts,
    /// Extents not sorted and contiguous from 0 to the volume size (gap or overlap).
    NotContiguous,
    /// An offset or length not a multiple of the block size, or an extent of length 0.
    Misaligned,
    /// Arithmetic overflow in offsets or lengths.
    Overflow,
    /// Member count, kind or stripe unit invalid.
    BadMembers,
    /// A member refers to a device not in the table.
    UnknownDevice,
    /// A member lies beyond the end of its device.
    BeyondDevice,
    /// Two replicas of a mirror on the same device.
    ReplicasShareDevice,
    /// Two extents' members overlap on one device.
    OverlappingSpace,
    /// An extent flag bit this version does not define.
    UnknownExtentFlags,
    /// Copy-on-write chunk size invalid, or given without a generation (or the reverse).
    BadCowChunk,
    /// COW store sections invalid: none or too many, not for the map's snapshot set, two for
    /// one snapshot, no or too many extents, extents misaligned, beyond their device,
    /// overlapping, or not adding up to the store.
    BadCowStore,
}

impl MapError {
    /// Human-readable reason (also used as the netlink extack message).
    pub fn message(self) -> &'static str {
        match self {
            MapError::BadLength => "map length does not match its tables",
            MapError::BadMagic => "not a sanblk map (bad magic)",
            MapError::BadVersion => "unsupported map version, flags or reserved bytes",
            MapError::BadBlockSize => "map block size invalid",
            MapError::BadCounts => "map device or extent count invalid, or duplicate device",
            MapError::NotContiguous => "map extents overlap or leave gaps",
            MapError::Misaligned => "map offset or length not block aligned",
            MapError::Overflow => "map offsets overflow",
            MapError::BadMembers => "map extent members invalid",
            MapError::UnknownDevice => "map extent refers to an unknown device",
            MapError::BeyondDevice => "map extent lies beyond the end of its device",
            MapError::ReplicasShareDevice => "mirror replicas on the same device",
            MapError::OverlappingSpace => "map extents overlap on a device",
            MapError::UnknownExtentFlags => "map extent has unknown flags",
            MapError::BadCowChunk => "map copy-on-write chunk size invalid",
            MapError::BadCowStore => "map COW store section invalid",
        }
    }
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(raw)
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Encoded size of a map with these table sizes.
pub const fn encoded_len(device_count: usize, extent_count: usize) -> usize {
    HEADER_LEN + device_count * DEVICE_LEN + extent_count * EXTENT_LEN
}

/// A COW store section to encode and its extents (the section's `extent_count` is taken
/// from the slice).
pub type StoreSection<'a> = (MapCowStore, &'a [StoreExtent]);

/// Encoded size of a map with these table sizes and COW store sections.
pub fn encoded_len_with_stores(
    device_count: usize,
    extent_count: usize,
    stores: &[StoreSection<'_>],
) -> usize {
    stores.iter().fold(
        encoded_len(device_count, extent_count),
        |len, (_, extents)| len + COW_STORE_LEN + extents.len() * STORE_EXTENT_LEN,
    )
}

/// Encodes a map without COW store sections into `out`, which must be exactly
/// [`encoded_len`] bytes. The result is not validated here: [`MapView::parse`] is the single
/// validator, on both sides.
pub fn encode(
    header: &MapHeader,
    devices: &[Device],
    extents: &[Extent],
    out: &mut [u8],
) -> Result<(), MapError> {
    encode_with_stores(header, devices, extents, &[], out)
}

/// Encodes a map with the COW store sections `stores` (none: no section, no flag) into
/// `out`, which must be exactly [`encoded_len_with_stores`] bytes. Not validated here either.
pub fn encode_with_stores(
    header: &MapHeader,
    devices: &[Device],
    extents: &[Extent],
    stores: &[StoreSection<'_>],
    out: &mut [u8],
) -> Result<(), MapError> {
    if out.len() != encoded_len_with_stores(devices.len(), extents.len(), stores) {
        return Err(MapError::BadLength);
    }
    out.fill(0);
    put_u32(out, 0, MAP_MAGIC);
    put_u16(out, 4, MAP_VERSION);
    if !stores.is_empty() {
        put_u16(out, 6, MAP_FLAG_COW_STORE);
        put_u32(out, 60, stores.len() as u32);
    }
    put_u64(out, 8, header.volume_id);
    put_u64(out, 16, header.epoch);
    put_u64(out, 24, header.size);
    put_u32(out, 32, header.block_size);
    put_u32(out, 36, header.lease_ms);
    put_u32(out, 40, devices.len() as u32);
    put_u32(out, 44, extents.len() as u32);
    put_u64(out, 48, header.cow_generation);
    put_u32(out, 56, header.cow_chunk_bytes);
    for (i, device) in devices.iter().enumerate() {
        let at = HEADER_LEN + i * DEVICE_LEN;
        out[at..at + 16].copy_from_slice(&device.uuid);
        put_u64(out, at + 16, device.size);
    }
    let table = HEADER_LEN + devices.len() * DEVICE_LEN;
    for (i, extent) in extents.iter().enumerate() {
        let at = table + i * EXTENT_LEN;
        put_u64(out, at, extent.volume_offset);
        put_u64(out, at + 8, extent.length);
        out[at + 16] = extent.kind as u8;
        out[at + 17] = extent.member_count;
        put_u16(out, at + 18, extent.flags);
        put_u32(out, at + 20, extent.stripe_unit);
        for (m, member) in extent.members.iter().enumerate() {
            let mat = at + 24 + m * 16;
            put_u32(out, mat, member.device);
            put_u64(out, mat + 8, member.offset);
        }
    }
    let mut at = encoded_len(devices.len(), extents.len());
    for (section, store_extents) in stores {
        put_u64(out, at, section.snapshot_id);
        put_u64(out, at + 8, section.store_bytes);
        put_u32(out, at + 16, section.scan_from_sector);
        put_u32(out, at + 20, store_extents.len() as u32);
        let own_chunk = match section.chunk_bytes == header.cow_chunk_bytes {
            true => 0,
            false => section.chunk_bytes,
        };
        put_u32(out, at + 24, own_chunk);
        at += COW_STORE_LEN;
        for extent in store_extents.iter() {
            put_u32(out, at, extent.device);
            put_u64(out, at + 8, extent.offset);
            put_u64(out, at + 16, extent.length);
            at += STORE_EXTENT_LEN;
        }
    }
    Ok(())
}

/// The chunks of `chunk_bytes` (a power of two) that `[offset, offset + length)` touches, as
/// `first..=last` indexes; `None` for an empty or overflowing range.
pub fn chunks_touched(offset: u64, length: u64, chunk_bytes: u32) -> Option<(u64, u64)> {
    if length == 0 || chunk_bytes == 0 {
        return None;
    }
    let shift = chunk_bytes.trailing_zeros();
    let last_byte = offset.checked_add(length - 1)?;
    Some((offset >> shift, last_byte >> shift))
}

/// Where one piece of an I/O goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Device table index.
    pub device: u32,
    /// Byte offset on the device.
    pub offset: u64,
}

/// The mapping of the longest prefix of an I/O that stays on one set of targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Bytes of the I/O this piece covers (never crosses an extent or stripe-unit boundary).
    pub length: u64,
    /// Number of valid entries in `targets` (replicas: all of them; stripes: one).
    pub target_count: u8,
    /// The `EXTENT_*` flags of the extent the piece lies in (copied as they are: the lookup
    /// costs one more load and store).
    pub flags: u16,
    /// Targets; a write goes to all of them, a read to any one.
    pub targets: [Target; MAX_MEMBERS],
}

impl Piece {
    /// No bytes, no targets: what an empty PREFLUSH maps to, and where a lookup starts.
    pub const EMPTY: Piece = Piece {
        length: 0,
        target_count: 0,
        flags: 0,
        targets: [Target {
            device: 0,
            offset: 0,
        }; MAX_MEMBERS],
    };

    /// Whether the piece's extent is syncing ([`EXTENT_SYNCING`]): a write to it must go
    /// through the server.
    #[inline]
    pub fn syncing(&self) -> bool {
        self.flags & EXTENT_SYNCING != 0
    }
}

/// A validated, encoded map; lookups read the encoded tables directly.
#[derive(Clone, Copy, Debug)]
pub struct MapView<'a> {
    bytes: &'a [u8],
    header: MapHeader,
    /// COW store sections after the extent table.
    store_count: u32,
}

impl<'a> MapView<'a> {
    /// Validates an encoded map completely (see [`MapError`] for what is checked).
    pub fn parse(bytes: &'a [u8]) -> Result<MapView<'a>, MapError> {
        if bytes.len() < HEADER_LEN {
            return Err(MapError::BadLength);
        }
        if get_u32(bytes, 0) != MAP_MAGIC {
            return Err(MapError::BadMagic);
        }
        let flags = get_u16(bytes, 6);
        let store_count = get_u32(bytes, 60);
        if get_u16(bytes, 4) != MAP_VERSION
            || flags & !MAP_FLAG_COW_STORE != 0
            || (flags & MAP_FLAG_COW_STORE == 0 && store_count != 0)
        {
            return Err(MapError::BadVersion);
        }
        let header = MapHeader {
            volume_id: get_u64(bytes, 8),
            epoch: get_u64(bytes, 16),
            size: get_u64(bytes, 24),
            block_size: get_u32(bytes, 32),
            lease_ms: get_u32(bytes, 36),
            device_count: get_u32(bytes, 40),
            extent_count: get_u32(bytes, 44),
            cow_generation: get_u64(bytes, 48),
            cow_chunk_bytes: get_u32(bytes, 56),
        };
        if !header.block_size.is_power_of_two() || !(512..=65536).contains(&header.block_size) {
            return Err(MapError::BadBlockSize);
        }
        let cow_valid = if header.cow_generation == 0 {
            header.cow_chunk_bytes == 0
        } else {
            valid_chunk_bytes(header.cow_chunk_bytes) && header.cow_chunk_bytes >= header.block_size
        };
        if !cow_valid {
            return Err(MapError::BadCowChunk);
        }
        if header.device_count == 0
            || header.device_count > MAX_DEVICES
            || header.extent_count == 0
            || header.extent_count as usize > bytes.len() / EXTENT_LEN
        {
            return Err(MapError::BadCounts);
        }
        let tables_end = encoded_len(header.device_count as usize, header.extent_count as usize);
        if flags & MAP_FLAG_COW_STORE != 0 && !(1..=MAX_COW_STORES).contains(&store_count) {
            return Err(MapError::BadCowStore);
        }
        // Each section's extent count says where the next one starts.
        let mut expected = tables_end;
        for _ in 0..store_count {
            if bytes.len() < expected + COW_STORE_LEN {
                return Err(MapError::BadLength);
            }
            let extent_count = get_u32(bytes, expected + 20);
            if extent_count == 0 || extent_count > MAX_STORE_EXTENTS {
                return Err(MapError::BadCowStore);
            }
            expected += COW_STORE_LEN + extent_count as usize * STORE_EXTENT_LEN;
        }
        if bytes.len() != expected {
            return Err(MapError::BadLength);
        }
        let view = MapView {
            bytes,
            header,
            store_count,
        };
        view.validate()?;
        for index in 0..store_count {
            view.validate_store(index)?;
        }
        Ok(view)
    }

    /// Wraps bytes that [`MapView::parse`] accepted before and that were kept unchanged,
    /// without validating them again (the per-I/O lookup path). Only for such bytes: lookups
    /// on unvalidated bytes may index out of bounds and panic.
    pub fn assume_valid(bytes: &'a [u8]) -> MapView<'a> {
        let field = |at: usize| {
            if bytes.len() >= HEADER_LEN {
                get_u64(bytes, at)
            } else {
                0
            }
        };
        let word = |at: usize| {
            if bytes.len() >= HEADER_LEN {
                get_u32(bytes, at)
            } else {
                0
            }
        };
        MapView {
            bytes,
            header: MapHeader {
                volume_id: field(8),
                epoch: field(16),
                size: field(24),
                block_size: word(32),
                lease_ms: word(36),
                device_count: word(40),
                extent_count: word(44),
                cow_generation: field(48),
                cow_chunk_bytes: word(56),
            },
            // The per-I/O lookup never needs the COW store sections.
            store_count: 0,
        }
    }

    fn validate(&self) -> Result<(), MapError> {
        let block = self.header.block_size as u64;
        if self.header.size == 0 || !self.header.size.is_multiple_of(block) {
            return Err(MapError::Misaligned);
        }
        for i in 0..self.header.device_count {
            let device = self.device(i);
            if !device.size.is_multiple_of(block) {
                return Err(MapError::Misaligned);
            }
            for j in 0..i {
                if self.device(j).uuid == device.uuid {
                    return Err(MapError::BadCounts);
                }
            }
        }
        let mut expected_offset = 0u64;
        for i in 0..self.header.extent_count {
            let extent = self.extent_unchecked(i).ok_or(MapError::BadMembers)?;
            if extent.flags & !EXTENT_KNOWN_FLAGS != 0 {
                return Err(MapError::UnknownExtentFlags);
            }
            if extent.volume_offset != expected_offset {
                return Err(MapError::NotContiguous);
            }
            if extent.length == 0 || extent.length % block != 0 {
                return Err(MapError::Misaligned);
            }
            expected_offset = expected_offset
                .checked_add(extent.length)
                .ok_or(MapError::Overflow)?;
            self.validate_members(&extent)?;
        }
        if expected_offset != self.header.size {
            return Err(MapError::NotContiguous);
        }
        self.validate_no_shared_space()
    }

    fn validate_members(&self, extent: &Extent) -> Result<(), MapError> {
        let count = extent.member_count as usize;
        if count == 0 || count > MAX_MEMBERS {
            return Err(MapError::BadMembers);
        }
        let block = self.header.block_size as u64;
        match extent.kind {
            ExtentKind::Replicated => {
                if extent.stripe_unit != 0 {
                    return Err(MapError::BadMembers);
                }
            }
            ExtentKind::Striped => {
                let unit = extent.stripe_unit as u64;
                if count < 2
                    || unit == 0
                    || !unit.is_multiple_of(block)
                    || !extent.length.is_multiple_of(unit * count as u64)
                {
                    return Err(MapError::BadMembers);
                }
            }
        }
        let span = extent.member_span();
        for (m, member) in extent.members().iter().enumerate() {
            if member.device >= self.header.device_count {
                return Err(MapError::UnknownDevice);
            }
            if member.offset % block != 0 {
                return Err(MapError::Misaligned);
            }
            let end = member.offset.checked_add(span).ok_or(MapError::Overflow)?;
            if end > self.device(member.device).size {
                return Err(MapError::BeyondDevice);
            }
            if extent.members()[..m]
                .iter()
                .any(|other| other.device == member.device)
            {
                return Err(MapError::ReplicasShareDevice);
            }
        }
        if extent.members[count..]
            .iter()
            .any(|m| *m != Member::default())
        {
            return Err(MapError::BadVersion);
        }
        Ok(())
    }

    /// Quadratic, but maps are small (at most a few hundred extents) and parsed once per epoch.
    fn validate_no_shared_space(&self) -> Result<(), MapError> {
        for i in 0..self.header.extent_count {
            let a = self.extent(i);
            for j in 0..i {
                let b = self.extent(j);
                for ma in a.members() {
                    for mb in b.members() {
                        if ma.device == mb.device
                            && ma.offset < mb.offset + b.member_span()
                            && mb.offset < ma.offset + a.member_span()
                        {
                            return Err(MapError::OverlappingSpace);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// COW store section `index` and its extents: where a client may preserve chunks itself.
    fn validate_store(&self, index: u32) -> Result<(), MapError> {
        let (Some(section), Some(section_at)) = (self.cow_store(index), self.section_at(index))
        else {
            return Err(MapError::BadLength);
        };
        let block = u64::from(self.header.block_size);
        let generation = self.header.cow_generation;
        let for_the_set = match index {
            0 => section.snapshot_id == generation,
            _ => section.snapshot_id != 0 && section.snapshot_id < generation,
        };
        if generation == 0
            || !for_the_set
            || (0..index)
                .any(|i| self.cow_store(i).map(|s| s.snapshot_id) == Some(section.snapshot_id))
            || section.store_bytes < MIN_STORE_BYTES
            || !section.store_bytes.is_multiple_of(block)
        {
            return Err(MapError::BadCowStore);
        }
        if get_u32(self.bytes, section_at + 28) != 0
            || !valid_chunk_bytes(section.chunk_bytes)
            || section.chunk_bytes < self.header.cow_chunk_bytes
        {
            return Err(MapError::BadCowStore);
        }
        let mut total = 0u64;
        for i in 0..section.extent_count {
            let extent = self.store_extent(index, i);
            let at = section_at + COW_STORE_LEN + i as usize * STORE_EXTENT_LEN;
            if get_u32(self.bytes, at + 4) != 0
                || extent.device >= self.header.device_count
                || extent.length == 0
                || !extent.offset.is_multiple_of(block)
                || !extent.length.is_multiple_of(block)
            {
                return Err(MapError::BadCowStore);
            }
            let end = extent
                .offset
                .checked_add(extent.length)
                .ok_or(MapError::Overflow)?;
            if end > self.device(extent.device).size {
                return Err(MapError::BadCowStore);
            }
            total = total.checked_add(extent.length).ok_or(MapError::Overflow)?;
            let overlaps = |device: u32, offset: u64, length: u64| {
                device == extent.device && offset < end && extent.offset < offset + length
            };
            // The extents before it, of this store and of the stores before it.
            for other_store in 0..=index {
                let before = match other_store == index {
                    true => i,
                    false => self.cow_store(other_store).map_or(0, |s| s.extent_count),
                };
                for j in 0..before {
                    let other = self.store_extent(other_store, j);
                    if overlaps(other.device, other.offset, other.length) {
                        return Err(MapError::OverlappingSpace);
                    }
                }
            }
            for j in 0..self.header.extent_count {
                let volume_extent = self.extent(j);
                let span = volume_extent.member_span();
                if volume_extent
                    .members()
                    .iter()
                    .any(|m| overlaps(m.device, m.offset, span))
                {
                    return Err(MapError::OverlappingSpace);
                }
            }
        }
        if total != section.store_bytes {
            return Err(MapError::BadCowStore);
        }
        Ok(())
    }

    /// Where COW store section `index` (< the section count) starts.
    fn section_at(&self, index: u32) -> Option<usize> {
        if index >= self.store_count {
            return None;
        }
        let mut at = encoded_len(
            self.header.device_count as usize,
            self.header.extent_count as usize,
        );
        for _ in 0..index {
            let extent_count = self
                .bytes
                .get(at..at + COW_STORE_LEN)
                .map(|b| get_u32(b, 20))?;
            at += COW_STORE_LEN + extent_count as usize * STORE_EXTENT_LEN;
        }
        Some(at)
    }

    /// Header fields.
    pub fn header(&self) -> &MapHeader {
        &self.header
    }

    /// How many COW store sections a parsed map has (0 to [`MAX_COW_STORES`]).
    pub fn cow_store_count(&self) -> u32 {
        self.store_count
    }

    /// COW store section `index` of a parsed map (0: the newest snapshot's), if it has one.
    pub fn cow_store(&self, index: u32) -> Option<MapCowStore> {
        let at = self.section_at(index)?;
        let b = self.bytes.get(at..at + COW_STORE_LEN)?;
        Some(MapCowStore {
            snapshot_id: get_u64(b, 0),
            store_bytes: get_u64(b, 8),
            scan_from_sector: get_u32(b, 16),
            extent_count: get_u32(b, 20),
            chunk_bytes: match get_u32(b, 24) {
                0 => self.header.cow_chunk_bytes,
                own => own,
            },
        })
    }

    /// Extent `index` (< its `extent_count`) of COW store section `store` of a parsed map.
    pub fn store_extent(&self, store: u32, index: u32) -> StoreExtent {
        let Some(section_at) = self.section_at(store) else {
            return StoreExtent::default();
        };
        let at = section_at + COW_STORE_LEN + index as usize * STORE_EXTENT_LEN;
        match self.bytes.get(at..at + STORE_EXTENT_LEN) {
            Some(b) => StoreExtent {
                device: get_u32(b, 0),
                offset: get_u64(b, 8),
                length: get_u64(b, 16),
            },
            None => StoreExtent::default(),
        }
    }

    /// Device `index` (< device_count).
    pub fn device(&self, index: u32) -> Device {
        let at = HEADER_LEN + index as usize * DEVICE_LEN;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&self.bytes[at..at + 16]);
        Device {
            uuid,
            size: get_u64(self.bytes, at + 16),
        }
    }

    fn extent_unchecked(&self, index: u32) -> Option<Extent> {
        let at = HEADER_LEN
            + self.header.device_count as usize * DEVICE_LEN
            + index as usize * EXTENT_LEN;
        let b = self.bytes;
        let kind = match b[at + 16] {
            0 => ExtentKind::Replicated,
            1 => ExtentKind::Striped,
            _ => return None,
        };
        let mut members = [Member::default(); MAX_MEMBERS];
        for (m, member) in members.iter_mut().enumerate() {
            let mat = at + 24 + m * 16;
            if get_u32(b, mat + 4) != 0 {
                return None;
            }
            *member = Member {
                device: get_u32(b, mat),
                offset: get_u64(b, mat + 8),
            };
        }
        Some(Extent {
            volume_offset: get_u64(b, at),
            length: get_u64(b, at + 8),
            kind,
            stripe_unit: get_u32(b, at + 20),
            member_count: b[at + 17],
            flags: get_u16(b, at + 18),
            members,
        })
    }

    /// Extent `index` (< extent_count) of a validated map.
    pub fn extent(&self, index: u32) -> Extent {
        // Every extent was decoded successfully during `parse`.
        self.extent_unchecked(index).unwrap_or(Extent {
            volume_offset: 0,
            length: 0,
            kind: ExtentKind::Replicated,
            stripe_unit: 0,
            member_count: 0,
            flags: 0,
            members: [Member::default(); MAX_MEMBERS],
        })
    }

    /// Maps the start of an I/O of `length` bytes at volume `offset`: see [`piece_at`].
    pub fn map(&self, offset: u64, length: u64) -> Option<Piece> {
        piece_at(
            self.header.extent_count,
            |i| self.extent(i),
            self.header.size,
            offset,
            length,
        )
    }
}

/// Maps the start of an I/O of `length` bytes at volume `offset` of a `size`-byte volume: the
/// targets of its first piece and that piece's length. `extent_at(i)` gives extent `i` of
/// `count` (by value or by reference), sorted and contiguous from 0 to `size` (as validation
/// guarantees); the one holding `offset` is found by binary search. `None` if the I/O starts beyond the volume. Shared by
/// [`MapView::map`] and the kernel module's per-bio lookup over extents it decoded once.
#[inline]
pub fn piece_at<E: core::borrow::Borrow<Extent>>(
    count: u32,
    extent_at: impl Fn(u32) -> E,
    size: u64,
    offset: u64,
    length: u64,
) -> Option<Piece> {
    if offset >= size || count == 0 {
        return None;
    }
    let (mut low, mut high) = (0u32, count);
    while low + 1 < high {
        let mid = low + (high - low) / 2;
        if extent_at(mid).borrow().volume_offset <= offset {
            low = mid;
        } else {
            high = mid;
        }
    }
    let extent = extent_at(low);
    let extent = extent.borrow();
    Some(extent.piece(offset - extent.volume_offset, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn device(n: u8, size: u64) -> Device {
        Device {
            uuid: [n; 16],
            size,
        }
    }

    fn replicated(volume_offset: u64, length: u64, members: &[(u32, u64)]) -> Extent {
        let mut m = [Member::default(); MAX_MEMBERS];
        for (slot, (device, offset)) in m.iter_mut().zip(members) {
            *slot = Member {
                device: *device,
                offset: *offset,
            };
        }
        Extent {
            volume_offset,
            length,
            kind: ExtentKind::Replicated,
            stripe_unit: 0,
            member_count: members.len() as u8,
            flags: 0,
            members: m,
        }
    }

    fn header(size: u64, devices: usize, extents: usize) -> MapHeader {
        MapHeader {
            volume_id: 9,
            epoch: 3,
            size,
            block_size: 4096,
            lease_ms: 30_000,
            device_count: devices as u32,
            extent_count: extents as u32,
            cow_generation: 0,
            cow_chunk_bytes: 0,
        }
    }

    fn encode_vec(h: &MapHeader, d: &[Device], e: &[Extent]) -> [u8; 4096] {
        let mut buf = [0u8; 4096];
        let len = encoded_len(d.len(), e.len());
        encode(h, d, e, &mut buf[..len]).expect("encode");
        buf
    }

    fn parse_err(h: &MapHeader, d: &[Device], e: &[Extent]) -> MapError {
        let buf = encode_vec(h, d, e);
        MapView::parse(&buf[..encoded_len(d.len(), e.len())]).expect_err("must be refused")
    }

    #[test]
    fn linear_map_round_trips_and_maps_across_extents() {
        let devices = [device(1, 64 * MIB), device(2, 64 * MIB)];
        let extents = [
            replicated(0, 4 * MIB, &[(0, MIB)]),
            replicated(4 * MIB, 4 * MIB, &[(1, 2 * MIB)]),
        ];
        let h = header(8 * MIB, 2, 2);
        let buf = encode_vec(&h, &devices, &extents);
        let view = MapView::parse(&buf[..encoded_len(2, 2)]).expect("valid");
        assert_eq!(*view.header(), h);
        assert_eq!(view.extent(1), extents[1]);
        let piece = view.map(4 * MIB - 4096, 8192).expect("inside");
        assert_eq!(piece.length, 4096);
        assert_eq!(
            piece.targets[0],
            Target {
                device: 0,
                offset: MIB + 4 * MIB - 4096
            }
        );
        let piece = view.map(4 * MIB, 8192).expect("inside");
        assert_eq!(
            piece.targets[0],
            Target {
                device: 1,
                offset: 2 * MIB
            }
        );
        assert_eq!(view.map(8 * MIB, 512), None);
    }

    #[test]
    fn mirror_pieces_target_every_replica() {
        let devices = [device(1, 64 * MIB), device(2, 64 * MIB)];
        let extents = [replicated(0, 8 * MIB, &[(0, MIB), (1, 3 * MIB)])];
        let buf = encode_vec(&header(8 * MIB, 2, 1), &devices, &extents);
        let view = MapView::parse(&buf[..encoded_len(2, 1)]).expect("valid");
        let piece = view.map(4096, 65536).expect("inside");
        assert_eq!(piece.target_count, 2);
        assert_eq!(
            piece.targets[1],
            Target {
                device: 1,
                offset: 3 * MIB + 4096
            }
        );
    }

    #[test]
    fn striped_pieces_rotate_over_members() {
        let devices = [device(1, 64 * MIB), device(2, 64 * MIB)];
        let mut extent = replicated(0, 8 * MIB, &[(0, MIB), (1, MIB)]);
        extent.kind = ExtentKind::Striped;
        extent.stripe_unit = 65536;
        let buf = encode_vec(&header(8 * MIB, 2, 1), &devices, &[extent]);
        let view = MapView::parse(&buf[..encoded_len(2, 1)]).expect("valid");
        let first = view.map(0, MIB).expect("inside");
        assert_eq!(
            (first.length, first.targets[0]),
            (
                65536,
                Target {
                    device: 0,
                    offset: MIB
                }
            )
        );
        let second = view.map(65536 + 512, MIB).expect("inside");
        assert_eq!(second.length, 65536 - 512);
        assert_eq!(
            second.targets[0],
            Target {
                device: 1,
                offset: MIB + 512
            }
        );
        let third = view.map(2 * 65536, 4096).expect("inside");
        assert_eq!(
            third.targets[0],
            Target {
                device: 0,
                offset: MIB + 65536
            }
        );
    }

    #[test]
    fn copy_on_write_fields_round_trip_and_reserved_bytes_stay_refused() {
        let devices = [device(1, 64 * MIB)];
        let extents = [replicated(0, 4 * MIB, &[(0, 0)])];
        let mut h = header(4 * MIB, 1, 1);
        h.cow_generation = 0x0102_0304_0506_0708;
        h.cow_chunk_bytes = 65536;
        let mut buf = encode_vec(&h, &devices, &extents);
        let len = encoded_len(1, 1);
        assert_eq!(get_u64(&buf, 48), h.cow_generation, "generation at byte 48");
        assert_eq!(get_u32(&buf, 56), 65536, "chunk size at byte 56");
        let view = MapView::parse(&buf[..len]).expect("valid");
        assert_eq!(*view.header(), h);
        assert_eq!(*MapView::assume_valid(&buf[..len]).header(), h);
        for at in 60..HEADER_LEN {
            buf[at] = 1;
            assert_eq!(
                MapView::parse(&buf[..len]).err(),
                Some(MapError::BadVersion),
                "reserved byte {at}"
            );
            buf[at] = 0;
        }
    }

    #[test]
    fn chunks_touched_spans_every_chunk_a_range_shares_a_byte_with() {
        const C: u32 = 65536;
        assert_eq!(chunks_touched(0, 4096, C), Some((0, 0)));
        assert_eq!(chunks_touched(61440, 4096, C), Some((0, 0)));
        assert_eq!(chunks_touched(61440, 8192, C), Some((0, 1)));
        assert_eq!(chunks_touched(65536, 65536, C), Some((1, 1)));
        assert_eq!(chunks_touched(MIB, MIB, C), Some((16, 31)));
        assert_eq!(chunks_touched(5, 0, C), None);
        assert_eq!(chunks_touched(u64::MAX, 2, C), None);
        assert_eq!(chunks_touched(0, 1, 0), None);
    }

    #[test]
    fn syncing_flag_round_trips_and_pieces_report_it() {
        let devices = [device(1, 64 * MIB), device(2, 64 * MIB)];
        let mut moving = replicated(4 * MIB, 4 * MIB, &[(1, 0)]);
        moving.flags = EXTENT_SYNCING;
        let mut striped = replicated(8 * MIB, 8 * MIB, &[(0, 8 * MIB), (1, 8 * MIB)]);
        striped.kind = ExtentKind::Striped;
        striped.stripe_unit = 65536;
        striped.flags = EXTENT_SYNCING;
        let extents = [replicated(0, 4 * MIB, &[(0, 0)]), moving, striped];
        let buf = encode_vec(&header(16 * MIB, 2, 3), &devices, &extents);
        let len = encoded_len(2, 3);
        let at = HEADER_LEN + 2 * DEVICE_LEN + EXTENT_LEN + 18;
        assert_eq!(get_u16(&buf, at), EXTENT_SYNCING, "flags at byte 18");
        let view = MapView::parse(&buf[..len]).expect("valid");
        assert_eq!(view.extent(1), moving);
        assert!(!view.extent(0).syncing());
        assert!(view.extent(1).syncing() && view.extent(2).syncing());
        // A piece ending at the boundary is not syncing; the next one is.
        let before = view.map(4 * MIB - 4096, 8192).expect("inside");
        assert_eq!((before.length, before.syncing()), (4096, false));
        let after = view.map(4 * MIB, 8192).expect("inside");
        assert_eq!((after.flags, after.syncing()), (EXTENT_SYNCING, true));
        assert!(view.map(8 * MIB + 65536, 4096).expect("inside").syncing());
        assert!(!Piece::EMPTY.syncing());
    }

    #[test]
    fn unknown_extent_flags_are_refused() {
        let d = [device(1, 64 * MIB)];
        let h = header(4 * MIB, 1, 1);
        for flags in [1 << 1, 1 << 15, u16::MAX] {
            let mut extent = replicated(0, 4 * MIB, &[(0, 0)]);
            extent.flags = flags;
            assert_eq!(parse_err(&h, &d, &[extent]), MapError::UnknownExtentFlags);
        }
        // The same bit set in the bytes of a valid map.
        let buf = encode_vec(&h, &d, &[replicated(0, 4 * MIB, &[(0, 0)])]);
        let len = encoded_len(1, 1);
        let mut raw = buf;
        raw[HEADER_LEN + DEVICE_LEN + 19] = 0x40;
        assert_eq!(
            MapView::parse(&raw[..len]).err(),
            Some(MapError::UnknownExtentFlags)
        );
        assert_eq!(
            MapError::UnknownExtentFlags.message(),
            "map extent has unknown flags"
        );
    }

    #[test]
    fn hostile_maps_are_refused() {
        let d2 = [device(1, 64 * MIB), device(2, 64 * MIB)];
        let ok = [replicated(0, 4 * MIB, &[(0, 0)])];
        let h = header(4 * MIB, 2, 1);
        // Overlapping extents in the volume.
        let overlap = [
            replicated(0, 4 * MIB, &[(0, 0)]),
            replicated(2 * MIB, 2 * MIB, &[(1, 0)]),
        ];
        assert_eq!(
            parse_err(&header(4 * MIB, 2, 2), &d2, &overlap),
            MapError::NotContiguous
        );
        // Gap at the end.
        assert_eq!(
            parse_err(&header(8 * MIB, 2, 1), &d2, &ok),
            MapError::NotContiguous
        );
        // Beyond the device end.
        let far = [replicated(0, 4 * MIB, &[(0, 62 * MIB)])];
        assert_eq!(parse_err(&h, &d2, &far), MapError::BeyondDevice);
        // Overflowing offset.
        let wrap = [replicated(0, 4 * MIB, &[(0, u64::MAX - 4095)])];
        assert_eq!(parse_err(&h, &d2, &wrap), MapError::Overflow);
        // Unknown device.
        let unknown = [replicated(0, 4 * MIB, &[(7, 0)])];
        assert_eq!(parse_err(&h, &d2, &unknown), MapError::UnknownDevice);
        // Mirror on one device.
        let same = [replicated(0, 4 * MIB, &[(0, 0), (0, 8 * MIB)])];
        assert_eq!(parse_err(&h, &d2, &same), MapError::ReplicasShareDevice);
        // Two extents sharing device space.
        let shared = [
            replicated(0, 2 * MIB, &[(0, 0)]),
            replicated(2 * MIB, 2 * MIB, &[(0, MIB)]),
        ];
        assert_eq!(
            parse_err(&header(4 * MIB, 2, 2), &d2, &shared),
            MapError::OverlappingSpace
        );
        // Misaligned length.
        let odd = [replicated(0, 4 * MIB + 512, &[(0, 0)])];
        assert_eq!(
            parse_err(&header(4 * MIB + 512, 2, 1), &d2, &odd),
            MapError::Misaligned
        );
        // Duplicate devices.
        assert_eq!(
            parse_err(&h, &[device(1, MIB * 64), device(1, MIB * 64)], &ok),
            MapError::BadCounts
        );
        // Bad block size.
        let mut bad_block = h;
        bad_block.block_size = 3000;
        assert_eq!(parse_err(&bad_block, &d2, &ok), MapError::BadBlockSize);
        // Truncated buffer and bad magic.
        let buf = encode_vec(&h, &d2, &ok);
        let len = encoded_len(2, 1);
        assert_eq!(
            MapView::parse(&buf[..len - 1]).err(),
            Some(MapError::BadLength)
        );
        assert_eq!(MapView::parse(&buf[..10]).err(), Some(MapError::BadLength));
        let mut wrong = buf;
        wrong[0] = b'X';
        assert_eq!(
            MapView::parse(&wrong[..len]).err(),
            Some(MapError::BadMagic)
        );
        // Copy-on-write chunk sizes: none without a generation, else a power of two of at
        // least a block, at most MAX_CHUNK_BYTES; a generation needs one.
        for (generation, chunk) in [
            (0, 65536),
            (5, 0),
            (5, 2048),
            (5, 3 * 4096),
            (5, 2 << 20),
            (5, u32::MAX),
        ] {
            let mut cow = h;
            cow.cow_generation = generation;
            cow.cow_chunk_bytes = chunk;
            assert_eq!(
                parse_err(&cow, &d2, &ok),
                MapError::BadCowChunk,
                "generation {generation} chunk {chunk}"
            );
        }
        let mut big_blocks = header(4 * MIB, 2, 1);
        big_blocks.block_size = 65536;
        big_blocks.cow_generation = 5;
        big_blocks.cow_chunk_bytes = 4096;
        assert_eq!(parse_err(&big_blocks, &d2, &ok), MapError::BadCowChunk);
        // Absurd extent count.
        let mut absurd = buf;
        absurd[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            MapView::parse(&absurd[..len]).err(),
            Some(MapError::BadCounts)
        );
    }

    fn cow_header(size: u64, devices: usize, extents: usize) -> MapHeader {
        let mut h = header(size, devices, extents);
        h.cow_generation = 7;
        h.cow_chunk_bytes = 65536;
        h
    }

    fn section(store_bytes: u64, extents: usize) -> MapCowStore {
        MapCowStore {
            snapshot_id: 7,
            store_bytes,
            scan_from_sector: 3,
            extent_count: extents as u32,
            chunk_bytes: 65536,
        }
    }

    fn encode_store(
        h: &MapHeader,
        d: &[Device],
        e: &[Extent],
        store: &MapCowStore,
        store_extents: &[StoreExtent],
    ) -> ([u8; 4096], usize) {
        encode_stores(h, d, e, &[(*store, store_extents)])
    }

    fn encode_stores(
        h: &MapHeader,
        d: &[Device],
        e: &[Extent],
        stores: &[StoreSection<'_>],
    ) -> ([u8; 4096], usize) {
        let mut buf = [0u8; 4096];
        let len = encoded_len_with_stores(d.len(), e.len(), stores);
        encode_with_stores(h, d, e, stores, &mut buf[..len]).expect("encode");
        (buf, len)
    }

    fn store_extent(device: u32, offset: u64, length: u64) -> StoreExtent {
        StoreExtent {
            device,
            offset,
            length,
        }
    }

    #[test]
    fn cow_store_section_round_trips() {
        let d = [device(1, 64 * MIB), device(2, 64 * MIB)];
        let e = [replicated(0, 8 * MIB, &[(0, 0)])];
        let h = cow_header(8 * MIB, 2, 1);
        let store_extents = [
            store_extent(0, 8 * MIB, 4 * MIB),
            store_extent(1, 0, 2 * MIB),
        ];
        let store = section(6 * MIB, 2);
        let (buf, len) = encode_store(&h, &d, &e, &store, &store_extents);
        let view = MapView::parse(&buf[..len]).expect("valid");
        assert_eq!(view.cow_store_count(), 1);
        assert_eq!(view.cow_store(0), Some(store));
        assert_eq!(view.cow_store(1), None);
        assert_eq!(view.store_extent(0, 0), store_extents[0]);
        assert_eq!(view.store_extent(0, 1), store_extents[1]);
        assert_eq!(view.map(0, 4096).map(|p| p.length), Some(4096));
        // Without the section, nothing changes for the rest of the map.
        let plain = encode_vec(&h, &d, &e);
        let plain = MapView::parse(&plain[..encoded_len(2, 1)]).expect("valid");
        assert_eq!(plain.cow_store_count(), 0);
        assert_eq!(plain.cow_store(0), None);
        assert_eq!(plain.header(), view.header());
    }

    #[test]
    fn cow_store_sections_that_could_overwrite_data_are_refused() {
        let d = [device(1, 64 * MIB), device(2, 64 * MIB)];
        let e = [replicated(0, 8 * MIB, &[(0, 0)])];
        let h = cow_header(8 * MIB, 2, 1);
        let refused = |h: &MapHeader, store: MapCowStore, extents: &[StoreExtent]| {
            let (buf, len) = encode_store(h, &d, &e, &store, extents);
            MapView::parse(&buf[..len]).expect_err("must be refused")
        };
        let one = [store_extent(1, 0, 4 * MIB)];
        // Over the volume's own data, over itself, beyond its device.
        assert_eq!(
            refused(
                &h,
                section(4 * MIB, 1),
                &[store_extent(0, 4 * MIB, 4 * MIB)]
            ),
            MapError::OverlappingSpace
        );
        assert_eq!(
            refused(
                &h,
                section(8 * MIB, 2),
                &[
                    store_extent(1, 0, 4 * MIB),
                    store_extent(1, 2 * MIB, 4 * MIB)
                ]
            ),
            MapError::OverlappingSpace
        );
        for (extents, store_bytes) in [
            ([store_extent(1, 62 * MIB, 4 * MIB)], 4 * MIB),
            ([store_extent(2, 0, 4 * MIB)], 4 * MIB),
            ([store_extent(1, 512, 4 * MIB)], 4 * MIB),
            ([store_extent(1, 0, 0)], 0),
            ([store_extent(1, 0, 4 * MIB)], 2 * MIB),
            ([store_extent(1, 0, 4096)], 4096 / 2),
        ] {
            assert_eq!(
                refused(&h, section(store_bytes, 1), &extents),
                MapError::BadCowStore,
                "{extents:?} {store_bytes}"
            );
        }
        // Another snapshot's store, or a store without copy-on-write.
        let mut other = section(4 * MIB, 1);
        other.snapshot_id = 8;
        assert_eq!(refused(&h, other, &one), MapError::BadCowStore);
        assert_eq!(
            refused(&header(8 * MIB, 2, 1), section(4 * MIB, 1), &one),
            MapError::BadCowStore
        );
        // No extents, or more than allowed.
        assert_eq!(refused(&h, section(0, 0), &[]), MapError::BadCowStore);
        let many: [StoreExtent; 17] =
            core::array::from_fn(|i| store_extent(1, i as u64 * MIB, MIB));
        assert_eq!(
            refused(&h, section(17 * MIB, 17), &many),
            MapError::BadCowStore
        );
        // Reserved bytes, an unknown flag, a count that disagrees with the length.
        let (buf, len) = encode_store(&h, &d, &e, &section(4 * MIB, 1), &one);
        let at = encoded_len(2, 1);
        for bad_field in [
            (24, 1u32),
            (24, 32768),
            (24, 65536 + 4096),
            (24, 2 << 20),
            (28, 1),
        ] {
            let (offset, value) = bad_field;
            let mut reserved = buf;
            reserved[at + offset..at + offset + 4].copy_from_slice(&value.to_le_bytes());
            assert_eq!(
                MapView::parse(&reserved[..len]).err(),
                Some(MapError::BadCowStore),
                "{bad_field:?}"
            );
        }
        let mut reserved = buf;
        reserved[at + COW_STORE_LEN + 4] = 1;
        assert_eq!(
            MapView::parse(&reserved[..len]).err(),
            Some(MapError::BadCowStore)
        );
        let mut flags = buf;
        flags[6] |= 2;
        assert_eq!(
            MapView::parse(&flags[..len]).err(),
            Some(MapError::BadVersion)
        );
        let mut count = buf;
        count[at + 20] = 2;
        assert_eq!(
            MapView::parse(&count[..len]).err(),
            Some(MapError::BadLength)
        );
        assert_eq!(
            MapView::parse(&buf[..len - 1]).err(),
            Some(MapError::BadLength)
        );
        assert_eq!(
            MapView::parse(&buf[..at + 8]).err(),
            Some(MapError::BadLength)
        );
        // The flag without a section, or a section count the sections disagree with.
        let mut flag_only = encode_vec(&h, &d, &e);
        flag_only[6] = MAP_FLAG_COW_STORE as u8;
        assert_eq!(
            MapView::parse(&flag_only[..at]).err(),
            Some(MapError::BadCowStore)
        );
        flag_only[60] = 1;
        assert_eq!(
            MapView::parse(&flag_only[..at]).err(),
            Some(MapError::BadLength)
        );
        let mut two = buf;
        two[60] = 2;
        assert_eq!(MapView::parse(&two[..len]).err(), Some(MapError::BadLength));
        let mut nine = buf;
        nine[60] = MAX_COW_STORES as u8 + 1;
        assert_eq!(
            MapView::parse(&nine[..len]).err(),
            Some(MapError::BadCowStore)
        );
    }

    fn section_of(snapshot_id: u64, store_bytes: u64) -> MapCowStore {
        MapCowStore {
            snapshot_id,
            ..section(store_bytes, 1)
        }
    }

    #[test]
    fn several_cow_store_sections_round_trip() {
        let d = [device(1, 64 * MIB), device(2, 64 * MIB)];
        let e = [replicated(0, 8 * MIB, &[(0, 0)])];
        let h = cow_header(8 * MIB, 2, 1);
        let newest = [store_extent(1, 0, 2 * MIB)];
        let older = [store_extent(0, 8 * MIB, MIB), store_extent(1, 4 * MIB, MIB)];
        let oldest = [store_extent(1, 8 * MIB, 4 * MIB)];
        let stores = [
            (section_of(7, 2 * MIB), &newest[..]),
            (
                MapCowStore {
                    extent_count: 2,
                    chunk_bytes: 1 << 20,
                    ..section_of(5, 2 * MIB)
                },
                &older[..],
            ),
            (
                MapCowStore {
                    chunk_bytes: 256 << 10,
                    ..section_of(2, 4 * MIB)
                },
                &oldest[..],
            ),
        ];
        let (buf, len) = encode_stores(&h, &d, &e, &stores);
        let view = MapView::parse(&buf[..len]).expect("valid");
        assert_eq!(view.cow_store_count(), 3);
        // A store of the header's chunk size says so with 0 (what older agents sent).
        let first_section = encoded_len(2, 1);
        assert_eq!(get_u32(&buf, first_section + 24), 0);
        for (index, (section, extents)) in stores.iter().enumerate() {
            let index = index as u32;
            assert_eq!(view.cow_store(index).as_ref(), Some(section));
            for (i, extent) in extents.iter().enumerate() {
                assert_eq!(view.store_extent(index, i as u32), *extent);
            }
        }
        assert_eq!(view.cow_store(3), None);
    }

    #[test]
    fn several_cow_store_sections_that_disagree_are_refused() {
        let d = [device(1, 64 * MIB), device(2, 64 * MIB)];
        let e = [replicated(0, 8 * MIB, &[(0, 0)])];
        let h = cow_header(8 * MIB, 2, 1);
        let first = [store_extent(1, 0, 2 * MIB)];
        let second = [store_extent(1, 4 * MIB, 2 * MIB)];
        let refused = |a: MapCowStore, b: MapCowStore, b_extents: &[StoreExtent]| {
            let (buf, len) = encode_stores(&h, &d, &e, &[(a, &first[..]), (b, b_extents)]);
            MapView::parse(&buf[..len]).expect_err("must be refused")
        };
        // An older store sharing space with the newest one.
        assert_eq!(
            refused(
                section_of(7, 2 * MIB),
                section_of(3, 2 * MIB),
                &[store_extent(1, MIB, 2 * MIB)]
            ),
            MapError::OverlappingSpace
        );
        // Two sections of one snapshot, a newer one after the newest, none for the set's
        // newest snapshot, an id 0.
        for (a, b) in [(7, 7), (7, 8), (6, 3), (7, 0)] {
            assert_eq!(
                refused(section_of(a, 2 * MIB), section_of(b, 2 * MIB), &second),
                MapError::BadCowStore,
                "sections of snapshots {a} and {b}"
            );
        }
        // The second section's extents not adding up to it.
        assert_eq!(
            refused(section_of(7, 2 * MIB), section_of(3, 4 * MIB), &second),
            MapError::BadCowStore
        );
        let (buf, len) = encode_stores(
            &h,
            &d,
            &e,
            &[
                (section_of(7, 2 * MIB), &first[..]),
                (section_of(3, 2 * MIB), &second[..]),
            ],
        );
        assert!(MapView::parse(&buf[..len]).is_ok());
        // A section cut short.
        assert_eq!(
            MapView::parse(&buf[..len - STORE_EXTENT_LEN]).err(),
            Some(MapError::BadLength)
        );
    }
}
