//! The administrator's snapshot commands: create (through the change protocol), list,
//! delete, and the changed chunks between two snapshots.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{info, warn};

use sanblk_proto::protocol::{
    ErrorBody, ErrorCode, SnapshotChanges, SnapshotCreate, SnapshotDelete, SnapshotDiff,
    SnapshotInfo, SnapshotList,
};
use sanblk_uapi::cow::DEFAULT_CHUNK_BYTES;

use crate::service_error::ServiceResult;
use crate::snapshot::cow::CowStore;
use crate::state::{blocking, ServerState};
use crate::store::{ChangeKind, SnapshotRecord, SnapshotState, TakenAfter, VolumeRecord};

/// Most chunk numbers in one `snapshot diff` reply (about 0.5 MB of JSON).
const DIFF_PAGE_CHUNKS: usize = 50_000;
/// Smallest default COW store: room for this many chunks.
const MIN_DEFAULT_COW_CHUNKS: u64 = 64;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn volume(state: &Arc<ServerState>, name: &str) -> ServiceResult<VolumeRecord> {
    let name = name.to_string();
    blocking(state, move |s| s.store.volume_by_name(&name)).await
}

pub async fn snapshot_create(
    request: SnapshotCreate,
    state: &Arc<ServerState>,
) -> ServiceResult<SnapshotInfo> {
    let volume = volume(state, &request.volume).await?;
    let chunk_bytes = request.chunk_bytes.unwrap_or(DEFAULT_CHUNK_BYTES);
    let cow_bytes = request.cow_bytes.unwrap_or_else(|| {
        (volume.size_bytes / 4).max(MIN_DEFAULT_COW_CHUNKS * u64::from(chunk_bytes) + (1 << 20))
    });
    let (volume_id, name) = (volume.id, request.name.clone());
    let pending = blocking(state, move |s| {
        s.store
            .reserve_snapshot(volume_id, &name, chunk_bytes, cow_bytes, unix_now())
    })
    .await?;
    let formatted = pending.clone();
    if let Err(error) = blocking(state, move |s| {
        CowStore::format(s.snapshots.devices(), &formatted)
            .map_err(|e| ErrorBody::new(ErrorCode::Io, format!("writing the COW store: {e}")))
    })
    .await
    {
        drop_pending(state, &pending).await;
        return Err(error);
    }
    let kind = ChangeKind::SnapshotTake {
        snapshot_id: pending.id,
        created_unix: unix_now(),
        taken: TakenAfter::default(),
    };
    let taken = crate::change::run_completing(
        state,
        volume_id,
        kind,
        move |s, kind| {
            if let ChangeKind::SnapshotTake {
                taken,
                created_unix,
                ..
            } = kind
            {
                *taken = taken_after(s, volume_id, chunk_bytes)?;
                *created_unix = unix_now();
            }
            Ok(())
        },
        |_| {},
    )
    .await;
    match taken {
        Ok(record) => {
            info!(
                "volume {}: snapshot {} taken at epoch {} ({} bytes of COW store, {}-byte chunks)",
                record.name, pending.name, record.epoch, pending.store_bytes, pending.chunk_bytes
            );
            let id = pending.id;
            let snapshot = blocking(state, move |s| {
                s.store
                    .snapshots_of(volume_id)
                    .map(|all| all.into_iter().find(|s| s.id == id))
            })
            .await?
            .ok_or_else(|| ErrorBody::new(ErrorCode::Internal, "snapshot vanished"))?;
            info_of(state, &record, snapshot).await
        }
        Err(error) => {
            drop_pending(state, &pending).await;
            Err(error)
        }
    }
}

/// What the volume's active snapshots have copied, read while its clients are quiesced; the
/// newest one's chunks become the new snapshot's changed list (in its `chunk_bytes`), its
/// size where the volume's growth since starts.
fn taken_after(s: &ServerState, volume_id: u64, chunk_bytes: u32) -> ServiceResult<TakenAfter> {
    let volume = s.store.volume_by_id(volume_id)?;
    let mut taken = TakenAfter::default();
    for older in s
        .store
        .snapshots_of(volume_id)?
        .into_iter()
        .filter(|o| o.state == SnapshotState::Active)
    {
        let copied = s
            .snapshots
            .copied_chunks(volume_id, volume.epoch, older.id)
            .map_err(|e| {
                ErrorBody::new(
                    ErrorCode::Io,
                    format!("reading snapshot {}'s COW store: {e}", older.name),
                )
            })?;
        // Invalidated meanwhile: no longer a base for anything.
        let Some((chunks, records, _)) = copied else {
            continue;
        };
        taken.records_of_older.push((older.id, records));
        let changed = in_chunks_of(&chunks, older.chunk_bytes, chunk_bytes);
        taken.previous = Some((older.id, changed));
        taken.previous_bytes = Some(older.origin_bytes);
    }
    Ok(taken)
}

/// The chunks of `chunk_bytes` that hold the chunks `copied` of `older_chunk_bytes`
/// (ascending both). The volume's growth is not listed (a grow of terabytes would make it
/// millions of entries): the size it starts at is kept beside the list.
fn in_chunks_of(copied: &[u64], older_chunk_bytes: u32, chunk_bytes: u32) -> Vec<u64> {
    let (older_chunk, chunk) = (u64::from(older_chunk_bytes), u64::from(chunk_bytes));
    if older_chunk == chunk {
        return copied.to_vec();
    }
    let mut changed: Vec<u64> = copied
        .iter()
        .flat_map(|&c| c * older_chunk / chunk..((c + 1) * older_chunk).div_ceil(chunk))
        .collect();
    changed.sort_unstable();
    changed.dedup();
    changed
}

async fn drop_pending(state: &Arc<ServerState>, pending: &SnapshotRecord) {
    let id = pending.id;
    if let Err(error) = blocking(state, move |s| s.store.delete_snapshot(id)).await {
        warn!(
            "snapshot {}: dropping the untaken snapshot: {}",
            pending.name, error.message
        );
    }
}

pub async fn snapshot_list(
    request: SnapshotList,
    state: &Arc<ServerState>,
) -> ServiceResult<Vec<SnapshotInfo>> {
    let volume = volume(state, &request.volume).await?;
    let volume_id = volume.id;
    let snapshots = blocking(state, move |s| s.store.snapshots_of(volume_id)).await?;
    let mut infos = Vec::with_capacity(snapshots.len());
    for snapshot in snapshots
        .into_iter()
        .filter(|s| s.state != SnapshotState::Pending)
    {
        infos.push(info_of(state, &volume, snapshot).await?);
    }
    Ok(infos)
}

async fn info_of(
    state: &Arc<ServerState>,
    volume: &VolumeRecord,
    snapshot: SnapshotRecord,
) -> ServiceResult<SnapshotInfo> {
    let (volume_id, epoch, id) = (volume.id, volume.epoch, snapshot.id);
    let copied = if snapshot.state == SnapshotState::Active {
        blocking(state, move |s| {
            s.snapshots
                .copied_chunks(volume_id, epoch, id)
                .map_err(|e| ErrorBody::new(ErrorCode::Io, e.to_string()))
        })
        .await?
    } else {
        None
    };
    // Read again: loading the store may have found it unreadable and invalidated it.
    let snapshot = match copied {
        Some(_) => snapshot,
        None => blocking(state, move |s| s.store.snapshots_of(volume_id))
            .await?
            .into_iter()
            .find(|s| s.id == id)
            .unwrap_or(snapshot),
    };
    let (changed, used) = copied.map_or((0, 0), |(chunks, records, _)| {
        (
            chunks.len() as u64,
            records * u64::from(snapshot.chunk_bytes),
        )
    });
    Ok(SnapshotInfo {
        id: snapshot.id,
        cow_store: snapshot.store_extents.clone(),
        export: format!("{}@{}", volume.name, snapshot.name),
        name: snapshot.name,
        volume: volume.name.clone(),
        state: match snapshot.state {
            SnapshotState::Pending => "pending",
            SnapshotState::Active => "active",
            SnapshotState::Invalid => "invalid",
        }
        .to_string(),
        reason: snapshot.invalid_reason,
        created_unix: snapshot.created_unix,
        epoch: snapshot.epoch,
        size_bytes: snapshot.origin_bytes,
        chunk_bytes: snapshot.chunk_bytes,
        cow_bytes: snapshot.store_bytes,
        cow_used_bytes: used,
        changed_chunks: changed,
        reported_chunks: state.snapshots.reported_chunks(snapshot.id),
        nbd_socket: state.config.nbd_socket.display().to_string(),
    })
}

pub async fn snapshot_delete(
    request: SnapshotDelete,
    state: &Arc<ServerState>,
) -> ServiceResult<SnapshotInfo> {
    let volume = volume(state, &request.volume).await?;
    let (volume_id, name) = (volume.id, request.name.clone());
    let snapshot = blocking(state, move |s| s.store.snapshot_named(volume_id, &name)).await?;
    let info = info_of(state, &volume, snapshot.clone()).await?;
    let record = crate::change::run(
        state,
        volume_id,
        ChangeKind::SnapshotDrop {
            snapshot_id: snapshot.id,
        },
        |_| {},
    )
    .await?;
    info!(
        "volume {}: snapshot {} deleted at epoch {}",
        record.name, snapshot.name, record.epoch
    );
    // What it was up to its deletion, marked deleted: its store and export are gone.
    Ok(SnapshotInfo {
        state: "deleted".to_string(),
        reason: None,
        ..info
    })
}

pub async fn snapshot_diff(
    request: SnapshotDiff,
    state: &Arc<ServerState>,
) -> ServiceResult<SnapshotChanges> {
    let volume = volume(state, &request.volume).await?;
    let (volume_id, epoch) = (volume.id, volume.epoch);
    let (from_name, to_name) = (request.from.clone(), request.to.clone());
    let chunks = blocking(state, move |s| -> ServiceResult<(u32, Vec<u64>)> {
        let from = s.store.snapshot_named(volume_id, &from_name)?;
        let to = s.store.snapshot_named(volume_id, &to_name)?;
        changed_between(s, volume_id, epoch, &from, &to)
    })
    .await?;
    let (chunk_bytes, chunks) = chunks;
    let start = chunks.partition_point(|&c| c < request.start_chunk);
    let page: Vec<u64> = chunks[start..]
        .iter()
        .take(DIFF_PAGE_CHUNKS)
        .copied()
        .collect();
    let next_chunk = chunks.get(start + page.len()).copied();
    Ok(SnapshotChanges {
        chunk_bytes,
        chunks: page,
        next_chunk,
    })
}

/// The chunks written after `from` was taken and before `to` was, ascending, and their size:
/// `from`'s (its records are the ground truth; the list `to` keeps of its previous
/// snapshot's changes, in `to`'s chunk size, serves when the two sizes are one).
pub fn changed_between(
    s: &ServerState,
    volume_id: u64,
    epoch: u64,
    from: &SnapshotRecord,
    to: &SnapshotRecord,
) -> ServiceResult<(u32, Vec<u64>)> {
    if from.id >= to.id {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!(
                "snapshot {} was not taken before {}: give the older one first",
                from.name, to.name
            ),
        ));
    }
    // A chunk `from` had only part of, and the volume grew into, counts as grown for block
    // status; whether it was written, the records say.
    let chunk = u64::from(to.chunk_bytes);
    let grown_within_a_chunk =
        to.origin_bytes > from.origin_bytes && !from.origin_bytes.is_multiple_of(chunk);
    if to.previous == Some(from.id) && from.chunk_bytes == to.chunk_bytes && !grown_within_a_chunk {
        if let Some(changed) = &to.changed_since_previous {
            let end = from.origin_bytes.div_ceil(chunk);
            let written = changed.iter().copied().filter(|&c| c < end).collect();
            return Ok((to.chunk_bytes, written));
        }
    }
    let records_then = to
        .records_of_older
        .iter()
        .find(|(id, _)| *id == from.id)
        .map(|(_, records)| *records);
    let copied = match (from.state, records_then) {
        (SnapshotState::Active, Some(records)) => s
            .snapshots
            .copied_records(volume_id, epoch, from.id, records)
            .map_err(|e| ErrorBody::new(ErrorCode::Io, e.to_string()))?,
        _ => None,
    };
    copied.map(|chunks| (from.chunk_bytes, chunks)).ok_or_else(|| {
        ErrorBody::new(
            ErrorCode::BadRequest,
            format!(
                "the changes between {} and {} are not known: {} is invalid or was not active when {} was taken",
                from.name, to.name, from.name, to.name
            ),
        )
    })
}
