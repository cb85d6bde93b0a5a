//! Recoveries: the persisted record of a volume being moved off a failed device, from its
//! start (allocation of the targets) to its finish (the new replicas in the volume's map).

use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use sanblk_proto::map::{ByteRange, Extent, ExtentKind, Layout, Replica, BLOCK_SIZE};
pub use sanblk_proto::protocol::RelocationKind;

use crate::allocator::merge_adjacent;

use super::pool::pool_space_in;
use super::volumes::{check_map_fits, read_volume, read_volumes, VolumeRecord};
use super::{
    decode, decode_all, encode, Store, StoreError, StoreResult, DEVICES, RECOVERIES, VOLUMES,
};

/// One piece of a volume being moved off a failed device: `length` bytes of the failed device
/// from `failed`, copied from `source` (at the same relative offset) to the newly allocated
/// `target`. The segment is a range of the failed device, so it covers a replicated extent's
/// replica or a striped extent's member alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverySegment {
    /// Volume offset of the segment's first byte (of its first stripe row when striped).
    pub volume_offset: u64,
    pub length: u64,
    pub failed: Replica,
    /// The surviving mirror replica, or `failed` itself (linear/striped: read through the
    /// server's own path to the failing device).
    pub source: Replica,
    pub target: Replica,
}

/// What a relocation is asked to do (a change's `StartRelocation`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RelocationRequest {
    /// Move the replicas on a device a client reported failed.
    Recovery { device: Uuid, reason: String },
    /// Move the replicas on `from` (onto `to` only, if given).
    Move { from: Uuid, to: Option<Uuid> },
    /// Give every single-copy extent a second replica on another device.
    MirrorAdd,
}

impl std::fmt::Display for RelocationRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelocationRequest::Recovery { device, .. } => write!(f, "recovery off device {device}"),
            RelocationRequest::Move { from, to: Some(to) } => {
                write!(f, "move from device {from} to {to}")
            }
            RelocationRequest::Move { from, to: None } => write!(f, "move off device {from}"),
            RelocationRequest::MirrorAdd => f.write_str("mirror add"),
        }
    }
}

impl RecoverySegment {
    /// Whether writing the moved replica is only best effort while the copy runs: a
    /// reported-failed replica whose data is copied from its mirror.
    pub fn moved_copy_is_best_effort(&self) -> bool {
        self.source.device_uuid != self.failed.device_uuid
    }
}

/// A relocation in progress (a recovery, a move or a mirror add), persisted so a restarted
/// server resumes it. The targets count as allocated space from the moment the record is
/// committed; while it exists the volume's map marks the extents it copies syncing, so every
/// client writes them through the server, which writes old and new place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryRecord {
    pub volume_id: u64,
    /// The device the data moves off (nil for a mirror add, whose segments name theirs).
    pub failed_device: Uuid,
    pub reason: String,
    #[serde(default)]
    pub kind: RelocationKind,
    /// In volume order.
    pub segments: Vec<RecoverySegment>,
    /// Bytes of the segments (taken in order) already copied and synced to their targets.
    pub cursor: u64,
}

impl RecoveryRecord {
    pub fn bytes_total(&self) -> u64 {
        self.segments.iter().map(|s| s.length).sum()
    }

    /// The targets as extents, so free-space accounting sees them as used.
    pub(super) fn target_extents(&self) -> Vec<Extent> {
        self.segments
            .iter()
            .map(|s| Extent::replicated(s.volume_offset, s.length, vec![s.target]))
            .collect()
    }

    /// The volume ranges whose writes must go through the server while the copy runs: every
    /// extent with a replica inside a segment (the whole extent: a striped member's units
    /// interleave over all of it).
    pub fn syncing_ranges(&self, extents: &[Extent]) -> Vec<ByteRange> {
        extents
            .iter()
            .filter(|extent| {
                let span = extent.member_span();
                extent.replicas.iter().any(|r| {
                    self.segments.iter().any(|s| {
                        s.failed.device_uuid == r.device_uuid
                            && s.failed.device_offset < r.device_offset + span
                            && r.device_offset < s.failed.device_offset + s.length
                    })
                })
            })
            .map(|extent| ByteRange {
                volume_offset: extent.volume_offset,
                length: extent.length,
            })
            .collect()
    }
}

impl Store {
    /// Starts moving volume `volume_id` off `failed_device` outside the change protocol
    /// (tests of the allocation).
    #[cfg(test)]
    pub fn start_recovery(
        &self,
        volume_id: u64,
        failed_device: Uuid,
        reason: &str,
    ) -> StoreResult<RecoveryRecord> {
        let txn = self.metadata.begin_write()?;
        let request = RelocationRequest::Recovery {
            device: failed_device,
            reason: reason.to_string(),
        };
        let record = start_relocation_in(&txn, volume_id, &request)?;
        txn.commit()?;
        Ok(record)
    }

    /// The relocation `request` would record now, committing nothing (the check before its
    /// change starts, and the size its first status reports).
    pub fn plan_relocation(
        &self,
        volume_id: u64,
        request: &RelocationRequest,
    ) -> StoreResult<RecoveryRecord> {
        let txn = self.metadata.begin_write()?;
        let record = start_relocation_in(&txn, volume_id, request)?;
        txn.abort()?;
        Ok(record)
    }

    pub fn recoveries(&self) -> StoreResult<Vec<RecoveryRecord>> {
        let txn = self.metadata.begin_read()?;
        read_recoveries(&txn.open_table(RECOVERIES)?)
    }

    pub fn recovery(&self, volume_id: u64) -> StoreResult<Option<RecoveryRecord>> {
        let txn = self.metadata.begin_read()?;
        let table = txn.open_table(RECOVERIES)?;
        let value = table.get(volume_id)?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// Records how far the copy got (the bytes below `cursor` are synced on their targets).
    pub fn save_recovery_cursor(&self, volume_id: u64, cursor: u64) -> StoreResult<()> {
        let txn = self.metadata.begin_write()?;
        {
            let mut table = txn.open_table(RECOVERIES)?;
            let current = table.get(volume_id)?.map(|v| v.value().to_vec());
            let Some(bytes) = current else {
                return Err(StoreError::NotFound(format!(
                    "no recovery of volume {volume_id}"
                )));
            };
            let mut record: RecoveryRecord = decode(&bytes)?;
            record.cursor = cursor;
            table.insert(volume_id, encode(&record)?.as_slice())?;
        }
        Ok(txn.commit()?)
    }

    /// Ends a completed recovery outside the change protocol (tests of the bookkeeping).
    #[cfg(test)]
    pub fn finish_recovery(&self, volume_id: u64) -> StoreResult<VolumeRecord> {
        let txn = self.metadata.begin_write()?;
        let record = finish_relocation_in(&txn, volume_id)?;
        txn.commit()?;
        Ok(record)
    }
}

/// Records a relocation of volume `volume_id` in `txn` (not committed): allocates a target
/// for every replica it moves (on a device holding no other replica of that extent).
pub(super) fn start_relocation_in(
    txn: &redb::WriteTransaction,
    volume_id: u64,
    request: &RelocationRequest,
) -> StoreResult<RecoveryRecord> {
    let devices = txn.open_table(DEVICES)?;
    let (moved_device, kind, reason) = match request {
        RelocationRequest::Recovery { device, reason } => {
            (*device, RelocationKind::Recovery, reason.clone())
        }
        RelocationRequest::Move { from, .. } => (*from, RelocationKind::Move, format!("{request}")),
        RelocationRequest::MirrorAdd => {
            (Uuid::nil(), RelocationKind::MirrorAdd, "mirror add".into())
        }
    };
    let known = |uuid: Uuid| -> StoreResult<()> {
        match devices.get(uuid.as_u128())? {
            Some(_) => Ok(()),
            None => Err(StoreError::NotFound(format!(
                "device {uuid} is not in the pool"
            ))),
        }
    };
    let mut only_onto = None;
    match request {
        RelocationRequest::Recovery { device, .. } => known(*device)?,
        RelocationRequest::Move { from, to } => {
            known(*from)?;
            if let Some(to) = to {
                known(*to)?;
                if to == from {
                    return Err(StoreError::Invalid(format!(
                        "cannot move data from device {from} onto itself"
                    )));
                }
                only_onto = Some(*to);
            }
        }
        RelocationRequest::MirrorAdd => {}
    }
    let volumes = read_volumes(&txn.open_table(VOLUMES)?)?;
    let volume = volumes
        .iter()
        .find(|v| v.id == volume_id)
        .ok_or_else(|| StoreError::NotFound(format!("no volume with id {volume_id}")))?;
    let mut recoveries_table = txn.open_table(RECOVERIES)?;
    let recoveries = read_recoveries(&recoveries_table)?;
    if recoveries.iter().any(|r| r.volume_id == volume_id) {
        return Err(recovery_busy(volume_id));
    }
    // A move onto one device excludes every other one.
    let all_devices: Vec<Uuid> = decode_all::<u128, super::DeviceRecord>(&devices)?
        .into_iter()
        .map(|d| d.uuid)
        .collect();
    let snapshots = super::snapshots::read_snapshots(&txn.open_table(super::SNAPSHOTS)?)?;
    let mut pool = pool_space_in(&devices, &volumes, &recoveries, &snapshots)?;
    let mut segments = Vec::new();
    for extent in &volume.extents {
        let moved = match request {
            RelocationRequest::MirrorAdd => {
                match (extent.kind, extent.replicas.as_slice()) {
                    (ExtentKind::Striped { .. }, _) => {
                        return Err(StoreError::Invalid(format!(
                            "volume {} is striped; only linear volumes can be mirrored",
                            volume.name
                        )))
                    }
                    (ExtentKind::Replicated, [only]) => *only,
                    // Already mirrored.
                    _ => continue,
                }
            }
            _ => {
                let Some(moved) = extent
                    .replicas
                    .iter()
                    .find(|r| r.device_uuid == moved_device)
                    .copied()
                else {
                    continue;
                };
                moved
            }
        };
        // A failed device is read only where no mirror copy holds the same data (a stripe
        // member holds other data); a moved or mirrored replica is healthy and read itself.
        let source = match (kind, extent.kind) {
            (RelocationKind::Recovery, ExtentKind::Replicated) => extent
                .replicas
                .iter()
                .find(|r| r.device_uuid != moved_device)
                .copied()
                .unwrap_or(moved),
            _ => moved,
        };
        let mut excluded: Vec<Uuid> = extent.replicas.iter().map(|r| r.device_uuid).collect();
        if let Some(to) = only_onto {
            if excluded.contains(&to) {
                return Err(StoreError::Invalid(format!(
                    "device {to} already holds another replica of volume {} at byte {}",
                    volume.name, extent.volume_offset
                )));
            }
            excluded.extend(all_devices.iter().filter(|d| **d != to));
        }
        // A striped member is replaced in whole units: the extent then splits at rows.
        let (unit, row) = match extent.kind {
            ExtentKind::Replicated => (BLOCK_SIZE, BLOCK_SIZE),
            ExtentKind::Striped { stripe_unit } => {
                (stripe_unit, stripe_unit * extent.replicas.len() as u64)
            }
        };
        let pieces = pool.allocate_replacement(extent.member_span(), unit, &excluded)?;
        let mut inside = 0;
        for (device_uuid, device_offset, length) in pieces {
            let shift = |replica: Replica| Replica {
                device_uuid: replica.device_uuid,
                device_offset: replica.device_offset + inside,
            };
            segments.push(RecoverySegment {
                volume_offset: extent.volume_offset + inside / unit * row,
                length,
                failed: shift(moved),
                source: shift(source),
                target: Replica {
                    device_uuid,
                    device_offset,
                },
            });
            inside += length;
        }
    }
    if segments.is_empty() {
        return Err(StoreError::Invalid(match request {
            RelocationRequest::MirrorAdd => format!("volume {} is already mirrored", volume.name),
            _ => format!(
                "volume {} has no data on device {moved_device}",
                volume.name
            ),
        }));
    }
    let record = RecoveryRecord {
        volume_id,
        failed_device: moved_device,
        reason,
        kind,
        segments,
        cursor: 0,
    };
    recoveries_table.insert(volume_id, encode(&record)?.as_slice())?;
    Ok(record)
}

/// Ends a completed relocation in `txn` (not committed): the targets replace the moved
/// replicas (or join them, for a mirror add), the epoch goes up, the record is deleted.
pub(super) fn finish_relocation_in(
    txn: &redb::WriteTransaction,
    volume_id: u64,
) -> StoreResult<VolumeRecord> {
    let mut recoveries = txn.open_table(RECOVERIES)?;
    let removed = recoveries.remove(volume_id)?.map(|v| v.value().to_vec());
    let Some(bytes) = removed else {
        return Err(StoreError::NotFound(format!(
            "no recovery of volume {volume_id}"
        )));
    };
    let recovery: RecoveryRecord = decode(&bytes)?;
    let mut volumes = txn.open_table(VOLUMES)?;
    let mut record = read_volume(&volumes, volume_id)?;
    let extents = match recovery.kind {
        RelocationKind::MirrorAdd => add_replicas(&record.extents, &recovery.segments),
        _ => replace_failed_replicas(&record.extents, recovery.failed_device, &recovery.segments),
    }
    .ok_or_else(|| {
        StoreError::Database(format!(
            "relocation of volume {volume_id} does not match its extents"
        ))
    })?;
    record.extents = merge_adjacent(extents);
    if recovery.kind == RelocationKind::MirrorAdd {
        record.layout = Layout::Mirror;
    }
    record.epoch += 1;
    check_map_fits(&record)?;
    volumes.insert(volume_id, encode(&record)?.as_slice())?;
    Ok(record)
}

/// Deletes the relocation record of `volume_id` in `txn` (its targets become free space).
pub(super) fn cancel_relocation_in(
    txn: &redb::WriteTransaction,
    volume_id: u64,
) -> StoreResult<()> {
    let mut recoveries = txn.open_table(RECOVERIES)?;
    if recoveries.remove(volume_id)?.is_none() {
        return Err(StoreError::NotFound(format!(
            "no move, mirror add or recovery of volume {volume_id} is in progress"
        )));
    }
    Ok(())
}

/// Drops the replicas on `device` from every extent of `volume_id` in `txn` (not committed),
/// one epoch up. Refused unless every extent keeps another replica.
pub(super) fn mirror_remove_in(
    txn: &redb::WriteTransaction,
    volume_id: u64,
    device: Uuid,
) -> StoreResult<VolumeRecord> {
    if txn.open_table(RECOVERIES)?.get(volume_id)?.is_some() {
        return Err(recovery_busy(volume_id));
    }
    let mut volumes = txn.open_table(VOLUMES)?;
    let mut record = read_volume(&volumes, volume_id)?;
    let mut removed_any = false;
    for extent in &mut record.extents {
        if !extent.replicas.iter().any(|r| r.device_uuid == device) {
            continue;
        }
        if extent.kind != ExtentKind::Replicated || extent.replicas.len() < 2 {
            return Err(StoreError::Invalid(format!(
                "volume {} has its only copy of byte {} on device {device}; move it instead",
                record.name, extent.volume_offset
            )));
        }
        extent.replicas.retain(|r| r.device_uuid != device);
        removed_any = true;
    }
    if !removed_any {
        return Err(StoreError::Invalid(format!(
            "volume {} has no mirror leg on device {device}",
            record.name
        )));
    }
    if record.extents.iter().all(|e| e.replicas.len() == 1) {
        record.layout = Layout::Linear;
    }
    record.extents = merge_adjacent(std::mem::take(&mut record.extents));
    record.epoch += 1;
    check_map_fits(&record)?;
    volumes.insert(volume_id, encode(&record)?.as_slice())?;
    Ok(record)
}

pub(super) fn read_recoveries(
    table: &impl ReadableTable<u64, &'static [u8]>,
) -> StoreResult<Vec<RecoveryRecord>> {
    decode_all(table)
}

pub(super) fn recovery_busy(volume_id: u64) -> StoreError {
    StoreError::Busy(format!(
        "volume {volume_id} is being recovered; retry when the recovery is done"
    ))
}

/// Replaces the replica on `failed` by the segments' targets, splitting extents where a
/// replacement came in several pieces (a striped extent at the stripe rows the pieces cover).
/// Segments are matched to extents by their range on the failed device. `None` if the
/// segments do not exactly cover every replica on `failed`.
fn replace_failed_replicas(
    extents: &[Extent],
    failed: Uuid,
    segments: &[RecoverySegment],
) -> Option<Vec<Extent>> {
    let mut replaced = Vec::with_capacity(extents.len() + segments.len());
    for extent in extents {
        let Some(position) = extent.replicas.iter().position(|r| r.device_uuid == failed) else {
            replaced.push(extent.clone());
            continue;
        };
        let first = extent.replicas[position].device_offset;
        let span = extent.member_span();
        let (unit, row) = match extent.kind {
            ExtentKind::Replicated => (1, 1),
            ExtentKind::Striped { stripe_unit } => {
                (stripe_unit, stripe_unit * extent.replicas.len() as u64)
            }
        };
        let mut mine: Vec<&RecoverySegment> = segments
            .iter()
            .filter(|s| s.failed.device_offset >= first && s.failed.device_offset < first + span)
            .collect();
        mine.sort_by_key(|s| s.failed.device_offset);
        let mut inside = 0;
        for segment in mine {
            if segment.failed.device_offset != first + inside
                || inside + segment.length > span
                || !segment.length.is_multiple_of(unit)
            {
                return None;
            }
            let mut replicas: Vec<Replica> = extent
                .replicas
                .iter()
                .map(|r| Replica {
                    device_uuid: r.device_uuid,
                    device_offset: r.device_offset + inside,
                })
                .collect();
            if let Some(slot) = replicas.get_mut(position) {
                *slot = segment.target;
            }
            replaced.push(Extent {
                volume_offset: extent.volume_offset + inside / unit * row,
                length: segment.length / unit * row,
                kind: extent.kind,
                replicas,
            });
            inside += segment.length;
        }
        if inside != span {
            return None;
        }
    }
    Some(replaced)
}

/// Gives every single-copy extent the segments' targets as a second replica, splitting it
/// where its target came in several pieces. `None` if the segments do not exactly cover
/// every single-copy extent.
fn add_replicas(extents: &[Extent], segments: &[RecoverySegment]) -> Option<Vec<Extent>> {
    let mut added = Vec::with_capacity(extents.len() + segments.len());
    for extent in extents {
        let [only] = extent.replicas.as_slice() else {
            added.push(extent.clone());
            continue;
        };
        let mut mine: Vec<&RecoverySegment> = segments
            .iter()
            .filter(|s| {
                s.failed.device_uuid == only.device_uuid
                    && s.failed.device_offset >= only.device_offset
                    && s.failed.device_offset < only.device_offset + extent.length
            })
            .collect();
        mine.sort_by_key(|s| s.failed.device_offset);
        let mut inside = 0;
        for segment in mine {
            if segment.failed.device_offset != only.device_offset + inside
                || inside + segment.length > extent.length
            {
                return None;
            }
            added.push(Extent {
                volume_offset: extent.volume_offset + inside,
                length: segment.length,
                kind: extent.kind,
                replicas: vec![
                    Replica {
                        device_uuid: only.device_uuid,
                        device_offset: only.device_offset + inside,
                    },
                    segment.target,
                ],
            });
            inside += segment.length;
        }
        if inside != extent.length {
            return None;
        }
    }
    Some(added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{device, place, test_store, MIB};
    use sanblk_proto::map::Layout;

    #[test]
    fn a_recovery_split_over_two_devices_replaces_the_failed_replica() {
        let dir = std::env::temp_dir().join(format!("sand-store-recovery-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(&dir, &dir.join("secrets.redb")).unwrap_or_else(|e| panic!("{e}"));
        for record in [device(1, 16 * MIB), device(2, 3 * MIB), device(3, 3 * MIB)] {
            store.add_device(&record).unwrap_or_else(|e| panic!("{e}"));
        }
        let volume = store
            .create_volume("v", 3 * MIB, Layout::Linear)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            volume.extents[0].replicas[0].device_uuid,
            Uuid::from_u128(1)
        );
        let unknown = store.start_recovery(volume.id, Uuid::from_u128(9), "test");
        assert!(
            matches!(unknown, Err(StoreError::NotFound(_))),
            "{unknown:?}"
        );
        let unused = store.start_recovery(volume.id, Uuid::from_u128(2), "test");
        assert!(matches!(unused, Err(StoreError::Invalid(_))), "{unused:?}");

        let recovery = store
            .start_recovery(volume.id, Uuid::from_u128(1), "test")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(recovery.segments.len(), 2);
        assert_eq!(recovery.bytes_total(), 3 * MIB);
        // The targets are allocated: nothing is left on devices 2 and 3.
        let (_, pool) = store.pool_space().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            pool.free_bytes(Uuid::from_u128(2)) + pool.free_bytes(Uuid::from_u128(3)),
            MIB
        );
        let again = store.start_recovery(volume.id, Uuid::from_u128(1), "test");
        assert!(matches!(again, Err(StoreError::Busy(_))), "{again:?}");
        let grow = store.grow_volume(volume.id, 4 * MIB);
        assert!(matches!(grow, Err(StoreError::Busy(_))), "{grow:?}");
        store
            .save_recovery_cursor(volume.id, MIB)
            .unwrap_or_else(|e| panic!("{e}"));
        let saved = store.recovery(volume.id).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(saved.map(|r| r.cursor), Some(MIB));

        let done = store
            .finish_recovery(volume.id)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(done.epoch, volume.epoch + 1);
        assert_eq!(done.extents.len(), 2);
        let mut at = 0;
        for (extent, segment) in done.extents.iter().zip(&recovery.segments) {
            assert_eq!(extent.volume_offset, at);
            assert_eq!(extent.replicas, vec![segment.target]);
            at += extent.length;
        }
        assert_eq!(at, 3 * MIB);
        assert!(store
            .recoveries()
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty());
        let (_, pool) = store.pool_space().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pool.free_bytes(Uuid::from_u128(1)), 15 * MIB);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_striped_member_is_recovered_in_whole_units_and_split_at_rows() {
        let (dir, store) = test_store("striped-recovery");
        // Members on 1 and 2; the spares hold 2.5 and 2 MiB, so the 4 MiB member is
        // replaced in two pieces of whole 1 MiB units (2 MiB each).
        for record in [
            device(1, 9 * MIB),
            device(2, 9 * MIB),
            device(3, 3 * MIB),
            device(4, 3 * MIB + MIB / 2),
        ] {
            store.add_device(&record).unwrap_or_else(|e| panic!("{e}"));
        }
        let layout: Layout = "striped:2".parse().unwrap_or_else(|e| panic!("{e}"));
        let volume = store
            .create_volume("s", 8 * MIB, layout)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(volume.extents.len(), 1);
        let failed = volume.extents[0].replicas[0];
        let recovery = store
            .start_recovery(volume.id, failed.device_uuid, "test")
            .unwrap_or_else(|e| panic!("{e}"));
        let lengths: Vec<(u64, u64)> = recovery
            .segments
            .iter()
            .map(|s| (s.volume_offset, s.length))
            .collect();
        assert_eq!(lengths, vec![(0, 2 * MIB), (4 * MIB, 2 * MIB)]);
        assert!(recovery.segments.iter().all(|s| s.source == s.failed));
        let done = store
            .finish_recovery(volume.id)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(done.extents.len(), 2, "{:?}", done.extents);
        // Every block not on the failed device stays; the others moved to the target at the
        // same place inside the segment.
        for at in (0..8 * MIB).step_by(BLOCK_SIZE as usize) {
            let before = place(&volume.extents, at).unwrap_or_else(|| panic!("{at}"));
            let after = place(&done.extents, at).unwrap_or_else(|| panic!("{at}"));
            if before.device_uuid != failed.device_uuid {
                assert_eq!(before, after, "{at}");
                continue;
            }
            let segment = recovery
                .segments
                .iter()
                .find(|s| {
                    s.failed.device_offset <= before.device_offset
                        && before.device_offset < s.failed.device_offset + s.length
                })
                .unwrap_or_else(|| panic!("{at} in no segment"));
            assert_eq!(
                after,
                Replica {
                    device_uuid: segment.target.device_uuid,
                    device_offset: segment.target.device_offset + before.device_offset
                        - segment.failed.device_offset,
                },
                "{at}"
            );
        }
        let (_, pool) = store.pool_space().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pool.free_bytes(failed.device_uuid), 8 * MIB);
        assert_eq!(pool.free_bytes(Uuid::from_u128(4)), MIB / 2);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
