//! Session tokens of attachments, in the secrets file.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use sanblk_proto::map::AccessMode;

use super::clients::ClientRecord;
use super::volumes::VolumeRecord;
use super::{decode, encode, Store, StoreResult, CLIENTS, SESSIONS, SESSION_KEYS, VOLUMES};

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
    /// The id of the grant the token was issued under (`ClientRecord::grant_ids`); 0 for a
    /// grant stored before grant ids.
    #[serde(default)]
    pub grant_id: u64,
}

impl SessionRecord {
    /// Whether the metadata still backs this session: its client exists and holds the grant
    /// the token was issued under, in a mode that permits the session's.
    pub fn is_backed_by(&self, client: Option<&ClientRecord>) -> bool {
        client
            .and_then(|c| c.grant(self.volume_id))
            .is_some_and(|g| g.id == self.grant_id && g.mode.permits(self.mode))
    }
}

pub(super) fn session_key(client: &str, volume_id: u64) -> String {
    format!("{volume_id}:{client}")
}

impl Store {
    /// The persisted session of a token.
    pub fn session(&self, token: &str) -> StoreResult<Option<SessionRecord>> {
        let txn = self.secrets.begin_read()?;
        let table = txn.open_table(SESSIONS)?;
        let value = table.get(token)?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// The persisted session of a token if the metadata still backs it (see
    /// `SessionRecord::is_backed_by`), with the current epoch of its volume. What the I/O
    /// service accepts a token by when no live attachment holds it (after a restart).
    pub fn valid_session(&self, token: &str) -> StoreResult<Option<(SessionRecord, u64)>> {
        let Some(session) = self.session(token)? else {
            return Ok(None);
        };
        let txn = self.metadata.begin_read()?;
        let client: Option<ClientRecord> = txn
            .open_table(CLIENTS)?
            .get(session.client.as_str())?
            .map(|v| decode(v.value()))
            .transpose()?;
        if !session.is_backed_by(client.as_ref()) {
            return Ok(None);
        }
        let volume: Option<VolumeRecord> = txn
            .open_table(VOLUMES)?
            .get(session.volume_id)?
            .map(|v| decode(v.value()))
            .transpose()?;
        Ok(volume.map(|v| (session, v.epoch)))
    }

    /// The persisted sessions of a volume that the metadata still backs: attachments whose
    /// clients' kernels may still use their tokens (agent gone or not: a re-attach hands the
    /// token out again).
    pub fn backed_sessions_of_volume(&self, volume_id: u64) -> StoreResult<Vec<SessionRecord>> {
        let mut of_volume = Vec::new();
        {
            let txn = self.secrets.begin_read()?;
            for entry in txn.open_table(SESSIONS)?.iter()? {
                let (_, value) = entry?;
                let session: SessionRecord = decode(value.value())?;
                if session.volume_id == volume_id {
                    of_volume.push(session);
                }
            }
        }
        let txn = self.metadata.begin_read()?;
        let clients = txn.open_table(CLIENTS)?;
        let mut backed = Vec::new();
        for session in of_volume {
            let client: Option<ClientRecord> = clients
                .get(session.client.as_str())?
                .map(|v| decode(v.value()))
                .transpose()?;
            if session.is_backed_by(client.as_ref()) {
                backed.push(session);
            }
        }
        Ok(backed)
    }

    /// The persisted session of `client`'s attachment to a volume.
    pub fn session_of(&self, client: &str, volume_id: u64) -> StoreResult<Option<SessionRecord>> {
        let txn = self.secrets.begin_read()?;
        let keys = txn.open_table(SESSION_KEYS)?;
        let Some(token) = keys
            .get(session_key(client, volume_id).as_str())?
            .map(|v| v.value().to_string())
        else {
            return Ok(None);
        };
        let table = txn.open_table(SESSIONS)?;
        let value = table.get(token.as_str())?;
        value.map(|v| decode(v.value())).transpose()
    }

    /// Records (or updates) attachments' sessions, in one transaction. Written without waiting
    /// for the disk (redb `Eventual`): they survive a killed server, and one lost to a power
    /// loss only costs its client a new token.
    pub fn save_sessions(&self, sessions: &[SessionRecord]) -> StoreResult<()> {
        let mut txn = self.secrets.begin_write()?;
        txn.set_durability(redb::Durability::Eventual);
        {
            let mut keys = txn.open_table(SESSION_KEYS)?;
            let mut table = txn.open_table(SESSIONS)?;
            for session in sessions {
                let key = session_key(&session.client, session.volume_id);
                let previous = keys
                    .insert(key.as_str(), session.token.as_str())?
                    .map(|v| v.value().to_string());
                if let Some(previous) = previous.filter(|p| *p != session.token) {
                    table.remove(previous.as_str())?;
                }
                table.insert(session.token.as_str(), encode(session)?.as_slice())?;
            }
        }
        Ok(txn.commit()?)
    }

    /// Deletes the persisted sessions `doomed` selects (durably); returns them.
    pub fn delete_sessions(
        &self,
        doomed: impl Fn(&SessionRecord) -> bool,
    ) -> StoreResult<Vec<SessionRecord>> {
        let txn = self.secrets.begin_write()?;
        let removed = {
            let mut table = txn.open_table(SESSIONS)?;
            let mut removed = Vec::new();
            for entry in table.iter()? {
                let (_, value) = entry?;
                let session: SessionRecord = decode(value.value())?;
                if doomed(&session) {
                    removed.push(session);
                }
            }
            let mut keys = txn.open_table(SESSION_KEYS)?;
            for session in &removed {
                table.remove(session.token.as_str())?;
                keys.remove(session_key(&session.client, session.volume_id).as_str())?;
            }
            removed
        };
        txn.commit()?;
        Ok(removed)
    }
}
