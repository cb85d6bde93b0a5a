//! Volumes: create, grow, delete, look up; each change with its allocation in one transaction.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use sanblk_proto::map::{Extent, Layout, VolumeMap, BLOCK_SIZE};

use crate::allocator::{merge_adjacent, restripe_legacy};

use super::clients::ClientRecord;
use super::pool::pool_space_in;
use super::recovery::{read_recoveries, recovery_busy};
use super::snapshots::{read_snapshots, SnapshotRecord};
use super::{
    decode, decode_all, encode, not_found, take_next_id, validate_name, Store, StoreError,
    StoreResult, CLIENTS, DEVICES, META, NEXT_VOLUME_ID_KEY, RECOVERIES, SNAPSHOTS, VOLUMES,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub layout: Layout,
    pub epoch: u64,
    pub extents: Vec<Extent>,
}

impl VolumeRecord {
    pub fn map(&self, lease_ms: u64) -> VolumeMap {
        VolumeMap {
            volume_id: self.id,
            name: self.name.clone(),
            epoch: self.epoch,
            size_bytes: self.size_bytes,
            block_size: BLOCK_SIZE,
            layout: self.layout,
            extents: self.extents.clone(),
            lease_ms,
            syncing: Vec::new(),
            copy_on_write: None,
        }
    }
}

impl Store {
    pub fn volumes(&self) -> StoreResult<Vec<VolumeRecord>> {
        let txn = self.metadata.begin_read()?;
        let table = txn.open_table(VOLUMES)?;
        read_volumes(&table)
    }

    pub fn volume_by_name(&self, name: &str) -> StoreResult<VolumeRecord> {
        self.volumes()?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| not_found("volume", name))
    }

    pub fn volume_by_id(&self, id: u64) -> StoreResult<VolumeRecord> {
        let txn = self.metadata.begin_read()?;
        let table = txn.open_table(VOLUMES)?;
        let value = table.get(id)?;
        match value {
            Some(bytes) => decode(bytes.value()),
            None => Err(StoreError::NotFound(format!("no volume with id {id}"))),
        }
    }

    /// Creates a volume and allocates its space in one transaction.
    pub fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
        layout: Layout,
    ) -> StoreResult<VolumeRecord> {
        validate_volume_name(name)?;
        let txn = self.metadata.begin_write()?;
        let record = {
            let mut meta = txn.open_table(META)?;
            let mut volumes = txn.open_table(VOLUMES)?;
            let devices = txn.open_table(DEVICES)?;
            let existing = read_volumes(&volumes)?;
            if existing.iter().any(|v| v.name == name) {
                return Err(StoreError::AlreadyExists(format!(
                    "volume {name:?} already exists"
                )));
            }
            let recoveries = read_recoveries(&txn.open_table(RECOVERIES)?)?;
            let snapshots = read_snapshots(&txn.open_table(SNAPSHOTS)?)?;
            let mut pool = pool_space_in(&devices, &existing, &recoveries, &snapshots)?;
            pool.limit_extents(MAX_EXTENTS_PER_MAP);
            let extents = pool.allocate(layout, 0, size_bytes)?;
            let id = take_next_id(&mut meta, NEXT_VOLUME_ID_KEY)?;
            let record = VolumeRecord {
                id,
                name: name.to_string(),
                size_bytes,
                layout,
                epoch: 1,
                extents: merge_adjacent(extents),
            };
            check_map_fits(&record)?;
            volumes.insert(id, encode(&record)?.as_slice())?;
            record
        };
        txn.commit()?;
        Ok(record)
    }

    /// Grows a volume (allocation + new epoch in one transaction), outside the change
    /// protocol (tests of the allocation).
    #[cfg(test)]
    pub fn grow_volume(&self, id: u64, new_size_bytes: u64) -> StoreResult<VolumeRecord> {
        let txn = self.metadata.begin_write()?;
        let record = grow_in(&txn, id, new_size_bytes)?;
        txn.commit()?;
        Ok(record)
    }
}

/// The grow of volume `id` to `new_size_bytes`, written in `txn` (not committed).
pub(super) fn grow_in(
    txn: &redb::WriteTransaction,
    id: u64,
    new_size_bytes: u64,
) -> StoreResult<VolumeRecord> {
    {
        let record = {
            let mut volumes = txn.open_table(VOLUMES)?;
            let devices = txn.open_table(DEVICES)?;
            let existing = read_volumes(&volumes)?;
            let mut record = existing
                .iter()
                .find(|v| v.id == id)
                .cloned()
                .ok_or_else(|| StoreError::NotFound(format!("no volume with id {id}")))?;
            if new_size_bytes <= record.size_bytes {
                return Err(StoreError::Invalid(format!(
                        "new size {new_size_bytes} must be larger than the current size {} (shrinking is not supported)",
                        record.size_bytes
                    ),
                ));
            }
            let recoveries = read_recoveries(&txn.open_table(RECOVERIES)?)?;
            // The recovery's segments are fixed when it starts; a grow meanwhile could land
            // on the failed device and would not be moved.
            if recoveries.iter().any(|r| r.volume_id == id) {
                return Err(recovery_busy(id));
            }
            let snapshots = read_snapshots(&txn.open_table(SNAPSHOTS)?)?;
            let mut pool = pool_space_in(&devices, &existing, &recoveries, &snapshots)?;
            // The first new extent may merge with the last one (`merge_adjacent`).
            pool.limit_extents((MAX_EXTENTS_PER_MAP + 1).saturating_sub(record.extents.len()));
            let added = pool.allocate(
                record.layout,
                record.size_bytes,
                new_size_bytes - record.size_bytes,
            )?;
            let mut extents = std::mem::take(&mut record.extents);
            extents.extend(added);
            record.extents = merge_adjacent(extents);
            record.size_bytes = new_size_bytes;
            record.epoch += 1;
            check_map_fits(&record)?;
            volumes.insert(id, encode(&record)?.as_slice())?;
            record
        };
        Ok(record)
    }
}

/// Raises the epoch of volume `id` in `txn` (not committed): the map changes.
pub(super) fn bump_epoch_in(txn: &redb::WriteTransaction, id: u64) -> StoreResult<VolumeRecord> {
    let mut volumes = txn.open_table(VOLUMES)?;
    let mut record = read_volume(&volumes, id)?;
    record.epoch += 1;
    volumes.insert(id, encode(&record)?.as_slice())?;
    Ok(record)
}

impl Store {
    /// Deletes a volume, frees its space and drops every grant on it, in one transaction;
    /// with `with_snapshots` its snapshots go with it (their COW stores' space too), else a
    /// volume with any snapshot (one being taken included) is refused. Also returns the
    /// deleted snapshots.
    pub fn delete_volume(
        &self,
        id: u64,
        with_snapshots: bool,
    ) -> StoreResult<(VolumeRecord, Vec<SnapshotRecord>)> {
        let txn = self.metadata.begin_write()?;
        let (record, deleted_snapshots) = {
            let recoveries = txn.open_table(RECOVERIES)?;
            if recoveries.get(id)?.is_some() {
                return Err(recovery_busy(id));
            }
            let mut volumes = txn.open_table(VOLUMES)?;
            let removed = volumes.remove(id)?.map(|v| v.value().to_vec());
            let record: VolumeRecord = match removed {
                Some(bytes) => decode(&bytes)?,
                None => return Err(StoreError::NotFound(format!("no volume with id {id}"))),
            };
            let mut snapshots = txn.open_table(SNAPSHOTS)?;
            let mut of_volume: Vec<SnapshotRecord> = read_snapshots(&snapshots)?
                .into_iter()
                .filter(|s| s.volume_id == id)
                .collect();
            of_volume.sort_by_key(|s| s.id);
            if !of_volume.is_empty() && !with_snapshots {
                let names: Vec<String> = of_volume.iter().map(|s| s.name.clone()).collect();
                return Err(StoreError::Busy(format!(
                    "volume {} has {} snapshot(s) ({}); delete them first (`sanctl snapshot \
                     delete {} NAME`), or delete with --force to delete them with it",
                    record.name,
                    names.len(),
                    names.join(", "),
                    record.name
                )));
            }
            let mut clients = txn.open_table(CLIENTS)?;
            let mut updated = Vec::new();
            for entry in clients.iter()? {
                let (_, value) = entry?;
                let mut client: ClientRecord = decode(value.value())?;
                client.grant_ids.remove(&id);
                if client.grants.remove(&id).is_some() {
                    updated.push(client);
                }
            }
            for client in updated {
                clients.insert(client.name.as_str(), encode(&client)?.as_slice())?;
            }
            // Its snapshots go with it: their COW stores' space is free again.
            for snapshot in &of_volume {
                snapshots.remove(snapshot.id)?;
            }
            (record, of_volume)
        };
        txn.commit()?;
        self.delete_sessions(|s| s.volume_id == id)?;
        Ok((record, deleted_snapshots))
    }

    /// Rewrites striped volumes persisted by versions that stored one single-replica extent
    /// per stripe unit (and let the agent fold them back) into striped extents, in one
    /// transaction at open. Every byte keeps its place, so the epoch stays. A volume with a
    /// recovery recorded keeps its extents until a later start (its segments may split them).
    pub(super) fn restripe_legacy_volumes(&self) -> StoreResult<()> {
        let txn = self.metadata.begin_write()?;
        {
            let mut volumes = txn.open_table(VOLUMES)?;
            let recoveries = read_recoveries(&txn.open_table(RECOVERIES)?)?;
            let mut rewritten = Vec::new();
            for mut record in read_volumes(&volumes)? {
                if recoveries.iter().any(|r| r.volume_id == record.id) {
                    continue;
                }
                if let Some(extents) = restripe_legacy(record.layout, &record.extents) {
                    log::info!(
                        "volume {}: {} stripe-unit extents rewritten as {} extents",
                        record.name,
                        record.extents.len(),
                        extents.len()
                    );
                    record.extents = extents;
                    rewritten.push(record);
                }
            }
            for record in rewritten {
                volumes.insert(record.id, encode(&record)?.as_slice())?;
            }
        }
        Ok(txn.commit()?)
    }
}

/// Volume `id` of the volumes table.
pub(super) fn read_volume(
    table: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
) -> StoreResult<VolumeRecord> {
    match table.get(id)? {
        Some(value) => decode(value.value()),
        None => Err(StoreError::NotFound(format!("no volume with id {id}"))),
    }
}

pub(super) fn read_volumes(
    table: &impl ReadableTable<u64, &'static [u8]>,
) -> StoreResult<Vec<VolumeRecord>> {
    decode_all(table)
}

/// Most extents one map may have: a map travels in one frame (1 MiB), and a mirrored extent
/// takes about 210 bytes of JSON. Returning an error here (the transaction is dropped, nothing
/// is allocated) beats creating a volume no client could ever attach.
pub const MAX_EXTENTS_PER_MAP: usize = 4096;

pub(super) fn check_map_fits(record: &VolumeRecord) -> StoreResult<()> {
    if record.extents.len() > MAX_EXTENTS_PER_MAP {
        return Err(StoreError::Invalid(format!(
            "volume {} would need {} extents; a map holds at most {MAX_EXTENTS_PER_MAP}",
            record.name,
            record.extents.len()
        )));
    }
    Ok(())
}

pub fn validate_volume_name(name: &str) -> StoreResult<()> {
    validate_name("volume", name)
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use sanblk_proto::map::ExtentKind;

    use super::*;
    use crate::store::testing::{device, place, test_store, MIB};

    #[test]
    fn legacy_striped_volumes_are_restriped_at_open() {
        let (dir, store) = test_store("legacy-stripes");
        for record in [device(1, 9 * MIB), device(2, 9 * MIB)] {
            store.add_device(&record).unwrap_or_else(|e| panic!("{e}"));
        }
        // A record as versions before striped extents wrote it: one extent per 1 MiB unit,
        // no "kind", and a 512 KiB tail.
        let size = 6 * MIB + MIB / 2;
        let legacy_extents: Vec<serde_json::Value> = (0..7u64)
            .map(|k| {
                serde_json::json!({
                    "volume_offset": k * MIB,
                    "length": MIB.min(size - k * MIB),
                    "replicas": [{
                        "device_uuid": Uuid::from_u128(u128::from(k % 2) + 1),
                        "device_offset": MIB + (k / 2) * MIB,
                    }],
                })
            })
            .collect();
        let legacy = serde_json::json!({
            "id": 7,
            "name": "old",
            "size_bytes": size,
            "layout": {"kind": "striped", "stripe_count": 2, "stripe_unit_bytes": MIB},
            "epoch": 5,
            "extents": legacy_extents,
        });
        let as_written: VolumeRecord =
            serde_json::from_value(legacy.clone()).unwrap_or_else(|e| panic!("{e}"));
        let txn = store
            .metadata
            .begin_write()
            .unwrap_or_else(|e| panic!("{e}"));
        txn.open_table(VOLUMES)
            .unwrap_or_else(|e| panic!("{e}"))
            .insert(7, legacy.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        txn.commit().unwrap_or_else(|e| panic!("{e}"));
        drop(store);

        let store = Store::open(&dir, &dir.join("secrets.redb")).unwrap_or_else(|e| panic!("{e}"));
        let upgraded = store.volume_by_id(7).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(upgraded.epoch, 5);
        let kinds: Vec<ExtentKind> = upgraded.extents.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            vec![
                ExtentKind::Striped { stripe_unit: MIB },
                ExtentKind::Replicated
            ]
        );
        for at in (0..size).step_by(BLOCK_SIZE as usize) {
            assert_eq!(
                place(&as_written.extents, at),
                place(&upgraded.extents, at),
                "{at}"
            );
        }
        // The space accounting agrees, and the volume grows as a new one would.
        let (_, pool) = store.pool_space().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pool.total_free(), 16 * MIB - size);
        store
            .grow_volume(7, 8 * MIB)
            .unwrap_or_else(|e| panic!("{e}"));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
