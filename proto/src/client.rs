//! Clients of the control protocol: `AdminClient` (sanctl admin commands, Unix socket) and
//! `AgentClient` (client agents, TCP with mutual authentication, attach, map updates).

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use tokio::net::{tcp, unix, TcpStream, ToSocketAddrs, UnixStream};

use crate::auth;
use crate::map::{AccessMode, VolumeMap};
use crate::protocol::{
    write_frame, Ack, AdminCall, AdminReply, AdminRequest, AgentCall, AgentReply, AgentRequest,
    Attach, Attachment, AuthResponse, Detach, ErrorBody, ErrorCode, FailureReported, FrameError,
    FrameReader, GrantedVolume, Grow, Hello, ListVolumes, MapUpdate, PathHealedReported,
    PreservedNoted, Quiesce, QuiesceAck, RecoveryStatus, Renew, ReportFailure, ReportPathHealed,
    ReportPreserved, Resume,
};
use crate::unix_path::SocketPath;

/// Default time to wait for a reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request that runs a configuration change (grow) may take: the change waits for
/// every attached client's quiesce and map acks, or their leases, twice at most.
pub const CHANGE_REPLY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The server answered with an error.
    #[error("{0}")]
    Server(ErrorBody),
    #[error("the server is not who it claims to be (bad server proof)")]
    ServerNotAuthenticated,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

impl ClientError {
    /// The server's error code, if the server said no.
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(body) => Some(body.code),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------

pub struct AdminClient {
    reader: FrameReader<unix::OwnedReadHalf>,
    writer: unix::OwnedWriteHalf,
}

impl AdminClient {
    pub async fn connect(socket: &Path) -> Result<AdminClient, ClientError> {
        let connect_error = |source| ClientError::Connect {
            target: socket.display().to_string(),
            source,
        };
        let reachable = SocketPath::new(socket).map_err(connect_error)?;
        let stream = UnixStream::connect(reachable.as_path())
            .await
            .map_err(connect_error)?;
        let (read_half, writer) = stream.into_split();
        Ok(AdminClient {
            reader: FrameReader::new(read_half),
            writer,
        })
    }

    /// Sends one request and returns its reply (or the server's error).
    pub async fn call<R: AdminCall>(&mut self, request: R) -> Result<R::Reply, ClientError> {
        let request: AdminRequest = request.into();
        write_frame(&mut self.writer, &request).await?;
        let reply = tokio::time::timeout(REPLY_TIMEOUT, self.reader.read::<AdminReply<R::Reply>>())
            .await
            .map_err(|_| ClientError::Timeout(REPLY_TIMEOUT))??;
        match reply {
            AdminReply::Ok { result } => Ok(result),
            AdminReply::Error(body) => Err(ClientError::Server(body)),
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// An unsolicited frame from the server.
#[derive(Debug, Clone)]
pub enum Push {
    /// A new map; install it, then [`AgentClient::ack`] its epoch.
    MapUpdate(VolumeMap),
    /// Progress of a recovery of an attached volume.
    RecoveryStatus(RecoveryStatus),
    /// A change begins: drain and hold I/O of the volume, then [`AgentClient::quiesce_ack`].
    Quiesce(Quiesce),
    /// The change is over at this epoch: release held I/O.
    Resume(Resume),
}

/// An authenticated agent connection.
///
/// Requests are answered in order; pushes that arrive while waiting for an answer are queued
/// and returned by [`AgentClient::next_push`] (or, maps only, [`AgentClient::next_map_update`]).
pub struct AgentClient {
    reader: FrameReader<tcp::OwnedReadHalf>,
    writer: tcp::OwnedWriteHalf,
    queued_pushes: VecDeque<Push>,
}

impl AgentClient {
    /// Connects and runs the mutual authentication handshake.
    pub async fn connect(
        address: impl ToSocketAddrs + std::fmt::Debug,
        client: &str,
        secret: &[u8],
    ) -> Result<AgentClient, ClientError> {
        let target = format!("{address:?}");
        let stream = TcpStream::connect(address)
            .await
            .map_err(|source| ClientError::Connect { target, source })?;
        AgentClient::authenticate(stream, client, secret).await
    }

    /// Runs the client side of the handshake on an already-connected stream.
    pub async fn authenticate(
        stream: TcpStream,
        client: &str,
        secret: &[u8],
    ) -> Result<AgentClient, ClientError> {
        let _ = stream.set_nodelay(true);
        let (read_half, writer) = stream.into_split();
        let mut agent = AgentClient {
            reader: FrameReader::new(read_half),
            writer,
            queued_pushes: VecDeque::new(),
        };
        let client_nonce = auth::new_nonce();
        let challenge = agent
            .call(Hello {
                client: client.to_string(),
                client_nonce: hex::encode(client_nonce),
            })
            .await?;
        let server_nonce = hex::decode(challenge.server_nonce)
            .map_err(|_| ClientError::Protocol("bad server nonce".into()))?;
        let server_mac = hex::decode(challenge.mac)
            .map_err(|_| ClientError::Protocol("bad server proof".into()))?;
        if server_nonce.len() != auth::NONCE_BYTES {
            return Err(ClientError::Protocol(
                "server nonce has the wrong length".into(),
            ));
        }
        if !auth::verify_server_proof(secret, &client_nonce, &server_nonce, &server_mac) {
            return Err(ClientError::ServerNotAuthenticated);
        }
        let proof = auth::client_proof(secret, &server_nonce, &client_nonce);
        agent
            .call(AuthResponse {
                mac: hex::encode(proof),
            })
            .await?;
        Ok(agent)
    }

    /// Sends one request and returns its reply (or the server's error). A reply of another
    /// kind than the request's is a protocol error. Pushes received meanwhile are queued.
    pub async fn call<R: AgentCall>(&mut self, request: R) -> Result<R::Reply, ClientError> {
        self.send(&request.into()).await?;
        let reply = self.receive_reply().await?;
        R::Reply::try_from(reply).map_err(|other| {
            ClientError::Protocol(format!("unexpected reply to {}: {other:?}", R::NAME))
        })
    }

    /// Sends a raw request without waiting (used for acks, and by tests for odd sequences).
    pub async fn send(&mut self, request: &AgentRequest) -> Result<(), ClientError> {
        write_frame(&mut self.writer, request)
            .await
            .map_err(ClientError::from)
    }

    /// Waits for the next non-push frame; pushes received meanwhile are queued.
    /// Server errors come back as `ClientError::Server`.
    async fn receive_reply(&mut self) -> Result<AgentReply, ClientError> {
        loop {
            let frame = tokio::time::timeout(REPLY_TIMEOUT, self.reader.read::<AgentReply>())
                .await
                .map_err(|_| ClientError::Timeout(REPLY_TIMEOUT))??;
            match frame {
                AgentReply::MapUpdate(MapUpdate { map }) => self.queue(Push::MapUpdate(map)),
                AgentReply::RecoveryStatus(status) => self.queue(Push::RecoveryStatus(status)),
                AgentReply::Quiesce(quiesce) => self.queue(Push::Quiesce(quiesce)),
                AgentReply::Resume(resume) => self.queue(Push::Resume(resume)),
                AgentReply::Error(body) => return Err(ClientError::Server(body)),
                other => return Ok(other),
            }
        }
    }

    pub async fn list_volumes(&mut self) -> Result<Vec<GrantedVolume>, ClientError> {
        Ok(self.call(ListVolumes {}).await?.volumes)
    }

    pub async fn attach(
        &mut self,
        volume: &str,
        mode: AccessMode,
    ) -> Result<Attachment, ClientError> {
        self.call(Attach {
            volume: volume.to_string(),
            mode,
        })
        .await
    }

    pub async fn detach(&mut self, volume_id: u64) -> Result<(), ClientError> {
        self.call(Detach { volume_id }).await.map(drop)
    }

    /// Renews the lease of the attachment holding `epoch`; returns the lease duration in
    /// milliseconds. A fenced attachment gets `ErrorCode::Fenced`.
    pub async fn renew(&mut self, volume_id: u64, epoch: u64) -> Result<u64, ClientError> {
        Ok(self.call(Renew { volume_id, epoch }).await?.lease_ms)
    }

    /// Answers a [`Push::Quiesce`]: this client's I/O of the volume at `epoch` is drained and
    /// new I/O is held (no reply).
    pub async fn quiesce_ack(&mut self, volume_id: u64, epoch: u64) -> Result<(), ClientError> {
        self.send(&QuiesceAck { volume_id, epoch }.into()).await
    }

    /// Client-requested allocation: grows an rw-attached volume; returns the new map. The
    /// server quiesces every attached client for the change, this one included: the
    /// `Quiesce` of this volume that arrives while the grow is pending is acknowledged at
    /// once, which is right only for a caller with no I/O of its own in flight (a caller
    /// with a kernel device uses [`AgentClient::grow_with`]).
    pub async fn grow(
        &mut self,
        volume_id: u64,
        new_size_bytes: u64,
    ) -> Result<VolumeMap, ClientError> {
        let map = self.grow_with(volume_id, new_size_bytes, |_| true).await?;
        // Likewise the new map is held at once (the change waits for this ack).
        self.ack(map.volume_id, map.epoch).await?;
        Ok(map)
    }

    /// Like [`AgentClient::grow`]; `quiesce` is called for every `Quiesce` push that arrives
    /// while the grow is pending (it drains the client's I/O) and, when it returns true, the
    /// push is acknowledged. Other pushes are queued.
    pub async fn grow_with(
        &mut self,
        volume_id: u64,
        new_size_bytes: u64,
        mut quiesce: impl FnMut(&Quiesce) -> bool,
    ) -> Result<VolumeMap, ClientError> {
        self.send(
            &Grow {
                volume_id,
                new_size_bytes,
            }
            .into(),
        )
        .await?;
        loop {
            let frame =
                tokio::time::timeout(CHANGE_REPLY_TIMEOUT, self.reader.read::<AgentReply>())
                    .await
                    .map_err(|_| ClientError::Timeout(CHANGE_REPLY_TIMEOUT))??;
            match frame {
                AgentReply::Grown(grown) => return Ok(grown.map),
                AgentReply::Quiesce(request) => {
                    if quiesce(&request) {
                        self.quiesce_ack(request.volume_id, request.epoch).await?;
                    }
                }
                AgentReply::Error(body) => return Err(ClientError::Server(body)),
                AgentReply::MapUpdate(MapUpdate { map }) => self.queue(Push::MapUpdate(map)),
                AgentReply::RecoveryStatus(status) => self.queue(Push::RecoveryStatus(status)),
                AgentReply::Resume(resume) => self.queue(Push::Resume(resume)),
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected reply to Grow: {other:?}"
                    )))
                }
            }
        }
    }

    /// Tells the server which epoch this agent now holds (no reply).
    pub async fn ack(&mut self, volume_id: u64, epoch: u64) -> Result<(), ClientError> {
        self.send(&Ack { volume_id, epoch }.into()).await
    }

    /// Reports that this host's path to `device_uuid` failed for an attached volume; the
    /// server starts (or already runs) a recovery and answers with its status. Progress then
    /// arrives as [`Push::RecoveryStatus`].
    pub async fn report_failure(
        &mut self,
        volume_id: u64,
        device_uuid: uuid::Uuid,
        reason: &str,
    ) -> Result<FailureReported, ClientError> {
        self.call(ReportFailure {
            volume_id,
            device_uuid,
            reason: reason.to_string(),
        })
        .await
    }

    /// Asks whether this host may fail back to `device_uuid` (its direct path answers again);
    /// `Ok((accepted, message))`.
    pub async fn report_path_healed(
        &mut self,
        volume_id: u64,
        device_uuid: uuid::Uuid,
    ) -> Result<(bool, String), ClientError> {
        let PathHealedReported { accepted, message } = self
            .call(ReportPathHealed {
                volume_id,
                device_uuid,
            })
            .await?;
        Ok((accepted, message))
    }

    /// Relays chunks the kernel preserved in snapshot `snapshot_id`'s store; the server
    /// answers with those its records do not hold.
    pub async fn report_preserved(
        &mut self,
        volume_id: u64,
        snapshot_id: u64,
        chunks: Vec<u64>,
    ) -> Result<PreservedNoted, ClientError> {
        self.call(ReportPreserved {
            volume_id,
            snapshot_id,
            chunks,
        })
        .await
    }

    /// Waits for the next push of any kind (queued ones first). Cancellation safe.
    pub async fn next_push(&mut self) -> Result<Push, ClientError> {
        if let Some(push) = self.queued_pushes.pop_front() {
            return Ok(push);
        }
        self.read_push().await
    }

    /// Queues a push. Only the newest status per volume is kept, so an agent that reads maps
    /// only (`next_map_update`) does not pile up statuses.
    fn queue(&mut self, push: Push) {
        if let Push::RecoveryStatus(status) = &push {
            let volume_id = status.volume_id;
            self.queued_pushes.retain(
                |queued| !matches!(queued, Push::RecoveryStatus(old) if old.volume_id == volume_id),
            );
        }
        self.queued_pushes.push_back(push);
    }

    async fn read_push(&mut self) -> Result<Push, ClientError> {
        match self.reader.read::<AgentReply>().await? {
            AgentReply::MapUpdate(MapUpdate { map }) => Ok(Push::MapUpdate(map)),
            AgentReply::RecoveryStatus(status) => Ok(Push::RecoveryStatus(status)),
            AgentReply::Quiesce(quiesce) => Ok(Push::Quiesce(quiesce)),
            AgentReply::Resume(resume) => Ok(Push::Resume(resume)),
            AgentReply::Error(body) => Err(ClientError::Server(body)),
            other => Err(ClientError::Protocol(format!(
                "unexpected reply while no request is pending: {other:?}"
            ))),
        }
    }

    /// Waits for the next pushed map (queued ones first). Cancellation safe. The caller
    /// should install the map and then [`AgentClient::ack`] its epoch. Recovery statuses
    /// arriving meanwhile stay queued for [`AgentClient::next_push`].
    pub async fn next_map_update(&mut self) -> Result<VolumeMap, ClientError> {
        let queued = self
            .queued_pushes
            .iter()
            .position(|p| matches!(p, Push::MapUpdate(_)));
        if let Some(Push::MapUpdate(map)) = queued.and_then(|i| self.queued_pushes.remove(i)) {
            return Ok(map);
        }
        loop {
            match self.read_push().await? {
                Push::MapUpdate(map) => return Ok(map),
                status => self.queue(status),
            }
        }
    }
}
