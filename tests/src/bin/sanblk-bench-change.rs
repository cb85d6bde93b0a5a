//! `make bench` (safe change, issue 15): the application I/O pause per configuration change.
//!
//! A real `sand` on the host, guest A attached read-write to volume `vc`. Each round runs
//! `sanblk-iostamp` (O_DIRECT 4 KiB writes one at a time, CLOCK_MONOTONIC stamps) around one
//! change, and the figure is its longest completion gap from the change's start: how long the
//! application saw no I/O complete while the change quiesced the clients, committed and
//! resumed. The change is `sanctl grow vc SIZE` run in the guest (the client-side grow: the
//! server's change protocol, QUIESCE to every attached client, commit, publish, RESUME).
//!
//! - floor: the same loop on a dm-linear device of another virtio disk around `dmsetup
//!   suspend` and `dmsetup resume` (what a device-mapper table change costs an application,
//!   as LVM and pvmove do it), in the same guest;
//! - one client: A alone;
//! - two clients: guest B attached read-only as well (QUIESCE waits for both acks);
//! - partition: B's agent stopped; the host times `sanctl volume grow`, which commits once
//!   B's lease plus the in-flight bound has run out (default settings).
//!
//! First, fio throughput during a live move: the same fio job (4 KiB random writes, libaio,
//! QD 32, 20 s) once without and once while the host moves the volume to another disk with
//! `sanctl volume move` (copy capped at 1 MiB/s by `sand --recovery-max-rate`, so the 16 MiB
//! copy spans the job; writes to the syncing extents go through the server meanwhile).
//!
//! Settings: SANBLK_BENCH_CHANGES (rounds per configuration, default 20), SANBLK_BENCH_KERNEL
//! and SANBLK_BENCH_MODULE (as for `sanblk-bench-datapath`).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use sanblk_tests::bench::{self, setting};
use sanblk_tests::dm_san::WAIT_LONG;
use sanblk_tests::{
    dm_san, filled_image, fio, scratch_dir, spawn, target_bin, wait_for_path, SandServer, VmConfig,
};

const MIB: u64 = 1 << 20;
const VOLUME_MIB: u64 = 16;

/// The `max_gap_ms` of each `sanblk-iostamp` line of `text`, and the I/O errors they saw.
fn gaps(text: &str) -> Result<(Vec<f64>, u64), String> {
    let mut gaps = Vec::new();
    let mut errors = 0;
    // The change command's own output shares the file; the stamps are the JSON lines.
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{line}: {e}"))?;
        gaps.push(
            v["max_gap_ms"]
                .as_f64()
                .ok_or_else(|| format!("{line}: no max_gap_ms"))?,
        );
        errors += v["errors"].as_u64().unwrap_or(0);
    }
    if gaps.is_empty() {
        return Err("no rounds".into());
    }
    Ok((gaps, errors))
}

fn run_bench(changes: u32) -> Result<String, String> {
    let dir = scratch_dir("bench-change").map_err(|e| e.to_string())?;
    let server = SandServer::start_with_args(&dir, &["--recovery-max-rate", "1M"])?;
    let io_port = server.io_port()?;
    let san = dir.join("san0.img");
    let san1 = dir.join("san1.img");
    let floor = dir.join("floor.img");
    let fill = |path: &Path, bytes: u64| {
        filled_image(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
    };
    fill(&san, (VOLUME_MIB + 2 * u64::from(changes) + 16) * MIB)?;
    fill(&floor, VOLUME_MIB * MIB)?;
    fill(&san1, (VOLUME_MIB + 2 * u64::from(changes) + 16) * MIB)?;
    server.pool_add(&san);
    server.sanctl(&["volume", "create", "vc", &format!("{VOLUME_MIB}M")]);
    server.pool_add(&san1);
    let secret = server.add_client("host1", &["vc"]);
    let secret_b = dir.join("host2.secret");
    server.sanctl(&[
        "client",
        "add",
        "host2",
        "--secret-out",
        &secret_b.display().to_string(),
    ]);
    server.sanctl(&["client", "grant", "host2", "vc", "ro"]);

    let stamp = target_bin("sanblk-iostamp");
    let rounds = |config: &str, first_size: u64| {
        let mut lines = String::new();
        for round in 0..u64::from(changes) {
            lines.push_str(&format!(
                "$STAMP --device $dev --fault \"$S grow vc {}M > /dev/null\" >> pause-{config}.jsonl\n",
                first_size + round
            ));
        }
        lines
    };
    let mut script = format!(
        r#"set -e
{prologue}STAMP={stamp}
D={dir}
{WAIT_LONG}
$S attach vc --server 10.0.2.100:{port} --client host1 --secret-file {secret} \
    --device /dev/mapper/san0 --device /dev/vdb --io-server 10.0.2.100:{io_port} > agent.log 2>&1 &
wait_for /run/sanblk/vc.device
dev=$(cat /run/sanblk/vc.device)
job() {{
    fio --name=$1 --filename=$dev --direct=1 --ioengine=libaio --iodepth=32 --rw=randwrite \
        --bs=4k --size={VOLUME_MIB}M --time_based --runtime=20 --randrepeat=0 \
        --output-format=json --output=fio-$1.json
}}
job still
touch move.ready
job moving
wait_long $D/moved
dmsetup create floor --table "0 $(blockdev --getsz /dev/vdc) linear /dev/vdc 0"
for round in $(seq 1 {changes}); do
    $STAMP --device /dev/mapper/floor --fault "dmsetup suspend floor && dmsetup resume floor" >> pause-floor.jsonl
done
dmsetup remove floor
"#,
        prologue = dm_san::prologue(&bench::module()),
        stamp = stamp.display(),
        dir = dir.display(),
        port = server.port,
        secret = secret.display(),
    );
    script.push_str(&rounds("one", VOLUME_MIB + 1));
    script.push_str("touch one.done\nwait_long $D/b-attached\n");
    script.push_str(&rounds("two", VOLUME_MIB + 1 + u64::from(changes)));
    script.push_str("touch two.done\nwait_long $D/partition-done\n$S --json status > status.json\n$S detach vc\n");
    let config = VmConfig::new("bench-change-a", &script)
        .disk(&san)
        .disk(&san1)
        .disk(&floor)
        .forward_port(server.port)
        .forward_port(io_port)
        .timeout(Duration::from_secs(3000));
    let a = spawn(&bench::with_kernel(config)).map_err(|e| format!("{e:?}"))?;
    wait_for_path(&a.log_dir().join("move.ready"), Duration::from_secs(600))?;
    let (from, to) = (san.display().to_string(), san1.display().to_string());
    let move_started = Instant::now();
    server.sanctl(&["volume", "move", "vc", "--from", &from, "--to", &to]);
    let move_took = move_started.elapsed();
    std::fs::write(dir.join("moved"), b"").map_err(|e| e.to_string())?;
    wait_for_path(&a.log_dir().join("one.done"), Duration::from_secs(2400))?;

    let b_script = format!(
        r#"set -e
{prologue}D={dir}
{WAIT_LONG}
$S attach vc --ro --server 10.0.2.100:{port} --client host2 --secret-file $D/host2.secret \
    --device /dev/mapper/san0 --device /dev/vdb --io-server 10.0.2.100:{io_port} > agent.log 2>&1 &
AGENT=$!
wait_for /run/sanblk/vc.device
touch attached
wait_long $D/b-partition
kill -STOP $AGENT
touch stopped
wait_long $D/partition-done
kill -CONT $AGENT
$S detach vc || true
"#,
        prologue = dm_san::prologue(&bench::module()),
        dir = dir.display(),
        port = server.port,
    );
    let b_config = VmConfig::new("bench-change-b", &b_script)
        .disk(&san)
        .disk(&san1)
        .forward_port(server.port)
        .forward_port(io_port)
        .timeout(Duration::from_secs(3000));
    let b = spawn(&bench::with_kernel(b_config)).map_err(|e| format!("{e:?}"))?;
    // Guests write only their own output directories: the host relays.
    wait_for_path(&b.log_dir().join("attached"), Duration::from_secs(600))?;
    std::fs::write(dir.join("b-attached"), b"").map_err(|e| e.to_string())?;
    wait_for_path(&a.log_dir().join("two.done"), Duration::from_secs(2400))?;
    std::fs::write(dir.join("b-partition"), b"").map_err(|e| e.to_string())?;
    wait_for_path(&b.log_dir().join("stopped"), Duration::from_secs(60))?;
    let partitioned = Instant::now();
    let size = VOLUME_MIB + 2 * u64::from(changes) + 1;
    server.sanctl(&["volume", "grow", "vc", &format!("{size}M")]);
    let partition_to_commit = partitioned.elapsed();
    std::fs::write(dir.join("partition-done"), b"").map_err(|e| e.to_string())?;
    let a = a.wait().map_err(|e| format!("{e:?}"))?;
    let b = b.wait().map_err(|e| format!("{e:?}"))?;
    a.check_clean_success()?;
    b.check_clean_success()?;
    println!(
        "guest logs: {} {}",
        a.log_dir.display(),
        b.log_dir.display()
    );

    let read = |name: &str| a.read_out_file(name).map_err(|e| format!("{name}: {e}"));
    let iops = |name: &str| fio::value(&read(name)?, fio::Metric::WriteIops);
    let (still, moving) = (iops("fio-still.json")?, iops("fio-moving.json")?);
    let mut report = String::from(
        "### fio during a live move\n\n\
         | job | without a move | during the move | during / without |\n|---|---|---|---|\n",
    );
    report.push_str(&format!(
        "| rand-write 4 KiB QD32, 20 s | {still:.0} IOPS | {moving:.0} IOPS | {:.2} |\n\n",
        moving / still
    ));
    report.push_str(&format!(
        "The move (16 MiB at 1 MiB/s) took {:.1} s of the job's 20 s.\n\n",
        move_took.as_secs_f64()
    ));
    let (floor, floor_errors) = gaps(&read("pause-floor.jsonl")?)?;
    let floor_p50 = fio::quantile(floor.clone(), 0.5);
    let floor_p99 = fio::quantile(floor.clone(), 0.99);
    report.push_str(&format!(
        "### Application I/O pause per change (longest completion gap from the change's start)\n\n\
         | configuration | rounds | p50 ms | p99 ms | max ms | p50 / floor p50 | p99 / floor p99 | I/O errors |\n\
         |---|---|---|---|---|---|---|---|\n\
         | floor: dm-linear suspend + resume | {} | {floor_p50:.1} | {floor_p99:.1} | {:.1} | 1.00 | 1.00 | {floor_errors} |\n",
        floor.len(),
        fio::quantile(floor.clone(), 1.0),
    ));
    for (config, name) in [
        ("one", "sanblk, one client"),
        ("two", "sanblk, two clients"),
    ] {
        let (pauses, errors) = gaps(&read(&format!("pause-{config}.jsonl"))?)?;
        let p50 = fio::quantile(pauses.clone(), 0.5);
        let p99 = fio::quantile(pauses.clone(), 0.99);
        report.push_str(&format!(
            "| {name} | {} | {p50:.1} | {p99:.1} | {:.1} | {:.2} | {:.2} | {errors} |\n",
            pauses.len(),
            fio::quantile(pauses.clone(), 1.0),
            p50 / floor_p50,
            p99 / floor_p99,
        ));
    }
    report.push_str(&format!(
        "\nPartition to committed change (B's agent stopped, `sanctl volume grow` on the host, \
         default lease): {:.2} s\n",
        partition_to_commit.as_secs_f64()
    ));
    Ok(report)
}

fn main() -> ExitCode {
    let changes = setting("SANBLK_BENCH_CHANGES", 20).max(1);
    println!("change bench: {changes} changes per configuration");
    match run_bench(changes) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}
