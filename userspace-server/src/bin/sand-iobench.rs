//! `sand-iobench`: throughput of the server I/O path (second data path) over loopback.
//!
//! Starts a real `sand` with one image file, attaches a volume through an agent, then writes
//! the volume sequentially in 1 MiB frames (`--depth` in flight, FLUSH at the end, included),
//! and reads it back the same way. Baseline in the same run, same filesystem: a `dd`-style
//! sequential copy of the same size, 1 MiB blocks, O_DIRECT (`dd oflag=direct conv=fdatasync`
//! then `dd iflag=direct`), one block at a time.
//!
//! `--rebuild`: rebuild throughput instead. A linear volume written through the I/O path on
//! one image file, a second (spare) image added, then the administrator declares the first
//! device failed (`recovery start`; a client's report alone moves nothing while the server
//! reads the device) and we time the recovery (the server copies the volume onto the spare) until the `done`
//! push. Baseline in the same run, same filesystem: an in-process O_DIRECT copy of the same
//! size between two files, 1 MiB blocks, one at a time, `fdatasync` at the end. `--rounds`
//! rounds alternating which one goes first; medians. `--rebuild --move`: the same copy
//! started by the admin's `volume move` off the (healthy) device, i.e. a live move: its two
//! changes (quiesce the client, commit, publish) are in the time.
//!
//! Usage: cargo build --release -p sand --bins && target/release/sand-iobench --size-mib 1024
//!        target/release/sand-iobench --rebuild --size-mib 512 --rounds 3
//!        target/release/sand-iobench --rebuild --move --size-mib 512 --rounds 3

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use sanblk_proto::client::{AdminClient, AgentClient, Push};
use sanblk_proto::map::{AccessMode, Layout, VolumeMap};
use sanblk_proto::protocol::{
    ClientAdd, ClientCreated, ClientGrant, PoolAdd, RecoveryStart, RecoveryState, RecoveryStatus,
    VolumeCreate, VolumeMove,
};
use sanblk_uapi::frame::{
    Op, ReplyHeader, RequestHeader, MAX_PAYLOAD, REPLY_HEADER_LEN, REQUEST_HEADER_LEN,
};
use sand::AlignedBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const MIB: u64 = 1 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "sand-iobench",
    about = "Benchmark the server I/O path: sequential 1 MiB writes and reads over loopback"
)]
struct Args {
    /// Bytes to write and read, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Volume layout: linear, mirror or striped:N (one image file per copy or stripe).
    #[arg(long, default_value = "linear")]
    layout: Layout,
    /// Requests in flight on the connection.
    #[arg(long, default_value_t = 8)]
    depth: usize,
    /// Directory for the image and baseline files (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The sand binary (default: next to this one).
    #[arg(long)]
    sand: Option<PathBuf>,
    /// Measure recovery (rebuild onto a spare) against a plain O_DIRECT copy instead.
    #[arg(long)]
    rebuild: bool,
    /// With --rebuild: start the copy with the admin's `volume move` off the healthy device
    /// instead of a failure report (the same copy job, started as a live move).
    #[arg(long = "move", requires = "rebuild")]
    live_move: bool,
    /// Rounds of the rebuild measurement (alternating order), medians reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

/// Kills a child process by pid when dropped.
struct ChildGuard(u32);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
    }
}

fn sand_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.sand {
        return Ok(path.clone());
    }
    let sibling = std::env::current_exe()?.with_file_name("sand");
    if sibling.exists() {
        return Ok(sibling);
    }
    bail!("{} not found; build it or pass --sand", sibling.display())
}

fn start_sand(binary: &Path, dir: &Path) -> anyhow::Result<(Child, PathBuf)> {
    let metadata_dir = dir.join("meta");
    let log = std::fs::File::create(dir.join("sand.log"))?;
    let child = Command::new(binary)
        .arg("--metadata-dir")
        .arg(&metadata_dir)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--io-listen")
        .arg("127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if metadata_dir.join("admin.sock").exists() && metadata_dir.join("agent.addr").exists() {
            return Ok((child, metadata_dir));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("sand did not start; see {}", dir.join("sand.log").display())
}

fn read_address(path: &Path) -> anyhow::Result<std::net::SocketAddr> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(text.trim().parse()?)
}

fn pattern(length: usize) -> anyhow::Result<AlignedBuf> {
    let mut buf = AlignedBuf::zeroed(length)?;
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = (i as u64).wrapping_mul(2_654_435_761) as u8;
    }
    Ok(buf)
}

/// Sequentially writes (or reads) the whole volume with `depth` frames in flight, then (for
/// writes) FLUSHes. Returns the elapsed time.
async fn sequential(
    stream: &mut BufReader<TcpStream>,
    map: &VolumeMap,
    op: Op,
    depth: usize,
    data: &[u8],
) -> anyhow::Result<Duration> {
    let count = map.size_bytes / MAX_PAYLOAD as u64;
    let started = Instant::now();
    let (mut sent, mut received) = (0u64, 0u64);
    let mut reply = [0u8; REPLY_HEADER_LEN];
    let mut sink = vec![0u8; MAX_PAYLOAD as usize];
    while received < count {
        while sent < count && sent - received < depth as u64 {
            let header = RequestHeader {
                op,
                flags: 0,
                handle: sent,
                volume_id: map.volume_id,
                epoch: map.epoch,
                offset: sent * MAX_PAYLOAD as u64,
                length: MAX_PAYLOAD,
            };
            let mut raw = [0u8; REQUEST_HEADER_LEN];
            header.encode(&mut raw);
            stream.get_mut().write_all(&raw).await?;
            if op == Op::Write {
                stream.get_mut().write_all(data).await?;
            }
            sent += 1;
        }
        stream.read_exact(&mut reply).await?;
        let header = ReplyHeader::decode(&reply).map_err(|e| anyhow!(e.message()))?;
        if header.status != 0 {
            bail!("{op:?} {} failed: status {}", header.handle, header.status);
        }
        let length = header.length as usize;
        stream.read_exact(&mut sink[..length]).await?;
        if op == Op::Read && sink[..length] != data[..length] {
            bail!("read {} returned wrong data", header.handle);
        }
        received += 1;
    }
    if op == Op::Write {
        let flush = RequestHeader {
            op: Op::Flush,
            flags: 0,
            handle: u64::MAX,
            volume_id: map.volume_id,
            epoch: map.epoch,
            offset: 0,
            length: 0,
        };
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        flush.encode(&mut raw);
        stream.get_mut().write_all(&raw).await?;
        stream.read_exact(&mut reply).await?;
        let header = ReplyHeader::decode(&reply).map_err(|e| anyhow!(e.message()))?;
        if header.status != 0 {
            bail!("flush failed: status {}", header.status);
        }
    }
    Ok(started.elapsed())
}

/// `dd if=/dev/zero of=FILE bs=1M oflag=direct conv=fdatasync` then `dd iflag=direct`.
fn baseline(path: &Path, size: u64, data: &[u8]) -> anyhow::Result<(Duration, Duration)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| path.display().to_string())?;
    let blocks = size / MAX_PAYLOAD as u64;
    let started = Instant::now();
    for block in 0..blocks {
        file.write_all_at(data, block * MAX_PAYLOAD as u64)?;
    }
    file.sync_data()?;
    let write = started.elapsed();
    let mut buf = AlignedBuf::zeroed(MAX_PAYLOAD as usize)?;
    let started = Instant::now();
    for block in 0..blocks {
        file.read_exact_at(&mut buf, block * MAX_PAYLOAD as u64)?;
    }
    let read = started.elapsed();
    Ok((write, read))
}

/// An in-process `dd iflag=direct oflag=direct bs=1M` of `size` bytes between two fresh files
/// in `dir` (the source written first, untimed), `fdatasync` of the target included.
fn copy_baseline(dir: &Path, size: u64, data: &[u8]) -> anyhow::Result<Duration> {
    let open = |path: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .with_context(|| path.display().to_string())
    };
    let (source_path, target_path) = (dir.join("copy-source.img"), dir.join("copy-target.img"));
    let source = open(&source_path)?;
    let target = open(&target_path)?;
    let blocks = size / MAX_PAYLOAD as u64;
    for block in 0..blocks {
        source.write_all_at(data, block * MAX_PAYLOAD as u64)?;
    }
    source.sync_data()?;
    let mut buf = AlignedBuf::zeroed(MAX_PAYLOAD as usize)?;
    let started = Instant::now();
    for block in 0..blocks {
        source.read_exact_at(&mut buf, block * MAX_PAYLOAD as u64)?;
        target.write_all_at(&buf, block * MAX_PAYLOAD as u64)?;
    }
    target.sync_data()?;
    let elapsed = started.elapsed();
    let _ = std::fs::remove_file(source_path);
    let _ = std::fs::remove_file(target_path);
    Ok(elapsed)
}

/// A volume written through the I/O path, a spare added, the volume's device reported
/// failed: the time from the report to the `done` push.
async fn rebuild_once(args: &Args, dir: &Path, size: u64, data: &[u8]) -> anyhow::Result<Duration> {
    let mut served = serve(args, dir, size, 1).await?;
    sequential(&mut served.stream, &served.map, Op::Write, args.depth, data).await?;
    let spare = dir.join("spare.img");
    std::fs::File::create(&spare)?.set_len(size + 64 * MIB)?;
    served
        .admin
        .call(PoolAdd {
            path: spare.display().to_string(),
            force: false,
        })
        .await?;
    let volume_id = served.map.volume_id;
    let device = served
        .map
        .extents
        .first()
        .and_then(|extent| extent.replicas.first())
        .map(|replica| replica.device_uuid)
        .ok_or_else(|| anyhow!("the volume map has no replica"))?;
    let started = Instant::now();
    let mut status = if args.live_move {
        served
            .admin
            .call(VolumeMove {
                name: served.map.name.clone(),
                from: Some(device.to_string()),
                to: None,
                cancel: false,
            })
            .await?
    } else {
        // A client's report alone moves nothing while the server reads the device.
        let statuses: Vec<RecoveryStatus> = served
            .admin
            .call(RecoveryStart {
                device: device.to_string(),
            })
            .await?;
        statuses
            .into_iter()
            .find(|s| s.volume_id == volume_id)
            .ok_or_else(|| anyhow!("recovery start did not start the volume's recovery"))?
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
    loop {
        match status.state {
            RecoveryState::Done => break,
            RecoveryState::Failed | RecoveryState::Cancelled => {
                bail!("recovery {}: {}", status.state, status.message)
            }
            RecoveryState::Queued | RecoveryState::Copying => {}
        }
        status = loop {
            let push = tokio::time::timeout_at(deadline, served.agent.next_push())
                .await
                .map_err(|_| anyhow!("no recovery `done` within an hour"))??;
            // The recovery's changes quiesce this client and publish maps: answered at
            // once, as an agent with no I/O in flight does.
            match push {
                Push::RecoveryStatus(status) if status.volume_id == volume_id => break status,
                Push::Quiesce(q) => served.agent.quiesce_ack(q.volume_id, q.epoch).await?,
                Push::MapUpdate(m) => served.agent.ack(m.volume_id, m.epoch).await?,
                _ => {}
            }
        };
    }
    let elapsed = started.elapsed();
    if status.bytes_total != size {
        bail!("recovery moved {} bytes, not {size}", status.bytes_total);
    }
    Ok(elapsed)
}

async fn rebuild(args: &Args, dir: &Path, size: u64) -> anyhow::Result<()> {
    if args.layout != Layout::Linear {
        bail!("--rebuild measures a linear volume");
    }
    let data = pattern(MAX_PAYLOAD as usize)?;
    let rate = |d: Duration| size as f64 / MIB as f64 / d.as_secs_f64();
    println!(
        "sand-iobench --rebuild{}: {} MiB linear volume {} onto a spare vs O_DIRECT copy \
         (1 MiB blocks), files in {}, {} rounds alternating order",
        if args.live_move { " --move" } else { "" },
        args.size_mib,
        if args.live_move {
            "moved live"
        } else {
            "recovered"
        },
        dir.display(),
        args.rounds
    );
    println!("| round | rebuild | copy | rebuild / copy |\n|---|---|---|---|");
    let (mut rebuilds, mut copies, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds.max(1) {
        let round_dir = dir.join(format!("round{round}"));
        std::fs::create_dir_all(&round_dir)?;
        let (rebuilt, copied) = if round % 2 == 0 {
            let copied = copy_baseline(&round_dir, size, &data)?;
            (rebuild_once(args, &round_dir, size, &data).await?, copied)
        } else {
            let rebuilt = rebuild_once(args, &round_dir, size, &data).await?;
            (rebuilt, copy_baseline(&round_dir, size, &data)?)
        };
        let _ = std::fs::remove_dir_all(&round_dir);
        println!(
            "| {round} | {:.1} MiB/s | {:.1} MiB/s | {:.3} |",
            rate(rebuilt),
            rate(copied),
            rate(rebuilt) / rate(copied)
        );
        rebuilds.push(rate(rebuilt));
        copies.push(rate(copied));
        ratios.push(rate(rebuilt) / rate(copied));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "| median | {:.1} MiB/s | {:.1} MiB/s | {:.3} |",
        median(rebuilds),
        median(copies),
        median(ratios)
    );
    Ok(())
}

async fn benchmark(args: Args) -> anyhow::Result<()> {
    let size = args.size_mib * MIB;
    if size == 0 || args.depth == 0 {
        bail!("--size-mib and --depth must be positive");
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("sand-iobench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let outcome = if args.rebuild {
        rebuild(&args, &dir, size).await
    } else {
        run(&args, &dir, size).await
    };
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// A running sand with one volume `bench` of `size` bytes (on `images` image files) attached
/// by an agent, and an I/O connection that said HELLO with its token.
struct Served {
    _guard: ChildGuard,
    admin: AdminClient,
    agent: AgentClient,
    map: VolumeMap,
    stream: BufReader<TcpStream>,
}

async fn serve(args: &Args, dir: &Path, size: u64, images: u64) -> anyhow::Result<Served> {
    let (child, metadata_dir) = start_sand(&sand_binary(args)?, dir)?;
    let guard = ChildGuard(child.id());
    let mut admin = AdminClient::connect(&metadata_dir.join("admin.sock")).await?;
    for index in 0..images {
        let image = dir.join(format!("disk{index}.img"));
        std::fs::File::create(&image)?.set_len(size + 64 * MIB)?;
        admin
            .call(PoolAdd {
                path: image.display().to_string(),
                force: false,
            })
            .await?;
    }
    admin
        .call(VolumeCreate {
            name: "bench".into(),
            size_bytes: size,
            layout: args.layout,
        })
        .await?;
    let created: ClientCreated = admin
        .call(ClientAdd {
            name: "bench".into(),
        })
        .await?;
    admin
        .call(ClientGrant {
            name: "bench".into(),
            volume: "bench".into(),
            mode: AccessMode::Rw,
        })
        .await?;
    let secret = hex::decode(created.secret)?;
    let mut agent = AgentClient::connect(
        read_address(&metadata_dir.join("agent.addr"))?,
        "bench",
        &secret,
    )
    .await?;
    let attached = agent.attach("bench", AccessMode::Rw).await?;

    let stream = TcpStream::connect(read_address(&metadata_dir.join("io.addr"))?).await?;
    stream.set_nodelay(true)?;
    let mut stream = BufReader::with_capacity(64 * 1024, stream);
    let token = hex::decode(&attached.session_token)?;
    let hello = RequestHeader::hello(0, 0, token.len() as u32);
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    hello.encode(&mut raw);
    stream.get_mut().write_all(&raw).await?;
    stream.get_mut().write_all(&token).await?;
    let mut reply = [0u8; REPLY_HEADER_LEN];
    stream.read_exact(&mut reply).await?;
    let status = ReplyHeader::decode(&reply)
        .map_err(|e| anyhow!(e.message()))?
        .status;
    if status != 0 {
        bail!("HELLO refused: status {status}");
    }
    Ok(Served {
        _guard: guard,
        admin,
        agent,
        map: attached.map,
        stream,
    })
}

async fn run(args: &Args, dir: &Path, size: u64) -> anyhow::Result<()> {
    let data = pattern(MAX_PAYLOAD as usize)?;
    let (base_write, base_read) = baseline(&dir.join("baseline.img"), size, &data)?;
    let _ = std::fs::remove_file(dir.join("baseline.img"));

    let images = match args.layout {
        Layout::Linear => 1,
        Layout::Mirror => 2,
        Layout::Striped { stripe_count, .. } => stripe_count as u64,
    };
    let Served {
        _guard,
        map,
        mut stream,
        ..
    } = serve(args, dir, size, images).await?;
    let write = sequential(&mut stream, &map, Op::Write, args.depth, &data).await?;
    let read = sequential(&mut stream, &map, Op::Read, args.depth, &data).await?;

    let rate = |d: Duration| size as f64 / MIB as f64 / d.as_secs_f64();
    println!(
        "sand-iobench: {} MiB sequential, 1 MiB frames, depth {}, {} volume, files in {}",
        args.size_mib,
        args.depth,
        args.layout,
        dir.display()
    );
    println!(
        "{:<28}{:>14}{:>22}{:>10}",
        "", "server path", "baseline (dd direct)", "ratio"
    );
    for (name, ours, theirs) in [
        ("write (+flush)", write, base_write),
        ("read", read, base_read),
    ] {
        println!(
            "{:<28}{:>10.0} MiB/s{:>16.0} MiB/s{:>9.2}x",
            name,
            rate(ours),
            rate(theirs),
            rate(ours) / rate(theirs)
        );
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sand-iobench: {error}");
            std::process::exit(1);
        }
    };
    if let Err(error) = runtime.block_on(benchmark(args)) {
        eprintln!("sand-iobench: {error:#}");
        std::process::exit(1);
    }
}
