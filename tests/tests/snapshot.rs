//! Snapshots end to end: a guest writes pattern A through the real module, the host takes a
//! snapshot with `sanctl`, the guest overwrites parts with fio (verified) and dd while the
//! host reads the snapshot over NBD with a stock client (`qemu-img`; the guest also reads it
//! with the kernel's NBD client, `nbd-client` and `/dev/nbd0`), backs it up in full and
//! incrementally with `sanctl backup`, and checks everything against the image files: the
//! snapshot reads A, the origin holds the guest's new data, the changed list is exactly what
//! the guest overwrote, an incremental backup applied to the full one equals a full backup of
//! the later snapshot, and `sanctl restore` writes that backup onto a new volume.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sanblk_proto::protocol::SnapshotInfo;
use sanblk_tests::dm_san::WAIT_LONG;
use sanblk_tests::unix_bridge::UnixBridge;
use sanblk_tests::{
    blocks, dm_san, provision, spawn, wait_for_file, Provisioned, RunningVm, HOST_ADDR_FROM_GUEST,
};

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 16 * MIB;
const CHUNK: u64 = 64 << 10;

fn snapshot(provisioned: &Provisioned, name: &str) -> SnapshotInfo {
    let server = &provisioned.server;
    let infos: Vec<SnapshotInfo> =
        serde_json::from_str(&server.sanctl(&["--json", "snapshot", "list", "vsnap"]))
            .expect("snapshot list json");
    infos
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no snapshot {name}"))
}

/// The snapshot as a stock NBD client reads it.
fn read_with_qemu_img(info: &SnapshotInfo, out: &Path) -> Vec<u8> {
    let url = format!("nbd+unix:///{}?socket={}", info.export, info.nbd_socket);
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &url])
        .arg(out)
        .status()
        .expect("qemu-img");
    assert!(status.success(), "qemu-img convert {url}: {status}");
    fs::read(out).expect("qemu-img output")
}

fn backup(provisioned: &Provisioned, snapshot: &str, image: &Path, since: Option<&str>) -> Vec<u8> {
    let image_arg = image.display().to_string();
    let mut args = vec!["backup", "vsnap", snapshot, "--to", &image_arg];
    if let Some(since) = since {
        args.extend(["--since", since]);
    }
    let printed = provisioned.server.sanctl(&args);
    assert!(printed.contains("copied"), "{printed}");
    fs::read(image).expect("backup image")
}

/// A guest running `body` with `vsnap` attached as `$dev` (see [`dm_san::script`]), and the
/// host's `ports` forwarded besides the server's.
fn guest(provisioned: &Provisioned, name: &str, body: &str, ports: &[u16]) -> RunningVm {
    let mut config = dm_san::vm(
        provisioned,
        name,
        "vsnap",
        "",
        body,
        Duration::from_secs(600),
    );
    for &port in ports {
        config = config.forward_port(port);
    }
    spawn(&config).expect("guest started")
}

#[test]
fn a_snapshot_taken_under_writes_reads_back_and_backs_up_in_full_and_incrementally() {
    let provisioned = provision("snapshot", &[], &["vsnap"], true);
    let dir = provisioned.dir.clone();
    let a = blocks::pattern("snap-a", 1, VOLUME);
    let b = blocks::pattern("snap-b", 2, MIB);
    let c = blocks::pattern("snap-c", 3, MIB);
    fs::write(dir.join("a.pattern"), &a).expect("pattern");
    fs::write(dir.join("b.pattern"), &b).expect("pattern");
    fs::write(dir.join("c.pattern"), &c).expect("pattern");
    let server = &provisioned.server;
    let nbd_bridge = UnixBridge::start(&server.admin_socket.with_file_name("nbd.sock"))
        .expect("bridge to the NBD socket");
    let (host, nbd_port) = (HOST_ADDR_FROM_GUEST, nbd_bridge.port());
    let body = format!(
        r#"{WAIT_LONG}
dd if=$D/a.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
touch written
wait_long $D/snapped
# Overwrite [0, 1M) with B and every block of [8M, 12M) with fio (verified).
dd if=$D/b.pattern of=$dev bs=1M count=1 oflag=direct conv=fsync status=none
$S --json status > status-a.json
fio --name=b --filename=$dev --direct=1 --ioengine=psync --rw=randwrite --bs=4k \
    --offset=8M --size=4M --verify=crc32c --verify_fatal=1 --randrepeat=0 \
    --output-format=json --output=fio-b.json
$S --json status > status-b.json
dd if=$dev of=after-b.img bs=1M iflag=direct status=none
touch overwritten
# The kernel's NBD client reads s1 from sand's export (its Unix socket bridged to a port).
wait_long $D/checked
if nbd-client {host} {nbd_port} /dev/nbd0 -N vsnap@s1 > nbd-client.log 2>&1; then
    blockdev --getsize64 /dev/nbd0 > nbd-size
    dd if=/dev/nbd0 of=s1-nbd.img bs=1M iflag=direct status=none
    nbd-client -d /dev/nbd0 >> nbd-client.log 2>&1
fi
touch nbd-read
wait_long $D/snapped2
dd if=$D/c.pattern of=$dev bs=1M seek=4 count=1 oflag=direct conv=fsync status=none
touch overwritten2
wait_long $D/done
$S detach vsnap"#
    );
    let vm = guest(&provisioned, "snapshot", &body, &[nbd_bridge.port()]);
    let out = vm.log_dir().to_path_buf();
    wait_for_file(&out.join("written"), Duration::from_secs(300));
    // Room for the 80 chunks the guest overwrites (the default, a quarter, is 4 MiB).
    server.sanctl(&["snapshot", "create", "vsnap", "s1", "--cow-size", "8M"]);
    fs::write(dir.join("snapped"), b"").expect("signal");
    wait_for_file(&out.join("overwritten"), Duration::from_secs(300));

    let s1 = snapshot(&provisioned, "s1");
    assert_eq!(s1.state, "active");
    assert!(
        read_with_qemu_img(&s1, &dir.join("s1.raw")) == a,
        "snapshot s1 does not read back pattern A"
    );
    // Of fio's 1024 writes, only the first to each of the 64 chunks went through the server
    // (which copied the chunk); the module sent the rest straight to the SAN devices.
    let redirected = |name: &str| {
        let status: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(out.join(name)).expect("status"))
                .expect("status json");
        status["volumes"][0]["redirected_ios"]
            .as_u64()
            .unwrap_or_else(|| panic!("no redirected_ios in {status}"))
    };
    assert_eq!(
        redirected("status-b.json") - redirected("status-a.json"),
        4 * MIB / CHUNK,
        "fio's writes through the server"
    );
    let after_b = fs::read(out.join("after-b.img")).expect("after-b.img");
    let map = server.volume("vsnap").map;
    assert!(
        blocks::read_volume(&map, &provisioned.by_uuid, 0, VOLUME) == after_b,
        "the origin image does not hold what the guest wrote"
    );
    // [0, 1M) and [8M, 12M): 16 + 64 chunks.
    assert_eq!(s1.changed_chunks, (MIB + 4 * MIB) / CHUNK, "{s1:?}");
    let full1 = backup(&provisioned, "s1", &dir.join("backup.img"), None);
    assert!(full1 == a, "the full backup of s1 differs from pattern A");
    fs::write(dir.join("checked"), b"").expect("signal");
    wait_for_file(&out.join("nbd-read"), Duration::from_secs(300));
    let nbd_size = fs::read_to_string(out.join("nbd-size")).unwrap_or_default();
    assert_eq!(
        nbd_size.trim(),
        VOLUME.to_string(),
        "/dev/nbd0 size; nbd-client: {}",
        fs::read_to_string(out.join("nbd-client.log")).unwrap_or_default()
    );
    assert!(
        fs::read(out.join("s1-nbd.img")).expect("s1-nbd.img") == a,
        "s1 read through the kernel's NBD client is not pattern A"
    );

    server.sanctl(&["snapshot", "create", "vsnap", "s2", "--cow-size", "8M"]);
    fs::write(dir.join("snapped2"), b"").expect("signal");
    wait_for_file(&out.join("overwritten2"), Duration::from_secs(300));
    let diff = server.sanctl(&["snapshot", "diff", "vsnap", "s1", "s2"]);
    assert_eq!(
        diff.lines().collect::<Vec<_>>(),
        vec![format!("0 {MIB}"), format!("{} {}", 8 * MIB, 4 * MIB)],
        "{diff}"
    );
    let full2 = backup(&provisioned, "s2", &dir.join("full2.img"), None);
    assert!(
        full2 == after_b,
        "the full backup of s2 is not what the guest had written"
    );
    let incremental = backup(&provisioned, "s2", &dir.join("backup.img"), Some("s1"));
    assert!(
        incremental == full2,
        "full backup of s1 + incremental s1..s2 differs from the full backup of s2"
    );
    // s1 still reads A although C landed after s2.
    assert!(read_with_qemu_img(&s1, &dir.join("s1-again.raw")) == a);
    // The backup restored onto a new volume: its blocks are the backup's, where its map says.
    let backup_arg = dir.join("backup.img").display().to_string();
    let printed = server.sanctl(&["restore", &backup_arg, "vrestored"]);
    assert!(printed.contains("restored"), "{printed}");
    let restored = server.volume("vrestored").map;
    assert!(
        blocks::read_volume(&restored, &provisioned.by_uuid, 0, VOLUME) == full2,
        "the restored volume differs from the backup"
    );
    let again = server.sanctl_output(&["restore", &backup_arg, "vrestored"]);
    assert!(!again.status.success(), "restored over an existing volume");
    fs::write(dir.join("done"), b"").expect("signal");
    let outcome = vm.wait().expect("guest ran");
    outcome.assert_clean_success();
    let fio: serde_json::Value =
        serde_json::from_str(&outcome.read_out_file("fio-b.json").expect("fio json"))
            .expect("fio json");
    assert_eq!(fio["jobs"][0]["error"], 0, "{fio}");
}

/// A COW store overflowing under fio invalidates only its own snapshot (fio sees no error),
/// and a guest killed (QEMU quit) in the middle of copy-on-write traffic leaves every
/// snapshot reading back its point in time.
#[test]
fn an_overflow_and_a_killed_guest_leave_the_other_snapshots_intact() {
    let provisioned = provision("snapshot-kill", &[], &["vsnap"], true);
    let dir = provisioned.dir.clone();
    let a = blocks::pattern("kill-a", 1, VOLUME);
    fs::write(dir.join("a.pattern"), &a).expect("pattern");
    let body = format!(
        r#"{WAIT_LONG}
dd if=$D/a.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
touch written
wait_long $D/snapped
fio --name=over --filename=$dev --direct=1 --ioengine=psync --rw=randwrite --bs=4k \
    --size=16M --io_size=2M --verify=crc32c --verify_fatal=1 --randrepeat=0 \
    --output-format=json --output=fio-over.json
dd if=$dev of=after-fio.img bs=1M iflag=direct status=none
touch overflowed
wait_long $D/late
i=0
while :; do
    dd if=/dev/urandom of=$dev bs=64k count=4 seek=$(( (i * 7) % 250 )) oflag=direct status=none
    i=$((i + 1))
    [ $i -eq 8 ] && touch writing
done"#
    );
    let vm = guest(&provisioned, "snapshot-kill", &body, &[]);
    let out = vm.log_dir().to_path_buf();
    let server = &provisioned.server;
    wait_for_file(&out.join("written"), Duration::from_secs(300));
    server.sanctl(&["snapshot", "create", "vsnap", "big", "--cow-size", "18M"]);
    server.sanctl(&["snapshot", "create", "vsnap", "small", "--cow-size", "1M"]);
    fs::write(dir.join("snapped"), b"").expect("signal");
    wait_for_file(&out.join("overflowed"), Duration::from_secs(400));
    let fio: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("fio-over.json")).expect("fio"))
            .expect("fio json");
    assert_eq!(fio["jobs"][0]["error"], 0, "fio saw an error: {fio}");
    let small = snapshot(&provisioned, "small");
    assert_eq!(small.state, "invalid", "{small:?}");
    assert!(
        small.reason.as_deref().unwrap_or("").contains("full"),
        "{small:?}"
    );
    let after_fio = fs::read(out.join("after-fio.img")).expect("after-fio.img");
    server.sanctl(&["snapshot", "create", "vsnap", "late", "--cow-size", "18M"]);
    fs::write(dir.join("late"), b"").expect("signal");
    wait_for_file(&out.join("writing"), Duration::from_secs(300));
    // QEMU quits in the middle of the guest's copy-on-write traffic.
    drop(vm);
    let big = snapshot(&provisioned, "big");
    assert_eq!(big.state, "active");
    assert!(
        read_with_qemu_img(&big, &dir.join("big.raw")) == a,
        "snapshot big lost its point in time"
    );
    let late = snapshot(&provisioned, "late");
    assert!(
        late.changed_chunks > 0,
        "no copy-on-write before the kill: {late:?}"
    );
    assert!(
        read_with_qemu_img(&late, &dir.join("late.raw")) == after_fio,
        "snapshot late lost its point in time"
    );
}
