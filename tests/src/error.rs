//! Errors of the QEMU harness. Each variant carries what a developer needs to debug a failed
//! run without rerunning it: the log directory and the end of the serial log.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why a guest run produced no usable outcome.
pub enum HarnessError {
    /// Invalid `VmConfig` (e.g. an env var name the guest shell cannot export).
    Config(String),
    /// The guest kernel could not be located or built.
    Kernel(String),
    /// A host-side file operation or spawning QEMU failed.
    Io { context: String, source: io::Error },
    /// The run exceeded its timeout; QEMU was killed (SIGKILL) and reaped.
    Timeout {
        timeout: Duration,
        run: Box<FailedRun>,
    },
    /// QEMU ended without the guest reporting the script's exit code: the guest kernel
    /// panicked, the script killed init, or QEMU itself failed (see `qemu_stderr`).
    NoExitMarker {
        qemu_status: String,
        qemu_stderr: String,
        run: Box<FailedRun>,
    },
}

/// What is known about a guest run that did not produce an outcome.
#[derive(Debug)]
pub struct FailedRun {
    /// `VmConfig` name.
    pub name: String,
    /// QEMU's process id (already reaped).
    pub qemu_pid: u32,
    /// Host directory with serial.log, qemu.log and script.sh.
    pub log_dir: PathBuf,
    /// Kernel splats found in the serial log.
    pub splats: Vec<String>,
    /// The last lines of the serial log.
    pub log_tail: String,
}

impl HarnessError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        HarnessError::Io {
            context: context.into(),
            source,
        }
    }
}

fn write_run(f: &mut fmt::Formatter<'_>, run: &FailedRun) -> fmt::Result {
    if !run.splats.is_empty() {
        writeln!(f, "kernel splats ({}):", run.splats.len())?;
        for splat in &run.splats {
            writeln!(f, "  {splat}")?;
        }
    }
    writeln!(f, "--- end of serial log ---\n{}", run.log_tail)?;
    write!(f, "--- logs: {} ---", run.log_dir.display())
}

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HarnessError::Config(message) => write!(f, "invalid VM config: {message}"),
            HarnessError::Kernel(message) => write!(f, "guest kernel unavailable: {message}"),
            HarnessError::Io { context, source } => write!(f, "{context}: {source}"),
            HarnessError::Timeout { timeout, run } => {
                writeln!(
                    f,
                    "guest '{}' timed out after {timeout:?}; QEMU (pid {}) killed",
                    run.name, run.qemu_pid
                )?;
                write_run(f, run)
            }
            HarnessError::NoExitMarker {
                qemu_status,
                qemu_stderr,
                run,
            } => {
                writeln!(
                    f,
                    "guest '{}' ended without reporting an exit code (QEMU {qemu_status}): \
                     kernel crash, init killed, or QEMU failure",
                    run.name
                )?;
                if !qemu_stderr.trim().is_empty() {
                    writeln!(f, "--- QEMU output ---\n{}", qemu_stderr.trim_end())?;
                }
                write_run(f, run)
            }
        }
    }
}

// Debug shows the Display text so that `.expect()` in tests prints a readable report with
// real newlines instead of an escaped struct dump.
impl fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for HarnessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HarnessError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
