//! The client agent: `sanctl attach` authenticates to the server, receives the volume's map,
//! finds the SAN devices by label, hands the map to the kernel module over netlink and then
//! stays in the foreground relaying map updates and lease renewals (reconnecting with backoff
//! if the server goes away). `sanctl detach` stops it; `sanctl status` shows the kernel's view.
//!
//! Shutdown (SIGTERM from `sanctl detach`, SIGINT) is one branch of the agent's only `select!`
//! and every other branch is a future polled there, the reconnection attempts and their
//! backoff included: so a stop request is served at once whether or not the server can be
//! reached. Without a server the volume is detached locally, without the server's
//! confirmation.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use clap::Args;
use sanblk_proto::auth::read_secret_file;
use sanblk_proto::client::{AgentClient, ClientError};
use sanblk_proto::map::{AccessMode, VolumeMap};
use sanblk_proto::protocol::{Attachment, ErrorCode};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};
use uuid::Uuid;

use crate::context::{CliError, Context};
use crate::kernel_link::{
    lease_deadline_ns, listen_events, monotonic_now_ns, CreateRequest, KernelError, KernelLink,
};
use crate::map_encoding::{
    encode, missing_device_reason, scan_devices, scan_paths, unreadable_devices, EncodeError,
    LocalDevice,
};
use crate::output::print_table;
use crate::recovery_cmd::progress_line;
use sanblk_proto::client::Push;
use sanblk_proto::protocol::RecoveryStatus;
use sanblk_proto::protocol::MAX_REPORTED_CHUNKS;
use sanblk_uapi::netlink::{EventKind, MAX_EVENT_CHUNKS};

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long `sanctl detach` waits for the agent to detach.
const DETACH_WAIT: Duration = Duration::from_secs(20);
/// How long a stopping agent waits for the server to confirm the detach (a server that is
/// partitioned away would otherwise hold it for the whole reply timeout).
const SERVER_DETACH_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Args)]
pub struct AttachArgs {
    /// Name of the volume on the server.
    volume: String,
    /// Server control address, host:port.
    #[arg(long, env = "SANBLK_SERVER")]
    server: String,
    /// This host's client name (as given to `sanctl client add`).
    #[arg(long)]
    client: String,
    /// File holding this client's secret (as written by `sanctl client add --secret-out`).
    #[arg(long)]
    secret_file: PathBuf,
    /// Attach read-only (the grant may be ro or rw).
    #[arg(long)]
    ro: bool,
    /// Directory of block device nodes searched for SAN device labels.
    #[arg(long, default_value = "/dev")]
    dev_dir: PathBuf,
    /// Only these block devices are considered SAN devices (repeatable); overrides --dev-dir.
    #[arg(long = "device")]
    devices: Vec<PathBuf>,
    /// Server I/O address(es) `a.b.c.d:port` for the kernel's server path, tried in order
    /// (repeatable); by default the address the server reports on attach.
    #[arg(long = "io-server")]
    io_servers: Vec<String>,
    /// Directory for the agent's pid and device files (read by `sanctl detach`).
    #[arg(long, default_value = "/run/sanblk")]
    run_dir: PathBuf,
    /// Seconds the kernel holds I/O (during a change, or once the lease lapsed) before it
    /// fails it.
    #[arg(long = "io-timeout", default_value_t = 60, value_name = "SECS")]
    io_timeout_secs: u32,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// Name of the attached volume.
    volume: String,
    /// The agent's run directory (as given to `sanctl attach`).
    #[arg(long, default_value = "/run/sanblk")]
    run_dir: PathBuf,
}

fn local(message: impl std::fmt::Display) -> CliError {
    CliError::Local(message.to_string())
}

struct RunFiles {
    pid: PathBuf,
    device: PathBuf,
    error: PathBuf,
    /// The latest recovery status the server pushed, as JSON (read by `sanctl status`).
    recovery: PathBuf,
    /// How this agent reaches the server ([`AgentConnection`], read by `sanctl grow`).
    connection: PathBuf,
}

/// What `sanctl grow` on this host needs to ask the server for the attached volume: the
/// agent's server, client name and secret file, and the volume's id.
#[derive(Debug, Serialize, Deserialize)]
pub struct AgentConnection {
    pub server: String,
    pub client: String,
    pub secret_file: PathBuf,
    pub volume_id: u64,
}

impl AgentConnection {
    /// The connection file of `volume` in `run_dir`.
    pub fn path(run_dir: &Path, volume: &str) -> PathBuf {
        run_dir.join(format!("{volume}.connection"))
    }
}

impl RunFiles {
    fn new(run_dir: &Path, volume: &str) -> RunFiles {
        RunFiles {
            pid: run_dir.join(format!("{volume}.pid")),
            device: run_dir.join(format!("{volume}.device")),
            error: run_dir.join(format!("{volume}.error")),
            recovery: run_dir.join(format!("{volume}.recovery")),
            connection: AgentConnection::path(run_dir, volume),
        }
    }

    fn remove(&self) {
        for path in [
            &self.pid,
            &self.device,
            &self.error,
            &self.recovery,
            &self.connection,
        ] {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A fresh attachment and the CLOCK_MONOTONIC time its request was sent, from which its
/// map's lease runs.
type Attached = (AgentClient, Attachment, u64);

async fn connect_and_attach(
    args: &AttachArgs,
    secret: &[u8],
    mode: AccessMode,
) -> Result<Attached, CliError> {
    let mut client = AgentClient::connect(args.server.as_str(), &args.client, secret)
        .await
        .map_err(|e| match e {
            ClientError::Connect { .. } | ClientError::Timeout(_) => {
                CliError::Unreachable(format!("{}: {e}", args.server))
            }
            // A wrong secret fails the server's proof first: both sides derive it from the secret.
            ClientError::ServerNotAuthenticated => CliError::Refused(format!(
                "authentication failed with {} (wrong secret for {}?): {e}",
                args.server, args.client
            )),
            other => CliError::Refused(format!(
                "authentication failed with {}: {other}",
                args.server
            )),
        })?;
    let sent = monotonic_now_ns();
    let attachment = client
        .attach(&args.volume, mode)
        .await
        .map_err(|e| CliError::Refused(format!("attach {}: {e}", args.volume)))?;
    Ok((client, attachment, sent))
}

/// One reconnection attempt after its backoff delay, owning what it needs so that it can sit
/// in the agent's `select!` next to the shutdown signals.
type Reconnect = Pin<Box<dyn Future<Output = Result<Attached, CliError>>>>;

fn reconnect_after(
    delay: Duration,
    args: &AttachArgs,
    secret: &[u8],
    mode: AccessMode,
) -> Reconnect {
    let (args, secret) = (args.clone(), secret.to_vec());
    Box::pin(async move {
        tokio::time::sleep(delay).await;
        connect_and_attach(&args, &secret, mode).await
    })
}

/// The next push from the server; never ready while disconnected.
async fn next_push(client: &mut Option<AgentClient>) -> Result<Push, ClientError> {
    match client {
        Some(client) => client.next_push().await,
        None => std::future::pending().await,
    }
}

/// The running reconnection attempt's outcome; never ready while connected.
async fn reconnected(attempt: &mut Option<Reconnect>) -> Result<Attached, CliError> {
    match attempt {
        Some(attempt) => attempt.await,
        None => std::future::pending().await,
    }
}

fn local_devices(args: &AttachArgs) -> HashMap<Uuid, LocalDevice> {
    if args.devices.is_empty() {
        scan_devices(&args.dev_dir)
    } else {
        scan_paths(&args.devices)
    }
}

/// Explains a map the kernel cannot be given; a device not found may be one this user may not
/// read.
fn encode_failure(args: &AttachArgs, error: EncodeError) -> String {
    match error {
        EncodeError::MissingDevice(uuid) => {
            missing_device_reason(uuid, &unreadable_devices(&args.dev_dir, &args.devices))
        }
        other => other.to_string(),
    }
}

/// The server I/O addresses handed to the kernel: `--io-server`, else the address the server
/// reported, its wildcard IP replaced by the IP the agent reached the server at. The kernel
/// takes IPv4 only; without an address failed direct I/O fails upward.
fn io_servers(args: &AttachArgs, reported: Option<&str>) -> Vec<String> {
    if !args.io_servers.is_empty() {
        return args.io_servers.clone();
    }
    let Some(reported) = reported.and_then(|r| r.parse::<SocketAddr>().ok()) else {
        return Vec::new();
    };
    let ip = if reported.ip().is_unspecified() {
        match args
            .server
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.find(|a| a.is_ipv4()))
        {
            Some(server) => server.ip(),
            None => return Vec::new(),
        }
    } else {
        reported.ip()
    };
    match ip {
        IpAddr::V4(v4) => vec![format!("{v4}:{}", reported.port())],
        IpAddr::V6(_) => Vec::new(),
    }
}

/// Hands `map` to the kernel with the current session token and server addresses (the
/// kernel also takes the epoch it already has, to get only a new token after a reconnect).
/// Devices are found by label; `known` remembers every device seen, since a failed device's
/// label may be unreadable while the kernel still has it open. A map that answers a request
/// sent at `lease_from_ns` renews the lease from then.
fn install_update(
    kernel: &KernelLink,
    map: &VolumeMap,
    args: &AttachArgs,
    servers: &[String],
    token: &[u8],
    known: &mut HashMap<Uuid, LocalDevice>,
    lease_from_ns: Option<u64>,
) -> Result<(), CliError> {
    // Labels are read again only for a device the host has not seen yet: reading them
    // waits for every local device, and a slow one would stall the agent's renewals.
    if map.device_uuids().any(|uuid| !known.contains_key(&uuid)) {
        known.extend(local_devices(args));
    }
    let encoded = encode(map, known).map_err(|e| local(encode_failure(args, e)))?;
    kernel
        .update_map(
            map.volume_id,
            map.epoch,
            &encoded.bytes,
            &encoded.device_paths,
            servers,
            Some(token),
            lease_from_ns.map(|sent| lease_deadline_ns(sent, map.lease_ms)),
        )
        .map_err(local)
}

pub async fn attach(args: AttachArgs) -> Result<(), CliError> {
    let secret = read_secret_file(&args.secret_file).map_err(CliError::Usage)?;
    let mode = if args.ro {
        AccessMode::Ro
    } else {
        AccessMode::Rw
    };
    let kernel = KernelLink::open().map_err(local)?;
    let (mut client, attachment, attach_sent) = connect_and_attach(&args, &secret, mode).await?;
    let map = attachment.map;
    let volume_id = map.volume_id;
    let mut servers = io_servers(&args, attachment.io_address.as_deref());
    let devices = local_devices(&args);
    // Remembered now: once a device fails, its label may no longer be readable.
    let mut known_devices = devices.clone();
    let mut known_paths: HashMap<String, Uuid> = devices
        .iter()
        .map(|(uuid, d)| (d.path.display().to_string(), *uuid))
        .collect();
    let encoded = match encode(&map, &devices) {
        Ok(encoded) => encoded,
        Err(error) => {
            let _ = client.detach(volume_id).await;
            return Err(local(format!(
                "cannot attach {}: {}",
                args.volume,
                encode_failure(&args, error)
            )));
        }
    };
    let mut token = hex_bytes(&attachment.session_token);
    let index = match kernel.create(&CreateRequest {
        volume_id,
        name: &map.name,
        epoch: map.epoch,
        map: &encoded.bytes,
        device_paths: &encoded.device_paths,
        token: &token,
        read_only: args.ro,
        servers: &servers,
        lease_expires_ns: lease_deadline_ns(attach_sent, map.lease_ms),
        io_timeout_ms: Some(args.io_timeout_secs.saturating_mul(1000)),
    }) {
        Ok(index) => index,
        Err(error) => {
            let _ = client.detach(volume_id).await;
            return Err(local(error));
        }
    };
    let device = format!("/dev/sanblk{index}");
    std::fs::create_dir_all(&args.run_dir)
        .map_err(|e| local(format!("{}: {e}", args.run_dir.display())))?;
    let files = RunFiles::new(&args.run_dir, &args.volume);
    let _ = std::fs::remove_file(&files.error);
    std::fs::write(&files.pid, std::process::id().to_string())
        .map_err(|e| local(format!("{}: {e}", files.pid.display())))?;
    std::fs::write(&files.device, &device)
        .map_err(|e| local(format!("{}: {e}", files.device.display())))?;
    let connection = AgentConnection {
        server: args.server.clone(),
        client: args.client.clone(),
        secret_file: std::path::absolute(&args.secret_file).unwrap_or(args.secret_file.clone()),
        volume_id,
    };
    let connection = serde_json::to_vec(&connection).map_err(local)?;
    std::fs::write(&files.connection, connection)
        .map_err(|e| local(format!("{}: {e}", files.connection.display())))?;
    println!(
        "attached {} as {device} (epoch {}, devices {}, server path {})",
        args.volume,
        map.epoch,
        encoded.device_paths.join(","),
        if servers.is_empty() {
            "none".to_string()
        } else {
            servers.join(",")
        }
    );

    let mut epoch = map.epoch;
    let lease = Duration::from_millis(map.lease_ms.max(3000));
    let mut renew = tokio::time::interval(lease / 3);
    renew.tick().await;
    // Path failures the module reports are relayed to the server, which checks the device.
    let (event_sender, mut events) = tokio::sync::mpsc::unbounded_channel();
    if let Err(e) = listen_events(event_sender) {
        eprintln!(
            "sanctl attach: kernel events unavailable, path failures will not be reported: {e}"
        );
    }
    let (quiesce_sender, mut quiesce_results) = tokio::sync::mpsc::unbounded_channel();
    // The module's preserved-chunk events, relayed in batches, one per snapshot.
    let mut preserved = PreservedChunks::default();
    let mut report_tick = tokio::time::interval(REPORT_EVERY);
    // After an idle spell, one relay and then every REPORT_EVERY again (no burst).
    report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut terminate = signal(SignalKind::terminate()).map_err(local)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(local)?;
    let mut backoff = Duration::from_secs(1);
    // Exactly one of the two is set: connected, or an attempt to reconnect is under way.
    let mut client = Some(client);
    let mut reconnect: Option<Reconnect> = None;
    // Set once the server refused a renewal as fenced: the agent stops renewing, so the kernel
    // holds I/O when the lease lapses and fails it after the I/O timeout.
    let mut fenced = false;
    // Whether this agent quiesced the kernel and has not resumed it since: the server also
    // sends `Resume` after every attach (a restarted server may have left the kernel held),
    // which finds the kernel not held as a rule.
    let mut quiesced = false;
    loop {
        tokio::select! {
            // Kernel events wait in the channel while disconnected and are reported after.
            Some(event) = events.recv(), if client.is_some() => {
                let Some(client) = client.as_mut() else { continue };
                if event.volume_id == volume_id && event.kind == EventKind::PathFailed as u32 {
                    if !known_paths.contains_key(&event.device_path) {
                        for (uuid, device) in local_devices(&args) {
                            known_paths.entry(device.path.display().to_string()).or_insert(uuid);
                        }
                    }
                    report_path_failure(client, &known_paths, volume_id, &event.device_path).await;
                } else if event.volume_id == volume_id && event.kind == EventKind::PathHealed as u32 {
                    fail_back(&kernel, client, &known_paths, volume_id, &event.device_path).await;
                } else if event.volume_id == volume_id && event.kind == EventKind::ChunksPreserved as u32 {
                    if let Some(full) = preserved.add(event.snapshot_id, event.chunks) {
                        report_preserved(client, volume_id, full).await;
                    }
                }
            }
            push = next_push(&mut client) => match push {
                Ok(Push::RecoveryStatus(status)) if status.volume_id == volume_id => {
                    println!("recovery of {}: {:?} {}", args.volume, status.state, progress_line(&status));
                    match serde_json::to_vec(&status) {
                        Ok(json) => {
                            if let Err(e) = std::fs::write(&files.recovery, json) {
                                eprintln!("sanctl attach: {}: {e}", files.recovery.display());
                            }
                        }
                        Err(e) => eprintln!("sanctl attach: recovery status: {e}"),
                    }
                }
                Ok(Push::RecoveryStatus(_)) => {}
                Ok(Push::MapUpdate(map)) if map.volume_id == volume_id && map.epoch > epoch => {
                    match install_update(&kernel, &map, &args, &servers, &token, &mut known_devices, None) {
                        Ok(()) => {
                            epoch = map.epoch;
                            println!("volume {} now at epoch {epoch} ({} bytes)", args.volume, map.size_bytes);
                            if let Some(client) = client.as_mut() {
                                if let Err(e) = client.ack(volume_id, epoch).await {
                                    eprintln!("sanctl attach: cannot acknowledge epoch {epoch}: {e}");
                                }
                            }
                        }
                        Err(e) => eprintln!("sanctl attach: kernel refused epoch {}: {e}", map.epoch),
                    }
                }
                Ok(Push::MapUpdate(_)) => {}
                Ok(Push::Quiesce(request)) if request.volume_id == volume_id => {
                    // The kernel holds new I/O at once and returns once in-flight I/O has
                    // drained, which may take up to the I/O timeout (a slow device, a loaded
                    // server): that wait runs on its own thread and netlink socket, so the
                    // lease is renewed meanwhile and the server does not fence a client that
                    // is only draining.
                    drain_quiesce(quiesce_sender.clone(), volume_id, request.epoch);
                }
                Ok(Push::Resume(request)) if request.volume_id == volume_id => {
                    match kernel.resume(volume_id, request.epoch) {
                        Ok(()) if quiesced => println!("volume {} resumed at epoch {}", args.volume, request.epoch),
                        Ok(()) => {}
                        Err(e) if quiesced => eprintln!(
                            "sanctl attach: the kernel refused to resume {} at epoch {}: {e}",
                            args.volume, request.epoch
                        ),
                        Err(_) => {}
                    }
                    quiesced = false;
                }
                Ok(Push::Quiesce(_) | Push::Resume(_)) => {}
                Err(error) => {
                    eprintln!("sanctl attach: lost the server ({error}); reconnecting");
                    client = None;
                    reconnect = Some(reconnect_after(backoff, &args, &secret, mode));
                }
            },
            attempt = reconnected(&mut reconnect) => match attempt {
                Ok((fresh, attachment, sent)) => {
                    reconnect = None;
                    client = Some(fresh);
                    // A fresh attachment: its lease is renewed again.
                    fenced = false;
                    backoff = Duration::from_secs(1);
                    // A restarted server may listen elsewhere; the kernel gets the new
                    // addresses with the next map.
                    servers = io_servers(&args, attachment.io_address.as_deref());
                    // The server re-issues the attachment's persisted token; should it be a
                    // new one (e.g. its store was lost), the kernel's server path must present
                    // it, also when the epoch did not change.
                    token = hex_bytes(&attachment.session_token);
                    if attachment.map.epoch >= epoch {
                        if let Err(e) = install_update(&kernel, &attachment.map, &args, &servers, &token, &mut known_devices, Some(sent)) {
                            eprintln!("sanctl attach: kernel refused epoch {}: {e}", attachment.map.epoch);
                        } else {
                            epoch = attachment.map.epoch;
                        }
                    }
                    println!("reconnected to {} at epoch {epoch}", args.server);
                }
                Err(e) => {
                    eprintln!("sanctl attach: reconnect failed: {e}");
                    // Never longer than a third of the lease: a server back within the lease
                    // must see the renewal before the kernel holds I/O.
                    backoff = (backoff * 2).min(MAX_BACKOFF).min(lease / 3);
                    reconnect = Some(reconnect_after(backoff, &args, &secret, mode));
                }
            },
            Some((drained_epoch, drained)) = quiesce_results.recv() => match drained {
                Ok(()) => {
                    quiesced = true;
                    println!("volume {} quiesced at epoch {drained_epoch} for a change", args.volume);
                    if let Some(client) = client.as_mut() {
                        if let Err(e) = client.quiesce_ack(volume_id, drained_epoch).await {
                            eprintln!("sanctl attach: cannot acknowledge the quiesce of epoch {drained_epoch}: {e}");
                        }
                    }
                }
                // Not acknowledged, and the lease no longer renewed: the server fences this
                // client once the lease expires and the change goes on, which is safe; an
                // ack without a drain would not be.
                Err(e) => {
                    fenced = true;
                    eprintln!(
                        "sanctl attach: the kernel could not quiesce {} at epoch {drained_epoch}: {e}; \
                         not acknowledged, lease renewals stop so the server fences this host. \
                         Detach and attach again.",
                        args.volume
                    );
                }
            },
            _ = report_tick.tick(), if client.is_some() && !preserved.is_empty() => {
                if let Some(client) = client.as_mut() {
                    for batch in preserved.take_all() {
                        report_preserved(client, volume_id, batch).await;
                    }
                }
            }
            _ = renew.tick(), if client.is_some() && !fenced => {
                if let Some(client) = client.as_mut() {
                    let sent = monotonic_now_ns();
                    match client.renew(volume_id, epoch).await {
                        Ok(lease_ms) => {
                            if let Err(e) = kernel.renew(volume_id, epoch, lease_deadline_ns(sent, lease_ms)) {
                                eprintln!("sanctl attach: kernel refused the lease renewal of epoch {epoch}: {e}");
                            }
                        }
                        Err(ClientError::Server(body)) if body.code == ErrorCode::Fenced => {
                            fenced = true;
                            eprintln!(
                                "sanctl attach: FENCED: the server refused the lease renewal of {} ({}); \
                                 renewals stop, the kernel holds I/O once the lease lapses and fails it \
                                 after the I/O timeout ({} s). Detach and attach again.",
                                args.volume, body.message, args.io_timeout_secs
                            );
                        }
                        Err(e) => eprintln!("sanctl attach: lease renewal failed: {e}"),
                    }
                }
            }
            _ = terminate.recv() => {
                if detach_now(&kernel, client.as_mut(), volume_id, &files).await {
                    return Ok(());
                }
            }
            _ = interrupt.recv() => {
                if detach_now(&kernel, client.as_mut(), volume_id, &files).await {
                    return Ok(());
                }
            }
        }
    }
}

/// Quiesces the volume in the kernel on a blocking thread with a netlink socket of its own
/// (the event loop's stays free for renewals) and sends the outcome to `done`.
fn drain_quiesce(
    done: tokio::sync::mpsc::UnboundedSender<(u64, Result<(), KernelError>)>,
    volume_id: u64,
    epoch: u64,
) {
    tokio::task::spawn_blocking(move || {
        let drained = KernelLink::open().and_then(|kernel| kernel.quiesce(volume_id, epoch));
        let _ = done.send((epoch, drained));
    });
}

/// How long preserved chunks wait to be relayed with more.
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// Chunks of one snapshot the kernel reported preserved: one report to the server.
#[derive(Debug, PartialEq, Eq)]
struct PreservedBatch {
    snapshot_id: u64,
    chunks: Vec<u64>,
}

/// Chunks the kernel reported preserved, not yet relayed to the server, per snapshot: the
/// module preserves a chunk into every active snapshot's store lacking it, so events of
/// different snapshots come interleaved.
#[derive(Debug, Default)]
struct PreservedChunks {
    /// Never an empty list.
    pending: BTreeMap<u64, Vec<u64>>,
}

impl PreservedChunks {
    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Adds an event's chunks; returns the snapshot's batch to relay now once it is about
    /// full (the next event could not fit in one report).
    fn add(&mut self, snapshot_id: u64, chunks: Vec<u64>) -> Option<PreservedBatch> {
        if chunks.is_empty() {
            return None;
        }
        let pending = self.pending.entry(snapshot_id).or_default();
        // An event carries at most MAX_EVENT_CHUNKS: the batch stays within a report.
        pending.extend(chunks.into_iter().take(MAX_EVENT_CHUNKS));
        if pending.len() <= MAX_REPORTED_CHUNKS - MAX_EVENT_CHUNKS {
            return None;
        }
        self.pending
            .remove(&snapshot_id)
            .map(|chunks| PreservedBatch {
                snapshot_id,
                chunks,
            })
    }

    /// Every pending batch, by snapshot id.
    fn take_all(&mut self) -> Vec<PreservedBatch> {
        std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(snapshot_id, chunks)| PreservedBatch {
                snapshot_id,
                chunks,
            })
            .collect()
    }
}

/// Relays chunks the kernel preserved in a snapshot's COW store to the server, which checks
/// them against the store's records (the durable changed-chunk list: an event lost here, or
/// with a crash, loses nothing).
async fn report_preserved(client: &mut AgentClient, volume_id: u64, batch: PreservedBatch) {
    let PreservedBatch {
        snapshot_id,
        chunks,
    } = batch;
    match client.report_preserved(volume_id, snapshot_id, chunks).await {
        Ok(noted) if noted.unrecorded.is_empty() => {}
        Ok(noted) => eprintln!(
            "sanctl attach: the server finds no record of chunks {:?} of snapshot {snapshot_id} this host preserved",
            noted.unrecorded
        ),
        Err(e) => eprintln!("sanctl attach: cannot report preserved chunks of snapshot {snapshot_id}: {e}"),
    }
}

/// Tells the server that the kernel lost its direct path to the device at `path`. The server
/// reads the device itself: if it can, this host's I/O to it keeps going through the server;
/// if not, the server recovers the volume's data onto another device.
async fn report_path_failure(
    client: &mut AgentClient,
    known_paths: &HashMap<String, Uuid>,
    volume_id: u64,
    path: &str,
) {
    let Some(uuid) = known_paths.get(path).copied() else {
        eprintln!("sanctl attach: the kernel reports {path} failed, but no SAN device label is found there");
        return;
    };
    let reason = format!("direct I/O to {path} failed on this host");
    match client.report_failure(volume_id, uuid, &reason).await {
        Ok(reported) => println!("reported failure of {uuid} ({path}): {}", reported.message),
        Err(e) => eprintln!("sanctl attach: cannot report the failure of {uuid}: {e}"),
    }
}

/// The kernel's probe reads the device at `path` again: asks the server whether this host may
/// fail back to it and, if so, marks it healthy in the kernel (new I/O goes direct again).
async fn fail_back(
    kernel: &KernelLink,
    client: &mut AgentClient,
    known_paths: &HashMap<String, Uuid>,
    volume_id: u64,
    path: &str,
) {
    let Some(uuid) = known_paths.get(path).copied() else {
        eprintln!(
            "sanctl attach: the kernel reports {path} healed, but it is not a known SAN device"
        );
        return;
    };
    match client.report_path_healed(volume_id, uuid).await {
        Ok((true, message)) => match kernel.set_device_healthy(volume_id, path) {
            Ok(()) => {
                println!("path to {uuid} ({path}) healed; failed back to direct I/O ({message})")
            }
            Err(e) => eprintln!("sanctl attach: cannot fail back to {path}: {e}"),
        },
        Ok((false, message)) => {
            println!("path to {uuid} ({path}) healed; fail-back refused by the server: {message}")
        }
        Err(e) => eprintln!("sanctl attach: cannot report that {path} healed: {e}"),
    }
}

/// Detaches from the kernel, then from the server if connected (a server that cannot be
/// reached is not told). A busy volume stays attached, the reason is left for
/// `sanctl detach`, and the agent keeps running.
async fn detach_now(
    kernel: &KernelLink,
    client: Option<&mut AgentClient>,
    volume_id: u64,
    files: &RunFiles,
) -> bool {
    match kernel.destroy(volume_id) {
        Ok(()) => {
            match client {
                Some(client) => {
                    match tokio::time::timeout(SERVER_DETACH_WAIT, client.detach(volume_id)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => eprintln!(
                            "sanctl attach: detached locally, but the server did not confirm: {e}"
                        ),
                        Err(_) => eprintln!(
                            "sanctl attach: detached locally; the server did not answer within \
                             {SERVER_DETACH_WAIT:?}"
                        ),
                    }
                }
                None => eprintln!(
                    "sanctl attach: detached locally; the server is unreachable and was not told"
                ),
            }
            files.remove();
            println!("detached");
            true
        }
        Err(error) => {
            eprintln!("sanctl attach: cannot detach: {error}");
            let _ = std::fs::write(&files.error, error.to_string());
            false
        }
    }
}

fn hex_bytes(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let decoded: Option<Vec<u8>> = bytes
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
        })
        .collect();
    // A token that is not hex is still an opaque token: pass its bytes.
    decoded
        .filter(|d| !d.is_empty() && bytes.len().is_multiple_of(2))
        .unwrap_or_else(|| bytes.to_vec())
}

pub async fn detach(args: DetachArgs) -> Result<(), CliError> {
    let files = RunFiles::new(&args.run_dir, &args.volume);
    let pid_text = std::fs::read_to_string(&files.pid).map_err(|_| {
        CliError::Refused(format!(
            "volume {} is not attached by an agent on this host",
            args.volume
        ))
    })?;
    let pid: i32 = pid_text
        .trim()
        .parse()
        .map_err(|_| local(format!("{}: not a pid", files.pid.display())))?;
    let _ = std::fs::remove_file(&files.error);
    // SAFETY: kill(2) with a pid read from the agent's own pid file; no memory is involved.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        let error = std::io::Error::last_os_error();
        // Only a process that does not exist is gone: EPERM means it lives on, owned by
        // someone this user may not signal, and its files are still in use.
        return Err(match error.raw_os_error() {
            Some(libc::ESRCH) => {
                files.remove();
                CliError::Refused(format!(
                    "agent {pid} for {} is gone; cleaned up its files",
                    args.volume
                ))
            }
            Some(libc::EPERM) => CliError::Refused(format!(
                "agent {pid} for {} is running but this user may not signal it (EPERM): \
                 run sanctl detach as the agent's user or as root",
                args.volume
            )),
            _ => local(format!(
                "cannot signal agent {pid} for {}: {error}",
                args.volume
            )),
        });
    }
    let deadline = tokio::time::Instant::now() + DETACH_WAIT;
    while tokio::time::Instant::now() < deadline {
        if !files.pid.exists() {
            println!("detached {}", args.volume);
            return Ok(());
        }
        if let Ok(reason) = std::fs::read_to_string(&files.error) {
            return Err(CliError::Refused(format!(
                "cannot detach {}: {reason}",
                args.volume
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(CliError::Refused(format!(
        "agent {pid} did not detach {} within {DETACH_WAIT:?}",
        args.volume
    )))
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The agents' run directory, where they leave recovery progress.
    #[arg(long, default_value = "/run/sanblk")]
    run_dir: PathBuf,
}

/// Recovery progress the agents on this host received, by volume name.
fn recoveries(run_dir: &Path) -> Vec<(String, RecoveryStatus)> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let mut found: Vec<(String, RecoveryStatus)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry
                .file_name()
                .to_string_lossy()
                .strip_suffix(".recovery")?
                .to_string();
            let text = std::fs::read(entry.path()).ok()?;
            serde_json::from_slice(&text)
                .ok()
                .map(|status| (name, status))
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// The lease column: time left, or lapsed.
fn lease_text(volume: &crate::kernel_link::KernelVolume) -> String {
    if volume.lease_remaining_ms == 0 {
        "lapsed".into()
    } else {
        format!("{:.1}s left", volume.lease_remaining_ms as f64 / 1000.0)
    }
}

/// The held-I/O column: how many bios are held and why (io_timeout bounds the wait).
fn held_text(volume: &crate::kernel_link::KernelVolume) -> String {
    if volume.hold_reason.is_empty() && volume.held_ios == 0 {
        return "-".into();
    }
    let why = if volume.hold_reason.is_empty() {
        "held".to_string()
    } else {
        volume.hold_reason.join("+")
    };
    format!(
        "{} ({why}, timeout {}s)",
        volume.held_ios,
        volume.io_timeout_ms / 1000
    )
}

pub fn status(context: &Context, args: &StatusArgs) -> Result<(), CliError> {
    let kernel = KernelLink::open().map_err(local)?;
    let status = kernel.status().map_err(local)?;
    if context.json {
        let recoveries: Vec<RecoveryStatus> = recoveries(&args.run_dir)
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        let mut json = serde_json::to_value(&status).map_err(local)?;
        if let Some(object) = json.as_object_mut() {
            object.insert(
                "recoveries".into(),
                serde_json::to_value(recoveries).map_err(local)?,
            );
        }
        return context.print_json(&json);
    }
    println!(
        "sanblk module {} (protocol {}, block major {})",
        status.module_version, status.protocol_version, status.block_major
    );
    if status.volumes.is_empty() {
        println!("no volumes attached");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = status
        .volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.volume_id.to_string(),
                v.device.clone(),
                v.epoch.to_string(),
                v.size_bytes.to_string(),
                if v.read_only {
                    "ro".into()
                } else {
                    "rw".into()
                },
                format!("{}/{}", v.read_ios, v.write_ios),
                format!("{}/{}", v.read_bytes, v.written_bytes),
                v.errors.to_string(),
                if v.servers.is_empty() {
                    v.server_path.clone()
                } else {
                    format!("{} {}", v.server_path, v.servers.join(","))
                },
                v.redirected_ios.to_string(),
                lease_text(v),
                held_text(v),
                v.timed_out_ios.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "VOLUME",
            "ID",
            "DEVICE",
            "EPOCH",
            "SIZE",
            "MODE",
            "READS/WRITES",
            "BYTES R/W",
            "ERRORS",
            "SERVER PATH",
            "REDIRECTED",
            "LEASE",
            "HELD I/O",
            "TIMED OUT",
        ],
        &rows,
    );
    let device_rows: Vec<Vec<String>> = status
        .volumes
        .iter()
        .flat_map(|v| {
            v.devices.iter().map(move |d| {
                vec![
                    v.name.clone(),
                    d.path.clone(),
                    d.state.clone(),
                    d.errors.to_string(),
                ]
            })
        })
        .collect();
    println!();
    print_table(
        &["VOLUME", "SAN DEVICE", "PATH STATE", "ERRORS"],
        &device_rows,
    );
    let recoveries = recoveries(&args.run_dir);
    if !recoveries.is_empty() {
        println!();
        for (volume, recovery) in recoveries {
            println!(
                "recovery of {volume} (device {}): {:?} {}",
                recovery.device_uuid,
                recovery.state,
                progress_line(&recovery)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preserved_chunks_are_batched_per_snapshot_and_within_a_report() {
        let mut pending = PreservedChunks::default();
        assert!(pending.is_empty());
        assert_eq!(pending.add(7, Vec::new()), None);
        assert!(pending.is_empty(), "an empty event makes no report");
        // Events of two snapshots interleaved (a chunk preserved into both stores): nothing
        // is relayed before the tick, which relays one batch per snapshot.
        for chunk in 0..10 {
            assert_eq!(pending.add(8, vec![chunk]), None);
            assert_eq!(pending.add(7, vec![chunk]), None);
        }
        assert!(!pending.is_empty());
        let all = pending.take_all();
        let batches: Vec<(u64, Vec<u64>)> =
            all.into_iter().map(|b| (b.snapshot_id, b.chunks)).collect();
        assert_eq!(
            batches,
            [(7, (0..10).collect::<Vec<u64>>()), (8, (0..10).collect())]
        );
        assert!(pending.is_empty() && pending.take_all().is_empty());
        // A snapshot's batch is relayed once about full, alone; an event never adds more
        // than MAX_EVENT_CHUNKS.
        assert_eq!(pending.add(8, vec![9]), None);
        let mut relayed = Vec::new();
        for _ in 0..MAX_REPORTED_CHUNKS {
            if let Some(full) = pending.add(7, (0..MAX_EVENT_CHUNKS as u64 * 2).collect()) {
                assert!(full.chunks.len() <= MAX_REPORTED_CHUNKS);
                assert_eq!(full.snapshot_id, 7);
                relayed.push(full);
            }
        }
        assert!(relayed.len() > 1);
        // The other snapshot's batch waited for the tick.
        let rest = pending.take_all();
        assert!(
            rest.iter()
                .any(|b| (b.snapshot_id, &b.chunks[..]) == (8, &[9][..])),
            "{rest:?}"
        );
        assert!(rest.iter().all(|b| b.chunks.len() <= MAX_REPORTED_CHUNKS));
    }
}
