//! Persistent metadata in redb (embedded, ACID). Every mutation is one write transaction, so
//! an allocation and the volume record that owns it commit together: a crash (even kill -9)
//! leaves either the old or the new state, never space allocated twice or lost. Free space is
//! not stored at all; it is derived from the volumes' extents.
//!
//! Client secrets live in a second redb file (the secrets file, mode 0600) so the main
//! metadata can be copied around for debugging without leaking secrets.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::allocator::{merge_adjacent, restripe_legacy, AllocError, DeviceSpace, PoolSpace};
use crate::map::{AccessMode, Extent, ExtentKind, Layout, Replica, VolumeMap, BLOCK_SIZE};
use crate::protocol::{ErrorBody, ErrorCode};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const DEVICES: TableDefinition<u128, &[u8]> = TableDefinition::new("devices");
const VOLUMES: TableDefinition<u64, &[u8]> = TableDefinition::new("volumes");
const CLIENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("clients");
const SECRETS: TableDefinition<&str, &str> = TableDefinition::new("secrets");
/// Session token (hex) -> `SessionRecord`, in the secrets file: the server-path credential of
/// an attachment, kept until the attachment is detached so that a restarted server (or a
/// reconnecting agent) re-issues the token the client's kernel already holds.
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// "volume id:client name" -> session token (index of `SESSIONS`).
const SESSION_KEYS: TableDefinition<&str, &str> = TableDefinition::new("session_keys");

fn session_key(client: &str, volume_id: u64) -> String {
    format!("{volume_id}:{client}")
}
/// Volume id -> unfinished `RecoveryRecord` (at most one per volume).
const RECOVERIES: TableDefinition<u64, &[u8]> = TableDefinition::new("recoveries");

const POOL_UUID_KEY: &str = "pool_uuid";
const NEXT_VOLUME_ID_KEY: &str = "next_volume_id";
const METADATA_FILE: &str = "metadata.redb";

pub type StoreResult<T> = Result<T, ErrorBody>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub uuid: Uuid,
    pub path: String,
    pub size_bytes: u64,
    pub data_start: u64,
    pub state: String,
}

impl DeviceRecord {
    pub fn space(&self) -> DeviceSpace {
        DeviceSpace::for_device(self.uuid, self.data_start, self.size_bytes)
    }
}

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
    fn target_extents(&self) -> Vec<Extent> {
        self.segments
            .iter()
            .map(|s| Extent::replicated(s.volume_offset, s.length, vec![s.target]))
            .collect()
    }
}

/// A persisted attachment: who holds the session token, for which volume, in which mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub token: String,
    pub client: String,
    pub volume_id: u64,
    pub mode: AccessMode,
    /// The agent's connection closed while the server ran (agent stopped or killed): the token
    /// is re-issued on re-attach but not accepted on its own meanwhile. A server that dies
    /// does not set it, so its clients' kernels are accepted again after the restart.
    #[serde(default)]
    pub agent_gone: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub name: String,
    /// Volume id -> granted mode.
    pub grants: BTreeMap<u64, AccessMode>,
}

fn internal(error: impl std::fmt::Display) -> ErrorBody {
    ErrorBody::new(ErrorCode::Internal, format!("metadata store: {error}"))
}

fn encode<T: Serialize>(value: &T) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(value).map_err(internal)
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(internal)
}

fn alloc_error(error: AllocError) -> ErrorBody {
    let code = match error {
        AllocError::NoSpace { .. } | AllocError::NotEnoughDevices { .. } => ErrorCode::NoSpace,
        AllocError::BadSize(_) => ErrorCode::BadRequest,
        AllocError::Corrupt(_) => ErrorCode::Internal,
    };
    ErrorBody::new(code, error.to_string())
}

fn not_found(what: &str, name: &str) -> ErrorBody {
    ErrorBody::new(ErrorCode::NotFound, format!("no {what} named {name:?}"))
}

/// Creates (or opens) a redb file and restricts it to the owner.
fn open_database(path: &Path) -> StoreResult<Database> {
    let database =
        Database::create(path).map_err(|e| internal(format!("{}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| internal(format!("{}: {e}", path.display())))?;
    Ok(database)
}

pub struct Store {
    metadata: Database,
    secrets: Database,
    /// Client add/remove touch both databases; this keeps two of them from interleaving
    /// (e.g. two `client add` of one name leaving the secret of the one that failed).
    client_changes: std::sync::Mutex<()>,
    pool_uuid: Uuid,
    pub metadata_path: PathBuf,
}

impl Store {
    /// Opens the metadata in `metadata_dir` and the secrets file, creating both on first start.
    pub fn open(metadata_dir: &Path, secrets_path: &Path) -> StoreResult<Store> {
        let metadata_path = metadata_dir.join(METADATA_FILE);
        let metadata = open_database(&metadata_path)?;
        let secrets = open_database(secrets_path)?;
        let txn = metadata.begin_write().map_err(internal)?;
        let pool_uuid = {
            let mut meta = txn.open_table(META).map_err(internal)?;
            txn.open_table(DEVICES).map_err(internal)?;
            txn.open_table(VOLUMES).map_err(internal)?;
            txn.open_table(CLIENTS).map_err(internal)?;
            txn.open_table(RECOVERIES).map_err(internal)?;
            let existing = meta
                .get(POOL_UUID_KEY)
                .map_err(internal)?
                .map(|v| v.value().to_vec());
            match existing {
                Some(bytes) => Uuid::from_slice(&bytes).map_err(internal)?,
                None => {
                    let fresh = Uuid::new_v4();
                    meta.insert(POOL_UUID_KEY, fresh.as_bytes().as_slice())
                        .map_err(internal)?;
                    fresh
                }
            }
        };
        txn.commit().map_err(internal)?;
        let txn = secrets.begin_write().map_err(internal)?;
        txn.open_table(SECRETS).map_err(internal)?;
        txn.open_table(SESSIONS).map_err(internal)?;
        txn.open_table(SESSION_KEYS).map_err(internal)?;
        txn.commit().map_err(internal)?;
        let store = Store {
            metadata,
            secrets,
            client_changes: std::sync::Mutex::new(()),
            pool_uuid,
            metadata_path,
        };
        store.restripe_legacy_volumes()?;
        Ok(store)
    }

    /// Rewrites striped volumes persisted by versions that stored one single-replica extent
    /// per stripe unit (and let the agent fold them back) into striped extents, in one
    /// transaction at open. Every byte keeps its place, so the epoch stays. A volume with a
    /// recovery recorded keeps its extents until a later start (its segments may split them).
    fn restripe_legacy_volumes(&self) -> StoreResult<()> {
        let txn = self.metadata.begin_write().map_err(internal)?;
        {
            let mut volumes = txn.open_table(VOLUMES).map_err(internal)?;
            let recoveries = read_recoveries(&txn.open_table(RECOVERIES).map_err(internal)?)?;
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
                volumes
                    .insert(record.id, encode(&record)?.as_slice())
                    .map_err(internal)?;
            }
        }
        txn.commit().map_err(internal)
    }

    pub fn pool_uuid(&self) -> Uuid {
        self.pool_uuid
    }

    // ----- devices -----------------------------------------------------------------------

    pub fn devices(&self) -> StoreResult<Vec<DeviceRecord>> {
        let txn = self.metadata.begin_read().map_err(internal)?;
        let table = txn.open_table(DEVICES).map_err(internal)?;
        let mut devices = Vec::new();
        for entry in table.iter().map_err(internal)? {
            let (_, value) = entry.map_err(internal)?;
            devices.push(decode(value.value())?);
        }
        Ok(devices)
    }

    pub fn add_device(&self, device: &DeviceRecord) -> StoreResult<()> {
        let txn = self.metadata.begin_write().map_err(internal)?;
        {
            let mut table = txn.open_table(DEVICES).map_err(internal)?;
            for entry in table.iter().map_err(internal)? {
                let (_, value) = entry.map_err(internal)?;
                let existing: DeviceRecord = decode(value.value())?;
                if existing.uuid == device.uuid || existing.path == device.path {
                    return Err(ErrorBody::new(
                        ErrorCode::AlreadyExists,
                        format!(
                            "{} is already in the pool (device {})",
                            existing.path, existing.uuid
                        ),
                    ));
                }
            }
            table
                .insert(device.uuid.as_u128(), encode(device)?.as_slice())
                .map_err(internal)?;
        }
        txn.commit().map_err(internal)
    }

    // ----- volumes -----------------------------------------------------------------------

    pub fn volumes(&self) -> StoreResult<Vec<VolumeRecord>> {
        let txn = self.metadata.begin_read().map_err(internal)?;
        let table = txn.open_table(VOLUMES).map_err(internal)?;
        read_volumes(&table)
    }

    pub fn volume_by_name(&self, name: &str) -> StoreResult<VolumeRecord> {
        self.volumes()?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| not_found("volume", name))
    }

    pub fn volume_by_id(&self, id: u64) -> StoreResult<VolumeRecord> {
        let txn = self.metadata.begin_read().map_err(internal)?;
        let table = txn.open_table(VOLUMES).map_err(internal)?;
        let value = table.get(id).map_err(internal)?;
        match value {
            Some(bytes) => decode(bytes.value()),
            None => Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!("no volume with id {id}"),
            )),
        }
    }

    /// Current free space of the pool, derived from all volumes.
    pub fn pool_space(&self) -> StoreResult<(Vec<DeviceRecord>, PoolSpace)> {
        let txn = self.metadata.begin_read().map_err(internal)?;
        let device_table = txn.open_table(DEVICES).map_err(internal)?;
        let volumes = read_volumes(&txn.open_table(VOLUMES).map_err(internal)?)?;
        let recoveries = read_recoveries(&txn.open_table(RECOVERIES).map_err(internal)?)?;
        let pool = pool_space_in(&device_table, &volumes, &recoveries)?;
        let mut devices = Vec::new();
        for entry in device_table.iter().map_err(internal)? {
            let (_, value) = entry.map_err(internal)?;
            devices.push(decode(value.value())?);
        }
        Ok((devices, pool))
    }

    /// Creates a volume and allocates its space in one transaction.
    pub fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
        layout: Layout,
    ) -> StoreResult<VolumeRecord> {
        validate_volume_name(name)?;
        let txn = self.metadata.begin_write().map_err(internal)?;
        let record = {
            let mut meta = txn.open_table(META).map_err(internal)?;
            let mut volumes = txn.open_table(VOLUMES).map_err(internal)?;
            let devices = txn.open_table(DEVICES).map_err(internal)?;
            let existing = read_volumes(&volumes)?;
            if existing.iter().any(|v| v.name == name) {
                return Err(ErrorBody::new(
                    ErrorCode::AlreadyExists,
                    format!("volume {name:?} already exists"),
                ));
            }
            let recoveries = read_recoveries(&txn.open_table(RECOVERIES).map_err(internal)?)?;
            let mut pool = pool_space_in(&devices, &existing, &recoveries)?;
            let extents = pool.allocate(layout, 0, size_bytes).map_err(alloc_error)?;
            let id = match meta.get(NEXT_VOLUME_ID_KEY).map_err(internal)? {
                Some(bytes) => bytes
                    .value()
                    .try_into()
                    .map(u64::from_le_bytes)
                    .map_err(|_| internal("corrupt next volume id"))?,
                None => 1,
            };
            meta.insert(NEXT_VOLUME_ID_KEY, (id + 1).to_le_bytes().as_slice())
                .map_err(internal)?;
            let record = VolumeRecord {
                id,
                name: name.to_string(),
                size_bytes,
                layout,
                epoch: 1,
                extents: merge_adjacent(extents),
            };
            check_map_fits(&record)?;
            volumes
                .insert(id, encode(&record)?.as_slice())
                .map_err(internal)?;
            record
        };
        txn.commit().map_err(internal)?;
        Ok(record)
    }

    /// Grows a volume (allocation + new epoch in one transaction).
    pub fn grow_volume(&self, id: u64, new_size_bytes: u64) -> StoreResult<VolumeRecord> {
        let txn = self.metadata.begin_write().map_err(internal)?;
        let record = {
            let mut volumes = txn.open_table(VOLUMES).map_err(internal)?;
            let devices = txn.open_table(DEVICES).map_err(internal)?;
            let existing = read_volumes(&volumes)?;
            let mut record = existing
                .iter()
                .find(|v| v.id == id)
                .cloned()
                .ok_or_else(|| {
                    ErrorBody::new(ErrorCode::NotFound, format!("no volume with id {id}"))
                })?;
            if new_size_bytes <= record.size_bytes {
                return Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    format!(
                        "new size {new_size_bytes} must be larger than the current size {} (shrinking is not supported)",
                        record.size_bytes
                    ),
                ));
            }
            let recoveries = read_recoveries(&txn.open_table(RECOVERIES).map_err(internal)?)?;
            // The recovery's segments are fixed when it starts; a grow meanwhile could land
            // on the failed device and would not be moved.
            if recoveries.iter().any(|r| r.volume_id == id) {
                return Err(recovery_busy(id));
            }
            let mut pool = pool_space_in(&devices, &existing, &recoveries)?;
            let added = pool
                .allocate(
                    record.layout,
                    record.size_bytes,
                    new_size_bytes - record.size_bytes,
                )
                .map_err(alloc_error)?;
            let mut extents = std::mem::take(&mut record.extents);
            extents.extend(added);
            record.extents = merge_adjacent(extents);
            record.size_bytes = new_size_bytes;
            record.epoch += 1;
            check_map_fits(&record)?;
            volumes
                .insert(id, encode(&record)?.as_slice())
                .map_err(internal)?;
            record
        };
        txn.commit().map_err(internal)?;
        Ok(record)
    }

    /// Deletes a volume, frees its space and drops every grant on it, in one transaction.
    pub fn delete_volume(&self, id: u64) -> StoreResult<VolumeRecord> {
        let txn = self.metadata.begin_write().map_err(internal)?;
        let record = {
            let recoveries = txn.open_table(RECOVERIES).map_err(internal)?;
            if recoveries.get(id).map_err(internal)?.is_some() {
                return Err(recovery_busy(id));
            }
            let mut volumes = txn.open_table(VOLUMES).map_err(internal)?;
            let removed = volumes
                .remove(id)
                .map_err(internal)?
                .map(|v| v.value().to_vec());
            let record: VolumeRecord = match removed {
                Some(bytes) => decode(&bytes)?,
                None => {
                    return Err(ErrorBody::new(
                        ErrorCode::NotFound,
                        format!("no volume with id {id}"),
                    ))
                }
            };
            let mut clients = txn.open_table(CLIENTS).map_err(internal)?;
            let mut updated = Vec::new();
            for entry in clients.iter().map_err(internal)? {
                let (_, value) = entry.map_err(internal)?;
                let mut client: ClientRecord = decode(value.value())?;
                if client.grants.remove(&id).is_some() {
                    updated.push(client);
                }
            }
            for client in updated {
                clients
                    .insert(client.name.as_str(), encode(&client)?.as_slice())
                    .map_err(internal)?;
            }
            record
        };
        txn.commit().map_err(internal)?;
        self.delete_sessions(|s| s.volume_id == id)?;
        Ok(record)
    }

    // ----- recoveries --------------------------------------------------------------------

    /// Starts moving volume `volume_id` off `failed_device`: allocates a replacement for every
    /// replica on it (on a device holding no other replica of that extent) and records the
    /// recovery, in one transaction. Nothing changes on error.
    pub fn start_recovery(
        &self,
        volume_id: u64,
        failed_device: Uuid,
        reason: &str,
    ) -> StoreResult<RecoveryRecord> {
        let txn = self.metadata.begin_write().map_err(internal)?;
        let record = {
            let devices = txn.open_table(DEVICES).map_err(internal)?;
            if devices
                .get(failed_device.as_u128())
                .map_err(internal)?
                .is_none()
            {
                return Err(ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("device {failed_device} is not in the pool"),
                ));
            }
            let volumes = read_volumes(&txn.open_table(VOLUMES).map_err(internal)?)?;
            let volume = volumes.iter().find(|v| v.id == volume_id).ok_or_else(|| {
                ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("no volume with id {volume_id}"),
                )
            })?;
            let mut recoveries_table = txn.open_table(RECOVERIES).map_err(internal)?;
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
                // A mirror copy holds the same data; a stripe member holds other data.
                let source = match extent.kind {
                    ExtentKind::Replicated => extent
                        .replicas
                        .iter()
                        .find(|r| r.device_uuid != failed_device)
                        .copied()
                        .unwrap_or(failed),
                    ExtentKind::Striped { .. } => failed,
                };
                let excluded: Vec<Uuid> = extent.replicas.iter().map(|r| r.device_uuid).collect();
                // A striped member is replaced in whole units: the extent then splits at rows.
                let (unit, row) = match extent.kind {
                    ExtentKind::Replicated => (BLOCK_SIZE, BLOCK_SIZE),
                    ExtentKind::Striped { stripe_unit } => {
                        (stripe_unit, stripe_unit * extent.replicas.len() as u64)
                    }
                };
                let pieces = pool
                    .allocate_replacement(extent.member_span(), unit, &excluded)
                    .map_err(alloc_error)?;
                let mut inside = 0;
                for (device_uuid, device_offset, length) in pieces {
                    let shift = |replica: Replica| Replica {
                        device_uuid: replica.device_uuid,
                        device_offset: replica.device_offset + inside,
                    };
                    segments.push(RecoverySegment {
                        volume_offset: extent.volume_offset + inside / unit * row,
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
                return Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    format!(
                        "volume {} has no data on device {failed_device}",
                        volume.name
                    ),
                ));
            }
            let record = RecoveryRecord {
                volume_id,
                failed_device,
                reason: reason.to_string(),
                segments,
                cursor: 0,
            };
            recoveries_table
                .insert(volume_id, encode(&record)?.as_slice())
                .map_err(internal)?;
            record
        };
        txn.commit().map_err(internal)?;
        Ok(record)
    }

    pub fn recoveries(&self) -> StoreResult<Vec<RecoveryRecord>> {
        let txn = self.metadata.begin_read().map_err(internal)?;
        read_recoveries(&txn.open_table(RECOVERIES).map_err(internal)?)
    }

    pub fn recovery(&self, volume_id: u64) -> StoreResult<Option<RecoveryRecord>> {
        let txn = self.metadata.begin_read().map_err(internal)?;
        let table = txn.open_table(RECOVERIES).map_err(internal)?;
        let value = table.get(volume_id).map_err(internal)?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// Records how far the copy got (the bytes below `cursor` are synced on their targets).
    pub fn save_recovery_cursor(&self, volume_id: u64, cursor: u64) -> StoreResult<()> {
        let txn = self.metadata.begin_write().map_err(internal)?;
        {
            let mut table = txn.open_table(RECOVERIES).map_err(internal)?;
            let current = table
                .get(volume_id)
                .map_err(internal)?
                .map(|v| v.value().to_vec());
            let Some(bytes) = current else {
                return Err(ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("no recovery of volume {volume_id}"),
                ));
            };
            let mut record: RecoveryRecord = decode(&bytes)?;
            record.cursor = cursor;
            table
                .insert(volume_id, encode(&record)?.as_slice())
                .map_err(internal)?;
        }
        txn.commit().map_err(internal)
    }

    /// Ends a completed recovery in one transaction: the targets replace the failed replicas,
    /// the epoch goes up, the record is deleted.
    pub fn finish_recovery(&self, volume_id: u64) -> StoreResult<VolumeRecord> {
        let txn = self.metadata.begin_write().map_err(internal)?;
        let record = {
            let mut recoveries = txn.open_table(RECOVERIES).map_err(internal)?;
            let removed = recoveries
                .remove(volume_id)
                .map_err(internal)?
                .map(|v| v.value().to_vec());
            let Some(bytes) = removed else {
                return Err(ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("no recovery of volume {volume_id}"),
                ));
            };
            let recovery: RecoveryRecord = decode(&bytes)?;
            let mut volumes = txn.open_table(VOLUMES).map_err(internal)?;
            let current = volumes
                .get(volume_id)
                .map_err(internal)?
                .map(|v| v.value().to_vec());
            let Some(bytes) = current else {
                return Err(ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("no volume with id {volume_id}"),
                ));
            };
            let mut record: VolumeRecord = decode(&bytes)?;
            let extents = replace_failed_replicas(
                &record.extents,
                recovery.failed_device,
                &recovery.segments,
            )
            .ok_or_else(|| {
                internal(format!(
                    "recovery of volume {volume_id} does not match its extents"
                ))
            })?;
            record.extents = merge_adjacent(extents);
            record.epoch += 1;
            check_map_fits(&record)?;
            volumes
                .insert(volume_id, encode(&record)?.as_slice())
                .map_err(internal)?;
            record
        };
        txn.commit().map_err(internal)?;
        Ok(record)
    }

    // ----- clients -----------------------------------------------------------------------

    pub fn clients(&self) -> StoreResult<Vec<ClientRecord>> {
        let txn = self.metadata.begin_read().map_err(internal)?;
        let table = txn.open_table(CLIENTS).map_err(internal)?;
        let mut clients = Vec::new();
        for entry in table.iter().map_err(internal)? {
            let (_, value) = entry.map_err(internal)?;
            clients.push(decode(value.value())?);
        }
        Ok(clients)
    }

    pub fn client(&self, name: &str) -> StoreResult<Option<ClientRecord>> {
        let txn = self.metadata.begin_read().map_err(internal)?;
        let table = txn.open_table(CLIENTS).map_err(internal)?;
        let value = table.get(name).map_err(internal)?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// Registers a client with a fresh secret (secret first: a crash in between leaves an
    /// unused secret, never a client without one).
    pub fn add_client(&self, name: &str, secret_hex: &str) -> StoreResult<()> {
        validate_client_name(name)?;
        let _serialized = self
            .client_changes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.client(name)?.is_some() {
            return Err(ErrorBody::new(
                ErrorCode::AlreadyExists,
                format!("client {name:?} already exists"),
            ));
        }
        let txn = self.secrets.begin_write().map_err(internal)?;
        txn.open_table(SECRETS)
            .map_err(internal)?
            .insert(name, secret_hex)
            .map_err(internal)?;
        txn.commit().map_err(internal)?;
        let txn = self.metadata.begin_write().map_err(internal)?;
        {
            let mut table = txn.open_table(CLIENTS).map_err(internal)?;
            if table.get(name).map_err(internal)?.is_some() {
                return Err(ErrorBody::new(
                    ErrorCode::AlreadyExists,
                    format!("client {name:?} already exists"),
                ));
            }
            let record = ClientRecord {
                name: name.to_string(),
                grants: BTreeMap::new(),
            };
            table
                .insert(name, encode(&record)?.as_slice())
                .map_err(internal)?;
        }
        txn.commit().map_err(internal)
    }

    /// Removes a client and then its secret.
    pub fn remove_client(&self, name: &str) -> StoreResult<()> {
        let _serialized = self
            .client_changes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let txn = self.metadata.begin_write().map_err(internal)?;
        {
            let mut table = txn.open_table(CLIENTS).map_err(internal)?;
            if table.remove(name).map_err(internal)?.is_none() {
                return Err(not_found("client", name));
            }
        }
        txn.commit().map_err(internal)?;
        let txn = self.secrets.begin_write().map_err(internal)?;
        txn.open_table(SECRETS)
            .map_err(internal)?
            .remove(name)
            .map_err(internal)?;
        txn.commit().map_err(internal)?;
        self.delete_sessions(|s| s.client == name).map(|_| ())
    }

    // ----- session tokens (secrets file) -------------------------------------------------

    /// Every persisted session.
    pub fn sessions(&self) -> StoreResult<Vec<SessionRecord>> {
        let txn = self.secrets.begin_read().map_err(internal)?;
        let table = txn.open_table(SESSIONS).map_err(internal)?;
        let mut sessions = Vec::new();
        for entry in table.iter().map_err(internal)? {
            let (_, value) = entry.map_err(internal)?;
            sessions.push(decode(value.value())?);
        }
        Ok(sessions)
    }

    /// The persisted session of a token.
    pub fn session(&self, token: &str) -> StoreResult<Option<SessionRecord>> {
        let txn = self.secrets.begin_read().map_err(internal)?;
        let table = txn.open_table(SESSIONS).map_err(internal)?;
        let value = table.get(token).map_err(internal)?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// The persisted session of `client`'s attachment to a volume.
    pub fn session_of(&self, client: &str, volume_id: u64) -> StoreResult<Option<SessionRecord>> {
        let txn = self.secrets.begin_read().map_err(internal)?;
        let keys = txn.open_table(SESSION_KEYS).map_err(internal)?;
        let Some(token) = keys
            .get(session_key(client, volume_id).as_str())
            .map_err(internal)?
            .map(|v| v.value().to_string())
        else {
            return Ok(None);
        };
        let table = txn.open_table(SESSIONS).map_err(internal)?;
        let value = table.get(token.as_str()).map_err(internal)?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// Records (or updates) attachments' sessions, in one transaction. Written without waiting
    /// for the disk (redb `Eventual`): they survive a killed server, and one lost to a power
    /// loss only costs its client a new token.
    pub fn save_sessions(&self, sessions: &[SessionRecord]) -> StoreResult<()> {
        let mut txn = self.secrets.begin_write().map_err(internal)?;
        txn.set_durability(redb::Durability::Eventual);
        {
            let mut keys = txn.open_table(SESSION_KEYS).map_err(internal)?;
            let mut table = txn.open_table(SESSIONS).map_err(internal)?;
            for session in sessions {
                let key = session_key(&session.client, session.volume_id);
                let previous = keys
                    .insert(key.as_str(), session.token.as_str())
                    .map_err(internal)?
                    .map(|v| v.value().to_string());
                if let Some(previous) = previous.filter(|p| *p != session.token) {
                    table.remove(previous.as_str()).map_err(internal)?;
                }
                table
                    .insert(session.token.as_str(), encode(session)?.as_slice())
                    .map_err(internal)?;
            }
        }
        txn.commit().map_err(internal)
    }

    /// Deletes the persisted sessions `doomed` selects (durably); returns them.
    pub fn delete_sessions(
        &self,
        doomed: impl Fn(&SessionRecord) -> bool,
    ) -> StoreResult<Vec<SessionRecord>> {
        let txn = self.secrets.begin_write().map_err(internal)?;
        let removed = {
            let mut table = txn.open_table(SESSIONS).map_err(internal)?;
            let mut removed = Vec::new();
            for entry in table.iter().map_err(internal)? {
                let (_, value) = entry.map_err(internal)?;
                let session: SessionRecord = decode(value.value())?;
                if doomed(&session) {
                    removed.push(session);
                }
            }
            let mut keys = txn.open_table(SESSION_KEYS).map_err(internal)?;
            for session in &removed {
                table.remove(session.token.as_str()).map_err(internal)?;
                keys.remove(session_key(&session.client, session.volume_id).as_str())
                    .map_err(internal)?;
            }
            removed
        };
        txn.commit().map_err(internal)?;
        Ok(removed)
    }

    /// Sets (`Some`) or removes (`None`) a client's grant on a volume.
    pub fn set_grant(
        &self,
        name: &str,
        volume_id: u64,
        mode: Option<AccessMode>,
    ) -> StoreResult<ClientRecord> {
        let txn = self.metadata.begin_write().map_err(internal)?;
        let record = {
            let mut table = txn.open_table(CLIENTS).map_err(internal)?;
            let current = table
                .get(name)
                .map_err(internal)?
                .map(|v| v.value().to_vec());
            let mut record: ClientRecord = match current {
                Some(bytes) => decode(&bytes)?,
                None => return Err(not_found("client", name)),
            };
            let volumes = txn.open_table(VOLUMES).map_err(internal)?;
            if volumes.get(volume_id).map_err(internal)?.is_none() {
                return Err(ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("no volume with id {volume_id}"),
                ));
            }
            match mode {
                Some(mode) => {
                    record.grants.insert(volume_id, mode);
                }
                None => {
                    record.grants.remove(&volume_id);
                }
            }
            table
                .insert(name, encode(&record)?.as_slice())
                .map_err(internal)?;
            record
        };
        txn.commit().map_err(internal)?;
        // A changed grant ends the persisted session: the client attaches again, checked
        // against the new grant, and gets a new token.
        self.delete_sessions(|s| s.client == name && s.volume_id == volume_id)?;
        Ok(record)
    }

    /// The client's secret (hex), if the client exists.
    pub fn client_secret(&self, name: &str) -> StoreResult<Option<String>> {
        let txn = self.secrets.begin_read().map_err(internal)?;
        let table = txn.open_table(SECRETS).map_err(internal)?;
        let value = table.get(name).map_err(internal)?;
        Ok(value.map(|v| v.value().to_string()))
    }
}

fn read_volumes(table: &impl ReadableTable<u64, &'static [u8]>) -> StoreResult<Vec<VolumeRecord>> {
    let mut volumes = Vec::new();
    for entry in table.iter().map_err(internal)? {
        let (_, value) = entry.map_err(internal)?;
        volumes.push(decode(value.value())?);
    }
    Ok(volumes)
}

fn read_recoveries(
    table: &impl ReadableTable<u64, &'static [u8]>,
) -> StoreResult<Vec<RecoveryRecord>> {
    let mut recoveries = Vec::new();
    for entry in table.iter().map_err(internal)? {
        let (_, value) = entry.map_err(internal)?;
        recoveries.push(decode(value.value())?);
    }
    Ok(recoveries)
}

fn recovery_busy(volume_id: u64) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Busy,
        format!("volume {volume_id} is being recovered; retry when the recovery is done"),
    )
}

/// Free space given the devices, every volume's extents and the targets of unfinished
/// recoveries (allocated, but not yet in any volume).
fn pool_space_in(
    devices: &impl ReadableTable<u128, &'static [u8]>,
    volumes: &[VolumeRecord],
    recoveries: &[RecoveryRecord],
) -> StoreResult<PoolSpace> {
    let mut spaces = Vec::new();
    for entry in devices.iter().map_err(internal)? {
        let (_, value) = entry.map_err(internal)?;
        let device: DeviceRecord = decode(value.value())?;
        spaces.push(device.space());
    }
    let targets: Vec<Vec<Extent>> = recoveries
        .iter()
        .map(RecoveryRecord::target_extents)
        .collect();
    let used = volumes
        .iter()
        .map(|v| v.extents.as_slice())
        .chain(targets.iter().map(Vec::as_slice));
    PoolSpace::new(&spaces, used).map_err(alloc_error)
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

/// Most extents one map may have: a map travels in one frame (1 MiB), and a mirrored extent
/// takes about 210 bytes of JSON. Returning an error here (the transaction is dropped, nothing
/// is allocated) beats creating a volume no client could ever attach.
pub const MAX_EXTENTS_PER_MAP: usize = 4096;

fn check_map_fits(record: &VolumeRecord) -> StoreResult<()> {
    if record.extents.len() > MAX_EXTENTS_PER_MAP {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!(
                "volume {} would need {} extents; a map holds at most {MAX_EXTENTS_PER_MAP}",
                record.name,
                record.extents.len()
            ),
        ));
    }
    Ok(())
}

fn validate_name(kind: &str, name: &str) -> StoreResult<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("{kind} name {name:?} must be 1-64 characters of A-Z a-z 0-9 - _ ."),
        ))
    }
}

pub fn validate_volume_name(name: &str) -> StoreResult<()> {
    validate_name("volume", name)
}

pub fn validate_client_name(name: &str) -> StoreResult<()> {
    validate_name("client", name)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(unknown.map_err(|e| e.code).err(), Some(ErrorCode::NotFound));
        let unused = store.start_recovery(volume.id, Uuid::from_u128(2), "test");
        assert_eq!(
            unused.map_err(|e| e.code).err(),
            Some(ErrorCode::BadRequest)
        );

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
        assert_eq!(again.map_err(|e| e.code).err(), Some(ErrorCode::Busy));
        let grow = store.grow_volume(volume.id, 4 * MIB);
        assert_eq!(grow.map_err(|e| e.code).err(), Some(ErrorCode::Busy));
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

    fn test_store(name: &str) -> (PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!("sand-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(&dir, &dir.join("secrets.redb")).unwrap_or_else(|e| panic!("{e}"));
        (dir, store)
    }

    fn device(n: u128, size: u64) -> DeviceRecord {
        DeviceRecord {
            uuid: Uuid::from_u128(n),
            path: format!("/dev/test-{n}"),
            size_bytes: size,
            data_start: MIB,
            state: "online".into(),
        }
    }

    /// Where volume byte `at` lives (first replica).
    fn place(extents: &[Extent], at: u64) -> Option<Replica> {
        let extent = extents
            .iter()
            .find(|e| e.volume_offset <= at && at < e.volume_offset + e.length)?;
        extent
            .locate(at - extent.volume_offset)
            .and_then(|(replicas, _)| replicas.first().copied())
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
