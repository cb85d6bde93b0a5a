//! Clients: their grants (metadata) and secrets (secrets file).

use std::collections::BTreeMap;

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use sanblk_proto::map::AccessMode;

use super::{
    decode, decode_all, encode, not_found, take_next_id, validate_name, Store, StoreError,
    StoreResult, CLIENTS, META, NEXT_GRANT_ID_KEY, SECRETS, VOLUMES,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub name: String,
    /// Volume id -> granted mode.
    pub grants: BTreeMap<u64, AccessMode>,
    /// Volume id -> id of the grant, new for every `set_grant`, never reused. A session token
    /// is valid only under the grant id it was issued with, so changing or revoking a grant
    /// (or removing and re-adding the client) ends its tokens in the same commit. Grants
    /// stored before grant ids have none (id 0, as have their sessions).
    #[serde(default)]
    pub grant_ids: BTreeMap<u64, u64>,
}

/// A client's grant on one volume, as sessions are checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub mode: AccessMode,
    pub id: u64,
}

impl ClientRecord {
    pub fn grant(&self, volume_id: u64) -> Option<Grant> {
        let mode = *self.grants.get(&volume_id)?;
        let id = self.grant_ids.get(&volume_id).copied().unwrap_or(0);
        Some(Grant { mode, id })
    }
}

impl Store {
    pub fn clients(&self) -> StoreResult<Vec<ClientRecord>> {
        let txn = self.metadata.begin_read()?;
        decode_all(&txn.open_table(CLIENTS)?)
    }

    pub fn client(&self, name: &str) -> StoreResult<Option<ClientRecord>> {
        let txn = self.metadata.begin_read()?;
        let table = txn.open_table(CLIENTS)?;
        let value = table.get(name)?;
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
            return Err(StoreError::AlreadyExists(format!(
                "client {name:?} already exists"
            )));
        }
        let txn = self.secrets.begin_write()?;
        txn.open_table(SECRETS)?.insert(name, secret_hex)?;
        txn.commit()?;
        let txn = self.metadata.begin_write()?;
        {
            let mut table = txn.open_table(CLIENTS)?;
            if table.get(name)?.is_some() {
                return Err(StoreError::AlreadyExists(format!(
                    "client {name:?} already exists"
                )));
            }
            let record = ClientRecord {
                name: name.to_string(),
                grants: BTreeMap::new(),
                grant_ids: BTreeMap::new(),
            };
            table.insert(name, encode(&record)?.as_slice())?;
        }
        Ok(txn.commit()?)
    }

    /// Removes a client, then its secret and sessions. The first commit is the one that
    /// counts: neither is accepted without the client record.
    pub fn remove_client(&self, name: &str) -> StoreResult<()> {
        let _serialized = self
            .client_changes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let txn = self.metadata.begin_write()?;
        {
            let mut table = txn.open_table(CLIENTS)?;
            if table.remove(name)?.is_none() {
                return Err(not_found("client", name));
            }
        }
        txn.commit()?;
        crate::failpoint::crash_point("client-remove:after-metadata");
        let txn = self.secrets.begin_write()?;
        txn.open_table(SECRETS)?.remove(name)?;
        txn.commit()?;
        self.delete_sessions(|s| s.client == name).map(|_| ())
    }

    /// Sets (`Some`) or removes (`None`) a client's grant on a volume.
    pub fn set_grant(
        &self,
        name: &str,
        volume_id: u64,
        mode: Option<AccessMode>,
    ) -> StoreResult<ClientRecord> {
        let txn = self.metadata.begin_write()?;
        let record = {
            let mut table = txn.open_table(CLIENTS)?;
            let current = table.get(name)?.map(|v| v.value().to_vec());
            let mut record: ClientRecord = match current {
                Some(bytes) => decode(&bytes)?,
                None => return Err(not_found("client", name)),
            };
            let volumes = txn.open_table(VOLUMES)?;
            if volumes.get(volume_id)?.is_none() {
                return Err(StoreError::NotFound(format!(
                    "no volume with id {volume_id}"
                )));
            }
            match mode {
                Some(mode) => {
                    let id = take_next_id(&mut txn.open_table(META)?, NEXT_GRANT_ID_KEY)?;
                    record.grants.insert(volume_id, mode);
                    record.grant_ids.insert(volume_id, id);
                }
                None => {
                    record.grants.remove(&volume_id);
                    record.grant_ids.remove(&volume_id);
                }
            }
            table.insert(name, encode(&record)?.as_slice())?;
            record
        };
        txn.commit()?;
        crate::failpoint::crash_point("grant:after-metadata");
        // A changed grant ends the persisted session: the client attaches again, checked
        // against the new grant, and gets a new token. The commit above already made the
        // old token invalid (its grant id is gone); this only removes the record.
        self.delete_sessions(|s| s.client == name && s.volume_id == volume_id)?;
        Ok(record)
    }

    /// The client's secret (hex), if the client exists: a secret the metadata no longer
    /// backs (a removal interrupted between its two commits) is not one.
    pub fn client_secret(&self, name: &str) -> StoreResult<Option<String>> {
        if self.client(name)?.is_none() {
            return Ok(None);
        }
        let txn = self.secrets.begin_read()?;
        let table = txn.open_table(SECRETS)?;
        let value = table.get(name)?;
        Ok(value.map(|v| v.value().to_string()))
    }
}

pub fn validate_client_name(name: &str) -> StoreResult<()> {
    validate_name("client", name)
}
