//! Admin requests that move a volume's data while clients use it: `volume move`, `pool
//! evacuate`, `recovery start`, `volume mirror add` and `volume mirror remove`. The first three start a
//! relocation (`crate::recovery`: change protocol, background copy, final change); mirror
//! remove is one change. Devices are named by their path or UUID, as `pool list` shows them.

use std::sync::Arc;

use log::info;
use uuid::Uuid;

use sanblk_proto::map::VolumeMap;
use sanblk_proto::protocol::{
    ErrorBody, ErrorCode, MirrorAdd, MirrorRemove, PoolEvacuate, RecoveryStart, RecoveryStatus,
    VolumeMove,
};

use crate::service_error::ServiceResult;
use crate::state::{blocking, ServerState};
use crate::store::{ChangeKind, RelocationRequest};

/// The pool device named `name` (its path or UUID).
async fn device_named(state: &Arc<ServerState>, name: &str) -> ServiceResult<Uuid> {
    let devices = blocking(state, |s| s.store.devices()).await?;
    let by_uuid = Uuid::parse_str(name).ok();
    devices
        .iter()
        .find(|d| Some(d.uuid) == by_uuid || d.path == name)
        .map(|d| d.uuid)
        .ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::NotFound,
                format!("no device {name:?} in the pool (name it by its path or UUID, as `sanctl pool list` shows)"),
            )
        })
}

async fn volume_id(state: &Arc<ServerState>, name: String) -> ServiceResult<u64> {
    Ok(blocking(state, move |s| s.store.volume_by_name(&name))
        .await?
        .id)
}

pub async fn volume_move(
    request: VolumeMove,
    state: &Arc<ServerState>,
) -> ServiceResult<RecoveryStatus> {
    let volume_id = volume_id(state, request.name.clone()).await?;
    if request.cancel {
        return crate::recovery::cancel(state, volume_id).await;
    }
    let Some(from) = request.from else {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "say which device to move the data off (--from DEV)",
        ));
    };
    let from = device_named(state, &from).await?;
    let to = match request.to {
        Some(to) => Some(device_named(state, &to).await?),
        None => None,
    };
    info!("volume {}: move off device {from} requested", request.name);
    crate::recovery::start(state, volume_id, RelocationRequest::Move { from, to }).await
}

pub async fn pool_evacuate(
    request: PoolEvacuate,
    state: &Arc<ServerState>,
) -> ServiceResult<Vec<RecoveryStatus>> {
    let device = device_named(state, &request.device).await?;
    info!("device {device}: evacuation requested");
    relocate_off(
        state,
        device,
        RelocationRequest::Move {
            from: device,
            to: None,
        },
    )
    .await
}

pub async fn recovery_start(
    request: RecoveryStart,
    state: &Arc<ServerState>,
) -> ServiceResult<Vec<RecoveryStatus>> {
    let device = device_named(state, &request.device).await?;
    info!("device {device}: recovery requested by the administrator");
    crate::recovery::recover_device(state, device, "declared failed by the administrator").await
}

/// Starts `request` (a move off `device`) for every volume with data on it;
/// returns their first status. One already moving off the device reports its progress.
async fn relocate_off(
    state: &Arc<ServerState>,
    device: Uuid,
    request: RelocationRequest,
) -> ServiceResult<Vec<RecoveryStatus>> {
    let on_device = crate::recovery::volumes_on(state, device).await?;
    info!(
        "device {device}: {} volume(s) to move off it",
        on_device.len()
    );
    let mut statuses = Vec::with_capacity(on_device.len());
    for volume in on_device {
        match crate::recovery::start(state, volume.id, request.clone()).await {
            Ok(status) => statuses.push(status),
            Err(error) if error.code == ErrorCode::Busy => {
                match state.recoveries.status(volume.id) {
                    Some(status) if status.device_uuid == device => statuses.push(status),
                    _ => {
                        return Err(ErrorBody::new(
                            error.code,
                            format!("volume {}: {}", volume.name, error.message),
                        ))
                    }
                }
            }
            Err(error) => {
                return Err(ErrorBody::new(
                    error.code,
                    format!(
                        "volume {}: {} ({} volume(s) already started)",
                        volume.name,
                        error.message,
                        statuses.len()
                    ),
                ))
            }
        }
    }
    Ok(statuses)
}

pub async fn mirror_add(
    request: MirrorAdd,
    state: &Arc<ServerState>,
) -> ServiceResult<RecoveryStatus> {
    let volume_id = volume_id(state, request.name.clone()).await?;
    if request.cancel {
        return crate::recovery::cancel(state, volume_id).await;
    }
    info!("volume {}: mirror add requested", request.name);
    crate::recovery::start(state, volume_id, RelocationRequest::MirrorAdd).await
}

pub async fn mirror_remove(
    request: MirrorRemove,
    state: &Arc<ServerState>,
) -> ServiceResult<VolumeMap> {
    let volume_id = volume_id(state, request.name.clone()).await?;
    let device = device_named(state, &request.device).await?;
    let record = crate::change::run(
        state,
        volume_id,
        ChangeKind::MirrorRemove { device },
        |_| {},
    )
    .await?;
    info!(
        "volume {}: mirror leg on device {device} removed, epoch {}",
        record.name, record.epoch
    );
    state.client_map(&record)
}
