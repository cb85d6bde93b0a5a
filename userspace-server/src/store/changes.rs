//! Configuration changes in progress (one per volume at most), persisted so that a server
//! killed at any step finishes the change (if it was committed) or rolls it back (if not)
//! when it starts again. See `crate::change` for the protocol.

use serde::{Deserialize, Serialize};

use super::{decode_all, encode, Store, StoreResult, CHANGES};

/// What a change does to its volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Allocate up to this size.
    Grow { new_size_bytes: u64 },
}

/// How far a change got. Before `Committed` the volume's record is untouched, so a restart
/// rolls the change back; `Committed` is written in the same transaction as the new volume
/// record, so a restart finishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeStep {
    /// Prepared and recorded; clients are being quiesced.
    Quiescing,
    /// Committed at `to_epoch`; clients are getting the new map, then `Resume`.
    Committed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub volume_id: u64,
    /// The volume's epoch when the change began (restored by a rollback).
    pub from_epoch: u64,
    /// The epoch the change commits (the prepared map's).
    pub to_epoch: u64,
    pub kind: ChangeKind,
    pub step: ChangeStep,
}

impl Store {
    /// Records a change (or its new step).
    pub fn save_change(&self, change: &ChangeRecord) -> StoreResult<()> {
        let txn = self.metadata.begin_write()?;
        txn.open_table(CHANGES)?
            .insert(change.volume_id, encode(change)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    pub fn changes(&self) -> StoreResult<Vec<ChangeRecord>> {
        let txn = self.metadata.begin_read()?;
        decode_all(&txn.open_table(CHANGES)?)
    }

    pub fn delete_change(&self, volume_id: u64) -> StoreResult<()> {
        let txn = self.metadata.begin_write()?;
        txn.open_table(CHANGES)?.remove(volume_id)?;
        txn.commit()?;
        Ok(())
    }
}
