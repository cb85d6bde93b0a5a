//! Test harness: runs the real `sand` binary on loopback with a temp metadata dir and sparse
//! image files, and kills it when the test ends (even on panic).

#![allow(dead_code)] // each test binary uses a different subset

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sanblk_proto::client::{AdminClient, AgentClient};
use sanblk_proto::map::{AccessMode, Layout, VolumeMap};
use sanblk_proto::protocol::{ClientAdd, ClientCreated, ClientGrant, PoolAdd, VolumeCreate};

pub mod io_client;
pub mod sand_log;

pub const MIB: u64 = 1 << 20;

/// sand's flag limiting a recovery's copy rate; recovery copies 1 MiB chunks, so "10M" makes
/// each take 100 ms, long enough for a test to act mid-recovery.
pub const RECOVERY_MAX_RATE: &str = "--recovery-max-rate";

pub struct TestServer {
    child: Option<Child>,
    pub dir: PathBuf,
    pub metadata_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub agent_address: SocketAddr,
    _temp: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts a fresh server in a new temp dir.
    pub fn start() -> TestServer {
        TestServer::start_with_args(&[])
    }

    /// Starts a fresh server in a new temp dir with extra command-line arguments.
    pub fn start_with_args(args: &[&str]) -> TestServer {
        let temp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let dir = temp.path().to_path_buf();
        let mut server = TestServer::start_in_with_args(&dir, args);
        server._temp = Some(temp);
        server
    }

    /// Starts a server on an existing directory (restart after stop or kill).
    pub fn start_in(dir: &Path) -> TestServer {
        TestServer::start_in_with_args(dir, &[])
    }

    /// Like `start_in`, with extra command-line arguments for the server process.
    pub fn start_in_with_args(dir: &Path, args: &[&str]) -> TestServer {
        TestServer::spawn_in(dir, args, &[])
    }

    /// Starts a fresh server in a new temp dir with extra arguments and environment (the
    /// debug build's fault injection).
    pub fn start_with_args_and_env(args: &[&str], env: &[(&str, &str)]) -> TestServer {
        let temp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let dir = temp.path().to_path_buf();
        let mut server = TestServer::spawn_in(&dir, args, env);
        server._temp = Some(temp);
        server
    }

    /// Like `start_in`, with extra environment variables (the debug build's crash points).
    pub fn start_in_with_env(dir: &Path, env: &[(&str, &str)]) -> TestServer {
        TestServer::spawn_in(dir, &[], env)
    }

    fn spawn_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> TestServer {
        let metadata_dir = dir.join("meta");
        let admin_socket = metadata_dir.join("admin.sock");
        let address_file = metadata_dir.join("agent.addr");
        // Leftovers of a killed server must not be mistaken for readiness.
        let _ = std::fs::remove_file(&admin_socket);
        let _ = std::fs::remove_file(&address_file);
        let log = File::options()
            .create(true)
            .append(true)
            .open(dir.join("sand.log"))
            .unwrap_or_else(|e| panic!("log file: {e}"));
        // The tests' short timeouts, unless `args` sets its own.
        let mut defaults = Vec::new();
        for flag in ["--handshake-timeout-ms", "--frame-timeout-ms"] {
            if !args.contains(&flag) {
                defaults.extend([flag, "1000"]);
            }
        }
        let child = Command::new(env!("CARGO_BIN_EXE_sand"))
            .arg("--metadata-dir")
            .arg(&metadata_dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(defaults)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning sand: {e}"));
        let mut server = TestServer {
            child: Some(child),
            dir: dir.to_path_buf(),
            metadata_dir,
            admin_socket: admin_socket.clone(),
            agent_address: "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")),
            _temp: None,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if admin_socket.exists() {
                if let Ok(text) = std::fs::read_to_string(&address_file) {
                    if let Ok(address) = text.trim().parse() {
                        server.agent_address = address;
                        return server;
                    }
                }
            }
            if let Some(child) = server.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "sand exited during startup: {status}; log:\n{}",
                        server.log()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "sand did not start; log:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address the I/O service listens on (METADATA_DIR/io.addr).
    pub fn io_address(&self) -> SocketAddr {
        let text = std::fs::read_to_string(self.metadata_dir.join("io.addr"))
            .unwrap_or_else(|e| panic!("io.addr: {e}"));
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("io.addr: {e}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sand.log")).unwrap_or_default()
    }

    /// The server's peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
            .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// True while the server process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn admin(&self) -> AdminClient {
        AdminClient::connect(&self.admin_socket)
            .await
            .unwrap_or_else(|e| panic!("admin connect: {e}"))
    }

    /// Creates a sparse image file of `size` bytes in the test dir.
    pub fn image(&self, name: &str, size: u64) -> PathBuf {
        let path = self.dir.join(name);
        let file = File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        file.set_len(size)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    }

    /// Adds `count` images of `size` bytes to the pool.
    pub async fn pool_of(&self, count: usize, size: u64) -> Vec<PathBuf> {
        let mut admin = self.admin().await;
        let mut paths = Vec::new();
        for index in 0..count {
            let path = self.image(&format!("disk{index}.img"), size);
            admin
                .call(PoolAdd {
                    path: path.display().to_string(),
                    force: false,
                })
                .await
                .unwrap_or_else(|e| panic!("pool add: {e}"));
            paths.push(path);
        }
        paths
    }

    /// Creates volume `name` of `size` bytes with `layout`.
    pub async fn create_volume(&self, name: &str, size: u64, layout: Layout) {
        self.admin()
            .await
            .call(VolumeCreate {
                name: name.into(),
                size_bytes: size,
                layout,
            })
            .await
            .unwrap_or_else(|e| panic!("volume create: {e}"));
    }

    /// Creates a volume, a client and a grant; returns the client's secret.
    pub async fn volume_with_client(
        &self,
        volume: &str,
        size: u64,
        client: &str,
        mode: AccessMode,
    ) -> Vec<u8> {
        let mut admin = self.admin().await;
        admin
            .call(VolumeCreate {
                name: volume.into(),
                size_bytes: size,
                layout: Layout::Linear,
            })
            .await
            .unwrap_or_else(|e| panic!("volume create: {e}"));
        let secret = self.client(client).await;
        self.grant(client, volume, mode).await;
        secret
    }

    pub async fn client(&self, name: &str) -> Vec<u8> {
        let mut admin = self.admin().await;
        let created: ClientCreated = admin
            .call(ClientAdd { name: name.into() })
            .await
            .unwrap_or_else(|e| panic!("client add: {e}"));
        hex::decode(created.secret).unwrap_or_else(|e| panic!("secret: {e}"))
    }

    pub async fn grant(&self, client: &str, volume: &str, mode: AccessMode) {
        let mut admin = self.admin().await;
        admin
            .call(ClientGrant {
                name: client.into(),
                volume: volume.into(),
                mode,
            })
            .await
            .unwrap_or_else(|e| panic!("grant: {e}"));
    }

    /// The pool's devices, as `pool list` gives them.
    pub async fn pool_devices(&self) -> Vec<sanblk_proto::protocol::DeviceInfo> {
        self.admin()
            .await
            .call(sanblk_proto::protocol::PoolList {})
            .await
            .unwrap_or_else(|e| panic!("pool list: {e}"))
    }

    /// The pool's free bytes.
    pub async fn pool_free_bytes(&self) -> u64 {
        self.pool_devices().await.iter().map(|d| d.free_bytes).sum()
    }

    /// Pool device UUID -> image file.
    pub async fn device_paths(&self) -> std::collections::HashMap<uuid::Uuid, PathBuf> {
        self.pool_devices()
            .await
            .into_iter()
            .map(|d| (d.uuid, PathBuf::from(d.path)))
            .collect()
    }

    pub async fn agent(&self, client: &str, secret: &[u8]) -> AgentClient {
        AgentClient::connect(self.agent_address, client, secret)
            .await
            .unwrap_or_else(|e| panic!("agent connect: {e}"))
    }
}

/// Plays a well-behaved agent through one change of `volume_id`: acks the `Quiesce` and the
/// new map (as the kernel would once drained / installed) until the `Resume` above
/// `from_epoch`; returns the resumed epoch.
pub async fn follow_change(agent: &mut AgentClient, from_epoch: u64) -> u64 {
    follow_change_to_map(agent, from_epoch).await.epoch
}

/// [`follow_change`], returning the map the client resumed on.
pub async fn follow_change_to_map(agent: &mut AgentClient, from_epoch: u64) -> VolumeMap {
    use sanblk_proto::client::Push;
    let wait = Duration::from_secs(30);
    let mut latest: Option<VolumeMap> = None;
    loop {
        let push = tokio::time::timeout(wait, agent.next_push())
            .await
            .unwrap_or_else(|_| panic!("change not finished within {wait:?}"))
            .unwrap_or_else(|e| panic!("push: {e}"));
        match push {
            Push::Quiesce(q) => agent
                .quiesce_ack(q.volume_id, q.epoch)
                .await
                .unwrap_or_else(|e| panic!("quiesce ack: {e}")),
            Push::MapUpdate(m) => {
                agent
                    .ack(m.volume_id, m.epoch)
                    .await
                    .unwrap_or_else(|e| panic!("ack: {e}"));
                latest = Some(m);
            }
            Push::Resume(r) if r.epoch > from_epoch => {
                let map = latest.unwrap_or_else(|| panic!("resumed at {} without a map", r.epoch));
                assert_eq!(
                    map.epoch, r.epoch,
                    "resumed on another epoch than the map's"
                );
                return map;
            }
            Push::Resume(_) | Push::RecoveryStatus(_) => {}
        }
    }
}

/// Waits for `server`, started with `SAND_CRASH_AT=crash_at`, to stop there.
pub async fn wait_for_crash(server: &mut TestServer, crash_at: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.is_running() {
        assert!(
            Instant::now() < deadline,
            "sand did not reach {crash_at}; log:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}
