//! Pool labelling, volumes and restart persistence against a real `sand` process.

mod common;

use std::io::{Seek, SeekFrom, Write};

use common::{TestServer, MIB};
use sanblk_proto::label::{read_label, DATA_START_OFFSET};
use sanblk_proto::map::{AccessMode, ExtentKind, Layout, VolumeMap, DEFAULT_STRIPE_UNIT_BYTES};
use sanblk_proto::protocol::{
    ClientInfo, ClientList, DeviceInfo, ErrorCode, PoolAdd, PoolList, VolumeCreate, VolumeDelete,
    VolumeDetail, VolumeGrow, VolumeList, VolumeShow, VolumeSummary,
};

async fn pool_list(server: &TestServer) -> Vec<DeviceInfo> {
    server
        .admin()
        .await
        .call(PoolList {})
        .await
        .unwrap_or_else(|e| panic!("pool list: {e}"))
}

/// `sanctl pool add PATH [--force]` as an admin request.
fn pool_add(path: &std::path::Path, force: bool) -> PoolAdd {
    PoolAdd {
        path: path.display().to_string(),
        force,
    }
}

#[tokio::test]
async fn pool_add_writes_a_label_and_reports_space() {
    let server = TestServer::start();
    let paths = server.pool_of(2, 64 * MIB).await;
    let devices = pool_list(&server).await;
    assert_eq!(devices.len(), 2);
    for path in &paths {
        let label = read_label(path)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no label"));
        let device = devices
            .iter()
            .find(|d| d.uuid == label.device_uuid)
            .unwrap_or_else(|| panic!("label uuid unknown"));
        assert_eq!(
            device.path,
            path.canonicalize()
                .unwrap_or_default()
                .display()
                .to_string()
        );
        assert_eq!(label.device_size, 64 * MIB);
        assert_eq!(label.data_start, DATA_START_OFFSET);
        assert_eq!(device.capacity_bytes, 64 * MIB - DATA_START_OFFSET);
        assert_eq!(device.free_bytes, device.capacity_bytes);
        assert_eq!(device.state, "online");
    }
    let first = read_label(&paths[0]).ok().flatten().map(|l| l.pool_uuid);
    let second = read_label(&paths[1]).ok().flatten().map(|l| l.pool_uuid);
    assert_eq!(first, second, "both devices carry the same pool UUID");

    // Adding the same device again is refused.
    let mut admin = server.admin().await;
    let again = admin.call(pool_add(&paths[0], false)).await;
    assert_eq!(
        again.err().and_then(|e| e.server_code()),
        Some(ErrorCode::AlreadyExists)
    );
}

#[tokio::test]
async fn foreign_signatures_are_refused_unless_forced() {
    let server = TestServer::start();
    let mut admin = server.admin().await;
    let cases: [(&str, u64, &[u8]); 4] = [
        ("ext4", 1080, &[0x53, 0xEF]),
        ("gpt", 512, b"EFI PART"),
        ("lvm", 512, b"LABELONE"),
        ("xfs", 0, b"XFSB"),
    ];
    for (name, offset, magic) in cases {
        let path = server.image(&format!("{name}.img"), 16 * MIB);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{e}"));
        file.seek(SeekFrom::Start(offset))
            .unwrap_or_else(|e| panic!("{e}"));
        file.write_all(magic).unwrap_or_else(|e| panic!("{e}"));
        drop(file);
        let refused = admin.call(pool_add(&path, false)).await;
        assert_eq!(
            refused.err().and_then(|e| e.server_code()),
            Some(ErrorCode::ForeignSignature),
            "{name}"
        );
        assert!(
            read_label(&path).ok().flatten().is_none(),
            "{name}: refused device must stay untouched"
        );
        admin
            .call(pool_add(&path, true))
            .await
            .unwrap_or_else(|e| panic!("{name} --force: {e}"));
        assert!(
            read_label(&path).ok().flatten().is_some(),
            "{name}: forced device is labelled"
        );
    }

    // A device of another pool (labelled by a second server) is refused too.
    let other = TestServer::start();
    let foreign = other.pool_of(1, 16 * MIB).await;
    let refused = admin.call(pool_add(&foreign[0], false)).await;
    let error = refused
        .err()
        .unwrap_or_else(|| panic!("another pool's device was accepted"));
    assert_eq!(error.server_code(), Some(ErrorCode::ForeignSignature));
    assert!(error.to_string().contains("another sanblk pool"), "{error}");
}

fn run(program: &str, args: &[&str]) {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (qemu/install-deps.sh installs it)"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A LUKS1 header as cryptsetup writes it: magic, version, cipher, mode, hash, UUID.
fn luks1_header() -> Vec<u8> {
    let mut header = vec![0u8; 592];
    header[0..6].copy_from_slice(b"LUKS\xba\xbe");
    header[6..8].copy_from_slice(&1u16.to_be_bytes());
    header[8..11].copy_from_slice(b"aes");
    header[40..51].copy_from_slice(b"xts-plain64");
    header[72..78].copy_from_slice(b"sha256");
    header[104..108].copy_from_slice(&4096u32.to_be_bytes());
    header[108..112].copy_from_slice(&64u32.to_be_bytes());
    header[168..204].copy_from_slice(b"6c4b52e4-1fd8-4d2c-9c3b-9a1b6b0f0e2d");
    header
}

/// Signatures only a full probe finds (swap at the end of the first page, LUKS, btrfs at
/// 64 KiB) refuse `pool add` with their name; `--force` wipes them and labels the device.
#[tokio::test]
async fn blkid_signatures_are_refused_by_name_unless_forced() {
    let server = TestServer::start();
    let mut admin = server.admin().await;
    let swap = server.image("swap.img", 16 * MIB);
    run("mkswap", &[&swap.display().to_string()]);
    let luks = server.image("luks.img", 16 * MIB);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&luks)
        .and_then(|mut f| f.write_all(&luks1_header()))
        .unwrap_or_else(|e| panic!("{e}"));
    let btrfs = server.image("btrfs.img", 128 * MIB);
    run("mkfs.btrfs", &["-q", "-f", &btrfs.display().to_string()]);
    let cases = [
        (&swap, "swap (blkid: TYPE=swap"),
        (&luks, "crypto_LUKS (blkid: TYPE=crypto_LUKS"),
        (&btrfs, "btrfs (blkid: TYPE=btrfs at offset 65600)"),
    ];
    for (path, named) in cases {
        let shown = path.canonicalize().unwrap_or_else(|e| panic!("{e}"));
        let error = admin
            .call(pool_add(path, false))
            .await
            .err()
            .unwrap_or_else(|| panic!("{named}: accepted without --force"));
        assert_eq!(
            error.server_code(),
            Some(ErrorCode::ForeignSignature),
            "{error}"
        );
        let message = error.to_string();
        assert!(
            message.contains(&format!("device {} holds {named}", shown.display())),
            "{message}"
        );
        assert!(message.contains("use --force"), "{message}");
        assert!(
            read_label(path).ok().flatten().is_none(),
            "{named}: refused device must stay untouched"
        );
        admin
            .call(pool_add(path, true))
            .await
            .unwrap_or_else(|e| panic!("{named} --force: {e}"));
        assert!(read_label(path).ok().flatten().is_some(), "{named}");
    }
    // --force wiped the btrfs superblock beyond the label's 4 KiB too.
    let image = std::fs::read(&btrfs).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(&image[65600..65608], b"_BHRfS_M", "btrfs magic left behind");
    // Our own label is not foreign: re-adding a labelled device keeps its answer.
    let again = admin.call(pool_add(&swap, false)).await;
    assert_eq!(
        again.err().and_then(|e| e.server_code()),
        Some(ErrorCode::AlreadyExists)
    );
}

/// A striped create or an rw client's grow far beyond the pool is refused from arithmetic:
/// quickly, with the sizes in the message, and without the server building (and holding) an
/// allocation first.
#[tokio::test]
async fn absurd_creates_and_grows_are_refused_before_allocating() {
    const EIB: u64 = 1 << 60;
    let server = TestServer::start();
    server.pool_of(4, 64 * MIB).await;
    let mut admin = server.admin().await;
    let before = server.peak_rss();
    for layout in ["striped:2", "striped:4", "mirror", "linear"] {
        let started = std::time::Instant::now();
        let error = admin
            .call(VolumeCreate {
                name: "huge".into(),
                size_bytes: EIB,
                layout: layout.parse().unwrap_or_else(|e| panic!("{e}")),
            })
            .await
            .err()
            .unwrap_or_else(|| panic!("1 EiB {layout} volume created"));
        assert_eq!(error.server_code(), Some(ErrorCode::NoSpace), "{error}");
        assert!(
            error
                .to_string()
                .contains(&format!("{EIB} bytes requested")),
            "{error}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{layout}: refusing took {:?}",
            started.elapsed()
        );
    }
    // An rw client grows its striped volume to 1 EiB.
    let secret = server.client("host1").await;
    admin
        .call(VolumeCreate {
            name: "vol".into(),
            size_bytes: 8 * MIB,
            layout: "striped:4".parse().unwrap_or_else(|e| panic!("{e}")),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    server.grant("host1", "vol", AccessMode::Rw).await;
    let mut agent = server.agent("host1", &secret).await;
    let map = agent
        .attach("vol", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .map;
    let started = std::time::Instant::now();
    let error = agent
        .grow(map.volume_id, EIB)
        .await
        .err()
        .unwrap_or_else(|| panic!("grow to 1 EiB accepted"));
    assert!(error.to_string().contains("not enough space"), "{error}");
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    // The volume is untouched and still grows within the pool.
    let grown = agent
        .grow(map.volume_id, 16 * MIB)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(grown.size_bytes, 16 * MIB);
    let growth = server.peak_rss().saturating_sub(before);
    assert!(
        growth < 32 * MIB,
        "sand's peak RSS grew by {} MiB refusing absurd sizes",
        growth / MIB
    );
}

#[tokio::test]
async fn volumes_are_allocated_grown_and_deleted() {
    let server = TestServer::start();
    server.pool_of(3, 64 * MIB).await;
    let mut admin = server.admin().await;
    let create = |name: &str, size: u64, layout: Layout| VolumeCreate {
        name: name.into(),
        size_bytes: size,
        layout,
    };

    let mirror: VolumeMap = admin
        .call(create("m", 20 * MIB, Layout::Mirror))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mirror.size_bytes, 20 * MIB);
    assert_eq!(mirror.epoch, 1);
    for extent in &mirror.extents {
        assert_eq!(extent.replicas.len(), 2);
        assert_ne!(
            extent.replicas[0].device_uuid,
            extent.replicas[1].device_uuid
        );
    }
    let striped = Layout::Striped {
        stripe_count: 3,
        stripe_unit_bytes: DEFAULT_STRIPE_UNIT_BYTES,
    };
    let stripes: VolumeMap = admin
        .call(create("s", 6 * MIB, striped))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Two whole rows of 3 MiB: one striped extent over three distinct devices.
    assert_eq!(stripes.extents.len(), 1, "{:?}", stripes.extents);
    assert_eq!(
        stripes.extents[0].kind,
        ExtentKind::Striped {
            stripe_unit: DEFAULT_STRIPE_UNIT_BYTES
        }
    );
    let members: Vec<_> = stripes.extents[0]
        .replicas
        .iter()
        .map(|r| r.device_uuid)
        .collect();
    assert_eq!(members.len(), 3);
    assert!(members[0] != members[1] && members[1] != members[2] && members[0] != members[2]);

    let too_big = admin.call(create("huge", 1024 * MIB, Layout::Linear)).await;
    let error = too_big
        .err()
        .unwrap_or_else(|| panic!("1 GiB fitted in 189 MiB"));
    assert_eq!(error.server_code(), Some(ErrorCode::NoSpace));
    assert!(error.to_string().contains("not enough space"), "{error}");

    let duplicate = admin.call(create("m", MIB, Layout::Linear)).await;
    assert_eq!(
        duplicate.err().and_then(|e| e.server_code()),
        Some(ErrorCode::AlreadyExists)
    );

    let grown: VolumeMap = admin
        .call(VolumeGrow {
            name: "m".into(),
            new_size_bytes: 30 * MIB,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(grown.epoch, 2);
    assert_eq!(
        grown.extents.iter().map(|e| e.length).sum::<u64>(),
        30 * MIB
    );
    assert_eq!(
        grown.extents[..mirror.extents.len() - 1],
        mirror.extents[..mirror.extents.len() - 1],
        "old data stays put"
    );

    let free_before: u64 = pool_list(&server).await.iter().map(|d| d.free_bytes).sum();
    admin
        .call(VolumeDelete {
            name: "m".into(),
            force: false,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let free_after: u64 = pool_list(&server).await.iter().map(|d| d.free_bytes).sum();
    assert_eq!(
        free_after - free_before,
        2 * 30 * MIB,
        "deleting a mirror frees both copies"
    );
    let missing = admin.call(VolumeShow { name: "m".into() }).await;
    assert_eq!(
        missing.err().and_then(|e| e.server_code()),
        Some(ErrorCode::NotFound)
    );
}

#[tokio::test]
async fn everything_survives_a_restart() {
    let mut server = TestServer::start();
    server.pool_of(2, 64 * MIB).await;
    let secret = server
        .volume_with_client("data", 8 * MIB, "host1", AccessMode::Rw)
        .await;
    let mut admin = server.admin().await;
    admin
        .call(VolumeCreate {
            name: "mirror".into(),
            size_bytes: 4 * MIB,
            layout: Layout::Mirror,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    admin
        .call(VolumeGrow {
            name: "data".into(),
            new_size_bytes: 12 * MIB,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(admin);
    let before = snapshot(&server).await;
    // Shutdown must be clean with an attached agent too; the agent sees its connection end.
    let mut agent = server.agent("host1", &secret).await;
    agent
        .attach("data", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        server.stop(),
        "sand must exit cleanly on SIGTERM; log:\n{}",
        server.log()
    );
    assert!(
        !server.admin_socket.exists(),
        "clean shutdown removes the admin socket"
    );

    assert!(
        agent.next_map_update().await.is_err(),
        "agent connection survived shutdown"
    );
    let restarted = TestServer::start_in(&server.dir);
    let after = snapshot(&restarted).await;
    assert_eq!(before, after, "state after restart differs");
    // The client's secret and grant survived: it can still authenticate and attach.
    let mut agent = restarted.agent("host1", &secret).await;
    let attached = agent
        .attach("data", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(attached.map.epoch, 2);
    assert_eq!(attached.map.size_bytes, 12 * MIB);
}

/// Everything the admin API shows, as JSON text, for comparison.
async fn snapshot(server: &TestServer) -> String {
    let mut admin = server.admin().await;
    let devices: Vec<DeviceInfo> = admin
        .call(PoolList {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let volumes: Vec<VolumeSummary> = admin
        .call(VolumeList {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut maps = Vec::new();
    for volume in &volumes {
        let detail: VolumeDetail = admin
            .call(VolumeShow {
                name: volume.name.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        maps.push(detail.map);
    }
    let clients: Vec<ClientInfo> = admin
        .call(ClientList {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!volumes.is_empty() && !devices.is_empty() && !clients.is_empty());
    serde_json::to_string_pretty(&(devices, volumes, maps, clients)).unwrap_or_default()
}

#[tokio::test]
async fn striped_volumes_beyond_the_old_4_gib_cap_are_one_extent() {
    let server = TestServer::start();
    server.pool_of(2, 3 * 1024 * MIB).await;
    let mut admin = server.admin().await;
    let striped = Layout::Striped {
        stripe_count: 2,
        stripe_unit_bytes: DEFAULT_STRIPE_UNIT_BYTES,
    };
    // Earlier versions made one extent per stripe unit: 5120 extents, refused (map too
    // large for one frame).
    let secret = server.client("host1").await;
    admin
        .call(VolumeCreate {
            name: "wide".into(),
            size_bytes: 5 * 1024 * MIB,
            layout: striped,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    server.grant("host1", "wide", AccessMode::Ro).await;
    let mut agent = server.agent("host1", &secret).await;
    let attached = agent
        .attach("wide", AccessMode::Ro)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(attached.map.extents.len(), 1);
    assert_eq!(attached.map.extents[0].member_span(), 5 * 512 * MIB);
    // Growing by whole rows keeps it one extent (both members continue on their devices).
    let grown = admin
        .call(VolumeGrow {
            name: "wide".into(),
            new_size_bytes: 5 * 1024 * MIB + 64 * MIB,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(grown.extents.len(), 1, "{:?}", grown.extents);
    assert_eq!(grown.extents[0].length, 5 * 1024 * MIB + 64 * MIB);
}

#[tokio::test]
async fn a_device_labelled_but_not_recorded_is_adopted() {
    // The window `pool add` leaves open: the label is written, then the server dies before
    // committing the device. Simulate it by labelling a device with this pool's UUID.
    let server = TestServer::start();
    let members = server.pool_of(1, 16 * MIB).await;
    let pool_uuid = read_label(&members[0])
        .ok()
        .flatten()
        .map(|l| l.pool_uuid)
        .unwrap_or_default();
    let orphan = server.image("orphan.img", 16 * MIB);
    let label = sanblk_proto::label::Label {
        device_uuid: uuid::Uuid::new_v4(),
        pool_uuid,
        device_size: 16 * MIB,
        data_start: DATA_START_OFFSET,
    };
    // What the server's label write does, done here: the writer is private to sand.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&orphan)
        .and_then(|mut file| std::io::Write::write_all(&mut file, &label.encode()))
        .unwrap_or_else(|e| panic!("{}: {e}", orphan.display()));
    let mut admin = server.admin().await;
    admin
        .call(pool_add(&orphan, false))
        .await
        .unwrap_or_else(|e| panic!("orphan of this pool refused: {e}"));
    let devices = pool_list(&server).await;
    assert!(
        devices.iter().any(|d| d.uuid == label.device_uuid),
        "device UUID not kept"
    );
}
