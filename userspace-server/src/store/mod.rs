//! Persistent metadata in redb (embedded, ACID). Every mutation is one write transaction, so
//! an allocation and the volume record that owns it commit together: a crash (even kill -9)
//! leaves either the old or the new state, never space allocated twice or lost. Free space is
//! not stored at all; it is derived from the volumes' extents.
//!
//! Client secrets live in a second redb file (the secrets file, mode 0600) so the main
//! metadata can be copied around for debugging without leaking secrets. The two files are
//! committed one after the other, so the metadata is the authority: a secret counts only for
//! a client the metadata lists, and a session token only while the metadata still holds the
//! grant it was issued under (same client, volume and grant id, a mode the grant permits).
//! Revoking is one metadata commit; deleting the secret and sessions after it is cleanup, and
//! a crash in between leaves nothing that is accepted.

//!
//! `Store` is one type; its methods are split by concern: `pool` (devices, free space),
//! `volumes`, `recovery`, `clients` and `sessions`. This module holds what they share: the
//! tables, the error type, the record encoding and opening the databases.

mod changes;
mod clients;
mod pool;
mod recovery;
mod sessions;
mod snapshots;
#[cfg(test)]
mod testing;
mod volumes;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::allocator::AllocError;

pub use changes::{ChangeKind, ChangeRecord, ChangeStep};
pub use clients::Grant;
pub use pool::{DeviceRecord, DEVICE_FAILED};
pub use recovery::{RecoveryRecord, RecoverySegment, RelocationRequest};
pub use sessions::SessionRecord;
pub use snapshots::{SnapshotRecord, SnapshotState, TakenAfter};
pub use volumes::VolumeRecord;

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

/// Volume id -> unfinished `RecoveryRecord` (at most one per volume).
const RECOVERIES: TableDefinition<u64, &[u8]> = TableDefinition::new("recoveries");
/// Snapshots by id (see `snapshots`).
const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");
/// Volume id -> `ChangeRecord` of the configuration change in progress (at most one per
/// volume).
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");

const POOL_UUID_KEY: &str = "pool_uuid";
const NEXT_VOLUME_ID_KEY: &str = "next_volume_id";
/// The id the next grant gets (see `ClientRecord::grant_ids`).
const NEXT_GRANT_ID_KEY: &str = "next_grant_id";
const METADATA_FILE: &str = "metadata.redb";

/// What can go wrong in the store, in the store's terms. The services turn it into the wire
/// error where they answer (the `service_error` module).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// redb failed, or a stored record does not decode: nothing the caller did wrong.
    #[error("metadata store: {0}")]
    Database(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request cannot be done as asked (a bad name or size, a device the volume does not
    /// use, a map that would not fit in a frame).
    #[error("{0}")]
    Invalid(String),
    /// A recovery of the volume is in progress.
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

/// redb's and serde_json's errors are all the store's own failure (`Database`), whatever the
/// step; one conversion each lets storage code use `?`.
macro_rules! database_errors {
    ($($error:ty),* $(,)?) => {$(
        impl From<$error> for StoreError {
            fn from(error: $error) -> StoreError {
                StoreError::Database(error.to_string())
            }
        }
    )*};
}

database_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error,
);

pub type StoreResult<T> = Result<T, StoreError>;

fn encode<T: Serialize>(value: &T) -> StoreResult<Vec<u8>> {
    Ok(serde_json::to_vec(value)?)
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> StoreResult<T> {
    Ok(serde_json::from_slice(bytes)?)
}

/// Decodes every record of a table, in key order.
fn decode_all<K: redb::Key + 'static, T: for<'de> Deserialize<'de>>(
    table: &impl ReadableTable<K, &'static [u8]>,
) -> StoreResult<Vec<T>> {
    let mut records = Vec::new();
    for entry in table.iter()? {
        let (_, value) = entry?;
        records.push(decode(value.value())?);
    }
    Ok(records)
}

/// Takes the next id of the counter at `key` in the META table (1 for the first).
fn take_next_id(meta: &mut redb::Table<&str, &[u8]>, key: &str) -> StoreResult<u64> {
    let id = match meta.get(key)? {
        Some(bytes) => bytes
            .value()
            .try_into()
            .map(u64::from_le_bytes)
            .map_err(|_| StoreError::Database(format!("corrupt {key}")))?,
        None => 1,
    };
    meta.insert(key, (id + 1).to_le_bytes().as_slice())?;
    Ok(id)
}

fn not_found(what: &str, name: &str) -> StoreError {
    StoreError::NotFound(format!("no {what} named {name:?}"))
}

/// Creates (or opens) a redb file and restricts it to the owner.
fn open_database(path: &Path) -> StoreResult<Database> {
    let database = Database::create(path)
        .map_err(|e| StoreError::Database(format!("{}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| StoreError::Database(format!("{}: {e}", path.display())))?;
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
        let txn = metadata.begin_write()?;
        let pool_uuid = {
            let mut meta = txn.open_table(META)?;
            txn.open_table(DEVICES)?;
            txn.open_table(VOLUMES)?;
            txn.open_table(CLIENTS)?;
            txn.open_table(RECOVERIES)?;
            txn.open_table(CHANGES)?;
            txn.open_table(SNAPSHOTS)?;
            let existing = meta.get(POOL_UUID_KEY)?.map(|v| v.value().to_vec());
            match existing {
                Some(bytes) => {
                    Uuid::from_slice(&bytes).map_err(|e| StoreError::Database(e.to_string()))?
                }
                None => {
                    let fresh = Uuid::new_v4();
                    meta.insert(POOL_UUID_KEY, fresh.as_bytes().as_slice())?;
                    fresh
                }
            }
        };
        txn.commit()?;
        let txn = secrets.begin_write()?;
        txn.open_table(SECRETS)?;
        txn.open_table(SESSIONS)?;
        txn.open_table(SESSION_KEYS)?;
        txn.commit()?;
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

    pub fn pool_uuid(&self) -> Uuid {
        self.pool_uuid
    }
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
        Err(StoreError::Invalid(format!(
            "{kind} name {name:?} must be 1-64 characters of A-Z a-z 0-9 - _ ."
        )))
    }
}
