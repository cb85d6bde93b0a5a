//! Volumes: create, grow, delete, look up; each change with its allocation in one transaction.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use sanblk_proto::map::{Extent, Layout, VolumeMap, BLOCK_SIZE};

use crate::allocator::merge_adjacent;

use super::clients::ClientRecord;
use super::pool::pool_space_in;
use super::recovery::{read_recoveries, recovery_busy};
use super::{
    decode, decode_all, encode, not_found, validate_name, Store, StoreError, StoreResult, CLIENTS,
    DEVICES, META, NEXT_VOLUME_ID_KEY, RECOVERIES, VOLUMES,
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
            let mut pool = pool_space_in(&devices, &existing, &recoveries)?;
            let extents = pool.allocate(layout, 0, size_bytes)?;
            let id = match meta.get(NEXT_VOLUME_ID_KEY)? {
                Some(bytes) => bytes
                    .value()
                    .try_into()
                    .map(u64::from_le_bytes)
                    .map_err(|_| StoreError::Database("corrupt next volume id".into()))?,
                None => 1,
            };
            meta.insert(NEXT_VOLUME_ID_KEY, (id + 1).to_le_bytes().as_slice())?;
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

    /// Grows a volume (allocation + new epoch in one transaction).
    pub fn grow_volume(&self, id: u64, new_size_bytes: u64) -> StoreResult<VolumeRecord> {
        let txn = self.metadata.begin_write()?;
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
            let mut pool = pool_space_in(&devices, &existing, &recoveries)?;
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
        txn.commit()?;
        Ok(record)
    }

    /// Deletes a volume, frees its space and drops every grant on it, in one transaction.
    pub fn delete_volume(&self, id: u64) -> StoreResult<VolumeRecord> {
        let txn = self.metadata.begin_write()?;
        let record = {
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
            let mut clients = txn.open_table(CLIENTS)?;
            let mut updated = Vec::new();
            for entry in clients.iter()? {
                let (_, value) = entry?;
                let mut client: ClientRecord = decode(value.value())?;
                if client.grants.remove(&id).is_some() {
                    updated.push(client);
                }
            }
            for client in updated {
                clients.insert(client.name.as_str(), encode(&client)?.as_slice())?;
            }
            record
        };
        txn.commit()?;
        self.delete_sessions(|s| s.volume_id == id)?;
        Ok(record)
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
            "volume {} would need {} extents; a map holds at most {MAX_EXTENTS_PER_MAP} \
                 (striped volumes use one extent per 1 MiB stripe unit, so at most 4 GiB)",
            record.name,
            record.extents.len()
        )));
    }
    Ok(())
}

pub fn validate_volume_name(name: &str) -> StoreResult<()> {
    validate_name("volume", name)
}
