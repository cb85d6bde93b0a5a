//! The one protocol for configuration changes of a volume: grow, the start, finish and cancel
//! of a relocation (recovery, move, mirror add) and mirror remove:
//!
//! 1. prepare: compute the new map (nothing committed) and refuse what cannot be done;
//! 2. persist a change record (volume, from-epoch, to-epoch, what, step `Quiescing`);
//! 3. push `Quiesce { volume_id, epoch }` to every attached client and wait for each one's
//!    `QuiesceAck`, or for its lease plus the in-flight bound to expire, which fences it;
//! 4. commit the new map and the step `Committed` in one metadata transaction;
//! 5. publish the map (`MapUpdate`) and wait for each client's `Ack`, or its lease;
//! 6. push `Resume { volume_id, epoch }` and delete the change record.
//!
//! A server killed before step 4 has changed nothing but the record: at start it deletes the
//! record (rollback). Killed after it, the change is committed: at start the record is
//! deleted too (finished). Either way the agents that reconnect get the current map and a
//! `Resume` at its epoch, since no change is then in progress (`ServerState::resume_if_idle`),
//! so no client holds I/O longer than its lease plus its io_timeout.
//!
//! Clients attaching while a change runs are quiesced too (every round pushes `Quiesce` to
//! attachments not yet sent one), so none writes with the old map once the change commits.

use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use tokio::time::Instant;

use sanblk_proto::protocol::{ErrorBody, ErrorCode};

use crate::failpoint::crash_point;
use crate::service_error::ServiceResult;
use crate::state::{blocking, ServerState, Waiting};
use crate::store::{ChangeKind, ChangeRecord, ChangeStep, StoreResult, VolumeRecord};

/// How often a waiting change looks at the clients' answers again.
const POLL: Duration = Duration::from_millis(20);
/// Longest wait for the change of the same volume before this one.
const MAX_QUEUED: Duration = Duration::from_secs(60);

/// Clears the volume's in-progress mark however the change ends.
struct InProgress<'a> {
    state: &'a ServerState,
    volume_id: u64,
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.state.end_change(self.volume_id);
    }
}

/// Runs the grow of `volume_id` to `new_size_bytes` through the change protocol. `committed`
/// is called with the new record right after the commit (before the clients have it), e.g.
/// to answer the client that asked for the grow. Returns the new record once every client
/// resumed or was fenced.
pub async fn grow(
    state: &Arc<ServerState>,
    volume_id: u64,
    new_size_bytes: u64,
    committed: impl FnOnce(&VolumeRecord),
) -> ServiceResult<VolumeRecord> {
    run(
        state,
        volume_id,
        ChangeKind::Grow { new_size_bytes },
        committed,
    )
    .await
}

/// Runs one change of `volume_id` through the protocol (module doc). `committed` is called
/// with the new record right after the commit, before the clients have it.
pub async fn run(
    state: &Arc<ServerState>,
    volume_id: u64,
    kind: ChangeKind,
    committed: impl FnOnce(&VolumeRecord),
) -> ServiceResult<VolumeRecord> {
    run_completing(state, volume_id, kind, |_, _| Ok(()), committed).await
}

/// [`run`], with `complete` filling in the change (blocking) once every client is quiesced,
/// just before the commit: what only a quiet volume shows (a snapshot's copied chunks).
pub async fn run_completing(
    state: &Arc<ServerState>,
    volume_id: u64,
    kind: ChangeKind,
    complete: impl FnOnce(&ServerState, &mut ChangeKind) -> ServiceResult<()> + Send + 'static,
    committed: impl FnOnce(&VolumeRecord),
) -> ServiceResult<VolumeRecord> {
    // Changes of one volume run one after the other: a change waits at most for the
    // clients' leases twice, so the one before it ends within a bounded time.
    let queued = Instant::now();
    while !state.begin_change(volume_id) {
        if queued.elapsed() > MAX_QUEUED {
            return Err(ErrorBody::new(
                ErrorCode::Busy,
                "another change of the volume is still in progress; retry later",
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    let _in_progress = InProgress { state, volume_id };
    // Prepare: refuses what cannot be done (size, space, devices) before any client is held.
    let planned_kind = kind.clone();
    let planned = blocking(state, move |s| {
        s.store.plan_change(volume_id, &planned_kind)
    })
    .await?;
    let change = ChangeRecord {
        volume_id,
        from_epoch: planned.epoch.saturating_sub(1),
        to_epoch: planned.epoch,
        kind,
        step: ChangeStep::Quiescing,
    };
    let record = change.clone();
    blocking(state, move |s| s.store.save_change(&record)).await?;
    crash_point("change:after-record");
    let started = Instant::now();
    wait_all(state, |s| s.quiesce_round(volume_id, change.from_epoch)).await;
    info!(
        "volume {volume_id}: clients quiesced at epoch {} for {} in {:?}",
        change.from_epoch,
        change.kind,
        started.elapsed()
    );
    crash_point("change:after-quiesce");
    let mut commit = change.clone();
    let record = match blocking(state, move |s| {
        complete(s, &mut commit.kind)?;
        s.store.commit_change(&commit).map_err(ErrorBody::from)
    })
    .await
    {
        Ok(record) => record,
        Err(error) => {
            rollback(state, &change).await;
            return Err(error);
        }
    };
    crash_point("change:after-commit");
    committed(&record);
    state.publish(&record);
    wait_all(state, |s| s.map_ack_round(volume_id, record.epoch)).await;
    crash_point("change:after-map-acks");
    state.send_resume(volume_id, record.epoch);
    if let Err(error) = blocking(state, move |s| s.store.delete_change(volume_id)).await {
        // Harmless: a restart finds it committed and only deletes it.
        warn!("volume {volume_id}: deleting the finished change record: {error}");
    }
    info!(
        "volume {volume_id}: change to epoch {} done in {:?}",
        record.epoch,
        started.elapsed()
    );
    Ok(record)
}

/// Runs `round` until no attachment is pending (each round fences the expired ones).
async fn wait_all(state: &Arc<ServerState>, round: impl Fn(&ServerState) -> Waiting) {
    loop {
        let waiting = round(state);
        for client in &waiting.fenced {
            warn!("client {client:?} fenced: no answer within its lease");
        }
        if waiting.pending == 0 {
            return;
        }
        let wake = waiting
            .next_expiry
            .map_or(POLL, |at| {
                at.saturating_duration_since(std::time::Instant::now())
            })
            .min(POLL);
        tokio::time::sleep(wake).await;
    }
}

/// Ends a change that did not commit: the clients resume at the old epoch.
async fn rollback(state: &Arc<ServerState>, change: &ChangeRecord) {
    let volume_id = change.volume_id;
    state.send_resume(volume_id, change.from_epoch);
    if let Err(error) = blocking(state, move |s| s.store.delete_change(volume_id)).await {
        warn!("volume {volume_id}: deleting the rolled-back change record: {error}");
    }
}

/// At start, before any agent is served: finishes committed changes and rolls back the
/// others. Either way only the record remains to delete (a rollback has nothing to undo:
/// the volume record is written only by the commit). Agents that reconnect get the current
/// map and a `Resume` at its epoch. Returns the rolled-back changes that an administrator
/// asked for and that must still happen (a relocation's start or cancel), to run again
/// once the server serves; a rolled-back grow or mirror remove was answered with an error.
pub fn recover_all(state: &ServerState) -> StoreResult<Vec<(u64, ChangeKind)>> {
    let mut redo = Vec::new();
    for change in state.store.changes()? {
        let current = state
            .store
            .volume_by_id(change.volume_id)
            .ok()
            .map(|v| v.epoch);
        match change.step {
            ChangeStep::Committed => info!(
                "volume {}: change to epoch {} was committed before the restart; finishing \
                 (epoch now {current:?})",
                change.volume_id, change.to_epoch
            ),
            ChangeStep::Quiescing => {
                info!(
                    "volume {}: change from epoch {} ({}) was not committed before the \
                     restart; rolled back (epoch now {current:?})",
                    change.volume_id, change.from_epoch, change.kind
                );
                if matches!(
                    change.kind,
                    ChangeKind::StartRelocation(_) | ChangeKind::CancelRelocation
                ) {
                    redo.push((change.volume_id, change.kind.clone()));
                }
            }
        }
        state.store.delete_change(change.volume_id)?;
    }
    Ok(redo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Flags};
    use crate::store::{DeviceRecord, Store};
    use sanblk_proto::map::Layout;

    fn state(dir: &std::path::Path) -> Arc<ServerState> {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir, &dir.join("secrets.redb")).unwrap_or_else(|e| panic!("{e}"));
        store
            .add_device(&DeviceRecord {
                uuid: uuid::Uuid::new_v4(),
                path: "/dev/null-test".into(),
                size_bytes: 64 << 20,
                data_start: 1 << 20,
                state: "online".into(),
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let config = Config::from_flags(Flags::default()).unwrap_or_else(|e| panic!("{e}"));
        ServerState::new(store, config)
    }

    /// A change record left at either step is resolved at start: committed keeps the new
    /// epoch, uncommitted leaves the old one; the record is gone either way.
    #[test]
    fn restart_finishes_committed_and_rolls_back_the_rest() {
        let dir = std::env::temp_dir().join(format!("sand-change-test-{}", std::process::id()));
        let state = state(&dir);
        let a = state
            .store
            .create_volume("a", 1 << 20, Layout::Linear)
            .unwrap_or_else(|e| panic!("{e}"));
        let b = state
            .store
            .create_volume("b", 1 << 20, Layout::Linear)
            .unwrap_or_else(|e| panic!("{e}"));
        let quiescing = ChangeRecord {
            volume_id: a.id,
            from_epoch: a.epoch,
            to_epoch: a.epoch + 1,
            kind: ChangeKind::Grow {
                new_size_bytes: 2 << 20,
            },
            step: ChangeStep::Quiescing,
        };
        state
            .store
            .save_change(&quiescing)
            .unwrap_or_else(|e| panic!("{e}"));
        let committed = ChangeRecord {
            volume_id: b.id,
            from_epoch: b.epoch,
            to_epoch: b.epoch + 1,
            ..quiescing.clone()
        };
        let grown = state
            .store
            .commit_change(&committed)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(grown.epoch, b.epoch + 1);
        // A second commit of the same change is refused: the volume moved on.
        assert!(state.store.commit_change(&committed).is_err());
        let steps: Vec<ChangeStep> = state
            .store
            .changes()
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|c| c.step)
            .collect();
        assert_eq!(steps, vec![ChangeStep::Quiescing, ChangeStep::Committed]);
        recover_all(&state).unwrap_or_else(|e| panic!("{e}"));
        assert!(state
            .store
            .changes()
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty());
        let epoch = |id| state.store.volume_by_id(id).map(|v| v.epoch).ok();
        assert_eq!(epoch(a.id), Some(a.epoch));
        assert_eq!(epoch(b.id), Some(b.epoch + 1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Nobody attached: the change goes straight through and leaves no record.
    #[tokio::test]
    async fn grow_without_clients_commits_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("sand-change-grow-{}", std::process::id()));
        let state = state(&dir);
        let volume = state
            .store
            .create_volume("v", 1 << 20, Layout::Linear)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut seen = None;
        let record = grow(&state, volume.id, 2 << 20, |r| seen = Some(r.epoch))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(record.epoch, volume.epoch + 1);
        assert_eq!(seen, Some(record.epoch));
        assert!(!state.change_in_progress(volume.id));
        assert!(state
            .store
            .changes()
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty());
        // A bad size is refused in the prepare step, with nothing recorded.
        assert!(grow(&state, volume.id, 1 << 20, |_| {}).await.is_err());
        assert!(state
            .store
            .changes()
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
