//! Recovery after a reported path failure: moves one volume's replicas off a failed device.
//!
//! 1. `report_failure` allocates a replacement for every replica on the failed device (on a
//!    device holding no other replica of that extent) and records the recovery in redb, in one
//!    transaction (`Store::start_recovery`). The record is the persisted "device failed for
//!    this volume" mark.
//! 2. A job copies the segments in chunks of [`CHUNK_BYTES`] from the surviving mirror replica,
//!    or, without one, from the failed device through the server's own path (the client's path
//!    failed, the server's may not have). Every [`SAVE_INTERVAL`] (or [`MAX_UNSAVED_CHUNKS`]
//!    chunks, whichever comes first) the targets are synced and the cursor is saved (one
//!    transaction), so a restarted server resumes there, re-copying at most that much. With
//!    `--recovery-max-rate`, each chunk takes at least its share of the rate (a pause after
//!    it), so a rebuild leaves the devices' bandwidth to the clients.
//! 3. Done: one transaction replaces the failed replicas by the targets, bumps the epoch and
//!    deletes the record; the new map is published and a `done` status pushed.
//!
//! Consistency with redirected writes: see `recovery_gate`, whose rule the I/O service
//! follows and whose gate the copy job takes exclusively for each chunk.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{info, warn};
use uuid::Uuid;

use sanblk_proto::protocol::{
    ErrorBody, ErrorCode, FailureReported, RecoveryState, RecoveryStatus,
};

use crate::device::{AlignedBuf, DeviceFailure, DeviceTable};
use crate::log_text::peer_text;
use crate::recovery_gate::ActiveRecovery;
use crate::service_error::ServiceResult;
use crate::state::{blocking, ServerState, WaitingForSpace};
use crate::store::{
    ChangeKind, RecoveryRecord, RecoverySegment, RelocationRequest, VolumeRecord, DEVICE_FAILED,
};
use sanblk_proto::protocol::RelocationKind;

/// Bytes copied per step (the exclusive hold of the gate lasts one chunk).
pub const CHUNK_BYTES: u64 = 1 << 20;
/// Longest time between two cursor saves (each save syncs the targets first): a sync and a
/// commit per few MiB cost a tenth of the copy rate, twice a second costs nothing visible.
pub const SAVE_INTERVAL: Duration = Duration::from_millis(500);
/// Most chunks copied between two cursor saves (bounds what a restart copies again).
pub const MAX_UNSAVED_CHUNKS: u64 = 64;
/// Shortest interval between two `copying` status pushes.
const STATUS_INTERVAL: Duration = Duration::from_millis(500);

/// Volumes whose copy job runs in this process.
fn running() -> &'static Mutex<HashSet<u64>> {
    static RUNNING: std::sync::OnceLock<Mutex<HashSet<u64>>> = std::sync::OnceLock::new();
    RUNNING.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Claims the job slot of a volume; false if a job already runs.
fn claim(volume_id: u64) -> bool {
    running()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(volume_id)
}

/// Whether a job (or its starting change) holds the slot of a volume.
fn claimed(volume_id: u64) -> bool {
    running()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&volume_id)
}

fn release(volume_id: u64) {
    running()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&volume_id);
}

/// Most blocks the server reads to check a device a client reported failed.
const MAX_PROBE_READS: usize = 16;

/// Handles an agent's failure report for a volume it is attached to. The server reads the
/// device where the volume has data: if that works, only the client's path failed, so the
/// client stays on the server path and nothing moves (an administrator may still run
/// `recovery start`); if it fails too, the device is declared failed and the volume recovered
/// off it. A recovery already recorded off this device reports its status (restarting its
/// job if it had failed); another relocation of the volume gets `Busy`.
pub async fn report_failure(
    state: &Arc<ServerState>,
    volume_id: u64,
    device_uuid: Uuid,
    client: &str,
    reason: String,
) -> ServiceResult<FailureReported> {
    let existing = blocking(state, move |s| s.store.recovery(volume_id)).await?;
    match existing {
        Some(record) if record.failed_device == device_uuid => {
            let status = start_job(state, record).await;
            return Ok(FailureReported {
                message: format!("{} of the volume off the device: {}", status.kind, status.state),
                status: Some(status),
            });
        }
        Some(record) => {
            return Err(ErrorBody::new(
                ErrorCode::Busy,
                format!(
                    "volume {volume_id} is already being moved ({}) off device {}; report again when that is done",
                    record.kind, record.failed_device
                ),
            ))
        }
        None => {}
    }
    if let Some(starting) = starting_recovery(state, volume_id, device_uuid) {
        return Ok(FailureReported {
            message: format!("recovery of the volume off the device: {}", starting.state),
            status: Some(starting),
        });
    }
    match probe(state, volume_id, device_uuid).await? {
        Ok(()) => {
            state
                .recoveries
                .note_path_failure(device_uuid, client.to_string());
            info!(
                "volume {volume_id}: device {device_uuid} reported failed by client {} ({}), \
                 but the server reads it: that client's I/O goes through the server, nothing \
                 is moved (`sanctl recovery start {device_uuid}` would)",
                peer_text(client),
                peer_text(&reason)
            );
            Ok(FailureReported {
                status: None,
                message: "the server reads the device: this host's I/O to it goes through the \
                          server; no recovery started"
                    .into(),
            })
        }
        Err(error) => {
            let reason = format!("{reason}; the server's read failed too: {error}");
            let status = recover_volume_off(state, volume_id, device_uuid, reason).await?;
            Ok(FailureReported {
                message: format!(
                    "the server cannot read the device either ({error}): recovery {}",
                    status.state
                ),
                status: Some(status),
            })
        }
    }
}

/// Reads a block at the start of every piece of `volume_id` on `device` (at most
/// [`MAX_PROBE_READS`]). The outer error: the request is wrong (no such volume, or no data
/// of it on the device); the inner one: the read failed.
async fn probe(
    state: &Arc<ServerState>,
    volume_id: u64,
    device: Uuid,
) -> ServiceResult<io::Result<()>> {
    blocking(state, move |s| -> ServiceResult<io::Result<()>> {
        let volume = s.store.volume_by_id(volume_id)?;
        let offsets: Vec<u64> = volume
            .extents
            .iter()
            .flat_map(|e| e.replicas.iter())
            .filter(|r| r.device_uuid == device)
            .map(|r| r.device_offset)
            .take(MAX_PROBE_READS)
            .collect();
        if offsets.is_empty() {
            return Err(ErrorBody::new(
                if s.store.devices()?.iter().any(|d| d.uuid == device) {
                    ErrorCode::BadRequest
                } else {
                    ErrorCode::NotFound
                },
                format!("volume {} has no data on device {device}", volume.name),
            ));
        }
        Ok(DeviceTable::probe(s.store.clone(), device, &offsets))
    })
    .await
}

/// Whether `volume` has data (a copy or stripe member) on `device`.
pub fn has_data_on(volume: &VolumeRecord, device: Uuid) -> bool {
    volume
        .extents
        .iter()
        .any(|e| e.replicas.iter().any(|r| r.device_uuid == device))
}

/// The volumes with data on `device`.
pub async fn volumes_on(
    state: &Arc<ServerState>,
    device: Uuid,
) -> ServiceResult<Vec<VolumeRecord>> {
    let volumes = blocking(state, |s| s.store.volumes()).await?;
    Ok(volumes
        .into_iter()
        .filter(|v| has_data_on(v, device))
        .collect())
}

/// Declares each device failed whose first error the server's own I/O path saw, and recovers
/// every volume with data on it.
pub async fn recover_failed_devices(
    state: Arc<ServerState>,
    mut failures: tokio::sync::mpsc::UnboundedReceiver<DeviceFailure>,
) {
    while let Some(DeviceFailure { device, error }) = failures.recv().await {
        warn!("device {device}: the server's own I/O failed ({error}); declaring it failed");
        let reason = format!("the server's {error}");
        if let Err(error) = recover_device(&state, device, &reason).await {
            warn!("device {device}: {}", error.message);
        }
    }
}

/// Declares `device` failed (no allocation lands on it any more) and recovers every volume
/// with data on it; returns their first status (a recovery already running off the device
/// reports its progress). What found no space waits for a new device (see
/// [`recover_volume_off`]) and is reported as an error, after the others started.
pub async fn recover_device(
    state: &Arc<ServerState>,
    device: Uuid,
    reason: &str,
) -> ServiceResult<Vec<RecoveryStatus>> {
    declare_failed(state, device).await;
    state.recoveries.clear_path_failures(device);
    let on_device = volumes_on(state, device).await?;
    info!(
        "device {device}: {} volume(s) to recover off it",
        on_device.len()
    );
    let mut statuses = Vec::with_capacity(on_device.len());
    let mut refused = Vec::new();
    for volume in on_device {
        let volume_id = volume.id;
        let recorded = blocking(state, move |s| s.store.recovery(volume_id)).await?;
        let started = match recorded {
            Some(record) if record.failed_device == device => Ok(start_job(state, record).await),
            _ => recover_volume_off(state, volume_id, device, reason.to_string()).await,
        };
        match started {
            Ok(status) => statuses.push(status),
            Err(error) => refused.push((volume.name, error)),
        }
    }
    match refused.into_iter().next() {
        None => Ok(statuses),
        Some((name, error)) => Err(ErrorBody::new(
            error.code,
            format!(
                "volume {name}: {} ({} other volume(s) started)",
                error.message,
                statuses.len()
            ),
        )),
    }
}

/// Starts the recovery of `volume_id` off a device declared failed (or, out of space,
/// degrades a mirror or leaves the volume on the server path until a device is added).
pub async fn recover_volume_off(
    state: &Arc<ServerState>,
    volume_id: u64,
    device_uuid: Uuid,
    reason: String,
) -> ServiceResult<RecoveryStatus> {
    state.recoveries.clear_path_failures(device_uuid);
    info!(
        "volume {volume_id}: device {device_uuid} declared failed ({})",
        peer_text(&reason)
    );
    let request = RelocationRequest::Recovery {
        device: device_uuid,
        reason: reason.clone(),
    };
    let started = start(state, volume_id, request).await;
    if started
        .as_ref()
        .map_or_else(|e| e.code == ErrorCode::NoSpace, |_| true)
    {
        declare_failed(state, device_uuid).await;
    }
    match started {
        // A concurrent report (another client, or a retry) is starting it.
        Err(error) if error.code == ErrorCode::Busy => state
            .recoveries
            .status(volume_id)
            .filter(|s| s.device_uuid == device_uuid)
            .ok_or(error),
        // A mirror runs on its other copies meanwhile; a single copy stays on the
        // server path. A device added later starts the rest.
        Err(error) if error.code == ErrorCode::NoSpace => {
            let degraded = degrade(state, volume_id, device_uuid).await;
            let (waiting, outcome) = if degraded {
                (
                    WaitingForSpace::Remirror,
                    "its mirror runs on the other copy until then",
                )
            } else {
                (
                    WaitingForSpace::Recovery {
                        device: device_uuid,
                        reason,
                    },
                    "I/O to it goes through the server until then",
                )
            };
            warn!(
                "volume {volume_id}: no space to recover off device {device_uuid} ({}); \
                 {outcome}",
                error.message
            );
            state.recoveries.wait_for_space(volume_id, waiting);
            Err(ErrorBody::new(
                ErrorCode::NoSpace,
                format!(
                    "{}; the recovery starts when a device is added to the pool, {outcome}",
                    error.message
                ),
            ))
        }
        other => other,
    }
}

/// Marks `device` failed in the pool: no new allocation (a recovery target, a re-mirror, a
/// new volume) lands on it.
pub async fn declare_failed(state: &Arc<ServerState>, device: Uuid) {
    if let Err(error) = blocking(state, move |s| s.store.mark_device_failed(device)).await {
        warn!("device {device}: cannot mark it failed: {}", error.message);
    }
}

/// Drops the copies on the failed `device` from every mirrored extent of `volume_id` that
/// has another one (a change, in the background), so clients read and write the surviving
/// copies directly and no I/O fails on the dead one. False (nothing done) if some extent has
/// its only copy there.
async fn degrade(state: &Arc<ServerState>, volume_id: u64, device: Uuid) -> bool {
    let kind = ChangeKind::MirrorRemove { device };
    let planned = kind.clone();
    if blocking(state, move |s| s.store.plan_change(volume_id, &planned))
        .await
        .is_err()
    {
        return false;
    }
    let job_state = state.clone();
    tokio::spawn(async move {
        match crate::change::run(&job_state, volume_id, kind, |_| {}).await {
            Ok(record) => info!(
                "volume {}: copies on failed device {device} dropped; degraded at epoch {}",
                record.name, record.epoch
            ),
            Err(error) => warn!(
                "volume {volume_id}: dropping the copies on failed device {device}: {}",
                error.message
            ),
        }
    });
    true
}

/// Starts what found no space (recoveries, re-mirroring of degraded mirrors) after a device
/// joined the pool; what still finds none waits for the next one.
pub async fn start_waiting_for_space(state: &Arc<ServerState>) {
    for (volume_id, waiting) in state.recoveries.take_waiting_for_space() {
        let request = match &waiting {
            WaitingForSpace::Recovery { device, reason } => RelocationRequest::Recovery {
                device: *device,
                reason: reason.clone(),
            },
            WaitingForSpace::Remirror => RelocationRequest::MirrorAdd,
        };
        match start(state, volume_id, request.clone()).await {
            Ok(_) => info!("volume {volume_id}: {request} started on the new space"),
            // Still no space, or the degrading change has not committed yet.
            Err(error) if matches!(error.code, ErrorCode::NoSpace | ErrorCode::Busy) => {
                state.recoveries.wait_for_space(volume_id, waiting)
            }
            Err(error) => warn!(
                "volume {volume_id}: waiting {request} dropped: {}",
                error.message
            ),
        }
    }
}

/// Starts a relocation of `volume_id` (recovery, move or mirror add): its first change
/// (quiesce every client, commit the record with the targets allocated, publish the map that
/// marks the moving extents syncing, resume) and then the copy job, both in the background.
/// What cannot start (no such device, no space, another relocation running) is refused here.
pub async fn start(
    state: &Arc<ServerState>,
    volume_id: u64,
    request: RelocationRequest,
) -> ServiceResult<RecoveryStatus> {
    let plan_request = request.clone();
    let planned = blocking(state, move |s| {
        s.store.plan_relocation(volume_id, &plan_request)
    })
    .await?;
    let name = volume_name(state, volume_id).await;
    if !claim(volume_id) {
        return Err(ErrorBody::new(
            ErrorCode::Busy,
            format!(
                "a move, mirror add or recovery of volume {name} is already starting or running"
            ),
        ));
    }
    let mut queued = Progress::new(name, &planned).status(
        RecoveryState::Queued,
        format!("{request}: quiescing clients"),
    );
    queued.device_uuid = planned.failed_device;
    state.recoveries.set_status(queued.clone());
    let answer = queued.clone();
    let job_state = state.clone();
    tokio::spawn(async move {
        let state = &job_state;
        let started = crate::change::run(
            state,
            volume_id,
            ChangeKind::StartRelocation(request.clone()),
            |_| {},
        )
        .await;
        let record = match started {
            Ok(_) => blocking(state, move |s| s.store.recovery(volume_id)).await,
            Err(error) => Err(error),
        };
        match record {
            Ok(Some(record)) => {
                info!(
                    "volume {volume_id}: {request} started: {} bytes in {} segment(s)",
                    record.bytes_total(),
                    record.segments.len()
                );
                run_claimed(state, record).await;
            }
            Ok(None) => {
                warn!("volume {volume_id}: {request}: no record after the commit");
                release(volume_id);
            }
            Err(error) => {
                warn!(
                    "volume {volume_id}: {request} could not start: {}",
                    error.message
                );
                let mut failed = queued;
                failed.state = RecoveryState::Failed;
                failed.message = format!("could not start: {}", error.message);
                state.recoveries.set_status(failed);
                release(volume_id);
            }
        }
    });
    Ok(answer)
}

/// The status of a recovery of `volume_id` off `device` whose first change has not committed
/// yet (no record).
fn starting_recovery(state: &ServerState, volume_id: u64, device: Uuid) -> Option<RecoveryStatus> {
    state
        .recoveries
        .status(volume_id)
        .filter(|s| s.device_uuid == device && s.kind == RelocationKind::Recovery)
        .filter(|_| claimed(volume_id))
}

/// Decides on a client's fail-back request for `device_uuid` of `volume_id` (its direct path
/// healed): refused while a recovery of the volume moves it off that device (its record is
/// the persisted "device failed for this volume" mark, kept until the new map is published,
/// also when the job failed and waits to be resumed); accepted otherwise, e.g. when no
/// replacement could be allocated so no recovery started. Returns (accepted, explanation).
pub async fn report_path_healed(
    state: &Arc<ServerState>,
    volume_id: u64,
    device_uuid: Uuid,
) -> ServiceResult<(bool, String)> {
    let existing = blocking(state, move |s| s.store.recovery(volume_id)).await?;
    // A recovery off the device that is still starting (its first change not committed)
    // counts as running.
    if existing.is_none() && starting_recovery(state, volume_id, device_uuid).is_some() {
        return Ok((
            false,
            format!("a recovery of volume {volume_id} off device {device_uuid} is starting"),
        ));
    }
    Ok(match existing {
        Some(record) if record.failed_device == device_uuid => (
            false,
            format!(
                "volume {volume_id} is being recovered off device {device_uuid}; the new map will not use it"
            ),
        ),
        _ => (
            true,
            format!("no recovery of volume {volume_id} off device {device_uuid}; direct I/O may resume"),
        ),
    })
}

/// What the log says when a recovery resumes (followed by the device, "at byte", the cursor).
/// The tests read the cursor back from this line (`userspace-server/tests/common/sand_log.rs`).
const RESUMING: &str = "resuming recovery off device ";

/// Resumes every recorded recovery (at server start).
pub async fn resume_all(state: &Arc<ServerState>) -> ServiceResult<()> {
    let records = blocking(state, |s| s.store.recoveries()).await?;
    for record in records {
        info!(
            "volume {}: {RESUMING}{} at byte {} of {}",
            record.volume_id,
            record.failed_device,
            record.cursor,
            record.bytes_total()
        );
        start_job(state, record).await;
    }
    Ok(())
}

/// Recovers the volumes still on devices a previous run declared failed whose recovery could
/// not start (no space then: what waits for space is not persisted, the failed mark is).
/// What finds no space now waits for a device to be added.
pub async fn recover_failed_devices_left(state: &Arc<ServerState>) {
    let listed = blocking(state, |s| -> crate::store::StoreResult<_> {
        Ok((s.store.devices()?, s.store.volumes()?))
    })
    .await;
    let (devices, volumes) = match listed {
        Ok(listed) => listed,
        Err(error) => {
            warn!("cannot list failed devices: {}", error.message);
            return;
        }
    };
    for device in devices.iter().filter(|d| d.state == DEVICE_FAILED) {
        if !volumes.iter().any(|v| has_data_on(v, device.uuid)) {
            continue;
        }
        info!(
            "device {}: declared failed before the restart and still holds volume data",
            device.uuid
        );
        if let Err(error) =
            recover_device(state, device.uuid, "declared failed before a restart").await
        {
            warn!("device {}: {}", device.uuid, error.message);
        }
    }
}

/// Spawns the copy job unless one runs; returns the current status.
async fn start_job(state: &Arc<ServerState>, record: RecoveryRecord) -> RecoveryStatus {
    let volume_id = record.volume_id;
    if !claim(volume_id) {
        // Already running: its latest status (set before it was spawned) is the answer.
        let name = volume_name(state, volume_id).await;
        return state.recoveries.status(volume_id).unwrap_or_else(|| {
            Progress::new(name, &record).status(RecoveryState::Queued, String::new())
        });
    }
    let name = volume_name(state, volume_id).await;
    let status = Progress::new(name, &record).status(RecoveryState::Queued, String::new());
    state.recoveries.set_status(status.clone());
    let job_state = state.clone();
    tokio::spawn(async move { run_claimed(&job_state, record).await });
    status
}

async fn volume_name(state: &Arc<ServerState>, volume_id: u64) -> String {
    blocking(state, move |s| s.store.volume_by_id(volume_id))
        .await
        .map(|v| v.name)
        .unwrap_or_default()
}

/// Runs the copy job of a claimed volume to its end, then releases the claim.
async fn run_claimed(state: &Arc<ServerState>, record: RecoveryRecord) {
    let volume_id = record.volume_id;
    let progress = Progress::new(volume_name(state, volume_id).await, &record);
    if let Err((progress, error)) = run_job(state, record, progress).await {
        warn!("volume {volume_id}: relocation failed: {error}");
        state
            .recoveries
            .set_status(progress.status(RecoveryState::Failed, error));
    }
    release(volume_id);
}

/// Copy progress and rate since the job started.
struct Progress {
    volume_name: String,
    volume_id: u64,
    device_uuid: Uuid,
    bytes_total: u64,
    bytes_done: u64,
    started_at: Instant,
    started_bytes: u64,
    kind: RelocationKind,
}

impl Progress {
    fn new(volume_name: String, record: &RecoveryRecord) -> Progress {
        Progress {
            volume_name,
            volume_id: record.volume_id,
            device_uuid: record.failed_device,
            bytes_total: record.bytes_total(),
            bytes_done: record.cursor,
            started_at: Instant::now(),
            started_bytes: record.cursor,
            kind: record.kind,
        }
    }

    fn status(&self, state: RecoveryState, message: String) -> RecoveryStatus {
        let percent = if self.bytes_total == 0 {
            100.0
        } else {
            self.bytes_done as f64 * 100.0 / self.bytes_total as f64
        };
        let copied = self.bytes_done.saturating_sub(self.started_bytes);
        let elapsed = self.started_at.elapsed().as_secs_f64();
        let eta_seconds = match state {
            RecoveryState::Done => Some(0),
            _ if copied > 0 && elapsed > 0.0 => {
                let rate = copied as f64 / elapsed;
                Some(((self.bytes_total - self.bytes_done) as f64 / rate).ceil() as u64)
            }
            _ => None,
        };
        RecoveryStatus {
            volume_id: self.volume_id,
            volume_name: self.volume_name.clone(),
            device_uuid: self.device_uuid,
            state,
            percent,
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
            eta_seconds,
            message,
            kind: self.kind,
        }
    }
}

/// Where byte `cursor` of the concatenated segments lies: (segment index, offset inside).
fn locate(segments: &[RecoverySegment], mut cursor: u64) -> Option<(usize, u64)> {
    for (index, segment) in segments.iter().enumerate() {
        if cursor < segment.length {
            return Some((index, cursor));
        }
        cursor -= segment.length;
    }
    None
}

/// Copies `buf.len()` bytes at `inside` of `segment` from its source (falling back to the
/// failed replica when the source is another device) to its target.
fn copy_chunk(
    devices: &DeviceTable,
    segment: &RecoverySegment,
    inside: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let read = |uuid: Uuid, offset: u64, buf: &mut [u8]| devices.get(uuid)?.read_at(buf, offset);
    let from_source = read(
        segment.source.device_uuid,
        segment.source.device_offset + inside,
        buf,
    );
    if let Err(error) = from_source {
        if segment.source == segment.failed {
            return Err(error);
        }
        warn!(
            "recovery: reading device {}: {error}; trying the failed replica",
            segment.source.device_uuid
        );
        read(
            segment.failed.device_uuid,
            segment.failed.device_offset + inside,
            buf,
        )?;
    }
    devices
        .get(segment.target.device_uuid)?
        .write_at(buf, segment.target.device_offset + inside)
}

/// Syncs every target device, so the saved cursor never runs ahead of durable data.
fn sync_targets(devices: &DeviceTable, segments: &[RecoverySegment]) -> io::Result<()> {
    let mut targets: Vec<Uuid> = segments.iter().map(|s| s.target.device_uuid).collect();
    targets.sort();
    targets.dedup();
    for uuid in targets {
        devices.get(uuid)?.sync()?;
    }
    Ok(())
}

async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("worker failed: {e}"))?
        .map_err(|e| e.to_string())
}

type JobError = (Progress, String);

/// How long to wait after a chunk of `length` bytes that took `took` (copy, sync and save),
/// so that the copy stays at or below `max_rate` bytes per second over every chunk; `None`
/// without a limit or when the chunk took that long already.
fn pause_after_chunk(length: u64, took: Duration, max_rate: Option<u64>) -> Option<Duration> {
    let rate = max_rate.filter(|rate| *rate > 0)?;
    let budget = Duration::from_secs_f64(length as f64 / rate as f64);
    budget.checked_sub(took).filter(|pause| !pause.is_zero())
}

async fn run_job(
    state: &Arc<ServerState>,
    record: RecoveryRecord,
    mut progress: Progress,
) -> Result<(), JobError> {
    let volume_id = record.volume_id;
    let gate = state.recoveries.gate(volume_id);
    let active = Arc::new(ActiveRecovery::new(
        record.failed_device,
        record.segments.clone(),
        record.cursor,
    ));
    gate.set_recovery(Some(active.clone()));
    // Barrier: writes planned before the registration finish before anything is copied.
    drop(gate.lock.write().await);

    let max_rate = state.config.recovery_max_rate;
    let devices = Arc::new(DeviceTable::new(state.store.clone()));
    let segments = Arc::new(record.segments);
    let total = progress.bytes_total;
    let mut cursor = record.cursor.min(total);
    let mut buffer = match AlignedBuf::zeroed(CHUNK_BYTES as usize) {
        Ok(buffer) => Some(buffer),
        Err(error) => return Err((progress, format!("copy buffer: {error}"))),
    };
    let mut unsaved_chunks = 0;
    let mut last_push = Instant::now();
    let mut last_save = Instant::now();
    state
        .recoveries
        .set_status(progress.status(RecoveryState::Copying, String::new()));
    while let Some((index, inside)) = locate(&segments, cursor) {
        if active.cancelled.load(Ordering::Acquire) {
            return roll_back(state, &gate, progress).await;
        }
        let chunk_started = Instant::now();
        let Some(segment_length) = segments.get(index).map(|s| s.length) else {
            break;
        };
        let length = CHUNK_BYTES.min(segment_length - inside);
        let Some(mut chunk) = buffer.take() else {
            return Err((progress, "copy buffer lost".into()));
        };
        let copied = {
            let _exclusive = gate.lock.write().await;
            let (devices, segments) = (devices.clone(), segments.clone());
            run_blocking(move || {
                let segment = segments
                    .get(index)
                    .ok_or_else(|| io::Error::other("segment vanished"))?;
                let result = copy_chunk(&devices, segment, inside, &mut chunk[..length as usize]);
                result.map(|()| chunk)
            })
            .await
        };
        match copied {
            Ok(chunk) => buffer = Some(chunk),
            Err(error) => {
                return Err((progress, format!("copying at byte {cursor}: {error}")));
            }
        }
        cursor += length;
        active.copied.store(cursor, Ordering::Release);
        progress.bytes_done = cursor;
        unsaved_chunks += 1;
        if unsaved_chunks >= MAX_UNSAVED_CHUNKS
            || last_save.elapsed() >= SAVE_INTERVAL
            || cursor == total
        {
            let (devices, segments) = (devices.clone(), segments.clone());
            if let Err(error) = run_blocking(move || sync_targets(&devices, &segments)).await {
                return Err((progress, format!("syncing targets: {error}")));
            }
            let saved = blocking(state, move |s| {
                s.store.save_recovery_cursor(volume_id, cursor)
            });
            if let Err(error) = saved.await {
                return Err((progress, format!("saving progress: {}", error.message)));
            }
            unsaved_chunks = 0;
            last_save = Instant::now();
        }
        if last_push.elapsed() >= STATUS_INTERVAL {
            state
                .recoveries
                .set_status(progress.status(RecoveryState::Copying, String::new()));
            last_push = Instant::now();
        }
        match pause_after_chunk(length, chunk_started.elapsed(), max_rate) {
            Some(pause) => tokio::time::sleep(pause).await,
            None => tokio::task::yield_now().await,
        }
    }

    // The last change: clients quiesced, the targets take the moved replicas' places in one
    // commit, the final map published. Writes planned after the commit with the syncing map's
    // epoch are stale (they would miss the new place): the epoch floor goes up first.
    let finish_gate = gate.clone();
    let finished = crate::change::run(state, volume_id, ChangeKind::FinishRelocation, |record| {
        finish_gate.raise_min_epoch(record.epoch);
        finish_gate.set_recovery(None);
    })
    .await;
    // Barrier: a write planned before the commit (to the old place too) ends before the
    // old space can be handed out again.
    drop(gate.lock.write().await);
    let record = match finished {
        Ok(record) => record,
        Err(error) => return Err((progress, format!("committing: {}", error.message))),
    };
    info!(
        "volume {}: {} off device {} done, epoch {}",
        record.name, progress.kind, active.failed_device, record.epoch
    );
    state.recoveries.set_status(progress.status(
        RecoveryState::Done,
        format!("{} done; epoch {}", progress.kind, record.epoch),
    ));
    Ok(())
}

/// Runs again, in the background, the relocation starts and cancels that a crash rolled back
/// (`change::recover_all`): what the administrator asked for still happens.
pub fn redo_all(state: &Arc<ServerState>, redo: Vec<(u64, ChangeKind)>) {
    for (volume_id, kind) in redo {
        let state = state.clone();
        tokio::spawn(async move {
            match kind {
                ChangeKind::StartRelocation(request) => {
                    info!("volume {volume_id}: starting the interrupted {request} again");
                    if let Err(error) = start(&state, volume_id, request).await {
                        warn!(
                            "volume {volume_id}: interrupted relocation not restarted: {}",
                            error.message
                        );
                    }
                }
                ChangeKind::CancelRelocation => {
                    info!("volume {volume_id}: cancelling the relocation again");
                    // The resumed job registers with the gate shortly after it is spawned.
                    let deadline = Instant::now() + Duration::from_secs(30);
                    loop {
                        match cancel(&state, volume_id).await {
                            Err(error)
                                if error.code == ErrorCode::Busy && Instant::now() < deadline =>
                            {
                                tokio::time::sleep(Duration::from_millis(100)).await
                            }
                            Err(error) => {
                                warn!(
                                    "volume {volume_id}: interrupted cancel not redone: {}",
                                    error.message
                                );
                                break;
                            }
                            Ok(_) => break,
                        }
                    }
                }
                _ => {}
            }
        });
    }
}

/// Ends a cancelled relocation through the change protocol: clients quiesced, the record
/// (and so its targets) deleted and the map without syncing extents published in one commit.
async fn roll_back(
    state: &Arc<ServerState>,
    gate: &Arc<crate::recovery_gate::VolumeGate>,
    progress: Progress,
) -> Result<(), JobError> {
    let volume_id = progress.volume_id;
    let cancel_gate = gate.clone();
    let cancelled = crate::change::run(state, volume_id, ChangeKind::CancelRelocation, |record| {
        cancel_gate.raise_min_epoch(record.epoch);
        cancel_gate.set_recovery(None);
    })
    .await;
    // Barrier: a write planned before the commit (to the target too) ends before the
    // target's space can be handed out again.
    drop(gate.lock.write().await);
    match cancelled {
        Ok(record) => {
            info!(
                "volume {}: {} cancelled at epoch {}",
                record.name, progress.kind, record.epoch
            );
            state.recoveries.set_status(progress.status(
                RecoveryState::Cancelled,
                format!(
                    "cancelled; the data stays in place (epoch {})",
                    record.epoch
                ),
            ));
            Ok(())
        }
        Err(error) => Err((progress, format!("cancelling: {}", error.message))),
    }
}

/// Cancels the relocation of `volume_id`: asks its running job to roll back and waits for
/// it, or rolls back a recorded one whose job is not running (it had failed). Returns the
/// final status.
pub async fn cancel(state: &Arc<ServerState>, volume_id: u64) -> ServiceResult<RecoveryStatus> {
    let record = blocking(state, move |s| s.store.recovery(volume_id)).await?;
    let Some(record) = record else {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            "no move, mirror add or recovery of this volume is in progress",
        ));
    };
    if record.kind == RelocationKind::Recovery {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "a recovery off a failed device cannot be cancelled (its data has nowhere else to go)",
        ));
    }
    if claim(volume_id) {
        let gate = state.recoveries.gate(volume_id);
        let progress = Progress::new(volume_name(state, volume_id).await, &record);
        let outcome = roll_back(state, &gate, progress).await;
        release(volume_id);
        if let Err((_, error)) = outcome {
            return Err(ErrorBody::new(ErrorCode::Internal, error));
        }
    } else {
        let Some(active) = state.recoveries.gate(volume_id).recovery() else {
            return Err(ErrorBody::new(
                ErrorCode::Busy,
                "the relocation is still starting; cancel again in a moment",
            ));
        };
        active.cancelled.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = state.recoveries.status(volume_id);
            if status.as_ref().is_some_and(|s| {
                matches!(
                    s.state,
                    RecoveryState::Cancelled | RecoveryState::Failed | RecoveryState::Done
                )
            }) {
                break;
            }
            if Instant::now() > deadline {
                return Err(ErrorBody::new(
                    ErrorCode::Busy,
                    "the cancel is still in progress",
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    state
        .recoveries
        .status(volume_id)
        .ok_or_else(|| ErrorBody::new(ErrorCode::Internal, "no status after the cancel"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery_gate::tests::linear_recovery;

    #[test]
    fn the_cursor_locates_its_segment() {
        let segments = linear_recovery().segments;
        assert_eq!(locate(&segments, 0), Some((0, 0)));
        assert_eq!(locate(&segments, (1 << 20) + 4096), Some((1, 4096)));
        assert_eq!(locate(&segments, 2 << 20), None);
    }

    #[test]
    fn chunks_are_paced_to_the_max_rate() {
        let ms = Duration::from_millis;
        // 1 MiB at 1 MiB/s takes a second: what the copy did not use is waited.
        assert_eq!(
            pause_after_chunk(1 << 20, ms(300), Some(1 << 20)),
            Some(ms(700))
        );
        // A short chunk (end of a segment) gets its share only.
        assert_eq!(
            pause_after_chunk(256 << 10, ms(0), Some(1 << 20)),
            Some(ms(250))
        );
        // Slower than the limit already, or no limit: no pause.
        assert_eq!(pause_after_chunk(1 << 20, ms(1500), Some(1 << 20)), None);
        assert_eq!(pause_after_chunk(1 << 20, ms(0), None), None);
        assert_eq!(pause_after_chunk(1 << 20, ms(0), Some(0)), None);
    }
}
