//! Snapshot records: what each snapshot of a volume is, where its copy-on-write store lies,
//! and the chunks changed between it and the snapshot before it.
//!
//! A snapshot is made in two steps. `reserve_snapshot` allocates its COW store and records it
//! `pending` (the space is taken; no client copies into it yet), the caller writes the store's
//! header; the change that takes the snapshot (`ChangeKind::SnapshotTake`) then makes it
//! active with a new epoch, while every client is quiesced, so all hosts start copying at the
//! same point. A pending snapshot left by a crash is dropped at the next start.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use sanblk_proto::map::{format_size, Extent, Layout};
use sanblk_uapi::cow::{valid_chunk_bytes, CowLayout};

use super::pool::pool_space_in;
use super::recovery::read_recoveries;
use super::volumes::{bump_epoch_in, read_volume, read_volumes};
use super::{
    decode, decode_all, encode, take_next_id, validate_name, Store, StoreError, StoreResult,
    VolumeRecord, DEVICES, META, RECOVERIES, SNAPSHOTS, VOLUMES,
};

const NEXT_SNAPSHOT_ID_KEY: &str = "next_snapshot_id";
/// Most snapshots one volume may have at once.
pub const MAX_SNAPSHOTS_PER_VOLUME: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    /// COW store allocated, the snapshot not taken yet.
    Pending,
    /// Taken: writers copy into its store.
    Active,
    /// Its COW store filled up (or failed): it no longer holds its point in time.
    Invalid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: u64,
    pub volume_id: u64,
    pub name: String,
    pub state: SnapshotState,
    /// Why it is invalid.
    #[serde(default)]
    pub invalid_reason: Option<String>,
    /// The epoch whose map published it (0 while pending).
    pub epoch: u64,
    /// Seconds since the Unix epoch when it was taken.
    pub created_unix: u64,
    /// The volume's size when it was taken.
    pub origin_bytes: u64,
    pub chunk_bytes: u32,
    pub store_bytes: u64,
    /// Where the COW store lies: linear extents whose `volume_offset` is the offset in the
    /// store.
    pub store_extents: Vec<Extent>,
    /// The snapshot taken before this one (its id), if any was active then.
    #[serde(default)]
    pub previous: Option<u64>,
    /// Chunks (of this snapshot's size) written between the previous snapshot and this one,
    /// ascending (copied by the previous snapshot's store before this one was taken). `None`
    /// without a previous one.
    #[serde(default)]
    pub changed_since_previous: Option<Vec<u64>>,
    /// The previous snapshot's size: what the volume grew by since starts there (every chunk
    /// from the one holding that byte on counts as changed). `None` without a previous one,
    /// or for a snapshot taken before this was kept.
    #[serde(default)]
    pub previous_bytes: Option<u64>,
    /// How many records each snapshot active when this one was taken had then (snapshot id,
    /// records): the chunks changed between that snapshot and this one are its first ones.
    #[serde(default)]
    pub records_of_older: Vec<(u64, u64)>,
}

/// What the active snapshots had copied when a snapshot was taken.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakenAfter {
    /// (snapshot id, records) of every active snapshot.
    pub records_of_older: Vec<(u64, u64)>,
    /// The newest active snapshot and the chunks it had copied, ascending.
    pub previous: Option<(u64, Vec<u64>)>,
    /// That snapshot's size.
    #[serde(default)]
    pub previous_bytes: Option<u64>,
}

impl SnapshotRecord {
    pub fn layout(&self) -> Option<CowLayout> {
        CowLayout::new(self.store_bytes, self.chunk_bytes)
    }
}

pub(super) fn read_snapshots(
    table: &impl ReadableTable<u64, &'static [u8]>,
) -> StoreResult<Vec<SnapshotRecord>> {
    decode_all(table)
}

/// The store extents of every snapshot (pending ones included): space the allocator must
/// leave alone.
pub(super) fn snapshot_extents(snapshots: &[SnapshotRecord]) -> impl Iterator<Item = &[Extent]> {
    snapshots.iter().map(|s| s.store_extents.as_slice())
}

impl Store {
    pub fn snapshots(&self) -> StoreResult<Vec<SnapshotRecord>> {
        let txn = self.metadata.begin_read()?;
        read_snapshots(&txn.open_table(SNAPSHOTS)?)
    }

    /// The snapshots of one volume, oldest first.
    pub fn snapshots_of(&self, volume_id: u64) -> StoreResult<Vec<SnapshotRecord>> {
        let mut of: Vec<SnapshotRecord> = self
            .snapshots()?
            .into_iter()
            .filter(|s| s.volume_id == volume_id)
            .collect();
        of.sort_by_key(|s| s.id);
        Ok(of)
    }

    pub fn snapshot_named(&self, volume_id: u64, name: &str) -> StoreResult<SnapshotRecord> {
        self.snapshots_of(volume_id)?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| StoreError::NotFound(format!("no snapshot named {name:?}")))
    }

    /// Allocates the COW store of a new snapshot of `volume_id` and records it pending.
    pub fn reserve_snapshot(
        &self,
        volume_id: u64,
        name: &str,
        chunk_bytes: u32,
        store_bytes: u64,
        created_unix: u64,
    ) -> StoreResult<SnapshotRecord> {
        validate_name("snapshot", name)?;
        if !valid_chunk_bytes(chunk_bytes) {
            return Err(StoreError::Invalid(format!(
                "chunk size {chunk_bytes} must be a power of two from 4 KiB to 1 MiB"
            )));
        }
        let layout = CowLayout::new(store_bytes, chunk_bytes).ok_or_else(|| {
            StoreError::Invalid(format!(
                "a COW store of {} is too small: with its header and records, one chunk of {} \
                 needs at least {} (--cow-size)",
                format_size(store_bytes),
                format_size(u64::from(chunk_bytes)),
                format_size(CowLayout::min_store_bytes(chunk_bytes))
            ))
        })?;
        // The allocator hands out whole blocks; the layout fits in what it rounds up to.
        let store_bytes = store_bytes.next_multiple_of(sanblk_proto::map::BLOCK_SIZE);
        let txn = self.metadata.begin_write()?;
        let record = {
            let mut meta = txn.open_table(META)?;
            let volumes_table = txn.open_table(VOLUMES)?;
            let volume = read_volume(&volumes_table, volume_id)?;
            let mut snapshots = txn.open_table(SNAPSHOTS)?;
            let existing = read_snapshots(&snapshots)?;
            let of_volume: Vec<&SnapshotRecord> = existing
                .iter()
                .filter(|s| s.volume_id == volume_id)
                .collect();
            if of_volume.iter().any(|s| s.name == name) {
                return Err(StoreError::AlreadyExists(format!(
                    "volume {} already has a snapshot named {name:?}",
                    volume.name
                )));
            }
            if of_volume.len() >= MAX_SNAPSHOTS_PER_VOLUME {
                return Err(StoreError::Invalid(format!(
                    "volume {} has {} snapshots, the most allowed; delete one first",
                    volume.name,
                    of_volume.len()
                )));
            }
            if read_recoveries(&txn.open_table(RECOVERIES)?)?
                .iter()
                .any(|r| r.volume_id == volume_id)
            {
                return Err(StoreError::Busy(format!(
                    "volume {} is being moved or recovered; take the snapshot when that is done",
                    volume.name
                )));
            }
            let devices = txn.open_table(DEVICES)?;
            let volumes = read_volumes(&volumes_table)?;
            let recoveries = read_recoveries(&txn.open_table(RECOVERIES)?)?;
            let mut pool = pool_space_in(&devices, &volumes, &recoveries, &existing)?;
            let store_extents = pool
                .allocate(Layout::Linear, 0, store_bytes)
                .map_err(|error| match error {
                    // Say whose space it is: the request named no layout.
                    crate::allocator::AllocError::NoSpace {
                        requested,
                        available,
                        ..
                    } => crate::allocator::AllocError::NoSpace {
                        requested,
                        available,
                        layout: "linear, for the COW store (a smaller --cow-size may fit)"
                            .to_string(),
                    },
                    other => other,
                })?;
            let id = take_next_id(&mut meta, NEXT_SNAPSHOT_ID_KEY)?;
            let record = SnapshotRecord {
                id,
                volume_id,
                name: name.to_string(),
                state: SnapshotState::Pending,
                invalid_reason: None,
                epoch: 0,
                created_unix,
                origin_bytes: volume.size_bytes,
                chunk_bytes: layout.chunk_bytes,
                store_bytes,
                store_extents,
                previous: None,
                changed_since_previous: None,
                previous_bytes: None,
                records_of_older: Vec::new(),
            };
            snapshots.insert(id, encode(&record)?.as_slice())?;
            record
        };
        txn.commit()?;
        Ok(record)
    }

    /// Deletes a snapshot record (its store's space is free again).
    pub fn delete_snapshot(&self, id: u64) -> StoreResult<SnapshotRecord> {
        let txn = self.metadata.begin_write()?;
        let removed = {
            let mut snapshots = txn.open_table(SNAPSHOTS)?;
            let removed = snapshots
                .remove(id)?
                .map(|v| decode::<SnapshotRecord>(v.value()))
                .transpose()?;
            removed.ok_or_else(|| StoreError::NotFound(format!("no snapshot {id}")))?
        };
        txn.commit()?;
        Ok(removed)
    }

    /// Marks a snapshot invalid (its store is full or failed); it stays listed.
    pub fn invalidate_snapshot(&self, id: u64, reason: &str) -> StoreResult<()> {
        let txn = self.metadata.begin_write()?;
        {
            let mut snapshots = txn.open_table(SNAPSHOTS)?;
            let mut record: SnapshotRecord = match snapshots.get(id)? {
                Some(bytes) => decode(bytes.value())?,
                None => return Err(StoreError::NotFound(format!("no snapshot {id}"))),
            };
            record.state = SnapshotState::Invalid;
            record.invalid_reason = Some(reason.to_string());
            snapshots.insert(id, encode(&record)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Drops the snapshots a crash left pending (their space is free again).
    pub fn drop_pending_snapshots(&self) -> StoreResult<Vec<SnapshotRecord>> {
        let pending: Vec<SnapshotRecord> = self
            .snapshots()?
            .into_iter()
            .filter(|s| s.state == SnapshotState::Pending)
            .collect();
        for snapshot in &pending {
            self.delete_snapshot(snapshot.id)?;
        }
        Ok(pending)
    }
}

/// The change taking snapshot `snapshot_id` of `volume_id` (pending): active at a new epoch,
/// with what the older snapshots had copied (`taken`, read from their stores while the
/// clients were quiesced).
pub(super) fn take_snapshot_in(
    txn: &redb::WriteTransaction,
    volume_id: u64,
    snapshot_id: u64,
    taken: &TakenAfter,
    created_unix: u64,
) -> StoreResult<VolumeRecord> {
    let record = bump_epoch_in(txn, volume_id)?;
    let mut snapshots = txn.open_table(SNAPSHOTS)?;
    let mut snapshot: SnapshotRecord = match snapshots.get(snapshot_id)? {
        Some(bytes) => decode(bytes.value())?,
        None => return Err(StoreError::NotFound(format!("no snapshot {snapshot_id}"))),
    };
    if snapshot.volume_id != volume_id || snapshot.state != SnapshotState::Pending {
        return Err(StoreError::Invalid(format!(
            "snapshot {} is not a pending snapshot of volume {}",
            snapshot.name, record.name
        )));
    }
    snapshot.state = SnapshotState::Active;
    snapshot.epoch = record.epoch;
    snapshot.created_unix = created_unix;
    snapshot.origin_bytes = record.size_bytes;
    if let Some((previous, changed)) = &taken.previous {
        snapshot.previous = Some(*previous);
        snapshot.changed_since_previous = Some(changed.clone());
        snapshot.previous_bytes = taken.previous_bytes;
    }
    snapshot.records_of_older = taken.records_of_older.clone();
    snapshots.insert(snapshot_id, encode(&snapshot)?.as_slice())?;
    Ok(record)
}

/// The change dropping snapshot `snapshot_id`: its record goes (its space is free) at a new
/// epoch, whose map no longer carries copy-on-write tracking if it was the last one.
pub(super) fn drop_snapshot_in(
    txn: &redb::WriteTransaction,
    volume_id: u64,
    snapshot_id: u64,
) -> StoreResult<VolumeRecord> {
    let record = bump_epoch_in(txn, volume_id)?;
    let mut snapshots = txn.open_table(SNAPSHOTS)?;
    let removed = snapshots
        .remove(snapshot_id)?
        .map(|v| decode::<SnapshotRecord>(v.value()))
        .transpose()?;
    match removed {
        Some(snapshot) if snapshot.volume_id == volume_id => Ok(record),
        _ => Err(StoreError::NotFound(format!(
            "volume {} has no snapshot {snapshot_id}",
            record.name
        ))),
    }
}
