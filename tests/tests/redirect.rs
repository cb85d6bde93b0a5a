//! End-to-end: the second data path. A real `sand` on the host, a QEMU guest whose "SAN
//! device" is a dm device over the virtio disk, so the test can fail it from inside the
//! guest (dm-error) while I/O runs. Failed direct pieces must be redirected to the server
//! over the kernel's TCP client: fio sees no error, and the host finds the data the guest
//! wrote after the failure in the image file (written there by the server on its own path).
//!
//! The module multicasts the path failure (EVENT, kind PATH_FAILED) on the events group.
//!
//! Also: the first server address is unreachable (failover to the second), and a session
//! token the server no longer knows is refused: the kernel reports the server path as
//! `refused` and redirected I/O fails with EIO instead of hanging.

use std::fs;
use std::time::Duration;

use sanblk_tests::{
    blocks, dm_san, provision, run, spawn, target_bin, GuestOutcome, Provisioned, RunningVm,
    SandServer, VmConfig,
};

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 16 * MIB;

fn pattern(seed: u8, size: u64) -> Vec<u8> {
    blocks::pattern("redirect", seed, size)
}

/// Runs `body` in a guest with `volume` attached over the dm san0 (see [`dm_san::script`])
/// and fails unless the guest succeeded without kernel splats. For `body` also: `$P` is
/// sanblk-nlprobe, and `watch_events N` collects up to N of the module's netlink events in
/// events.txt in the background (`$EVENTS` its pid).
fn run_attached(
    setup: &Provisioned,
    name: &str,
    volume: &str,
    attach_args: &str,
    body: &str,
    timeout_s: u64,
) -> GuestOutcome {
    let config = attached_vm(setup, name, volume, attach_args, body, timeout_s);
    let outcome = run(&config).expect("guest ran");
    outcome.assert_clean_success();
    outcome
}

/// The guest of [`run_attached`].
fn attached_vm(
    setup: &Provisioned,
    name: &str,
    volume: &str,
    attach_args: &str,
    body: &str,
    timeout_s: u64,
) -> VmConfig {
    let body = format!(
        r#"P={probe}
watch_events() {{
    timeout 600 $P events $1 > events.txt 2>&1 &
    EVENTS=$!
    for i in $(seq 1 100); do grep -q listening events.txt && break; sleep 0.1; done
}}
{body}"#,
        probe = target_bin("sanblk-nlprobe").display(),
    );
    let timeout = Duration::from_secs(timeout_s);
    dm_san::vm(setup, name, volume, attach_args, &body, timeout)
}

#[test]
fn failed_device_io_is_redirected_to_the_server_and_lands_on_disk() {
    let setup = provision("redirect", &[], &["vlin"], false);
    fs::write(setup.dir.join("before.pattern"), pattern(1, VOLUME)).expect("pattern");
    fs::write(setup.dir.join("after.pattern"), pattern(2, VOLUME)).expect("pattern");
    let body = r#"# Direct path first.
dd if=$D/before.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
$S status > status-healthy.txt
# The module multicasts the path failure on the events group.
watch_events 1
# fio writes and verifies while the SAN device fails under it.
fio --name=redirect --filename=$dev --rw=randwrite --bs=4k --size=16M --direct=1 \
    --ioengine=libaio --iodepth=8 --verify=crc32c --do_verify=1 --output=fio.txt &
FIO=$!
sleep 3
fail_san0
wait $FIO
for i in $(seq 1 100); do grep -q "^event" events.txt && break; sleep 0.1; done
kill $EVENTS 2>/dev/null || true
# Everything now goes through the server: write a pattern and read it back.
dd if=$D/after.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
dd if=$dev of=/tmp/back bs=1M iflag=direct status=none
cmp /tmp/back $D/after.pattern
$S status > status.txt
$S --json status > status.json
$S detach vlin
test ! -e /dev/sanblk0"#;
    // The first I/O address is not forwarded: the kernel must fail over to the second.
    let outcome = run_attached(
        &setup,
        "redirect-failover",
        "vlin",
        "--io-server 10.0.2.100:9",
        body,
        500,
    );

    let fio = outcome.read_out_file("fio.txt").expect("fio output");
    assert!(fio.contains("err= 0"), "fio reported errors: {fio}");
    let events = outcome.read_out_file("events.txt").expect("events");
    assert!(
        events.contains("event cmd=8 kind=1 volume_id=1 device=/dev/mapper/san0"),
        "no path failure event: {events}"
    );
    let healthy = outcome.read_out_file("status-healthy.txt").expect("status");
    assert!(healthy.contains("healthy"), "{healthy}");
    let status = outcome.out_json("status.json");
    let vlin = &status["volumes"][0];
    assert_eq!(vlin["server_path"], "connected", "{vlin}");
    assert_eq!(vlin["devices"][0]["state"], "failed", "{vlin}");
    assert!(
        vlin["redirected_ios"].as_u64().unwrap_or(0) > 0,
        "nothing redirected: {vlin}"
    );
    let io_port = setup.server.io_port().expect("io port");
    assert_eq!(
        vlin["servers"],
        serde_json::json!(["10.0.2.100:9", format!("10.0.2.100:{io_port}")])
    );
    // The data written after the failure reached the disk through the server's own path.
    blocks::verify_against_map(
        &setup.server.volume("vlin").map,
        &setup.by_uuid,
        &pattern(2, VOLUME),
    );
}

/// An agent that dies stops renewing: once the kernel's lease lapses the volume's I/O is held
/// (never sent with a stale lease, direct or to the server), and it fails after the
/// attachment's I/O timeout instead of hanging.
#[test]
fn io_of_a_dead_agent_is_held_after_its_lease_and_fails_after_the_io_timeout() {
    let setup = provision("redirect-refused", &[], &["vtok"], false);
    let body = r#"kill -9 $AGENT
# The kernel's lease (6 s, last renewed at most 2 s ago) lapses.
sleep 7
fail_san0
start=$(date +%s)
if dd if=/dev/zero of=$dev bs=4k count=16 oflag=direct status=none 2> dd.txt; then echo "write succeeded"; exit 20; fi
end=$(date +%s)
echo $((end - start)) > seconds.txt
$S --json status > status.json
$P destroy $(sed -n 's/.*"volume_id": *\([0-9]*\).*/\1/p' status.json | head -1)"#;
    let outcome = run_attached(
        &setup,
        "redirect-refused",
        "vtok",
        "--io-timeout 5",
        body,
        300,
    );
    let status = outcome.out_json("status.json");
    let volume = &status["volumes"][0];
    assert_eq!(
        volume["hold_reason"],
        serde_json::json!(["lease-lapsed"]),
        "{status}"
    );
    assert!(counter(&status, "timed_out_ios") >= 1, "{status}");
    let seconds: u64 = outcome
        .read_out_file("seconds.txt")
        .expect("seconds")
        .trim()
        .parse()
        .expect("seconds");
    // Lease (6 s) + I/O timeout (5 s, failed within 1.25x) and the guest's slowness.
    assert!(seconds < 40, "the held write took {seconds} s to fail");
}

fn device_state(status: &serde_json::Value) -> &serde_json::Value {
    &status["volumes"][0]["devices"][0]["state"]
}

fn counter(status: &serde_json::Value, name: &str) -> u64 {
    status["volumes"][0][name].as_u64().unwrap_or(0)
}

/// A discard the SAN device does not support (its queue's `discard_max_bytes` set to 0)
/// completes with BLK_STS_NOTSUPP (which `blkdiscard`, through blkdev_issue_discard, treats as
/// a no-op), but it is no device failure: the path stays healthy, the device's error count
/// stays 0, nothing goes to the server, and I/O carries on direct. The volume's error counter
/// shows the discard did reach the device and fail there.
#[test]
fn an_unsupported_discard_fails_without_failing_the_path() {
    let setup = provision("redirect-discard", &[], &["vdis"], false);
    let data = pattern(21, VOLUME);
    fs::write(setup.dir.join("data.pattern"), &data).expect("pattern");
    let body = r#"for d in /sys/block/dm-*; do [ "$(cat $d/dm/name)" = san0 ] && san=$d; done
echo 0 > $san/queue/discard_max_bytes
blkdiscard -o 0 -l 1048576 $dev
dd if=$D/data.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
dd if=$dev of=/tmp/back bs=1M iflag=direct status=none
cmp /tmp/back $D/data.pattern
$S --json status > after.json
$S detach vdis
test ! -e /dev/sanblk0"#;
    let outcome = run_attached(&setup, "redirect-discard", "vdis", "", body, 300);

    let status = outcome.out_json("after.json");
    assert_eq!(device_state(&status), "healthy", "{status}");
    assert_eq!(status["volumes"][0]["devices"][0]["errors"], 0, "{status}");
    assert!(counter(&status, "errors") >= 1, "{status}");
    assert_eq!(counter(&status, "redirected_ios"), 0, "{status}");
    blocks::verify_against_map(&setup.server.volume("vdis").map, &setup.by_uuid, &data);
}

/// Fail-back: the server still reads the device, so the report recovers nothing; when the
/// failed path heals (the dm device gets its linear table back) the module's probe succeeds, it reports
/// PATH_HEALED, the server accepts, the agent marks the device healthy, and new I/O goes
/// direct again: the server-path counter stops growing while direct writes continue.
#[test]
fn path_heals_and_io_goes_direct_again() {
    let setup = provision("redirect-failback", &[], &["vfb"], false);
    let before = pattern(11, VOLUME);
    let during = pattern(12, VOLUME);
    let after = pattern(13, VOLUME / 2);
    let mut expected = after.clone();
    expected.extend_from_slice(&during[(VOLUME / 2) as usize..]);
    fs::write(setup.dir.join("before.pattern"), &before).expect("pattern");
    fs::write(setup.dir.join("during.pattern"), &during).expect("pattern");
    fs::write(setup.dir.join("after.pattern"), &after).expect("pattern");
    fs::write(setup.dir.join("expected.pattern"), &expected).expect("pattern");
    let body = r#"watch_events 2
dd if=$D/before.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
# The SAN device fails under a writer: its I/O goes to the server, dd sees no error.
dd if=$D/during.pattern of=$dev bs=64k oflag=direct conv=fsync status=none &
DD=$!
sleep 1
fail_san0
wait $DD
# Same data again, surely after the failure.
dd if=$D/during.pattern of=$dev bs=1M count=4 oflag=direct conv=fsync status=none
$S --json status > failed.json
# The path heals; the module's probe notices, the server agrees (no recovery: it reads san0).
dmsetup reload san0 --table "$LINEAR"
dmsetup resume san0
for i in $(seq 1 300); do
    $S --json status > healed.json
    grep -q '"state": *"healthy"' healed.json && break
    sleep 0.2
done
$S status > status-healed.txt
grep -q '"state": *"healthy"' healed.json
dd if=$D/after.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
$S --json status > final.json
dd if=$dev of=/tmp/back bs=1M iflag=direct status=none
cmp /tmp/back $D/expected.pattern
for i in $(seq 1 100); do [ $(grep -c "^event" events.txt) -ge 2 ] && break; sleep 0.1; done
kill $EVENTS 2>/dev/null || true
$S detach vfb
test ! -e /dev/sanblk0"#;
    let outcome = run_attached(&setup, "redirect-failback", "vfb", "", body, 500);

    let (failed, healed, last) = (
        outcome.out_json("failed.json"),
        outcome.out_json("healed.json"),
        outcome.out_json("final.json"),
    );
    assert_eq!(device_state(&failed), "failed", "{failed}");
    assert!(
        counter(&failed, "redirected_ios") > 0,
        "nothing redirected: {failed}"
    );
    assert_eq!(device_state(&healed), "healthy", "{healed}");
    assert_eq!(device_state(&last), "healthy", "{last}");
    // Direct again: writes went on, none of them over the server path.
    assert!(counter(&last, "write_ios") > counter(&healed, "write_ios"));
    assert_eq!(
        counter(&last, "redirected_ios"),
        counter(&healed, "redirected_ios"),
        "writes after fail-back still went to the server: {healed} {last}"
    );
    let events = outcome.read_out_file("events.txt").expect("events");
    assert!(
        events.contains("kind=1 volume_id=1 device=/dev/mapper/san0"),
        "no path failure event: {events}"
    );
    assert!(
        events.contains("kind=2 volume_id=1 device=/dev/mapper/san0"),
        "no path healed event: {events}"
    );
    let text = outcome.read_out_file("status-healed.txt").expect("status");
    assert!(text.contains("healthy"), "{text}");
    let agent = outcome.read_out_file("agent.log").expect("agent log");
    assert!(agent.contains("failed back to direct I/O"), "{agent}");
    assert!(
        outcome
            .serial_log
            .contains("is healthy again; direct I/O resumes"),
        "no fail-back in the kernel log"
    );
    blocks::verify_against_map(&setup.server.volume("vfb").map, &setup.by_uuid, &expected);
}

/// While the server recovers the volume off the failed device onto a spare, a healed path is
/// not failed back (direct writes would bypass the recovery's copy): the device stays failed
/// until the recovery publishes a map without it, and every block is on the new disk.
#[test]
fn healed_path_is_not_failed_back_while_a_recovery_runs() {
    // Slow copying (3 s per 1 MiB chunk), so the path heals while the recovery runs; san1 is
    // the spare.
    let setup = provision(
        "redirect-failback-recovering",
        &["--recovery-max-rate", "341K"],
        &["vrun"],
        true,
    );
    let during = pattern(21, VOLUME);
    fs::write(setup.dir.join("during.pattern"), &during).expect("pattern");
    let body = r#"fail_san0
dd if=$D/during.pattern of=$dev bs=1M count=4 oflag=direct conv=fsync status=none
for i in $(seq 1 300); do grep -q "reported failure" agent.log && break; sleep 0.2; done
# The host declares san0 failed once the report is in.
for i in $(seq 1 600); do
    $S --json status > recovering.json
    grep -q '"copying"' recovering.json && break
    sleep 0.2
done
grep -q '"copying"' recovering.json
# Heal the path while the recovery copies.
dmsetup reload san0 --table "$LINEAR"
dmsetup resume san0
for i in $(seq 1 300); do grep -q "fail-back refused" agent.log && break; sleep 0.2; done
grep "fail-back refused" agent.log
$S --json status > refused.json
dd if=$D/during.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
# The recovery ends with a map whose only device is the spare.
for i in $(seq 1 600); do
    $S --json status > recovered.json
    if grep -q '"/dev/vdb"' recovered.json && ! grep -q 'mapper/san0' recovered.json; then break; fi
    sleep 0.5
done
dd if=$dev of=/tmp/back bs=1M iflag=direct status=none
cmp /tmp/back $D/during.pattern
$S detach vrun"#;
    let vm = spawn(&attached_vm(
        &setup,
        "redirect-failback-recovering",
        "vrun",
        "--device /dev/vdb",
        body,
        500,
    ))
    .expect("guest started");
    setup
        .server
        .declare_failed_once_reported(&setup.images[0], Duration::from_secs(300));
    let outcome = vm.wait().expect("guest ran");
    outcome.assert_clean_success();

    let refused = outcome.out_json("refused.json");
    assert_eq!(
        refused["volumes"][0]["devices"][0]["path"], "/dev/mapper/san0",
        "{refused}"
    );
    assert_eq!(
        device_state(&refused),
        "failed",
        "failed back during recovery: {refused}"
    );
    let recovered = outcome.out_json("recovered.json");
    assert_eq!(
        recovered["volumes"][0]["devices"][0]["path"], "/dev/vdb",
        "not recovered: {recovered}"
    );
    assert!(
        !outcome.serial_log.contains("is healthy again"),
        "the kernel failed back during the recovery"
    );
    // The final map (epoch 3: epoch 2 marked the volume syncing while it was copied) no
    // longer has the device: probing (and PATH_HEALED) ends with it.
    let after_epoch = outcome
        .serial_log
        .split("now at epoch 3")
        .nth(1)
        .unwrap_or_else(|| panic!("no epoch 3 in the kernel log"));
    assert!(
        !after_epoch.contains("reporting PATH_HEALED"),
        "still probing a device the map dropped"
    );
    let server = &setup.server;
    assert!(
        server.log().contains("fail-back refused"),
        "the server did not refuse: {}",
        server.log()
    );
    blocks::verify_against_map(&server.volume("vrun").map, &setup.by_uuid, &during);
}

/// Whether process `pid` (QEMU) still runs (not gone, not a zombie).
fn running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// Waits until the guest creates `restart-sand` in the output directory of `vm` (or the guest
/// ends), then kills `server` and starts it again on the same metadata and ports. Session
/// tokens survive a restart, so first the grant of host1 on `volume` is set again: that ends
/// the persisted session, and the agent's re-attach gets a new token. Whether it restarted.
fn restart_on_request(vm: &RunningVm, server: &mut SandServer, volume: &str) -> bool {
    let out = vm.log_dir();
    let deadline = std::time::Instant::now() + Duration::from_secs(400);
    while !out.join("restart-sand").exists() {
        if !running(vm.pid()) || std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    server.sanctl(&["client", "grant", "host1", volume, "rw"]);
    server.restart().expect("sand restarted");
    true
}

/// After the server restarts (with host1's session ended by a grant change, so the persisted
/// token is not re-issued), the agent reconnects and gets a new session token; it hands the
/// token to the kernel with UPDATE_MAP (same epoch), the server path reconnects with it, and
/// redirected I/O keeps working instead of being refused with the stale token.
#[test]
fn new_session_token_reaches_the_kernel_after_the_agent_reconnects() {
    let setup = provision("redirect-token", &[], &["vtk"], false);
    let one = pattern(31, VOLUME / 4);
    let two = pattern(32, VOLUME);
    fs::write(setup.dir.join("one.pattern"), &one).expect("pattern");
    fs::write(setup.dir.join("two.pattern"), &two).expect("pattern");
    let body = r#"# The server path is in use (connected, authenticated with the first token).
fail_san0
dd if=$D/one.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
$S --json status > first.json
touch restart-sand
# The agent reconnects (new session, new token) and re-delivers the map with the token.
for i in $(seq 1 300); do grep -q "reconnected to" agent.log && break; sleep 0.2; done
grep "reconnected to" agent.log
dd if=$D/two.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
dd if=$dev of=/tmp/back bs=1M iflag=direct status=none
cmp /tmp/back $D/two.pattern
$S --json status > second.json
$S detach vtk"#;
    let config = dm_san::vm(
        &setup,
        "redirect-token",
        "vtk",
        "",
        body,
        Duration::from_secs(500),
    );
    let Provisioned {
        mut server,
        by_uuid,
        ..
    } = setup;
    let vm = spawn(&config).expect("guest started");
    let restarted = restart_on_request(&vm, &mut server, "vtk");
    let outcome = vm.wait().expect("guest ran");
    outcome.assert_clean_success();
    assert!(restarted, "sand was not restarted");

    let (first, second) = (
        outcome.out_json("first.json"),
        outcome.out_json("second.json"),
    );
    assert_eq!(first["volumes"][0]["server_path"], "connected", "{first}");
    assert_eq!(second["volumes"][0]["server_path"], "connected", "{second}");
    assert!(
        counter(&second, "redirected_ios") > counter(&first, "redirected_ios"),
        "nothing went over the server path after the restart: {first} {second}"
    );
    assert!(
        outcome
            .serial_log
            .contains("new session token; reconnecting the server path"),
        "the kernel did not reconnect with the new token"
    );
    // The restarted server wrote the data through its own path.
    assert!(!server.log().contains("panicked"), "{}", server.log());
    let map = server.volume("vtk").map;
    blocks::verify_against_map(&map, &by_uuid, &two);
}

/// A piece larger than one server request (1 MiB, `frame::MAX_PAYLOAD`) goes through the
/// server path's pipeline in chunks. The module does not split bios to the queue limits (it
/// is bio-based: `max_sectors_kb` does not bound the bios it gets), so a `bs=4M` direct write
/// arrives as bios of up to 4 MiB, as far as the guest's buffer pages are physically
/// contiguous. After the path failed, every such bio is one piece on the server path: the
/// kernel's `redirected_ios` counter grows by one per piece, so fewer pieces than MiB written
/// proves pieces over 1 MiB went through. The host finds the data in the image file and the
/// guest reads it back (also in 4 MiB pieces) unchanged, so wrong chunk offsets or lengths
/// fail the test.
#[test]
fn pieces_over_one_mib_go_to_the_server_in_chunks() {
    let setup = provision("redirect-chunks", &[], &["vbig"], false);
    let data = pattern(31, VOLUME);
    fs::write(setup.dir.join("big.pattern"), &data).expect("pattern");
    let body = r#"fail_san0
# The first write fails on the SAN device and marks the path failed.
dd if=/dev/zero of=$dev bs=4k count=1 oflag=direct status=none
$S --json status > before.json
dd if=$D/big.pattern of=$dev bs=4M oflag=direct conv=fsync status=none
$S --json status > written.json
dd if=$dev of=/tmp/back bs=4M iflag=direct status=none
$S --json status > read.json
cmp /tmp/back $D/big.pattern
$S detach vbig
test ! -e /dev/sanblk0"#;
    let outcome = run_attached(&setup, "redirect-chunks", "vbig", "", body, 300);

    let before = outcome.out_json("before.json");
    let written = outcome.out_json("written.json");
    let read = outcome.out_json("read.json");
    assert_eq!(device_state(&before), "failed", "{before}");
    let mib = VOLUME / MIB;
    let writes = counter(&written, "redirected_ios") - counter(&before, "redirected_ios");
    let reads = counter(&read, "redirected_ios") - counter(&written, "redirected_ios");
    assert!(writes > 0 && reads > 0, "nothing redirected: {read}");
    assert!(
        writes < mib && reads < mib,
        "no piece over 1 MiB: {writes} write and {reads} read pieces for {mib} MiB each way"
    );
    blocks::verify_against_map(&setup.server.volume("vbig").map, &setup.by_uuid, &data);
}
