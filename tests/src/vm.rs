//! Runs a test guest in QEMU and turns its serial log into a [`GuestOutcome`].
//!
//! The guest boots the project kernel on the host's root filesystem (9p, read-only) with
//! `qemu/guest-init.sh` as PID 1; the run's log directory is shared read-write and holds the
//! test script. See `qemu/guest-init.sh` for the guest side.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::{Disk, VmConfig};
use crate::error::{FailedRun, HarnessError};
use crate::marker;
use crate::paths;
use crate::splat;

/// 9p mount tag of the run's log directory, and where the guest mounts it.
const OUT_TAG: &str = "sanblkout";
/// 9p mount tag of the host's scratch root (`target/qemu-scratch`), read-only and uncached.
const SCRATCH_TAG: &str = "sanblkscratch";
/// Where `qemu/guest-init.sh` mounts the out share; scripts see it as `$SANBLK_OUT`.
pub const GUEST_OUT_DIR: &str = "/run/sanblk-out";
/// File names inside the log directory.
pub const SCRIPT_FILE: &str = "script.sh";
pub const ENV_FILE: &str = "env.sh";
pub const SERIAL_LOG_FILE: &str = "serial.log";
pub const QEMU_LOG_FILE: &str = "qemu.log";
/// Address at which the guest reaches forwarded host ports.
pub const HOST_ADDR_FROM_GUEST: &str = "10.0.2.100";
/// How many serial log lines error reports show.
const LOG_TAIL_LINES: usize = 80;
/// How often the waiter checks whether QEMU has exited.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The result of a guest run that reached the end of its script.
#[derive(Debug)]
pub struct GuestOutcome {
    /// Exit code of the guest script.
    pub exit_code: i32,
    /// Everything the guest printed on its serial console (kernel log and script output).
    pub serial_log: String,
    /// Host directory with serial.log, qemu.log, script.sh and the files the guest wrote.
    pub log_dir: PathBuf,
    /// Kernel splat lines found in the serial log (see [`crate::splat`]).
    pub splats: Vec<String>,
    /// Wall time from starting QEMU to its exit.
    pub wall_time: Duration,
    /// Guest uptime when the script started (kernel timestamp), i.e. the boot time.
    pub boot_time: Option<Duration>,
}

impl GuestOutcome {
    /// Host path of a file the guest script wrote into `$SANBLK_OUT`.
    pub fn out_file(&self, name: &str) -> PathBuf {
        self.log_dir.join(name)
    }

    /// Contents of a file the guest script wrote into `$SANBLK_OUT`.
    pub fn read_out_file(&self, name: &str) -> io::Result<String> {
        fs::read_to_string(self.out_file(name))
    }

    /// A JSON file the guest script wrote into `$SANBLK_OUT` (such as `sanctl --json status`);
    /// panics naming the file if it is missing or not JSON.
    pub fn out_json(&self, name: &str) -> serde_json::Value {
        let text = self
            .read_out_file(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// `Ok` if the script exited 0 and the kernel log has no splat; otherwise a report with
    /// the exit code, the splats, the end of the serial log and the log directory.
    pub fn check_clean_success(&self) -> Result<(), String> {
        if self.exit_code == 0 && self.splats.is_empty() {
            return Ok(());
        }
        let mut report = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            report,
            "guest run failed: script exit code {}, {} kernel splat(s)",
            self.exit_code,
            self.splats.len()
        );
        for splat in &self.splats {
            let _ = writeln!(report, "  {splat}");
        }
        let _ = writeln!(
            report,
            "--- end of serial log ---\n{}",
            log_tail(&self.serial_log, LOG_TAIL_LINES)
        );
        let _ = write!(report, "--- logs: {} ---", self.log_dir.display());
        Err(report)
    }

    /// Panics with the report of [`check_clean_success`](Self::check_clean_success) unless the
    /// script exited 0 without kernel splats.
    #[track_caller]
    pub fn assert_clean_success(&self) {
        if let Err(report) = self.check_clean_success() {
            panic!("{report}");
        }
    }
}

/// A started guest. Dropping it kills QEMU; call [`wait`](Self::wait) for the outcome.
///
/// QEMU also gets SIGKILL when the thread that spawned it exits (`PR_SET_PDEATHSIG` is per
/// thread), so wait for a guest on the thread that spawned it.
pub struct RunningVm {
    name: String,
    qemu: QemuProcess,
    log_dir: PathBuf,
    started: Instant,
    timeout: Duration,
}

impl RunningVm {
    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.qemu.child.id()
    }

    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Blocks until QEMU exits or the timeout (counted from spawn) passes, in which case QEMU
    /// is killed and `HarnessError::Timeout` returned. QEMU is reaped either way.
    pub fn wait(mut self) -> Result<GuestOutcome, HarnessError> {
        let deadline = self.started + self.timeout;
        let status = loop {
            match self.qemu.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => return Err(HarnessError::io("waiting for QEMU", e)),
            }
            if Instant::now() >= deadline {
                let qemu_pid = self.pid();
                self.qemu.kill_and_reap();
                let serial_log = self.read_serial_log()?;
                return Err(HarnessError::Timeout {
                    timeout: self.timeout,
                    run: Box::new(FailedRun {
                        name: self.name,
                        qemu_pid,
                        log_dir: self.log_dir,
                        splats: splat::find_splats(&serial_log),
                        log_tail: log_tail(&serial_log, LOG_TAIL_LINES),
                    }),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        };
        let wall_time = self.started.elapsed();
        let serial_log = self.read_serial_log()?;
        let mut splats = splat::find_splats(&serial_log);
        let Some(exit_code) = marker::parse_exit_code(&serial_log) else {
            let qemu_stderr = fs::read(self.log_dir.join(QEMU_LOG_FILE))
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_default();
            return Err(HarnessError::NoExitMarker {
                qemu_status: describe_status(status),
                qemu_stderr,
                run: Box::new(FailedRun {
                    name: self.name,
                    qemu_pid: self.qemu.child.id(),
                    log_dir: self.log_dir,
                    splats,
                    log_tail: log_tail(&serial_log, LOG_TAIL_LINES),
                }),
            });
        };
        if !splat::has_kernel_timestamps(&serial_log) {
            // The detector only looks at timestamped kernel lines; without any, a clean
            // result would be meaningless.
            splats.push(
                "harness: no printk timestamps in the serial log (CONFIG_PRINTK_TIME off?), \
                 cannot detect kernel splats"
                    .to_string(),
            );
        }
        Ok(GuestOutcome {
            exit_code,
            boot_time: marker::script_start_uptime(&serial_log).map(Duration::from_secs_f64),
            serial_log,
            log_dir: self.log_dir,
            splats,
            wall_time,
        })
    }

    fn read_serial_log(&self) -> Result<String, HarnessError> {
        let path = self.log_dir.join(SERIAL_LOG_FILE);
        match fs::read(&path) {
            // The console can carry arbitrary bytes (a crashing guest, binary output).
            Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
            // QEMU failed before creating it; the caller reports QEMU's own log.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(HarnessError::io(format!("reading {}", path.display()), e)),
        }
    }
}

/// Owns the QEMU child process: killed and reaped on drop, so a panicking test never leaks it.
struct QemuProcess {
    child: Child,
}

impl QemuProcess {
    fn kill_and_reap(&mut self) {
        // Errors mean it has already exited (and kill/wait then have nothing left to do).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// Starts a guest and returns without waiting for it.
pub fn spawn(config: &VmConfig) -> Result<RunningVm, HarnessError> {
    let kernel = match &config.kernel {
        Some(kernel) => kernel.clone(),
        None => paths::kernel_image()?,
    };
    let log_dir = create_log_dir(&config.name)?;
    write_guest_files(config, &log_dir)?;
    // The scratch share's directory must exist even for a test that made no scratch dir.
    let scratch_root = paths::scratch_root();
    fs::create_dir_all(&scratch_root)
        .map_err(|e| HarnessError::io(format!("creating {}", scratch_root.display()), e))?;
    let args = qemu_args(config, &kernel, &log_dir, &paths::guest_init())?;

    let qemu_log_path = log_dir.join(QEMU_LOG_FILE);
    let qemu_log = File::create(&qemu_log_path)
        .map_err(|e| HarnessError::io(format!("creating {}", qemu_log_path.display()), e))?;
    let qemu_log_for_stdout = qemu_log
        .try_clone()
        .map_err(|e| HarnessError::io("duplicating the QEMU log handle", e))?;
    let qemu_binary =
        std::env::var("SANBLK_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string());
    let mut command = Command::new(&qemu_binary);
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(qemu_log_for_stdout)
        .stderr(qemu_log);
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe syscalls prctl and getppid; it does not allocate or take locks.
    let spawner_pid = std::process::id();
    unsafe {
        command.pre_exec(move || {
            // Kill QEMU if the test process (strictly: the spawning thread) dies, e.g. when
            // the test binary is killed by a signal and no Drop runs.
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect; then no signal would come.
            if libc::getppid() as u32 != spawner_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let child = command
        .spawn()
        .map_err(|e| HarnessError::io(format!("starting {qemu_binary}"), e))?;
    let qemu = QemuProcess { child };
    // Keep the exact command next to the logs so a failed run can be reproduced by hand.
    let command_line = std::iter::once(qemu_binary.as_str())
        .chain(args.iter().map(String::as_str))
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ");
    let _ = fs::write(log_dir.join("qemu-command.sh"), command_line + "\n");
    Ok(RunningVm {
        name: config.name.clone(),
        qemu,
        log_dir,
        started,
        timeout: config.timeout,
    })
}

/// Runs a guest to completion (or timeout).
pub fn run(config: &VmConfig) -> Result<GuestOutcome, HarnessError> {
    spawn(config)?.wait()
}

/// `<repo>/target/qemu-logs/<name>-<unix ms>-<pid>-<counter>`, created fresh. The counter
/// keeps guests started in the same millisecond by one process apart.
fn create_log_dir(name: &str) -> Result<PathBuf, HarnessError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = paths::repo_root().join("target/qemu-logs");
    fs::create_dir_all(&base)
        .map_err(|e| HarnessError::io(format!("creating {}", base.display()), e))?;
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let safe_name = paths::sanitize_name(name);
    let dir = base.join(format!(
        "{safe_name}-{millis}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir(&dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

fn write_guest_files(config: &VmConfig, log_dir: &Path) -> Result<(), HarnessError> {
    let write = |name: &str, contents: &str| {
        let path = log_dir.join(name);
        fs::write(&path, contents)
            .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))
    };
    write(SCRIPT_FILE, &config.script)?;
    write(ENV_FILE, &env_script(&config.env)?)
}

/// `export KEY='value'` lines that guest-init sources before running the script.
fn env_script(env: &[(String, String)]) -> Result<String, HarnessError> {
    let mut script = String::new();
    for (key, value) in env {
        let valid_name = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(HarnessError::Config(format!(
                "env var name {key:?} is not a shell variable name"
            )));
        }
        script.push_str(&format!("export {key}={}\n", shell_quote(value)));
    }
    Ok(script)
}

/// Single-quotes `text` for POSIX sh.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A path as a QEMU option value: UTF-8, commas doubled (QEMU's escape for ',').
fn qemu_path(path: &Path) -> Result<String, HarnessError> {
    path.to_str()
        .map(|s| s.replace(',', ",,"))
        .ok_or_else(|| HarnessError::Config(format!("path {} is not UTF-8", path.display())))
}

/// `path` as a kernel command-line value: UTF-8 without whitespace, which would split it.
fn cmdline_path<'a>(path: &'a Path, what: &str) -> Result<&'a str, HarnessError> {
    path.to_str()
        .filter(|s| !s.contains(char::is_whitespace))
        .ok_or_else(|| {
            HarnessError::Config(format!(
                "{what} path {} must be UTF-8 without spaces (kernel command line)",
                path.display()
            ))
        })
}

/// QEMU's `-smp` value for `cpus` vCPUs. Never a machine of at most one CPU: TCG before QEMU
/// 8.1 (Debian 12 ships 7.2) drops every guest memory barrier when `maxcpus` is 1, yet QEMU's
/// own threads still complete virtio requests concurrently with the vCPU, so the ring
/// handshake can lose a completion interrupt and a guest's I/O stalls for good (upstream fix
/// c914d46d0a, "tcg: Do not elide memory barriers for !CF_PARALLEL in system mode").
/// A second, offline, possible CPU makes TCG emit the barriers.
fn smp_arg(cpus: u32) -> String {
    format!("{cpus},maxcpus={}", cpus.max(2))
}

/// The QEMU command line (without the binary) for `config`.
fn qemu_args(
    config: &VmConfig,
    kernel: &Path,
    log_dir: &Path,
    guest_init: &Path,
) -> Result<Vec<String>, HarnessError> {
    let init = cmdline_path(guest_init, "guest init")?;
    let scratch_root = paths::scratch_root();
    let scratch = cmdline_path(&scratch_root, "scratch")?;
    let mut cmdline = vec![
        "root=hostroot".to_string(),
        "rootfstype=9p".to_string(),
        // The host's tree does not change under a guest, so the guest may keep what it read:
        // without a cache every exec reads its binary and libraries over 9p again (`fio
        // --version`, 64 libraries: 22 s uncached, 3.5 s cached; a debug `sanctl`: 5 s, 1.2 s).
        // What the host writes while guests run lives in the scratch share below, uncached.
        "rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose".to_string(),
        "ro".to_string(),
        "console=ttyS0".to_string(),
        format!("init={init}"),
        // Reboot at once on panic; -no-reboot then ends QEMU instead of waiting for timeout.
        "panic=-1".to_string(),
        // guest-init reports through /dev/kmsg, which is rate limited by default.
        "printk.devkmsg=on".to_string(),
        // Unknown key=value parameters become guest-init's environment.
        format!("SANBLK_OUT_TAG={OUT_TAG}"),
        format!("SANBLK_OUT={GUEST_OUT_DIR}"),
        format!("SANBLK_SCRIPT={SCRIPT_FILE}"),
        // guest-init keeps the repository visible if it lives under a guest tmpfs (/tmp...).
        format!("SANBLK_REPO={}", crate::paths::repo_root().display()),
        format!("SANBLK_SCRATCH_TAG={SCRATCH_TAG}"),
        format!("SANBLK_SCRATCH={scratch}"),
    ];
    cmdline.extend(config.kernel_args.iter().cloned());

    let mut args: Vec<String> = [
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        "-accel",
        "tcg",
        // No 5-level paging: 6.12 with LA57 + KASAN can report a bogus early-boot
        // "BUG: KASAN: wild-memory-access in do_raw_spin_lock" when an interrupt lands while
        // identify_cpu() has the boot CPU's feature bits (LA57 included) cleared; slow TCG
        // makes that window wide (seen once in ~50 boots with plain `max`).
        "-cpu",
        "max,la57=off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(shift) = config.instruction_clock_shift {
        args.extend(["-icount".to_string(), format!("shift={shift},sleep=on")]);
    }
    args.extend([
        "-smp".to_string(),
        smp_arg(config.cpus),
        "-m".to_string(),
        config.memory_mb.to_string(),
        "-kernel".to_string(),
        kernel
            .to_str()
            .ok_or_else(|| {
                HarnessError::Config(format!("kernel path {} is not UTF-8", kernel.display()))
            })?
            .to_string(),
        "-append".to_string(),
        cmdline.join(" "),
        "-chardev".to_string(),
        format!(
            "file,id=serial0,path={}",
            qemu_path(&log_dir.join(SERIAL_LOG_FILE))?
        ),
        "-serial".to_string(),
        "chardev:serial0".to_string(),
    ]);
    // Disks first so they get the lowest PCI slots and /dev/vda.. follow the order added.
    for (index, disk) in config.disks.iter().enumerate() {
        let image_drive = |path: &Path| -> Result<String, HarnessError> {
            Ok(format!(
                "file={},format=raw,cache=none,file.locking=off,werror=report,rerror=report",
                qemu_path(path)?
            ))
        };
        let drive = match disk {
            Disk::ImageFile(path) => image_drive(path)?,
            Disk::RawDriveSpec(spec) => spec.clone(),
            Disk::ThrottledImageFile {
                path,
                iops,
                bytes_per_s,
            } => format!(
                "{},throttling.iops-total={iops},throttling.bps-total={bytes_per_s}",
                image_drive(path)?
            ),
        };
        args.push("-drive".to_string());
        args.push(format!("{drive},if=none,id=disk{index}"));
        args.push("-device".to_string());
        args.push(format!(
            "virtio-blk-pci,drive=disk{index},share-rw=on,serial=sanblk{index}"
        ));
    }
    args.extend([
        "-fsdev".to_string(),
        "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap".to_string(),
        "-device".to_string(),
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot".to_string(),
        "-fsdev".to_string(),
        format!(
            "local,id={OUT_TAG},path={},security_model=none",
            qemu_path(log_dir)?
        ),
        "-device".to_string(),
        format!("virtio-9p-pci,fsdev={OUT_TAG},mount_tag={OUT_TAG}"),
        "-fsdev".to_string(),
        format!(
            "local,id={SCRATCH_TAG},path={},security_model=none,readonly=on",
            qemu_path(&scratch_root)?
        ),
        "-device".to_string(),
        format!("virtio-9p-pci,fsdev={SCRATCH_TAG},mount_tag={SCRATCH_TAG}"),
    ]);
    // restrict=on: the guest reaches nothing but the forwarded ports.
    let mut netdev = "user,id=net0,restrict=on".to_string();
    let relay = qemu_path(&crate::paths::guestfwd_relay()?)?;
    for port in &config.forwarded_ports {
        // The -cmd: form starts a fresh relay per guest connection; the tcp: form would make a
        // single connection when QEMU starts. `nc` made every request larger than a segment
        // wait 40 ms (see the relay's documentation).
        netdev.push_str(&format!(
            ",guestfwd=tcp:{HOST_ADDR_FROM_GUEST}:{port}-cmd:{relay} {port}"
        ));
    }
    args.extend([
        "-netdev".to_string(),
        netdev,
        "-device".to_string(),
        "virtio-net-pci,netdev=net0".to_string(),
    ]);
    Ok(args)
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// The last `lines` lines of `log`.
pub(crate) fn log_tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until `path` exists (a file a guest writes into its log dir, or the host into the
/// scratch dir); panics after `timeout`.
pub fn wait_for_file(path: &Path, timeout: Duration) {
    if let Err(message) = wait_for_path(path, timeout) {
        panic!("{message}");
    }
}

/// [`wait_for_file`], failing with a message instead of panicking (for the benches and the
/// demo).
pub fn wait_for_path(path: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} never appeared", path.display()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The QEMU arguments of `config` with fixed kernel, log and guest-init paths.
    fn args_of(config: &VmConfig) -> Vec<String> {
        qemu_args(
            config,
            Path::new("/k/bzImage"),
            Path::new("/logs/run1"),
            Path::new("/repo/qemu/guest-init.sh"),
        )
        .expect("valid config")
    }

    /// The argument following the first `flag`.
    fn value_after<'a>(args: &'a [String], flag: &str) -> &'a str {
        &args[args.iter().position(|a| a == flag).expect(flag) + 1]
    }

    #[test]
    fn qemu_args_attach_disks_ports_and_shares() {
        let config = VmConfig::new("t", "true")
            .disk("/images/a,b.img")
            .disk_spec(Disk::RawDriveSpec(
                "file=nbd:127.0.0.1:10809,format=raw".into(),
            ))
            .forward_port(4000)
            .memory_mb(512)
            .cpus(1)
            .kernel_arg("foo=bar");
        let args = args_of(&config);
        let joined = args.join(" ");
        assert!(joined.contains("-drive file=/images/a,,b.img,format=raw,cache=none,"));
        assert!(joined.contains("werror=report,rerror=report,if=none,id=disk0"));
        assert!(joined.contains("-drive file=nbd:127.0.0.1:10809,format=raw,if=none,id=disk1"));
        assert!(joined.contains("virtio-blk-pci,drive=disk1,share-rw=on,serial=sanblk1"));
        let relay = crate::paths::guestfwd_relay().expect("relay built");
        assert!(joined.contains(&format!(
            "guestfwd=tcp:10.0.2.100:4000-cmd:{} 4000",
            relay.display()
        )));
        assert!(joined.contains("-smp 1,maxcpus=2 -m 512 -kernel /k/bzImage"));
        assert!(joined.contains("path=/logs/run1/serial.log"));
        let append = value_after(&args, "-append");
        assert!(append.contains("init=/repo/qemu/guest-init.sh"));
        assert!(append.ends_with(" foo=bar"));
    }

    #[test]
    fn instruction_clock_is_passed_to_qemu() {
        let args = args_of(&VmConfig::new("t", "true").instruction_clock(3));
        assert_eq!(value_after(&args, "-icount"), "shift=3,sleep=on");
        assert!(!args_of(&VmConfig::new("t", "true")).contains(&"-icount".to_string()));
    }

    #[test]
    fn throttled_disk_gets_qemu_io_limits() {
        let config = VmConfig::new("t", "true").disk_spec(Disk::ThrottledImageFile {
            path: "/images/lun.img".into(),
            iops: 4000,
            bytes_per_s: 300 << 20,
        });
        let args = args_of(&config);
        let drive = value_after(&args, "-drive");
        assert!(drive.starts_with("file=/images/lun.img,format=raw,cache=none,"));
        assert!(drive.contains(
            ",throttling.iops-total=4000,throttling.bps-total=314572800,if=none,id=disk0"
        ));
    }

    #[test]
    fn guest_init_path_with_spaces_is_rejected() {
        let result = qemu_args(
            &VmConfig::new("t", "true"),
            Path::new("/k"),
            Path::new("/l"),
            Path::new("/my repo/guest-init.sh"),
        );
        assert!(matches!(result, Err(HarnessError::Config(_))));
    }

    #[test]
    fn env_script_quotes_values_and_rejects_bad_names() {
        let env = vec![
            ("A_1".to_string(), "it's $HOME".to_string()),
            ("B".to_string(), String::new()),
        ];
        assert_eq!(
            env_script(&env).expect("valid names"),
            "export A_1='it'\\''s $HOME'\nexport B=''\n"
        );
        for bad in ["1A", "A-B", "", "A B"] {
            let env = vec![(bad.to_string(), "x".to_string())];
            assert!(env_script(&env).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn log_tail_keeps_last_lines() {
        assert_eq!(log_tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(log_tail("a", 5), "a");
        assert_eq!(log_tail("", 5), "");
    }

    #[test]
    fn clean_success_report_names_exit_code_and_splats() {
        let outcome = GuestOutcome {
            exit_code: 3,
            serial_log: "[    1.0] WARNING: CPU: 0 PID: 1 at x\n".to_string(),
            log_dir: PathBuf::from("/logs/x"),
            splats: vec!["[    1.0] WARNING: CPU: 0 PID: 1 at x".to_string()],
            wall_time: Duration::ZERO,
            boot_time: None,
        };
        let report = outcome.check_clean_success().expect_err("must fail");
        assert!(report.contains("exit code 3"));
        assert!(report.contains("1 kernel splat"));
        assert!(report.contains("/logs/x"));
    }
}
