//! Server I/O service: the server side of the second data path. A client kmod whose direct
//! path to a SAN device fails re-issues the I/O here over TCP (frames of
//! [`sanblk_uapi::frame`]); the server performs it on its own path to the devices.
//!
//! Connection protocol:
//! - The first frame must be HELLO carrying the 32 raw bytes of the session token the agent
//!   got on attach, within [`HELLO_TIMEOUT`] (or the handshake timeout if shorter). A known
//!   token gets status 0, an unknown one -EACCES, and the connection is closed.
//! - Then READ/WRITE/FLUSH frames, pipelined: up to [`MAX_IN_FLIGHT`] per connection execute
//!   concurrently and replies may come back out of order, matched by handle.
//! - Every request is checked against the session, looked up again per request: the volume
//!   must be the session's (-EACCES; a session that has ended also gets -EACCES and the
//!   connection is closed), WRITE needs a read-write session (-EROFS), the epoch must be the
//!   volume's current one (-ESTALE, nothing is done), `offset + length` must lie within the
//!   volume (-EINVAL). A device error gets -EIO; a mirrored write succeeds only if every
//!   replica was written.
//! - A malformed header, a second HELLO, or a frame not completed within the frame timeout
//!   closes the connection (after in-flight replies are sent); other connections are
//!   unaffected.
//!
//! Shape: one task per connection (as in mini-redis); in it the reader decodes frames and
//! spawns one task per request, whose blocking disk I/O runs in `spawn_blocking`; a single
//! writer task sends the replies it receives over an mpsc channel.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, info, warn};
use sanblk_uapi::frame::{
    FrameError, Op, ReplyHeader, RequestHeader, FLAG_FUA, REPLY_HEADER_LEN, REQUEST_HEADER_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::device::{plan, BufferPool, DeviceFailure, DeviceTable, PooledBuf};

use sanblk_proto::map::{AccessMode, Extent};

use crate::log_text::peer_text;
use crate::recovery_gate;
use crate::state::{Refusal, ServerState, SessionInfo};
use crate::store::VolumeRecord;

/// File in the metadata dir where sand writes the address the I/O service listens on.
pub const IO_ADDRESS_FILE: &str = "io.addr";
/// Longest time a new connection may take to present its HELLO.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests executing at once per connection; the reader stops reading beyond this.
pub const MAX_IN_FLIGHT: usize = 64;
/// Request and reply data buffered at once by the whole service (WRITE payloads being
/// received or written, READ data being read or sent): beyond it readers wait.
pub const MAX_BUFFERED_BYTES: usize = 256 << 20;
/// The most of [`MAX_BUFFERED_BYTES`] one session holds at once, over all its connections.
/// A session that pipelines more (or drains its replies slowly) waits on its own share, so
/// other sessions find the global budget free unless more than
/// `MAX_BUFFERED_BYTES / SESSION_BUFFER_SHARE` sessions each hold their whole share; a
/// share is given back within the frame timeout (replies not taken by then close the
/// connection). A share holds at least one largest request (1 MiB).
pub const SESSION_BUFFER_SHARE: usize = MAX_BUFFERED_BYTES / 8;
/// Device operations the whole service has executing at once (each on a blocking thread);
/// a session has at most `max_device_ops_per_session` of them.
pub const MAX_DEVICE_OPS: usize = 64;
/// Unit of the buffer budget.
const BUDGET_UNIT: usize = 4096;
/// Accept queue length of the I/O port.
const LISTEN_BACKLOG: u32 = 1024;

/// Binds the I/O listener (SO_REUSEADDR, deep backlog).
pub fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Negative errno carried in a reply.
fn errno(code: i32) -> i32 {
    -code
}

/// The I/O service: shared by all its connections.
pub struct IoService {
    state: Arc<ServerState>,
    devices: DeviceTable,
    buffers: Arc<BufferPool>,
    /// [`MAX_BUFFERED_BYTES`] in units of [`BUDGET_UNIT`].
    budget: Arc<Semaphore>,
    /// [`MAX_DEVICE_OPS`] slots.
    device_ops: Arc<Semaphore>,
    /// Last volume record read per volume id (the map used for I/O of that epoch).
    volumes: Mutex<HashMap<u64, Arc<VolumeRecord>>>,
    /// Per session token: connections past their HELLO (at most
    /// `max_connections_per_session`) and the session's limits.
    session_connections: Arc<Mutex<HashMap<String, SessionEntry>>>,
}

struct SessionEntry {
    connections: usize,
    limits: SessionLimits,
}

/// What one session's connections share, so that a session queueing deep (or draining its
/// replies slowly) waits on itself and not others: its share of the buffer budget and its
/// device-operation slots. Both are FIFO (tokio semaphores): within a session, requests go in
/// the order they came.
#[derive(Clone)]
struct SessionLimits {
    /// [`SESSION_BUFFER_SHARE`] in units of [`BUDGET_UNIT`].
    share: Arc<Semaphore>,
    /// `max_device_ops_per_session` slots.
    device_ops: Arc<Semaphore>,
}

/// One connection counted against its session's limit until dropped.
struct SessionConnection {
    token: String,
    limits: SessionLimits,
    counts: Arc<Mutex<HashMap<String, SessionEntry>>>,
}

impl Drop for SessionConnection {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = counts.get_mut(&self.token) {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.connections == 0 {
                counts.remove(&self.token);
            }
        }
    }
}

/// A data buffer, counted against its session's share and the service's budget until dropped.
struct Buffer {
    data: PooledBuf,
    _budget: OwnedSemaphorePermit,
    _share: OwnedSemaphorePermit,
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

/// A reply on its way to the writer task.
struct Reply {
    header: ReplyHeader,
    data: Option<Buffer>,
}

impl Reply {
    fn status(handle: u64, status: i32) -> Reply {
        Reply {
            header: ReplyHeader {
                handle,
                status,
                length: 0,
            },
            data: None,
        }
    }
}

impl IoService {
    /// The service; the first I/O error on each device is sent to `failures`.
    pub fn new(
        state: Arc<ServerState>,
        failures: tokio::sync::mpsc::UnboundedSender<DeviceFailure>,
    ) -> Arc<IoService> {
        Arc::new(IoService {
            devices: DeviceTable::reporting_failures(state.store.clone(), failures),
            buffers: Arc::new(BufferPool::default()),
            budget: Arc::new(Semaphore::new(MAX_BUFFERED_BYTES / BUDGET_UNIT)),
            device_ops: Arc::new(Semaphore::new(MAX_DEVICE_OPS)),
            state,
            volumes: Mutex::new(HashMap::new()),
            session_connections: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Counts a connection of the session `token`, unless it already has the most allowed.
    fn enter_session(&self, token: &str) -> Option<SessionConnection> {
        let limit = self.state.config.max_connections_per_session;
        let device_ops = self.state.config.max_device_ops_per_session;
        let mut counts = self
            .session_connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let entry = counts
            .entry(token.to_owned())
            .or_insert_with(|| SessionEntry {
                connections: 0,
                limits: SessionLimits {
                    share: Arc::new(Semaphore::new(SESSION_BUFFER_SHARE / BUDGET_UNIT)),
                    device_ops: Arc::new(Semaphore::new(device_ops)),
                },
            });
        if entry.connections >= limit {
            return None;
        }
        entry.connections += 1;
        Some(SessionConnection {
            token: token.to_owned(),
            limits: entry.limits.clone(),
            counts: self.session_connections.clone(),
        })
    }

    /// A buffer of `len` bytes, once the session's share and then the service's budget allow
    /// (in that order: a session over its share waits without holding any of the budget).
    async fn buffer(&self, len: usize, share: &Arc<Semaphore>) -> io::Result<Buffer> {
        let units = u32::try_from(len.div_ceil(BUDGET_UNIT).max(1))
            .ok()
            .filter(|units| *units as usize <= SESSION_BUFFER_SHARE / BUDGET_UNIT)
            .ok_or_else(|| io::Error::other("buffer too large"))?;
        let share = share
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(|_| io::Error::other("buffer budget closed"))?;
        let budget = self
            .budget
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(|_| io::Error::other("buffer budget closed"))?;
        Ok(Buffer {
            data: self.buffers.get(len)?,
            _budget: budget,
            _share: share,
        })
    }

    /// Accepts connections until `shutdown` flips, then waits for the connections to finish
    /// (each stops reading, completes its in-flight requests and closes).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let service = self.clone();
                        let shutdown = shutdown.clone();
                        connections.spawn(async move {
                            service.serve_connection(stream, peer, shutdown).await;
                        });
                    }
                    Err(error) => {
                        warn!("accepting I/O connection: {error}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        while connections.join_next().await.is_some() {}
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let frame_timeout = self.state.config.frame_timeout;
        let hello_timeout = HELLO_TIMEOUT.min(self.state.config.handshake_timeout);

        // Connections before HELLO have a pool of their own (the agent port's flood cannot
        // fill it), and one address gets only its share of it; over that share a connection
        // is closed at once (the pool logs it once).
        let hello_slot = match self.state.admission.io_handshakes.try_enter(peer.ip()) {
            Ok(slot) => slot,
            Err(Refusal::PeerLimit) => return,
            Err(Refusal::PoolFull) => {
                warn!("I/O connection from {peer}: too many connections before HELLO; refusing");
                return;
            }
        };
        let hello = tokio::select! {
            _ = shutdown.changed() => return,
            hello = tokio::time::timeout(hello_timeout, read_hello(&mut reader)) => hello,
        };
        let (handle, token) = match hello {
            Ok(Ok(hello)) => hello,
            Ok(Err(error)) => {
                warn!("I/O connection from {peer}: bad HELLO: {error}");
                return;
            }
            Err(_) => {
                warn!("I/O connection from {peer}: no HELLO within {hello_timeout:?}");
                return;
            }
        };
        let Some(session) = self.state.session(&token) else {
            warn!("I/O connection from {peer}: unknown session token");
            let reply = Reply::status(handle, errno(libc::EACCES));
            let _ = tokio::time::timeout(frame_timeout, send_reply(&mut writer, &reply)).await;
            return;
        };
        let Some(session_connection) = self.enter_session(&token) else {
            warn!(
                "I/O connection from {peer}: client {} volume {} already has {} I/O connections \
                 (--max-connections-per-session); refusing with -EBUSY",
                peer_text(&session.client),
                session.volume_id,
                self.state.config.max_connections_per_session
            );
            let reply = Reply::status(handle, errno(libc::EBUSY));
            let _ = tokio::time::timeout(frame_timeout, send_reply(&mut writer, &reply)).await;
            return;
        };
        if !matches!(
            tokio::time::timeout(
                frame_timeout,
                send_reply(&mut writer, &Reply::status(handle, 0))
            )
            .await,
            Ok(Ok(()))
        ) {
            return;
        }
        drop(hello_slot);
        info!(
            "I/O connection from {peer}: client {} volume {} ({})",
            session.client, session.volume_id, session.mode
        );

        let (replies, reply_queue) = mpsc::channel::<Reply>(MAX_IN_FLIGHT);
        let writer_task = tokio::spawn(write_replies(writer, reply_queue, frame_timeout));
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        loop {
            // Wait for a free slot, then for the first byte of the next frame without a
            // deadline (an idle client is fine); the rest of the frame must follow promptly.
            let permit = tokio::select! {
                _ = shutdown.changed() => break,
                _ = replies.closed() => break,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let mut raw = [0u8; REQUEST_HEADER_LEN];
            let first = tokio::select! {
                _ = shutdown.changed() => break,
                _ = replies.closed() => break,
                read = reader.read(&mut raw) => read,
            };
            let started = match first {
                Ok(0) => break,
                Ok(n) => n,
                Err(error) => {
                    debug!("I/O connection from {peer}: {error}");
                    break;
                }
            };
            let header =
                tokio::time::timeout(frame_timeout, read_header(&mut reader, &mut raw, started))
                    .await;
            let header = match header {
                Ok(Ok(header)) => header,
                Ok(Err(error)) => {
                    warn!("I/O connection from {peer}: {error}; closing");
                    break;
                }
                Err(_) => {
                    warn!("I/O connection from {peer}: frame not completed within {frame_timeout:?}; closing");
                    break;
                }
            };
            let payload = match header.op {
                Op::Hello => {
                    warn!("I/O connection from {peer}: second HELLO; closing");
                    break;
                }
                Op::Write => {
                    // Waiting for the budget is not the peer's fault: no deadline here.
                    let buffer = tokio::select! {
                        _ = shutdown.changed() => break,
                        buffer = self.buffer(header.length as usize, &session_connection.limits.share) => buffer,
                    };
                    let mut buffer = match buffer {
                        Ok(buffer) => buffer,
                        Err(error) => {
                            warn!("I/O connection from {peer}: {error}; closing");
                            break;
                        }
                    };
                    match tokio::time::timeout(frame_timeout, reader.read_exact(&mut buffer)).await
                    {
                        Ok(Ok(_)) => Some(buffer),
                        Ok(Err(error)) => {
                            warn!("I/O connection from {peer}: {error}; closing");
                            break;
                        }
                        Err(_) => {
                            warn!("I/O connection from {peer}: payload not completed within {frame_timeout:?}; closing");
                            break;
                        }
                    }
                }
                Op::Read | Op::Flush => None,
            };
            let current = self.state.session(&token);
            let ended = current.is_none();
            let task_replies = replies.clone();
            let service = self.clone();
            let limits = session_connection.limits.clone();
            tokio::spawn(async move {
                let reply = match check(current.as_ref(), &header) {
                    Err(status) => Reply::status(header.handle, status),
                    Ok(()) => service.execute(header, payload, limits).await,
                };
                let _ = task_replies.send(reply).await;
                drop(permit);
            });
            if ended {
                info!("I/O connection from {peer}: session ended; closing");
                break;
            }
        }
        drop(replies);
        let _ = writer_task.await;
        debug!("I/O connection from {peer} closed");
    }

    /// The volume record of `epoch`, or -ESTALE if the store holds another epoch (a change
    /// committed but not yet published: the client retries once it has the new map).
    async fn volume(&self, volume_id: u64, epoch: u64) -> Result<Arc<VolumeRecord>, i32> {
        let cached = self
            .volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&volume_id)
            .cloned();
        if let Some(record) = cached.filter(|r| r.epoch == epoch) {
            return Ok(record);
        }
        let state = self.state.clone();
        let record = tokio::task::spawn_blocking(move || state.store.volume_by_id(volume_id))
            .await
            .map_err(|_| errno(libc::EIO))?
            .map_err(|e| {
                warn!("volume {volume_id}: {e}");
                errno(libc::EIO)
            })?;
        let record = Arc::new(record);
        {
            let mut volumes = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
            let newer = volumes
                .get(&volume_id)
                .is_none_or(|old| old.epoch < record.epoch);
            if newer {
                volumes.insert(volume_id, record.clone());
            }
        }
        if record.epoch != epoch {
            return Err(errno(libc::ESTALE));
        }
        Ok(record)
    }

    async fn execute(
        self: Arc<Self>,
        header: RequestHeader,
        payload: Option<Buffer>,
        limits: SessionLimits,
    ) -> Reply {
        match self.clone().try_execute(&header, payload, &limits).await {
            Ok(data) => Reply {
                header: ReplyHeader {
                    handle: header.handle,
                    status: 0,
                    length: data.as_ref().map_or(0, |d| d.len() as u32),
                },
                data,
            },
            Err(status) => Reply::status(header.handle, status),
        }
    }

    async fn try_execute(
        self: Arc<Self>,
        header: &RequestHeader,
        payload: Option<Buffer>,
        limits: &SessionLimits,
    ) -> Result<Option<Buffer>, i32> {
        let record = self.volume(header.volume_id, header.epoch).await?;
        let io_error = |what: &str, error: io::Error| {
            warn!(
                "volume {} {what} at {} length {}: {error}",
                header.volume_id, header.offset, header.length
            );
            errno(libc::EIO)
        };
        let length = u64::from(header.length);
        if header.op == Op::Flush {
            let service = self.clone();
            // Writes also went to the targets of a running relocation: flush those too. A
            // reported-failed device is left out where a surviving mirror holds the data
            // (writes to it are best effort then), so its errors do not fail every flush
            // until recovered.
            let mut extents = record.extents.clone();
            if let Some(active) = self.state.recoveries.gate(header.volume_id).recovery() {
                let best_effort = |device: uuid::Uuid| {
                    active
                        .segments
                        .iter()
                        .any(|s| s.failed.device_uuid == device && s.moved_copy_is_best_effort())
                };
                for extent in &mut extents {
                    if extent.replicas.len() > 1 {
                        extent.replicas.retain(|r| !best_effort(r.device_uuid));
                    }
                }
                extents.extend(
                    active
                        .segments
                        .iter()
                        .map(|s| Extent::replicated(s.volume_offset, s.length, vec![s.target])),
                );
            }
            return self
                .device_op(limits, move || service.devices.flush(&extents))
                .await?
                .map(|()| None)
                .map_err(|e| io_error("flush", e));
        }
        let end = header.offset.checked_add(length);
        if end.is_none_or(|end| end > record.size_bytes) {
            return Err(errno(libc::EINVAL));
        }
        let pieces = plan(&record.extents, header.offset, length).ok_or_else(|| {
            warn!(
                "volume {} epoch {}: extents do not cover {}+{length}",
                record.id, record.epoch, header.offset
            );
            errno(libc::EIO)
        })?;
        let service = self.clone();
        match header.op {
            Op::Read => {
                // A reported-failed device is read only when no other replica can be; the
                // recovery target serves the part already copied if it cannot be either.
                let pieces = match self.state.recoveries.gate(header.volume_id).recovery() {
                    Some(active) => recovery_gate::read_plan(pieces, &active),
                    None => pieces,
                };
                let mut buf = self
                    .buffer(header.length as usize, &limits.share)
                    .await
                    .map_err(|e| io_error("read buffer", e))?;
                self.device_op(limits, move || {
                    service.devices.read(&pieces, &mut buf).map(|()| buf)
                })
                .await?
                .map(Some)
                .map_err(|e| io_error("read", e))
            }
            Op::Write => {
                let buf = payload.ok_or(errno(libc::EINVAL))?;
                let fua = header.flags & FLAG_FUA != 0;
                // Recovery consistency rule: see the `recovery` module doc.
                let gate = self.state.recoveries.gate(header.volume_id);
                let _shared = gate.lock.read().await;
                if header.epoch < gate.min_epoch() {
                    return Err(errno(libc::ESTALE));
                }
                let (required, best_effort) = match gate.recovery() {
                    Some(active) => recovery_gate::write_plan(pieces, &active),
                    None => (pieces, Vec::new()),
                };
                let volume_id = header.volume_id;
                let (epoch, offset, extents, active) = (
                    record.epoch,
                    header.offset,
                    record.extents.clone(),
                    gate.recovery(),
                );
                self.device_op(limits, move || {
                    // A chunk's point-in-time content is kept before its first write.
                    let read_origin = |at: u64, target: &mut [u8]| {
                        let active = active.as_deref();
                        recovery_gate::read_volume(&service.devices, &extents, active, at, target)
                    };
                    service.state.snapshots.before_write(
                        volume_id,
                        epoch,
                        offset,
                        length,
                        &read_origin,
                    )?;
                    service.devices.write(&required, &buf, fua)?;
                    if !best_effort.is_empty() {
                        if let Err(error) = service.devices.write(&best_effort, &buf, fua) {
                            debug!("volume {volume_id}: write to the failed device: {error}");
                        }
                    }
                    Ok(())
                })
                .await?
                .map(|()| None)
                .map_err(|e| io_error("write", e))
            }
            Op::Hello | Op::Flush => Err(errno(libc::EINVAL)),
        }
    }
}

impl IoService {
    /// Runs one blocking device operation once a device-operation slot of the session, then
    /// one of the service, is free (in that order: a session over its own limit waits without
    /// holding any of the service's). `Err(-EIO)` if the operation's thread died.
    async fn device_op<T: Send + 'static>(
        &self,
        limits: &SessionLimits,
        op: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<io::Result<T>, i32> {
        let _session = limits
            .device_ops
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| errno(libc::EIO))?;
        let _service = self
            .device_ops
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| errno(libc::EIO))?;
        tokio::task::spawn_blocking(move || {
            crate::failpoint::device_delay();
            op()
        })
        .await
        .map_err(|_| errno(libc::EIO))
    }
}

/// Checks a request against the session as it is now.
fn check(session: Option<&SessionInfo>, header: &RequestHeader) -> Result<(), i32> {
    let Some(session) = session else {
        return Err(errno(libc::EACCES));
    };
    if header.volume_id != session.volume_id {
        return Err(errno(libc::EACCES));
    }
    if header.op == Op::Write && session.mode != AccessMode::Rw {
        return Err(errno(libc::EROFS));
    }
    if header.epoch != session.epoch {
        return Err(errno(libc::ESTALE));
    }
    Ok(())
}

#[derive(Debug)]
enum ReadError {
    Io(io::Error),
    Frame(FrameError),
    NotHello,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(error) => write!(f, "{error}"),
            ReadError::Frame(error) => write!(f, "malformed frame: {}", error.message()),
            ReadError::NotHello => f.write_str("first frame is not HELLO"),
        }
    }
}

impl From<io::Error> for ReadError {
    fn from(error: io::Error) -> Self {
        ReadError::Io(error)
    }
}

/// Reads the HELLO frame: its handle and the hex-encoded token (at most 64 bytes, checked by
/// the header decoder).
async fn read_hello(reader: &mut OwnedReadHalf) -> Result<(u64, String), ReadError> {
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    let header = read_header(reader, &mut raw, 0).await?;
    if header.op != Op::Hello {
        return Err(ReadError::NotHello);
    }
    let mut token = vec![0u8; header.length as usize];
    reader.read_exact(&mut token).await?;
    Ok((header.handle, hex::encode(token)))
}

/// Completes a header whose first `started` bytes are already in `raw` and decodes it.
async fn read_header(
    reader: &mut OwnedReadHalf,
    raw: &mut [u8; REQUEST_HEADER_LEN],
    started: usize,
) -> Result<RequestHeader, ReadError> {
    reader.read_exact(&mut raw[started..]).await?;
    RequestHeader::decode(raw).map_err(ReadError::Frame)
}

async fn send_reply(writer: &mut (impl AsyncWriteExt + Unpin), reply: &Reply) -> io::Result<()> {
    let mut raw = [0u8; REPLY_HEADER_LEN];
    reply.header.encode(&mut raw);
    writer.write_all(&raw).await?;
    if let Some(data) = &reply.data {
        writer.write_all(data).await?;
    }
    writer.flush().await
}

/// Sends replies in the order they complete; flushes when no other reply is waiting.
async fn write_replies(
    writer: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Reply>,
    frame_timeout: Duration,
) {
    let mut writer = BufWriter::with_capacity(256 * 1024, writer);
    while let Some(reply) = queue.recv().await {
        let sent = tokio::time::timeout(frame_timeout, async {
            let mut raw = [0u8; REPLY_HEADER_LEN];
            reply.header.encode(&mut raw);
            writer.write_all(&raw).await?;
            if let Some(data) = &reply.data {
                writer.write_all(data).await?;
            }
            if queue.is_empty() {
                writer.flush().await?;
            }
            Ok::<(), io::Error>(())
        })
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                debug!("sending I/O reply: {error}");
                return;
            }
            Err(_) => {
                warn!("I/O peer did not take a reply within {frame_timeout:?}; closing");
                return;
            }
        }
    }
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(mode: AccessMode) -> SessionInfo {
        SessionInfo {
            client: "host1".into(),
            volume_id: 7,
            mode,
            epoch: 3,
        }
    }

    fn header(op: Op, volume_id: u64, epoch: u64) -> RequestHeader {
        RequestHeader {
            op,
            flags: 0,
            handle: 1,
            volume_id,
            epoch,
            offset: 0,
            length: 4096,
        }
    }

    #[test]
    fn requests_are_checked_against_the_session() {
        let rw = session(AccessMode::Rw);
        let ro = session(AccessMode::Ro);
        assert_eq!(check(Some(&rw), &header(Op::Write, 7, 3)), Ok(()));
        assert_eq!(check(Some(&ro), &header(Op::Read, 7, 3)), Ok(()));
        assert_eq!(check(Some(&ro), &header(Op::Flush, 7, 3)), Ok(()));
        assert_eq!(check(None, &header(Op::Read, 7, 3)), Err(-libc::EACCES));
        assert_eq!(
            check(Some(&rw), &header(Op::Read, 8, 3)),
            Err(-libc::EACCES)
        );
        assert_eq!(
            check(Some(&ro), &header(Op::Write, 7, 3)),
            Err(-libc::EROFS)
        );
        assert_eq!(
            check(Some(&rw), &header(Op::Write, 7, 2)),
            Err(-libc::ESTALE)
        );
        assert_eq!(
            check(Some(&rw), &header(Op::Read, 7, 4)),
            Err(-libc::ESTALE)
        );
    }
}
