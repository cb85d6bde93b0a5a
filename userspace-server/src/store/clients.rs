//! Clients: their grants (metadata) and secrets (secrets file).

use std::collections::BTreeMap;

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use sanblk_proto::map::AccessMode;

use super::{
    decode, decode_all, encode, not_found, validate_name, Store, StoreError, StoreResult, CLIENTS,
    SECRETS, VOLUMES,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub name: String,
    /// Volume id -> granted mode.
    pub grants: BTreeMap<u64, AccessMode>,
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
            };
            table.insert(name, encode(&record)?.as_slice())?;
        }
        Ok(txn.commit()?)
    }

    /// Removes a client and then its secret.
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
                    record.grants.insert(volume_id, mode);
                }
                None => {
                    record.grants.remove(&volume_id);
                }
            }
            table.insert(name, encode(&record)?.as_slice())?;
            record
        };
        txn.commit()?;
        // A changed grant ends the persisted session: the client attaches again, checked
        // against the new grant, and gets a new token.
        self.delete_sessions(|s| s.client == name && s.volume_id == volume_id)?;
        Ok(record)
    }

    /// The client's secret (hex), if the client exists.
    pub fn client_secret(&self, name: &str) -> StoreResult<Option<String>> {
        let txn = self.secrets.begin_read()?;
        let table = txn.open_table(SECRETS)?;
        let value = table.get(name)?;
        Ok(value.map(|v| v.value().to_string()))
    }
}

pub fn validate_client_name(name: &str) -> StoreResult<()> {
    validate_name("client", name)
}
