//! Relocations against a real `sand` process: recovery off a failed device (an agent reports
//! its path to a device failed; the server moves nothing while it still reads the device
//! itself, and recovers when its own I/O fails too or the administrator declares the device
//! failed: it moves the volume's data to another device, pushes progress and publishes a map
//! without the failed device), and the admin's live moves,
//! evacuations, mirror adds and removes. Image files are read directly to prove that every
//! block (including writes made during the copy) is where the final map says.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::io_client::IoClient;
use common::sand_log::last_resume_cursor;
use common::{follow_change_to_map, TestServer, MIB, RECOVERY_MAX_RATE};
use sanblk_proto::client::{AgentClient, Push};
use sanblk_proto::map::{AccessMode, Layout, VolumeMap};
use sanblk_proto::protocol::{
    Attachment, DeviceInfo, ErrorCode, MirrorAdd, MirrorRemove, PoolAdd, PoolEvacuate, PoolList,
    RecoveryList, RecoveryStart, RecoveryState, RecoveryStatus, VolumeCreate, VolumeDetail,
    VolumeMove, VolumeShow,
};
use sanblk_uapi::frame::{Op, RequestHeader};

const POOL_DEVICE_BYTES: u64 = 64 * MIB;
const WAIT: Duration = Duration::from_secs(20);

/// The agent reports its path to `failed` broken. The server still reads the device, so the
/// client is only told its I/O goes through the server: nothing moves, and `pool list` shows
/// the host's failed path.
async fn report_readable_device(
    server: &TestServer,
    setup: &mut Setup,
    volume_id: u64,
    failed: uuid::Uuid,
) {
    let reported = setup
        .agent
        .report_failure(volume_id, failed, "I/O error on direct path")
        .await
        .unwrap_or_else(|e| panic!("report: {e}"));
    assert!(
        reported.status.is_none(),
        "a report of a device the server reads started {:?} ({})",
        reported.status,
        reported.message
    );
    assert!(
        !recoveries(server)
            .await
            .iter()
            .any(|s| s.device_uuid == failed),
        "a recovery off {failed} started on a client's report alone"
    );
    let shown = pool(server)
        .await
        .into_iter()
        .find(|d| d.uuid == failed)
        .unwrap_or_else(|| panic!("{failed} not in the pool"));
    assert_eq!(shown.path_failed_on, ["host1"], "{shown:?}");
    assert_eq!(shown.state, "online");
}

/// A client reports its path to `failed` broken (see [`report_readable_device`]), then the
/// administrator declares the device failed: the recoveries that started.
async fn declare_failed(
    server: &TestServer,
    setup: &mut Setup,
    volume_id: u64,
    failed: uuid::Uuid,
) -> Result<Vec<RecoveryStatus>, sanblk_proto::client::ClientError> {
    report_readable_device(server, setup, volume_id, failed).await;
    server
        .admin()
        .await
        .call(RecoveryStart {
            device: failed.to_string(),
        })
        .await
}

/// Distinct, position-dependent bytes.
fn pattern(seed: u64, length: usize) -> Vec<u8> {
    (0..length)
        .map(|i| ((i as u64).wrapping_mul(31) ^ seed.wrapping_mul(0x9e37_79b9)) as u8)
        .collect()
}

/// A server with three pool devices, a volume of `layout` and an attached rw agent.
struct Setup {
    agent: AgentClient,
    attached: Attachment,
    devices: HashMap<uuid::Uuid, PathBuf>,
}

async fn setup(server: &TestServer, layout: Layout, size: u64) -> Setup {
    setup_on(server, 3, layout, size).await
}

/// [`setup`] with `device_count` pool devices.
async fn setup_on(server: &TestServer, device_count: usize, layout: Layout, size: u64) -> Setup {
    server.pool_of(device_count, POOL_DEVICE_BYTES).await;
    let mut admin = server.admin().await;
    admin
        .call(VolumeCreate {
            name: "vol".into(),
            size_bytes: size,
            layout,
        })
        .await
        .unwrap_or_else(|e| panic!("volume create: {e}"));
    let secret = server.client("host1").await;
    server.grant("host1", "vol", AccessMode::Rw).await;
    let mut agent = server.agent("host1", &secret).await;
    let attached = agent
        .attach("vol", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("attach: {e}"));
    Setup {
        agent,
        attached,
        devices: devices(server).await,
    }
}

/// A linear volume written with a pattern through the server path, whose device the agent
/// has just reported failed (the recovery runs).
struct Failed {
    setup: Setup,
    io: IoClient,
    map: VolumeMap,
    data: Vec<u8>,
    failed: uuid::Uuid,
}

/// A linear volume written with a pattern through the server path: its setup, server-path
/// session, map and data.
async fn written_linear(
    server: &TestServer,
    size: u64,
    seed: u64,
) -> (Setup, IoClient, VolumeMap, Vec<u8>) {
    written(server, 3, Layout::Linear, size, seed).await
}

/// [`written_linear`] with `device_count` pool devices and any layout.
async fn written(
    server: &TestServer,
    device_count: usize,
    layout: Layout,
    size: u64,
    seed: u64,
) -> (Setup, IoClient, VolumeMap, Vec<u8>) {
    let setup = setup_on(server, device_count, layout, size).await;
    let data = pattern(seed, size as usize);
    let mut io = IoClient::session(server, &setup.attached).await;
    let map = setup.attached.map.clone();
    io.write(&map, 0, &data).await;
    (setup, io, map, data)
}

async fn failed_linear(server: &TestServer, size: u64, seed: u64) -> Failed {
    let (mut setup, io, map, data) = written_linear(server, size, seed).await;
    let failed = map.extents[0].replicas[0].device_uuid;
    declare_failed(server, &mut setup, map.volume_id, failed)
        .await
        .unwrap_or_else(|e| panic!("recovery start: {e}"));
    // Writes of the relocating volume carry the epoch of the map marking it syncing.
    let map = follow_start(&mut setup.agent, &map).await;
    Failed {
        setup,
        io,
        map,
        data,
        failed,
    }
}

async fn pool(server: &TestServer) -> Vec<DeviceInfo> {
    server
        .admin()
        .await
        .call(PoolList {})
        .await
        .unwrap_or_else(|e| panic!("pool list: {e}"))
}

async fn devices(server: &TestServer) -> HashMap<uuid::Uuid, PathBuf> {
    let list = pool(server).await;
    list.into_iter()
        .map(|d| (d.uuid, PathBuf::from(d.path)))
        .collect()
}

async fn volume_detail(server: &TestServer) -> VolumeDetail {
    server
        .admin()
        .await
        .call(VolumeShow { name: "vol".into() })
        .await
        .unwrap_or_else(|e| panic!("volume show: {e}"))
}

async fn recoveries(server: &TestServer) -> Vec<RecoveryStatus> {
    server
        .admin()
        .await
        .call(RecoveryList {})
        .await
        .unwrap_or_else(|e| panic!("recovery list: {e}"))
}

/// Checks every replica (or stripe member) holding each block of `map` has `expected`, by
/// reading image files.
fn assert_data(devices: &HashMap<uuid::Uuid, PathBuf>, map: &VolumeMap, expected: &[u8]) {
    for (block, wanted) in expected.chunks_exact(4096).enumerate() {
        let at = block as u64 * 4096;
        let extent = map
            .extent_at(at)
            .unwrap_or_else(|| panic!("volume offset {at} not mapped"));
        let (replicas, _) = extent
            .locate(at - extent.volume_offset)
            .unwrap_or_else(|| panic!("volume offset {at} not mapped"));
        for replica in replicas {
            let path = &devices[&replica.device_uuid];
            let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{e}"));
            let mut data = vec![0u8; 4096];
            file.read_exact_at(&mut data, replica.device_offset)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                data == wanted,
                "volume block at {at} differs on device {} offset {}",
                replica.device_uuid,
                replica.device_offset
            );
        }
    }
}

/// Answers the pushes of a relocation's first change as an agent does until the client
/// resumes on the map that marks the moving extents syncing; returns that map.
async fn follow_start(agent: &mut AgentClient, old: &VolumeMap) -> VolumeMap {
    let map = follow_change_to_map(agent, old.epoch).await;
    assert!(!map.syncing.is_empty(), "no syncing range in {map:?}");
    map
}

/// Waits for the `done` status and the final map (newer than `old_epoch`, nothing syncing),
/// answering quiesce and map pushes as an agent does; returns the map.
async fn wait_for_recovery(agent: &mut AgentClient, old_epoch: u64) -> VolumeMap {
    let mut done = false;
    let mut new_map = None;
    let deadline = Instant::now() + WAIT;
    while !done || new_map.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let push = tokio::time::timeout(left, agent.next_push())
            .await
            .unwrap_or_else(|_| panic!("recovery did not finish within {WAIT:?}"))
            .unwrap_or_else(|e| panic!("push: {e}"));
        match push {
            Push::RecoveryStatus(status) => {
                assert_ne!(
                    status.state,
                    RecoveryState::Failed,
                    "recovery failed: {}",
                    status.message
                );
                if status.state == RecoveryState::Done {
                    assert_eq!(status.bytes_done, status.bytes_total);
                    assert!((status.percent - 100.0).abs() < 1e-9);
                    done = true;
                }
            }
            Push::Quiesce(quiesce) => agent
                .quiesce_ack(quiesce.volume_id, quiesce.epoch)
                .await
                .unwrap_or_else(|e| panic!("quiesce ack: {e}")),
            Push::MapUpdate(map) if map.epoch > old_epoch => {
                agent
                    .ack(map.volume_id, map.epoch)
                    .await
                    .unwrap_or_else(|e| panic!("ack: {e}"));
                if map.syncing.is_empty() {
                    new_map = Some(map);
                }
            }
            Push::MapUpdate(_) | Push::Resume(_) => {}
        }
    }
    new_map.unwrap_or_else(|| panic!("no map"))
}

fn on_device(map: &VolumeMap, device: uuid::Uuid) -> bool {
    map.extents
        .iter()
        .any(|e| e.replicas.iter().any(|r| r.device_uuid == device))
}

/// Declares the device of replica `copy` of the first extent failed after a client reported
/// it, and checks the outcome.
async fn recover_and_check(
    server: &TestServer,
    setup: &mut Setup,
    copy: usize,
    expected: &[u8],
) -> VolumeMap {
    let map = setup.attached.map.clone();
    let failed = map.extents[0].replicas[copy].device_uuid;
    let started = declare_failed(server, setup, map.volume_id, failed)
        .await
        .unwrap_or_else(|e| panic!("recovery start: {e}"));
    let [status] = started.as_slice() else {
        panic!("one recovery expected: {started:?}")
    };
    assert_eq!(status.device_uuid, failed);
    assert_eq!(status.bytes_total, map.size_bytes);
    // One change marks the moving extents syncing, one publishes the final map.
    let new_map = wait_for_recovery(&mut setup.agent, map.epoch).await;
    assert_eq!(new_map.epoch, map.epoch + 2);
    assert!(!on_device(&new_map, failed), "new map still uses {failed}");
    assert_eq!(
        new_map.extents[0].replicas.len(),
        map.extents[0].replicas.len()
    );
    assert_data(&setup.devices, &new_map, expected);
    let detail = volume_detail(server).await;
    assert_eq!(detail.map, new_map);
    let shown = detail
        .recovery
        .unwrap_or_else(|| panic!("no recovery shown"));
    assert_eq!(shown.state, RecoveryState::Done);
    new_map
}

#[tokio::test]
async fn mirrored_volume_moves_off_a_failed_device_from_its_surviving_mirror() {
    let server = TestServer::start();
    let size = 8 * MIB;
    let mut setup = setup(&server, Layout::Mirror, size).await;
    let data = pattern(1, size as usize);
    let mut io = IoClient::session(&server, &setup.attached).await;
    io.write(&setup.attached.map, 0, &data).await;
    // The failed device's copy is wiped: the data can only come from the surviving mirror.
    let map = setup.attached.map.clone();
    let failed = map.extents[0].replicas[0];
    let wipe = std::fs::OpenOptions::new()
        .write(true)
        .open(&setup.devices[&failed.device_uuid])
        .unwrap_or_else(|e| panic!("{e}"));
    wipe.write_all_at(&vec![0u8; size as usize], failed.device_offset)
        .unwrap_or_else(|e| panic!("{e}"));
    let new_map = recover_and_check(&server, &mut setup, 0, &data).await;
    let survivor = map.extents[0].replicas[1].device_uuid;
    assert!(new_map
        .extents
        .iter()
        .all(|e| e.replicas.iter().any(|r| r.device_uuid == survivor)));
}

#[tokio::test]
async fn linear_volume_is_copied_from_the_still_readable_failed_device() {
    let server = TestServer::start();
    let size = 8 * MIB;
    let mut setup = setup(&server, Layout::Linear, size).await;
    let data = pattern(2, size as usize);
    let mut io = IoClient::session(&server, &setup.attached).await;
    io.write(&setup.attached.map, 0, &data).await;
    recover_and_check(&server, &mut setup, 0, &data).await;
    assert!(recoveries(&server)
        .await
        .iter()
        .all(|r| r.state == RecoveryState::Done));
}

#[tokio::test]
async fn writes_during_the_copy_reach_the_new_device() {
    let striped = Layout::Striped {
        stripe_count: 2,
        stripe_unit_bytes: MIB,
    };
    // Striped: the member on the failed device holds chunks 0, 2, 4, ... (8 MiB): the writes
    // below hit a copied chunk (0), one not copied yet (14) and both members (7 and 8).
    for layout in [Layout::Linear, Layout::Mirror, striped] {
        let server = TestServer::start_with_args(&[RECOVERY_MAX_RATE, "7M"]);
        let size = 16 * MIB;
        let mut setup = setup(&server, layout, size).await;
        let mut data = pattern(3, size as usize);
        let mut io = IoClient::session(&server, &setup.attached).await;
        let map = setup.attached.map.clone();
        io.write(&map, 0, &data).await;
        let failed = map.extents[0].replicas[0];
        if layout == Layout::Mirror {
            // Stale data on the reported device: server-path reads must not use it.
            let wipe = std::fs::OpenOptions::new()
                .write(true)
                .open(&setup.devices[&failed.device_uuid])
                .unwrap_or_else(|e| panic!("{e}"));
            wipe.write_all_at(&vec![0u8; size as usize], failed.device_offset)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let failed = failed.device_uuid;
        declare_failed(&server, &mut setup, map.volume_id, failed)
            .await
            .unwrap_or_else(|e| panic!("recovery start: {e}"));
        // Reporting now joins the running recovery; another device must wait for it.
        let again = setup
            .agent
            .report_failure(map.volume_id, failed, "timeout again")
            .await
            .unwrap_or_else(|e| panic!("second report: {e}"));
        assert_eq!(again.status.map(|s| s.device_uuid), Some(failed));
        let survivor = map.extents[0].replicas.last().map(|r| r.device_uuid);
        let map = follow_start(&mut setup.agent, &map).await;
        if let Some(survivor) = survivor.filter(|_| layout == Layout::Mirror) {
            let busy = setup
                .agent
                .report_failure(map.volume_id, survivor, "both?")
                .await;
            assert_eq!(
                busy.err().and_then(|e| e.server_code()),
                Some(ErrorCode::Busy)
            );
        }
        // Wait until part of the volume is copied, then overwrite a copied range, a range not
        // copied yet, and a range straddling 8 MiB.
        let deadline = Instant::now() + WAIT;
        loop {
            let status = recoveries(&server).await;
            if status.first().is_some_and(|s| s.bytes_done >= 2 * MIB) {
                assert_eq!(status[0].state, RecoveryState::Copying);
                break;
            }
            assert!(Instant::now() < deadline, "copy did not progress");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (offset, length, seed) in [
            (0, MIB, 10),
            (14 * MIB, MIB, 11),
            (8 * MIB - 8192, 16384, 12),
        ] {
            let fresh = pattern(seed, length as usize);
            io.write(&map, offset, &fresh).await;
            data[offset as usize..(offset + length) as usize].copy_from_slice(&fresh);
        }
        let read = io.read(&map, 6 * MIB, 4 * MIB as u32 / 4).await;
        assert!(
            read == data[6 * MIB as usize..7 * MIB as usize],
            "{layout}: stale read"
        );
        let new_map = wait_for_recovery(&mut setup.agent, map.epoch).await;
        assert!(!on_device(&new_map, failed));
        assert_data(&setup.devices, &new_map, &data);
    }
}

#[tokio::test]
async fn a_killed_server_resumes_the_recovery_from_its_saved_cursor() {
    let mut server = TestServer::start_with_args(&[RECOVERY_MAX_RATE, "10M"]);
    let size = 16 * MIB;
    let Failed {
        setup,
        io,
        map,
        data,
        failed,
    } = failed_linear(&server, size, 4).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let status = recoveries(&server).await;
        if status.first().is_some_and(|s| s.bytes_done >= 6 * MIB) {
            assert!(status[0].bytes_done < size, "finished before the kill");
            break;
        }
        assert!(Instant::now() < deadline, "copy did not progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9();
    drop(io);
    drop(setup.agent);
    let restarted = TestServer::start_in(&server.dir);
    let deadline = Instant::now() + WAIT;
    let finished = loop {
        let status = recoveries(&restarted).await;
        if let Some(done) = status.iter().find(|s| s.state == RecoveryState::Done) {
            break done.clone();
        }
        assert!(
            status.iter().all(|s| s.state != RecoveryState::Failed),
            "recovery failed: {status:?}"
        );
        assert!(
            Instant::now() < deadline,
            "no resume; log:\n{}",
            restarted.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(finished.bytes_done, size);
    let log = restarted.log();
    let resumed_at =
        last_resume_cursor(&log).unwrap_or_else(|| panic!("no resume in the log:\n{log}"));
    assert!(
        resumed_at >= 4 * MIB,
        "resumed at {resumed_at}, not from the saved cursor"
    );
    let detail = volume_detail(&restarted).await;
    assert_eq!(detail.map.epoch, map.epoch + 1);
    assert!(!on_device(&detail.map, failed));
    assert_data(&setup.devices, &detail.map, &data);
}

#[tokio::test]
async fn bad_failure_reports_are_refused_and_change_nothing() {
    let server = TestServer::start();
    let mut setup = setup(&server, Layout::Linear, 4 * MIB).await;
    let mut admin = server.admin().await;
    admin
        .call(VolumeCreate {
            name: "other".into(),
            size_bytes: 4 * MIB,
            layout: Layout::Linear,
        })
        .await
        .unwrap_or_else(|e| panic!("volume create: {e}"));
    let other: VolumeDetail = admin
        .call(VolumeShow {
            name: "other".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pool_before: Vec<DeviceInfo> = admin
        .call(PoolList {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let map = setup.attached.map.clone();
    let used = map.extents[0].replicas[0].device_uuid;
    let unused = *setup
        .devices
        .keys()
        .find(|d| !on_device(&map, **d) && !on_device(&other.map, **d))
        .unwrap_or_else(|| panic!("no unused device"));
    let cases = [
        (
            other.map.volume_id,
            used,
            ErrorCode::NotFound,
            "not attached",
        ),
        (999, used, ErrorCode::NotFound, "unknown volume"),
        (
            map.volume_id,
            uuid::Uuid::new_v4(),
            ErrorCode::NotFound,
            "unknown device",
        ),
        (
            map.volume_id,
            unused,
            ErrorCode::BadRequest,
            "device not in volume",
        ),
    ];
    for (volume_id, device, code, what) in cases {
        let refused = setup.agent.report_failure(volume_id, device, what).await;
        match refused {
            Err(error) => assert_eq!(error.server_code(), Some(code), "{what}: {error}"),
            Ok(status) => panic!("{what}: accepted: {status:?}"),
        }
    }
    // The connection still works, and nothing changed.
    assert_eq!(
        setup
            .agent
            .renew(map.volume_id, map.epoch)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        map.lease_ms
    );
    assert!(recoveries(&server).await.is_empty());
    let detail = volume_detail(&server).await;
    assert_eq!(detail.map, map);
    assert!(detail.recovery.is_none());
    let pool_after: Vec<DeviceInfo> = admin
        .call(PoolList {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pool_before, pool_after);
}

#[tokio::test]
async fn fail_back_is_refused_while_the_device_is_recovered_and_accepted_otherwise() {
    let server = TestServer::start_with_args(&[RECOVERY_MAX_RATE, "10M"]);
    let mut setup = setup(&server, Layout::Linear, 4 * MIB).await;
    let map = setup.attached.map.clone();
    let failed = map.extents[0].replicas[0].device_uuid;
    // No recovery recorded: the client may fail back.
    let (accepted, message) = setup
        .agent
        .report_path_healed(map.volume_id, failed)
        .await
        .unwrap_or_else(|e| panic!("report healed: {e}"));
    assert!(accepted, "{message}");
    // Reported, but the server reads the device: the client may fail back when its path heals.
    report_readable_device(&server, &mut setup, map.volume_id, failed).await;
    let (accepted, message) = setup
        .agent
        .report_path_healed(map.volume_id, failed)
        .await
        .unwrap_or_else(|e| panic!("report healed: {e}"));
    assert!(accepted, "{message}");
    let healed = pool(&server).await;
    assert!(
        healed.iter().all(|d| d.path_failed_on.is_empty()),
        "{healed:?}"
    );
    declare_failed(&server, &mut setup, map.volume_id, failed)
        .await
        .unwrap_or_else(|e| panic!("recovery start: {e}"));
    let map = follow_start(&mut setup.agent, &map).await;
    // While the volume is moved off the device, direct writes there would miss the copy.
    let (accepted, message) = setup
        .agent
        .report_path_healed(map.volume_id, failed)
        .await
        .unwrap_or_else(|e| panic!("report healed: {e}"));
    assert!(
        !accepted,
        "fail-back accepted during the recovery: {message}"
    );
    // Another device of the volume is not being recovered.
    let other = *setup
        .devices
        .keys()
        .find(|d| **d != failed)
        .unwrap_or_else(|| panic!("no other device"));
    let (accepted, message) = setup
        .agent
        .report_path_healed(map.volume_id, other)
        .await
        .unwrap_or_else(|e| panic!("report healed: {e}"));
    assert!(accepted, "{message}");
    // Not attached: refused with not_found.
    let refused = setup.agent.report_path_healed(999, failed).await;
    assert_eq!(
        refused.err().and_then(|e| e.server_code()),
        Some(ErrorCode::NotFound)
    );
    let new_map = wait_for_recovery(&mut setup.agent, map.epoch).await;
    assert!(!on_device(&new_map, failed));
}

/// Reads of a single-copy volume while it recovers come from the failed device (the server's
/// own path to it), and when that is unreadable too, from the recovery target for the part
/// already copied; only the part neither holds gets -EIO.
#[tokio::test]
async fn reads_during_recovery_fall_back_to_the_target_for_the_copied_part() {
    let server = TestServer::start_with_args(&[RECOVERY_MAX_RATE, "5M"]);
    let size = 16 * MIB;
    let Failed {
        setup,
        mut io,
        map,
        data,
        failed,
    } = failed_linear(&server, size, 7).await;
    // Recovering, nothing unreadable yet: the failed device serves reads.
    assert!(io.read(&map, 12 * MIB, 65536).await == data[12 * MIB as usize..][..65536]);
    let deadline = Instant::now() + WAIT;
    let copied = loop {
        let status = recoveries(&server).await;
        if let Some(status) = status.first().filter(|s| s.bytes_done >= 4 * MIB) {
            assert!(status.bytes_done <= 12 * MIB, "copied too fast: {status:?}");
            break status.bytes_done;
        }
        assert!(Instant::now() < deadline, "copy did not progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Now the server cannot read the failed device either.
    let failed_image = &setup.devices[&failed];
    std::fs::OpenOptions::new()
        .write(true)
        .open(failed_image)
        .and_then(|f| f.set_len(0))
        .unwrap_or_else(|e| panic!("{}: {e}", failed_image.display()));
    // Copied: from the target.
    assert!(io.read(&map, 0, MIB as u32).await == data[..MIB as usize]);
    assert!(io.read(&map, copied - 8192, 8192).await == data[(copied - 8192) as usize..][..8192]);
    // Not copied: nowhere to read it from.
    let header = RequestHeader {
        op: Op::Read,
        flags: 0,
        handle: 99,
        volume_id: map.volume_id,
        epoch: map.epoch,
        offset: size - 4096,
        length: 4096,
    };
    assert_eq!(io.call(&header, &[]).await, -libc::EIO);
}

/// Checks that the server refused a request with `code`.
fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, sanblk_proto::client::ClientError>,
    code: ErrorCode,
) {
    match result {
        Err(error) => assert_eq!(error.server_code(), Some(code), "{error}"),
        Ok(reply) => panic!("accepted, not refused with {code:?}: {reply:?}"),
    }
}

/// Asks for `vol` to be moved off device `from` (anywhere).
async fn move_off(
    server: &TestServer,
    from: uuid::Uuid,
) -> Result<RecoveryStatus, sanblk_proto::client::ClientError> {
    server
        .admin()
        .await
        .call(VolumeMove {
            name: "vol".into(),
            from: Some(from.to_string()),
            to: None,
            cancel: false,
        })
        .await
}

/// Adds an empty device to the pool.
async fn add_spare(server: &TestServer) {
    let spare = server.image("spare.img", POOL_DEVICE_BYTES);
    server
        .admin()
        .await
        .call(PoolAdd {
            path: spare.display().to_string(),
            force: false,
        })
        .await
        .unwrap_or_else(|e| panic!("pool add: {e}"));
}

/// Free bytes of each pool device.
async fn free_space(server: &TestServer) -> HashMap<uuid::Uuid, u64> {
    let list = pool(server).await;
    list.into_iter().map(|d| (d.uuid, d.free_bytes)).collect()
}

/// Waits until the relocation of the volume copied at least `bytes`.
async fn copied_at_least(server: &TestServer, bytes: u64) -> RecoveryStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = recoveries(server).await;
        if let Some(status) = status.first().filter(|s| s.bytes_done >= bytes) {
            return status.clone();
        }
        assert!(
            Instant::now() < deadline,
            "copy did not progress: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Overwrites a range already copied and one not copied yet through the server path (as a
/// client writes a syncing extent), keeping `data` in step.
async fn write_during_copy(io: &mut IoClient, map: &VolumeMap, data: &mut [u8], size: u64) {
    for (offset, length, seed) in [(0, MIB, 21), (size - 2 * MIB, MIB, 22)] {
        let fresh = pattern(seed, length as usize);
        io.write(map, offset, &fresh).await;
        data[offset as usize..(offset + length) as usize].copy_from_slice(&fresh);
    }
}

#[tokio::test]
async fn a_volume_moves_off_a_device_while_a_client_writes() {
    let server = TestServer::start_with_args(&[RECOVERY_MAX_RATE, "8M"]);
    let size = 16 * MIB;
    let (mut setup, mut io, map, mut data) = written_linear(&server, size, 20).await;
    let from = map.extents[0].replicas[0].device_uuid;
    let to = *setup
        .devices
        .keys()
        .find(|d| **d != from)
        .unwrap_or_else(|| panic!("no other device"));
    let free_before = free_space(&server).await;
    let started: RecoveryStatus = server
        .admin()
        .await
        .call(VolumeMove {
            name: "vol".into(),
            from: Some(setup.devices[&from].display().to_string()),
            to: Some(to.to_string()),
            cancel: false,
        })
        .await
        .unwrap_or_else(|e| panic!("volume move: {e}"));
    assert_eq!(started.bytes_total, size);
    assert_eq!(started.device_uuid, from);
    let syncing = follow_start(&mut setup.agent, &map).await;
    assert_eq!(syncing.epoch, map.epoch + 1);
    // The old place is still the map's: only the writes go through the server.
    assert_eq!(syncing.extents, map.extents);
    copied_at_least(&server, 2 * MIB).await;
    write_during_copy(&mut io, &syncing, &mut data, size).await;
    let moved = wait_for_recovery(&mut setup.agent, syncing.epoch).await;
    assert_eq!(moved.epoch, map.epoch + 2);
    assert!(!on_device(&moved, from), "still on {from}: {moved:?}");
    assert!(moved
        .extents
        .iter()
        .all(|e| e.replicas.iter().all(|r| r.device_uuid == to)));
    assert_data(&setup.devices, &moved, &data);
    let free_after = free_space(&server).await;
    assert_eq!(free_after[&from], free_before[&from] + size);
    assert_eq!(free_after[&to], free_before[&to] - size);
    assert_eq!(volume_detail(&server).await.map, moved);
}

#[tokio::test]
async fn mirror_add_copies_live_and_mirror_remove_drops_a_leg() {
    let server = TestServer::start_with_args(&[RECOVERY_MAX_RATE, "8M"]);
    let size = 16 * MIB;
    let (mut setup, mut io, map, mut data) = written_linear(&server, size, 30).await;
    let original = map.extents[0].replicas[0].device_uuid;
    let started: RecoveryStatus = server
        .admin()
        .await
        .call(MirrorAdd {
            name: "vol".into(),
            cancel: false,
        })
        .await
        .unwrap_or_else(|e| panic!("mirror add: {e}"));
    assert_eq!(started.bytes_total, size);
    let syncing = follow_start(&mut setup.agent, &map).await;
    copied_at_least(&server, 2 * MIB).await;
    write_during_copy(&mut io, &syncing, &mut data, size).await;
    let mirrored = wait_for_recovery(&mut setup.agent, syncing.epoch).await;
    assert_eq!(mirrored.layout, Layout::Mirror);
    assert!(mirrored.extents.iter().all(|e| e.replicas.len() == 2));
    assert!(mirrored
        .extents
        .iter()
        .all(|e| e.replicas[0].device_uuid == original && e.replicas[1].device_uuid != original));
    // Both copies of every block hold the data.
    assert_data(&setup.devices, &mirrored, &data);

    // A second mirror add has nothing to copy.
    let again = server
        .admin()
        .await
        .call(MirrorAdd {
            name: "vol".into(),
            cancel: false,
        })
        .await;
    assert_refused(again, ErrorCode::BadRequest);

    // Drop the original leg (a change: this client acks it).
    let mut admin = server.admin().await;
    let device = setup.devices[&original].display().to_string();
    let remove = tokio::spawn(async move {
        admin
            .call(MirrorRemove {
                name: "vol".into(),
                device,
            })
            .await
    });
    let linear = follow_change_to_map(&mut setup.agent, mirrored.epoch).await;
    let answered = remove
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("mirror remove: {e}"));
    assert_eq!(answered, linear);
    assert_eq!(linear.layout, Layout::Linear);
    assert!(!on_device(&linear, original));
    assert_data(&setup.devices, &linear, &data);
    // The only copy left cannot be removed.
    let survivor = linear.extents[0].replicas[0].device_uuid;
    let refused = server
        .admin()
        .await
        .call(MirrorRemove {
            name: "vol".into(),
            device: survivor.to_string(),
        })
        .await;
    assert_refused(refused, ErrorCode::BadRequest);
}

#[tokio::test]
async fn a_cancelled_move_leaves_the_data_in_place_and_frees_the_target() {
    let server = TestServer::start_with_args(&[RECOVERY_MAX_RATE, "4M"]);
    let size = 16 * MIB;
    let (mut setup, mut io, map, mut data) = written_linear(&server, size, 40).await;
    let from = map.extents[0].replicas[0].device_uuid;
    let free_before = free_space(&server).await;
    move_off(&server, from)
        .await
        .unwrap_or_else(|e| panic!("volume move: {e}"));
    let syncing = follow_start(&mut setup.agent, &map).await;
    assert_ne!(
        free_space(&server).await,
        free_before,
        "no target allocated"
    );
    copied_at_least(&server, MIB).await;
    write_during_copy(&mut io, &syncing, &mut data, size).await;
    let mut admin = server.admin().await;
    let cancel = tokio::spawn(async move {
        admin
            .call(VolumeMove {
                name: "vol".into(),
                from: None,
                to: None,
                cancel: true,
            })
            .await
    });
    let back = follow_change_to_map(&mut setup.agent, syncing.epoch).await;
    let status = cancel
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("cancel: {e}"));
    assert_eq!(status.state, RecoveryState::Cancelled);
    assert!(back.syncing.is_empty());
    assert_eq!(back.extents, map.extents);
    assert_data(&setup.devices, &back, &data);
    assert_eq!(free_space(&server).await, free_before);
    // Nothing left to cancel.
    let nothing = server
        .admin()
        .await
        .call(VolumeMove {
            name: "vol".into(),
            from: None,
            to: None,
            cancel: true,
        })
        .await;
    assert_refused(nothing, ErrorCode::NotFound);
}

#[tokio::test]
async fn evacuate_moves_every_volume_off_the_device() {
    let server = TestServer::start();
    server.pool_of(3, POOL_DEVICE_BYTES).await;
    let mut admin = server.admin().await;
    // Largest free device first: "big" fills the first device, the mirror "b" takes the other
    // two, and "c" lands on one of those.
    for (name, size, layout) in [
        ("big", 40 * MIB, Layout::Linear),
        ("b", 8 * MIB, Layout::Mirror),
        ("c", 8 * MIB, Layout::Linear),
    ] {
        server.create_volume(name, size, layout).await;
    }
    let devices = devices(&server).await;
    let show = |name: &str| VolumeShow { name: name.into() };
    let c: VolumeDetail = admin
        .call(show("c"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let device = c.map.extents[0].replicas[0].device_uuid;
    let b: VolumeDetail = admin
        .call(show("b"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        on_device(&b.map, device),
        "both volumes must use the device"
    );
    let started: Vec<RecoveryStatus> = admin
        .call(PoolEvacuate {
            device: devices[&device].display().to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("evacuate: {e}"));
    assert_eq!(started.len(), 2);
    let deadline = Instant::now() + WAIT;
    loop {
        let statuses = recoveries(&server).await;
        if statuses.len() == 2 && statuses.iter().all(|s| s.state == RecoveryState::Done) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "evacuation did not finish: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for name in ["b", "c"] {
        let detail: VolumeDetail = admin
            .call(show(name))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !on_device(&detail.map, device),
            "{name} still on the device"
        );
        assert!(detail.map.syncing.is_empty());
    }
    assert_eq!(
        free_space(&server).await[&device],
        free_space_capacity(&server, device).await
    );
}

/// Usable bytes of a device (what an empty device has free).
async fn free_space_capacity(server: &TestServer, device: uuid::Uuid) -> u64 {
    let list = pool(server).await;
    list.into_iter()
        .find(|d| d.uuid == device)
        .map(|d| d.capacity_bytes)
        .unwrap_or_else(|| panic!("no device {device}"))
}

#[tokio::test]
async fn bad_move_requests_are_refused_and_change_nothing() {
    let server = TestServer::start();
    let setup = setup(&server, Layout::Linear, 4 * MIB).await;
    let map = setup.attached.map.clone();
    let used = map.extents[0].replicas[0].device_uuid;
    let unused = *setup
        .devices
        .keys()
        .find(|d| !on_device(&map, **d))
        .unwrap_or_else(|| panic!("no unused device"));
    let free_before = free_space(&server).await;
    let mut admin = server.admin().await;
    let moves = [
        (
            Some("/no/such/device".to_string()),
            None,
            ErrorCode::NotFound,
            "unknown device",
        ),
        (
            Some(unused.to_string()),
            None,
            ErrorCode::BadRequest,
            "no data on it",
        ),
        (
            Some(used.to_string()),
            Some(used.to_string()),
            ErrorCode::BadRequest,
            "onto itself",
        ),
        (None, None, ErrorCode::BadRequest, "no --from"),
    ];
    for (from, to, code, what) in moves {
        let refused = admin
            .call(VolumeMove {
                name: "vol".into(),
                from,
                to,
                cancel: false,
            })
            .await;
        assert_eq!(
            refused.err().and_then(|e| e.server_code()),
            Some(code),
            "{what}"
        );
    }
    let unknown = admin
        .call(VolumeMove {
            name: "nope".into(),
            from: Some(used.to_string()),
            to: None,
            cancel: false,
        })
        .await;
    assert_refused(unknown, ErrorCode::NotFound);
    let striped = admin
        .call(VolumeCreate {
            name: "s".into(),
            size_bytes: 4 * MIB,
            layout: Layout::Striped {
                stripe_count: 2,
                stripe_unit_bytes: MIB,
            },
        })
        .await;
    assert!(striped.is_ok(), "{striped:?}");
    let mirror_striped = admin
        .call(MirrorAdd {
            name: "s".into(),
            cancel: false,
        })
        .await;
    assert_refused(mirror_striped, ErrorCode::BadRequest);
    let mut expected = free_before.clone();
    for (device, free) in free_space(&server).await {
        // Only the striped volume's allocation changed the pool.
        if let Some(before) = expected.get_mut(&device) {
            assert!(free <= *before, "{device} gained space");
            *before = free;
        }
    }
    assert!(recoveries(&server).await.is_empty());
    assert_eq!(volume_detail(&server).await.map, map);
}

#[tokio::test]
async fn a_recovery_without_space_starts_when_a_device_is_added() {
    let server = TestServer::start();
    let size = 8 * MIB;
    let (mut setup, mut io, map, data) = written(&server, 1, Layout::Linear, size, 50).await;
    let failed = map.extents[0].replicas[0].device_uuid;
    let report = declare_failed(&server, &mut setup, map.volume_id, failed).await;
    assert_refused(report, ErrorCode::NoSpace);
    assert!(recoveries(&server).await.is_empty());
    // The client keeps using the server path meanwhile.
    assert!(io.read(&map, 0, 65536).await == data[..65536]);
    add_spare(&server).await;
    let syncing = follow_start(&mut setup.agent, &map).await;
    let recovered = wait_for_recovery(&mut setup.agent, syncing.epoch).await;
    assert!(!on_device(&recovered, failed));
    setup.devices = devices(&server).await;
    assert_data(&setup.devices, &recovered, &data);
}

/// What waits for space is kept in memory only; the failed mark is persisted, so a restarted
/// server still recovers the volume once a device is added.
#[tokio::test]
async fn a_recovery_waiting_for_space_survives_a_server_restart() {
    let mut server = TestServer::start();
    let size = 8 * MIB;
    let (mut setup, io, map, data) = written(&server, 1, Layout::Linear, size, 51).await;
    let failed = map.extents[0].replicas[0].device_uuid;
    let report = declare_failed(&server, &mut setup, map.volume_id, failed).await;
    assert_refused(report, ErrorCode::NoSpace);
    drop(setup);
    drop(io);
    assert!(server.stop(), "sand did not stop");
    let restarted = TestServer::start_in(&server.dir);
    let shown = pool(&restarted).await;
    assert!(
        shown
            .iter()
            .any(|d| d.uuid == failed && d.state == "failed"),
        "{shown:?}"
    );
    add_spare(&restarted).await;
    let deadline = Instant::now() + WAIT;
    let recovered = loop {
        let detail = volume_detail(&restarted).await;
        if detail.map.syncing.is_empty() && !on_device(&detail.map, failed) {
            break detail.map;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after the restart: {detail:?}\n{}",
            restarted.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_data(&devices(&restarted).await, &recovered, &data);
}

#[tokio::test]
async fn an_administrator_declares_a_device_failed_and_its_volumes_are_recovered() {
    let server = TestServer::start();
    let size = 8 * MIB;
    let (mut setup, _io, map, data) = written(&server, 3, Layout::Mirror, size, 60).await;
    let failing = map.extents[0].replicas[0].device_uuid;
    let started: Vec<RecoveryStatus> = server
        .admin()
        .await
        .call(RecoveryStart {
            device: setup.devices[&failing].display().to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("recovery start: {e}"));
    assert_eq!(started.len(), 1);
    assert_eq!(
        started[0].kind,
        sanblk_proto::protocol::RelocationKind::Recovery
    );
    let syncing = follow_start(&mut setup.agent, &map).await;
    let recovered = wait_for_recovery(&mut setup.agent, syncing.epoch).await;
    assert!(!on_device(&recovered, failing));
    assert!(recovered.extents.iter().all(|e| e.replicas.len() == 2));
    assert_data(&setup.devices, &recovered, &data);
    let unknown = server
        .admin()
        .await
        .call(RecoveryStart {
            device: "/no/such".into(),
        })
        .await;
    assert_refused(unknown, ErrorCode::NotFound);
}

/// Makes the image of `device` unreadable for the server (every read past its new end fails).
fn break_image(devices: &HashMap<uuid::Uuid, PathBuf>, device: uuid::Uuid) {
    let image = &devices[&device];
    std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .and_then(|f| f.set_len(0))
        .unwrap_or_else(|e| panic!("{}: {e}", image.display()));
}

#[tokio::test]
async fn a_reported_device_the_server_cannot_read_either_is_recovered() {
    let server = TestServer::start();
    let size = 8 * MIB;
    let (mut setup, _io, map, data) = written(&server, 3, Layout::Mirror, size, 80).await;
    let dead = map.extents[0].replicas[0].device_uuid;
    break_image(&setup.devices, dead);
    let reported = setup
        .agent
        .report_failure(map.volume_id, dead, "EIO")
        .await
        .unwrap_or_else(|e| panic!("report: {e}"));
    let status = reported
        .status
        .unwrap_or_else(|| panic!("no recovery: {}", reported.message));
    assert_eq!(status.device_uuid, dead);
    assert!(
        reported.message.contains("cannot read"),
        "{}",
        reported.message
    );
    let syncing = follow_start(&mut setup.agent, &map).await;
    let recovered = wait_for_recovery(&mut setup.agent, syncing.epoch).await;
    assert!(!on_device(&recovered, dead));
    assert!(recovered.extents.iter().all(|e| e.replicas.len() == 2));
    assert_data(&setup.devices, &recovered, &data);
    let shown = pool(&server).await;
    let shown = shown
        .iter()
        .find(|d| d.uuid == dead)
        .unwrap_or_else(|| panic!("{dead} not in the pool"));
    assert_eq!(shown.state, "failed");
    assert!(shown.path_failed_on.is_empty());
}

#[tokio::test]
async fn an_error_of_the_servers_own_io_declares_the_device_failed_and_recovers_it() {
    let server = TestServer::start();
    let size = 8 * MIB;
    let (mut setup, mut io, map, data) = written(&server, 3, Layout::Mirror, size, 90).await;
    // No client reports anything: the server-path read finds the first copy unreadable,
    // serves the data from the other one, and declares the device failed.
    let dead = map.extents[0].replicas[0].device_uuid;
    break_image(&setup.devices, dead);
    assert!(io.read(&map, 0, 65536).await == data[..65536]);
    let syncing = follow_start(&mut setup.agent, &map).await;
    let recovered = wait_for_recovery(&mut setup.agent, syncing.epoch).await;
    assert!(!on_device(&recovered, dead));
    assert_data(&setup.devices, &recovered, &data);
    let statuses = recoveries(&server).await;
    assert!(
        statuses
            .iter()
            .any(|s| s.device_uuid == dead && s.state == RecoveryState::Done),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn a_mirror_without_a_spare_drops_its_dead_copy_and_remirrors_on_a_new_device() {
    let server = TestServer::start();
    let size = 8 * MIB;
    let (mut setup, mut io, map, mut data) = written(&server, 2, Layout::Mirror, size, 70).await;
    let dead = map.extents[0].replicas[0].device_uuid;
    let report = declare_failed(&server, &mut setup, map.volume_id, dead).await;
    assert_refused(report, ErrorCode::NoSpace);
    // Degraded in a new epoch: the surviving copy alone, so nothing waits on the dead one.
    let degraded = follow_change_to_map(&mut setup.agent, map.epoch).await;
    assert!(!on_device(&degraded, dead), "{degraded:?}");
    assert!(degraded.extents.iter().all(|e| e.replicas.len() == 1));
    // The dead device's image cannot be written any more: writes still succeed.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&setup.devices[&dead])
        .and_then(|f| f.set_len(0))
        .unwrap_or_else(|e| panic!("{e}"));
    let fresh = pattern(71, MIB as usize);
    io.write(&degraded, 2 * MIB, &fresh).await;
    data[2 * MIB as usize..3 * MIB as usize].copy_from_slice(&fresh);
    assert_data(&setup.devices, &degraded, &data);
    // A new device: the volume is mirrored again, onto it.
    add_spare(&server).await;
    let syncing = follow_start(&mut setup.agent, &degraded).await;
    let mirrored = wait_for_recovery(&mut setup.agent, syncing.epoch).await;
    assert_eq!(mirrored.layout, Layout::Mirror);
    assert!(mirrored.extents.iter().all(|e| e.replicas.len() == 2));
    assert!(!on_device(&mirrored, dead));
    setup.devices = devices(&server).await;
    assert_data(&setup.devices, &mirrored, &data);
}

/// Where sand stops when started with `SAND_CRASH_AT` (debug builds only).
#[cfg(debug_assertions)]
const CRASH_AT_ENV: &str = "SAND_CRASH_AT";

/// A move whose server is killed at any step of its first change completes after a restart:
/// rolled back before the commit, it is started again; committed, its copy resumes.
#[cfg(debug_assertions)]
#[tokio::test]
async fn a_move_interrupted_by_a_crash_at_any_step_completes_after_restart() {
    for crash_at in [
        "change:after-record",
        "change:after-quiesce",
        "change:after-commit",
        "change:after-map-acks",
    ] {
        let mut first = TestServer::start();
        let size = 8 * MIB;
        let (mut setup, io, map, data) = written_linear(&first, size, 80).await;
        drop(io);
        setup
            .agent
            .detach(map.volume_id)
            .await
            .unwrap_or_else(|e| panic!("detach: {e}"));
        assert!(first.stop(), "sand did not stop cleanly");
        let from = map.extents[0].replicas[0].device_uuid;
        let mut server = TestServer::start_in_with_env(&first.dir, &[(CRASH_AT_ENV, crash_at)]);
        // Answered before the crash (the change runs in the background) or cut by it.
        let _ = move_off(&server, from).await;
        common::wait_for_crash(&mut server, crash_at).await;
        let restarted = TestServer::start_in(&server.dir);
        let deadline = Instant::now() + WAIT;
        loop {
            let statuses = recoveries(&restarted).await;
            if statuses.iter().any(|s| s.state == RecoveryState::Done) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "after {crash_at}: the move did not complete: {statuses:?}\n{}",
                restarted.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let moved = volume_detail(&restarted).await.map;
        assert!(!on_device(&moved, from), "after {crash_at}: {moved:?}");
        assert!(moved.syncing.is_empty(), "after {crash_at}");
        assert_data(&setup.devices, &moved, &data);
        drop((first, server, setup));
    }
}
