//! Recoveries: the persisted record of a volume being moved off a failed device, from its
//! start (allocation of the targets) to its finish (the new replicas in the volume's map).

use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use sanblk_proto::map::{Extent, Replica};

use crate::allocator::merge_adjacent;

use super::pool::pool_space_in;
use super::volumes::{check_map_fits, read_volumes, VolumeRecord};
use super::{
    decode, decode_all, encode, Store, StoreError, StoreResult, DEVICES, RECOVERIES, VOLUMES,
};

/// One piece of a volume being moved off a failed device: `[volume_offset, +length)` whose
/// replica `failed` is copied from `source` to the newly allocated `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverySegment {
    pub volume_offset: u64,
    pub length: u64,
    pub failed: Replica,
    /// The surviving mirror replica, or `failed` itself (linear/striped: read through the
    /// server's own path to the failing device).
    pub source: Replica,
    pub target: Replica,
}

/// A recovery in progress, persisted so a restarted server resumes it. The targets count as
/// allocated space from the moment the record is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryRecord {
    pub volume_id: u64,
    pub failed_device: Uuid,
    pub reason: String,
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
            .map(|s| Extent {
                volume_offset: s.volume_offset,
                length: s.length,
                replicas: vec![s.target],
            })
            .collect()
    }
}

impl Store {
    /// Starts moving volume `volume_id` off `failed_device`: allocates a replacement for every
    /// replica on it (on a device holding no other replica of that extent) and records the
    /// recovery, in one transaction. Nothing changes on error.
    pub fn start_recovery(
        &self,
        volume_id: u64,
        failed_device: Uuid,
        reason: &str,
    ) -> StoreResult<RecoveryRecord> {
        let txn = self.metadata.begin_write()?;
        let record = {
            let devices = txn.open_table(DEVICES)?;
            if devices.get(failed_device.as_u128())?.is_none() {
                return Err(StoreError::NotFound(format!(
                    "device {failed_device} is not in the pool"
                )));
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
            let mut pool = pool_space_in(&devices, &volumes, &recoveries)?;
            let mut segments = Vec::new();
            for extent in &volume.extents {
                let Some(failed) = extent
                    .replicas
                    .iter()
                    .find(|r| r.device_uuid == failed_device)
                    .copied()
                else {
                    continue;
                };
                let source = extent
                    .replicas
                    .iter()
                    .find(|r| r.device_uuid != failed_device)
                    .copied()
                    .unwrap_or(failed);
                let excluded: Vec<Uuid> = extent.replicas.iter().map(|r| r.device_uuid).collect();
                let pieces = pool.allocate_replacement(extent.length, &excluded)?;
                let mut inside = 0;
                for (device_uuid, device_offset, length) in pieces {
                    let shift = |replica: Replica| Replica {
                        device_uuid: replica.device_uuid,
                        device_offset: replica.device_offset + inside,
                    };
                    segments.push(RecoverySegment {
                        volume_offset: extent.volume_offset + inside,
                        length,
                        failed: shift(failed),
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
                return Err(StoreError::Invalid(format!(
                    "volume {} has no data on device {failed_device}",
                    volume.name
                )));
            }
            let record = RecoveryRecord {
                volume_id,
                failed_device,
                reason: reason.to_string(),
                segments,
                cursor: 0,
            };
            recoveries_table.insert(volume_id, encode(&record)?.as_slice())?;
            record
        };
        txn.commit()?;
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

    /// Ends a completed recovery in one transaction: the targets replace the failed replicas,
    /// the epoch goes up, the record is deleted.
    pub fn finish_recovery(&self, volume_id: u64) -> StoreResult<VolumeRecord> {
        let txn = self.metadata.begin_write()?;
        let record = {
            let mut recoveries = txn.open_table(RECOVERIES)?;
            let removed = recoveries.remove(volume_id)?.map(|v| v.value().to_vec());
            let Some(bytes) = removed else {
                return Err(StoreError::NotFound(format!(
                    "no recovery of volume {volume_id}"
                )));
            };
            let recovery: RecoveryRecord = decode(&bytes)?;
            let mut volumes = txn.open_table(VOLUMES)?;
            let current = volumes.get(volume_id)?.map(|v| v.value().to_vec());
            let Some(bytes) = current else {
                return Err(StoreError::NotFound(format!(
                    "no volume with id {volume_id}"
                )));
            };
            let mut record: VolumeRecord = decode(&bytes)?;
            let extents = replace_failed_replicas(
                &record.extents,
                recovery.failed_device,
                &recovery.segments,
            )
            .ok_or_else(|| {
                StoreError::Database(format!(
                    "recovery of volume {volume_id} does not match its extents"
                ))
            })?;
            record.extents = merge_adjacent(extents);
            record.epoch += 1;
            check_map_fits(&record)?;
            volumes.insert(volume_id, encode(&record)?.as_slice())?;
            record
        };
        txn.commit()?;
        Ok(record)
    }
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
/// replacement came in several pieces. `None` if a segment does not match the extents.
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
        let end = extent.volume_offset + extent.length;
        let mut at = extent.volume_offset;
        for segment in segments
            .iter()
            .filter(|s| s.volume_offset >= extent.volume_offset && s.volume_offset < end)
        {
            if segment.volume_offset != at || segment.volume_offset + segment.length > end {
                return None;
            }
            let inside = at - extent.volume_offset;
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
                volume_offset: at,
                length: segment.length,
                replicas,
            });
            at += segment.length;
        }
        if at != end {
            return None;
        }
    }
    Some(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DeviceRecord;
    use sanblk_proto::map::Layout;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_recovery_split_over_two_devices_replaces_the_failed_replica() {
        let dir = std::env::temp_dir().join(format!("sand-store-recovery-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(&dir, &dir.join("secrets.redb")).unwrap_or_else(|e| panic!("{e}"));
        let device = |n: u128, size: u64| DeviceRecord {
            uuid: Uuid::from_u128(n),
            path: format!("/dev/test-{n}"),
            size_bytes: size,
            data_start: MIB,
            state: "online".into(),
        };
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
}
