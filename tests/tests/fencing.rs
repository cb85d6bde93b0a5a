//! Leases and fencing with real guests: a client that never answers a change delays it by at
//! most its lease, and a server restart shorter than the lease holds no I/O. Results are read from the image files on the host.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use sanblk_proto::map::VolumeMap;
use sanblk_tests::dm_san::WAIT_LONG;
use sanblk_tests::{dm_san, provision, spawn, GuestOutcome, Provisioned, RunningVm, VmConfig};

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

/// What [`grow_once_signalled`] saw.
struct Grown {
    /// The server's map before the grow.
    before: VolumeMap,
    took: Duration,
    outcome: GuestOutcome,
}

/// Runs the guest of `config`; once it created `signal`, grows `volume` to 24 MiB from the
/// host (which must succeed) and tells the guest (`$D/grown`), then waits for the guest.
fn grow_once_signalled(
    setup: &Provisioned,
    config: &VmConfig,
    volume: &str,
    signal: &str,
) -> Grown {
    let vm = spawn(config).expect("guest started");
    assert!(wait_for_guest_file(&vm, signal, Duration::from_secs(240)));
    let before = setup.server.volume(volume).map;
    let started = Instant::now();
    let output = setup
        .server
        .sanctl_output(&["volume", "grow", volume, "24M"]);
    let took = started.elapsed();
    touch(&setup.dir.join("grown"));
    let outcome = vm.wait().expect("guest ran");
    assert!(
        output.status.success(),
        "grow failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Grown {
        before,
        took,
        outcome,
    }
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
    let grown = grow_once_signalled(&setup, &config, "vn", "stopped");
    let took = grown.took;
    let outcome = grown.outcome;
    outcome.assert_clean_success();
    let after = setup.server.volume("vn").map;
    assert_eq!(after.size_bytes, 24 << 20);
    assert!(after.epoch > grown.before.epoch);
    assert!(
        took <= DEFAULT_FENCE_DELAY + Duration::from_secs(6),
        "a silent client delayed the grow by {took:?}"
    );
}

/// A client whose kernel takes longer than the lease to drain its in-flight I/O for a
/// change (its SAN device answers after 12 s) keeps renewing its lease while it drains: the
/// server waits for its ack instead of fencing it, and the client carries on at the new epoch
/// (the grown size, a write after the change lands where the new map says).
#[test]
fn a_client_draining_slow_io_for_a_change_is_not_fenced() {
    let setup = provision("fence-drain", &[], &["vd"], false);
    let body = r#"DELAY="0 $SECTORS delay /dev/vda 0 12000"
dmsetup suspend san0
dmsetup reload san0 --table "$DELAY"
dmsetup resume san0
printf 'slow-write' | dd of=$dev bs=4096 count=1 oflag=direct conv=sync,notrunc status=none &
SLOW=$!
sleep 1
touch writing
wait_for $D/grown
wait $SLOW
dmsetup suspend san0
dmsetup reload san0 --table "$LINEAR"
dmsetup resume san0
for i in $(seq 1 100); do
  [ "$(blockdev --getsize64 $dev)" = 25165824 ] && break
  sleep 0.2
done
blockdev --getsize64 $dev > size.txt
printf 'after-grow' | dd of=$dev bs=4096 seek=5000 count=1 oflag=direct conv=sync,notrunc,fsync status=none
$S --json status > final.json
$S detach vd
"#;
    let config = dm_san::vm(
        &setup,
        "fence-drain",
        "vd",
        "--io-timeout 60",
        body,
        Duration::from_secs(400),
    );
    let grown = grow_once_signalled(&setup, &config, "vd", "writing");
    let (before, outcome) = (grown.before, grown.outcome);
    outcome.assert_clean_success();
    let agent = outcome.read_out_file("agent.log").unwrap_or_default();
    assert!(
        !agent.contains("FENCED") && agent.contains("resumed at epoch"),
        "the draining client was fenced or not resumed: {agent}"
    );
    let size = outcome.read_out_file("size.txt").expect("size.txt");
    assert_eq!(size.trim(), "25165824", "the client missed the grow");
    let after = setup.server.volume("vd").map;
    assert!(after.epoch > before.epoch);
    let status = outcome.out_json("final.json");
    assert_eq!(status["volumes"][0]["epoch"], after.epoch, "{status}");
    assert_eq!(status["volumes"][0]["timed_out_ios"], 0, "{status}");
    let landed = sanblk_tests::blocks::read_volume(&after, &setup.by_uuid, 5000 * 4096, 4096);
    assert_eq!(
        &landed[..10],
        b"after-grow",
        "the write after the change did not land"
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

/// Volume bytes A's canary writer covers; B takes over the second half.
const CANARY_SPAN: u64 = 8 << 20;
const B_REGION: u64 = CANARY_SPAN / 2;

/// Host A is partitioned from the server (its agent stopped) while it writes: once its lease
/// lapses its kernel starts no I/O, the server gives the read-write slot to host B only after
/// A's lease plus the in-flight bound, and nothing A writes from then on reaches the image
/// files: A's half of the volume stays as it was when B attached, B's half holds exactly B's
/// data, and A's held writes fail after its I/O timeout instead of landing once A is back.
#[test]
fn a_partitioned_writer_is_fenced_before_another_host_takes_the_volume_over() {
    let provisioned = provision("fence-takeover", &[], &["vt"], false);
    let server = &provisioned.server;
    let secret_b = provisioned.dir.join("host2.secret");
    server.sanctl(&[
        "client",
        "add",
        "host2",
        "--secret-out",
        &secret_b.display().to_string(),
    ]);
    server.sanctl(&["client", "grant", "host2", "vt", "rw"]);
    let b_data = sanblk_tests::blocks::pattern("takeover-b", 7, B_REGION);
    fs::write(provisioned.dir.join("b.pattern"), &b_data).expect("pattern");

    // A: writes 4 KiB canaries round the first 8 MiB, each with O_DIRECT and a flush, until
    // told to stop; its agent is stopped (the partition) and later continued.
    let a_body = format!(
        r#"{WAIT_LONG}
(
  i=0
  while [ ! -e stop-writer ]; do
    printf 'A-canary-%08d\n' $i | dd of=$dev bs=4096 seek=$((i % 2048)) count=1 \
        oflag=direct conv=sync,notrunc,fsync status=none 2>>writer.err \
      || echo "write $i failed" >> writer.err
    i=$((i + 1))
    [ $i -eq 20 ] && touch writing
  done
  echo $i > writes.txt
) &
WRITER=$!
wait_long $D/partition
kill -STOP $AGENT
touch stopped
wait_long $D/b-done
kill -CONT $AGENT
for i in $(seq 1 300); do grep -q FENCED agent.log && break; sleep 0.2; done
grep FENCED agent.log
# Every write held since the lease lapsed has timed out (--io-timeout 15) by now.
sleep 20
touch stop-writer
wait $WRITER
$S --json status > final.json
$S detach vt
"#
    );
    let a = spawn(&dm_san::vm(
        &provisioned,
        "fence-takeover-a",
        "vt",
        "--io-timeout 15",
        &a_body,
        Duration::from_secs(600),
    ))
    .expect("guest A started");
    // B: attaches read-write once told to, retrying while the server answers busy, then
    // writes the second half of A's canary span.
    let io_port = server.io_port().expect("io port");
    let b_script = format!(
        r#"set -ex
{prologue}D={dir}
{WAIT_LONG}
wait_long $D/go-b
attached=0
for attempt in $(seq 1 120); do
  $S attach vt --server 10.0.2.100:{port} --client host2 --secret-file $D/host2.secret \
      --device /dev/mapper/san0 --io-server 10.0.2.100:{io_port} >> agent.log 2>&1 &
  AGENT=$!
  for j in $(seq 1 50); do
    [ -e /run/sanblk/vt.device ] && attached=1 && break
    kill -0 $AGENT 2>/dev/null || break
    sleep 0.1
  done
  [ $attached = 1 ] && break
  sleep 0.3
done
[ $attached = 1 ]
touch attached
echo $attempt > attempts.txt
dev=$(cat /run/sanblk/vt.device)
dd if=$D/b.pattern of=$dev bs=1M seek={b_mib} oflag=direct conv=fsync status=none
touch written
wait_long $D/b-detach
$S detach vt
rmmod sanblk
dmsetup remove san0
"#,
        prologue = dm_san::prologue(&sanblk_tests::module_path()),
        dir = provisioned.dir.display(),
        port = server.port,
        b_mib = B_REGION >> 20,
    );
    let mut b_config = sanblk_tests::VmConfig::new("fence-takeover-b", &b_script)
        .forward_port(server.port)
        .forward_port(io_port);
    for image in &provisioned.images {
        b_config = b_config.disk(image);
    }
    let b = spawn(&b_config).expect("guest B started");

    assert!(wait_for_guest_file(&a, "writing", Duration::from_secs(400)));
    touch(&provisioned.dir.join("partition"));
    assert!(wait_for_guest_file(&a, "stopped", Duration::from_secs(60)));
    let partitioned = Instant::now();
    touch(&provisioned.dir.join("go-b"));
    assert!(wait_for_guest_file(
        &b,
        "attached",
        Duration::from_secs(400)
    ));
    let takeover = partitioned.elapsed();
    // A is fenced by now: what A's half of the span holds must not change any more.
    let map = server.volume("vt").map;
    let a_half = sanblk_tests::blocks::read_volume(&map, &provisioned.by_uuid, 0, B_REGION);
    assert!(
        a_half
            .chunks(4096)
            .any(|block| block.starts_with(b"A-canary-")),
        "A wrote no canary before the partition; the test proves nothing"
    );
    assert!(wait_for_guest_file(&b, "written", Duration::from_secs(120)));
    touch(&provisioned.dir.join("b-done"));
    let a_outcome = a.wait().expect("guest A ran");
    touch(&provisioned.dir.join("b-detach"));
    let b_outcome = b.wait().expect("guest B ran");
    a_outcome.assert_clean_success();
    b_outcome.assert_clean_success();

    // The takeover waited for A's lease: B was refused until then.
    assert!(
        takeover >= Duration::from_secs(4),
        "B took the volume {takeover:?} after A's partition, before A's lease could lapse"
    );
    eprintln!("partition to takeover: {takeover:?}");
    let map = server.volume("vt").map;
    assert_eq!(
        sanblk_tests::blocks::verify_range(&map, &provisioned.by_uuid, 0, &a_half) as u64,
        B_REGION / 4096,
        "A's half changed after B took over"
    );
    assert_eq!(
        sanblk_tests::blocks::verify_range(&map, &provisioned.by_uuid, B_REGION, &b_data) as u64,
        B_REGION / 4096,
    );
    // A's writes after the lapse were held, then failed; none was dropped silently.
    let errors = a_outcome.read_out_file("writer.err").unwrap_or_default();
    assert!(errors.contains("failed"), "no write of A failed: {errors}");
    let status = a_outcome.out_json("final.json");
    assert!(
        status["volumes"][0]["timed_out_ios"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );
    let agent_log = a_outcome.read_out_file("agent.log").unwrap_or_default();
    assert!(agent_log.contains("FENCED"), "{agent_log}");
}
