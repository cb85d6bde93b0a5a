//! `make demo`: a server on the host with two image files as SAN disks, one QEMU client guest
//! running the real module. The guest attaches a volume through the agent, writes and reads
//! it, and shows `sanctl status`; the host shows the server's view. Then the volume's SAN disk
//! fails under load (dm-error inside the guest): I/O is redirected to the server and the
//! agent reports the failure; the server still reads the disk, so that alone moves nothing
//! (`pool list` shows the client's failed path) until the host declares the disk failed with
//! `sanctl recovery start`: the server recovers the volume onto the spare disk with progress
//! reports, and direct I/O resumes there.
//! Last, with fio writing and verifying in the guest, the host moves the volume live onto a
//! third disk with `sanctl volume move` (its progress bar on the terminal). Then the client
//! is partitioned (its agent stopped): its kernel holds I/O once its lease lapses, the host
//! grows the volume, which commits once the silent client's lease has run out (it is fenced),
//! and the client's held write fails after its I/O timeout instead of landing late.
//! Between the two, with fio still writing, the host takes two snapshots, backs them up in
//! full and incrementally over NBD and reads the later one with `qemu-img`.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use sanblk_tests::{
    module_path, scratch_dir, sparse_image, spawn, target_bin, wait_for_path, SandServer, VmConfig,
};

const MIB: u64 = 1 << 20;

/// `sanctl` with its output (progress bars included) on this terminal.
fn sanctl_shown(server: &SandServer, args: &[&str]) -> Result<(), String> {
    let status = Command::new(target_bin("sanctl"))
        .arg("--admin-socket")
        .arg(&server.admin_socket)
        .args(args)
        .status()
        .map_err(|e| format!("sanctl: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("sanctl {args:?}: {status}"))
    }
}

/// While the guest's fio writes: two snapshots, a full and an incremental backup, the later
/// snapshot read by a stock NBD client (`qemu-img`) and compared with the backup.
fn snapshots_and_backups(server: &SandServer, dir: &Path, log_dir: &Path) -> Result<(), String> {
    wait_for_path(&log_dir.join("snap.ready"), Duration::from_secs(240))?;
    println!("== host: sanctl snapshot create demo monday (the guest's fio keeps writing)");
    sanctl_shown(
        server,
        &["snapshot", "create", "demo", "monday", "--cow-size", "64M"],
    )?;
    let image = dir.join("demo-backup.img").display().to_string();
    println!("== host: full backup of monday over NBD");
    sanctl_shown(server, &["backup", "demo", "monday", "--to", &image])?;
    // Until the guest's writes since monday have copied a few chunks.
    let list = |server: &SandServer| -> Result<Vec<sanblk_proto::protocol::SnapshotInfo>, String> {
        serde_json::from_str(&server.sanctl(&["--json", "snapshot", "list", "demo"]))
            .map_err(|e| format!("snapshot list: {e}"))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while list(server)?.first().is_none_or(|s| s.changed_chunks < 16) {
        if Instant::now() > deadline {
            return Err("the guest wrote nothing after the snapshot".into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("== host: sanctl snapshot create demo tuesday; what changed since monday");
    sanctl_shown(
        server,
        &["snapshot", "create", "demo", "tuesday", "--cow-size", "64M"],
    )?;
    sanctl_shown(server, &["snapshot", "list", "demo"])?;
    let diff = server.sanctl(&["snapshot", "diff", "demo", "monday", "tuesday"]);
    println!(
        "snapshot diff monday tuesday: {} runs of changed chunks, the first ones:",
        diff.lines().count()
    );
    for line in diff.lines().take(3) {
        println!("  {line}");
    }
    println!("== host: incremental backup monday -> tuesday into the same image");
    sanctl_shown(
        server,
        &[
            "backup", "demo", "tuesday", "--to", &image, "--since", "monday",
        ],
    )?;
    let infos = list(server)?;
    let tuesday = infos
        .iter()
        .find(|s| s.name == "tuesday")
        .ok_or("tuesday not listed")?;
    let url = format!(
        "nbd+unix:///{}?socket={}",
        tuesday.export, tuesday.nbd_socket
    );
    let raw = dir.join("tuesday.raw");
    println!("== host: qemu-img convert -O raw '{url}' tuesday.raw");
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &url])
        .arg(&raw)
        .status()
        .map_err(|e| format!("qemu-img: {e}"))?;
    if !status.success() {
        return Err(format!("qemu-img: {status}"));
    }
    let same = std::fs::read(&raw).map_err(|e| e.to_string())?
        == std::fs::read(&image).map_err(|e| e.to_string())?;
    println!(
        "qemu-img's copy of tuesday and the full + incremental backup: {}",
        if same { "identical" } else { "DIFFERENT" }
    );
    if !same {
        return Err("the incremental backup differs from the snapshot".into());
    }
    sanctl_shown(server, &["snapshot", "delete", "demo", "monday"])?;
    sanctl_shown(server, &["snapshot", "delete", "demo", "tuesday"])?;
    std::fs::write(log_dir.join("snap.done"), b"").map_err(|e| e.to_string())?;
    Ok(())
}

fn demo() -> Result<(), String> {
    let dir = scratch_dir("demo").map_err(|e| e.to_string())?;
    println!(
        "== starting sand on 127.0.0.1 (metadata in {})",
        dir.display()
    );
    let server = SandServer::start(&dir)?;
    let mut images = Vec::new();
    for i in 0..3 {
        let path = dir.join(format!("san{i}.img"));
        sparse_image(&path, 256 * MIB).map_err(|e| e.to_string())?;
        images.push(path);
    }
    // The volume lands on san0, the only device when it is created; san1 is the spare.
    print!(
        "{}",
        server.sanctl(&["pool", "add", &images[0].display().to_string()])
    );
    print!("{}", server.sanctl(&["volume", "create", "demo", "64M"]));
    print!(
        "{}",
        server.sanctl(&["pool", "add", &images[1].display().to_string()])
    );
    let secret = dir.join("client1.secret");
    server.sanctl(&[
        "client",
        "add",
        "client1",
        "--secret-out",
        &secret.display().to_string(),
    ]);
    server.sanctl(&["client", "grant", "client1", "demo", "rw"]);
    println!("== server view");
    print!("{}", server.sanctl(&["pool", "list"]));
    print!("{}", server.sanctl(&["volume", "show", "demo"]));

    let io_port = server.io_port()?;
    let script = format!(
        r#"exec > demo.txt 2>&1
set -e
echo "== guest: loading sanblk.ko; SAN disk san0 is a dm device over /dev/vda so it can fail"
insmod {module}
S={sanctl}
SECTORS=$(blockdev --getsz /dev/vda)
dmsetup create san0 --table "0 $SECTORS linear /dev/vda 0"
$S attach demo --server 10.0.2.100:{port} --client client1 --secret-file {secret} \
    --device /dev/mapper/san0 --device /dev/vdb --device /dev/vdc --io-server 10.0.2.100:{io_port} \
    --io-timeout 10 > agent.txt 2>&1 &
AGENT=$!
for i in $(seq 1 200); do [ -e /run/sanblk/demo.device ] && break; sleep 0.2; done
cat agent.txt
dev=$(cat /run/sanblk/demo.device)
echo "== guest: writing 32 MiB to $dev and reading it back"
dd if=/dev/urandom of=/tmp/data bs=1M count=32 status=none
dd if=/tmp/data of=$dev bs=1M oflag=direct status=none
dd if=$dev of=/tmp/back bs=1M count=32 iflag=direct status=none
cmp /tmp/data /tmp/back && echo "read back identical"
echo "== guest: sanctl status"
$S status
echo "== guest: san0 fails (dm-error); a writer keeps going"
dd if=/dev/urandom of=/tmp/more bs=1M count=16 status=none
dmsetup reload san0 --table "0 $SECTORS error"
dmsetup resume san0
dd if=/tmp/more of=$dev bs=1M seek=32 oflag=direct status=none && echo "writer finished without an error"
$S status
for i in $(seq 1 900); do grep -q "now at epoch 3" agent.txt && break; sleep 0.2; done
echo "== guest: agent log (failure reported, recovery progress, new epoch)"
cat agent.txt
echo "== guest: sanctl status after recovery (direct I/O on the spare disk)"
$S status
dd if=$dev of=/tmp/back bs=1M count=32 iflag=direct status=none
dd if=$dev of=/tmp/moreback bs=1M skip=32 count=16 iflag=direct status=none
cmp /tmp/data /tmp/back && cmp /tmp/more /tmp/moreback && echo "all 48 MiB read back identical"
# fio_until FILE IO_SIZE WHAT: verified fio passes until the host creates FILE.
fio_until() {{
    i=0
    while [ ! -e $1 ]; do
        fio --name=pass$i --filename=$dev --direct=1 --rw=randwrite --bs=4k --size=64M \
            --io_size=$2 --verify=crc32c --verify_fatal=1 --randrepeat=0 --minimal > /dev/null
        i=$((i+1))
    done
    echo "fio: $i passes with verification, no error, during $3"
}}
echo "== guest: fio writes and verifies while the host moves the volume to another disk"
touch move.ready
fio_until move.done 4M "the move"
$S status
echo "== guest: fio keeps writing while the host takes snapshots and backs them up"
touch snap.ready
fio_until snap.done 2M "the snapshots and backups"
echo "== guest: partition: the agent is stopped (no lease renewals); 8 s later a writer starts"
kill -STOP $AGENT
sleep 8
(dd if=/tmp/more of=$dev bs=1M count=1 oflag=direct status=none 2>/dev/null \
    && echo "held writer: written (it should not have been)" \
    || echo "held writer: I/O error after the I/O timeout (10 s); nothing written") &
WRITER=$!
sleep 2
echo "== guest: sanctl status (lease lapsed: the kernel holds the write)"
$S status
touch partitioned
for i in $(seq 1 600); do [ -e fenced ] && break; sleep 0.2; done
kill -CONT $AGENT
wait $WRITER
for i in $(seq 1 100); do grep -q FENCED agent.txt && break; sleep 0.2; done
grep FENCED agent.txt
$S status
$S detach demo
dmsetup remove san0
"#,
        module = module_path().display(),
        sanctl = target_bin("sanctl").display(),
        port = server.port,
        secret = secret.display(),
    );
    let mut config = VmConfig::new("demo", &script)
        .forward_port(server.port)
        .forward_port(io_port)
        .timeout(Duration::from_secs(600));
    for image in &images {
        config = config.disk(image);
    }
    println!("== booting the client guest (QEMU, TCG; a few minutes)");
    let vm = spawn(&config).map_err(|e| format!("{e:?}"))?;
    let log_dir = vm.log_dir().to_path_buf();
    let san0 = images[0].display().to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !server
        .pool()
        .iter()
        .any(|d| d.path == san0 && !d.path_failed_on.is_empty())
    {
        if Instant::now() > deadline {
            return Err("the guest's agent did not report san0's path failed".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "== host: the client reported its path to san0 failed; the server still reads san0, so \
         the client's I/O goes through the server and nothing moves yet"
    );
    print!("{}", server.sanctl(&["pool", "list"]));
    println!("== host: sanctl recovery start san0 (the administrator declares it failed)");
    sanctl_shown(&server, &["recovery", "start", &san0])?;
    wait_for_path(&log_dir.join("move.ready"), Duration::from_secs(240))?;
    // The recovery went to san1, the only spare then; san2 joins the pool now.
    print!(
        "{}",
        server.sanctl(&["pool", "add", &images[2].display().to_string()])
    );
    println!("== host: sanctl volume move demo (live, the guest's fio keeps going)");
    let from = images[1].display().to_string();
    let to = images[2].display().to_string();
    let moved = sanctl_shown(
        &server,
        &["volume", "move", "demo", "--from", &from, "--to", &to],
    );
    // The guest stops its fio loop either way.
    std::fs::write(log_dir.join("move.done"), b"").map_err(|e| e.to_string())?;
    moved?;
    snapshots_and_backups(&server, &dir, &log_dir)?;
    wait_for_path(&log_dir.join("partitioned"), Duration::from_secs(240))?;
    println!("== host: the client is partitioned; sanctl volume grow demo 96M fences it");
    print!("{}", server.sanctl(&["volume", "show", "demo"]));
    let started = Instant::now();
    print!("{}", server.sanctl(&["volume", "grow", "demo", "96M"]));
    println!(
        "grow committed in {:.1} s without the silent client: its lease (6 s, plus the 2 s \
         in-flight bound) ran out during the partition, so it is fenced, not waited for",
        started.elapsed().as_secs_f64()
    );
    std::fs::write(log_dir.join("fenced"), b"").map_err(|e| e.to_string())?;
    let outcome = vm.wait().map_err(|e| format!("{e:?}"))?;
    print!("{}", outcome.read_out_file("demo.txt").unwrap_or_default());
    outcome.check_clean_success()?;
    println!("== server view after recovery, move and detach");
    print!("{}", server.sanctl(&["pool", "list"]));
    print!("{}", server.sanctl(&["volume", "show", "demo"]));
    println!("== guest log: {}", outcome.log_dir.display());
    Ok(())
}

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}
