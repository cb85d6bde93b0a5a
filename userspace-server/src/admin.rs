//! Admin service: `sanctl` requests over the Unix socket (mode 0600, so only root or the
//! server's own user can connect; there is no further authentication).

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;

use log::{info, warn};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::watch;
use uuid::Uuid;

use sanblk_proto::label::{self, Label, LabelError, DATA_START_OFFSET};
use sanblk_proto::map::{AccessMode, VolumeMap};
use sanblk_proto::protocol::{
    encode_frame, write_frame, AdminCall, AdminReply, AdminRequest, ClientAdd, ClientAttachment,
    ClientCreated, ClientGrant, ClientInfo, ClientList, ClientRemove, ClientRemoved, ClientRevoke,
    DeviceInfo, ErrorBody, ErrorCode, FrameError, FrameReader, GrantedVolume, MirrorAdd,
    MirrorRemove, PoolAdd, PoolEvacuate, PoolList, RecoveryList, RecoveryStart, SnapshotCreate,
    SnapshotDelete, SnapshotDiff, SnapshotList, VolumeCreate, VolumeDelete, VolumeDeleted,
    VolumeDetail, VolumeGrow, VolumeList, VolumeMove, VolumeShow, VolumeSummary,
    MAX_LISTED_ATTACHMENTS,
};

use crate::labelling;
use crate::log_text::peer_text;
use crate::relocation_admin;
use crate::secrets;
use crate::service_error::ServiceResult;
use crate::snapshot_admin;
use crate::state::{blocking, ServerState};
use crate::store::{DeviceRecord, StoreResult};

/// Smallest device accepted: the label area plus 1 MiB of data.
const MIN_DEVICE_BYTES: u64 = DATA_START_OFFSET + 1024 * 1024;

pub async fn serve_admin_connection(
    stream: UnixStream,
    state: Arc<ServerState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = FrameReader::new(read_half);
    loop {
        let request = tokio::select! {
            _ = shutdown.changed() => return,
            request = reader.read::<AdminRequest>() => request,
        };
        let reply = match request {
            Ok(request) => handle(request, &state).await,
            Err(FrameError::Closed) => return,
            Err(error) => {
                warn!(
                    "admin connection: {}; closing it",
                    peer_text(&error.to_string())
                );
                let body = ErrorBody::new(ErrorCode::BadFrame, error.to_string());
                let _ = write_frame(&mut write_half, &error_reply(body)).await;
                return;
            }
        };
        let written = match reply {
            Ok(frame) => write_encoded(&mut write_half, &frame).await,
            // The reply alone was too big: say so instead of leaving the caller waiting.
            Err(FrameError::Oversized(size)) => {
                let body = ErrorBody::new(
                    ErrorCode::Internal,
                    format!("reply of {size} bytes exceeds the frame limit"),
                );
                write_frame(&mut write_half, &error_reply(body)).await
            }
            Err(error) => Err(error),
        };
        if let Err(error) = written {
            warn!("admin connection: cannot reply: {error}");
            return;
        }
    }
}

/// An error answer; its shape does not depend on the reply type it stands in for.
fn error_reply(body: ErrorBody) -> AdminReply<()> {
    AdminReply::Error(body)
}

async fn write_encoded(writer: &mut OwnedWriteHalf, frame: &[u8]) -> Result<(), FrameError> {
    writer.write_all(frame).await?;
    writer.flush().await?;
    Ok(())
}

/// Runs one request and encodes its answer. Each handler returns the reply type its request
/// is paired with (`AdminCall::Reply`), which `reply_frame::<Request>` checks.
async fn handle(request: AdminRequest, state: &Arc<ServerState>) -> Result<Vec<u8>, FrameError> {
    match request {
        AdminRequest::PoolAdd(request) => reply_frame::<PoolAdd>(pool_add(request, state).await),
        AdminRequest::PoolList(PoolList {}) => reply_frame::<PoolList>(device_infos(state).await),
        AdminRequest::VolumeCreate(request) => {
            reply_frame::<VolumeCreate>(volume_create(request, state).await)
        }
        AdminRequest::VolumeGrow(request) => {
            reply_frame::<VolumeGrow>(volume_grow(request, state).await)
        }
        AdminRequest::VolumeDelete(request) => {
            reply_frame::<VolumeDelete>(volume_delete(request, state).await)
        }
        AdminRequest::VolumeList(VolumeList {}) => {
            reply_frame::<VolumeList>(volume_list(state).await)
        }
        AdminRequest::VolumeShow(request) => {
            reply_frame::<VolumeShow>(volume_show(request, state).await)
        }
        AdminRequest::ClientAdd(request) => {
            reply_frame::<ClientAdd>(client_add(request, state).await)
        }
        AdminRequest::ClientGrant(request) => {
            reply_frame::<ClientGrant>(client_grant(request, state).await)
        }
        AdminRequest::ClientRevoke(request) => {
            reply_frame::<ClientRevoke>(client_revoke(request, state).await)
        }
        AdminRequest::ClientRemove(request) => {
            reply_frame::<ClientRemove>(client_remove(request, state).await)
        }
        AdminRequest::ClientList(ClientList {}) => {
            reply_frame::<ClientList>(client_infos(state).await)
        }
        AdminRequest::RecoveryList(RecoveryList {}) => {
            reply_frame::<RecoveryList>(Ok(state.recoveries.statuses()))
        }
        AdminRequest::VolumeMove(request) => {
            reply_frame::<VolumeMove>(relocation_admin::volume_move(request, state).await)
        }
        AdminRequest::PoolEvacuate(request) => {
            reply_frame::<PoolEvacuate>(relocation_admin::pool_evacuate(request, state).await)
        }
        AdminRequest::MirrorAdd(request) => {
            reply_frame::<MirrorAdd>(relocation_admin::mirror_add(request, state).await)
        }
        AdminRequest::MirrorRemove(request) => {
            reply_frame::<MirrorRemove>(relocation_admin::mirror_remove(request, state).await)
        }
        AdminRequest::RecoveryStart(request) => {
            reply_frame::<RecoveryStart>(relocation_admin::recovery_start(request, state).await)
        }
        AdminRequest::SnapshotCreate(request) => {
            reply_frame::<SnapshotCreate>(snapshot_admin::snapshot_create(request, state).await)
        }
        AdminRequest::SnapshotList(request) => {
            reply_frame::<SnapshotList>(snapshot_admin::snapshot_list(request, state).await)
        }
        AdminRequest::SnapshotDelete(request) => {
            reply_frame::<SnapshotDelete>(snapshot_admin::snapshot_delete(request, state).await)
        }
        AdminRequest::SnapshotDiff(request) => {
            reply_frame::<SnapshotDiff>(snapshot_admin::snapshot_diff(request, state).await)
        }
    }
}

fn reply_frame<R: AdminCall>(result: ServiceResult<R::Reply>) -> Result<Vec<u8>, FrameError> {
    match result {
        Ok(result) => encode_frame(&AdminReply::Ok { result }),
        Err(error) => encode_frame(&AdminReply::<R::Reply>::Error(error)),
    }
}

async fn pool_add(request: PoolAdd, state: &Arc<ServerState>) -> ServiceResult<Option<DeviceInfo>> {
    let PoolAdd { path, force } = request;
    let device = blocking(state, move |s| add_device(s, Path::new(&path), force)).await?;
    info!(
        "pool: added {} as device {} ({} bytes)",
        device.path, device.uuid, device.size_bytes
    );
    crate::recovery::start_waiting_for_space(state).await;
    Ok(device_infos(state)
        .await?
        .into_iter()
        .find(|d| d.uuid == device.uuid))
}

async fn volume_create(
    request: VolumeCreate,
    state: &Arc<ServerState>,
) -> ServiceResult<VolumeMap> {
    let VolumeCreate {
        name,
        size_bytes,
        layout,
    } = request;
    let record = blocking(state, move |s| {
        s.store.create_volume(&name, size_bytes, layout)
    })
    .await?;
    info!(
        "volume {} (id {}) created: {} bytes, {}",
        record.name, record.id, record.size_bytes, record.layout
    );
    Ok(record.map(state.config.lease_ms))
}

async fn volume_grow(request: VolumeGrow, state: &Arc<ServerState>) -> ServiceResult<VolumeMap> {
    let VolumeGrow {
        name,
        new_size_bytes,
    } = request;
    let volume = blocking(state, move |s| s.store.volume_by_name(&name)).await?;
    let record = crate::change::grow(state, volume.id, new_size_bytes, |_| {}).await?;
    info!(
        "volume {} grown to {} bytes, epoch {}",
        record.name, record.size_bytes, record.epoch
    );
    Ok(record.map(state.config.lease_ms))
}

async fn volume_delete(
    request: VolumeDelete,
    state: &Arc<ServerState>,
) -> ServiceResult<VolumeDeleted> {
    let VolumeDelete { name, force } = request;
    let (record, snapshots) = blocking(state, move |s| {
        let volume = s.store.volume_by_name(&name)?;
        s.delete_volume(volume.id, force)
    })
    .await?;
    let snapshots_deleted: Vec<String> = snapshots.into_iter().map(|s| s.name).collect();
    info!(
        "volume {} (id {}) deleted{}{}",
        record.name,
        record.id,
        if force {
            " (forced: its attachments were ended)"
        } else {
            ""
        },
        if snapshots_deleted.is_empty() {
            String::new()
        } else {
            format!(" with its snapshots {}", snapshots_deleted.join(", "))
        }
    );
    Ok(VolumeDeleted {
        deleted: record.name,
        snapshots_deleted,
    })
}

async fn volume_list(state: &Arc<ServerState>) -> ServiceResult<Vec<VolumeSummary>> {
    let volumes = blocking(state, |s| s.store.volumes()).await?;
    Ok(volumes
        .into_iter()
        .map(|v| VolumeSummary {
            id: v.id,
            extent_count: v.extents.len(),
            name: v.name,
            size_bytes: v.size_bytes,
            layout: v.layout,
            epoch: v.epoch,
        })
        .collect())
}

async fn volume_show(request: VolumeShow, state: &Arc<ServerState>) -> ServiceResult<VolumeDetail> {
    let record = blocking(state, move |s| s.store.volume_by_name(&request.name)).await?;
    let (attachment_count, acked_current_epoch, attachments) =
        state.attachments(record.id, record.epoch, MAX_LISTED_ATTACHMENTS);
    Ok(VolumeDetail {
        map: state.client_map(&record)?,
        attachment_count,
        acked_current_epoch,
        attachments,
        recovery: state.recoveries.status(record.id),
        nbd_socket: state.config.nbd_socket.display().to_string(),
    })
}

async fn client_add(request: ClientAdd, state: &Arc<ServerState>) -> ServiceResult<ClientCreated> {
    let name = request.name;
    let secret = secrets::new_secret_hex();
    let stored = secret.clone();
    let client = name.clone();
    blocking(state, move |s| s.store.add_client(&client, &stored)).await?;
    info!("client {name} added");
    Ok(ClientCreated { name, secret })
}

async fn client_grant(
    request: ClientGrant,
    state: &Arc<ServerState>,
) -> ServiceResult<Option<ClientInfo>> {
    let ClientGrant { name, volume, mode } = request;
    let client = name.clone();
    let volume_id = blocking(state, move |s| {
        let volume = s.store.volume_by_name(&volume)?;
        s.store
            .set_grant(&client, volume.id, Some(mode))
            .map(|_| volume.id)
    })
    .await?;
    // A downgrade to ro must not leave a read-write attachment in place.
    if mode == AccessMode::Ro {
        state.end_attachments(&name, Some(volume_id));
        state.disconnect_client(&name);
    }
    info!("client {name}: grant changed");
    client_info(state, &name).await
}

async fn client_revoke(
    request: ClientRevoke,
    state: &Arc<ServerState>,
) -> ServiceResult<Option<ClientInfo>> {
    let ClientRevoke { name, volume } = request;
    let client = name.clone();
    let volume_id = blocking(state, move |s| {
        let volume = s.store.volume_by_name(&volume)?;
        s.store
            .set_grant(&client, volume.id, None)
            .map(|_| volume.id)
    })
    .await?;
    let leases_end = state.end_attachments(&name, Some(volume_id));
    state.disconnect_client(&name);
    // Answered once the client is fenced: its kernel stops direct I/O when its lease lapses,
    // and what it had issued lands within the in-flight bound.
    if let Some(at) = leases_end {
        info!(
            "client {name}: grant revoked; waiting {:?} for its lease to expire",
            at.saturating_duration_since(std::time::Instant::now())
        );
        tokio::time::sleep_until(at.into()).await;
    }
    info!("client {name}: grant revoked, client fenced");
    client_info(state, &name).await
}

async fn client_remove(
    request: ClientRemove,
    state: &Arc<ServerState>,
) -> ServiceResult<ClientRemoved> {
    let name = request.name;
    let client = name.clone();
    blocking(state, move |s| s.store.remove_client(&client)).await?;
    state.end_attachments(&name, None);
    state.disconnect_client(&name);
    info!("client {name} removed");
    Ok(ClientRemoved { removed: name })
}

async fn client_info(state: &Arc<ServerState>, name: &str) -> ServiceResult<Option<ClientInfo>> {
    Ok(client_infos(state)
        .await?
        .into_iter()
        .find(|c| c.name == name))
}

async fn device_infos(server: &Arc<ServerState>) -> ServiceResult<Vec<DeviceInfo>> {
    let (mut devices, pool) = blocking(server, |s| s.store.pool_space()).await?;
    devices.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(devices
        .into_iter()
        .map(|d| {
            let free_bytes = pool.free_bytes(d.uuid);
            let state = if Path::new(&d.path).exists() {
                d.state.clone()
            } else {
                "missing".to_string()
            };
            DeviceInfo {
                uuid: d.uuid,
                capacity_bytes: d.space().capacity(),
                size_bytes: d.size_bytes,
                path: d.path,
                free_bytes,
                state,
                path_failed_on: server.recoveries.path_failures(d.uuid),
            }
        })
        .collect())
}

async fn client_infos(state: &Arc<ServerState>) -> ServiceResult<Vec<ClientInfo>> {
    blocking(state, |s| -> StoreResult<_> {
        let volumes = s.store.volumes()?;
        let clients = s.store.clients()?;
        let names: HashMap<u64, &str> = volumes.iter().map(|v| (v.id, v.name.as_str())).collect();
        let mut attachments: HashMap<String, Vec<ClientAttachment>> = HashMap::new();
        for (client, volume_id, mode, lease_left_ms, disconnected) in s.all_attachments() {
            attachments
                .entry(client)
                .or_default()
                .push(ClientAttachment {
                    volume: names
                        .get(&volume_id)
                        .map_or_else(|| volume_id.to_string(), |n| n.to_string()),
                    mode,
                    lease_left_ms,
                    disconnected,
                });
        }
        Ok(clients
            .into_iter()
            .map(|c| ClientInfo {
                attachments: attachments.remove(&c.name).unwrap_or_default(),
                grants: c
                    .grants
                    .iter()
                    .filter_map(|(id, mode)| {
                        volumes.iter().find(|v| v.id == *id).map(|v| GrantedVolume {
                            name: v.name.clone(),
                            mode: *mode,
                        })
                    })
                    .collect(),
                name: c.name,
            })
            .collect())
    })
    .await
}

fn label_error(error: LabelError) -> ErrorBody {
    ErrorBody::new(ErrorCode::Io, error.to_string())
}

/// Labels a device and records it in the pool. The label is written before the record is
/// committed; a crash in between leaves a labelled device of this pool that a repeated
/// `pool add` adopts.
fn add_device(state: &ServerState, path: &Path, force: bool) -> ServiceResult<DeviceRecord> {
    let _serialized = state
        .admission
        .pool_changes
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let path = path
        .canonicalize()
        .map_err(|e| ErrorBody::new(ErrorCode::NotFound, format!("{}: {e}", path.display())))?;
    let shown = path.display().to_string();
    let kind = std::fs::metadata(&path)
        .map_err(|e| ErrorBody::new(ErrorCode::Io, format!("{shown}: {e}")))?;
    if !kind.is_file() && !kind.file_type().is_block_device() {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("{shown} is neither a block device nor an image file"),
        ));
    }
    let size = labelling::device_size(&path).map_err(label_error)?;
    if size < MIN_DEVICE_BYTES {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("{shown} is {size} bytes; a SAN device needs at least {MIN_DEVICE_BYTES}"),
        ));
    }
    let pool_uuid = state.store.pool_uuid();
    let known = state.store.devices()?;
    if let Some(existing) = known.iter().find(|d| d.path == shown) {
        return Err(ErrorBody::new(
            ErrorCode::AlreadyExists,
            format!("{shown} is already in the pool as {}", existing.uuid),
        ));
    }
    let refuse = |what: String| {
        ErrorBody::new(
            ErrorCode::ForeignSignature,
            format!("device {shown} holds {what}; use --force to overwrite it"),
        )
    };
    let mut device_uuid = Uuid::new_v4();
    match label::read_label(&path) {
        Ok(Some(existing)) if existing.pool_uuid == pool_uuid => {
            if known.iter().any(|d| d.uuid == existing.device_uuid) {
                return Err(ErrorBody::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "{shown} is device {} of this pool already",
                        existing.device_uuid
                    ),
                ));
            }
            // Labelled by us but never recorded (crash during an earlier pool add): adopt it.
            device_uuid = existing.device_uuid;
        }
        Ok(Some(existing)) if !force => {
            return Err(refuse(format!(
                "the label of another sanblk pool ({})",
                existing.pool_uuid
            )));
        }
        Err(LabelError::BadChecksum { .. }) if !force => {
            return Err(refuse("a corrupt sanblk label".into()))
        }
        Err(error @ LabelError::Io { .. }) => return Err(label_error(error)),
        _ => {
            // Probe (read-only) first; only a forced add wipes what was found.
            let found = labelling::probe_foreign_signatures(&path, false).map_err(label_error)?;
            if !found.is_empty() {
                let what = found.join(", ");
                if !force {
                    return Err(refuse(what));
                }
                warn!("pool add --force: wiping {what} on {shown}");
                labelling::probe_foreign_signatures(&path, true).map_err(label_error)?;
            }
        }
    }
    let label = Label {
        device_uuid,
        pool_uuid,
        device_size: size,
        data_start: DATA_START_OFFSET,
    };
    labelling::write_label(&path, &label).map_err(label_error)?;
    let record = DeviceRecord {
        uuid: device_uuid,
        path: shown,
        size_bytes: size,
        data_start: DATA_START_OFFSET,
        state: "online".into(),
    };
    state.store.add_device(&record)?;
    Ok(record)
}
