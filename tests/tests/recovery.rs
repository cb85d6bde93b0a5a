//! End-to-end recovery: a real `sand` with two SAN disks, a guest whose first SAN device is a
//! dm device over the virtio disk so the test can fail it from inside (dm-error). After the
//! failure, I/O is redirected to the server; the module multicasts the path failure, the
//! agent reports it. The server still reads the disk, so the report alone moves nothing
//! (`pool list` shows the host's failed path); the host then declares the disk failed as an
//! administrator does, and the server copies the volume onto the second disk (keeping
//! redirected writes consistent), publishes a new epoch, and the kernel resumes direct I/O on
//! the new disk. The host then finds every block where the final map says, on the new disk.

use std::fs;
use std::time::{Duration, Instant};

use sanblk_proto::protocol::{RecoveryState, RecoveryStatus};
use sanblk_tests::blocks::BLOCK;
use sanblk_tests::server::last_resume_cursor;
use sanblk_tests::{
    blocks, dm_san, provision, spawn, wait_for_file, GuestOutcome, Provisioned, SandServer,
    VmConfig,
};

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 16 * MIB;

/// A running `sand` with two SAN disk images: the 16 MiB linear volume `vrec` on san0, san1
/// the spare; client `host1` granted rw.
struct Setup {
    provisioned: Provisioned,
    spare: uuid::Uuid,
}

impl Setup {
    fn new(name: &str, sand_args: &[&str]) -> Setup {
        // The volume lands on san0 (the only device when it is created); san1 is the spare.
        let provisioned = provision(name, sand_args, &["vrec"], true);
        Setup {
            spare: provisioned.spare.expect("san1 in pool"),
            provisioned,
        }
    }

    fn server(&self) -> &SandServer {
        &self.provisioned.server
    }

    /// Writes `data` as `name` in the scratch dir (read by the guest).
    fn file(&self, name: &str, data: &[u8]) {
        fs::write(self.provisioned.dir.join(name), data).expect("pattern");
    }

    /// The patterns of a failure test: written before the failure, after it, after the
    /// recovery, and what the volume must hold at the end.
    fn patterns(&self, before: &[u8], after: &[u8], last: &[u8], expected: &[u8]) {
        self.file("before.pattern", before);
        self.file("after.pattern", after);
        self.file("last.pattern", last);
        self.file("expected.pattern", expected);
    }

    /// A guest running `body` with `vrec` attached as `$dev` over the dm san0 and the spare
    /// (see [`dm_san::script`]), then detached. One more helper: `wait_recovered` (until the
    /// kernel's map has only the spare).
    fn vm(&self, name: &str, body: &str) -> VmConfig {
        let body = format!(
            r#"wait_recovered() {{
    for i in $(seq 1 1200); do
        $S --json status > recovered.json
        if grep -q '"/dev/vdb"' recovered.json && ! grep -q 'mapper/san0' recovered.json; then return 0; fi
        sleep 0.5
    done
    return 1
}}
{body}
$S detach vrec"#
        );
        let timeout = Duration::from_secs(600);
        dm_san::vm(
            &self.provisioned,
            name,
            "vrec",
            "--device /dev/vdb",
            &body,
            timeout,
        )
    }

    /// The server's map of `vrec` is entirely on the spare, and the spare image holds
    /// `expected` at every block of it.
    fn check_on_spare(&self, expected: &[u8]) {
        let detail = self.server().volume("vrec");
        for extent in &detail.map.extents {
            for replica in &extent.replicas {
                assert_eq!(
                    replica.device_uuid, self.spare,
                    "extent still on the failed disk: {extent:?}"
                );
            }
        }
        let checked = blocks::verify_against_map(&detail.map, &self.provisioned.by_uuid, expected);
        assert_eq!(checked as u64, VOLUME / BLOCK);
    }

    /// Runs the guest `vm`; once its agent reported its path to san0 failed, declares san0
    /// failed (see [`SandServer::declare_failed_once_reported`]).
    fn run_recovering(&self, vm: &VmConfig) -> GuestOutcome {
        let running = spawn(vm).expect("guest started");
        self.declare_san0_failed_once_reported();
        running.wait().expect("guest ran")
    }

    fn declare_san0_failed_once_reported(&self) {
        self.server()
            .declare_failed_once_reported(&self.provisioned.images[0], Duration::from_secs(300));
    }

    fn recoveries(&self) -> Vec<RecoveryStatus> {
        serde_json::from_str(&self.server().sanctl(&["--json", "recovery", "list"]))
            .expect("recovery json")
    }
}

#[test]
fn failed_device_is_recovered_onto_a_new_disk_and_direct_io_resumes() {
    let setup = Setup::new("recovery-e2e", &[]);
    // Written direct before the failure, then through the server, then direct on the new disk.
    let before = blocks::pattern("recovery", 1, VOLUME);
    let after = blocks::pattern("recovery", 2, VOLUME);
    let last = blocks::pattern("recovery", 3, VOLUME / 2);
    let mut expected = last.clone();
    expected.extend_from_slice(&after[(VOLUME / 2) as usize..]);
    setup.patterns(&before, &after, &last, &expected);

    let body = r#"dd if=$D/before.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
fail_san0
dd if=$D/after.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
# Recovery ends with a new epoch whose only device is the spare.
wait_recovered
dd if=$D/last.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
$S --json status > final.json
$S status > status.txt
dd if=$dev of=/tmp/back bs=1M iflag=direct status=none
cmp /tmp/back $D/expected.pattern"#;
    let outcome = setup.run_recovering(&setup.vm("recovery-e2e", body));
    outcome.assert_clean_success();

    let recovered = outcome.out_json("recovered.json");
    let volume = volume_status(&recovered, "vrec");
    assert_eq!(
        volume["devices"][0]["path"], "/dev/vdb",
        "not recovered: {volume}"
    );
    assert_direct_after_recovery(&recovered, &outcome.out_json("final.json"));
    let status = outcome.read_out_file("status.txt").expect("status");
    assert!(
        status.contains("recovery of vrec"),
        "no recovery progress shown: {status}"
    );
    setup.check_on_spare(&expected);
}

/// Regression test: the first I/O after the path failure is a READ of the single-copy volume,
/// issued while the server starts recovering it; reads then go on, continuously, while the
/// (slowed-down) copy runs, across its completion (new epoch: the server refuses the old
/// epoch with -ESTALE until the kernel has the new map) and once more on the new disk. Every
/// read must return the data written before the failure, never EIO: the server serves them
/// from the failed-for-the-client source device (or the target for the copied part), and a
/// stale-epoch refusal is retried once the new map is in.
#[test]
fn reads_right_after_the_failure_during_recovery_return_the_data() {
    let setup = Setup::new(
        "recovery-read-first",
        // About 600 ms per 1 MiB chunk: a whole-volume read through the server takes
        // seconds in a loaded TCG guest, and one must overlap the copy.
        &["--recovery-max-rate", "1700K"],
    );
    let before = blocks::pattern("readfirst", 1, VOLUME);
    setup.file("before.pattern", &before);
    let body = r#"dd if=$D/before.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
fail_san0
# The first I/O after the failure: a read (redirected; the agent reports the failure and
# the host declares san0 failed meanwhile).
dd if=$dev of=/tmp/first bs=64K count=16 iflag=direct status=none
dd if=$D/before.pattern of=/tmp/want bs=64K count=16 status=none
cmp /tmp/first /tmp/want
# Whole-volume reads in 64 KiB requests until the kernel has the recovered map.
n=0
while :; do
    $S --json status > sample.json
    grep -q '"copying"\|"queued"' sample.json && echo copying >> reads-during-copy.txt || true
    dd if=$dev of=/tmp/during bs=64K iflag=direct status=none
    cmp /tmp/during $D/before.pattern
    n=$((n + 1))
    $S --json status > recovered.json
    if grep -q '"/dev/vdb"' recovered.json && ! grep -q 'mapper/san0' recovered.json; then break; fi
    [ $n -lt 100 ]
done
$S --json status > final.json
dd if=$dev of=/tmp/back bs=1M iflag=direct status=none
cmp /tmp/back $D/before.pattern
$S --json status > final2.json"#;
    let outcome = setup.run_recovering(&setup.vm("recovery-read-first", body));
    outcome.assert_clean_success();
    // Some reads overlapped the copy (else this test proves nothing about the bug).
    let during = outcome
        .read_out_file("reads-during-copy.txt")
        .unwrap_or_default();
    assert!(
        during.lines().count() >= 1,
        "no read overlapped the recovery copy"
    );
    assert_direct_after_recovery(
        &outcome.out_json("final.json"),
        &outcome.out_json("final2.json"),
    );
    setup.check_on_spare(&before);
}

/// The volume `name` in a `sanctl --json status`.
fn volume_status<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("no volume {name} in {status}"))
}

/// Between the kernel status `recovered` (taken once the recovered map was in) and `later`:
/// a new epoch, no I/O error, and nothing redirected (the I/O in between went direct, to the
/// new disk).
fn assert_direct_after_recovery(recovered: &serde_json::Value, later: &serde_json::Value) {
    let volume = volume_status(recovered, "vrec");
    assert!(volume["epoch"].as_u64().unwrap_or(0) >= 2, "{volume}");
    let later = volume_status(later, "vrec");
    assert!(volume["errors"].is_u64(), "no error counter: {volume}");
    assert_eq!(
        volume["errors"], later["errors"],
        "I/O errors after recovery"
    );
    assert_eq!(
        volume["redirected_ios"], later["redirected_ios"],
        "I/O after recovery still went to the server"
    );
}

/// The server killed with SIGKILL mid-recovery and restarted on the same data dir and ports
/// finishes the recovery from its persisted cursor (not from zero), and the guest never sees
/// an error:
/// - the guest writes a pattern direct, san0 fails (dm-error), redirected writes go on while
///   the (slowed-down) copy runs; the host kills `sand` once a cursor has been saved;
/// - while the server is down, direct I/O of the guest (a second volume, `vok`, on the healthy
///   spare) goes on without the server at all and completes before it is back; I/O to the
///   failed device is queued in the kernel's server path, which reconnects with backoff
///   (100 ms doubling to 5 s) and completes it once the server is back (it would fail only
///   after 30 s without a server);
/// - the agent reconnects (backoff) and re-attaches; the session token is stable across the
///   restart (persisted with the attachment), so the kernel's server path, which keeps its
///   token, is accepted again, even before the agent is back;
/// - the new map (new epoch, only the spare) reaches the kernel; later direct I/O goes to the
///   new disk; the host reads the spare image and finds every block right.
#[test]
fn server_killed_mid_recovery_restarts_and_finishes_it() {
    let mut setup = Setup::new(
        "recovery-restart",
        // A second per 1 MiB chunk. The lease outlasts the server's absence (kill, the 20 s
        // allowed for the direct I/O below, restart): with the default 6 s, a slow guest's
        // direct I/O to the healthy volume is held once the unrenewable lease lapses.
        &["--recovery-max-rate", "1M", "--lease-ms", "40000"],
    );
    // A second volume, on the healthy spare (the device with the most free space).
    setup.server().sanctl(&["volume", "create", "vok", "4M"]);
    setup
        .server()
        .sanctl(&["client", "grant", "host1", "vok", "rw"]);
    let vok = setup.server().volume("vok");
    assert!(
        vok.map
            .extents
            .iter()
            .all(|e| e.replicas.iter().all(|r| r.device_uuid == setup.spare)),
        "vok is not on the spare: {:?}",
        vok.map
    );
    let ok_pattern = blocks::pattern("restart-ok", 4, 4 * MIB);
    setup.file("ok.pattern", &ok_pattern);
    let before = blocks::pattern("restart", 1, VOLUME);
    let after = blocks::pattern("restart", 2, VOLUME);
    let last = blocks::pattern("restart", 3, 4 * MIB);
    // last [0, 4M) + after [4M, 12M) + before [12M, 16M).
    let mut expected = last.clone();
    expected.extend_from_slice(&after[(4 * MIB) as usize..(12 * MIB) as usize]);
    expected.extend_from_slice(&before[(12 * MIB) as usize..]);
    setup.patterns(&before, &after, &last, &expected);
    let body = r#"$S attach vok --server $SERVER --client host1 --secret-file $D/host1.secret \
    --device /dev/vdb --io-server $IO_SERVER > agent-ok.log 2>&1 &
wait_for /run/sanblk/vok.device
ok=$(cat /run/sanblk/vok.device)
dd if=$D/before.pattern of=$dev bs=1M oflag=direct conv=fsync status=none
fail_san0
# Redirected writes: the failure is reported, the host starts the recovery.
dd if=$D/after.pattern of=$dev bs=1M count=8 oflag=direct conv=fsync status=none
touch phase1
# The host kills the server. Direct I/O goes on; I/O for the failed device waits for it.
wait_for server-down
dd if=$D/ok.pattern of=$ok bs=1M oflag=direct conv=fsync status=none
dd if=$ok of=/tmp/okback bs=1M iflag=direct status=none
cmp /tmp/okback $D/ok.pattern
touch ok-io-done
dd if=$D/after.pattern of=$dev bs=1M skip=8 seek=8 count=4 oflag=direct conv=fsync status=none
dd if=$dev of=/tmp/head bs=1M count=4 iflag=direct status=none
dd if=$D/after.pattern of=/tmp/want bs=1M count=4 status=none
cmp /tmp/head /tmp/want
touch down-io-done
wait_recovered
dd if=$D/last.pattern of=$dev bs=1M count=4 oflag=direct conv=fsync status=none
$S --json status > final.json
dd if=$dev of=/tmp/back bs=1M iflag=direct status=none
cmp /tmp/back $D/expected.pattern
$S detach vok"#;
    let vm = spawn(&setup.vm("recovery-restart", body)).expect("guest started");
    setup.declare_san0_failed_once_reported();
    let log_dir = vm.log_dir().to_path_buf();
    wait_for_file(&log_dir.join("phase1"), Duration::from_secs(400));

    // Kill once a cursor is saved (every 4 chunks) and the copy is not done.
    let deadline = Instant::now() + Duration::from_secs(120);
    let before_kill = loop {
        let statuses = setup.recoveries();
        if let Some(status) = statuses.first() {
            assert_ne!(
                status.state,
                RecoveryState::Done,
                "finished before the kill"
            );
            if status.bytes_done >= 5 * MIB {
                break status.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no recovery progress: {statuses:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    setup.provisioned.server.kill9();
    fs::write(log_dir.join("server-down"), b"").expect("signal");
    // Direct I/O completes without the server; then the guest's I/O to the failed device
    // waits in the kernel's server path for a while.
    wait_for_file(&log_dir.join("ok-io-done"), Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !log_dir.join("down-io-done").exists(),
        "I/O to the failed device completed without a server"
    );
    setup.provisioned.server.restart().expect("restart");
    let resumed = setup.recoveries();
    let outcome = vm.wait().expect("guest ran");
    outcome.assert_clean_success();

    // Resumed from the saved cursor, not from zero.
    let log = setup.server().log();
    let resumed_at =
        last_resume_cursor(&log).unwrap_or_else(|| panic!("no resume in the log:\n{log}"));
    assert!(
        resumed_at >= 4 * MIB && resumed_at <= before_kill.bytes_done,
        "resumed at {resumed_at}, killed at {}",
        before_kill.bytes_done
    );
    if let Some(status) = resumed.first() {
        assert!(
            status.bytes_done >= 4 * MIB,
            "restarted from zero: {status:?}"
        );
    }
    let done = setup.recoveries();
    assert!(
        done.iter()
            .any(|s| s.state == RecoveryState::Done && s.bytes_done == VOLUME),
        "{done:?}"
    );
    // The kernel's session survived the restart: its token was accepted again.
    assert!(
        log.matches("I/O connection from").count() >= 2,
        "no server-path reconnection: {log}"
    );
    assert_direct_after_recovery(
        &outcome.out_json("recovered.json"),
        &outcome.out_json("final.json"),
    );
    setup.check_on_spare(&expected);
    let final_status = outcome.out_json("final.json");
    let vok_status = volume_status(&final_status, "vok");
    assert_eq!(vok_status["redirected_ios"], 0, "{vok_status}");
    let checked = blocks::verify_against_map(&vok.map, &setup.provisioned.by_uuid, &ok_pattern);
    assert_eq!(checked as u64, 4 * MIB / BLOCK);
}
