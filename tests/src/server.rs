//! A real `sand` server process on the host's loopback for end-to-end tests, administered with
//! the real `sanctl` binary. Killed and reaped on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::paths::target_bin;

pub struct SandServer {
    child: Child,
    pub dir: PathBuf,
    pub admin_socket: PathBuf,
    pub port: u16,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl SandServer {
    /// Starts `sand` with its metadata under `dir` and waits for its admin socket.
    pub fn start(dir: &Path) -> Result<SandServer, String> {
        SandServer::start_with_env(dir, &[])
    }

    /// As [`SandServer::start`], with extra environment variables (test knobs of `sand`).
    pub fn start_with_env(dir: &Path, env: &[(&str, &str)]) -> Result<SandServer, String> {
        let port = free_port().map_err(|e| format!("free port: {e}"))?;
        let metadata = dir.join("sand-metadata");
        std::fs::create_dir_all(&metadata).map_err(|e| format!("{}: {e}", metadata.display()))?;
        let log =
            std::fs::File::create(dir.join("sand.log")).map_err(|e| format!("sand.log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| format!("sand.log: {e}"))?;
        let child = Command::new(target_bin("sand"))
            .arg("--metadata-dir")
            .arg(&metadata)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            // The I/O port is written to io.addr; a fixed port+1 could clash with another test.
            .arg("--io-listen")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("cannot start sand: {e}"))?;
        let server = SandServer {
            child,
            dir: dir.to_path_buf(),
            admin_socket: metadata.join("admin.sock"),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !server.admin_socket.exists() {
            if Instant::now() > deadline {
                return Err(format!(
                    "sand did not open its admin socket: {}",
                    server.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
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
}

impl Drop for SandServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
