//! Leases and fencing with real guests: a client that loses the server stops writing once its
//! lease lapses, another host then takes the volume over, and a client that never answers a
//! change delays it by at most its lease. Results are read from the image files on the host.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use sanblk_proto::map::VolumeMap;
use sanblk_tests::blocks::{self, read_at, BLOCK};
use sanblk_tests::{dm_san, provision, spawn, RunningVm, VmConfig};

/// The server's default lease plus its in-flight bound: the longest a silent client keeps
/// its slot (`sand --help`).
const DEFAULT_FENCE_DELAY: Duration = Duration::from_secs(8);

/// The first MiB of the volume: guest A's canaries.
const CANARY_REGION: u64 = 1 << 20;

/// Bytes of the volume in `[offset, offset + len)` as the first replica of each block holds
/// them in the image files.
fn volume_bytes(
    map: &VolumeMap,
    images: &std::collections::HashMap<uuid::Uuid, std::path::PathBuf>,
    offset: u64,
    len: u64,
) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len as usize);
    let mut at = offset;
    while at < offset + len {
        let (replicas, _) = map
            .extent_at(at)
            .and_then(|e| e.locate(at - e.volume_offset))
            .unwrap_or_else(|| panic!("volume offset {at} not mapped"));
        let replica = &replicas[0];
        bytes.extend(
            read_at(&images[&replica.device_uuid], replica.device_offset, BLOCK)
                .unwrap_or_else(|e| panic!("read image: {e}")),
        );
        at += BLOCK;
    }
    bytes
}

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

/// Guest A writes numbered canaries into the first MiB of the volume without pause; its agent
/// is then stopped (SIGSTOP: the host is partitioned from the server, its kernel keeps the
/// volume). After A's lease the server fences A and guest B attaches read-write (refused
/// before), writes, and from then on no byte of A reaches the image files: A's writes are
/// held by its kernel and fail after A's I/O timeout.
#[test]
fn a_partitioned_client_is_fenced_and_its_writes_never_land() {
    let setup = provision("fence-partition", &[], &["vf"], false);
    setup.server.add_client("host2", &["vf"]);
    let b_pattern = blocks::pattern("fence-b", 7, CANARY_REGION);
    fs::write(setup.dir.join("b.pattern"), &b_pattern).expect("pattern");

    let a_body = r#"# Canaries: block (i mod 256) of the first MiB gets "A-canary-i", direct and synced.
(
  i=0
  while [ ! -e $D/stop-writer ]; do
    if printf 'A-canary-%08d\n' $i | dd of=$dev bs=4096 seek=$((i % 256)) count=1 \
        oflag=direct conv=sync,notrunc,fsync status=none 2>>writer.err; then
      echo $i > last-written.txt
    else
      echo "canary $i failed" >> writer.err
    fi
    i=$((i + 1))
    [ $i -eq 20 ] && touch writing
  done
) &
WRITER=$!
wait_for $D/partition-a
kill -STOP $AGENT
touch partitioned
# The kernel holds A's writes once the lease lapses; status says so.
for i in $(seq 1 100); do
  $S --json status > held.json
  grep -q lease-lapsed held.json && break
  sleep 0.2
done
wait_for $D/stop-writer
wait $WRITER
$S --json status > final.json
kill -CONT $AGENT
$S detach vf || kill -9 $AGENT
"#;
    let a_config = dm_san::vm(
        &setup,
        "fence-partition-a",
        "vf",
        "--io-timeout 5",
        a_body,
        Duration::from_secs(400),
    );
    let server = &setup.server;
    let b_script = format!(
        r#"set -ex
{prologue}D={dir}
SERVER=10.0.2.100:{port}
IO_SERVER=10.0.2.100:{io_port}
wait_for $D/start-b
attempt() {{
  $S attach vf --server $SERVER --client host2 --secret-file $D/host2.secret \
      --device /dev/mapper/san0 --io-server $IO_SERVER > agent.log 2>&1 &
  AGENT=$!
  for j in $(seq 1 100); do
    [ -e /run/sanblk/vf.device ] && return 0
    kill -0 $AGENT 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}}
refused=0
until attempt; do
  refused=$((refused + 1))
  cat agent.log >> refusals.log
  [ $refused -lt 200 ] || exit 1
  sleep 0.2
done
echo $refused > refused.txt
touch attached
dev=$(cat /run/sanblk/vf.device)
wait_for $D/write-b
dd if=$D/b.pattern of=$dev bs=64K seek=16 oflag=direct conv=fsync status=none
touch written
$S detach vf
rmmod sanblk
dmsetup remove san0
"#,
        prologue = dm_san::prologue(&sanblk_tests::module_path()),
        dir = setup.dir.display(),
        port = server.port,
        io_port = server.io_port().expect("io port"),
    );
    let mut b_config = VmConfig::new("fence-partition-b", &b_script)
        .forward_port(server.port)
        .forward_port(server.io_port().expect("io port"))
        .timeout(Duration::from_secs(400));
    for image in &setup.images {
        b_config = b_config.disk(image);
    }

    let a = spawn(&a_config).expect("guest A started");
    let b = spawn(&b_config).expect("guest B started");
    assert!(
        wait_for_guest_file(&a, "writing", Duration::from_secs(300)),
        "guest A never wrote its canaries"
    );
    touch(&setup.dir.join("partition-a"));
    assert!(wait_for_guest_file(
        &a,
        "partitioned",
        Duration::from_secs(60)
    ));
    let partitioned = Instant::now();
    touch(&setup.dir.join("start-b"));
    assert!(
        wait_for_guest_file(&b, "attached", Duration::from_secs(120)),
        "guest B never attached read-write after A was fenced"
    );
    let takeover = partitioned.elapsed();
    // B holds the volume: whatever A's region holds now must stay, A being fenced.
    let map = setup.server.volume("vf").map;
    let fenced_canaries = volume_bytes(&map, &setup.by_uuid, 0, CANARY_REGION);
    touch(&setup.dir.join("write-b"));
    assert!(wait_for_guest_file(&b, "written", Duration::from_secs(120)));
    // Longer than A's I/O timeout: held writes have failed (or would have landed) by now.
    std::thread::sleep(Duration::from_secs(8));
    touch(&setup.dir.join("stop-writer"));
    let b_outcome = b.wait().expect("guest B ran");
    let a_outcome = a.wait().expect("guest A ran");
    b_outcome.assert_clean_success();
    a_outcome.assert_clean_success();

    let refused: u32 = b_outcome
        .read_out_file("refused.txt")
        .expect("refused.txt")
        .trim()
        .parse()
        .expect("refusal count");
    assert!(
        refused > 0,
        "B attached read-write while A still held the volume (A's slot was not kept for its lease)"
    );
    assert!(
        takeover >= Duration::from_secs(3),
        "B attached {takeover:?} after A's partition, before A's lease could lapse"
    );
    assert!(
        takeover < DEFAULT_FENCE_DELAY + Duration::from_secs(20),
        "B attached only {takeover:?} after A's partition"
    );
    let held = a_outcome.out_json("held.json");
    assert!(
        held["volumes"][0]["hold_reason"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r == "lease-lapsed")),
        "A's kernel did not report its lease lapsed: {held}"
    );
    let final_status = a_outcome.out_json("final.json");
    assert!(
        final_status["volumes"][0]["timed_out_ios"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "A's held writes did not fail after its I/O timeout: {final_status}"
    );
    let writer_errors = a_outcome.read_out_file("writer.err").unwrap_or_default();
    assert!(
        writer_errors.contains("failed"),
        "A's writer saw no failure: {writer_errors}"
    );

    let map = setup.server.volume("vf").map;
    let canaries_now = volume_bytes(&map, &setup.by_uuid, 0, CANARY_REGION);
    let changed: Vec<u64> = (0..CANARY_REGION / BLOCK)
        .filter(|i| {
            let range = (i * BLOCK) as usize..((i + 1) * BLOCK) as usize;
            canaries_now[range.clone()] != fenced_canaries[range]
        })
        .collect();
    assert!(
        changed.is_empty(),
        "A's writes landed after it was fenced, in blocks {changed:?}"
    );
    assert!(
        fenced_canaries.windows(9).any(|w| w == b"A-canary-"),
        "no canary of A landed before the partition"
    );
    blocks::verify_range(&map, &setup.by_uuid, CANARY_REGION, &b_pattern);
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
