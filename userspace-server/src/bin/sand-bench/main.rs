//! `sand-bench`: control-plane benchmark against a real `sand` process on loopback.
//!
//! 1. Baseline (same run, same machine): a raw TCP fan-out server (this binary, re-executed
//!    with `--baseline-server`) with N plain sockets: connect rate, and time from a trigger
//!    until every socket has received a 64-byte message (the floor for a push to N clients).
//! 2. sand: N authenticated agent connections attach one volume (read-only); then the volume
//!    is grown `--rounds` times and we measure, from the admin grow request, the time until
//!    each client has received the new epoch (median, p99, max), and until the server has
//!    recorded every ack.
//!
//! 3. `--attack` (see `attack.rs`): a legitimate agent's attach latency and another client's
//!    4 KiB read latency, quiet and under hostile idle connections plus a session hogging the
//!    I/O buffer budget.
//!
//! Usage: cargo run --release -p sand --bin sand-bench -- --clients 10000
//!        cargo run --release -p sand --bin sand-bench -- --attack --hostile 4000

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use sanblk_proto::client::{AdminClient, AgentClient, Push};
use sanblk_proto::map::{AccessMode, Layout};
use sanblk_proto::protocol::{
    ClientAdd, ClientCreated, ClientGrant, PoolAdd, VolumeCreate, VolumeDetail, VolumeGrow,
    VolumeShow,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, Semaphore};

mod attack;

const MIB: u64 = 1 << 20;
/// Well inside sand's default 6 s lease, as the real agent renews at a third of it.
const RENEW_EVERY: Duration = Duration::from_secs(2);
const BASELINE_MESSAGE_BYTES: usize = 64;

#[derive(Debug, Parser)]
#[command(
    name = "sand-bench",
    about = "Benchmark sand's control plane: attach rate and map-push latency"
)]
struct Args {
    /// Number of simulated agents (one TCP connection each).
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Distinct client identities (secrets) the agents are spread over.
    #[arg(long, default_value_t = 100)]
    identities: usize,
    /// Connections being set up at the same time.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Volume changes to measure.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The sand binary (default: next to this one).
    #[arg(long)]
    sand: Option<PathBuf>,
    /// Measure what an attack costs legitimate clients instead (hostile idle connections
    /// and an I/O-hogging session).
    #[arg(long)]
    attack: bool,
    /// With --attack: hostile idle connections to each of the agent and I/O ports.
    #[arg(long, default_value_t = 4000)]
    hostile: usize,
    /// With --attack: attaches measured, quiet and attacked.
    #[arg(long, default_value_t = 50)]
    samples: usize,
    /// With --attack: 4 KiB reads measured, quiet and attacked.
    #[arg(long, default_value_t = 2000)]
    reads: usize,
    /// Internal: run the raw TCP fan-out server for the baseline.
    #[arg(long, hide = true)]
    baseline_server: bool,
}

fn raise_fd_limit(wanted: u64) -> anyhow::Result<u64> {
    let limit = sand::server::raise_open_file_limit().context("raising RLIMIT_NOFILE")?;
    if limit < wanted {
        bail!("RLIMIT_NOFILE hard limit is {limit}, {wanted} needed; raise it (ulimit -Hn)");
    }
    Ok(limit)
}

struct Stats {
    median: Duration,
    p99: Duration,
    max: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort_unstable();
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    Stats {
        median: at(0.5),
        p99: at(0.99),
        max: samples.last().copied().unwrap_or_default(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

// ------------------------------------------------------------------------------------------
// Baseline: raw TCP fan-out
// ------------------------------------------------------------------------------------------

/// The baseline server: every connection sends one role byte: `C` (client, receives the
/// fan-out) or `T` (trigger: fan out a 64-byte message to every client socket).
async fn baseline_server() -> anyhow::Result<()> {
    // Same accept queue as sand's agent port, so the comparison is fair.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let listener = socket.listen(4096)?;
    println!("{}", listener.local_addr()?);
    let (fanout, _) = broadcast::channel::<()>(16);
    loop {
        let (mut stream, _) = listener.accept().await?;
        let fanout = fanout.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut role = [0u8; 1];
            if stream.read_exact(&mut role).await.is_err() {
                return;
            }
            if role[0] == b'T' {
                let _ = fanout.send(());
                return;
            }
            let mut triggers = fanout.subscribe();
            let _ = stream.write_all(b"k").await; // registered
            while triggers.recv().await.is_ok() {
                if stream
                    .write_all(&[0u8; BASELINE_MESSAGE_BYTES])
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

struct BaselineResult {
    connect_rate: f64,
    fanout: Stats,
}

async fn run_baseline(args: &Args) -> anyhow::Result<BaselineResult> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("--baseline-server")
        .stdout(Stdio::piped())
        .spawn()?;
    let guard = ChildGuard(Some(child.id()));
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("baseline server has no stdout"))?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    let address: std::net::SocketAddr = line.trim().parse().context("baseline server address")?;

    let limiter = Arc::new(Semaphore::new(args.concurrency));
    let (received_tx, mut received_rx) = mpsc::unbounded_channel::<Instant>();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.clients);
    let (connected_tx, mut connected_rx) = mpsc::unbounded_channel::<()>();
    for _ in 0..args.clients {
        let (limiter, received_tx, connected_tx) =
            (limiter.clone(), received_tx.clone(), connected_tx.clone());
        tasks.push(tokio::spawn(async move {
            let permit = limiter.acquire_owned().await;
            let mut stream = TcpStream::connect(address).await?;
            stream.set_nodelay(true)?;
            stream.write_all(b"C").await?;
            let mut ack = [0u8; 1];
            stream.read_exact(&mut ack).await?;
            drop(permit);
            let _ = connected_tx.send(());
            let mut message = [0u8; BASELINE_MESSAGE_BYTES];
            stream.read_exact(&mut message).await?;
            let _ = received_tx.send(Instant::now());
            // Hold the socket until everyone has been measured.
            let _ = stream.read(&mut ack).await;
            anyhow::Ok(())
        }));
    }
    for _ in 0..args.clients {
        connected_rx
            .recv()
            .await
            .ok_or_else(|| anyhow!("baseline client failed to connect"))?;
    }
    let connect_rate = args.clients as f64 / started.elapsed().as_secs_f64();
    let trigger_time = Instant::now();
    let mut trigger = TcpStream::connect(address).await?;
    trigger.write_all(b"T").await?;
    let mut samples = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        let at = received_rx
            .recv()
            .await
            .ok_or_else(|| anyhow!("baseline client failed"))?;
        samples.push(at - trigger_time);
    }
    drop(guard);
    for task in tasks {
        task.abort();
    }
    let _ = child.wait();
    Ok(BaselineResult {
        connect_rate,
        fanout: stats(samples),
    })
}

// ------------------------------------------------------------------------------------------
// sand
// ------------------------------------------------------------------------------------------

/// Kills a child process by pid when dropped.
struct ChildGuard(Option<u32>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

fn sand_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.sand {
        return Ok(path.clone());
    }
    let exe = std::env::current_exe()?;
    let sibling = exe.with_file_name("sand");
    if sibling.exists() {
        return Ok(sibling);
    }
    // `cargo run --bin sand-bench` builds only this binary; build the server the same way.
    let cargo = std::env::var("CARGO").map_err(|_| {
        anyhow!(
            "{} not found; build it first: cargo build --release -p sand --bins (or pass --sand)",
            sibling.display()
        )
    })?;
    let release = exe
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|d| d == "release");
    let mut build = Command::new(cargo);
    build.args(["build", "-q", "-p", "sand", "--bin", "sand"]);
    if release {
        build.arg("--release");
    }
    let status = build.status().context("running cargo build for sand")?;
    if !status.success() || !sibling.exists() {
        bail!("building {} failed", sibling.display());
    }
    Ok(sibling)
}

fn start_sand(
    binary: &Path,
    dir: &Path,
    extra_args: &[String],
) -> anyhow::Result<(Child, std::net::SocketAddr, PathBuf)> {
    let metadata_dir = dir.join("meta");
    let log = std::fs::File::create(dir.join("sand.log"))?;
    let child = Command::new(binary)
        .arg("--metadata-dir")
        .arg(&metadata_dir)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .args(extra_args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let admin_socket = metadata_dir.join("admin.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if admin_socket.exists() {
            if let Ok(text) = std::fs::read_to_string(metadata_dir.join("agent.addr")) {
                return Ok((child, text.trim().parse()?, admin_socket));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("sand did not start; see {}", dir.join("sand.log").display())
}

struct SandResult {
    attach_rate: f64,
    attach_latency: Stats,
    push: Stats,
    per_round_max: Vec<Duration>,
    grow_reply: Stats,
    all_acked: Vec<Duration>,
}

async fn run_sand(args: &Args, dir: &Path) -> anyhow::Result<SandResult> {
    let binary = sand_binary(args)?;
    // Every simulated agent connects from 127.0.0.1, where a fleet has one address per host:
    // let as many handshakes run from it as the bench sets up at once.
    let per_peer = vec![
        "--max-handshakes-per-peer".to_string(),
        args.concurrency.to_string(),
    ];
    let (child, agent_address, admin_socket) = start_sand(&binary, dir, &per_peer)?;
    let _guard = ChildGuard(Some(child.id()));
    let mut admin = AdminClient::connect(&admin_socket).await?;
    let image = dir.join("disk0.img");
    std::fs::File::create(&image)?.set_len(4096 * MIB)?;
    admin
        .call(PoolAdd {
            path: image.display().to_string(),
            force: false,
        })
        .await?;
    admin
        .call(VolumeCreate {
            name: "bench".into(),
            size_bytes: 64 * MIB,
            layout: Layout::Linear,
        })
        .await?;
    let mut identities = Vec::with_capacity(args.identities);
    for index in 0..args.identities {
        let name = format!("agent{index}");
        let created: ClientCreated = admin.call(ClientAdd { name: name.clone() }).await?;
        admin
            .call(ClientGrant {
                name: name.clone(),
                volume: "bench".into(),
                mode: AccessMode::Ro,
            })
            .await?;
        identities.push((name, hex::decode(created.secret)?));
    }
    let identities = Arc::new(identities);

    // Attach phase.
    let limiter = Arc::new(Semaphore::new(args.concurrency));
    let (attached_tx, mut attached_rx) = mpsc::unbounded_channel::<anyhow::Result<Duration>>();
    let (received_tx, mut received_rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.clients);
    for index in 0..args.clients {
        let (limiter, identities) = (limiter.clone(), identities.clone());
        let (attached_tx, received_tx) = (attached_tx.clone(), received_tx.clone());
        tasks.push(tokio::spawn(async move {
            let permit = limiter.acquire_owned().await;
            let begun = Instant::now();
            let (name, secret) = &identities[index % identities.len()];
            let attach = async {
                let mut agent = AgentClient::connect(agent_address, name, secret).await?;
                let attachment = agent.attach("bench", AccessMode::Ro).await?;
                anyhow::Ok((agent, attachment.map.volume_id))
            };
            let (mut agent, volume_id) = match attach.await {
                Ok(ok) => ok,
                Err(error) => {
                    let _ = attached_tx.send(Err(error));
                    return;
                }
            };
            let _ = attached_tx.send(Ok(begun.elapsed()));
            drop(permit);
            // A well-behaved agent: renews its lease, acknowledges quiesces at once (it has
            // no I/O in flight) and acknowledges each new map.
            let mut epoch = 1;
            let mut renew = tokio::time::interval(RENEW_EVERY);
            loop {
                let push = tokio::select! {
                    push = agent.next_push() => push,
                    _ = renew.tick() => {
                        if agent.renew(volume_id, epoch).await.is_err() {
                            break;
                        }
                        continue;
                    }
                };
                let answered = match push {
                    Ok(Push::MapUpdate(map)) => {
                        epoch = map.epoch;
                        let _ = received_tx.send((map.epoch, Instant::now()));
                        agent.ack(volume_id, map.epoch).await
                    }
                    Ok(Push::Quiesce(quiesce)) => {
                        agent.quiesce_ack(quiesce.volume_id, quiesce.epoch).await
                    }
                    Ok(_) => Ok(()),
                    Err(error) => Err(error),
                };
                if answered.is_err() {
                    break;
                }
            }
        }));
    }
    let mut attach_samples = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        let sample = attached_rx
            .recv()
            .await
            .ok_or_else(|| anyhow!("attach task vanished"))?;
        attach_samples.push(sample.context("attach failed")?);
    }
    let attach_rate = args.clients as f64 / started.elapsed().as_secs_f64();

    // Push phase.
    let mut push_samples = Vec::new();
    let mut per_round_max = Vec::new();
    let mut grow_reply = Vec::new();
    let mut all_acked = Vec::new();
    let mut size = 64 * MIB;
    for round in 0..args.rounds {
        size += MIB;
        let expected_epoch = round as u64 + 2;
        let changed = Instant::now();
        admin
            .call(VolumeGrow {
                name: "bench".into(),
                new_size_bytes: size,
            })
            .await?;
        grow_reply.push(changed.elapsed());
        let mut round_samples = Vec::with_capacity(args.clients);
        while round_samples.len() < args.clients {
            let (epoch, at) = tokio::time::timeout(Duration::from_secs(60), received_rx.recv())
                .await
                .map_err(|_| {
                    anyhow!(
                        "round {round}: only {} clients got the new epoch",
                        round_samples.len()
                    )
                })?
                .ok_or_else(|| anyhow!("clients vanished"))?;
            if epoch == expected_epoch {
                round_samples.push(at - changed);
            }
        }
        per_round_max.push(round_samples.iter().copied().max().unwrap_or_default());
        // Until the server has recorded every ack (polled, so an upper bound).
        loop {
            let detail: VolumeDetail = admin
                .call(VolumeShow {
                    name: "bench".into(),
                })
                .await?;
            if detail.map.epoch == expected_epoch
                && detail.attachment_count == args.clients
                && detail.acked_current_epoch == args.clients
            {
                all_acked.push(changed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        push_samples.extend(round_samples);
    }
    for task in tasks {
        task.abort();
    }
    Ok(SandResult {
        attach_rate,
        attach_latency: stats(attach_samples),
        push: stats(push_samples),
        per_round_max,
        grow_reply: stats(grow_reply),
        all_acked,
    })
}

async fn benchmark(args: Args) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("sand-bench-{}", std::process::id()));
    if args.attack {
        let limit = raise_fd_limit(2 * args.hostile as u64 + 512)?;
        println!(
            "sand-bench --attack: {} hostile connections per port, {} attaches, {} reads, {} CPUs, RLIMIT_NOFILE {limit}",
            args.hostile,
            args.samples,
            args.reads,
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        );
        std::fs::create_dir_all(&dir)?;
        let outcome = attack::run(&args, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        return outcome;
    }
    let limit = raise_fd_limit(args.clients as u64 + 256)?;
    std::fs::create_dir_all(&dir)?;
    println!(
        "sand-bench: {} clients ({} identities), concurrency {}, {} rounds, {} CPUs, RLIMIT_NOFILE {limit}",
        args.clients,
        args.identities,
        args.concurrency,
        args.rounds,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let baseline = run_baseline(&args).await?;
    // Let the baseline's sockets go before sand starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let outcome = run_sand(&args, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    let sand = outcome?;

    println!();
    println!("baseline (raw loopback TCP, {} sockets)", args.clients);
    println!(
        "  connect rate                 {:.0} connections/s",
        baseline.connect_rate
    );
    println!(
        "  fan-out 64 B to all sockets  median {}  p99 {}  max {}",
        ms(baseline.fanout.median),
        ms(baseline.fanout.p99),
        ms(baseline.fanout.max)
    );
    println!("sand ({} authenticated agents, one volume)", args.clients);
    println!(
        "  attach rate                  {:.0} attaches/s ({:.2}x baseline connect rate)",
        sand.attach_rate,
        sand.attach_rate / baseline.connect_rate
    );
    println!(
        "  attach latency (connect+auth+attach)  median {}  p99 {}  max {}",
        ms(sand.attach_latency.median),
        ms(sand.attach_latency.p99),
        ms(sand.attach_latency.max)
    );
    println!(
        "  grow -> client holds new epoch  median {}  p99 {}  max {}  ({} samples)",
        ms(sand.push.median),
        ms(sand.push.p99),
        ms(sand.push.max),
        args.clients * args.rounds
    );
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!(
        "  vs baseline fan-out          median {:.1}x  p99 {:.1}x  max {:.1}x",
        ratio(sand.push.median, baseline.fanout.median),
        ratio(sand.push.p99, baseline.fanout.p99),
        ratio(sand.push.max, baseline.fanout.max)
    );
    let rounds: Vec<String> = sand.per_round_max.iter().map(|d| ms(*d)).collect();
    println!("  last client per round        {}", rounds.join(", "));
    println!(
        "  admin grow reply (commit)    median {}  max {}",
        ms(sand.grow_reply.median),
        ms(sand.grow_reply.max)
    );
    let acked: Vec<String> = sand.all_acked.iter().map(|d| ms(*d)).collect();
    println!(
        "  server saw every ack after   {} (polled, upper bound)",
        acked.join(", ")
    );
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
            eprintln!("sand-bench: {error}");
            std::process::exit(1);
        }
    };
    let outcome = if args.baseline_server {
        runtime.block_on(baseline_server())
    } else {
        runtime.block_on(benchmark(args))
    };
    if let Err(error) = outcome {
        eprintln!("sand-bench: {error:#}");
        std::process::exit(1);
    }
}
