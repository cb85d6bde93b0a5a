//! The pool's devices and the free space derived from the volumes.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use sanblk_proto::map::Extent;

use crate::allocator::{DeviceSpace, PoolSpace};

use super::recovery::{read_recoveries, RecoveryRecord};
use super::snapshots::{read_snapshots, snapshot_extents, SnapshotRecord};
use super::volumes::{read_volumes, VolumeRecord};
use super::{
    decode, decode_all, encode, Store, StoreError, StoreResult, DEVICES, RECOVERIES, SNAPSHOTS,
    VOLUMES,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub uuid: Uuid,
    pub path: String,
    pub size_bytes: u64,
    pub data_start: u64,
    pub state: String,
}

/// `state` of a device declared failed (by a failure report, or `recovery start`): it gets
/// no new allocation.
pub const DEVICE_FAILED: &str = "failed";

impl DeviceRecord {
    pub fn space(&self) -> DeviceSpace {
        DeviceSpace::for_device(self.uuid, self.data_start, self.size_bytes)
    }
}

impl Store {
    pub fn devices(&self) -> StoreResult<Vec<DeviceRecord>> {
        let txn = self.metadata.begin_read()?;
        decode_all(&txn.open_table(DEVICES)?)
    }

    /// Declares device `uuid` failed: no new allocation lands on it.
    pub fn mark_device_failed(&self, uuid: Uuid) -> StoreResult<()> {
        let txn = self.metadata.begin_write()?;
        {
            let mut table = txn.open_table(DEVICES)?;
            let current = table.get(uuid.as_u128())?.map(|v| v.value().to_vec());
            let Some(bytes) = current else {
                return Err(StoreError::NotFound(format!(
                    "device {uuid} is not in the pool"
                )));
            };
            let mut record: DeviceRecord = decode(&bytes)?;
            record.state = DEVICE_FAILED.to_string();
            table.insert(uuid.as_u128(), encode(&record)?.as_slice())?;
        }
        Ok(txn.commit()?)
    }

    pub fn add_device(&self, device: &DeviceRecord) -> StoreResult<()> {
        let txn = self.metadata.begin_write()?;
        {
            let mut table = txn.open_table(DEVICES)?;
            for entry in table.iter()? {
                let (_, value) = entry?;
                let existing: DeviceRecord = decode(value.value())?;
                if existing.uuid == device.uuid || existing.path == device.path {
                    return Err(StoreError::AlreadyExists(format!(
                        "{} is already in the pool (device {})",
                        existing.path, existing.uuid
                    )));
                }
            }
            table.insert(device.uuid.as_u128(), encode(device)?.as_slice())?;
        }
        Ok(txn.commit()?)
    }

    /// Current free space of the pool, derived from all volumes.
    pub fn pool_space(&self) -> StoreResult<(Vec<DeviceRecord>, PoolSpace)> {
        let txn = self.metadata.begin_read()?;
        let device_table = txn.open_table(DEVICES)?;
        let volumes = read_volumes(&txn.open_table(VOLUMES)?)?;
        let recoveries = read_recoveries(&txn.open_table(RECOVERIES)?)?;
        let snapshots = read_snapshots(&txn.open_table(SNAPSHOTS)?)?;
        let pool = pool_space_in(&device_table, &volumes, &recoveries, &snapshots)?;
        Ok((decode_all(&device_table)?, pool))
    }
}

/// Free space given the devices, every volume's extents, the targets of unfinished
/// recoveries (allocated, but not yet in any volume) and the snapshots' COW stores.
pub(super) fn pool_space_in(
    devices: &impl ReadableTable<u128, &'static [u8]>,
    volumes: &[VolumeRecord],
    recoveries: &[RecoveryRecord],
    snapshots: &[SnapshotRecord],
) -> StoreResult<PoolSpace> {
    let records: Vec<DeviceRecord> = decode_all(devices)?;
    let spaces: Vec<DeviceSpace> = records.iter().map(DeviceRecord::space).collect();
    let targets: Vec<Vec<Extent>> = recoveries
        .iter()
        .map(RecoveryRecord::target_extents)
        .collect();
    let used = volumes
        .iter()
        .map(|v| v.extents.as_slice())
        .chain(targets.iter().map(Vec::as_slice))
        .chain(snapshot_extents(snapshots));
    let mut pool = PoolSpace::new(&spaces, used)?;
    for record in records.iter().filter(|d| d.state == DEVICE_FAILED) {
        pool.withhold(record.uuid);
    }
    Ok(pool)
}
