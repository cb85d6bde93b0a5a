//! Test-only crash points: `crash_point("name")` ends the process at once, as kill -9 would,
//! when sand was started with `SAND_CRASH_AT=name`, so a test can stop the server exactly
//! between two commits. Compiled only with debug assertions (the test builds): a release
//! build has no crash points and ignores the variable.

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
