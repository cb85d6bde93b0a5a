//! Leases and fencing with real guests: a client that never answers a change delays it by at
//! most its lease, and a server restart shorter than the lease holds no I/O. Results are read from the image files on the host.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use sanblk_tests::{dm_san, provision, spawn, RunningVm};

/// The server's default lease plus its in-flight bound: the longest a silent client keeps
/// its slot (`sand --help`).
const DEFAULT_FENCE_DELAY: Duration = Duration::from_secs(8);

/// Waits up to `timeout` for `name` in the output directory of `vm` (the guest creates it).
fn wait_for_guest_file(vm: &RunningVm, name: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if vm.log_dir().join(name).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn touch(path: &Path) {
    fs::write(path, b"").unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A client whose agent never answers QUIESCE (stopped) delays a change by at most its lease
/// and the in-flight bound; then the change commits without it.
#[test]
fn a_client_that_never_acks_delays_a_change_by_at_most_its_lease() {
    let setup = provision("fence-noack", &[], &["vn"], false);
    let body = r#"kill -STOP $AGENT
touch stopped
wait_for $D/grown
kill -CONT $AGENT
$S detach vn || kill -9 $AGENT
"#;
    let config = dm_san::vm(
        &setup,
        "fence-noack",
        "vn",
        "--io-timeout 5",
        body,
        Duration::from_secs(300),
    );
    let vm = spawn(&config).expect("guest started");
    assert!(wait_for_guest_file(
        &vm,
        "stopped",
        Duration::from_secs(240)
    ));
    let before = setup.server.volume("vn").map;
    let started = Instant::now();
    let output = setup.server.sanctl_output(&["volume", "grow", "vn", "24M"]);
    let took = started.elapsed();
    touch(&setup.dir.join("grown"));
    let outcome = vm.wait().expect("guest ran");
    assert!(
        output.status.success(),
        "grow failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    outcome.assert_clean_success();
    let after = setup.server.volume("vn").map;
    assert_eq!(after.size_bytes, 24 << 20);
    assert!(after.epoch > before.epoch);
    assert!(
        took <= DEFAULT_FENCE_DELAY + Duration::from_secs(6),
        "a silent client delayed the grow by {took:?}"
    );
}

/// A server restart shorter than the lease stalls no I/O: the agent reconnects and renews
/// before the kernel's lease lapses, so no write is held, none times out and the module never
/// reports LEASE_LAPSED (its events are collected the whole time).
#[test]
fn a_server_restart_within_the_lease_holds_no_io() {
    let mut setup = provision("fence-restart", &[], &["vr"], false);
    let body = format!(
        r#"timeout 600 {probe} events 100 > events.txt 2>&1 &
EVENTS=$!
(
  i=0
  while [ ! -e $D/stop-writer ]; do
    printf 'R-%08d\n' $i | dd of=$dev bs=4096 seek=$((i % 256)) count=1 \
        oflag=direct conv=sync,notrunc,fsync status=none 2>>writer.err \
      || echo "write $i failed" >> writer.err
    i=$((i + 1))
    [ $i -eq 20 ] && touch writing
  done
  echo $i > writes.txt
) &
WRITER=$!
wait_for $D/stop-writer
wait $WRITER
$S --json status > final.json
kill $EVENTS || true
$S detach vr
"#,
        probe = sanblk_tests::target_bin("sanblk-nlprobe").display()
    );
    let config = dm_san::vm(
        &setup,
        "fence-restart",
        "vr",
        "",
        &body,
        Duration::from_secs(400),
    );
    let vm = spawn(&config).expect("guest started");
    assert!(wait_for_guest_file(
        &vm,
        "writing",
        Duration::from_secs(240)
    ));
    let restarted = Instant::now();
    setup.server.restart().expect("sand restarted");
    let restart_took = restarted.elapsed();
    // Longer than the lease: a missed renewal would have lapsed it by now.
    std::thread::sleep(DEFAULT_FENCE_DELAY + Duration::from_secs(4));
    touch(&setup.dir.join("stop-writer"));
    let outcome = vm.wait().expect("guest ran");
    outcome.assert_clean_success();
    assert!(
        restart_took < Duration::from_secs(5),
        "restart took {restart_took:?}"
    );
    let errors = outcome.read_out_file("writer.err").unwrap_or_default();
    assert!(errors.trim().is_empty(), "writes failed: {errors}");
    let events = outcome.read_out_file("events.txt").expect("events.txt");
    assert!(events.contains("listening"), "{events}");
    assert!(
        !events.contains("kind=3 "),
        "the lease lapsed during a short server restart: {events}"
    );
    let status = outcome.out_json("final.json");
    assert_eq!(status["volumes"][0]["timed_out_ios"], 0, "{status}");
    assert_eq!(status["volumes"][0]["held_ios"], 0, "{status}");
    let writes: u64 = outcome
        .read_out_file("writes.txt")
        .expect("writes.txt")
        .trim()
        .parse()
        .expect("write count");
    assert!(writes > 20, "only {writes} writes");
}
