//! `make bench` (snapshots, issue 16): what a snapshot costs the application, against
//! dm-snapshot (persistent, 64 KiB chunks) measured in the same guest run.
//!
//! One guest, a real `sand` on the host. Each job is fio, O_DIRECT, psync, QD 1, 4 KiB
//! blocks on a 64 MiB device:
//! - `uncopied`: one 4 KiB write at the start of every 64 KiB chunk (fio `write:60k`) of
//!   the first half, so every write is the first to its chunk since the snapshot (a
//!   copy-on-write each); `uncopied, QD 16`: the same over the second half with 16 writes
//!   at once (libaio);
//! - `copied`: the same job again: every chunk was copied already;
//! - `read`: random reads of the origin.
//!
//! Each runs without a snapshot and with one, on the sanblk volume (snapshot taken by the
//! host with `sanctl snapshot create`, deleted with `snapshot delete`) and on a dm device (a
//! `snapshot-origin` of a virtio disk with a persistent `snapshot` on another). `uncopied`
//! runs once each way (it can only be the first write once per snapshot); `copied` and
//! `read` run [`ROUNDS`] times ([`ROUND_SECONDS`] each) with the snapshot and [`ROUNDS`]
//! times without it both before and after it (the guests' speed drifts by 2x over minutes under TCG), and count as the
//! median. The figure is the time per I/O with a snapshot over the time without (1.00 =
//! free). Then, on the host: `sanctl backup`
//! of the snapshot over NBD against reading the volume's image file sequentially (O_DIRECT
//! `dd`), same size.
//!
//! In those jobs the module preserves chunks itself (the store's device, `/dev/vdb`, is among
//! the agent's devices). Then `uncopied` runs once more on the sanblk volume, attached again
//! without that device, under a second snapshot: the module sends each first write through
//! the server, which makes the copy (the row "uncopied, server copies"); and once more
//! with the device again under a third snapshot while the second is kept, over the second
//! half: the module copies each chunk into both stores (the row "uncopied, two snapshots";
//! its dm-snapshot figure: two persistent snapshots of one origin, a store on each half of
//! the COW disk, the same job over the second half). Last, both deleted, two new snapshots
//! of 64 KiB and 256 KiB chunks and the same job: the module copies each write's 64 KiB
//! chunk into one store and, for every fourth write, its 256 KiB chunk into the other (the
//! row "uncopied, two snapshots of 64K and 256K chunks"; dm-snapshot: the same two chunk
//! sizes).
//!
//! Settings: SANBLK_BENCH_KERNEL and SANBLK_BENCH_MODULE (as for `sanblk-bench-datapath`).

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use sanblk_tests::bench;
use sanblk_tests::dm_san::WAIT_LONG;
use sanblk_tests::{
    dm_san, filled_image, fio, scratch_dir, spawn, wait_for_path, SandServer, VmConfig,
};

const MIB: u64 = 1 << 20;
const VOLUME_MIB: u64 = 64;
/// Runs of each `copied` and `read` job: with a snapshot, and without it both before and
/// after (the figures are medians).
const ROUNDS: u32 = 3;
/// Seconds of each of those runs.
const ROUND_SECONDS: u32 = 5;

fn run_bench() -> Result<String, String> {
    let dir = scratch_dir("bench-snapshot").map_err(|e| e.to_string())?;
    let server = SandServer::start(&dir)?;
    let io_port = server.io_port()?;
    let fill = |name: &str, bytes: u64| {
        let path = dir.join(name);
        filled_image(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok::<_, String>(path)
    };
    let san = fill("san0.img", (VOLUME_MIB + 8) * MIB)?;
    // Room for the stores of two snapshots at once.
    let spare = fill("san1.img", (2 * VOLUME_MIB + 16) * MIB)?;
    let dm_origin = fill("dm-origin.img", VOLUME_MIB * MIB)?;
    let dm_cow = fill("dm-cow.img", (VOLUME_MIB + 8) * MIB)?;
    server.pool_add(&san);
    server.sanctl(&["volume", "create", "vs", &format!("{VOLUME_MIB}M")]);
    // The COW store lands on the spare, as it would on a SAN with free space elsewhere.
    server.pool_add(&spare);
    let secret = server.add_client("host1", &["vs"]);
    let script = format!(
        r#"set -e
{prologue}D={dir}
{WAIT_LONG}
job() {{
    # $1 name, $2 device, $3 fio --rw, $4 extra options
    fio --name=$1 --filename=$2 --direct=1 --ioengine=psync --rw=$3 --bs=4k \
        --size={VOLUME_MIB}M --randrepeat=0 $4 --output-format=json --output=fio-$1.json
}}
# One 4 KiB write at the start of each 64 KiB chunk (every chunk once).
UNCOPIED="--io_size=4M"
# The same, over each half: at QD 1, and 16 at once (libaio).
FIRST_HALF="--size=32M --io_size=2M"
SECOND_HALF="--offset=32M --size=32M --io_size=2M --ioengine=libaio --iodepth=16"
attach() {{
    # $@ extra devices
    $S attach vs --server 10.0.2.100:{port} --client host1 --secret-file {secret} \
        --device /dev/mapper/san0 "$@" --io-server 10.0.2.100:{io_port} >> agent.log 2>&1 &
    wait_for /run/sanblk/vs.device
    dev=$(cat /run/sanblk/vs.device)
}}
attach --device /dev/vdb
# $1 name, $2 device, $3 fio --rw, $4 extra options, $5 first round: ROUNDS runs of
# {ROUND_SECONDS} s each (the job wraps around its range).
rounds() {{
    for i in $(seq $5 $(($5 + {ROUNDS} - 1))); do
        job $1-$i $2 $3 "$4 --time_based --runtime={ROUND_SECONDS}"
    done
}}
job sanblk-plain-uncopied $dev write:60k "$FIRST_HALF"
job sanblk-plain-uncopied16 $dev write:60k "$SECOND_HALF"
rounds sanblk-plain-copied $dev write:60k "$UNCOPIED" 1
rounds sanblk-plain-read $dev randread "--io_size=4M" 1
touch snapshot.wanted
wait_long $D/snapshot.taken
job sanblk-snap-uncopied $dev write:60k "$FIRST_HALF"
job sanblk-snap-uncopied16 $dev write:60k "$SECOND_HALF"
rounds sanblk-snap-copied $dev write:60k "$UNCOPIED" 1
rounds sanblk-snap-read $dev randread "--io_size=4M" 1
$S --json status > status.json
touch sanblk.done
wait_long $D/snapshot.deleted
# The same jobs once the snapshot is gone: the baseline brackets the snapshot runs.
rounds sanblk-plain-copied $dev write:60k "$UNCOPIED" $((1 + {ROUNDS}))
rounds sanblk-plain-read $dev randread "--io_size=4M" $((1 + {ROUNDS}))
# Without the store's device the server makes each copy.
$S detach vs
attach
touch snapshot2.wanted
wait_long $D/snapshot2.taken
job sanblk-server-uncopied $dev write:60k "$FIRST_HALF"
$S --json status > status-server.json
# With the store device again, under a second snapshot: the module copies each chunk of the
# second half (untouched since either snapshot) into both stores.
$S detach vs
attach --device /dev/vdb
touch two.wanted
wait_long $D/snapshot3.taken
job sanblk-two-uncopied $dev write:60k "--offset=32M --size=32M --io_size=2M"
$S --json status > status-two.json
touch two.done
# Under two new snapshots of different chunk sizes: each first write to a 64 KiB chunk is
# copied into the 64K store, each fourth one's 256 KiB chunk into the 256K store too.
wait_long $D/mixed.taken
job sanblk-mixed-uncopied $dev write:60k "--offset=32M --size=32M --io_size=2M"
$S --json status > status-mixed.json
touch mixed.done
wait_long $D/snapshot2.deleted
SECTORS=$(blockdev --getsz /dev/vdc)
dmsetup create dmbase --table "0 $SECTORS linear /dev/vdc 0"
job dm-plain-uncopied /dev/mapper/dmbase write:60k "$FIRST_HALF"
job dm-plain-uncopied16 /dev/mapper/dmbase write:60k "$SECOND_HALF"
rounds dm-plain-copied /dev/mapper/dmbase write:60k "$UNCOPIED" 1
rounds dm-plain-read /dev/mapper/dmbase randread "--io_size=4M" 1
dmsetup remove dmbase
# A persistent store starts from a zeroed header.
dd if=/dev/zero of=/dev/vdd bs=64k count=1 oflag=direct status=none
dmsetup create dmorigin --table "0 $SECTORS snapshot-origin /dev/vdc"
dmsetup create dmsnap --table "0 $SECTORS snapshot /dev/vdc /dev/vdd P 128"
job dm-snap-uncopied /dev/mapper/dmorigin write:60k "$FIRST_HALF"
job dm-snap-uncopied16 /dev/mapper/dmorigin write:60k "$SECOND_HALF"
rounds dm-snap-copied /dev/mapper/dmorigin write:60k "$UNCOPIED" 1
rounds dm-snap-read /dev/mapper/dmorigin randread "--io_size=4M" 1
dmsetup status dmsnap > dmsnap-status.txt
dmsetup remove dmsnap
dmsetup remove dmorigin
# Two snapshots at once (a store on each half of the COW disk): dm-snapshot copies the first
# write to each chunk into both, as the module does in the two-snapshot job above.
COW_HALF=$(($(blockdev --getsz /dev/vdd) / 2))
dmsetup create dmcow1 --table "0 $COW_HALF linear /dev/vdd 0"
dmsetup create dmcow2 --table "0 $COW_HALF linear /dev/vdd $COW_HALF"
for store in dmcow1 dmcow2; do
    dd if=/dev/zero of=/dev/mapper/$store bs=64k count=1 oflag=direct status=none
done
dmsetup create dmorigin --table "0 $SECTORS snapshot-origin /dev/vdc"
dmsetup create dmsnap1 --table "0 $SECTORS snapshot /dev/vdc /dev/mapper/dmcow1 P 128"
dmsetup create dmsnap2 --table "0 $SECTORS snapshot /dev/vdc /dev/mapper/dmcow2 P 128"
job dm-two-uncopied /dev/mapper/dmorigin write:60k "--offset=32M --size=32M --io_size=2M"
dmsetup status dmsnap1 dmsnap2 > dmsnap-two-status.txt
dmsetup remove dmsnap2
dmsetup remove dmsnap1
# Again with fresh stores of 64 KiB and 256 KiB chunks.
for store in dmcow1 dmcow2; do
    dd if=/dev/zero of=/dev/mapper/$store bs=64k count=1 oflag=direct status=none
done
dmsetup create dmsnap1 --table "0 $SECTORS snapshot /dev/vdc /dev/mapper/dmcow1 P 128"
dmsetup create dmsnap2 --table "0 $SECTORS snapshot /dev/vdc /dev/mapper/dmcow2 P 512"
job dm-mixed-uncopied /dev/mapper/dmorigin write:60k "--offset=32M --size=32M --io_size=2M"
dmsetup status dmsnap1 dmsnap2 > dmsnap-mixed-status.txt
for target in dmsnap2 dmsnap1 dmorigin dmcow2 dmcow1; do
    dmsetup remove $target
done
dmsetup create dmbase --table "0 $SECTORS linear /dev/vdc 0"
rounds dm-plain-copied /dev/mapper/dmbase write:60k "$UNCOPIED" $((1 + {ROUNDS}))
rounds dm-plain-read /dev/mapper/dmbase randread "--io_size=4M" $((1 + {ROUNDS}))
dmsetup remove dmbase
$S detach vs
"#,
        prologue = dm_san::prologue(&bench::module()),
        dir = dir.display(),
        port = server.port,
        secret = secret.display(),
    );
    let config = VmConfig::new("bench-snapshot", &script)
        .disk(&san)
        .disk(&spare)
        .disk(&dm_origin)
        .disk(&dm_cow)
        .forward_port(server.port)
        .forward_port(io_port)
        .timeout(Duration::from_secs(3000));
    let vm = spawn(&bench::with_kernel(config)).map_err(|e| format!("{e:?}"))?;
    wait_for_path(
        &vm.log_dir().join("snapshot.wanted"),
        Duration::from_secs(1200),
    )?;
    server.sanctl(&[
        "snapshot",
        "create",
        "vs",
        "bench",
        "--cow-size",
        &format!("{}M", VOLUME_MIB + 4),
    ]);
    std::fs::write(dir.join("snapshot.taken"), b"").map_err(|e| e.to_string())?;
    wait_for_path(&vm.log_dir().join("sanblk.done"), Duration::from_secs(1200))?;

    // Backup over NBD against a sequential O_DIRECT read of the volume's image file.
    let image = dir.join("backup.img");
    let backup_started = Instant::now();
    server.sanctl(&[
        "backup",
        "vs",
        "bench",
        "--to",
        &image.display().to_string(),
    ]);
    let backup_took = backup_started.elapsed().as_secs_f64();
    let read_started = Instant::now();
    let status = Command::new("dd")
        .arg(format!("if={}", san.display()))
        .args(["of=/dev/null", "bs=4M", "iflag=direct", "status=none"])
        .arg(format!("count={}", VOLUME_MIB / 4))
        .status()
        .map_err(|e| format!("dd: {e}"))?;
    if !status.success() {
        return Err(format!("dd: {status}"));
    }
    let read_took = read_started.elapsed().as_secs_f64();
    server.sanctl(&["snapshot", "delete", "vs", "bench"]);
    std::fs::write(dir.join("snapshot.deleted"), b"").map_err(|e| e.to_string())?;
    let log_dir = vm.log_dir().to_path_buf();
    wait_for_path(&log_dir.join("snapshot2.wanted"), Duration::from_secs(1200))?;
    server.sanctl(&[
        "snapshot",
        "create",
        "vs",
        "bench2",
        "--cow-size",
        &format!("{}M", VOLUME_MIB + 4),
    ]);
    std::fs::write(dir.join("snapshot2.taken"), b"").map_err(|e| e.to_string())?;
    wait_for_path(&log_dir.join("two.wanted"), Duration::from_secs(1200))?;
    server.sanctl(&[
        "snapshot",
        "create",
        "vs",
        "bench3",
        "--cow-size",
        &format!("{}M", VOLUME_MIB / 2 + 4),
    ]);
    std::fs::write(dir.join("snapshot3.taken"), b"").map_err(|e| e.to_string())?;
    wait_for_path(&log_dir.join("two.done"), Duration::from_secs(1200))?;
    server.sanctl(&["snapshot", "delete", "vs", "bench3"]);
    server.sanctl(&["snapshot", "delete", "vs", "bench2"]);
    for (name, chunk) in [("fine", "64K"), ("coarse", "256K")] {
        server.sanctl(&[
            "snapshot",
            "create",
            "vs",
            name,
            "--cow-size",
            &format!("{}M", VOLUME_MIB / 2 + 4),
            "--chunk-size",
            chunk,
        ]);
    }
    std::fs::write(dir.join("mixed.taken"), b"").map_err(|e| e.to_string())?;
    wait_for_path(&log_dir.join("mixed.done"), Duration::from_secs(1200))?;
    server.sanctl(&["snapshot", "delete", "vs", "coarse"]);
    server.sanctl(&["snapshot", "delete", "vs", "fine"]);
    std::fs::write(dir.join("snapshot2.deleted"), b"").map_err(|e| e.to_string())?;

    let outcome = vm.wait().map_err(|e| format!("{e:?}"))?;
    outcome.check_clean_success()?;
    println!("guest log: {}", outcome.log_dir.display());
    let one = |name: &str, metric: fio::Metric| {
        let json = outcome
            .read_out_file(&format!("fio-{name}.json"))
            .map_err(|e| format!("fio-{name}.json: {e}"))?;
        fio::value(&json, metric)
    };
    // The median of a job's rounds (before and after the snapshot for the plain ones); a
    // job run once has no rounds.
    let value = |name: &str, metric: fio::Metric| {
        let mut runs = (1..=2 * ROUNDS)
            .filter(|i| {
                outcome
                    .log_dir
                    .join(format!("fio-{name}-{i}.json"))
                    .exists()
            })
            .map(|i| one(&format!("{name}-{i}"), metric))
            .collect::<Result<Vec<f64>, String>>()?;
        if runs.is_empty() {
            return one(name, metric);
        }
        runs.sort_by(f64::total_cmp);
        Ok(runs[runs.len() / 2])
    };
    let mut report = String::from(
        "### Snapshot overhead (time per 4 KiB I/O with a snapshot / without)\n\n\
         | job | sanblk without | sanblk with | sanblk ratio | dm without | dm-snapshot with | dm ratio |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (label, job, snap, metric) in [
        ("uncopied", "uncopied", "snap", fio::Metric::WriteIops),
        (
            "uncopied, QD 16",
            "uncopied16",
            "snap",
            fio::Metric::WriteIops,
        ),
        (
            "uncopied, server copies",
            "uncopied",
            "server",
            fio::Metric::WriteIops,
        ),
        ("copied", "copied", "snap", fio::Metric::WriteIops),
        ("read", "read", "snap", fio::Metric::ReadIops),
    ] {
        let sanblk_plain = value(&format!("sanblk-plain-{job}"), metric)?;
        let sanblk_snap = value(&format!("sanblk-{snap}-{job}"), metric)?;
        let dm_plain = value(&format!("dm-plain-{job}"), metric)?;
        let dm_snap = value(&format!("dm-snap-{job}"), metric)?;
        report.push_str(&format!(
            "| {label} | {sanblk_plain:.0} IOPS | {sanblk_snap:.0} IOPS | {:.2} | {dm_plain:.0} IOPS | {dm_snap:.0} IOPS | {:.2} |\n",
            sanblk_plain / sanblk_snap,
            dm_plain / dm_snap
        ));
    }
    // Two snapshots: each system copies every first write into both stores.
    let sanblk_plain = value("sanblk-plain-uncopied", fio::Metric::WriteIops)?;
    let sanblk_two = value("sanblk-two-uncopied", fio::Metric::WriteIops)?;
    let dm_plain = value("dm-plain-uncopied", fio::Metric::WriteIops)?;
    let dm_two = value("dm-two-uncopied", fio::Metric::WriteIops)?;
    report.push_str(&format!(
        "| uncopied, two snapshots (copies into both) | {sanblk_plain:.0} IOPS | {sanblk_two:.0} IOPS | {:.2} | {dm_plain:.0} IOPS | {dm_two:.0} IOPS | {:.2} |\n",
        sanblk_plain / sanblk_two,
        dm_plain / dm_two
    ));
    let sanblk_mixed = value("sanblk-mixed-uncopied", fio::Metric::WriteIops)?;
    let dm_mixed = value("dm-mixed-uncopied", fio::Metric::WriteIops)?;
    report.push_str(&format!(
        "| uncopied, two snapshots of 64K and 256K chunks | {sanblk_plain:.0} IOPS | {sanblk_mixed:.0} IOPS | {:.2} | {dm_plain:.0} IOPS | {dm_mixed:.0} IOPS | {:.2} |\n",
        sanblk_plain / sanblk_mixed,
        dm_plain / dm_mixed
    ));
    // Who made the copies: the module's counters after each snapshot phase.
    let counters = |file: &str| -> Result<(u64, u64), String> {
        let text = outcome
            .read_out_file(file)
            .map_err(|e| format!("{file}: {e}"))?;
        let status: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
        let field = |name: &str| status["volumes"][0][name].as_u64().unwrap_or(0);
        Ok((field("preserved_chunks"), field("redirected_ios")))
    };
    let (module_preserved, module_redirected) = counters("status.json")?;
    let (server_preserved, server_redirected) = counters("status-server.json")?;
    let (two_preserved, two_redirected) = counters("status-two.json")?;
    let (mixed_preserved, mixed_redirected) = counters("status-mixed.json")?;
    report.push_str(&format!(
        "\nChunks the module preserved / I/Os through the server: {module_preserved} / \
         {module_redirected} in the snapshot jobs, {server_preserved} / {server_redirected} in \
         the server-copies job, {two_preserved} / {two_redirected} in the two-snapshot job \
         (one copy per chunk and store), {mixed_preserved} / {mixed_redirected} after the job \
         under 64K and 256K chunks (counters since the attach before the two-snapshot job).\n"
    ));
    let mib = VOLUME_MIB as f64;
    report.push_str(&format!(
        "\n### Backup over NBD\n\n| copy | MiB | seconds | MiB/s |\n|---|---|---|---|\n\
         | `sanctl backup` (NBD, full) | {mib} | {backup_took:.2} | {:.1} |\n\
         | `dd iflag=direct` of the image file | {mib} | {read_took:.2} | {:.1} |\n\n\
         backup / sequential read throughput: {:.2}\n",
        mib / backup_took,
        mib / read_took,
        read_took / backup_took
    ));
    Ok(report)
}

fn main() -> ExitCode {
    match run_bench() {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}
