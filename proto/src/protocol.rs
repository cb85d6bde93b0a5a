//! Control protocol framing and messages (agent/sanctl <-> sand).
//!
//! A frame is a 4-byte big-endian payload length followed by that many bytes of JSON. Every JSON
//! object carries `"v": PROTOCOL_VERSION` and a `"type"` tag. The reader is cancellation safe (it
//! buffers partial frames), so it can sit in a `tokio::select!` next to map pushes.

use bytes::{Buf, BytesMut};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::map::{AccessMode, Layout, VolumeMap};

/// Version carried in every frame; a frame with another version is rejected. 2: maps carry
/// striped extents (an agent of version 1 would take their members for mirror copies).
pub const PROTOCOL_VERSION: u32 = 2;
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

/// Frames an agent sends to the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentRequest {
    /// Step 1 of the handshake: who I am and my fresh nonce (hex, 32 bytes).
    Hello {
        client: String,
        client_nonce: String,
    },
    /// Step 3: HMAC(secret, "client" | server_nonce | client_nonce), hex.
    AuthResponse {
        mac: String,
    },
    /// Volumes this client is granted (names and modes only).
    ListVolumes,
    Attach {
        volume: String,
        mode: AccessMode,
    },
    Detach {
        volume_id: u64,
    },
    /// The agent now holds `epoch` of `volume_id` (answer to a `map_update`).
    Ack {
        volume_id: u64,
        epoch: u64,
    },
    Renew {
        volume_id: u64,
    },
    /// Client-requested allocation: grow an rw-attached volume to `new_size_bytes`.
    Grow {
        volume_id: u64,
        new_size_bytes: u64,
    },
    /// The client's direct path to `device_uuid` failed for an attached volume: the server
    /// moves that volume's data off the device (answer: `failure_reported`; progress then
    /// arrives as `recovery_status` pushes).
    ReportFailure {
        volume_id: u64,
        device_uuid: uuid::Uuid,
        reason: String,
    },
    /// The client's direct path to `device_uuid`, reported failed before, answers again: may
    /// the client fail back to it? (answer: `path_healed_reported`).
    ReportPathHealed {
        volume_id: u64,
        device_uuid: uuid::Uuid,
    },
}

/// A volume the authenticated client may attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantedVolume {
    pub name: String,
    pub mode: AccessMode,
}

/// Frames the server sends to an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentReply {
    /// Step 2: my nonce and HMAC(secret, "server" | client_nonce | server_nonce), hex.
    Challenge {
        server_nonce: String,
        mac: String,
    },
    AuthOk,
    Volumes {
        volumes: Vec<GrantedVolume>,
    },
    Attached {
        map: VolumeMap,
        session_token: String,
        /// Address of the server's I/O service (the kernel's server path), as bound.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        io_address: Option<String>,
    },
    Detached {
        volume_id: u64,
    },
    Renewed {
        volume_id: u64,
        lease_ms: u64,
    },
    /// Answer to a client `grow`.
    Grown {
        map: VolumeMap,
    },
    /// Unsolicited: the volume changed; the agent must ack with the epoch.
    MapUpdate {
        map: VolumeMap,
    },
    /// Answer to `report_failure`: the recovery it started (or the one already running).
    FailureReported {
        status: RecoveryStatus,
    },
    /// Answer to `report_path_healed`. `accepted`: the client may send I/O direct to the
    /// device again. Refused while a recovery moves the volume off that device (direct writes
    /// would bypass the recovery's copy and be missing on the replacement); the recovery
    /// publishes a map without the device instead.
    PathHealedReported {
        accepted: bool,
        message: String,
    },
    /// Unsolicited: progress of a recovery of an attached volume (no ack).
    RecoveryStatus(RecoveryStatus),
    Error(ErrorBody),
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentInfo {
    pub client: String,
    pub mode: AccessMode,
    /// Latest epoch the client acknowledged.
    pub acked_epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub name: String,
    pub grants: Vec<GrantedVolume>,
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
}

impl std::fmt::Display for RecoveryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecoveryState::Queued => "queued",
            RecoveryState::Copying => "copying",
            RecoveryState::Done => "done",
            RecoveryState::Failed => "failed",
        })
    }
}

/// Progress of moving one volume's data off a failed device (pushed to agents as
/// `recovery_status`, listed by `recovery_list` and `volume show`).
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

    #[test]
    fn admin_replies_decode_as_the_request_s_reply_type() {
        let frame = serde_json::json!({ "type": "ok", "result": { "deleted": "db1" } });
        let reply: Result<AdminReply<<VolumeDelete as AdminCall>::Reply>, _> =
            serde_json::from_value(frame);
        assert!(matches!(reply, Ok(AdminReply::Ok { result }) if result.deleted == "db1"));
    }
}
