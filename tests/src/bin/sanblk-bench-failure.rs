//! `make bench` (failure path, issue #5): one guest, a real `sand` on the host.
//!
//! 1. Stall from a SAN disk fault to redirected service. The guest's "SAN disk" is a dm device
//!    over the virtio disk. Every round attaches a fresh volume (through the agent), then runs
//!    `sanblk-iostamp` (O_DIRECT 4 KiB writes in a loop, CLOCK_MONOTONIC stamps) twice:
//!    first around a no-op `dmsetup resume` of the same linear table (the baseline: what a dm
//!    table swap costs by itself), then around the resume that loads the error table (the
//!    fault). Reports p50/p99/max of the stall (fault start to the completion of the first I/O
//!    submitted after it) and of the longest completion gap, fault and baseline side by side.
//! 2. Redirected-path throughput against the Linux nbd client: a volume whose device has
//!    failed (every I/O goes over the kernel's TCP client to sand's I/O service) against
//!    `/dev/nbd0` connected (`nbd-client`) to `qemu-nbd --cache=none` serving an image of the
//!    same size on the same host filesystem, both over the same QEMU user networking. fio
//!    jobs of the data-path bench, rounds alternating which target goes first, medians.
//!
//! Settings: SANBLK_BENCH_FAULTS (rounds of part 1, default 20), SANBLK_BENCH_RUNTIME (s per
//! fio job, default 6), SANBLK_BENCH_ROUNDS (fio rounds, default 3), SANBLK_BENCH_KERNEL and
//! SANBLK_BENCH_MODULE (as for `sanblk-bench-datapath`).

use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use sanblk_tests::bench::{self, setting};
use sanblk_tests::fio::{self, JOBS};
use sanblk_tests::server::free_port;
use sanblk_tests::{dm_san, filled_image, run, scratch_dir, target_bin, SandServer, VmConfig};

const MIB: u64 = 1 << 20;
/// Size of each part-1 volume.
const FAULT_VOLUME_MIB: u64 = 16;
/// Size of the part-2 volume and of the nbd image.
const TPUT_MIB: u64 = 256;

/// Kills and reaps a child process when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `qemu-nbd` serving `image` as export `bench` on 127.0.0.1:`port`, O_DIRECT like sand.
fn start_qemu_nbd(image: &Path, port: u16, log: &Path) -> Result<ChildGuard, String> {
    let log = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new("qemu-nbd")
        .args([
            "--format=raw",
            "--export-name=bench",
            "--persistent",
            "--cache=none",
        ])
        .arg("--bind=127.0.0.1")
        .arg(format!("--port={port}"))
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start qemu-nbd: {e}"))?;
    let guard = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err("qemu-nbd did not listen".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(guard)
}

struct Settings {
    faults: u32,
    runtime_s: u32,
    rounds: u32,
}

/// Beside the data-path jobs: random 4 KiB reads one at a time, the round-trip latency of
/// each path without pipelining (tells per-request cost from pipelining depth).
const QD1: fio::Job = fio::Job {
    name: "rand-read-4k-qd1",
    args: "--rw=randread --bs=4k --iodepth=1",
    metric: fio::Metric::ReadIops,
};

fn tput_jobs() -> impl Iterator<Item = &'static fio::Job> {
    JOBS.iter().chain(std::iter::once(&QD1))
}

const TPUT_TARGETS: [(&str, &str); 2] = [("sanblk-redirected", "$TPUT"), ("nbd", "/dev/nbd0")];

fn script(
    settings: &Settings,
    server: &SandServer,
    io_port: u16,
    nbd_port: u16,
    secret: &Path,
) -> Result<String, String> {
    let mut script = format!(
        r#"set -e
{prologue}STAMP={stamp}
attach() {{
    $S attach $1 --server 10.0.2.100:{port} --client host1 --secret-file {secret} \
        --device /dev/mapper/san0 --io-server 10.0.2.100:{io_port} > agent-$1.log 2>&1 &
    wait_for /run/sanblk/$1.device
}}
"#,
        prologue = dm_san::prologue(&bench::module()),
        stamp = target_bin("sanblk-iostamp").display(),
        port = server.port,
        secret = secret.display(),
    );
    for round in 0..settings.faults {
        script.push_str(&format!(
            r#"attach f{round}
dev=$(cat /run/sanblk/f{round}.device)
dmsetup reload san0 --table "$LINEAR"
$STAMP --device $dev --fault "dmsetup resume san0" >> stall-noop.jsonl
dmsetup reload san0 --table "$ERROR"
$STAMP --device $dev --fault "dmsetup resume san0" >> stall-fault.jsonl
$S --json status > status-f{round}.json
$S detach f{round}
dmsetup reload san0 --table "$LINEAR"
dmsetup resume san0
"#
        ));
    }
    script.push_str(&format!(
        r#"attach tput
TPUT=$(cat /run/sanblk/tput.device)
dmsetup reload san0 --table "$ERROR"
dmsetup resume san0
# The first failed write marks the device failed: from then on all I/O takes the server path.
dd if=/dev/zero of=$TPUT bs=4k count=1 oflag=direct status=none
$S --json status > status-tput.json
nbd-client 10.0.2.100 {nbd_port} /dev/nbd0 -N bench > nbd-client.log 2>&1
"#
    ));
    for round in 0..settings.rounds {
        for job in tput_jobs() {
            for &(target, device) in fio::rotated(&TPUT_TARGETS, round) {
                script.push_str(&fio::command(
                    job,
                    fio::Engine::Libaio,
                    target,
                    device,
                    "",
                    settings.runtime_s,
                    round,
                ));
            }
        }
    }
    script.push_str(
        "$S --json status > status-tput-end.json\nnbd-client -d /dev/nbd0\n$S detach tput\n",
    );
    Ok(script)
}

/// One `sanblk-iostamp` line.
struct Stall {
    inject_ms: f64,
    stall_ms: f64,
    after_ms: f64,
    max_gap_ms: f64,
    errors: u64,
}

fn stalls(text: &str) -> Result<Vec<Stall>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("{line}: {e}"))?;
            let f = |key: &str| v[key].as_f64().ok_or_else(|| format!("{line}: no {key}"));
            Ok(Stall {
                inject_ms: f("inject_ms")?,
                stall_ms: f("stall_ms")?,
                after_ms: f("after_ms")?,
                max_gap_ms: f("max_gap_ms")?,
                errors: v["errors"]
                    .as_u64()
                    .ok_or_else(|| format!("{line}: no errors"))?,
            })
        })
        .collect()
}

/// Which figure of a [`Stall`] a table row shows.
type Pick = fn(&Stall) -> f64;

fn stall_table(fault: &[Stall], noop: &[Stall]) -> String {
    let stats = |samples: &[Stall], pick: Pick| {
        let values: Vec<f64> = samples.iter().map(pick).collect();
        (
            fio::quantile(values.clone(), 0.5),
            fio::quantile(values.clone(), 0.99),
            fio::quantile(values, 1.0),
        )
    };
    let mut table = String::from(
        "| ms | fault p50 | fault p99 | fault max | no-op resume p50 | no-op p99 | no-op max |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let rows: [(&str, Pick); 4] = [
        ("fault start -> first redirected I/O done", |s| s.stall_ms),
        ("resume end -> first redirected I/O done", |s| s.after_ms),
        ("longest completion gap from fault start", |s| s.max_gap_ms),
        ("dmsetup resume itself", |s| s.inject_ms),
    ];
    for (name, pick) in rows {
        let (a, b, c) = stats(fault, pick);
        let (d, e, f) = stats(noop, pick);
        table.push_str(&format!(
            "| {name} | {a:.1} | {b:.1} | {c:.1} | {d:.1} | {e:.1} | {f:.1} |\n"
        ));
    }
    let errors: u64 = fault.iter().chain(noop).map(|s| s.errors).sum();
    table.push_str(&format!(
        "\n{} fault rounds, {} baseline rounds; I/O errors seen by the writer: {errors}\n",
        fault.len(),
        noop.len()
    ));
    table
}

fn run_bench(settings: &Settings) -> Result<String, String> {
    let dir = scratch_dir("bench-failure").map_err(|e| e.to_string())?;
    let server = SandServer::start(&dir)?;
    let io_port = server.io_port()?;
    let san = dir.join("san0.img");
    let nbd_image = dir.join("nbd.img");
    let fill = |path: &Path, bytes: u64| {
        filled_image(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
    };
    fill(
        &san,
        (u64::from(settings.faults) * FAULT_VOLUME_MIB + TPUT_MIB + 64) * MIB,
    )?;
    fill(&nbd_image, TPUT_MIB * MIB)?;
    server.pool_add(&san);
    let mut volumes: Vec<(String, u64)> = (0..settings.faults)
        .map(|i| (format!("f{i}"), FAULT_VOLUME_MIB))
        .collect();
    volumes.push(("tput".into(), TPUT_MIB));
    for (name, mib) in &volumes {
        server.sanctl(&["volume", "create", name, &format!("{mib}M")]);
    }
    let names: Vec<&str> = volumes.iter().map(|(name, _)| name.as_str()).collect();
    let secret = server.add_client("host1", &names);
    let nbd_port = free_port().map_err(|e| format!("free port: {e}"))?;
    let _nbd = start_qemu_nbd(&nbd_image, nbd_port, &dir.join("qemu-nbd.log"))?;

    let script = script(settings, &server, io_port, nbd_port, &secret)?;
    let config = VmConfig::new("bench-failure", &script)
        .disk(&san)
        .forward_port(server.port)
        .forward_port(io_port)
        .forward_port(nbd_port)
        .timeout(Duration::from_secs(3000));
    let outcome = run(&bench::with_kernel(config)).map_err(|e| format!("{e:?}"))?;
    outcome.check_clean_success()?;
    println!("guest log: {}", outcome.log_dir.display());

    let read = |name: &str| {
        outcome
            .read_out_file(name)
            .map_err(|e| format!("{name}: {e}"))
    };
    let mut report = String::from("### Stall from SAN disk fault to redirected I/O\n\n");
    report.push_str(&stall_table(
        &stalls(&read("stall-fault.jsonl")?)?,
        &stalls(&read("stall-noop.jsonl")?)?,
    ));
    let status: serde_json::Value = serde_json::from_str(&read("status-tput-end.json")?)
        .map_err(|e| format!("status-tput-end.json: {e}"))?;
    let volume = &status["volumes"][0];
    if volume["devices"][0]["state"] != "failed" {
        return Err(format!(
            "the throughput volume's device is not failed: {volume}"
        ));
    }
    report.push_str(&format!(
        "\n### Redirected path vs nbd (device failed, {} redirected I/Os)\n\n\
         | job | sanblk redirected | nbd (qemu-nbd) | sanblk / nbd | per round (sanblk / nbd) |\n\
         |---|---|---|---|---|\n",
        volume["redirected_ios"]
    ));
    for job in tput_jobs() {
        let mut samples = [Vec::new(), Vec::new()];
        for (side, (target, _)) in samples.iter_mut().zip(TPUT_TARGETS) {
            for round in 0..settings.rounds {
                let json = read(&fio::output_name(target, job, round))?;
                side.push(fio::value(&json, job.metric)?);
            }
        }
        let per_round: Vec<String> = samples[0]
            .iter()
            .zip(&samples[1])
            .map(|(ours, theirs)| format!("{:.2}", ours / theirs))
            .collect();
        let [ours, theirs] = samples.map(fio::median);
        let unit = job.metric.unit();
        report.push_str(&format!(
            "| {} | {ours:.1} {unit} | {theirs:.1} {unit} | {:.3} | {} |\n",
            job.name,
            ours / theirs,
            per_round.join(" ")
        ));
    }
    Ok(report)
}

fn main() -> ExitCode {
    let settings = Settings {
        faults: setting("SANBLK_BENCH_FAULTS", 20).max(1),
        runtime_s: setting("SANBLK_BENCH_RUNTIME", 6),
        rounds: setting("SANBLK_BENCH_ROUNDS", 3).max(1),
    };
    println!(
        "failure bench: {} fault rounds; fio {} rounds of {} s per job and target; medians",
        settings.faults, settings.rounds, settings.runtime_s
    );
    match run_bench(&settings) {
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
