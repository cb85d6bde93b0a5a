//! A real `sand` server process on the host's loopback for end-to-end tests, administered with
//! the real `sanctl` binary. Killed and reaped on drop; [`SandServer::restart`] kills it with
//! SIGKILL and starts it again on the same metadata dir and ports.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sanblk_proto::protocol::{DeviceInfo, VolumeDetail};

use crate::paths::{scratch_dir, sparse_image, target_bin};

// sand's own tests parse its log with the same file; one parser for one log line.
#[path = "../../userspace-server/tests/common/sand_log.rs"]
mod sand_log;
pub use sand_log::last_resume_cursor;

pub struct SandServer {
    child: Child,
    pub dir: PathBuf,
    pub admin_socket: PathBuf,
    pub port: u16,
    /// Extra command-line arguments of the server process (kept for restarts).
    args: Vec<String>,
}

/// A loopback port free at the time of asking.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl SandServer {
    /// Starts `sand` with its metadata under `dir` and waits for its admin socket.
    pub fn start(dir: &Path) -> Result<SandServer, String> {
        SandServer::start_with_args(dir, &[])
    }

    /// As [`SandServer::start`], with extra command-line arguments for `sand` (such as
    /// `--recovery-max-rate 1M`), kept across restarts.
    pub fn start_with_args(dir: &Path, args: &[&str]) -> Result<SandServer, String> {
        let port = free_port().map_err(|e| format!("free port: {e}"))?;
        let metadata = dir.join("sand-metadata");
        std::fs::create_dir_all(&metadata).map_err(|e| format!("{}: {e}", metadata.display()))?;
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        // The I/O port is written to io.addr; a fixed port+1 could clash with another test.
        let child = spawn_sand(dir, port, 0, &args, &[])?;
        let mut server = SandServer {
            child,
            dir: dir.to_path_buf(),
            admin_socket: metadata.join("admin.sock"),
            port,
            args,
        };
        server.wait_ready()?;
        Ok(server)
    }

    /// Kills `sand` with SIGKILL (no clean shutdown) and reaps it.
    pub fn kill9(&mut self) {
        // An error means it has exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts `sand` again (after [`SandServer::kill9`], which it does first if needed) on the
    /// same metadata dir, agent port and I/O port, and waits until both listen again. The log
    /// is appended to.
    pub fn restart(&mut self) -> Result<(), String> {
        self.restart_with_env(&[])
    }

    /// As [`SandServer::restart`], with extra environment for this run of `sand` only (such
    /// as `SAND_CRASH_AT`, which makes a debug build exit at a named crash point).
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) -> Result<(), String> {
        let io_port = self.io_port()?;
        self.kill9();
        // A killed sand leaves these behind: wait for the new ones.
        let _ = std::fs::remove_file(&self.admin_socket);
        let _ = std::fs::remove_file(self.dir.join("sand-metadata").join("io.addr"));
        self.child = spawn_sand(&self.dir, self.port, io_port, &self.args, env)?;
        self.wait_ready()?;
        self.io_port().map(|_| ())
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.admin_socket.exists() {
            if Instant::now() > deadline {
                return Err(format!(
                    "sand did not open its admin socket: {}",
                    self.log()
                ));
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("sand exited ({status}): {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Waits up to `timeout` for `sand` to exit on its own (a crash point); its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Process id of the running `sand`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The port of the server's I/O service (the kernel's server path), from `io.addr`.
    pub fn io_port(&self) -> Result<u16, String> {
        let path = self.dir.join("sand-metadata").join("io.addr");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                if let Some(port) = text
                    .trim()
                    .parse::<std::net::SocketAddr>()
                    .ok()
                    .map(|a| a.port())
                {
                    return Ok(port);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: no I/O address: {}",
                    path.display(),
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sand.log")).unwrap_or_default()
    }

    /// Runs `sanctl --admin-socket ... ARGS` and returns its output, whatever the exit code.
    pub fn sanctl_output(&self, args: &[&str]) -> Output {
        Command::new(target_bin("sanctl"))
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run sanctl: {e}"))
    }

    /// Runs `sanctl` and panics with its stderr unless it succeeds; returns stdout.
    pub fn sanctl(&self, args: &[&str]) -> String {
        let output = self.sanctl_output(args);
        assert!(
            output.status.success(),
            "sanctl {args:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8_lossy(&output.stdout).to_string()
    }

    /// Labels the image file (or device) `path` and adds it to the pool.
    pub fn pool_add(&self, path: &Path) {
        self.sanctl(&["pool", "add", &path.display().to_string()]);
    }

    /// The pool's devices as the server lists them.
    pub fn pool(&self) -> Vec<DeviceInfo> {
        serde_json::from_str(&self.sanctl(&["--json", "pool", "list"])).expect("pool json")
    }

    /// Waits until a client reported its direct path to the device at `device` failed while
    /// the server still reads it (`pool list` names the client; such a report alone moves
    /// nothing), then declares the device failed as an administrator does (`sanctl recovery
    /// start --no-wait`). Panics after `timeout` without a report.
    pub fn declare_failed_once_reported(&self, device: &Path, timeout: Duration) {
        let path = device.display().to_string();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let pool = self.pool();
            let shown = pool
                .iter()
                .find(|d| d.path == path)
                .unwrap_or_else(|| panic!("{path} not in the pool: {pool:?}"));
            if !shown.path_failed_on.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no client reported its path to {path} failed within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        self.sanctl(&["recovery", "start", &path, "--no-wait"]);
    }

    /// The server's view of `volume`, its map included.
    pub fn volume(&self, volume: &str) -> VolumeDetail {
        serde_json::from_str(&self.sanctl(&["--json", "volume", "show", volume]))
            .expect("volume json")
    }

    /// Adds client `name`, its secret written to `DIR/NAME.secret`, granted `rw` on each of
    /// `volumes`; returns the secret's path.
    pub fn add_client(&self, name: &str, volumes: &[&str]) -> PathBuf {
        let secret = self.dir.join(format!("{name}.secret"));
        self.sanctl(&[
            "client",
            "add",
            name,
            "--secret-out",
            &secret.display().to_string(),
        ]);
        for volume in volumes {
            self.sanctl(&["client", "grant", name, volume, "rw"]);
        }
        secret
    }
}

/// Pool device UUID -> the path the server opens it by.
pub fn paths_by_uuid(pool: &[DeviceInfo]) -> HashMap<uuid::Uuid, PathBuf> {
    pool.iter()
        .map(|d| (d.uuid, PathBuf::from(&d.path)))
        .collect()
}

impl Drop for SandServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `sand` on `dir/sand-metadata` with `args` added, appending to `dir/sand.log`;
/// `io_port` 0 lets it pick one.
fn spawn_sand(
    dir: &Path,
    port: u16,
    io_port: u16,
    args: &[String],
    env: &[(&str, &str)],
) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("sand.log"))
        .map_err(|e| format!("sand.log: {e}"))?;
    let log_err = log.try_clone().map_err(|e| format!("sand.log: {e}"))?;
    Command::new(target_bin("sand"))
        .arg("--metadata-dir")
        .arg(dir.join("sand-metadata"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--io-listen")
        .arg(format!("127.0.0.1:{io_port}"))
        .args(args)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("cannot start sand: {e}"))
}

/// A server provisioned the way the end-to-end tests need it: image files in the pool,
/// volumes, and client `host1` (secret in `dir/host1.secret`) granted `rw` on each volume.
pub struct Provisioned {
    pub dir: PathBuf,
    pub server: SandServer,
    /// `san0.img`, then `san1.img` if a spare was asked for.
    pub images: Vec<PathBuf>,
    /// Pool device UUID -> image file.
    pub by_uuid: HashMap<uuid::Uuid, PathBuf>,
    /// UUID of `san1.img`, the spare, if any.
    pub spare: Option<uuid::Uuid>,
}

/// Starts `sand` (with `sand_args` added) in scratch dir `name`; a 64 MiB `san0.img` in the pool holds
/// every volume (16 MiB each); with `spare`, `san1.img` joins the pool only after the volumes
/// exist, so it is free for a recovery.
pub fn provision(name: &str, sand_args: &[&str], volumes: &[&str], spare: bool) -> Provisioned {
    const IMAGE_BYTES: u64 = 64 << 20;
    let dir = scratch_dir(name).expect("scratch dir");
    let server = SandServer::start_with_args(&dir, sand_args).expect("sand started");
    let image = |i: usize| {
        let path = dir.join(format!("san{i}.img"));
        sparse_image(&path, IMAGE_BYTES).expect("image");
        path
    };
    let mut images = vec![image(0)];
    server.pool_add(&images[0]);
    for volume in volumes {
        server.sanctl(&["volume", "create", volume, "16M"]);
    }
    if spare {
        images.push(image(1));
        server.pool_add(&images[1]);
    }
    server.add_client("host1", volumes);
    let by_uuid = paths_by_uuid(&server.pool());
    let spare = images.get(1).and_then(|path| {
        by_uuid
            .iter()
            .find(|(_, p)| *p == path)
            .map(|(uuid, _)| *uuid)
    });
    Provisioned {
        dir,
        server,
        images,
        by_uuid,
        spare,
    }
}
