//! Drives the real `sanctl` binary against a real `sand` process.

use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sanblk_proto::auth::read_secret_file;
use sanblk_proto::client::{AgentClient, Push};
use sanblk_proto::map::AccessMode;

const MIB: u64 = 1 << 20;

/// The `sand` binary: built next to `sanctl` by a workspace build; built on demand otherwise.
fn sand_binary() -> PathBuf {
    let sanctl = PathBuf::from(env!("CARGO_BIN_EXE_sanctl"));
    let sand = sanctl.with_file_name("sand");
    if !sand.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "sand", "--bin", "sand"])
            .status()
            .unwrap_or_else(|e| panic!("building sand: {e}"));
        assert!(status.success(), "building sand failed");
    }
    sand
}

struct Server {
    child: Child,
    dir: tempfile::TempDir,
    admin_socket: PathBuf,
    agent_address: std::net::SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Server {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let metadata_dir = dir.path().join("meta");
    let child = Command::new(sand_binary())
        .arg("--metadata-dir")
        .arg(&metadata_dir)
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning sand: {e}"));
    let admin_socket = metadata_dir.join("admin.sock");
    // Owned by the guard before anything can panic, so the child is always reaped.
    let mut server = Server {
        child,
        dir,
        admin_socket: admin_socket.clone(),
        agent_address: ([127, 0, 0, 1], 0).into(),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if admin_socket.exists() {
            if let Ok(text) = std::fs::read_to_string(metadata_dir.join("agent.addr")) {
                if let Ok(agent_address) = text.trim().parse() {
                    server.agent_address = agent_address;
                    return server;
                }
            }
        }
        assert!(Instant::now() < deadline, "sand did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sanctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sanctl"))
        .args(args)
        .env("SAND_ADMIN_SOCKET", socket)
        .output()
        .unwrap_or_else(|e| panic!("running sanctl: {e}"))
}

fn ok(socket: &Path, args: &[&str]) -> String {
    let output = sanctl(socket, args);
    assert!(
        output.status.success(),
        "sanctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn json(socket: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(socket, &all))
        .unwrap_or_else(|e| panic!("sanctl {args:?}: bad JSON: {e}"))
}

fn image(dir: &Path, name: &str, size: u64) -> String {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap_or_else(|e| panic!("{e}"));
    file.set_len(size).unwrap_or_else(|e| panic!("{e}"));
    path.display().to_string()
}

#[test]
fn admin_workflow_with_tables_json_and_exit_codes() {
    let server = start_server();
    let socket = server.admin_socket.as_path();
    let first = image(server.dir.path(), "a.img", 64 * MIB);
    let second = image(server.dir.path(), "b.img", 64 * MIB);

    assert!(ok(socket, &["pool", "add", &first]).contains("added"));
    // A mirror needs two devices: the server says no -> exit 1 with its message.
    let refused = sanctl(
        socket,
        &["volume", "create", "m", "8M", "--layout", "mirror"],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("needs 2 devices"));
    let refused = sanctl(
        socket,
        &[
            "--json", "volume", "create", "m", "8M", "--layout", "mirror",
        ],
    );
    let error: serde_json::Value = serde_json::from_slice(&refused.stderr)
        .unwrap_or_else(|e| panic!("--json error is not JSON: {e}"));
    assert_eq!(error["exit_code"], serde_json::json!(1));
    ok(socket, &["pool", "add", &second]);
    let devices = json(socket, &["pool", "list"]);
    assert_eq!(devices.as_array().map(Vec::len), Some(2));
    assert_eq!(devices[0]["free_bytes"], serde_json::json!(63 * MIB));
    assert!(ok(socket, &["pool", "list"]).starts_with("DEVICE"));

    ok(
        socket,
        &["volume", "create", "m", "8M", "--layout", "mirror"],
    );
    let shown = json(socket, &["volume", "show", "m"]);
    assert_eq!(shown["map"]["size_bytes"], serde_json::json!(8 * MIB));
    assert_eq!(
        shown["map"]["extents"][0]["replicas"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert!(ok(socket, &["volume", "list"]).contains("mirror"));
    ok(socket, &["volume", "grow", "m", "12M"]);
    assert_eq!(
        json(socket, &["volume", "show", "m"])["map"]["epoch"],
        serde_json::json!(2)
    );
    let full = sanctl(socket, &["volume", "create", "big", "1G"]);
    assert_eq!(full.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&full.stderr).contains("not enough space"));

    // Usage errors -> 2; unreachable server -> 3.
    assert_eq!(
        sanctl(socket, &["volume", "create", "x", "12Q"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(sanctl(socket, &["volume", "create"]).status.code(), Some(2));
    assert_eq!(
        sanctl(
            socket,
            &["volume", "create", "x", "1M", "--layout", "raid5"]
        )
        .status
        .code(),
        Some(2)
    );
    let nowhere = server.dir.path().join("no.sock");
    assert_eq!(sanctl(&nowhere, &["pool", "list"]).status.code(), Some(3));

    // Client with the secret written 0600; the agent authenticates with it.
    let secret_path = server.dir.path().join("host1.secret");
    let secret_arg = secret_path.display().to_string();
    let printed = ok(
        socket,
        &["client", "add", "host1", "--secret-out", &secret_arg],
    );
    let mode = std::fs::metadata(&secret_path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    assert_eq!(mode, 0o600);
    let stored = std::fs::read_to_string(&secret_path).unwrap_or_default();
    assert_eq!(stored.trim().len(), 64);
    assert!(
        printed.contains(stored.trim()),
        "printed secret differs from the file"
    );
    ok(socket, &["client", "grant", "host1", "m", "rw"]);
    let clients = json(socket, &["client", "list"]);
    assert_eq!(clients[0]["grants"][0]["name"], serde_json::json!("m"));
    assert_eq!(clients[0]["grants"][0]["mode"], serde_json::json!("rw"));
    assert_eq!(
        sanctl(socket, &["client", "grant", "host1", "m", "rwx"])
            .status
            .code(),
        Some(2)
    );

    let secret = read_secret_file(&secret_path).unwrap_or_else(|e| panic!("{e}"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let (agent, attachment) = runtime
        .block_on(async {
            let mut agent = AgentClient::connect(server.agent_address, "host1", &secret).await?;
            let attachment = agent.attach("m", AccessMode::Rw).await?;
            Ok::<_, sanblk_proto::client::ClientError>((agent, attachment))
        })
        .unwrap_or_else(|e| panic!("attach: {e}"));
    assert_eq!(attachment.map.size_bytes, 12 * MIB);

    // Deleting an attached volume is refused; removing the client disconnects it, then the
    // delete goes through.
    let busy = sanctl(socket, &["volume", "delete", "m"]);
    assert_eq!(busy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("attached"));
    ok(socket, &["client", "remove", "host1"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sanctl(socket, &["volume", "delete", "m"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "volume still attached after its client was removed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(agent);
    assert_eq!(json(socket, &["volume", "list"]), serde_json::json!([]));
}

#[test]
fn help_has_examples() {
    let output = Command::new(env!("CARGO_BIN_EXE_sanctl"))
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(
        text.contains("Examples:") && text.contains("Exit codes"),
        "{text}"
    );
    // A local failure (e.g. an image that cannot be written) exits 1, as documented.
    assert!(
        text.contains("1 refused or failed, by the server or on this\nhost"),
        "{text}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_sanctl"))
        .args(["volume", "create", "--help"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(String::from_utf8_lossy(&output.stdout).contains("--layout mirror"));
}

#[test]
fn recovery_list_and_volume_show_draw_progress() {
    let server = start_server();
    let socket = server.admin_socket.as_path();
    for name in ["a.img", "b.img"] {
        ok(
            socket,
            &["pool", "add", &image(server.dir.path(), name, 64 * MIB)],
        );
    }
    ok(socket, &["volume", "create", "v", "4M"]);
    assert_eq!(json(socket, &["recovery", "list"]), serde_json::json!([]));
    let secret_path = server.dir.path().join("host1.secret");
    let secret_arg = secret_path.display().to_string();
    ok(
        socket,
        &["client", "add", "host1", "--secret-out", &secret_arg],
    );
    ok(socket, &["client", "grant", "host1", "v", "rw"]);
    let secret = read_secret_file(&secret_path).unwrap_or_else(|e| panic!("{e}"));
    let shown = json(socket, &["volume", "show", "v"]);
    let device: uuid::Uuid =
        serde_json::from_value(shown["map"]["extents"][0]["replicas"][0]["device_uuid"].clone())
            .unwrap_or_else(|e| panic!("{e}"));
    let address = server.agent_address;
    // The agent stays connected (attached) while the CLI looks at the recovery, and answers
    // the recovery's changes (quiesce, new map) as a real agent does.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        runtime.block_on(follow_as_agent(address, secret, device))
    });
    // The server reads the device itself, so the report alone moves nothing: `pool list`
    // shows the client's failed path, and the administrator declares the device failed.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let pool = ok(socket, &["pool", "list"]);
        if pool.contains("online, path failed on host1") {
            break;
        }
        assert!(Instant::now() < deadline, "no path failure shown: {pool}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(json(socket, &["recovery", "list"]), serde_json::json!([]));
    ok(
        socket,
        &["recovery", "start", &device.to_string(), "--no-wait"],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = json(socket, &["recovery", "list"]);
        if list[0]["state"] == serde_json::json!("done") {
            assert_eq!(list[0]["bytes_done"], serde_json::json!(4 * MIB));
            assert_eq!(list[0]["percent"], serde_json::json!(100.0));
            break;
        }
        assert!(Instant::now() < deadline, "recovery did not finish: {list}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let table = ok(socket, &["recovery", "list"]);
    assert!(table.starts_with("VOLUME"), "{table}");
    assert!(
        table.contains(&format!("[{}] 100.0%", "#".repeat(30))),
        "{table}"
    );
    let shown = ok(socket, &["volume", "show", "v"]);
    assert!(shown.contains("recovery done (device"), "{shown}");
}

/// Attaches `v` as host1, reports its path to `device` failed, then answers the recovery's changes
/// (quiesce, new map) as a real agent does until the server goes away.
async fn follow_as_agent(address: std::net::SocketAddr, secret: Vec<u8>, device: uuid::Uuid) {
    let mut agent = AgentClient::connect(address, "host1", &secret)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let attached = agent
        .attach("v", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    agent
        .report_failure(attached.map.volume_id, device, "test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    while let Ok(push) = agent.next_push().await {
        let answered = match push {
            Push::Quiesce(q) => agent.quiesce_ack(q.volume_id, q.epoch).await,
            Push::MapUpdate(m) => agent.ack(m.volume_id, m.epoch).await,
            _ => Ok(()),
        };
        if answered.is_err() {
            break;
        }
    }
}

/// `sanctl` run as `nobody` (uid 65534) with `setpriv`; None when this test cannot switch
/// users (not root, or no setpriv).
fn sanctl_as_nobody(args: &[&str]) -> Option<Output> {
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run sanctl as another user");
        return None;
    }
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_sanctl"))
        .args(args)
        .output();
    match output {
        Ok(output) => Some(output),
        Err(error) => {
            eprintln!("skipped: setpriv: {error}");
            None
        }
    }
}

/// `sanctl detach` by a user who may not signal the agent says so, and leaves the agent and
/// its run files alone (it used to report the agent gone and remove its files).
#[test]
fn detach_without_permission_to_signal_the_agent_says_so() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    // A stand-in for a root-owned agent.
    let mut agent = Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap_or_else(|e| panic!("sleep: {e}"));
    let pid_file = dir.path().join("vol.pid");
    std::fs::write(&pid_file, agent.id().to_string()).unwrap_or_else(|e| panic!("{e}"));
    let run_dir = dir.path().display().to_string();
    let output = sanctl_as_nobody(&["detach", "vol", "--run-dir", &run_dir]);
    let still_running = matches!(agent.try_wait(), Ok(None));
    let _ = agent.kill();
    let _ = agent.wait();
    let Some(output) = output else { return };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "detach succeeded: {stderr}");
    assert!(!stderr.contains("is gone"), "{stderr}");
    assert!(stderr.contains("may not signal it (EPERM)"), "{stderr}");
    assert!(still_running, "the agent was stopped");
    assert!(pid_file.exists(), "the agent's pid file was removed");
}

/// Fills `length` bytes of `path` at `offset` with a pattern no 64 KiB block of which is all
/// zeroes (a backup skips those), different for each `seed`.
fn fill(path: &Path, offset: u64, length: u64, seed: u64) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut state = seed | 1;
    let mut block = vec![0u8; MIB as usize];
    for at in (0..length).step_by(MIB as usize) {
        for word in block.chunks_mut(8) {
            // xorshift64: never zero from a non-zero state.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all_at(&block, offset + at)
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn a_killed_backup_runs_again_and_leaves_the_snapshot_alone() {
    let server = start_server();
    let socket = server.admin_socket.as_path();
    let dir = server.dir.path();
    const VOLUME: u64 = 256 * MIB;
    let disk = image(dir, "disk.img", VOLUME + 32 * MIB);
    ok(socket, &["pool", "add", &disk]);
    ok(socket, &["volume", "create", "vb", "256M"]);
    let shown = json(socket, &["volume", "show", "vb"]);
    let offset = shown["map"]["extents"][0]["replicas"][0]["device_offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no device offset in {shown}"));
    fill(Path::new(&disk), offset, VOLUME, 1);
    ok(
        socket,
        &["snapshot", "create", "vb", "s1", "--cow-size", "4M"],
    );
    let out = dir.join("backup.img");
    let out_arg = out.display().to_string();
    ok(socket, &["backup", "vb", "s1", "--to", &out_arg]);
    let record = PathBuf::from(format!("{out_arg}.sanblk-backup.json"));
    assert!(record.exists(), "no backup record after a full backup");
    let listed_before = json(socket, &["snapshot", "list", "vb"]);

    // A full backup of s2 into the same image, killed once it has written something: the
    // image no longer holds s1, so it must not claim to.
    fill(Path::new(&disk), offset, VOLUME, 2);
    ok(
        socket,
        &["snapshot", "create", "vb", "s2", "--cow-size", "4M"],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_sanctl"))
        .args(["backup", "vb", "s2", "--to", &out_arg])
        .env("SAND_ADMIN_SOCKET", socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("running sanctl: {e}"));
    // Killed once the old image has been truncated (no blocks) and some of s2 is written.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut truncated = false;
    loop {
        let blocks = std::fs::metadata(&out).map(|m| m.blocks()).unwrap_or(0);
        truncated |= blocks == 0;
        if truncated && blocks > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the backup wrote nothing");
        assert!(
            child.try_wait().ok().flatten().is_none(),
            "the backup finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap_or_else(|e| panic!("{e}"));
    let status = child.wait().unwrap_or_else(|e| panic!("{e}"));
    assert!(!status.success(), "killed, yet {status}");
    assert!(
        !record.exists(),
        "a backup killed midway left a record claiming the image is complete"
    );
    let refused = sanctl(
        socket,
        &["backup", "vb", "s2", "--to", &out_arg, "--since", "s1"],
    );
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("make a full backup first"),
        "{refused:?}"
    );

    // Run again: the image is s2 exactly, and the snapshots are as they were.
    ok(socket, &["backup", "vb", "s2", "--to", &out_arg]);
    let mut origin = vec![0u8; VOLUME as usize];
    std::fs::File::open(&disk)
        .and_then(|f| f.read_exact_at(&mut origin, offset))
        .unwrap_or_else(|e| panic!("{e}"));
    let backup = std::fs::read(&out).unwrap_or_else(|e| panic!("{e}"));
    assert!(backup == origin, "the backup run again differs from s2");
    let listed_after = json(socket, &["snapshot", "list", "vb"]);
    let s1 = |listed: &serde_json::Value| {
        listed
            .as_array()
            .and_then(|all| all.iter().find(|s| s["name"] == "s1").cloned())
            .unwrap_or_else(|| panic!("no s1 in {listed}"))
    };
    assert_eq!(s1(&listed_before), s1(&listed_after), "s1 changed");
}

/// The error of a failed `sanctl` run, with its exit code checked.
fn fails(socket: &Path, args: &[&str], code: i32) -> String {
    let output = sanctl(socket, args);
    assert_eq!(
        output.status.code(),
        Some(code),
        "sanctl {args:?}: {output:?}"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn backups_refuse_a_base_they_cannot_build_on_and_say_what_to_do() {
    let server = start_server();
    let socket = server.admin_socket.as_path();
    let dir = server.dir.path();
    const VOLUME: u64 = 8 * MIB;
    let disk = image(dir, "disk.img", 64 * MIB);
    ok(socket, &["pool", "add", &disk]);
    ok(socket, &["volume", "create", "wk", "8M"]);
    let shown = json(socket, &["volume", "show", "wk"]);
    let offset = shown["map"]["extents"][0]["replicas"][0]["device_offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no device offset in {shown}"));
    let out = dir.join("wk.img").display().to_string();

    // Last week's monday, backed up, then deleted; this week's monday is another snapshot.
    fill(Path::new(&disk), offset, VOLUME, 1);
    ok(socket, &["snapshot", "create", "wk", "monday"]);
    ok(socket, &["backup", "wk", "monday", "--to", &out]);
    ok(socket, &["snapshot", "delete", "wk", "monday"]);
    fill(Path::new(&disk), offset, VOLUME, 2);
    ok(socket, &["snapshot", "create", "wk", "monday"]);
    ok(socket, &["snapshot", "create", "wk", "tuesday"]);
    let refused = fails(
        socket,
        &["backup", "wk", "tuesday", "--to", &out, "--since", "monday"],
        2,
    );
    assert!(refused.contains("no longer exists"), "{refused}");
    assert!(refused.contains("make a full backup"), "{refused}");

    // Done already: run again, nothing to do.
    ok(socket, &["backup", "wk", "tuesday", "--to", &out]);
    let again = ok(
        socket,
        &["backup", "wk", "tuesday", "--to", &out, "--since", "monday"],
    );
    assert!(
        again.contains("nothing to copy (it did already)"),
        "{again}"
    );
    // Backwards: refused with the way out.
    let refused = fails(
        socket,
        &["backup", "wk", "monday", "--to", &out, "--since", "tuesday"],
        2,
    );
    assert!(
        refused.contains("make a full backup of wk@monday"),
        "{refused}"
    );
    ok(
        socket,
        &["snapshot", "create", "wk", "fine", "--chunk-size", "4K"],
    );
    // Across chunk sizes: what changed since tuesday (nothing), and the image is fine's.
    let printed = ok(
        socket,
        &["backup", "wk", "fine", "--to", &out, "--since", "tuesday"],
    );
    assert!(
        printed.contains("nothing changed since tuesday"),
        "{printed}"
    );
    let full = dir.join("fine-full.img").display().to_string();
    ok(socket, &["backup", "wk", "fine", "--to", &full]);
    assert!(
        std::fs::read(&out).ok() == std::fs::read(&full).ok(),
        "the incremental backup across chunk sizes differs from a full one"
    );

    // A target in a missing directory, or a directory.
    let missing = dir.join("no-such-dir").join("x.img").display().to_string();
    let refused = fails(socket, &["backup", "wk", "fine", "--to", &missing], 1);
    assert!(refused.contains("create the directory"), "{refused}");

    // Restoring a directory creates nothing; onto an existing name says how to go on.
    let directory = dir.display().to_string();
    let refused = fails(socket, &["restore", &directory, "copy"], 2);
    assert!(refused.contains("is a directory"), "{refused}");
    let volumes = json(socket, &["volume", "list"]);
    assert!(
        volumes
            .as_array()
            .is_some_and(|all| all.iter().all(|v| v["name"] != "copy")),
        "a failed restore left a volume: {volumes}"
    );
    let refused = fails(socket, &["restore", &out, "wk"], 1);
    assert!(refused.contains("sanctl volume delete wk"), "{refused}");
}

/// Fills volume bytes `[start, end)` of `volume` (on the one device `disk`) with pattern
/// `seed`, where its map says they are.
fn fill_volume(socket: &Path, disk: &str, volume: &str, start: u64, end: u64, seed: u64) {
    let shown = json(socket, &["volume", "show", volume]);
    let extents = shown["map"]["extents"]
        .as_array()
        .unwrap_or_else(|| panic!("no extents in {shown}"))
        .clone();
    for extent in extents {
        let field = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("{extent}"));
        let (at, length) = (field(&extent["volume_offset"]), field(&extent["length"]));
        let device = field(&extent["replicas"][0]["device_offset"]);
        let (from, to) = (start.max(at), end.min(at + length));
        if from < to {
            fill(Path::new(disk), device + from - at, to - from, seed);
        }
    }
}

#[test]
fn an_incremental_backup_that_stops_midway_leaves_the_image_marked_partial() {
    let server = start_server();
    let socket = server.admin_socket.as_path();
    let dir = server.dir.path();
    let disk = image(dir, "disk.img", 64 * MIB);
    ok(socket, &["pool", "add", &disk]);
    ok(socket, &["volume", "create", "pv", "8M"]);
    fill_volume(socket, &disk, "pv", 0, 8 * MIB, 1);
    ok(socket, &["snapshot", "create", "pv", "s1"]);
    let out = dir.join("pv.img").display().to_string();
    ok(socket, &["backup", "pv", "s1", "--to", &out]);
    // Grown and written there: an incremental backup copies the new 8 MiB.
    ok(socket, &["volume", "grow", "pv", "16M"]);
    ok(socket, &["snapshot", "create", "pv", "between"]);
    fill_volume(socket, &disk, "pv", 8 * MIB, 16 * MIB, 2);
    ok(socket, &["snapshot", "create", "pv", "s2"]);
    // Stopped once it starts on the image: no file may grow past 8 MiB (SIGXFSZ).
    let sanctl_path = env!("CARGO_BIN_EXE_sanctl");
    let stopped = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -f 8192; exec {sanctl_path} backup pv s2 --to {out} --since s1"
        ))
        .env("SAND_ADMIN_SOCKET", socket)
        .output()
        .unwrap_or_else(|e| panic!("bash: {e}"));
    assert!(!stopped.status.success(), "{stopped:?}");

    // The image is not s1 any more: not restored, not a base for an older snapshot.
    let refused = fails(socket, &["restore", &out, "copy"], 2);
    assert!(refused.contains("half-written"), "{refused}");
    let refused = fails(
        socket,
        &["backup", "pv", "between", "--to", &out, "--since", "s1"],
        2,
    );
    assert!(refused.contains("stopped midway"), "{refused}");
    // Run again, it completes the image: s2 exactly.
    ok(
        socket,
        &["backup", "pv", "s2", "--to", &out, "--since", "s1"],
    );
    let full = dir.join("full.img").display().to_string();
    ok(socket, &["backup", "pv", "s2", "--to", &full]);
    let read = |path: &str| std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(read(&out) == read(&full), "the completed image is not s2");
    ok(socket, &["restore", &out, "copy"]);
}

/// `snapshot delete` says the snapshot is deleted, also in JSON; a diff with nothing in it,
/// and a list of a volume without snapshots, print a note on stderr (none with --json, whose
/// output stays JSON); the diff prints nothing on stdout.
#[test]
fn a_deleted_snapshot_and_an_empty_diff_say_so() {
    let server = start_server();
    let socket = server.admin_socket.as_path();
    ok(
        socket,
        &[
            "pool",
            "add",
            &image(server.dir.path(), "disk.img", 64 * MIB),
        ],
    );
    ok(socket, &["volume", "create", "v", "8M"]);
    // Before any snapshot: the table's header, and a note saying why it is empty.
    let list = sanctl(socket, &["snapshot", "list", "v"]);
    assert!(list.status.success(), "{list:?}");
    assert!(
        String::from_utf8_lossy(&list.stdout).starts_with("SNAPSHOT"),
        "{list:?}"
    );
    let note = String::from_utf8_lossy(&list.stderr);
    assert_eq!(
        note,
        "volume v has no snapshots (take one with `sanctl snapshot create v NAME`)\n"
    );
    let list = sanctl(socket, &["--json", "snapshot", "list", "v"]);
    assert!(list.status.success() && list.stderr.is_empty(), "{list:?}");
    assert_eq!(list.stdout, b"[]\n", "{list:?}");
    for name in ["a", "b", "c"] {
        ok(socket, &["snapshot", "create", "v", name]);
    }
    let diff = sanctl(socket, &["snapshot", "diff", "v", "a", "b"]);
    assert!(diff.status.success(), "{diff:?}");
    assert!(diff.stdout.is_empty(), "{diff:?}");
    let note = String::from_utf8_lossy(&diff.stderr);
    assert_eq!(note, "no chunk of v was written between a and b\n");
    let diff = sanctl(socket, &["--json", "snapshot", "diff", "v", "a", "b"]);
    assert!(diff.status.success() && diff.stderr.is_empty(), "{diff:?}");
    let changes: serde_json::Value =
        serde_json::from_slice(&diff.stdout).unwrap_or_else(|e| panic!("{diff:?}: {e}"));
    assert_eq!(changes["chunks"], serde_json::json!([]));

    let deleted = json(socket, &["snapshot", "delete", "v", "a"]);
    assert_eq!(deleted["name"], serde_json::json!("a"));
    assert_eq!(deleted["state"], serde_json::json!("deleted"));
    let said = ok(socket, &["snapshot", "delete", "v", "b"]);
    assert!(said.starts_with("snapshot b of v deleted"), "{said}");
    let left = json(socket, &["snapshot", "list", "v"]);
    assert_eq!(left.as_array().map(Vec::len), Some(1), "{left}");

    // The volume's last snapshot keeps it from being deleted, until --force.
    let refused = sanctl(socket, &["volume", "delete", "v"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("volume v has 1 snapshot(s) (c)") && said.contains("--force"),
        "{said}"
    );
    let left = json(socket, &["snapshot", "list", "v"]);
    assert_eq!(left.as_array().map(Vec::len), Some(1), "{left}");
    let said = ok(socket, &["volume", "delete", "v", "--force"]);
    assert_eq!(said, "deleted volume v and its snapshot(s) c\n");
}

/// A loop device over a file of `size` bytes, detached when dropped.
struct LoopDevice {
    path: String,
}

impl LoopDevice {
    /// None when this host cannot set one up (not root, no loop driver).
    fn new(file: &Path, size: u64) -> Option<LoopDevice> {
        std::fs::File::create(file)
            .and_then(|f| f.set_len(size))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let output = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output();
        match output {
            Ok(output) if output.status.success() => Some(LoopDevice {
                path: String::from_utf8_lossy(&output.stdout).trim().to_string(),
            }),
            other => {
                eprintln!("skipped: no loop device: {other:?}");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
    }
}

/// A full backup onto a block device writes the snapshot from its start, zeros included, and
/// leaves the rest; a device too small, in use, or given with --since is refused.
#[test]
fn a_full_backup_goes_onto_a_block_device() {
    let server = start_server();
    let socket = server.admin_socket.as_path();
    let dir = server.dir.path();
    let Some(device) = LoopDevice::new(&dir.join("loop.img"), 12 * MIB) else {
        return;
    };
    let target = device.path.as_str();
    let disk = image(dir, "disk.img", 64 * MIB);
    ok(socket, &["pool", "add", &disk]);
    ok(socket, &["volume", "create", "big", "16M"]);
    ok(socket, &["snapshot", "create", "big", "s"]);
    let refused = fails(socket, &["backup", "big", "s", "--to", target], 2);
    let needs = format!(
        "{target} holds {} bytes (12M), the snapshot needs",
        12 * MIB
    );
    assert!(refused.contains(&needs), "{refused}");

    // Half written, half zeros, onto a device full of something else.
    ok(socket, &["volume", "create", "v", "8M"]);
    fill_volume(socket, &disk, "v", 0, 4 * MIB, 1);
    ok(socket, &["snapshot", "create", "v", "s"]);
    fill(Path::new(target), 0, 12 * MIB, 9);
    let read_device = || std::fs::read(target).unwrap_or_else(|e| panic!("{target}: {e}"));
    let before = read_device();
    {
        let _held = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(target)
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        let refused = fails(socket, &["backup", "v", "s", "--to", target], 1);
        assert!(refused.contains("in use"), "{refused}");
    }
    ok(socket, &["backup", "v", "s", "--to", target]);
    let shown = json(socket, &["volume", "show", "v"]);
    let offset = shown["map"]["extents"][0]["replicas"][0]["device_offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no device offset in {shown}"));
    let mut origin = vec![0u8; 8 * MIB as usize];
    std::fs::File::open(&disk)
        .and_then(|f| f.read_exact_at(&mut origin, offset))
        .unwrap_or_else(|e| panic!("{e}"));
    let after = read_device();
    assert!(
        after[..origin.len()] == origin,
        "the device is not the snapshot"
    );
    assert!(
        after[origin.len()..] == before[origin.len()..],
        "the device past the snapshot changed"
    );
    assert!(!Path::new(&format!("{target}.sanblk-backup.json")).exists());
    let refused = fails(
        socket,
        &["backup", "v", "s", "--to", target, "--since", "s"],
        2,
    );
    assert!(refused.contains("full backups only"), "{refused}");
}

/// Without the module, the kernel-side commands say so in one line and how to load it (not
/// neli's dump of the controller's refusal).
#[test]
fn kernel_commands_without_the_module_say_how_to_load_it() {
    if Path::new("/sys/module/sanblk").exists() {
        eprintln!("skipped: the sanblk module is loaded on this host");
        return;
    }
    const NOT_LOADED: &str = "sanblk kernel module not loaded (no generic netlink family \
                              'sanblk'): load it first (`modprobe sanblk`, or `insmod sanblk.ko`)";
    let output = sanctl(Path::new("/nonexistent/admin.sock"), &["status"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        format!("sanctl: {NOT_LOADED}\n")
    );
    let output = sanctl(Path::new("/nonexistent/admin.sock"), &["--json", "status"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let error: serde_json::Value =
        serde_json::from_slice(&output.stderr).unwrap_or_else(|e| panic!("{output:?}: {e}"));
    assert_eq!(error["error"], serde_json::json!(NOT_LOADED), "{error}");
}
