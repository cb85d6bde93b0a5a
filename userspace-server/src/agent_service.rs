//! Agent service: authenticated TCP connections from client agents. One task per connection.
//!
//! Nothing about volumes is sent before the handshake succeeds. After it, the connection serves
//! requests and pushes `map_update` frames for every attached volume that changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use log::{debug, info, warn};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use sanblk_proto::auth;
use sanblk_proto::map::{AccessMode, VolumeMap};
use sanblk_proto::protocol::{
    write_frame, Ack, AgentCall, AgentReply, AgentRequest, Attach, Attachment, AuthOk,
    AuthResponse, Challenge, Detach, Detached, ErrorBody, ErrorCode, FailureReported, FrameError,
    FrameReader, GrantedVolume, Grow, Grown, Hello, ListVolumes, PathHealedReported,
    PreservedNoted, QuiesceAck, Renew, Renewed, ReportFailure, ReportPathHealed, ReportPreserved,
    Volumes, MAX_PRE_AUTH_FRAME_BYTES, MAX_REPORTED_CHUNKS,
};

use crate::log_text::peer_text;
use crate::recovery;
use crate::secrets;
use crate::service_error::ServiceResult;
use crate::state::{blocking, ConnectionId, PublishedMap, Refusal, ServerState};
use crate::store::{SessionRecord, SnapshotState, StoreResult};
use tokio::io::AsyncWriteExt;

/// Pushed maps waiting to be written to one connection.
const PUSH_QUEUE_DEPTH: usize = 16;

/// Longest failure reason kept from a report.
const MAX_REASON_CHARS: usize = 512;

const AUTH_FAILED: &str = "authentication failed";

pub async fn serve_agent_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<ServerState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    // A peer that stops reading must not pin this task (and its attachments) forever.
    let write_limit = state.config.frame_timeout;
    let (read_half, mut writer) = stream.into_split();
    // Until the peer has authenticated, only handshake-sized frames (a 1 MiB frame half sent
    // by each of many unauthenticated sockets would otherwise be reserved for each).
    let mut reader = FrameReader::before_authentication(read_half, MAX_PRE_AUTH_FRAME_BYTES);
    // Bound the connections that have not authenticated yet, per source address and in all,
    // so a flood of idle sockets cannot exhaust the server; authenticated agents do not count.
    // One address over its share is closed at once, unanswered (the pool logs it once).
    let handshake_slot = match state.admission.agent_handshakes.try_enter(peer.ip()) {
        Ok(slot) => slot,
        Err(Refusal::PeerLimit) => return,
        Err(Refusal::PoolFull) => {
            warn!("{peer}: too many connections in handshake; refusing");
            let body = ErrorBody::new(ErrorCode::Busy, "server busy, retry later");
            let _ = send_within(&mut writer, write_limit, &AgentReply::Error(body)).await;
            return;
        }
    };
    let handshake = tokio::time::timeout(
        state.config.handshake_timeout,
        authenticate(&mut reader, &mut writer, &state),
    );
    let client = tokio::select! {
        _ = shutdown.changed() => return,
        outcome = handshake => match outcome {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => {
                warn!("{peer}: handshake failed: {}", peer_text(&error.message));
                let _ = send_within(&mut writer, write_limit, &AgentReply::Error(error)).await;
                return;
            }
            Err(_) => {
                warn!("{peer}: handshake timed out");
                let body = ErrorBody::new(ErrorCode::BadFrame, "handshake timed out");
                let _ = send_within(&mut writer, write_limit, &AgentReply::Error(body)).await;
                return;
            }
        },
    };
    drop(handshake_slot);
    reader.authenticated();
    debug!("{peer}: client {} authenticated", peer_text(&client));
    let (connection, kick) = state.register_connection(&client);
    let mut recovery_events = state.recoveries.subscribe();
    let mut session = Session {
        connection,
        client,
        state: state.clone(),
        forwarders: HashMap::new(),
        push_sender: None,
        control: None,
        sent_epochs: HashMap::new(),
    };
    let (push_sender, mut pushes) = mpsc::channel::<Arc<PublishedMap>>(PUSH_QUEUE_DEPTH);
    session.push_sender = Some(push_sender);
    // Quiesce and resume pushes, and the answers of requests that run as changes.
    let (control_sender, mut controls) = mpsc::unbounded_channel::<AgentReply>();
    state.set_control(connection, control_sender.clone());
    session.control = Some(control_sender);
    // A frame that has started arriving must be complete within this time (slowloris guard
    // for authenticated connections; unauthenticated ones have the handshake timeout).
    let frame_timeout = state.config.frame_timeout;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = kick.notified() => {
                info!("{peer}: disconnecting client {} (removed or grant changed)", peer_text(&session.client));
                let body = ErrorBody::new(ErrorCode::NotGranted, "access changed by the administrator");
                let _ = send_within(&mut writer, write_limit, &AgentReply::Error(body)).await;
                break;
            }
            Some(control) = controls.recv() => {
                if let AgentReply::Grown(grown) = &control {
                    session.learns(&grown.map);
                }
                if let Err(error) = send_within(&mut writer, write_limit, &control).await {
                    debug!("{peer}: cannot push: {error}");
                    break;
                }
            }
            Some(published) = pushes.recv() => {
                // Skip epochs this client already has (e.g. the answer to its own grow).
                if published.update_frame.is_empty() || !session.learns(&published.map) {
                    continue;
                }
                if let Err(error) = send_bytes_within(&mut writer, write_limit, &published.update_frame).await {
                    debug!("{peer}: cannot push map: {error}");
                    break;
                }
            }
            event = recovery_events.recv() => {
                let status = match event {
                    Ok(status) => status,
                    // A newer status follows; the skipped ones are superseded.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if state.attachment_mode(session.connection, status.volume_id).is_none() {
                    continue;
                }
                if let Err(error) = send_within(&mut writer, write_limit, &AgentReply::RecoveryStatus(status)).await {
                    debug!("{peer}: cannot push recovery status: {error}");
                    break;
                }
            }
            request = reader.read_within::<AgentRequest>(Some(frame_timeout)) => {
                let reply = match request {
                    Ok(request) => session.handle(request).await,
                    Err(FrameError::Closed) => break,
                    Err(error) => {
                        warn!(
                            "{peer}: bad frame from client {}: {}; closing",
                            peer_text(&session.client),
                            peer_text(&error.to_string())
                        );
                        let body = ErrorBody::new(ErrorCode::BadFrame, error.to_string());
                        let _ = send_within(&mut writer, write_limit, &AgentReply::Error(body)).await;
                        break;
                    }
                };
                if let Some(reply) = reply {
                    let written = match send_within(&mut writer, write_limit, &reply).await {
                        Err(FrameError::Oversized(size)) => {
                            let body = ErrorBody::new(
                                ErrorCode::Internal,
                                format!("reply of {size} bytes exceeds the frame limit"),
                            );
                            send_within(&mut writer, write_limit, &AgentReply::Error(body)).await
                        }
                        other => other,
                    };
                    if let Err(error) = written {
                        debug!("{peer}: cannot reply: {error}");
                        break;
                    }
                }
            }
        }
    }
    let shutting_down = *shutdown.borrow();
    session.close(shutting_down).await;
}

/// Writes one message, giving up after `limit`.
async fn send_within<T: serde::Serialize>(
    writer: &mut OwnedWriteHalf,
    limit: std::time::Duration,
    message: &T,
) -> Result<(), FrameError> {
    tokio::time::timeout(limit, write_frame(writer, message))
        .await
        .map_err(|_| FrameError::Timeout)?
}

/// Writes pre-encoded frame bytes, giving up after `limit`.
async fn send_bytes_within(
    writer: &mut OwnedWriteHalf,
    limit: std::time::Duration,
    frame: &[u8],
) -> Result<(), FrameError> {
    tokio::time::timeout(limit, writer.write_all(frame))
        .await
        .map_err(|_| FrameError::Timeout)?
        .map_err(FrameError::from)
}

/// The answer to an `R`: its reply, or the error.
fn reply<R: AgentCall>(result: ServiceResult<R::Reply>) -> AgentReply {
    result.map_or_else(AgentReply::Error, Into::into)
}

/// Runs the server side of the mutual challenge–response handshake; returns the client name.
async fn authenticate(
    reader: &mut FrameReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
    state: &Arc<ServerState>,
) -> ServiceResult<String> {
    let failed = || ErrorBody::new(ErrorCode::AuthenticationFailed, AUTH_FAILED);
    let bad_frame = |e: FrameError| ErrorBody::new(ErrorCode::BadFrame, e.to_string());
    let Hello {
        client,
        client_nonce,
    } = match reader.read::<AgentRequest>().await.map_err(bad_frame)? {
        AgentRequest::Hello(hello) => hello,
        _ => return Err(ErrorBody::new(ErrorCode::BadRequest, "expected hello")),
    };
    let client_nonce = hex::decode(&client_nonce)
        .ok()
        .filter(|n| n.len() == auth::NONCE_BYTES)
        .ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::BadRequest,
                "client nonce must be 32 bytes of hex",
            )
        })?;
    let name = client.clone();
    let stored = blocking(state, move |s| s.store.client_secret(&name)).await?;
    // An unknown client gets a challenge made with a throwaway key, so the reply looks the same
    // as for a known client with a wrong secret: no oracle for client names.
    let secret = match stored.as_deref().map(auth::decode_secret) {
        Some(Ok(secret)) => Some(secret),
        _ => None,
    };
    let key = secret
        .clone()
        .unwrap_or_else(|| auth::random_bytes::<{ auth::SECRET_BYTES }>().to_vec());
    let server_nonce = auth::new_nonce();
    let challenge = Challenge {
        server_nonce: hex::encode(server_nonce),
        mac: hex::encode(auth::server_proof(&key, &client_nonce, &server_nonce)),
    };
    write_frame(writer, &reply::<Hello>(Ok(challenge)))
        .await
        .map_err(bad_frame)?;
    let proof = match reader.read::<AgentRequest>().await.map_err(bad_frame)? {
        AgentRequest::AuthResponse(AuthResponse { mac }) => {
            hex::decode(mac).map_err(|_| failed())?
        }
        _ => return Err(failed()),
    };
    match secret {
        Some(secret)
            if auth::verify_client_proof(&secret, &server_nonce, &client_nonce, &proof) =>
        {
            write_frame(writer, &reply::<AuthResponse>(Ok(AuthOk {})))
                .await
                .map_err(bad_frame)?;
            Ok(client)
        }
        _ => {
            info!(
                "authentication failed for client name {}",
                peer_text(&client)
            );
            Err(failed())
        }
    }
}

struct Session {
    connection: ConnectionId,
    client: String,
    state: Arc<ServerState>,
    /// One task per attached volume, forwarding its map changes into the push queue.
    forwarders: HashMap<u64, JoinHandle<()>>,
    push_sender: Option<mpsc::Sender<Arc<PublishedMap>>>,
    /// Control pushes and deferred answers, written by the connection's loop.
    control: Option<mpsc::UnboundedSender<AgentReply>>,
    /// Newest epoch sent to this client, per attached volume.
    sent_epochs: HashMap<u64, u64>,
}

impl Session {
    /// Records that `map` is being sent; false if the client already has this epoch or newer.
    fn learns(&mut self, map: &VolumeMap) -> bool {
        let sent = self.sent_epochs.entry(map.volume_id).or_insert(0);
        if map.epoch <= *sent {
            return false;
        }
        *sent = map.epoch;
        true
    }

    /// Runs one request and returns its answer (none for an ack). Each handler returns the
    /// reply type its request is paired with (`AgentCall::Reply`), which `reply::<Request>`
    /// checks.
    async fn handle(&mut self, request: AgentRequest) -> Option<AgentReply> {
        Some(match request {
            AgentRequest::Ack(Ack { volume_id, epoch }) => {
                self.state.record_ack(self.connection, volume_id, epoch);
                return None;
            }
            AgentRequest::QuiesceAck(QuiesceAck { volume_id, epoch }) => {
                self.state
                    .record_quiesce_ack(self.connection, volume_id, epoch);
                return None;
            }
            AgentRequest::Hello(_) | AgentRequest::AuthResponse(_) => AgentReply::Error(
                ErrorBody::new(ErrorCode::BadRequest, "already authenticated"),
            ),
            AgentRequest::ListVolumes(ListVolumes {}) => {
                reply::<ListVolumes>(self.list_volumes().await)
            }
            AgentRequest::Attach(request) => reply::<Attach>(self.attach(request).await),
            AgentRequest::Detach(request) => reply::<Detach>(self.detach(request).await),
            AgentRequest::Renew(request) => reply::<Renew>(self.renew(request)),
            AgentRequest::Grow(request) => match self.grow(request).await {
                // Answered by the change once committed (see `grow`).
                Ok(()) => return None,
                Err(error) => AgentReply::Error(error),
            },
            AgentRequest::ReportFailure(request) => {
                reply::<ReportFailure>(self.report_failure(request).await)
            }
            AgentRequest::ReportPathHealed(request) => {
                reply::<ReportPathHealed>(self.report_path_healed(request).await)
            }
            AgentRequest::ReportPreserved(request) => {
                reply::<ReportPreserved>(self.report_preserved(request).await)
            }
        })
    }

    async fn list_volumes(&self) -> ServiceResult<Volumes> {
        let client = self.client.clone();
        let volumes = blocking(&self.state, move |s| -> StoreResult<_> {
            let Some(record) = s.store.client(&client)? else {
                return Ok(Vec::new());
            };
            let volumes = s.store.volumes()?;
            Ok(record
                .grants
                .iter()
                .filter_map(|(id, mode)| {
                    volumes.iter().find(|v| v.id == *id).map(|v| GrantedVolume {
                        name: v.name.clone(),
                        mode: *mode,
                    })
                })
                .collect())
        })
        .await?;
        Ok(Volumes { volumes })
    }

    async fn attach(&mut self, request: Attach) -> ServiceResult<Attachment> {
        let Attach { volume, mode } = request;
        let client = self.client.clone();
        // Same answer whether the volume does not exist or is not granted: a client learns
        // nothing about volumes it may not see.
        let not_granted = ErrorBody::new(
            ErrorCode::NotGranted,
            format!("no volume {volume:?} is granted to you"),
        );
        // With the grant, the persisted session of this client's attachment, if any: its
        // token survives disconnects and server restarts (the client's kernel keeps using
        // it), until the volume is detached.
        let lookup = blocking(&self.state, move |s| -> StoreResult<_> {
            let grant = s.store.client(&client)?.and_then(|c| {
                s.store
                    .volume_by_name(&volume)
                    .ok()
                    .and_then(|v| c.grant(v.id).map(|g| (v.id, g)))
            });
            match grant {
                Some((volume_id, granted)) => {
                    let persisted = s.store.session_of(&client, volume_id)?;
                    Ok(Some((volume_id, granted, persisted)))
                }
                None => Ok(None),
            }
        })
        .await?;
        let Some((volume_id, granted, persisted)) = lookup else {
            return Err(not_granted);
        };
        if !granted.mode.permits(mode) {
            return Err(ErrorBody::new(
                ErrorCode::NotGranted,
                format!("volume is granted {}, not {mode}", granted.mode),
            ));
        }
        // Another connection of this client holding it live keeps it; this one gets a new one.
        // A token of an earlier grant (its removal cut short by a crash) is not handed out.
        let persisted =
            persisted.filter(|p| p.grant_id == granted.id && !self.state.session_is_live(&p.token));
        let session_token = persisted
            .as_ref()
            .map_or_else(secrets::new_session_token_hex, |p| p.token.clone());
        let grant = self.state.attach(
            self.connection,
            &self.client,
            volume_id,
            granted,
            mode,
            session_token.clone(),
        )?;
        if persisted.is_none_or(|p| p.mode != mode || p.agent_gone) {
            let session = SessionRecord {
                token: session_token.clone(),
                client: self.client.clone(),
                volume_id,
                mode,
                agent_gone: false,
                grant_id: granted.id,
            };
            if let Err(error) = self.state.persist_sessions(vec![session]).await {
                self.state.detach(self.connection, volume_id);
                return Err(error);
            }
        }
        if let Some(sender) = self.push_sender.clone() {
            let mut updates = grant.updates;
            let forwarder = tokio::spawn(async move {
                while updates.changed().await.is_ok() {
                    let map = updates.borrow_and_update().clone();
                    if sender.send(map).await.is_err() {
                        break;
                    }
                }
            });
            self.forwarders.insert(volume_id, forwarder);
        }
        info!(
            "client {} attached volume {} ({mode}) at epoch {}",
            peer_text(&self.client),
            peer_text(&grant.map.name),
            grant.map.epoch
        );
        self.sent_epochs.insert(volume_id, grant.map.epoch);
        // A client reconnecting after a restart (or a lost connection) may hold I/O of a
        // change that no longer runs: resume it at the current epoch, after this answer.
        self.state.resume_if_idle(self.connection, volume_id);
        Ok(Attachment {
            map: grant.map,
            session_token,
            io_address: Some(self.state.config.io_listen.to_string()),
        })
    }

    async fn detach(&mut self, request: Detach) -> ServiceResult<Detached> {
        let Detach { volume_id } = request;
        if let Some(forwarder) = self.forwarders.remove(&volume_id) {
            forwarder.abort();
        }
        self.sent_epochs.remove(&volume_id);
        if !self.state.detach(self.connection, volume_id) {
            return Err(ErrorBody::new(
                ErrorCode::NotFound,
                "not attached to that volume",
            ));
        }
        let client = self.client.clone();
        let forgotten = blocking(&self.state, move |s| {
            s.store
                .delete_sessions(|p| p.client == client && p.volume_id == volume_id)
        });
        if let Err(error) = forgotten.await {
            warn!("volume {volume_id}: forgetting the session token: {error}");
        }
        Ok(Detached { volume_id })
    }

    fn renew(&self, request: Renew) -> ServiceResult<Renewed> {
        let Renew { volume_id, epoch } = request;
        if let Err(error) = self.state.renew(self.connection, volume_id, epoch) {
            if error.code == ErrorCode::Fenced {
                warn!(
                    "client {}: renewal of fenced attachment to volume {volume_id} (epoch {epoch}) refused",
                    peer_text(&self.client)
                );
            }
            return Err(error);
        }
        Ok(Renewed {
            volume_id,
            lease_ms: self.state.config.lease_ms,
        })
    }

    /// Starts the grow as a change in its own task: the connection keeps serving (the
    /// change waits for this very client's `QuiesceAck`). The answer, `Grown` once committed
    /// or the error, goes through the control queue.
    async fn grow(&mut self, request: Grow) -> ServiceResult<()> {
        let Grow {
            volume_id,
            new_size_bytes,
        } = request;
        // The attachment may be another connection of this client: `sanctl grow` on the
        // client host asks on its own connection while the agent holds the attachment.
        if self.state.attachment_mode(self.connection, volume_id) != Some(AccessMode::Rw)
            && !self.state.client_attached_rw(&self.client, volume_id)
        {
            return Err(ErrorBody::new(
                ErrorCode::NotGranted,
                "grow needs a read-write attachment to the volume",
            ));
        }
        let Some(control) = self.control.clone() else {
            return Err(ErrorBody::new(ErrorCode::Internal, "no control queue"));
        };
        let (state, client) = (self.state.clone(), self.client.clone());
        tokio::spawn(async move {
            let lease_ms = state.config.lease_ms;
            let answer = control.clone();
            let grown = crate::change::grow(&state, volume_id, new_size_bytes, move |record| {
                let _ = answer.send(AgentReply::from(Grown {
                    map: record.map(lease_ms),
                }));
            })
            .await;
            match grown {
                Ok(record) => info!(
                    "client {} grew volume {} to {} bytes (epoch {})",
                    peer_text(&client),
                    peer_text(&record.name),
                    record.size_bytes,
                    record.epoch
                ),
                Err(error) => {
                    let _ = control.send(AgentReply::Error(error));
                }
            }
        });
        Ok(())
    }

    fn require_attached(&self, volume_id: u64) -> ServiceResult<()> {
        match self.state.attachment_mode(self.connection, volume_id) {
            Some(_) => Ok(()),
            None => Err(ErrorBody::new(
                ErrorCode::NotFound,
                "not attached to that volume",
            )),
        }
    }

    async fn report_path_healed(
        &mut self,
        request: ReportPathHealed,
    ) -> ServiceResult<PathHealedReported> {
        let ReportPathHealed {
            volume_id,
            device_uuid,
        } = request;
        self.require_attached(volume_id)?;
        let (accepted, message) =
            recovery::report_path_healed(&self.state, volume_id, device_uuid).await?;
        if accepted {
            self.state
                .recoveries
                .clear_path_failure(device_uuid, &self.client);
        }
        info!(
            "client {} reports its path to device {device_uuid} healed for volume {volume_id}: {} ({message})",
            peer_text(&self.client),
            if accepted { "fail-back accepted" } else { "fail-back refused" }
        );
        Ok(PathHealedReported { accepted, message })
    }

    /// Chunks the client's kernel preserved itself: checked against the snapshot store's
    /// records, which are read back first and stay the changed-chunk list.
    async fn report_preserved(
        &mut self,
        request: ReportPreserved,
    ) -> ServiceResult<PreservedNoted> {
        let ReportPreserved {
            volume_id,
            snapshot_id,
            chunks,
        } = request;
        if self.state.attachment_mode(self.connection, volume_id) != Some(AccessMode::Rw) {
            return Err(ErrorBody::new(
                ErrorCode::NotGranted,
                "only a read-write attachment to the volume preserves chunks",
            ));
        }
        if chunks.is_empty() || chunks.len() > MAX_REPORTED_CHUNKS {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                format!(
                    "a report names 1 to {MAX_REPORTED_CHUNKS} chunks, not {}",
                    chunks.len()
                ),
            ));
        }
        let volume = blocking(&self.state, move |s| s.store.volume_by_id(volume_id)).await?;
        let snapshot = blocking(&self.state, move |s| s.store.snapshots_of(volume_id))
            .await?
            .into_iter()
            .find(|s| s.id == snapshot_id && s.state == SnapshotState::Active)
            .ok_or_else(|| {
                ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("volume {volume_id} has no active snapshot {snapshot_id}"),
                )
            })?;
        let volume_chunks = snapshot
            .origin_bytes
            .div_ceil(u64::from(snapshot.chunk_bytes).max(1));
        if let Some(beyond) = chunks.iter().find(|&&chunk| chunk >= volume_chunks) {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                format!("chunk {beyond} is beyond the snapshot's {volume_chunks} chunks"),
            ));
        }
        let reported = chunks.len();
        let unrecorded = blocking(&self.state, move |s| {
            s.snapshots
                .note_preserved(volume_id, volume.epoch, snapshot_id, &chunks)
                .map_err(|e| ErrorBody::new(ErrorCode::Io, e.to_string()))
        })
        .await?
        .ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::NotFound,
                format!("snapshot {snapshot_id} has no loaded COW store"),
            )
        })?;
        if !unrecorded.is_empty() {
            warn!(
                "client {}: reports chunks of snapshot {} preserved that its COW store has no record of: {:?}",
                peer_text(&self.client),
                snapshot.name,
                &unrecorded[..unrecorded.len().min(16)]
            );
        }
        Ok(PreservedNoted {
            recorded: (reported - unrecorded.len()) as u64,
            unrecorded,
        })
    }

    async fn report_failure(&mut self, request: ReportFailure) -> ServiceResult<FailureReported> {
        let ReportFailure {
            volume_id,
            device_uuid,
            reason,
        } = request;
        self.require_attached(volume_id)?;
        // Bounded, so a client cannot make the record (and the logs) huge.
        let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
        info!(
            "client {} reports device {device_uuid} failed for volume {volume_id}: {}",
            peer_text(&self.client),
            peer_text(&reason)
        );
        recovery::report_failure(&self.state, volume_id, device_uuid, &self.client, reason).await
    }

    /// Ends the connection's attachments. Unless the server is shutting down, their persisted
    /// tokens stop being accepted until the agent attaches again (a server stopping or dying
    /// leaves them valid, for the clients' kernels after the restart).
    async fn close(&mut self, shutting_down: bool) {
        for (_, forwarder) in self.forwarders.drain() {
            forwarder.abort();
        }
        let volumes = self.state.unregister_connection(self.connection);
        if shutting_down || volumes.is_empty() {
            return;
        }
        let client = self.client.clone();
        let gone = blocking(&self.state, move |s| -> StoreResult<_> {
            let mut gone = Vec::new();
            for volume_id in volumes {
                if let Some(mut session) = s.store.session_of(&client, volume_id)? {
                    session.agent_gone = true;
                    gone.push(session);
                }
            }
            Ok(gone)
        });
        let marked = match gone.await {
            Ok(gone) => self.state.persist_sessions(gone).await,
            Err(error) => Err(error),
        };
        if let Err(error) = marked {
            warn!(
                "client {}: marking its sessions: {error}",
                peer_text(&self.client)
            );
        }
    }
}
