//! `sanblk-iostamp`: the guest side of the failure-stall benchmark (`sanblk-bench-failure`).
//!
//! Issues O_DIRECT 4 KiB I/O to a block device in a loop (one at a time, sequential offsets in
//! the first `--span-mib`), stamping each submission and completion with CLOCK_MONOTONIC.
//! After `--fault-after-ms` it runs the `--fault` command (e.g. `dmsetup resume san0` with an
//! error table loaded) in another thread, stamping its start and end, and keeps the I/O going
//! for `--run-after-ms` more. Prints one JSON line:
//!
//! - `inject_ms`: how long the fault command took (a dm resume suspends the device meanwhile);
//! - `stall_ms`: from the start of the fault command to the completion of the first I/O that
//!   was submitted after the command ended (that I/O met the error table, or went straight to
//!   the server path): the stall an application sees from the fault to redirected service;
//! - `after_ms`: from the end of the fault command to that completion (the latency of the
//!   first I/O that met the fault: failure detection plus the trip over the server path);
//! - `max_gap_ms`: the longest time without a completion from the fault command's start on;
//! - `gap_before_ms`: the same before the fault (the loop's normal jitter);
//! - `ios`, `errors` (an I/O error is counted, not retried).

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;

const BLOCK: usize = 4096;

#[derive(Debug, Parser)]
#[command(
    name = "sanblk-iostamp",
    about = "Timestamp O_DIRECT 4 KiB I/O around an injected fault"
)]
struct Args {
    /// The block device.
    #[arg(long)]
    device: PathBuf,
    /// Read instead of write.
    #[arg(long)]
    read: bool,
    /// Offsets cycle through the first this many MiB of the device.
    #[arg(long, default_value_t = 8)]
    span_mib: u64,
    /// Shell command injecting the fault (run with `sh -c`).
    #[arg(long)]
    fault: String,
    #[arg(long, default_value_t = 1000)]
    fault_after_ms: u64,
    #[arg(long, default_value_t = 2000)]
    run_after_ms: u64,
}

/// CLOCK_MONOTONIC in nanoseconds.
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A page-aligned 4 KiB buffer for O_DIRECT.
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

struct Stamp {
    submitted: u64,
    completed: u64,
}

#[derive(Default)]
struct Fault {
    start: u64,
    end: u64,
    failed: Option<String>,
}

fn measure(args: &Args) -> Result<String, String> {
    let file = OpenOptions::new()
        .read(true)
        .write(!args.read)
        .custom_flags(libc::O_DIRECT)
        .open(&args.device)
        .map_err(|e| format!("{}: {e}", args.device.display()))?;
    let blocks = (args.span_mib << 20) / BLOCK as u64;
    if blocks == 0 {
        return Err("--span-mib must be positive".into());
    }
    let mut buf = Box::new(Block([0u8; BLOCK]));
    for (i, byte) in buf.0.iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(31);
    }
    let fault = Arc::new(Mutex::new(Fault::default()));
    let injected = Arc::new(AtomicBool::new(false));
    let injector = {
        let (fault, injected) = (fault.clone(), injected.clone());
        let (command, delay) = (args.fault.clone(), args.fault_after_ms);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay));
            let start = now_ns();
            let status = Command::new("sh").arg("-c").arg(&command).status();
            let end = now_ns();
            let mut fault = fault.lock().unwrap_or_else(|p| p.into_inner());
            fault.start = start;
            fault.end = end;
            fault.failed = match status {
                Ok(s) if s.success() => None,
                Ok(s) => Some(format!("{command}: {s}")),
                Err(e) => Some(format!("{command}: {e}")),
            };
            injected.store(true, Ordering::Release);
        })
    };
    let mut stamps: Vec<Stamp> = Vec::with_capacity(1 << 16);
    let mut errors = 0u64;
    let mut stop_at = u64::MAX;
    let mut block = 0u64;
    loop {
        let submitted = now_ns();
        if submitted >= stop_at {
            break;
        }
        let offset = (block % blocks) * BLOCK as u64;
        let result = if args.read {
            file.read_exact_at(&mut buf.0, offset)
        } else {
            file.write_all_at(&buf.0, offset)
        };
        let completed = now_ns();
        if result.is_err() {
            errors += 1;
        }
        stamps.push(Stamp {
            submitted,
            completed,
        });
        block += 1;
        if stop_at == u64::MAX && injected.load(Ordering::Acquire) {
            let end = fault.lock().unwrap_or_else(|p| p.into_inner()).end;
            stop_at = end + args.run_after_ms * 1_000_000;
        }
    }
    injector
        .join()
        .map_err(|_| "fault thread panicked".to_string())?;
    let fault = fault.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(failed) = &fault.failed {
        return Err(failed.clone());
    }
    let ms = |ns: u64| ns as f64 / 1e6;
    let first_after = stamps
        .iter()
        .find(|s| s.submitted >= fault.end)
        .ok_or("no I/O was submitted after the fault")?;
    let mut previous = stamps.first().map(|s| s.submitted).unwrap_or(0);
    let (mut gap_before, mut max_gap) = (0u64, 0u64);
    for stamp in &stamps {
        if stamp.completed < fault.start {
            gap_before = gap_before.max(stamp.completed - previous);
        } else {
            max_gap = max_gap.max(stamp.completed - previous.max(fault.start));
        }
        previous = stamp.completed;
    }
    Ok(format!(
        "{{\"inject_ms\":{:.3},\"stall_ms\":{:.3},\"after_ms\":{:.3},\"max_gap_ms\":{:.3},\"gap_before_ms\":{:.3},\"ios\":{},\"errors\":{}}}",
        ms(fault.end - fault.start),
        ms(first_after.completed - fault.start),
        ms(first_after.completed - fault.end),
        ms(max_gap),
        ms(gap_before),
        stamps.len(),
        errors
    ))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match measure(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sanblk-iostamp: {e}");
            ExitCode::FAILURE
        }
    }
}
