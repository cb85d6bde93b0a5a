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

/// Snapshot `name`'s `reported_chunks` once it reaches `expected` (the agent relays the
/// module's events every half second), or after 30 s.
fn wait_for_reported(provisioned: &Provisioned, name: &str, expected: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reported = snapshot(provisioned, name).reported_chunks;
        if reported >= expected || std::time::Instant::now() > deadline {
            return reported;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
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
    // The spare (`/dev/vdb`) is where snapshot stores go: with it the module preserves
    // chunks itself.
    let attach_args = if provisioned.spare.is_some() {
        "--device /dev/vdb"
    } else {
        ""
    };
    let mut config = dm_san::vm(
        provisioned,
        name,
        "vsnap",
        attach_args,
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
$S --json status > status-c0.json
dd if=$D/c.pattern of=$dev bs=64k seek=64 count=16 oflag=direct conv=fsync status=none
$S --json status > status-c.json
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
    // s1 is the only snapshot, and its store is described in the map: the module preserved
    // the first write to each of fio's 64 chunks itself (chunk, slot, FUA record, then the
    // write), none went through the server, and it sent the rest straight to the devices.
    let counter = |name: &str, field: &str| status_counter(&out.join(name), field);
    let during_fio =
        |field: &str| counter("status-b.json", field) - counter("status-a.json", field);
    assert_eq!(
        during_fio("preserved_chunks"),
        4 * MIB / CHUNK,
        "chunks the module preserved during fio"
    );
    assert_eq!(
        during_fio("redirected_ios"),
        0,
        "fio's writes through the server"
    );
    // And the 16 chunks dd overwrote before.
    assert_eq!(counter("status-a.json", "preserved_chunks"), MIB / CHUNK);
    let after_b = fs::read(out.join("after-b.img")).expect("after-b.img");
    let map = server.volume("vsnap").map;
    assert!(
        blocks::read_volume(&map, &provisioned.by_uuid, 0, VOLUME) == after_b,
        "the origin image does not hold what the guest wrote"
    );
    // [0, 1M) and [8M, 12M): 16 + 64 chunks.
    assert_eq!(s1.changed_chunks, (MIB + 4 * MIB) / CHUNK, "{s1:?}");
    // The module reported each chunk it preserved in a netlink event, the agent relayed them
    // in batches, and sand found every one in the store's records.
    let reported = wait_for_reported(&provisioned, "s1", s1.changed_chunks);
    assert_eq!(reported, s1.changed_chunks, "chunks reported by the client");
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
    // With two snapshots the map describes both stores: the module preserved each of C's
    // 16 chunks (untouched since s1; one write each, so each store's record block is
    // written many times in turn) into both, itself, and sent nothing through the server.
    let during_c = |field: &str| counter("status-c.json", field) - counter("status-c0.json", field);
    assert_eq!(
        during_c("preserved_chunks"),
        2 * MIB / CHUNK,
        "chunk copies the module made for C (16 chunks, 2 stores)"
    );
    assert_eq!(
        during_c("redirected_ios"),
        0,
        "C's writes through the server"
    );
    let (s1_now, s2_now) = (snapshot(&provisioned, "s1"), snapshot(&provisioned, "s2"));
    assert_eq!(s2_now.changed_chunks, MIB / CHUNK, "{s2_now:?}");
    assert_eq!(
        s1_now.changed_chunks,
        (MIB + 4 * MIB + MIB) / CHUNK,
        "{s1_now:?}"
    );
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
    // s1 still reads A although C landed after s2, and so do both snapshots once a third
    // one's epoch makes `sand` read every store's records from disk again.
    assert!(read_with_qemu_img(&s1, &dir.join("s1-again.raw")) == a);
    server.sanctl(&["snapshot", "create", "vsnap", "s3", "--cow-size", "2M"]);
    assert!(
        read_with_qemu_img(&s1, &dir.join("s1-reloaded.raw")) == a,
        "s1 lost its point in time once its records were read again"
    );
    assert!(
        read_with_qemu_img(&snapshot(&provisioned, "s2"), &dir.join("s2-reloaded.raw")) == full2,
        "s2 lost its point in time once its records were read again"
    );
    let s1_reloaded = snapshot(&provisioned, "s1");
    assert_eq!(
        s1_reloaded.changed_chunks, s1_now.changed_chunks,
        "{s1_reloaded:?}"
    );
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

/// Guest lines: pattern A written whole, `written` touched, then wait for `snapped`.
const WRITE_A: &str = "dd if=$D/a.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
touch written
wait_long $D/snapped";

/// fio arguments: 2 MiB of verified 4 KiB random writes over the whole volume, 16 at once
/// (the module's copier takes the first writes queued meanwhile as one batch).
const RANDOM_2M: &str =
    "--filename=$dev --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=4k \
    --size=16M --io_size=2M --verify=crc32c --verify_fatal=1 --randrepeat=0 \
    --output-format=json";

/// Counter `field` of the first volume in a `sanctl --json status` output file.
fn status_counter(path: &Path, field: &str) -> u64 {
    let status: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(path).expect("status")).expect("status json");
    status["volumes"][0][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

/// fio's JSON output at `path` reports no error.
fn assert_fio_clean(path: &Path) {
    let fio: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(path).expect("fio")).expect("fio json");
    assert_eq!(fio["jobs"][0]["error"], 0, "fio saw an error: {fio}");
}

/// A volume `vsnap` on a pool with a spare, and pattern A for it in `a.pattern`.
fn provision_with_pattern(name: &str) -> (Provisioned, std::path::PathBuf, Vec<u8>) {
    let provisioned = provision(name, &[], &["vsnap"], true);
    let dir = provisioned.dir.clone();
    let a = blocks::pattern(&format!("{name}-a"), 1, VOLUME);
    fs::write(dir.join("a.pattern"), &a).expect("pattern");
    (provisioned, dir, a)
}

/// A COW store overflowing under fio invalidates only its own snapshot (fio sees no error),
/// and a guest killed (QEMU quit) in the middle of copy-on-write traffic leaves every
/// snapshot reading back its point in time.
#[test]
fn an_overflow_and_a_killed_guest_leave_the_other_snapshots_intact() {
    let (provisioned, dir, a) = provision_with_pattern("snapshot-kill");
    let body = format!(
        r#"{WAIT_LONG}
{WRITE_A}
fio --name=over {RANDOM_2M} --output=fio-over.json
dd if=$dev of=after-fio.img bs=1M iflag=direct status=none
touch overflowed
wait_long $D/late
i=0
while :; do
    dd if=/dev/urandom of=$dev bs=64k count=4 seek=$(( (i * 7) % 250 )) oflag=direct status=none
    i=$((i + 1))
    if [ $i -eq 8 ]; then $S --json status > status-late.json; touch writing; fi
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
    assert_fio_clean(&out.join("fio-over.json"));
    let small = snapshot(&provisioned, "small");
    assert_eq!(small.state, "invalid", "{small:?}");
    assert!(
        small.reason.as_deref().unwrap_or("").contains("full"),
        "{small:?}"
    );
    let after_fio = fs::read(out.join("after-fio.img")).expect("after-fio.img");
    let big = snapshot(&provisioned, "big");
    assert_eq!(big.state, "active");
    assert!(
        read_with_qemu_img(&big, &dir.join("big.raw")) == a,
        "snapshot big lost its point in time"
    );
    // With big deleted, late is the only snapshot: the module preserves chunks for it
    // itself, and QEMU quits in the middle of that copy-on-write traffic.
    server.sanctl(&["snapshot", "create", "vsnap", "late", "--cow-size", "18M"]);
    server.sanctl(&["snapshot", "delete", "vsnap", "big"]);
    fs::write(dir.join("late"), b"").expect("signal");
    wait_for_file(&out.join("writing"), Duration::from_secs(300));
    drop(vm);
    assert!(
        status_counter(&out.join("status-late.json"), "preserved_chunks") > 0,
        "the module preserved no chunk for late"
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

#[test]
fn a_store_the_module_fills_invalidates_its_snapshot_and_the_next_one_is_copied_again() {
    let (provisioned, dir, _) = provision_with_pattern("snapshot-fill");
    let body = format!(
        r#"{WAIT_LONG}
{WRITE_A}
$S --json status > status-before.json
fio --name=fill {RANDOM_2M} --output=fio-fill.json
$S --json status > status-full.json
dd if=$dev of=after-fill.img bs=1M iflag=direct status=none
touch filled
wait_long $D/snapped2
dd if=/dev/urandom of=$dev bs=64k count=8 seek=3 oflag=direct conv=fsync status=none
$S --json status > status-next.json
touch done"#
    );
    let vm = guest(&provisioned, "snapshot-fill", &body, &[]);
    let out = vm.log_dir().to_path_buf();
    let server = &provisioned.server;
    wait_for_file(&out.join("written"), Duration::from_secs(300));
    // The only snapshot, with room for a few chunks only: the module copies until the store
    // is full, then the server takes the first writes and gives the snapshot up.
    server.sanctl(&["snapshot", "create", "vsnap", "tiny", "--cow-size", "1M"]);
    fs::write(dir.join("snapped"), b"").expect("signal");
    wait_for_file(&out.join("filled"), Duration::from_secs(400));
    assert_fio_clean(&out.join("fio-fill.json"));
    let counter = |name: &str, field: &str| status_counter(&out.join(name), field);
    let preserved = counter("status-full.json", "preserved_chunks")
        - counter("status-before.json", "preserved_chunks");
    assert!(preserved > 0, "the module preserved nothing");
    assert!(
        counter("status-full.json", "redirected_ios")
            > counter("status-before.json", "redirected_ios"),
        "no first write went to the server once the store was full"
    );
    let tiny = snapshot(&provisioned, "tiny");
    assert_eq!(tiny.state, "invalid", "{tiny:?}");
    assert!(
        tiny.reason.as_deref().unwrap_or("").contains("full"),
        "{tiny:?}"
    );
    let after_fill = fs::read(out.join("after-fill.img")).expect("after-fill.img");
    assert!(
        blocks::read_volume(&server.volume("vsnap").map, &provisioned.by_uuid, 0, VOLUME)
            == after_fill,
        "the origin image does not hold what the guest wrote"
    );
    // A new snapshot is a new set: the module copies for it again.
    server.sanctl(&["snapshot", "create", "vsnap", "next", "--cow-size", "4M"]);
    fs::write(dir.join("snapped2"), b"").expect("signal");
    wait_for_file(&out.join("done"), Duration::from_secs(300));
    drop(vm);
    assert_eq!(
        counter("status-next.json", "preserved_chunks")
            - counter("status-full.json", "preserved_chunks"),
        8,
        "chunks the module preserved for the next snapshot"
    );
    let next = snapshot(&provisioned, "next");
    assert_eq!(next.state, "active", "{next:?}");
    assert_eq!(next.changed_chunks, 8, "{next:?}");
    assert!(
        read_with_qemu_img(&next, &dir.join("next.raw")) == after_fill,
        "snapshot next lost its point in time"
    );
}

/// The chunks of `chunk` bytes in which `after` differs from `before`.
fn chunks_differing(before: &[u8], after: &[u8], chunk: u64) -> u64 {
    before
        .chunks(chunk as usize)
        .zip(after.chunks(chunk as usize))
        .filter(|(b, a)| b != a)
        .count() as u64
}

/// Snapshots of three chunk sizes at once: the map describes every store, each with its own
/// chunk size, and the module preserves each first write into all three itself (each store
/// in its own chunks), sending nothing through the server; every snapshot reads back its
/// point in time and counts exactly the chunks of its size that were written.
#[test]
fn snapshots_of_three_chunk_sizes_are_all_preserved_by_the_module() {
    let (provisioned, dir, a) = provision_with_pattern("snapshot-sizes");
    let body = format!(
        r#"{WAIT_LONG}
{WRITE_A}
$S --json status > status-before.json
for block in 0 16 260 1283 2047 3000; do
    dd if=/dev/urandom of=$dev bs=4k count=1 seek=$block oflag=direct conv=fsync status=none
done
fio --name=sizes --filename=$dev --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite \
    --bs=4k --offset=8M --size=4M --io_size=1M --verify=crc32c --verify_fatal=1 \
    --randrepeat=0 --output-format=json --output=fio-sizes.json
$S --json status > status-after.json
dd if=$dev of=after.img bs=1M iflag=direct status=none
touch done
wait_long $D/last-taken
$S detach vsnap"#
    );
    let vm = guest(&provisioned, "snapshot-sizes", &body, &[]);
    let out = vm.log_dir().to_path_buf();
    let server = &provisioned.server;
    wait_for_file(&out.join("written"), Duration::from_secs(300));
    let sizes = [
        ("s64k", 64u64 << 10),
        ("s256k", 256 << 10),
        ("s16k", 16 << 10),
    ];
    for (name, chunk) in sizes {
        let chunk_arg = chunk.to_string();
        server.sanctl(&[
            "snapshot",
            "create",
            "vsnap",
            name,
            "--cow-size",
            "8M",
            "--chunk-size",
            &chunk_arg,
        ]);
    }
    fs::write(dir.join("snapped"), b"").expect("signal");
    wait_for_file(&out.join("done"), Duration::from_secs(400));
    // One more, of yet another chunk size, once the guest has written.
    server.sanctl(&[
        "snapshot",
        "create",
        "vsnap",
        "s128k",
        "--cow-size",
        "4M",
        "--chunk-size",
        "128K",
    ]);
    fs::write(dir.join("last-taken"), b"").expect("signal");
    vm.wait().expect("guest ran").assert_clean_success();
    assert_fio_clean(&out.join("fio-sizes.json"));
    let after = fs::read(out.join("after.img")).expect("after.img");
    assert!(
        blocks::read_volume(&server.volume("vsnap").map, &provisioned.by_uuid, 0, VOLUME) == after,
        "the origin image does not hold what the guest wrote"
    );
    let counter = |name: &str, field: &str| status_counter(&out.join(name), field);
    let during =
        |field: &str| counter("status-after.json", field) - counter("status-before.json", field);
    assert_eq!(during("redirected_ios"), 0, "writes through the server");
    let mut copies = 0;
    for (name, chunk) in sizes {
        let info = snapshot(&provisioned, name);
        assert_eq!(info.state, "active", "{info:?}");
        let written = chunks_differing(&a, &after, chunk);
        assert_eq!(info.changed_chunks, written, "{info:?}");
        assert_eq!(
            wait_for_reported(&provisioned, name, written),
            written,
            "{name}: chunks the module reported preserved"
        );
        assert!(
            read_with_qemu_img(&info, &dir.join(format!("{name}.raw"))) == a,
            "snapshot {name} lost its point in time"
        );
        copies += written;
    }
    assert_eq!(
        during("preserved_chunks"),
        copies,
        "chunk copies the module made (each snapshot's written chunks)"
    );
    // Across chunk sizes: the diff is the older snapshot's written chunks, in its chunks,
    // and an incremental backup onto a full one of it equals the newer snapshot.
    let diff: serde_json::Value = serde_json::from_str(
        &server.sanctl(&["--json", "snapshot", "diff", "vsnap", "s16k", "s128k"]),
    )
    .expect("diff json");
    assert_eq!(diff["chunk_bytes"], 16 << 10, "{diff}");
    assert_eq!(
        diff["chunks"].as_array().map(Vec::len),
        Some(chunks_differing(&a, &after, 16 << 10) as usize),
        "{diff}"
    );
    let image = dir.join("sizes-backup.img");
    assert!(backup(&provisioned, "s16k", &image, None) == a);
    assert!(
        backup(&provisioned, "s128k", &image, Some("s16k")) == after,
        "s16k's backup + the changes since, in 16K chunks, is not s128k"
    );
}
