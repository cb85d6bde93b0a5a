//! `make bench` (data path): fio in one guest, one run, equal-sized targets on three identical
//! virtio disks: the raw disk, dm-linear over a disk, and a sanblk linear volume over a disk.
//! Prints a markdown table of throughput and the ratios against raw and dm-linear per run:
//! with the disks unthrottled (under TCG the emulated CPU and QEMU's emulation of the virtio
//! disks are then the bottleneck, and each driver's CPU cost per I/O counts, magnified), the
//! same on QEMU's instruction-counting clock (CPU cost counted in guest instructions), and with
//! every disk throttled by QEMU to the same service limit (the device is the bottleneck, as a
//! SAN LUN is on real hardware; the table measures what each driver delivers of its capacity).
//! Settings: SANBLK_BENCH_RUNTIME, SANBLK_BENCH_ROUNDS, SANBLK_BENCH_CPUS (guest vCPUs,
//! default 2), SANBLK_BENCH_DEVICE_IOPS and SANBLK_BENCH_DEVICE_MIBPS (the throttled run's
//! limit, default 4000 IOPS and 300 MiB/s; 0 IOPS skips that run), SANBLK_BENCH_ICOUNT_SHIFT
//! (a third run, unthrottled, on QEMU's instruction-counting clock at 2^shift ns per guest
//! instruction, default 3; 0 skips it: CPU-bound throughput in guest instructions, free of the
//! host's speed swings that move the plain unthrottled run ±20 %), SANBLK_BENCH_WALL_CLOCK=0
//! (skips the plain unthrottled run), SANBLK_BENCH_IO_URING=1 (fio's io_uring engine instead
//! of libaio: REQ_NOWAIT issue inline), SANBLK_BENCH_PROFILE=1 (after the rounds of the
//! instruction-clock run, or of the wall-clock run if that one is skipped, one more 4 KiB
//! random-read run per target under `perf record -a` in the guest; prints each target's
//! hottest symbols, which on the instruction clock weigh guest instructions).
//! `make bench` boots the non-debug bench kernel (SANBLK_BENCH_KERNEL, a bzImage) with a
//! module built for it (SANBLK_BENCH_MODULE); without them, the debug test kernel and module.

use std::process::ExitCode;
use std::time::Duration;

use sanblk_tests::bench::{self, setting};
use sanblk_tests::fio::{self, JOBS};
use sanblk_tests::{filled_image, run, scratch_dir, target_bin, Disk, GuestOutcome, VmConfig};

const MIB: u64 = 1 << 20;
const TARGET_MIB: u64 = 256;

const TARGETS: [(&str, &str); 3] = [
    ("raw", "/dev/vda"),
    ("dm-linear", "/dev/mapper/bench-linear"),
    ("sanblk", "/dev/sanblk0"),
];

struct Settings {
    runtime_s: u32,
    rounds: u32,
    cpus: u32,
    engine: fio::Engine,
    profile: bool,
}

/// fio's size argument for `target`: the raw disk is larger than the others' 256 MiB.
fn size_arg(target: &str) -> String {
    if target == "raw" {
        format!("--size={TARGET_MIB}M")
    } else {
        String::new()
    }
}

/// The random-read job, the one profiled.
const PROFILED_JOB: usize = 2;
/// Lines of each target's perf report printed (symbols above 0.2 % of samples).
const PROFILE_LINES: usize = 40;

/// Guest commands profiling the random-read job once per target (round index `round`, after
/// the measured rounds); reports in `profile-<target>.txt`.
fn profile_script(engine: fio::Engine, runtime_s: u32, round: u32) -> String {
    let mut script = String::from(
        "echo 0 > /proc/sys/kernel/kptr_restrict\necho -1 > /proc/sys/kernel/perf_event_paranoid\n",
    );
    let job = &JOBS[PROFILED_JOB];
    for (target, device) in TARGETS {
        script.push_str(&format!(
            "perf record -q -a -F 997 -o /run/{target}.perf -- {fio}\
             perf report -i /run/{target}.perf --stdio --no-children --sort sym \
             --percent-limit 0.2 2>/dev/null | grep -v '^#' | grep -v '^$' > profile-{target}.txt\n",
            fio = fio::command(job, engine, target, device, &size_arg(target), runtime_s, round),
        ));
    }
    script
}

/// The profiled run's figure and hottest symbols per target, from [`profile_script`]'s files.
fn profile_report(outcome: &GuestOutcome, round: u32) -> Result<String, String> {
    let job = &JOBS[PROFILED_JOB];
    let mut report = format!(
        "\nProfile of {} (one more run per target under `perf record -a -F 997`):\n",
        job.name
    );
    for (target, _) in TARGETS {
        let json = outcome
            .read_out_file(&fio::output_name(target, job, round))
            .map_err(|e| format!("{target} profile run: {e}"))?;
        let symbols = outcome
            .read_out_file(&format!("profile-{target}.txt"))
            .map_err(|e| format!("{target} profile: {e}"))?;
        report.push_str(&format!(
            "\n{target}: {:.0} {}\n```\n",
            fio::value(&json, job.metric)?,
            job.metric.unit()
        ));
        for line in symbols.lines().take(PROFILE_LINES) {
            report.push_str(line.trim_end());
            report.push('\n');
        }
        report.push_str("```\n");
    }
    Ok(report)
}

/// A per-disk service limit: requests and bytes per second.
#[derive(Clone, Copy)]
struct Throttle {
    iops: u32,
    bytes_per_s: u64,
}

/// QEMU accepts shifts up to 10 (1 µs of guest time per instruction).
const MAX_ICOUNT_SHIFT: u32 = 10;

/// How the guest of one bench run is set up.
#[derive(Clone, Copy)]
enum RunKind {
    /// Disks unthrottled, guest on the host's clock (CPU-bound, host speed included).
    WallClock,
    /// Disks unthrottled, guest clock counting instructions at 2^shift ns each.
    InstructionClock { shift: u8 },
    /// Every disk limited to the same service rate (device-bound).
    Throttled(Throttle),
}

impl RunKind {
    /// Whether the profile is taken in this run: on the instruction clock, where perf's
    /// cpu-clock samples count guest instructions, unless that run is skipped.
    fn profiled(self, no_instruction_clock_run: bool) -> bool {
        match self {
            RunKind::InstructionClock { .. } => true,
            RunKind::WallClock => no_instruction_clock_run,
            RunKind::Throttled(_) => false,
        }
    }

    fn title(self) -> String {
        match self {
            RunKind::WallClock => "disks unthrottled (CPU-bound under TCG)".to_string(),
            RunKind::InstructionClock { shift } => format!(
                "disks unthrottled, guest clock counting instructions ({} ns each): CPU-bound, \
                 host speed taken out",
                1u32 << shift
            ),
            RunKind::Throttled(Throttle { iops, bytes_per_s }) => format!(
                "disks throttled to {iops} IOPS and {} MiB/s each (device-bound)",
                bytes_per_s / MIB
            ),
        }
    }
}

/// One bench guest of `kind`; `profile`: with the profiled run after the rounds.
fn run_bench(settings: &Settings, kind: RunKind, profile: bool) -> Result<String, String> {
    let Settings {
        runtime_s,
        rounds,
        cpus,
        engine,
        ..
    } = *settings;
    let dir = scratch_dir("bench-datapath").map_err(|e| e.to_string())?;
    for i in 0..3 {
        filled_image(&dir.join(format!("disk{i}.img")), (TARGET_MIB + 8) * MIB)
            .map_err(|e| e.to_string())?;
    }
    let sectors = TARGET_MIB * MIB / 512;
    let mut script = format!(
        "set -e\ninsmod {module}\n\
         dmsetup create bench-linear --table '0 {sectors} linear /dev/vdb 2048'\n\
         {probe} create bench 1 1 linear {TARGET_MIB} /dev/vdc\n",
        module = bench::module().display(),
        probe = target_bin("sanblk-nlprobe").display(),
    );
    // Same job order on every target, interleaved per job so drift affects all alike; the
    // whole round is repeated and the median reported.
    for round in 0..rounds {
        for job in &JOBS {
            for &(target, device) in fio::rotated(&TARGETS, round) {
                script.push_str(&fio::command(
                    job,
                    engine,
                    target,
                    device,
                    &size_arg(target),
                    runtime_s,
                    round,
                ));
            }
        }
    }
    if profile {
        script.push_str(&profile_script(engine, runtime_s, rounds));
    }
    script.push_str("dmsetup remove bench-linear\n");
    let mut config = VmConfig::new("bench-datapath", &script)
        .cpus(cpus)
        .timeout(Duration::from_secs(1200));
    if let RunKind::InstructionClock { shift } = kind {
        config = config.instruction_clock(shift);
    }
    for i in 0..3 {
        let path = dir.join(format!("disk{i}.img"));
        config = match kind {
            RunKind::Throttled(Throttle { iops, bytes_per_s }) => {
                config.disk_spec(Disk::ThrottledImageFile {
                    path,
                    iops,
                    bytes_per_s,
                })
            }
            _ => config.disk(path),
        };
    }
    let outcome = run(&bench::with_kernel(config)).map_err(|e| format!("{e:?}"))?;
    outcome.check_clean_success()?;
    let mut table = String::from(
        "| job | raw | dm-linear | sanblk | sanblk / raw | sanblk / dm-linear | dm-linear / raw \
         | per round sanblk / raw | per round sanblk / dm-linear |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for job in &JOBS {
        // samples[target][round]
        let mut samples: Vec<Vec<f64>> = Vec::new();
        for (target, _) in TARGETS {
            let mut per_round = Vec::new();
            for round in 0..rounds {
                let json = outcome
                    .read_out_file(&fio::output_name(target, job, round))
                    .map_err(|e| format!("{target} {}: {e}", job.name))?;
                per_round.push(fio::value(&json, job.metric)?);
            }
            samples.push(per_round);
        }
        let medians: Vec<f64> = samples.iter().map(|s| fio::median(s.clone())).collect();
        // Ratios of the same round: the targets ran back to back, so they share that
        // round's conditions on the host.
        let per_round = |over: usize| {
            (0..rounds as usize)
                .map(|r| format!("{:.2}", samples[2][r] / samples[over][r]))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let unit = job.metric.unit();
        table.push_str(&format!(
            "| {} | {:.1} {unit} | {:.1} {unit} | {:.1} {unit} | {:.3} | {:.3} | {:.3} | {} | {} |\n",
            job.name,
            medians[0],
            medians[1],
            medians[2],
            medians[2] / medians[0],
            medians[2] / medians[1],
            medians[1] / medians[0],
            per_round(0),
            per_round(1),
        ));
    }
    if profile {
        table.push_str(&profile_report(&outcome, rounds)?);
    }
    Ok(table)
}

fn main() -> ExitCode {
    let icount_shift = setting("SANBLK_BENCH_ICOUNT_SHIFT", 3);
    let settings = Settings {
        runtime_s: setting("SANBLK_BENCH_RUNTIME", 6),
        rounds: setting("SANBLK_BENCH_ROUNDS", 3).max(1),
        cpus: setting("SANBLK_BENCH_CPUS", 2).max(1),
        engine: if setting("SANBLK_BENCH_IO_URING", 0) == 1 {
            fio::Engine::IoUring
        } else {
            fio::Engine::Libaio
        },
        profile: setting("SANBLK_BENCH_PROFILE", 0) == 1,
    };
    let device_iops = setting("SANBLK_BENCH_DEVICE_IOPS", 4000);
    let device_mibps = setting("SANBLK_BENCH_DEVICE_MIBPS", 300).max(1);
    if icount_shift > MAX_ICOUNT_SHIFT {
        eprintln!(
            "SANBLK_BENCH_ICOUNT_SHIFT={icount_shift}: at most {MAX_ICOUNT_SHIFT} \
             (guest time 2^shift ns per instruction), or 0 to skip that run"
        );
        return ExitCode::FAILURE;
    }
    println!(
        "fio ({}): {} rounds of {} s per job and target, {} vCPUs; medians",
        settings.engine.name(),
        settings.rounds,
        settings.runtime_s,
        settings.cpus
    );
    let mut runs = Vec::new();
    if setting("SANBLK_BENCH_WALL_CLOCK", 1) != 0 {
        runs.push(RunKind::WallClock);
    }
    if icount_shift > 0 {
        runs.push(RunKind::InstructionClock {
            shift: icount_shift as u8,
        });
    }
    if device_iops > 0 {
        runs.push(RunKind::Throttled(Throttle {
            iops: device_iops,
            bytes_per_s: u64::from(device_mibps) * MIB,
        }));
    }
    for kind in runs {
        let title = kind.title();
        let profile = settings.profile && kind.profiled(icount_shift == 0);
        match run_bench(&settings, kind, profile) {
            Ok(table) => println!("### {title}\n\n{table}"),
            Err(e) => {
                eprintln!("benchmark failed ({title}): {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
