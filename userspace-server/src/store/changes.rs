//! Configuration changes in progress (one per volume at most), persisted so that a server
//! killed at any step finishes the change (if it was committed) or rolls it back (if not)
//! when it starts again. See `crate::change` for the protocol.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::recovery::RelocationRequest;
use super::snapshots::TakenAfter;
use super::volumes::VolumeRecord;
use super::{decode_all, encode, Store, StoreError, StoreResult, CHANGES, VOLUMES};

/// What a change does to its volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Allocate up to this size.
    Grow { new_size_bytes: u64 },
    /// Start copying extents to newly allocated places: the relocation record (targets
    /// allocated) is committed and the new map marks the moving extents syncing.
    StartRelocation(RelocationRequest),
    /// The copy is done: the targets take the moved replicas' places (or join them, for a
    /// mirror add) and the old space is freed.
    FinishRelocation,
    /// Abandon the relocation: its targets are freed, the extents stay where they are.
    CancelRelocation,
    /// Drop the replicas on this device from every mirrored extent.
    MirrorRemove { device: Uuid },
    /// Take a pending snapshot: from the new epoch on, writers copy into its store.
    SnapshotTake {
        snapshot_id: u64,
        created_unix: u64,
        /// What the active snapshots had copied when it was taken, read while the clients
        /// were quiesced (filled in just before the commit).
        #[serde(default)]
        taken: TakenAfter,
    },
    /// Drop a snapshot and free its store.
    SnapshotDrop { snapshot_id: u64 },
}

impl std::fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangeKind::Grow { new_size_bytes } => write!(f, "grow to {new_size_bytes} bytes"),
            ChangeKind::StartRelocation(request) => write!(f, "start {request}"),
            ChangeKind::FinishRelocation => f.write_str("finish relocation"),
            ChangeKind::CancelRelocation => f.write_str("cancel relocation"),
            ChangeKind::MirrorRemove { device } => write!(f, "remove mirror leg on {device}"),
            ChangeKind::SnapshotTake { snapshot_id, .. } => {
                write!(f, "take snapshot {snapshot_id}")
            }
            ChangeKind::SnapshotDrop { snapshot_id } => write!(f, "drop snapshot {snapshot_id}"),
        }
    }
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

    /// The record a change would commit now, committing nothing (a change's prepare step).
    pub fn plan_change(&self, volume_id: u64, kind: &ChangeKind) -> StoreResult<VolumeRecord> {
        let txn = self.metadata.begin_write()?;
        let record = apply_in(&txn, volume_id, kind)?;
        txn.abort()?;
        Ok(record)
    }

    /// Commits a change: its effect on the volume (a new epoch), and the change record's step
    /// `Committed`, in one transaction. Refused if the volume is no longer at `from_epoch`.
    pub fn commit_change(&self, change: &ChangeRecord) -> StoreResult<VolumeRecord> {
        let txn = self.metadata.begin_write()?;
        let current = decode_all::<u64, VolumeRecord>(&txn.open_table(VOLUMES)?)?
            .into_iter()
            .find(|v| v.id == change.volume_id)
            .map(|v| v.epoch);
        if current != Some(change.from_epoch) {
            return Err(StoreError::Busy(format!(
                "volume {} changed meanwhile (epoch {current:?}, change from {})",
                change.volume_id, change.from_epoch
            )));
        }
        let record = apply_in(&txn, change.volume_id, &change.kind)?;
        let mut committed = change.clone();
        committed.step = ChangeStep::Committed;
        committed.to_epoch = record.epoch;
        txn.open_table(CHANGES)?
            .insert(change.volume_id, encode(&committed)?.as_slice())?;
        txn.commit()?;
        Ok(record)
    }

    pub fn delete_change(&self, volume_id: u64) -> StoreResult<()> {
        let txn = self.metadata.begin_write()?;
        txn.open_table(CHANGES)?.remove(volume_id)?;
        txn.commit()?;
        Ok(())
    }
}

/// Writes the effect of `kind` on volume `volume_id` in `txn` (not committed): the volume's
/// new record, one epoch up.
fn apply_in(
    txn: &redb::WriteTransaction,
    volume_id: u64,
    kind: &ChangeKind,
) -> StoreResult<VolumeRecord> {
    match kind {
        ChangeKind::Grow { new_size_bytes } => {
            super::volumes::grow_in(txn, volume_id, *new_size_bytes)
        }
        ChangeKind::StartRelocation(request) => {
            super::recovery::start_relocation_in(txn, volume_id, request)?;
            super::volumes::bump_epoch_in(txn, volume_id)
        }
        ChangeKind::FinishRelocation => super::recovery::finish_relocation_in(txn, volume_id),
        ChangeKind::CancelRelocation => {
            super::recovery::cancel_relocation_in(txn, volume_id)?;
            super::volumes::bump_epoch_in(txn, volume_id)
        }
        ChangeKind::MirrorRemove { device } => {
            super::recovery::mirror_remove_in(txn, volume_id, *device)
        }
        ChangeKind::SnapshotTake {
            snapshot_id,
            created_unix,
            taken,
        } => super::snapshots::take_snapshot_in(txn, volume_id, *snapshot_id, taken, *created_unix),
        ChangeKind::SnapshotDrop { snapshot_id } => {
            super::snapshots::drop_snapshot_in(txn, volume_id, *snapshot_id)
        }
    }
}
