//! Control protocol framing and messages (agent/sanctl <-> sand).
//!
//! A frame is a 4-byte big-endian payload length followed by that many bytes of JSON. Every JSON
//! object carries `"v": PROTOCOL_VERSION` and a `"type"` tag. The reader is cancellation safe (it
//! buffers partial frames), so it can sit in a `tokio::select!` next to map pushes.

use bytes::{Buf, BytesMut};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::map::{AccessMode, Extent, Layout, VolumeMap};

/// Version carried in every frame; a frame with another version is rejected. 2: maps carry
/// striped extents (an agent of version 1 would take their members for mirror copies). 3:
/// each COW store in a map has its own chunk size (an agent of version 2 would describe a
/// store of larger chunks with the map's and the module would write it in the wrong place).
pub const PROTOCOL_VERSION: u32 = 3;
/// Largest accepted frame payload. A length prefix above this closes the connection.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Largest frame a server accepts from a peer that has not authenticated yet: the handshake
/// frames are a few hundred bytes, so a connection that has proved nothing cannot make the
/// server hold more than this (a reader reserves a frame's length as soon as its prefix is in).
pub const MAX_PRE_AUTH_FRAME_BYTES: usize = 4096;
/// Bytes of the length prefix.
const LENGTH_PREFIX_BYTES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("frame of {0} bytes exceeds the maximum of {MAX_FRAME_BYTES}")]
    Oversized(usize),
    #[error("frame of {length} bytes exceeds the limit of {limit} bytes before authentication")]
    OversizedBeforeAuth { length: usize, limit: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unsupported protocol version {0} (expected {PROTOCOL_VERSION})")]
    BadVersion(u64),
    #[error("timed out")]
    Timeout,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Cancellation-safe frame reader over any byte stream.
pub struct FrameReader<R> {
    stream: R,
    buffer: BytesMut,
    /// When the oldest incomplete frame started arriving (kept across cancellations, so a
    /// `select!` that restarts the read does not restart the clock).
    partial_since: Option<tokio::time::Instant>,
    /// A lower cap than `MAX_FRAME_BYTES` while the peer is not authenticated.
    pre_auth_limit: Option<usize>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(stream: R) -> Self {
        FrameReader {
            stream,
            buffer: BytesMut::with_capacity(4096),
            partial_since: None,
            pre_auth_limit: None,
        }
    }

    /// A reader for a peer that has not authenticated: frames above `limit` bytes are refused
    /// from their length prefix, before any of them is buffered, until [`Self::authenticated`].
    pub fn before_authentication(stream: R, limit: usize) -> Self {
        let mut reader = FrameReader::new(stream);
        reader.pre_auth_limit = Some(limit.min(MAX_FRAME_BYTES));
        reader
    }

    /// The peer has authenticated: frames up to `MAX_FRAME_BYTES` are accepted from now on.
    pub fn authenticated(&mut self) {
        self.pre_auth_limit = None;
    }

    /// Reads the next frame and decodes it as `T`. Safe to cancel: partial data stays buffered.
    pub async fn read<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        self.read_within(None).await
    }

    /// Like `read`, but once a frame has started arriving it must be complete within
    /// `frame_timeout` (idle time between frames is not limited).
    pub async fn read_within<T: DeserializeOwned>(
        &mut self,
        frame_timeout: Option<std::time::Duration>,
    ) -> Result<T, FrameError> {
        loop {
            if let Some(payload) = self.take_buffered_frame()? {
                self.partial_since = if self.buffer.is_empty() {
                    None
                } else {
                    Some(tokio::time::Instant::now())
                };
                return decode_payload(&payload);
            }
            let reading = self.stream.read_buf(&mut self.buffer);
            let read = match (frame_timeout, self.partial_since) {
                (Some(limit), Some(since)) => tokio::time::timeout_at(since + limit, reading)
                    .await
                    .map_err(|_| FrameError::Timeout)??,
                _ => reading.await?,
            };
            if self.partial_since.is_none() && !self.buffer.is_empty() {
                self.partial_since = Some(tokio::time::Instant::now());
            }
            if read == 0 {
                return Err(if self.buffer.is_empty() {
                    FrameError::Closed
                } else {
                    FrameError::Truncated
                });
            }
        }
    }

    fn take_buffered_frame(&mut self) -> Result<Option<BytesMut>, FrameError> {
        if self.buffer.len() < LENGTH_PREFIX_BYTES {
            return Ok(None);
        }
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
        prefix.copy_from_slice(&self.buffer[..LENGTH_PREFIX_BYTES]);
        let length = u32::from_be_bytes(prefix) as usize;
        // Checked before buffering anything more, so an attacker cannot make us hold a huge frame.
        if length > MAX_FRAME_BYTES {
            return Err(FrameError::Oversized(length));
        }
        if let Some(limit) = self.pre_auth_limit.filter(|limit| length > *limit) {
            return Err(FrameError::OversizedBeforeAuth { length, limit });
        }
        if self.buffer.len() < LENGTH_PREFIX_BYTES + length {
            self.buffer
                .reserve(LENGTH_PREFIX_BYTES + length - self.buffer.len());
            return Ok(None);
        }
        self.buffer.advance(LENGTH_PREFIX_BYTES);
        Ok(Some(self.buffer.split_to(length)))
    }
}

/// Decodes one payload: must be a JSON object with the right `v`, then a valid `T`.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let version = value
        .get("v")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| FrameError::Malformed("missing version field \"v\"".into()))?;
    if version != u64::from(PROTOCOL_VERSION) {
        return Err(FrameError::BadVersion(version));
    }
    serde_json::from_value(value).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Encodes a message as a complete frame (length prefix + JSON with `v`).
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut value =
        serde_json::to_value(message).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| FrameError::Malformed("message is not a JSON object".into()))?;
    object.insert("v".into(), PROTOCOL_VERSION.into());
    let payload = serde_json::to_vec(&value).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if payload.len() > MAX_FRAME_BYTES {
        return Err(FrameError::Oversized(payload.len()));
    }
    let length = u32::try_from(payload.len()).map_err(|_| FrameError::Oversized(payload.len()))?;
    let mut frame = Vec::with_capacity(LENGTH_PREFIX_BYTES + payload.len());
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Writes one message as a frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    message: &T,
) -> Result<(), FrameError> {
    let frame = encode_frame(message)?;
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}

/// Machine-readable error classes, so scripts and agents need not parse messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    BadFrame,
    AuthenticationFailed,
    NotFound,
    AlreadyExists,
    NotGranted,
    Busy,
    NoSpace,
    ForeignSignature,
    Io,
    Internal,
    /// The attachment was fenced (its lease expired during a change, or it was revoked): the
    /// client must stop using the volume and attach again.
    Fenced,
}

/// Everything an error frame carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Agent protocol (TCP, authenticated)
// ---------------------------------------------------------------------------------------------

/// An agent request paired with its reply: the server must answer an `R` with an `R::Reply`
/// (or an error), and the client accepts exactly that (`AgentClient::call`); any other reply
/// is a protocol error.
pub trait AgentCall: Into<AgentRequest> {
    type Reply: Into<AgentReply> + TryFrom<AgentReply, Error = AgentReply>;
    /// The request's name, for error messages.
    const NAME: &'static str;
}

/// Every frame an agent sends, as it travels: `{"type": "attach", ...the request's fields}`.
/// Requests without fields are empty structs (see [`AdminRequest`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentRequest {
    Hello(Hello),
    AuthResponse(AuthResponse),
    ListVolumes(ListVolumes),
    Attach(Attach),
    Detach(Detach),
    /// Not a call: the server does not answer it.
    Ack(Ack),
    /// Not a call: the answer to a [`Quiesce`] push, once the client's in-flight I/O of the
    /// volume has drained and new I/O is held.
    QuiesceAck(QuiesceAck),
    Renew(Renew),
    Grow(Grow),
    ReportFailure(ReportFailure),
    ReportPathHealed(ReportPathHealed),
    ReportPreserved(ReportPreserved),
}

/// Step 1 of the handshake: who I am and my fresh nonce (hex, 32 bytes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub client: String,
    pub client_nonce: String,
}

/// Step 3: HMAC(secret, "client" | server_nonce | client_nonce), hex.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthResponse {
    pub mac: String,
}

/// Volumes this client is granted (names and modes only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListVolumes {}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attach {
    pub volume: String,
    pub mode: AccessMode,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Detach {
    pub volume_id: u64,
}

/// The agent now holds `epoch` of `volume_id` (answer to a [`MapUpdate`]); no reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ack {
    pub volume_id: u64,
    pub epoch: u64,
}

impl From<Ack> for AgentRequest {
    fn from(ack: Ack) -> AgentRequest {
        AgentRequest::Ack(ack)
    }
}

/// The client's I/O of `volume_id` at `epoch` is drained and new I/O is held (answer to a
/// [`Quiesce`]); no reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuiesceAck {
    pub volume_id: u64,
    pub epoch: u64,
}

impl From<QuiesceAck> for AgentRequest {
    fn from(ack: QuiesceAck) -> AgentRequest {
        AgentRequest::QuiesceAck(ack)
    }
}

/// Renews the lease of the attachment to `volume_id`; `epoch` is the map epoch the client
/// holds. A fenced attachment's renewal is refused with `ErrorCode::Fenced`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Renew {
    pub volume_id: u64,
    #[serde(default)]
    pub epoch: u64,
}

/// Client-requested allocation: grow an rw-attached volume to `new_size_bytes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grow {
    pub volume_id: u64,
    pub new_size_bytes: u64,
}

/// The client's direct path to `device_uuid` failed for an attached volume: the server
/// moves that volume's data off the device (progress then arrives as `recovery_status`
/// pushes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportFailure {
    pub volume_id: u64,
    pub device_uuid: uuid::Uuid,
    pub reason: String,
}

/// The client's direct path to `device_uuid`, reported failed before, answers again: may
/// the client fail back to it?
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportPathHealed {
    pub volume_id: u64,
    pub device_uuid: uuid::Uuid,
}

/// Most chunks one [`ReportPreserved`] may name.
pub const MAX_REPORTED_CHUNKS: usize = 4096;

/// The client's kernel preserved `chunks` of volume `volume_id` in the COW store of its
/// active snapshot `snapshot_id` (one of the map's COW stores) before their first writes
/// (relayed from the module's CHUNKS_PRESERVED events, one report per snapshot). The server checks each against the store's durable records,
/// which stay the changed-chunk list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportPreserved {
    pub volume_id: u64,
    pub snapshot_id: u64,
    pub chunks: Vec<u64>,
}

/// Answer to [`ReportPreserved`]: how many of the chunks the store's records hold, and the
/// ones they do not (each also logged by the server).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreservedNoted {
    pub recorded: u64,
    pub unrecorded: Vec<u64>,
}

/// A volume the authenticated client may attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantedVolume {
    pub name: String,
    pub mode: AccessMode,
}

/// Every frame the server sends to an agent: the reply to a request (tagged with the reply's
/// own name, e.g. `{"type": "attached", ...}`), an error, or an unsolicited push
/// (`map_update`, `recovery_status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentReply {
    Challenge(Challenge),
    AuthOk(AuthOk),
    Volumes(Volumes),
    Attached(Attachment),
    Detached(Detached),
    Renewed(Renewed),
    Grown(Grown),
    FailureReported(FailureReported),
    PathHealedReported(PathHealedReported),
    PreservedNoted(PreservedNoted),
    /// Push: the volume changed; the agent must [`Ack`] the epoch.
    MapUpdate(MapUpdate),
    /// Push: progress of a recovery of an attached volume (no ack).
    RecoveryStatus(RecoveryStatus),
    /// Push: a change of the volume begins; drain I/O of `epoch`, hold new I/O, then send a
    /// [`QuiesceAck`].
    Quiesce(Quiesce),
    /// Push: the change ended (committed at `epoch`, or rolled back to it); release held I/O.
    Resume(Resume),
    Error(ErrorBody),
}

/// Step 2 of the handshake: my nonce and HMAC(secret, "server" | client_nonce |
/// server_nonce), hex.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Challenge {
    pub server_nonce: String,
    pub mac: String,
}

/// The client's proof was right: the connection is authenticated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthOk {}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Volumes {
    pub volumes: Vec<GrantedVolume>,
}

/// Answer to `attach`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub map: VolumeMap,
    /// Token for the server I/O path (hex of 32 random bytes).
    pub session_token: String,
    /// Address of the server's I/O service (the kernel's server path), as bound (may be a
    /// wildcard address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_address: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Detached {
    pub volume_id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Renewed {
    pub volume_id: u64,
    pub lease_ms: u64,
}

/// Answer to a client `grow`: the new map.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grown {
    pub map: VolumeMap,
}

/// Answer to `report_failure`. `status`: the recovery it started or found running; `None`
/// when the server still reads the device itself, so only this host's path failed: its I/O to
/// the device goes through the server and nothing is moved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailureReported {
    pub status: Option<RecoveryStatus>,
    /// What the server decided, for the agent's log.
    pub message: String,
}

/// Answer to `report_path_healed`. `accepted`: the client may send I/O direct to the device
/// again. Refused while a recovery moves the volume off that device (direct writes would
/// bypass the recovery's copy and be missing on the replacement); the recovery publishes a
/// map without the device instead.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathHealedReported {
    pub accepted: bool,
    pub message: String,
}

/// Push: stop issuing I/O to `volume_id` (held, not failed) and drain what is in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quiesce {
    pub volume_id: u64,
    pub epoch: u64,
}

/// Push: the change of `volume_id` is over; the current epoch is `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub volume_id: u64,
    pub epoch: u64,
}

/// Push: a new map of an attached volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapUpdate {
    pub map: VolumeMap,
}

/// Encodes the `map_update` push for `map` without copying the map (the server encodes it
/// once per change, for every attached client).
pub fn encode_map_update(map: &VolumeMap) -> Result<Vec<u8>, FrameError> {
    #[derive(Serialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Push<'a> {
        MapUpdate { map: &'a VolumeMap },
    }
    encode_frame(&Push::MapUpdate { map })
}

/// Pairs each request with its `AgentRequest` variant (same name) and its reply type with
/// that type's `AgentReply` variant.
macro_rules! agent_calls {
    ($($request:ident => $variant:ident($reply:ident),)*) => {$(
        impl From<$request> for AgentRequest {
            fn from(request: $request) -> AgentRequest {
                AgentRequest::$request(request)
            }
        }

        impl From<$reply> for AgentReply {
            fn from(reply: $reply) -> AgentReply {
                AgentReply::$variant(reply)
            }
        }

        impl TryFrom<AgentReply> for $reply {
            type Error = AgentReply;

            fn try_from(reply: AgentReply) -> Result<$reply, AgentReply> {
                match reply {
                    AgentReply::$variant(reply) => Ok(reply),
                    other => Err(other),
                }
            }
        }

        impl AgentCall for $request {
            type Reply = $reply;
            const NAME: &'static str = stringify!($request);
        }
    )*};
}

agent_calls! {
    Hello => Challenge(Challenge),
    AuthResponse => AuthOk(AuthOk),
    ListVolumes => Volumes(Volumes),
    Attach => Attached(Attachment),
    Detach => Detached(Detached),
    Renew => Renewed(Renewed),
    Grow => Grown(Grown),
    ReportFailure => FailureReported(FailureReported),
    ReportPathHealed => PathHealedReported(PathHealedReported),
    ReportPreserved => PreservedNoted(PreservedNoted),
}

// ---------------------------------------------------------------------------------------------
// Admin protocol (Unix socket, protected by file permissions)
// ---------------------------------------------------------------------------------------------

/// An admin request paired with its reply: the server must answer a `R` with an `R::Reply`,
/// and the client decodes exactly that (`AdminClient::call`).
pub trait AdminCall: Into<AdminRequest> {
    type Reply: Serialize + DeserializeOwned;
}

/// Every admin request as it travels: `{"type": "pool_add", ...the request's fields}`.
/// Requests without fields are empty structs, not unit structs: those would not decode from
/// a frame, which also carries the version field.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AdminRequest {
    PoolAdd(PoolAdd),
    PoolList(PoolList),
    VolumeCreate(VolumeCreate),
    VolumeGrow(VolumeGrow),
    VolumeDelete(VolumeDelete),
    VolumeList(VolumeList),
    VolumeShow(VolumeShow),
    ClientAdd(ClientAdd),
    ClientGrant(ClientGrant),
    ClientRevoke(ClientRevoke),
    ClientRemove(ClientRemove),
    ClientList(ClientList),
    RecoveryList(RecoveryList),
    VolumeMove(VolumeMove),
    PoolEvacuate(PoolEvacuate),
    MirrorAdd(MirrorAdd),
    MirrorRemove(MirrorRemove),
    RecoveryStart(RecoveryStart),
    SnapshotCreate(SnapshotCreate),
    SnapshotList(SnapshotList),
    SnapshotDelete(SnapshotDelete),
    SnapshotDiff(SnapshotDiff),
}

/// Label a device and add it to the pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolAdd {
    pub path: String,
    /// Overwrite a foreign signature or another pool's label.
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolList {}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeCreate {
    pub name: String,
    pub size_bytes: u64,
    pub layout: Layout,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeGrow {
    pub name: String,
    pub new_size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeDelete {
    pub name: String,
    /// Delete even while clients are attached (live, or by a persisted session token after a
    /// restart): their attachments and tokens are ended first, in the server's commit; and
    /// even with snapshots, which are deleted with it. Without it either is refused (`Busy`).
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeList {}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeShow {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientAdd {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientGrant {
    pub name: String,
    pub volume: String,
    pub mode: AccessMode,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientRevoke {
    pub name: String,
    pub volume: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientRemove {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientList {}

/// Every known recovery (running, failed, or finished since the server started).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoveryList {}

/// Move a volume's data off a device while clients use it (`--cancel`: roll back the move
/// in progress). Devices are named by path or UUID.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeMove {
    pub name: String,
    /// Required unless `cancel`.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub cancel: bool,
}

/// Move every volume's data off a device (before removing it from the SAN). Starts one move
/// per volume on the device; the reply lists their first status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolEvacuate {
    pub device: String,
}

/// Turn a linear volume into a two-way mirror while clients use it (`--cancel`: roll back).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MirrorAdd {
    pub name: String,
    #[serde(default)]
    pub cancel: bool,
}

/// Declare a device failed: recover every volume's data off it (from a mirror copy where
/// there is one, else from the device itself through the server's path).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoveryStart {
    pub device: String,
}

/// Drop a mirrored volume's replicas on a device (through the change protocol).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MirrorRemove {
    pub name: String,
    pub device: String,
}

/// Take a snapshot of a volume (through the change protocol, so every host starts copying at
/// the same point).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotCreate {
    pub volume: String,
    pub name: String,
    /// Chunk size in bytes (a power of two, 4 KiB to 1 MiB); default 64 KiB.
    #[serde(default)]
    pub chunk_bytes: Option<u32>,
    /// Size of the COW store in bytes; default a quarter of the volume.
    #[serde(default)]
    pub cow_bytes: Option<u64>,
}

/// The snapshots of a volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotList {
    pub volume: String,
}

/// Drop a snapshot and free its COW store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotDelete {
    pub volume: String,
    pub name: String,
}

/// The chunks changed between snapshot `from` and snapshot `to` (taken later) of a volume,
/// from chunk `start_chunk` on (the reply says where the next page starts).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotDiff {
    pub volume: String,
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub start_chunk: u64,
}

/// A snapshot as `snapshot list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The server's id of the snapshot (the copy-on-write generation of the maps it
    /// published, when it is the newest).
    #[serde(default)]
    pub id: u64,
    pub name: String,
    pub volume: String,
    /// `active` or `invalid` (`pending` while it is being taken); `deleted` in the reply to a
    /// `SnapshotDelete`.
    pub state: String,
    /// Why it is invalid.
    #[serde(default)]
    pub reason: Option<String>,
    pub created_unix: u64,
    /// The volume epoch that published it.
    pub epoch: u64,
    /// The volume's size when it was taken (the snapshot's size).
    pub size_bytes: u64,
    pub chunk_bytes: u32,
    pub cow_bytes: u64,
    /// Bytes of the COW store holding copied chunks.
    pub cow_used_bytes: u64,
    /// Chunks written since the snapshot was taken.
    pub changed_chunks: u64,
    /// Of those, the chunks client kernels preserved themselves and reported (netlink
    /// events relayed by their agents) since the server started; each is also in the
    /// store's records, which are the list `changed_chunks` counts.
    #[serde(default)]
    pub reported_chunks: u64,
    /// The NBD export name of the snapshot (`VOLUME@SNAPSHOT`).
    pub export: String,
    /// The server's NBD socket that exports it.
    pub nbd_socket: String,
    /// Where the COW store lies on the pool's devices (its extents' `volume_offset` is the
    /// offset in the store).
    #[serde(default)]
    pub cow_store: Vec<Extent>,
}

/// One page of changed chunks (ascending chunk numbers of `chunk_bytes` each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChanges {
    pub chunk_bytes: u32,
    pub chunks: Vec<u64>,
    /// Where the next page starts; `None` on the last page.
    pub next_chunk: Option<u64>,
}

/// Pairs each request with its `AdminRequest` variant (same name) and its reply type.
macro_rules! admin_calls {
    ($($request:ident => $reply:ty,)*) => {$(
        impl From<$request> for AdminRequest {
            fn from(request: $request) -> AdminRequest {
                AdminRequest::$request(request)
            }
        }

        impl AdminCall for $request {
            type Reply = $reply;
        }
    )*};
}

admin_calls! {
    // The device as `pool list` shows it (`None` only if it vanished right after the add).
    PoolAdd => Option<DeviceInfo>,
    PoolList => Vec<DeviceInfo>,
    VolumeCreate => VolumeMap,
    VolumeGrow => VolumeMap,
    VolumeDelete => VolumeDeleted,
    VolumeList => Vec<VolumeSummary>,
    VolumeShow => VolumeDetail,
    ClientAdd => ClientCreated,
    // The client's grants after the change (`None` only if it was removed meanwhile).
    ClientGrant => Option<ClientInfo>,
    ClientRevoke => Option<ClientInfo>,
    ClientRemove => ClientRemoved,
    ClientList => Vec<ClientInfo>,
    RecoveryList => Vec<RecoveryStatus>,
    VolumeMove => RecoveryStatus,
    PoolEvacuate => Vec<RecoveryStatus>,
    MirrorAdd => RecoveryStatus,
    MirrorRemove => VolumeMap,
    RecoveryStart => Vec<RecoveryStatus>,
    SnapshotCreate => SnapshotInfo,
    SnapshotList => Vec<SnapshotInfo>,
    SnapshotDelete => SnapshotInfo,
    SnapshotDiff => SnapshotChanges,
}

/// The answer to an admin request whose reply is a `T`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AdminReply<T> {
    Ok { result: T },
    Error(ErrorBody),
}

/// Answer to `volume delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDeleted {
    /// Name of the deleted volume.
    pub deleted: String,
    /// Its snapshots, deleted with it (only with `force`).
    #[serde(default)]
    pub snapshots_deleted: Vec<String>,
}

/// Answer to `client remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRemoved {
    /// Name of the removed client.
    pub removed: String,
}

/// A device of the pool as `pool list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub uuid: uuid::Uuid,
    pub path: String,
    pub size_bytes: u64,
    /// Bytes usable for volumes (size minus label area, rounded to the block size).
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub state: String,
    /// Clients whose direct path to the device failed while the server still reads it (their
    /// I/O to it goes through the server); since the server started.
    #[serde(default)]
    pub path_failed_on: Vec<String>,
}

/// A volume as `volume list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSummary {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub layout: Layout,
    pub epoch: u64,
    pub extent_count: usize,
}

/// At most this many attachments are listed in `volume show` (the counts cover all of them),
/// so the reply stays far below the frame limit with many thousands of clients.
pub const MAX_LISTED_ATTACHMENTS: usize = 1000;

/// `volume show`: the map plus who is attached.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeDetail {
    pub map: VolumeMap,
    /// Number of attached clients.
    pub attachment_count: usize,
    /// How many of them acknowledged the map's current epoch.
    pub acked_current_epoch: usize,
    /// The first `MAX_LISTED_ATTACHMENTS` attachments by client name.
    pub attachments: Vec<AttachmentInfo>,
    /// Recovery of this volume, if one is running or happened since the server started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoveryStatus>,
    /// The server's NBD socket: the volume's snapshots are exported there as
    /// `VOLUME@SNAPSHOT`, and the volume itself, for a restore, as `VOLUME`.
    #[serde(default)]
    pub nbd_socket: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentInfo {
    pub client: String,
    pub mode: AccessMode,
    /// Latest epoch the client acknowledged.
    pub acked_epoch: u64,
    /// Milliseconds until the server counts the attachment's lease (plus the in-flight
    /// bound) as expired; 0 once expired.
    #[serde(default)]
    pub lease_left_ms: u64,
    /// The agent's connection closed without a detach: the attachment (and its read-write
    /// slot) is kept until the lease expires.
    #[serde(default)]
    pub disconnected: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub name: String,
    pub grants: Vec<GrantedVolume>,
    /// The client's attachments the server holds now, with their leases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<ClientAttachment>,
}

/// One attachment of a client, as `client list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientAttachment {
    pub volume: String,
    pub mode: AccessMode,
    /// Milliseconds until the lease (plus the in-flight bound) expires.
    pub lease_left_ms: u64,
    /// The agent's connection closed; the attachment is held until the lease expires.
    pub disconnected: bool,
}

/// Answer to `client add`: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientCreated {
    pub name: String,
    pub secret: String,
}

/// Phase of a recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryState {
    /// Space allocated and recorded; copying has not started.
    Queued,
    Copying,
    /// The new map without the failed device is published.
    Done,
    /// Copying stopped on an error; the record is kept and resumed at the next server start
    /// or failure report.
    Failed,
    /// Rolled back by `--cancel`: the targets are freed, the data stays where it was.
    Cancelled,
}

impl std::fmt::Display for RecoveryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecoveryState::Queued => "queued",
            RecoveryState::Copying => "copying",
            RecoveryState::Done => "done",
            RecoveryState::Failed => "failed",
            RecoveryState::Cancelled => "cancelled",
        })
    }
}

/// Why a volume's extents are being copied to a new place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelocationKind {
    /// Off a device a client reported failed.
    #[default]
    Recovery,
    /// Off a healthy device, at an admin's request (`volume move`, `pool evacuate`).
    Move,
    /// Onto a second replica of every single-copy extent (`volume mirror add`).
    MirrorAdd,
}

impl std::fmt::Display for RelocationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RelocationKind::Recovery => "recovery",
            RelocationKind::Move => "move",
            RelocationKind::MirrorAdd => "mirror add",
        })
    }
}

/// Progress of copying one volume's data to a new place: a recovery off a failed device, a
/// move or a mirror add (pushed to agents as `recovery_status`, listed by `recovery_list`
/// and `volume show`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoveryStatus {
    pub volume_id: u64,
    pub volume_name: String,
    pub device_uuid: uuid::Uuid,
    pub state: RecoveryState,
    /// 0.0 to 100.0.
    pub percent: f64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Estimated seconds left at the rate seen since the copy (re)started; `None` until known.
    pub eta_seconds: Option<u64>,
    pub message: String,
    #[serde(default)]
    pub kind: RelocationKind,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Request structs travel as the flat tagged objects the admin protocol always had.
    #[test]
    fn admin_requests_keep_their_wire_form() {
        let add = serde_json::to_value(AdminRequest::from(PoolAdd {
            path: "/dev/sdb".into(),
            force: true,
        }));
        assert_eq!(
            add.ok(),
            Some(serde_json::json!({ "type": "pool_add", "path": "/dev/sdb", "force": true }))
        );
        let list = serde_json::to_value(AdminRequest::from(PoolList {}));
        assert_eq!(list.ok(), Some(serde_json::json!({ "type": "pool_list" })));
        // A real frame also carries the version field, which a request without fields skips.
        let frame = encode_frame(&AdminRequest::from(RecoveryList {}));
        let decoded = frame.and_then(|f| decode_payload::<AdminRequest>(&f[LENGTH_PREFIX_BYTES..]));
        assert!(
            matches!(decoded, Ok(AdminRequest::RecoveryList(RecoveryList {}))),
            "{decoded:?}"
        );
    }

    /// Decodes `json` (plus the version field) as a frame payload, re-encodes the result and
    /// checks that the same JSON comes back: the typed messages keep the agent protocol's wire
    /// form, so agents and servers of either side of the change interoperate.
    fn same_on_the_wire<T: Serialize + DeserializeOwned>(json: serde_json::Value) {
        let mut payload = json.clone();
        if let Some(object) = payload.as_object_mut() {
            object.insert("v".into(), PROTOCOL_VERSION.into());
        }
        let bytes = serde_json::to_vec(&payload).unwrap_or_default();
        let decoded = decode_payload::<T>(&bytes).unwrap_or_else(|e| panic!("{json}: {e}"));
        assert_eq!(serde_json::to_value(&decoded).ok(), Some(json));
    }

    #[test]
    fn agent_requests_keep_their_wire_form() {
        let device = "6f1c2e0a-5b7d-4c1e-9a3f-2d4b6c8e0f12";
        for request in [
            serde_json::json!({ "type": "hello", "client": "host1", "client_nonce": "00ff" }),
            serde_json::json!({ "type": "auth_response", "mac": "abcd" }),
            serde_json::json!({ "type": "list_volumes" }),
            serde_json::json!({ "type": "attach", "volume": "db1", "mode": "rw" }),
            serde_json::json!({ "type": "detach", "volume_id": 3 }),
            serde_json::json!({ "type": "ack", "volume_id": 3, "epoch": 7 }),
            serde_json::json!({ "type": "quiesce_ack", "volume_id": 3, "epoch": 7 }),
            serde_json::json!({ "type": "renew", "volume_id": 3, "epoch": 0 }),
            serde_json::json!({ "type": "grow", "volume_id": 3, "new_size_bytes": 8192 }),
            serde_json::json!({
                "type": "report_failure", "volume_id": 3, "device_uuid": device, "reason": "EIO"
            }),
            serde_json::json!({ "type": "report_path_healed", "volume_id": 3, "device_uuid": device }),
        ] {
            same_on_the_wire::<AgentRequest>(request);
        }
    }

    #[test]
    fn agent_replies_keep_their_wire_form() {
        let status = serde_json::json!({
            "volume_id": 3, "volume_name": "db1",
            "device_uuid": "6f1c2e0a-5b7d-4c1e-9a3f-2d4b6c8e0f12", "state": "copying",
            "percent": 50.0, "bytes_done": 1024, "bytes_total": 2048, "eta_seconds": null,
            "message": "copying", "kind": "recovery"
        });
        let mut pushed = status.clone();
        if let Some(object) = pushed.as_object_mut() {
            object.insert("type".into(), "recovery_status".into());
        }
        for reply in [
            serde_json::json!({ "type": "challenge", "server_nonce": "00ff", "mac": "abcd" }),
            serde_json::json!({ "type": "auth_ok" }),
            serde_json::json!({ "type": "volumes", "volumes": [{ "name": "db1", "mode": "ro" }] }),
            serde_json::json!({ "type": "detached", "volume_id": 3 }),
            serde_json::json!({ "type": "renewed", "volume_id": 3, "lease_ms": 30000 }),
            serde_json::json!({ "type": "failure_reported", "status": status, "message": "recovery queued" }),
            serde_json::json!({ "type": "failure_reported", "status": null, "message": "the server reads the device" }),
            serde_json::json!({ "type": "path_healed_reported", "accepted": false, "message": "no" }),
            serde_json::json!({ "type": "error", "code": "not_found", "message": "no such volume" }),
            pushed,
        ] {
            same_on_the_wire::<AgentReply>(reply);
        }
    }

    #[test]
    fn an_agent_reply_of_another_kind_is_not_taken_for_the_one_asked_for() {
        let renewed = AgentReply::from(Renewed {
            volume_id: 3,
            lease_ms: 30_000,
        });
        assert!(matches!(
            <Detach as AgentCall>::Reply::try_from(renewed.clone()),
            Err(AgentReply::Renewed(_))
        ));
        assert!(matches!(
            <Renew as AgentCall>::Reply::try_from(renewed),
            Ok(Renewed {
                lease_ms: 30_000,
                ..
            })
        ));
    }

    #[test]
    fn admin_replies_decode_as_the_request_s_reply_type() {
        let frame = serde_json::json!({ "type": "ok", "result": { "deleted": "db1" } });
        let reply: Result<AdminReply<<VolumeDelete as AdminCall>::Reply>, _> =
            serde_json::from_value(frame);
        assert!(matches!(reply, Ok(AdminReply::Ok { result }) if result.deleted == "db1"));
    }
}
