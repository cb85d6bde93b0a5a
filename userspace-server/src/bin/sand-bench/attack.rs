//! `sand-bench --attack`: what hostile peers cost legitimate ones (issue 14).
//!
//! Measured twice on one sand, quiet and then under attack: a legitimate agent's attach
//! latency (connect, mutual authentication, attach; `--samples` attaches, each detached), and
//! the latency of 4 KiB reads of another client on the server path (`--reads` reads at random
//! offsets, one at a time, one I/O connection, as the kernel's TCP path sends them).
//!
//! The attack: `--hostile` idle connections to each of the agent and I/O ports, spread over
//! source addresses 127.0.0.2.. at most 64 per address (the per-address handshake limit),
//! each reopened as soon as sand closes it (handshake timeout); and one read-only session
//! hogging the I/O buffer budget: 5 connections of 64 pipelined 1 MiB reads each, replies
//! drained slowly (one reply per 10 ms per connection), every reply answered by a new read.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rand::Rng;
use sanblk_proto::client::{AdminClient, AgentClient};
use sanblk_proto::map::{AccessMode, Layout};
use sanblk_proto::protocol::{ClientAdd, ClientCreated, ClientGrant, PoolAdd, VolumeCreate};
use sanblk_uapi::frame::{Op, ReplyHeader, RequestHeader, REPLY_HEADER_LEN, REQUEST_HEADER_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

use super::{ms, sand_binary, start_sand, stats, Args, ChildGuard, Stats, MIB};

const READ_BYTES: u32 = 4096;
const VICTIM_BYTES: u64 = 64 * MIB;
const HOG_BYTES: u64 = 256 * MIB;
const HOG_CONNECTIONS: usize = 5;
const HOG_PIPELINE: u64 = 64;
/// Hostile connections per source address: sand's default per-address handshake limit.
const HOSTILE_PER_ADDRESS: usize = 64;

/// A server-path client speaking the kernel's frames.
struct FrameClient {
    stream: TcpStream,
}

impl FrameClient {
    async fn connect(address: SocketAddr, token_hex: &str) -> anyhow::Result<FrameClient> {
        let token = hex::decode(token_hex).context("session token")?;
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let mut client = FrameClient { stream };
        client
            .send(&RequestHeader::hello(0, 0, token.len() as u32))
            .await?;
        client.stream.write_all(&token).await?;
        let reply = client.receive(&mut Vec::new()).await?;
        if reply.status != 0 {
            bail!("HELLO refused: {}", reply.status);
        }
        Ok(client)
    }

    async fn send(&mut self, header: &RequestHeader) -> anyhow::Result<()> {
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        header.encode(&mut raw);
        self.stream.write_all(&raw).await?;
        Ok(())
    }

    async fn receive(&mut self, data: &mut Vec<u8>) -> anyhow::Result<ReplyHeader> {
        let mut raw = [0u8; REPLY_HEADER_LEN];
        self.stream.read_exact(&mut raw).await?;
        let header = ReplyHeader::decode(&raw).map_err(|e| anyhow!("reply: {}", e.message()))?;
        data.resize(header.length as usize, 0);
        self.stream.read_exact(data).await?;
        Ok(header)
    }
}

fn read_request(
    volume_id: u64,
    epoch: u64,
    handle: u64,
    offset: u64,
    length: u32,
) -> RequestHeader {
    RequestHeader {
        op: Op::Read,
        flags: 0,
        handle,
        volume_id,
        epoch,
        offset,
        length,
    }
}

struct Setup {
    agent_address: SocketAddr,
    io_address: SocketAddr,
    legit_secret: Vec<u8>,
    /// Keeps the reader's and the hog's sessions alive.
    _agents: Vec<AgentClient>,
    reader_token: String,
    victim: (u64, u64),
    hog_token: String,
    hog: (u64, u64),
}

async fn client(admin: &mut AdminClient, name: &str, volume: &str) -> anyhow::Result<Vec<u8>> {
    let created: ClientCreated = admin.call(ClientAdd { name: name.into() }).await?;
    admin
        .call(ClientGrant {
            name: name.into(),
            volume: volume.into(),
            mode: AccessMode::Ro,
        })
        .await?;
    Ok(hex::decode(created.secret)?)
}

async fn set_up(
    dir: &Path,
    agent_address: SocketAddr,
    admin_socket: &Path,
) -> anyhow::Result<Setup> {
    let mut admin = AdminClient::connect(admin_socket).await?;
    let image = dir.join("disk0.img");
    std::fs::File::create(&image)?.set_len(VICTIM_BYTES + HOG_BYTES + 64 * MIB)?;
    admin
        .call(PoolAdd {
            path: image.display().to_string(),
            force: false,
        })
        .await?;
    for (name, size) in [("victim", VICTIM_BYTES), ("hog", HOG_BYTES)] {
        admin
            .call(VolumeCreate {
                name: name.into(),
                size_bytes: size,
                layout: Layout::Linear,
            })
            .await?;
    }
    let legit_secret = client(&mut admin, "legit", "victim").await?;
    let reader_secret = client(&mut admin, "reader", "victim").await?;
    let hog_secret = client(&mut admin, "hog", "hog").await?;
    let mut reader = AgentClient::connect(agent_address, "reader", &reader_secret).await?;
    let read_attachment = reader.attach("victim", AccessMode::Ro).await?;
    let mut hog = AgentClient::connect(agent_address, "hog", &hog_secret).await?;
    let hog_attachment = hog.attach("hog", AccessMode::Ro).await?;
    let io_text =
        std::fs::read_to_string(dir.join("meta").join("io.addr")).context("sand's io.addr")?;
    Ok(Setup {
        agent_address,
        io_address: io_text.trim().parse().context("io.addr")?,
        legit_secret,
        _agents: vec![reader, hog],
        reader_token: read_attachment.session_token,
        victim: (read_attachment.map.volume_id, read_attachment.map.epoch),
        hog_token: hog_attachment.session_token,
        hog: (hog_attachment.map.volume_id, hog_attachment.map.epoch),
    })
}

struct Measured {
    attach: Stats,
    read: Stats,
}

async fn measure(setup: &Setup, args: &Args) -> anyhow::Result<Measured> {
    let mut attach_samples = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let begun = Instant::now();
        let mut agent = AgentClient::connect(setup.agent_address, "legit", &setup.legit_secret)
            .await
            .context("legitimate agent connect")?;
        let attachment = agent
            .attach("victim", AccessMode::Ro)
            .await
            .context("legitimate attach")?;
        attach_samples.push(begun.elapsed());
        agent.detach(attachment.map.volume_id).await?;
    }
    let mut io = FrameClient::connect(setup.io_address, &setup.reader_token).await?;
    let (volume_id, epoch) = setup.victim;
    let mut read_samples = Vec::with_capacity(args.reads);
    let mut data = Vec::new();
    for handle in 0..args.reads as u64 {
        let block = rand::thread_rng().gen_range(0..VICTIM_BYTES / u64::from(READ_BYTES));
        let begun = Instant::now();
        io.send(&read_request(
            volume_id,
            epoch,
            handle,
            block * u64::from(READ_BYTES),
            READ_BYTES,
        ))
        .await?;
        let reply = io.receive(&mut data).await?;
        read_samples.push(begun.elapsed());
        if reply.status != 0 || reply.handle != handle {
            bail!(
                "4 KiB read {handle}: status {} handle {}",
                reply.status,
                reply.handle
            );
        }
    }
    Ok(Measured {
        attach: stats(attach_samples),
        read: stats(read_samples),
    })
}

/// Keeps `count` idle connections from `source` to `target` open, reopening each one sand
/// closes; counts the connections open now in `open`.
async fn hold_idle(source: Ipv4Addr, target: SocketAddr, count: usize, open: Arc<AtomicUsize>) {
    let mut holders = JoinSet::new();
    for _ in 0..count {
        let open = open.clone();
        holders.spawn(async move {
            loop {
                let connected = async {
                    let socket = TcpSocket::new_v4()?;
                    socket.bind(SocketAddr::new(source.into(), 0))?;
                    socket.connect(target).await
                };
                match connected.await {
                    Ok(mut stream) => {
                        open.fetch_add(1, Ordering::Relaxed);
                        let mut sink = [0u8; 64];
                        // Never sends a byte; returns when sand closes the connection.
                        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                        open.fetch_sub(1, Ordering::Relaxed);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
    while holders.join_next().await.is_some() {}
}

/// One hog connection: 64 pipelined 1 MiB reads, one reply taken per 10 ms, each answered
/// by another read. Counts the MiB it got in `read_mib`.
async fn hog(
    setup_token: String,
    io_address: SocketAddr,
    volume: (u64, u64),
    read_mib: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let mut io = FrameClient::connect(io_address, &setup_token).await?;
    let (volume_id, epoch) = volume;
    // Read `handle` goes to MiB `handle` of the volume, round and round.
    let read = |handle: u64| {
        let offset = (handle % (HOG_BYTES / MIB)) * MIB;
        read_request(volume_id, epoch, handle, offset, MIB as u32)
    };
    for handle in 0..HOG_PIPELINE {
        io.send(&read(handle)).await?;
    }
    let mut data = Vec::new();
    for handle in HOG_PIPELINE.. {
        tokio::time::sleep(Duration::from_millis(10)).await;
        io.receive(&mut data).await?;
        read_mib.fetch_add(1, Ordering::Relaxed);
        io.send(&read(handle)).await?;
    }
    Ok(())
}

pub(crate) async fn run(args: &Args, dir: &Path) -> anyhow::Result<()> {
    let binary = sand_binary(args)?;
    let (child, agent_address, admin_socket) = start_sand(&binary, dir, &[])?;
    let _guard = ChildGuard(Some(child.id()));
    let setup = set_up(dir, agent_address, &admin_socket).await?;

    let quiet = measure(&setup, args).await?;

    let mut attack = JoinSet::new();
    let agent_open = Arc::new(AtomicUsize::new(0));
    let io_open = Arc::new(AtomicUsize::new(0));
    let addresses = args.hostile.div_ceil(HOSTILE_PER_ADDRESS);
    for index in 0..addresses {
        let source = Ipv4Addr::new(127, 0, (2 + index / 250) as u8, (2 + index % 250) as u8);
        let count = HOSTILE_PER_ADDRESS.min(args.hostile - index * HOSTILE_PER_ADDRESS);
        attack.spawn(hold_idle(source, agent_address, count, agent_open.clone()));
        attack.spawn(hold_idle(source, setup.io_address, count, io_open.clone()));
    }
    let hog_mib = Arc::new(AtomicUsize::new(0));
    for _ in 0..HOG_CONNECTIONS {
        let (token, read_mib) = (setup.hog_token.clone(), hog_mib.clone());
        let (io_address, volume) = (setup.io_address, setup.hog);
        attack.spawn(async move {
            if let Err(error) = hog(token, io_address, volume, read_mib).await {
                eprintln!("sand-bench: hog connection ended: {error:#}");
            }
        });
    }
    // Until the hostile connections are all open (or 20 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent_open.load(Ordering::Relaxed) + io_open.load(Ordering::Relaxed) < 2 * args.hostile
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hog_before = hog_mib.load(Ordering::Relaxed);
    let attack_started = Instant::now();
    let attacked = measure(&setup, args).await?;
    let hog_rate = (hog_mib.load(Ordering::Relaxed) - hog_before) as f64
        / attack_started.elapsed().as_secs_f64();
    let open_during = (
        agent_open.load(Ordering::Relaxed),
        io_open.load(Ordering::Relaxed),
    );
    attack.abort_all();

    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!();
    println!(
        "attack: {} hostile idle connections per port from {addresses} addresses (open at the end: agent port {}, I/O port {}), {HOG_CONNECTIONS}x{HOG_PIPELINE} pipelined 1 MiB reads drained slowly ({hog_rate:.0} MiB/s)",
        args.hostile, open_during.0, open_during.1
    );
    println!();
    println!("| measure | quiet p50 | quiet p99 | attacked p50 | attacked p99 | p99 ratio |");
    println!("|---|---|---|---|---|---|");
    for (name, q, a) in [
        (
            "agent attach (connect+auth+attach)",
            &quiet.attach,
            &attacked.attach,
        ),
        ("4 KiB server-path read", &quiet.read, &attacked.read),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} | {:.2}x |",
            ms(q.median),
            ms(q.p99),
            ms(a.median),
            ms(a.p99),
            ratio(a.p99, q.p99)
        );
    }
    Ok(())
}
