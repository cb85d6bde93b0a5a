//! End-to-end live relocation: a real `sand` with three SAN disks and a guest running fio with
//! verification on the volume while the host, with `sanctl`, moves the volume to another disk,
//! adds a mirror and evacuates a disk. During each copy the kernel's map marks the moving
//! extents syncing, so the guest's writes to them go through the server, which writes old and
//! new place in step with its copy. fio verifies every pass in the guest; the host then finds
//! every block of the final volume where the final map says, on each replica, and the space
//! the data left free again.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sanblk_tests::blocks::BLOCK;
use sanblk_tests::dm_san::WAIT_LONG;
use sanblk_tests::{blocks, dm_san, provision, sparse_image, spawn, wait_for_file, Provisioned};

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 16 * MIB;

/// Adds `san2.img` (64 MiB) to the pool and to the guest's disks.
fn third_disk(provisioned: &mut Provisioned) -> PathBuf {
    let path = provisioned.dir.join("san2.img");
    sparse_image(&path, 64 * MIB).expect("image");
    provisioned.server.pool_add(&path);
    provisioned.images.push(path.clone());
    provisioned.by_uuid = sanblk_tests::server::paths_by_uuid(&provisioned.server.pool());
    path
}

fn uuid_of(provisioned: &Provisioned, image: &Path) -> uuid::Uuid {
    *provisioned
        .by_uuid
        .iter()
        .find(|(_, path)| path.as_path() == image)
        .map(|(uuid, _)| uuid)
        .expect("image in the pool")
}

fn on_device(map: &sanblk_proto::map::VolumeMap, device: uuid::Uuid) -> bool {
    map.extents
        .iter()
        .any(|e| e.replicas.iter().any(|r| r.device_uuid == device))
}

#[test]
fn fio_verifies_through_a_move_a_mirror_add_and_an_evacuation() {
    // A slow copy, so fio runs through every phase of it.
    let mut provisioned = provision(
        "relocation-e2e",
        &["--recovery-max-rate", "1M"],
        &["vmove"],
        true,
    );
    let san2 = third_disk(&mut provisioned);
    let san0 = provisioned.images[0].clone();
    let san1 = provisioned.images[1].clone();
    let (san0_uuid, san1_uuid) = (uuid_of(&provisioned, &san0), uuid_of(&provisioned, &san1));

    // Each phase: fio writes random 4 KiB blocks for 60 s, verifying them as it goes (every
    // 128 writes), while the host runs the relocation (a few seconds at the capped rate);
    // then, the relocation over, one more pass writes and verifies on the final map.
    let body = r#"phase() {
    fio --name=$1 --filename=$dev --direct=1 --ioengine=psync --rw=randwrite --bs=4k \
        --size=16M --time_based --runtime=60 --verify=crc32c --verify_backlog=128 \
        --verify_fatal=1 --randrepeat=0 --output-format=json --output=fio-$1.json &
    FIO=$!
    # fio takes seconds to start in a loaded TCG guest: the relocation begins only once it
    # is writing (the disk's completed-writes counter moves).
    stat=/sys/block/$(basename $dev)/stat
    start=$(awk '{print $5}' $stat)
    for i in $(seq 1 600); do [ $(awk '{print $5}' $stat) -gt $((start + 200)) ] && break; sleep 0.1; done
    touch $1.ready
    wait $FIO
    wait_for $1.done
    $S --json status > $1-status.json
    fio --name=$1-last --filename=$dev --direct=1 --ioengine=psync --rw=randwrite --bs=4k \
        --size=16M --io_size=2M --verify=crc32c --verify_fatal=1 --randrepeat=0 \
        --output-format=json --output=fio-$1-last.json
}
phase move
phase mirror
phase evacuate
dd if=$dev of=final.img bs=1M iflag=direct status=none
$S detach vmove"#;
    let config = dm_san::vm(
        &provisioned,
        "relocation-e2e",
        "vmove",
        "--device /dev/vdb --device /dev/vdc",
        body,
        Duration::from_secs(900),
    );
    let vm = spawn(&config).expect("guest started");
    let log_dir = vm.log_dir().to_path_buf();
    let server = &provisioned.server;
    let path = |p: &Path| p.display().to_string();
    let phases: [(&str, Vec<String>); 3] = [
        (
            "move",
            vec![
                "volume".into(),
                "move".into(),
                "vmove".into(),
                "--from".into(),
                path(&san0),
                "--to".into(),
                path(&san1),
            ],
        ),
        (
            "mirror",
            vec![
                "volume".into(),
                "mirror".into(),
                "add".into(),
                "vmove".into(),
            ],
        ),
        (
            "evacuate",
            vec!["pool".into(), "evacuate".into(), path(&san1)],
        ),
    ];
    let mut outputs = Vec::new();
    for (phase, args) in &phases {
        wait_for_file(
            &log_dir.join(format!("{phase}.ready")),
            Duration::from_secs(300),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // Blocks until the relocation is done (its progress bar is drawn on terminals only).
        let output = server.sanctl(&args);
        outputs.push(output);
        fs::write(log_dir.join(format!("{phase}.done")), b"").expect("signal");
    }
    let outcome = vm.wait().expect("guest ran");
    outcome.assert_clean_success();
    for output in &outputs {
        assert!(
            output.contains(" done "),
            "relocation did not end done: {output}"
        );
    }

    // The kernel wrote the syncing extents through the server during each copy (the direct
    // path never failed: without the syncing map nothing would have been redirected), and
    // no I/O failed.
    let mut redirected_before = 0;
    for phase in ["move", "mirror", "evacuate"] {
        let status = outcome.out_json(&format!("{phase}-status.json"));
        let volume = status["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "vmove"))
            .unwrap_or_else(|| panic!("no vmove in {status}"))
            .clone();
        let redirected = volume["redirected_ios"].as_u64().unwrap_or(0);
        assert!(
            redirected > redirected_before,
            "{phase}: no write went through the server during the copy: {volume}"
        );
        assert_eq!(volume["errors"].as_u64(), Some(0), "{phase}: {volume}");
        redirected_before = redirected;
    }
    let detail = server.volume("vmove");
    let map = &detail.map;
    assert!(map.syncing.is_empty(), "{map:?}");
    assert_eq!(map.layout.to_string(), "mirror");
    assert!(
        !on_device(map, san1_uuid),
        "evacuated disk still used: {map:?}"
    );
    assert!(map.extents.iter().all(|e| e.replicas.len() == 2));
    let san2_uuid = uuid_of(&provisioned, &san2);
    assert!(
        on_device(map, san0_uuid) && on_device(map, san2_uuid),
        "{map:?}"
    );
    // What the guest read back at the end is on both replicas of every block.
    let final_image = fs::read(log_dir.join("final.img")).expect("final.img");
    assert_eq!(final_image.len() as u64, VOLUME);
    let checked = blocks::verify_against_map(map, &provisioned.by_uuid, &final_image);
    assert_eq!(checked as u64, 2 * VOLUME / BLOCK);
    // The evacuated disk is empty again.
    let san1_info = server
        .pool()
        .into_iter()
        .find(|d| d.uuid == san1_uuid)
        .expect("san1 listed");
    assert_eq!(san1_info.free_bytes, san1_info.capacity_bytes);
}

/// Two hosts share a volume: B (read-only) loses its path to the volume's disk and reports
/// it (the server still reads the disk, so that alone moves nothing: B's I/O goes through
/// the server); the administrator then declares the disk failed and the server recovers the
/// volume onto the spare while A keeps writing directly. Every
/// write A makes during the copy must be on the spare in the end: the recovery's syncing map
/// sends A's writes through the server, which writes both places in step with the copy. (A
/// recovery that let A write san0 directly behind the copy cursor lost those writes.)
///
/// A rewrites the volume MiB by MiB, pass after pass, until the recovery is over; passes
/// alternate two patterns, so a lost write leaves the previous pass's data and shows. However
/// fast A or the copy runs, the test needs one write that started behind the copy cursor.
#[test]
fn a_writer_loses_nothing_when_a_reader_reports_a_failure_and_the_volume_is_recovered() {
    let provisioned = provision(
        "two-hosts",
        &["--recovery-max-rate", "384K"],
        &["vshare"],
        true,
    );
    let server = &provisioned.server;
    let secret_b = provisioned.dir.join("host2.secret");
    server.sanctl(&[
        "client",
        "add",
        "host2",
        "--secret-out",
        &secret_b.display().to_string(),
    ]);
    server.sanctl(&["client", "grant", "host2", "vshare", "ro"]);
    let before = blocks::pattern("two-hosts-before", 1, VOLUME);
    let during = [
        blocks::pattern("two-hosts-even-pass", 2, VOLUME),
        blocks::pattern("two-hosts-odd-pass", 3, VOLUME),
    ];
    fs::write(provisioned.dir.join("before.pattern"), &before).expect("pattern");
    for (parity, pattern) in during.iter().enumerate() {
        fs::write(
            provisioned.dir.join(format!("during{parity}.pattern")),
            pattern,
        )
        .expect("pattern");
    }
    let spare = provisioned.spare.expect("spare");

    // A: fills the volume, then, from the start of the copy until the volume is recovered,
    // rewrites it MiB by MiB, logging each write's start and end (on the host, through 9p).
    let a_body = format!(
        r#"{WAIT_LONG}
dd if=$D/before.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
touch filled
wait_long $D/copying
pass=0
while [ ! -e $D/recovered ]; do
    for i in $(seq 0 15); do
        [ -e $D/recovered ] && break
        echo "start $pass $i" >> writes.log
        dd if=$D/during$((pass % 2)).pattern of=$dev bs=1M skip=$i seek=$i count=1 \
            oflag=direct conv=fsync status=none
        echo "done $pass $i" >> writes.log
    done
    pass=$((pass + 1))
done
$S --json status > final-status.json
$S detach vshare"#
    );
    let a = spawn(&dm_san::vm(
        &provisioned,
        "two-hosts-a",
        "vshare",
        "--device /dev/vdb",
        &a_body,
        Duration::from_secs(600),
    ))
    .expect("guest A started");
    // B: read-only; its path to san0 fails (dm-error in B only) under a read.
    let io_port = server.io_port().expect("io port");
    let b_script = format!(
        r#"set -ex
{prologue}D={dir}
{WAIT_LONG}
$S attach vshare --ro --server 10.0.2.100:{port} --client host2 --secret-file $D/host2.secret \
    --device /dev/mapper/san0 --device /dev/vdb --io-server 10.0.2.100:{io_port} > agent.log 2>&1 &
wait_long /run/sanblk/vshare.device
dev=$(cat /run/sanblk/vshare.device)
wait_long $D/a-filled
fail_san0
dd if=$dev of=/dev/null bs=1M count=16 iflag=direct status=none
for i in $(seq 1 600); do grep -q "reported failure" agent.log && break; sleep 0.2; done
grep "reported failure" agent.log
wait_long $D/recovered
$S detach vshare
rmmod sanblk
dmsetup remove san0
"#,
        prologue = dm_san::prologue(&sanblk_tests::module_path()),
        dir = provisioned.dir.display(),
        port = server.port,
    );
    let mut b_config = sanblk_tests::VmConfig::new("two-hosts-b", &b_script)
        .forward_port(server.port)
        .forward_port(io_port);
    for image in &provisioned.images {
        b_config = b_config.disk(image);
    }
    let b = spawn(&b_config).expect("guest B started");

    wait_for_file(&a.log_dir().join("filled"), Duration::from_secs(400));
    fs::write(provisioned.dir.join("a-filled"), b"").expect("signal");
    // B's report, then the administrator, start the recovery; A rewrites the volume while it
    // copies.
    server.declare_failed_once_reported(&provisioned.images[0], Duration::from_secs(400));
    let deadline = Instant::now() + Duration::from_secs(400);
    loop {
        let statuses: Vec<sanblk_proto::protocol::RecoveryStatus> =
            serde_json::from_str(&server.sanctl(&["--json", "recovery", "list"])).expect("json");
        if statuses
            .iter()
            .any(|s| s.state == sanblk_proto::protocol::RecoveryState::Copying)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery started: {statuses:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    fs::write(provisioned.dir.join("copying"), b"").expect("signal");
    // Until the volume is recovered: the copy cursor, then A's log. A write whose start was
    // not logged yet when the cursor had passed its MiB, and was logged while the copy still
    // ran, started behind the cursor during the copy.
    let writes_log = a.log_dir().join("writes.log");
    let mut cursor_before_last_read = 0;
    let mut starts_seen = 0;
    let mut seen_in_last_read: Vec<(u64, u64)> = Vec::new();
    let mut writes_behind_cursor = 0;
    let deadline = Instant::now() + Duration::from_secs(400);
    loop {
        let statuses: Vec<sanblk_proto::protocol::RecoveryStatus> =
            serde_json::from_str(&server.sanctl(&["--json", "recovery", "list"])).expect("json");
        let cursor = statuses
            .iter()
            .filter(|s| s.volume_name == "vshare")
            .map(|s| s.bytes_done)
            .max()
            .unwrap_or(cursor_before_last_read)
            .max(cursor_before_last_read);
        for (mib, cursor_before) in seen_in_last_read.drain(..) {
            if cursor_before >= (mib + 1) * MIB && cursor < VOLUME {
                writes_behind_cursor += 1;
            }
        }
        let starts = a_writes(&writes_log, "start");
        for &(_, mib) in starts.iter().skip(starts_seen) {
            seen_in_last_read.push((mib, cursor_before_last_read));
        }
        starts_seen = starts.len();
        cursor_before_last_read = cursor;
        let map = server.volume("vshare").map;
        if map.syncing.is_empty() && !on_device(&map, uuid_of(&provisioned, &provisioned.images[0]))
        {
            break;
        }
        assert!(Instant::now() < deadline, "not recovered: {map:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    fs::write(provisioned.dir.join("recovered"), b"").expect("signal");
    a.wait().expect("guest A ran").assert_clean_success();
    b.wait().expect("guest B ran").assert_clean_success();

    // Every block A wrote during the copy is on the spare, where the final map says.
    let map = server.volume("vshare").map;
    assert!(map
        .extents
        .iter()
        .all(|e| e.replicas.iter().all(|r| r.device_uuid == spare)));
    let starts = a_writes(&writes_log, "start");
    let done = a_writes(&writes_log, "done");
    assert_eq!(starts, done, "A's writes did not all finish");
    eprintln!(
        "A wrote {} MiB during the recovery, {writes_behind_cursor} behind the copy cursor",
        done.len()
    );
    assert!(
        writes_behind_cursor > 0,
        "none of A's {} writes started behind the copy cursor, the test proves nothing",
        done.len()
    );
    // Each MiB holds the pattern of the last pass that wrote it.
    let mut expected = before;
    for (pass, mib) in done {
        let range = (mib * MIB) as usize..((mib + 1) * MIB) as usize;
        expected[range.clone()].copy_from_slice(&during[(pass % 2) as usize][range]);
    }
    let checked = blocks::verify_against_map(&map, &provisioned.by_uuid, &expected);
    assert_eq!(checked as u64, VOLUME / BLOCK);
}

/// The `(pass, MiB)` of each `kind` line ("start" or "done") guest A has logged so far.
fn a_writes(log: &Path, kind: &str) -> Vec<(u64, u64)> {
    let text = fs::read_to_string(log).unwrap_or_default();
    // A line still being written is left for the next read.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next() != Some(kind) {
                return None;
            }
            let pass = words.next()?.parse().ok()?;
            let mib = words.next()?.parse().ok()?;
            Some((pass, mib))
        })
        .collect()
}

/// Waits until `volume`'s map has no syncing extent and nothing on `device`.
fn wait_moved_off(server: &sanblk_tests::SandServer, volume: &str, device: uuid::Uuid) {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let map = server.volume(volume).map;
        if map.syncing.is_empty() && !on_device(&map, device) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "move off {device} not finished: {map:?}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `sand` dies (SIGKILL, or exits at a crash point as kill -9 would) in three places of a live
/// move while a guest writes and verifies with fio: with every client quiesced before the
/// relocation is committed, in the middle of the copy, and right after the relocation's
/// commit. Each time the restarted server finishes the move (re-running an uncommitted start,
/// resuming the copy from its saved cursor), the guest's held I/O resumes within its lease, no
/// I/O fails, fio verifies every block, and the host finds the guest's final data where the
/// final map says.
#[test]
fn a_move_finishes_after_sand_dies_during_quiesce_copy_and_commit() {
    let mut provisioned = provision(
        "relocation-crash",
        &["--recovery-max-rate", "1M"],
        &["vcrash"],
        true,
    );
    let san0 = provisioned.images[0].clone();
    let san1 = provisioned.images[1].clone();
    let (san0_uuid, san1_uuid) = (uuid_of(&provisioned, &san0), uuid_of(&provisioned, &san1));
    let body = format!(
        r#"{WAIT_LONG}
phase() {{
    fio --name=$1 --filename=$dev --direct=1 --ioengine=psync --rw=randwrite --bs=4k \
        --size=16M --time_based --runtime=45 --verify=crc32c --verify_backlog=128 \
        --verify_fatal=1 --randrepeat=0 --output-format=json --output=fio-$1.json &
    FIO=$!
    stat=/sys/block/$(basename $dev)/stat
    start=$(awk '{{print $5}}' $stat)
    for i in $(seq 1 600); do [ $(awk '{{print $5}}' $stat) -gt $((start + 200)) ] && break; sleep 0.1; done
    touch $1.ready
    wait $FIO
    wait_long $1.done
    fio --name=$1-last --filename=$dev --direct=1 --ioengine=psync --rw=randwrite --bs=4k \
        --size=16M --io_size=2M --verify=crc32c --verify_fatal=1 --randrepeat=0 \
        --output-format=json --output=fio-$1-last.json
}}
phase quiesce
phase copy
phase commit
$S --json status > final-status.json
dd if=$dev of=final.img bs=1M iflag=direct status=none
$S detach vcrash"#
    );
    let config = dm_san::vm(
        &provisioned,
        "relocation-crash",
        "vcrash",
        "--device /dev/vdb",
        &body,
        Duration::from_secs(900),
    );
    let vm = spawn(&config).expect("guest started");
    let log_dir = vm.log_dir().to_path_buf();
    let server = &mut provisioned.server;
    let path = |p: &Path| p.display().to_string();
    let move_args = |from: &Path, to: &Path| {
        vec![
            "volume".to_string(),
            "move".into(),
            "vcrash".into(),
            "--from".into(),
            path(from),
            "--to".into(),
            path(to),
            "--no-wait".into(),
        ]
    };

    // 1. Crash once every client is quiesced, before the relocation is committed: the
    //    restarted server rolls the change back (the clients resume) and runs it again.
    wait_for_file(&log_dir.join("quiesce.ready"), Duration::from_secs(400));
    server
        .restart_with_env(&[("SAND_CRASH_AT", "change:after-quiesce")])
        .expect("sand restarted");
    let args = move_args(&san0, &san1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _ = server.sanctl_output(&args);
    assert!(
        server.wait_exit(Duration::from_secs(60)).is_some(),
        "sand did not reach change:after-quiesce: {}",
        server.log()
    );
    server.restart().expect("sand restarted");
    wait_moved_off(server, "vcrash", san0_uuid);
    fs::write(log_dir.join("quiesce.done"), b"").expect("signal");

    // 2. SIGKILL in the middle of the copy (16 MiB at 1 MiB/s): the copy resumes.
    wait_for_file(&log_dir.join("copy.ready"), Duration::from_secs(300));
    let args = move_args(&san1, &san0);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    server.sanctl(&args);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let statuses: Vec<sanblk_proto::protocol::RecoveryStatus> =
            serde_json::from_str(&server.sanctl(&["--json", "recovery", "list"])).expect("json");
        if statuses.iter().any(|s| {
            s.state == sanblk_proto::protocol::RecoveryState::Copying && s.bytes_done >= 2 * MIB
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "no copy under way: {statuses:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    server.restart().expect("sand restarted");
    wait_moved_off(server, "vcrash", san1_uuid);
    fs::write(log_dir.join("copy.done"), b"").expect("signal");

    // 3. Crash right after the relocation's commit: the restarted server publishes it and
    //    copies.
    wait_for_file(&log_dir.join("commit.ready"), Duration::from_secs(300));
    server
        .restart_with_env(&[("SAND_CRASH_AT", "change:after-commit")])
        .expect("sand restarted");
    let args = move_args(&san0, &san1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _ = server.sanctl_output(&args);
    assert!(
        server.wait_exit(Duration::from_secs(60)).is_some(),
        "sand did not reach change:after-commit: {}",
        server.log()
    );
    server.restart().expect("sand restarted");
    wait_moved_off(server, "vcrash", san0_uuid);
    fs::write(log_dir.join("commit.done"), b"").expect("signal");

    let outcome = vm.wait().expect("guest ran");
    outcome.assert_clean_success();
    let status = outcome.out_json("final-status.json");
    let volume = &status["volumes"][0];
    assert_eq!(volume["errors"].as_u64(), Some(0), "{volume}");
    assert_eq!(volume["timed_out_ios"].as_u64(), Some(0), "{volume}");
    let log = server.log();
    for point in ["change:after-quiesce", "change:after-commit"] {
        assert!(
            log.contains(&format!("crash point {point} reached")),
            "{point} never reached"
        );
    }
    let map = server.volume("vcrash").map;
    assert!(map.syncing.is_empty(), "{map:?}");
    assert!(
        map.extents
            .iter()
            .all(|e| e.replicas.iter().all(|r| r.device_uuid == san1_uuid)),
        "{map:?}"
    );
    let final_image = fs::read(log_dir.join("final.img")).expect("final.img");
    assert_eq!(final_image.len() as u64, VOLUME);
    let checked = blocks::verify_against_map(&map, &provisioned.by_uuid, &final_image);
    assert_eq!(checked as u64, VOLUME / BLOCK);
}

/// One leg of a 2-way mirror dies under fio (dm-error under san0 in the guest): writes that
/// fail on it are redirected, reads go to the surviving leg, fio sees no error and verifies
/// every block; after the agent's report the administrator declares the leg's disk failed
/// (the server still reads it, so the report alone moves nothing) and the server resyncs the
/// lost leg onto the spare disk,
/// and the host finds the guest's final data on both legs of the final mirror.
#[test]
fn a_mirror_leg_dies_under_fio_without_an_error_and_is_resynced() {
    let mut provisioned = provision("mirror-leg", &["--recovery-max-rate", "4M"], &[], true);
    let server = &provisioned.server;
    server.sanctl(&["volume", "create", "vmir", "16M", "--layout", "mirror"]);
    server.sanctl(&["client", "grant", "host1", "vmir", "rw"]);
    let san2 = third_disk(&mut provisioned);
    let san0_uuid = uuid_of(&provisioned, &provisioned.images[0].clone());
    let san2_uuid = uuid_of(&provisioned, &san2);
    let body = format!(
        r#"{WAIT_LONG}
fio --name=leg --filename=$dev --direct=1 --ioengine=psync --rw=randrw --bs=4k \
    --size=16M --time_based --runtime=60 --verify=crc32c --verify_backlog=128 \
    --verify_fatal=1 --randrepeat=0 --output-format=json --output=fio-leg.json &
FIO=$!
stat=/sys/block/$(basename $dev)/stat
start=$(awk '{{print $5}}' $stat)
for i in $(seq 1 600); do [ $(awk '{{print $5}}' $stat) -gt $((start + 200)) ] && break; sleep 0.1; done
fail_san0
touch failed
wait $FIO
$S --json status > after-fio.json
wait_long $D/resynced
fio --name=last --filename=$dev --direct=1 --ioengine=psync --rw=randwrite --bs=4k \
    --size=16M --io_size=2M --verify=crc32c --verify_fatal=1 --randrepeat=0 \
    --output-format=json --output=fio-last.json
$S --json status > final-status.json
dd if=$dev of=final.img bs=1M iflag=direct status=none
$S detach vmir"#
    );
    let config = dm_san::vm(
        &provisioned,
        "mirror-leg",
        "vmir",
        "--device /dev/vdb --device /dev/vdc",
        &body,
        Duration::from_secs(900),
    );
    let vm = spawn(&config).expect("guest started");
    let log_dir = vm.log_dir().to_path_buf();
    let server = &provisioned.server;
    wait_for_file(&log_dir.join("failed"), Duration::from_secs(400));
    // Dead for this host only: the server still reads the leg, so the administrator declares
    // it failed once the agent reported it.
    server.declare_failed_once_reported(&provisioned.images[0], Duration::from_secs(300));
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let map = server.volume("vmir").map;
        if map.syncing.is_empty()
            && !on_device(&map, san0_uuid)
            && map.extents.iter().all(|e| e.replicas.len() == 2)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lost leg not resynced: {map:?}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    fs::write(provisioned.dir.join("resynced"), b"").expect("signal");
    let outcome = vm.wait().expect("guest ran");
    outcome.assert_clean_success();
    for file in ["after-fio.json", "final-status.json"] {
        let status = outcome.out_json(file);
        let volume = &status["volumes"][0];
        assert_eq!(volume["errors"].as_u64(), Some(0), "{file}: {volume}");
    }
    let map = server.volume("vmir").map;
    assert_eq!(map.layout.to_string(), "mirror");
    assert!(on_device(&map, san2_uuid), "{map:?}");
    let final_image = fs::read(log_dir.join("final.img")).expect("final.img");
    assert_eq!(final_image.len() as u64, VOLUME);
    let checked = blocks::verify_against_map(&map, &provisioned.by_uuid, &final_image);
    assert_eq!(checked as u64, 2 * VOLUME / BLOCK);
}
