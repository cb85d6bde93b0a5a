//! Test-only fault injection, compiled only with debug assertions (the test builds; a release
//! build has none and ignores the variables):
//! - crash points: `crash_point("name")` ends the process at once, as kill -9 would, when sand
//!   was started with `SAND_CRASH_AT=name`, so a test can stop the server exactly between two
//!   commits;
//! - a slow disk: with `SAND_DEVICE_DELAY_MS=N`, every I/O-service device operation first
//!   takes the one "disk" for N ms, in arrival order, as a disk with one queue slot would, so a
//!   test can see who waits behind whom.

/// The environment variable naming the crash point to stop at.
#[cfg(debug_assertions)]
const CRASH_AT_ENV: &str = "SAND_CRASH_AT";

/// Exit status of a process stopped at a crash point.
#[cfg(debug_assertions)]
const CRASH_EXIT_STATUS: i32 = 86;

/// Ends the process here if `SAND_CRASH_AT` names this point (debug builds only). Nothing is
/// flushed or closed: what is committed stays, what is not is lost, as with kill -9.
pub fn crash_point(name: &str) {
    #[cfg(debug_assertions)]
    {
        static TARGET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let target = TARGET.get_or_init(|| std::env::var(CRASH_AT_ENV).ok());
        if target.as_deref() == Some(name) {
            eprintln!("crash point {name} reached; exiting");
            std::process::exit(CRASH_EXIT_STATUS);
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

/// With `SAND_DEVICE_DELAY_MS=N` (debug builds only): waits for its turn (first come, first
/// served) at a single simulated disk, then holds it for N ms. Called on the blocking thread
/// of each I/O-service device operation.
pub fn device_delay() {
    #[cfg(debug_assertions)]
    {
        use std::sync::atomic::{AtomicU64, Ordering};
        static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
        static NEXT_TICKET: AtomicU64 = AtomicU64::new(0);
        static SERVING: AtomicU64 = AtomicU64::new(0);
        let delay = DELAY.get_or_init(|| {
            std::env::var("SAND_DEVICE_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(std::time::Duration::from_millis)
        });
        if let Some(delay) = delay {
            let ticket = NEXT_TICKET.fetch_add(1, Ordering::AcqRel);
            while SERVING.load(Ordering::Acquire) != ticket {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            std::thread::sleep(*delay);
            SERVING.fetch_add(1, Ordering::AcqRel);
        }
    }
}
