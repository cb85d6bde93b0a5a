//! Shared server state, one field per concern: the metadata store and configuration; the
//! admission of incoming work; the live attachments and the current map of every attached
//! volume (a `watch` channel per volume, which is how changes reach clients), behind the one
//! state lock; the running recoveries (`recoveries`); the group commit of session records.

mod admission;
mod recoveries;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, info};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use sanblk_proto::map::{AccessMode, CopyOnWrite, CowStoreLocation, VolumeMap, IN_FLIGHT_BOUND_MS};
use sanblk_proto::protocol::{
    encode_map_update, AgentReply, AttachmentInfo, ErrorBody, ErrorCode, Quiesce, Resume,
};
use sanblk_uapi::map::MAX_COW_STORES;

use crate::config::Config;
use crate::service_error::ServiceResult;
use crate::snapshot::Snapshots;
use crate::store::{Grant, SessionRecord, SnapshotRecord, SnapshotState, Store, VolumeRecord};

pub use admission::{HandshakePool, Refusal};
pub use recoveries::{Recoveries, WaitingForSpace};

pub type ConnectionId = u64;

struct Attachment {
    client: String,
    mode: AccessMode,
    acked_epoch: u64,
    session_token: String,
    /// When the attachment was made or its lease last renewed (time received: the client
    /// measures its lease from when it *sent* the renewal, so it lapses there first).
    renewed: Instant,
    /// False once the agent's connection closed without a detach: the attachment, and its
    /// read-write slot, stay until the lease expires (the client's kernel may still write).
    connected: bool,
    /// Epoch of the last `Quiesce` pushed to it, and of the last one it acknowledged.
    quiesce_sent: Option<u64>,
    quiesce_acked: Option<u64>,
}

impl Attachment {
    /// When the server counts the lease as expired: lease plus the in-flight bound after the
    /// last renewal was received.
    fn expires(&self, lease: Duration) -> Instant {
        self.renewed + lease + Duration::from_millis(IN_FLIGHT_BOUND_MS)
    }
}

/// How a step of a change that waits for every attached client stands.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Waiting {
    /// Attachments still to answer.
    pub pending: usize,
    /// Attachments fenced by this round (lease expired without an answer).
    pub fenced: Vec<String>,
    /// The earliest lease expiry among the pending ones.
    pub next_expiry: Option<Instant>,
}

/// What a session token of the server I/O path stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub client: String,
    pub volume_id: u64,
    pub mode: AccessMode,
    /// Current epoch of the volume's map (I/O carrying an older epoch is stale).
    pub epoch: u64,
}

/// A map as published to attached clients, with its `map_update` frame encoded once (not once
/// per client: with thousands of clients the encoding dominated the push time).
pub struct PublishedMap {
    pub map: VolumeMap,
    pub update_frame: Vec<u8>,
}

impl PublishedMap {
    pub fn new(map: VolumeMap) -> Arc<PublishedMap> {
        // Encoding fails only beyond the frame limit, which the allocator's extent counts stay
        // far below; an empty frame is then not sent (the client still gets the map on its
        // next attach).
        let update_frame = encode_map_update(&map).unwrap_or_default();
        Arc::new(PublishedMap { map, update_frame })
    }
}

struct LiveVolume {
    map: watch::Sender<Arc<PublishedMap>>,
    attachments: HashMap<ConnectionId, Attachment>,
}

/// What the one state lock guards.
#[derive(Default)]
struct Live {
    volumes: HashMap<u64, LiveVolume>,
    /// Authenticated connections: client name and a handle to disconnect them.
    connections: HashMap<ConnectionId, (String, Arc<Notify>)>,
    /// Session token -> (volume, connection) of the attachment it was issued for.
    sessions: HashMap<String, (u64, ConnectionId)>,
    /// Where control pushes (quiesce, resume) for a connection go.
    controls: HashMap<ConnectionId, mpsc::UnboundedSender<AgentReply>>,
    /// Attachments fenced by a change: (connection, volume). Their renewals are refused.
    fenced: HashSet<(ConnectionId, u64)>,
    /// Session tokens of fenced attachments, with their (client, volume): refused also as
    /// persisted tokens. A new attachment of the same client and volume persists its own
    /// token over the old one, which then drops out (so this holds at most one token per
    /// client and volume).
    fenced_tokens: HashMap<String, (String, u64)>,
    /// Volumes with a configuration change in progress.
    changing: HashSet<u64>,
    /// Volumes written through a writable NBD export (a restore): no client may attach.
    restoring: HashSet<u64>,
    /// The id of the connection registered last.
    last_connection_id: ConnectionId,
}

/// Clients a refused `volume delete` names (the rest are counted).
const MAX_NAMED_HOLDERS: usize = 8;

/// Connections allowed to be in the handshake at once, per port.
pub const MAX_PENDING_HANDSHAKES: usize = 4096;

/// What limits or orders incoming work.
pub struct Admission {
    /// Agent connections in the handshake: at most `MAX_PENDING_HANDSHAKES`, and at most
    /// `max_handshakes_per_peer` per source address.
    pub agent_handshakes: HandshakePool,
    /// I/O connections before their HELLO, likewise: a pool of their own, so a flood of the
    /// agent port cannot starve the kernel's HELLOs (nor the other way round).
    pub io_handshakes: HandshakePool,
    /// Held across a whole `pool add` (checks, label write, commit), so two adds of one device
    /// cannot leave a label on disk that differs from the recorded device.
    pub pool_changes: Mutex<()>,
}

/// Group commit of session records: attaches queue theirs, one of them commits the batch.
#[derive(Default)]
struct SessionCommits {
    /// Session records waiting to be persisted, each with whoever waits for its commit.
    pending: Mutex<Vec<(SessionRecord, oneshot::Sender<ServiceResult<()>>)>>,
    /// Held by the task committing a batch of `pending`.
    writer: tokio::sync::Mutex<()>,
}

pub struct ServerState {
    /// Shared with the device tables, which open devices from the pool records.
    pub store: Arc<Store>,
    pub config: Config,
    pub admission: Admission,
    /// The one state lock (as in mini-redis): attachments, connections, sessions, maps.
    live: Mutex<Live>,
    pub recoveries: Recoveries,
    /// The volumes' active snapshot stores.
    pub snapshots: Snapshots,
    session_commits: SessionCommits,
}

/// What a successful attach hands the connection.
pub struct AttachGrant {
    pub map: VolumeMap,
    pub updates: watch::Receiver<Arc<PublishedMap>>,
}

impl ServerState {
    pub fn new(store: Store, config: Config) -> Arc<ServerState> {
        let per_peer = config.max_handshakes_per_peer;
        let store = Arc::new(store);
        Arc::new(ServerState {
            snapshots: Snapshots::new(store.clone()),
            store,
            config,
            admission: Admission {
                agent_handshakes: HandshakePool::new("agent", MAX_PENDING_HANDSHAKES, per_peer),
                io_handshakes: HandshakePool::new("I/O", MAX_PENDING_HANDSHAKES, per_peer),
                pool_changes: Mutex::new(()),
            },
            live: Mutex::new(Live::default()),
            recoveries: Recoveries::new(),
            session_commits: SessionCommits::default(),
        })
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        // A panic while holding the lock cannot leave `Live` half-updated in a way that matters
        // more than losing the server, so keep serving with the inner value.
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers an authenticated connection; the Notify fires when it must be disconnected.
    pub fn register_connection(&self, client: &str) -> (ConnectionId, Arc<Notify>) {
        let kick = Arc::new(Notify::new());
        let mut live = self.live();
        live.last_connection_id += 1;
        let id = live.last_connection_id;
        live.connections
            .insert(id, (client.to_string(), kick.clone()));
        (id, kick)
    }

    /// A closing connection: its attachments stay, disconnected, until their leases expire
    /// (`reap_expired` frees them then): the client's kernel may still be writing directly,
    /// so a read-write slot freed now could let a second writer in. Returns the ids of
    /// their volumes.
    pub fn unregister_connection(&self, connection: ConnectionId) -> Vec<u64> {
        let mut live = self.live();
        let live = &mut *live;
        live.connections.remove(&connection);
        live.controls.remove(&connection);
        live.fenced.retain(|(c, _)| *c != connection);
        let mut dropped = Vec::new();
        for (volume_id, volume) in live.volumes.iter_mut() {
            if let Some(attachment) = volume.attachments.get_mut(&connection) {
                attachment.connected = false;
                dropped.push(*volume_id);
            }
        }
        dropped
    }

    /// Sets where control pushes (quiesce, resume) for `connection` go.
    pub fn set_control(&self, connection: ConnectionId, sender: mpsc::UnboundedSender<AgentReply>) {
        self.live().controls.insert(connection, sender);
    }

    /// Frees the attachments of closed connections whose lease (plus the in-flight bound)
    /// has expired; returns how many.
    pub fn reap_expired(&self) -> usize {
        let lease = self.lease();
        let now = Instant::now();
        let mut live = self.live();
        let live = &mut *live;
        let sessions = &mut live.sessions;
        let mut freed = 0;
        live.volumes.retain(|volume_id, volume| {
            volume.attachments.retain(|_, attachment| {
                let keep = attachment.connected || attachment.expires(lease) > now;
                if !keep {
                    info!(
                        "volume {volume_id}: lease of disconnected client {:?} expired; its {} attachment is freed",
                        attachment.client, attachment.mode
                    );
                    sessions.remove(&attachment.session_token);
                    freed += 1;
                }
                keep
            });
            !volume.attachments.is_empty()
        });
        freed
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.config.lease_ms)
    }

    /// Records a renewal of this connection's attachment to the volume.
    /// Records a renewal of the lease of this connection's attachment, which holds `epoch`.
    /// An epoch the server never published is refused (nothing renewed).
    pub fn renew(&self, connection: ConnectionId, volume_id: u64, epoch: u64) -> ServiceResult<()> {
        let mut live = self.live();
        if live.fenced.contains(&(connection, volume_id)) {
            return Err(fenced_error(volume_id));
        }
        let volume = live.volumes.get_mut(&volume_id);
        let published = volume.as_ref().map(|v| v.map.borrow().map.epoch);
        match volume.and_then(|v| v.attachments.get_mut(&connection)) {
            Some(_) if published.is_some_and(|published| epoch > published) => Err(ErrorBody::new(
                ErrorCode::BadRequest,
                format!(
                    "renewal names epoch {epoch}, but volume {volume_id} is at epoch {}",
                    published.unwrap_or_default()
                ),
            )),
            Some(attachment) => {
                attachment.renewed = Instant::now();
                Ok(())
            }
            None => Err(ErrorBody::new(
                ErrorCode::NotFound,
                "not attached to that volume",
            )),
        }
    }

    /// Marks a change of `volume_id` in progress; false if one already is.
    pub fn begin_change(&self, volume_id: u64) -> bool {
        self.live().changing.insert(volume_id)
    }

    pub fn end_change(&self, volume_id: u64) {
        self.live().changing.remove(&volume_id);
    }

    /// Reserves `volume_id` for a restore through its writable NBD export: refused while a
    /// client has it attached or another restore writes it; attaches are refused until
    /// [`end_restore`](Self::end_restore).
    pub fn begin_restore(&self, volume_id: u64) -> ServiceResult<()> {
        let mut live = self.live();
        let attached = live
            .volumes
            .get(&volume_id)
            .map_or(0, |v| v.attachments.len());
        if attached > 0 {
            return Err(ErrorBody::new(
                ErrorCode::Busy,
                format!("the volume is attached by {attached} client(s); detach them to restore onto it"),
            ));
        }
        if !live.restoring.insert(volume_id) {
            return Err(ErrorBody::new(
                ErrorCode::Busy,
                "another restore is writing the volume",
            ));
        }
        Ok(())
    }

    pub fn end_restore(&self, volume_id: u64) {
        self.live().restoring.remove(&volume_id);
    }

    #[cfg(test)]
    pub fn change_in_progress(&self, volume_id: u64) -> bool {
        self.live().changing.contains(&volume_id)
    }

    /// Records a client's `QuiesceAck`.
    pub fn record_quiesce_ack(&self, connection: ConnectionId, volume_id: u64, epoch: u64) {
        let mut live = self.live();
        if let Some(attachment) = live
            .volumes
            .get_mut(&volume_id)
            .and_then(|v| v.attachments.get_mut(&connection))
        {
            if attachment.quiesce_sent == Some(epoch) {
                attachment.quiesce_acked = Some(epoch);
            }
        }
    }

    /// One round of a change's quiesce step: pushes `Quiesce` to every attachment of the
    /// volume not yet sent one for `epoch` (also ones attached since the change began), and
    /// fences those whose lease expired without an ack.
    pub fn quiesce_round(&self, volume_id: u64, epoch: u64) -> Waiting {
        self.wait_round(volume_id, |attachment, controls, connection| {
            if attachment.quiesce_sent != Some(epoch) {
                attachment.quiesce_sent = Some(epoch);
                attachment.quiesce_acked = None;
                if let Some(control) = controls.get(&connection) {
                    let _ = control.send(AgentReply::Quiesce(Quiesce { volume_id, epoch }));
                }
            }
            attachment.quiesce_acked == Some(epoch)
        })
    }

    /// One round of a change's publish step: done for attachments that acked `epoch`;
    /// fences those whose lease expired without an ack.
    pub fn map_ack_round(&self, volume_id: u64, epoch: u64) -> Waiting {
        self.wait_round(volume_id, |attachment, _, _| {
            attachment.acked_epoch >= epoch
        })
    }

    fn wait_round(
        &self,
        volume_id: u64,
        mut answered: impl FnMut(
            &mut Attachment,
            &HashMap<ConnectionId, mpsc::UnboundedSender<AgentReply>>,
            ConnectionId,
        ) -> bool,
    ) -> Waiting {
        let lease = self.lease();
        let now = Instant::now();
        let mut live = self.live();
        let live = &mut *live;
        let mut waiting = Waiting::default();
        let Some(volume) = live.volumes.get_mut(&volume_id) else {
            return waiting;
        };
        let mut fence = Vec::new();
        for (connection, attachment) in volume.attachments.iter_mut() {
            if attachment.connected && answered(attachment, &live.controls, *connection) {
                continue;
            }
            let expires = attachment.expires(lease);
            if expires <= now {
                fence.push(*connection);
            } else {
                waiting.pending += 1;
                waiting.next_expiry = Some(waiting.next_expiry.map_or(expires, |e| e.min(expires)));
            }
        }
        for connection in fence {
            if let Some(attachment) = volume.attachments.remove(&connection) {
                info!(
                    "volume {volume_id}: client {:?} did not answer within its lease; fenced",
                    attachment.client
                );
                live.sessions.remove(&attachment.session_token);
                live.fenced_tokens.insert(
                    attachment.session_token,
                    (attachment.client.clone(), volume_id),
                );
                if attachment.connected {
                    live.fenced.insert((connection, volume_id));
                }
                waiting.fenced.push(attachment.client);
            }
        }
        if volume.attachments.is_empty() {
            // Keep the live volume (its map channel) while the change runs; `end_change`
            // callers publish into it. Dropped by the next detach/reap.
        }
        waiting
    }

    /// Pushes `Resume` at `epoch` to every connected attachment of the volume.
    pub fn send_resume(&self, volume_id: u64, epoch: u64) {
        let mut live = self.live();
        let live = &mut *live;
        let Some(volume) = live.volumes.get_mut(&volume_id) else {
            return;
        };
        for (connection, attachment) in volume.attachments.iter_mut() {
            attachment.quiesce_sent = None;
            attachment.quiesce_acked = None;
            if let Some(control) = live.controls.get(connection) {
                let _ = control.send(AgentReply::Resume(Resume { volume_id, epoch }));
            }
        }
    }

    /// Pushes `Resume` at the current epoch to this connection's attachment, unless a change
    /// of the volume is in progress (the change resumes it at its end).
    pub fn resume_if_idle(&self, connection: ConnectionId, volume_id: u64) {
        let live = self.live();
        if live.changing.contains(&volume_id) {
            return;
        }
        let Some(volume) = live.volumes.get(&volume_id) else {
            return;
        };
        let epoch = volume.map.borrow().map.epoch;
        if let Some(control) = live.controls.get(&connection) {
            let _ = control.send(AgentReply::Resume(Resume { volume_id, epoch }));
        }
    }

    /// Ends the live attachments of `client` (to `volume_id`, or to every volume), so their
    /// tokens stop working now, not once the kicked connection has closed. Called after the
    /// revocation is committed.
    /// Returns when the last of the ended attachments' leases (plus the in-flight bound)
    /// expires: until then the client's kernel may still write directly.
    pub fn end_attachments(&self, client: &str, volume_id: Option<u64>) -> Option<Instant> {
        let lease = self.lease();
        let mut live = self.live();
        let live = &mut *live;
        let sessions = &mut live.sessions;
        let (fenced, fenced_tokens) = (&mut live.fenced, &mut live.fenced_tokens);
        let mut last_expiry: Option<Instant> = None;
        live.volumes.retain(|id, volume| {
            if volume_id.is_none_or(|v| v == *id) {
                volume.attachments.retain(|connection, attachment| {
                    let keep = attachment.client != client;
                    if !keep {
                        sessions.remove(&attachment.session_token);
                        fenced_tokens.insert(
                            attachment.session_token.clone(),
                            (attachment.client.clone(), *id),
                        );
                        fenced.insert((*connection, *id));
                        let expires = attachment.expires(lease);
                        last_expiry = Some(last_expiry.map_or(expires, |e| e.max(expires)));
                    }
                    keep
                });
            }
            !volume.attachments.is_empty()
        });
        last_expiry
    }

    /// Disconnects every connection of `client` (after removal or a revoked grant).
    pub fn disconnect_client(&self, client: &str) {
        for (name, kick) in self.live().connections.values() {
            if name == client {
                kick.notify_one();
            }
        }
    }

    /// Attaches a connection to a volume under `grant` (as the caller read it), enforcing one
    /// read-write attachment per volume. The store is read under the lock so that a
    /// concurrent grow is never missed, nor a revocation: it commits before it ends the live
    /// attachments under this lock, so the grant is either still current here or the
    /// attachment made here is ended by it.
    pub fn attach(
        &self,
        connection: ConnectionId,
        client: &str,
        volume_id: u64,
        grant: Grant,
        mode: AccessMode,
        session_token: String,
    ) -> ServiceResult<AttachGrant> {
        let mut live = self.live();
        let live = &mut *live;
        if self.store.client(client)?.and_then(|c| c.grant(volume_id)) != Some(grant) {
            return Err(ErrorBody::new(
                ErrorCode::NotGranted,
                "access changed by the administrator",
            ));
        }
        if live.restoring.contains(&volume_id) {
            return Err(ErrorBody::new(
                ErrorCode::Busy,
                "the volume is being restored; attach once the restore is done",
            ));
        }
        let volume = match live.volumes.entry(volume_id) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let record = self.store.volume_by_id(volume_id)?;
                let (sender, _) = watch::channel(PublishedMap::new(self.client_map(&record)?));
                entry.insert(LiveVolume {
                    map: sender,
                    attachments: HashMap::new(),
                })
            }
        };
        if volume.attachments.contains_key(&connection) {
            return Err(ErrorBody::new(
                ErrorCode::Busy,
                "this connection is already attached to the volume",
            ));
        }
        let lease = Duration::from_millis(self.config.lease_ms);
        let now = Instant::now();
        // This client's own attachment left by a closed connection is taken over (the
        // agent reconnected). Another client's expired one is freed, also while its
        // connection is still open: a partitioned or stopped agent keeps its TCP connection
        // but stops renewing, and its kernel stopped I/O when its own lease lapsed. That one
        // is fenced, so its late renewals and server-path I/O are refused.
        let mut taken_over = Vec::new();
        let mut fenced = Vec::new();
        volume.attachments.retain(|connection, a| {
            let keep = if a.client == client {
                a.connected
            } else {
                a.expires(lease) > now
            };
            if !keep {
                taken_over.push(a.session_token.clone());
                if a.connected {
                    fenced.push((*connection, a.client.clone(), a.session_token.clone()));
                }
            }
            keep
        });
        for (fenced_connection, fenced_client, token) in fenced {
            info!("volume {volume_id}: client {fenced_client:?} let its lease expire; fenced");
            live.fenced.insert((fenced_connection, volume_id));
            live.fenced_tokens.insert(token, (fenced_client, volume_id));
        }
        if mode == AccessMode::Rw {
            if let Some(holder) = volume
                .attachments
                .values()
                .find(|a| a.mode == AccessMode::Rw)
            {
                let message = if holder.connected {
                    format!(
                        "volume is already attached read-write by client {:?}",
                        holder.client
                    )
                } else {
                    let left = holder.expires(lease).saturating_duration_since(now);
                    format!(
                        "volume is held read-write by client {:?}, whose connection closed \
                         without a detach; the slot frees when its lease expires, in {} ms",
                        holder.client,
                        left.as_millis()
                    )
                };
                for token in taken_over {
                    live.sessions.remove(&token);
                }
                return Err(ErrorBody::new(ErrorCode::Busy, message));
            }
        }
        for token in taken_over {
            live.sessions.remove(&token);
        }
        let Some(volume) = live.volumes.get_mut(&volume_id) else {
            return Err(ErrorBody::new(ErrorCode::Internal, "live volume vanished"));
        };
        let map = volume.map.borrow().map.clone();
        let updates = volume.map.subscribe();
        live.sessions
            .insert(session_token.clone(), (volume_id, connection));
        let Some(volume) = live.volumes.get_mut(&volume_id) else {
            return Err(ErrorBody::new(ErrorCode::Internal, "live volume vanished"));
        };
        volume.attachments.insert(
            connection,
            Attachment {
                client: client.to_string(),
                mode,
                acked_epoch: map.epoch,
                session_token: session_token.clone(),
                renewed: Instant::now(),
                connected: true,
                quiesce_sent: None,
                quiesce_acked: None,
            },
        );
        // Attached while a change runs: quiesced at once (the push follows the attach
        // answer), so it holds I/O until the change's `Resume` also when the change is past
        // its quiesce step; while the change is still in it, the change waits for this ack.
        if live.changing.contains(&volume_id) {
            if let Some(attachment) = volume.attachments.get_mut(&connection) {
                attachment.quiesce_sent = Some(map.epoch);
            }
            if let Some(control) = live.controls.get(&connection) {
                let _ = control.send(AgentReply::Quiesce(Quiesce {
                    volume_id,
                    epoch: map.epoch,
                }));
            }
        }
        live.fenced.remove(&(connection, volume_id));
        live.fenced_tokens.retain(|token, (owner, volume)| {
            *token != session_token && (owner.as_str(), *volume) != (client, volume_id)
        });
        Ok(AttachGrant { map, updates })
    }

    pub fn detach(&self, connection: ConnectionId, volume_id: u64) -> bool {
        let mut live = self.live();
        let Some(volume) = live.volumes.get_mut(&volume_id) else {
            return false;
        };
        let removed = volume.attachments.remove(&connection);
        if volume.attachments.is_empty() {
            live.volumes.remove(&volume_id);
        }
        match removed {
            Some(attachment) => {
                live.sessions.remove(&attachment.session_token);
                true
            }
            None => false,
        }
    }

    /// Resolves a session token (handed out with a map) for the server I/O path: a live
    /// attachment's token, or a persisted one whose agent was connected when the server last
    /// stopped (a restarted server, before the agent is back), as long as no other client holds
    /// the volume read-write.
    /// `None` once the attachment is detached (or the client removed, its grant changed, the
    /// volume deleted).
    pub fn session(&self, token: &str) -> Option<SessionInfo> {
        {
            let live = self.live();
            if live.fenced_tokens.contains_key(token) {
                return None;
            }
            if let Some(&(volume_id, connection)) = live.sessions.get(token) {
                let volume = live.volumes.get(&volume_id)?;
                let attachment = volume.attachments.get(&connection)?;
                let epoch = volume.map.borrow().map.epoch;
                return Some(SessionInfo {
                    client: attachment.client.clone(),
                    volume_id,
                    mode: attachment.mode,
                    epoch,
                });
            }
        }
        // Checked against the metadata: a token outlives its grant only as a record that a
        // crash kept from being deleted, and such a record is not accepted.
        let (persisted, stored_epoch) = self.store.valid_session(token).ok()??;
        if persisted.agent_gone {
            return None;
        }
        let live_epoch = {
            let live = self.live();
            match live.volumes.get(&persisted.volume_id) {
                Some(volume) => {
                    let taken = volume.attachments.values().any(|a| {
                        a.client != persisted.client
                            && a.mode == AccessMode::Rw
                            && persisted.mode == AccessMode::Rw
                    });
                    if taken {
                        return None;
                    }
                    Some(volume.map.borrow().map.epoch)
                }
                None => None,
            }
        };
        let epoch = live_epoch.unwrap_or(stored_epoch);
        Some(SessionInfo {
            client: persisted.client,
            volume_id: persisted.volume_id,
            mode: persisted.mode,
            epoch,
        })
    }

    /// Persists session records, many attaches sharing one transaction (group commit: one
    /// redb commit per attach would cap the attach rate at the commit rate). Returns once
    /// `sessions` are committed.
    pub async fn persist_sessions(
        self: &Arc<Self>,
        sessions: Vec<SessionRecord>,
    ) -> ServiceResult<()> {
        let mut waiting = Vec::with_capacity(sessions.len());
        {
            let mut pending = self
                .session_commits
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for session in sessions {
                let (sender, receiver) = oneshot::channel();
                pending.push((session, sender));
                waiting.push(receiver);
            }
        }
        {
            // Whoever holds the writer commits everything queued so far: ours, if an earlier
            // writer has not taken it already.
            let _writer = self.session_commits.writer.lock().await;
            let batch = std::mem::take(
                &mut *self
                    .session_commits
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            if !batch.is_empty() {
                let (records, senders): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                let result = blocking(self, move |s| s.store.save_sessions(&records)).await;
                for sender in senders {
                    let _ = sender.send(result.clone());
                }
            }
        }
        for receiver in waiting {
            receiver.await.unwrap_or_else(|_| {
                Err(ErrorBody::new(
                    ErrorCode::Internal,
                    "session writer vanished",
                ))
            })?;
        }
        Ok(())
    }

    /// Whether a live attachment of a connected agent holds `token`.
    pub fn session_is_live(&self, token: &str) -> bool {
        let live = self.live();
        live.sessions
            .get(token)
            .is_some_and(|(volume_id, connection)| {
                live.volumes
                    .get(volume_id)
                    .and_then(|v| v.attachments.get(connection))
                    .is_some_and(|a| a.connected)
            })
    }

    /// The mode of this connection's attachment to the volume, if any.
    /// Whether `client` holds a live read-write attachment of `volume_id` (on any of its
    /// connections).
    pub fn client_attached_rw(&self, client: &str, volume_id: u64) -> bool {
        self.live().volumes.get(&volume_id).is_some_and(|volume| {
            volume
                .attachments
                .values()
                .any(|a| a.client == client && a.mode == AccessMode::Rw && a.connected)
        })
    }

    pub fn attachment_mode(&self, connection: ConnectionId, volume_id: u64) -> Option<AccessMode> {
        self.live()
            .volumes
            .get(&volume_id)?
            .attachments
            .get(&connection)
            .map(|a| a.mode)
    }

    pub fn record_ack(&self, connection: ConnectionId, volume_id: u64, epoch: u64) -> bool {
        let mut live = self.live();
        let Some(volume) = live.volumes.get_mut(&volume_id) else {
            return false;
        };
        // An ack can never be for an epoch that was not published.
        let current = volume.map.borrow().map.epoch;
        let Some(attachment) = volume.attachments.get_mut(&connection) else {
            return false;
        };
        attachment.acked_epoch = attachment.acked_epoch.max(epoch.min(current));
        true
    }

    /// The map clients get for `record`: with the ranges a running relocation copies marked
    /// syncing, so their writes go through the server (see `recovery_gate`).
    pub fn client_map(&self, record: &VolumeRecord) -> ServiceResult<VolumeMap> {
        let mut map = record.map(self.config.lease_ms);
        if let Some(relocation) = self.store.recovery(record.id)? {
            map.syncing = relocation.syncing_ranges(&record.extents);
        }
        // While snapshots are active, each chunk's first write goes through the server,
        // which copies the chunk to every active snapshot's store before writing it, unless
        // the client preserves it itself into each store lacking it, in that store's chunk
        // size: offered (newest snapshot first, then older ones by descending id) while
        // the kernel map can describe every store and no snapshot's chunk is smaller than a
        // block (the map's chunk size, the smallest of them, is then every store's or a
        // divisor of it), none otherwise.
        let snapshots = self.store.snapshots_of(record.id)?;
        let mut active: Vec<&SnapshotRecord> = snapshots
            .iter()
            .filter(|s| s.state == SnapshotState::Active)
            .collect();
        active.sort_by_key(|s| std::cmp::Reverse(s.id));
        let block_size = u32::try_from(map.block_size).unwrap_or(u32::MAX);
        map.copy_on_write = active
            .first()
            .map(|s| s.id)
            .zip(active.iter().map(|s| s.chunk_bytes).min())
            .map(|(generation, chunk_bytes)| {
                // A block holds whole chunks when it is larger: the smallest unit a write
                // covers.
                let chunk_bytes = chunk_bytes.max(block_size);
                let offered = active.len() <= MAX_COW_STORES as usize
                    && active.iter().all(|s| s.chunk_bytes >= block_size);
                let stores = match offered {
                    true => active
                        .iter()
                        .map(|s| CowStoreLocation {
                            snapshot_id: s.id,
                            store_bytes: s.store_bytes,
                            scan_from_sector: self.snapshots.scan_hint(record.id, s.id),
                            chunk_bytes: s.chunk_bytes,
                            extents: s.store_extents.clone(),
                        })
                        .collect(),
                    false => Vec::new(),
                };
                CopyOnWrite {
                    generation,
                    chunk_bytes,
                    stores,
                }
            });
        Ok(map)
    }

    /// Pushes a changed volume to every attached client (no-op if nobody is attached, or if
    /// a newer epoch was already published).
    pub fn publish(&self, record: &VolumeRecord) {
        // Read before the state lock: it is a metadata read.
        let map = match self.client_map(record) {
            Ok(map) => PublishedMap::new(map),
            Err(error) => {
                // Clients keep the old map; a change waiting for their acks fences them
                // after their lease, so none writes around a relocation.
                error!(
                    "volume {}: cannot build the map of epoch {}: {}",
                    record.id, record.epoch, error.message
                );
                return;
            }
        };
        let live = self.live();
        if let Some(volume) = live.volumes.get(&record.id) {
            volume.map.send_if_modified(|current| {
                if map.map.epoch > current.map.epoch {
                    *current = map.clone();
                    true
                } else {
                    false
                }
            });
        }
    }

    /// Attachment count, how many acked `epoch`, and up to `limit` attachments by client name.
    pub fn attachments(
        &self,
        volume_id: u64,
        epoch: u64,
        limit: usize,
    ) -> (usize, usize, Vec<AttachmentInfo>) {
        let live = self.live();
        let Some(volume) = live.volumes.get(&volume_id) else {
            return (0, 0, Vec::new());
        };
        let acked = volume
            .attachments
            .values()
            .filter(|a| a.acked_epoch >= epoch)
            .count();
        let mut list: Vec<AttachmentInfo> = volume
            .attachments
            .values()
            .map(|a| AttachmentInfo {
                client: a.client.clone(),
                mode: a.mode,
                acked_epoch: a.acked_epoch,
                lease_left_ms: u64::try_from(
                    a.expires(self.lease())
                        .saturating_duration_since(Instant::now())
                        .as_millis(),
                )
                .unwrap_or(u64::MAX),
                disconnected: !a.connected,
            })
            .collect();
        list.sort_by(|a, b| a.client.cmp(&b.client));
        list.truncate(limit);
        (volume.attachments.len(), acked, list)
    }

    /// Every live attachment: (client, volume id, mode, ms of lease left, disconnected).
    pub fn all_attachments(&self) -> Vec<(String, u64, AccessMode, u64, bool)> {
        let lease = self.lease();
        let now = Instant::now();
        let live = self.live();
        let mut all: Vec<_> = live
            .volumes
            .iter()
            .flat_map(|(volume_id, volume)| {
                volume.attachments.values().map(move |a| {
                    let left = a.expires(lease).saturating_duration_since(now).as_millis();
                    (
                        a.client.clone(),
                        *volume_id,
                        a.mode,
                        u64::try_from(left).unwrap_or(u64::MAX),
                        !a.connected,
                    )
                })
            })
            .collect();
        all.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        all
    }

    /// Deletes a volume unless it is attached: live, or by a persisted session the metadata
    /// still backs (after a restart, before the agent is back, its kernel's token is still
    /// accepted). `force` fences them instead: the live attachments and their tokens end, and
    /// the commit that deletes the volume also drops every grant on it, which ends the
    /// persisted tokens (`Store::valid_session`). Checked and deleted under the lock, so no
    /// attach can slip in between. A volume with snapshots is refused too; `force` deletes
    /// them with it (and returns them).
    pub fn delete_volume(
        &self,
        volume_id: u64,
        force: bool,
    ) -> ServiceResult<(VolumeRecord, Vec<SnapshotRecord>)> {
        let mut live = self.live();
        let mut holders: Vec<String> = live
            .volumes
            .get(&volume_id)
            .map(|v| v.attachments.values().map(|a| a.client.clone()).collect())
            .unwrap_or_default();
        let persisted = self.store.backed_sessions_of_volume(volume_id)?;
        holders.extend(persisted.into_iter().map(|s| s.client));
        holders.sort();
        holders.dedup();
        if !holders.is_empty() && !force {
            let shown: Vec<String> = holders
                .iter()
                .take(MAX_NAMED_HOLDERS)
                .map(|c| format!("{c:?}"))
                .collect();
            let more = holders.len().saturating_sub(MAX_NAMED_HOLDERS);
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            return Err(ErrorBody::new(
                ErrorCode::Busy,
                format!(
                    "volume is attached by client(s) {}{more} (live, or by a session token \
                     their kernels still hold); detach it there first, or delete with --force \
                     to cut them off",
                    shown.join(", ")
                ),
            ));
        }
        let deleted = self.store.delete_volume(volume_id, force)?;
        // Committed: the persisted tokens are dead; end the live ones before answering.
        if let Some(volume) = live.volumes.remove(&volume_id) {
            for attachment in volume.attachments.values() {
                live.sessions.remove(&attachment.session_token);
            }
        }
        drop(live);
        Ok(deleted)
    }
}

fn fenced_error(volume_id: u64) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Fenced,
        format!(
            "the attachment to volume {volume_id} was fenced (its lease expired while a change \
             waited for it, or it was revoked); stop using the volume and attach again"
        ),
    )
}

/// Runs blocking store work off the async worker threads. The work fails with a store error
/// or already with the wire error; either way the caller gets the wire error.
pub async fn blocking<T: Send + 'static, E: Into<ErrorBody> + Send + 'static>(
    state: &Arc<ServerState>,
    work: impl FnOnce(&ServerState) -> Result<T, E> + Send + 'static,
) -> ServiceResult<T> {
    let state = state.clone();
    match tokio::task::spawn_blocking(move || work(&state)).await {
        Ok(done) => done.map_err(Into::into),
        Err(error) => Err(ErrorBody::new(
            ErrorCode::Internal,
            format!("worker failed: {error}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Flags};
    use crate::store::DeviceRecord;
    use sanblk_proto::map::Layout;

    /// A server state in `dir` with one 1 MiB volume and client host1 granted rw on it.
    fn granted_volume(dir: &std::path::Path) -> (Arc<ServerState>, VolumeRecord, Grant) {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir, &dir.join("secrets.redb")).unwrap_or_else(|e| panic!("{e}"));
        let device = DeviceRecord {
            uuid: uuid::Uuid::new_v4(),
            path: "/dev/null-test".into(),
            size_bytes: 64 << 20,
            data_start: 1 << 20,
            state: "online".into(),
        };
        store.add_device(&device).unwrap_or_else(|e| panic!("{e}"));
        let volume = store
            .create_volume("v", 1 << 20, Layout::Linear)
            .unwrap_or_else(|e| panic!("{e}"));
        let config = Config::from_flags(Flags::default()).unwrap_or_else(|e| panic!("{e}"));
        store
            .add_client("host1", "00")
            .unwrap_or_else(|e| panic!("{e}"));
        let grant = store
            .set_grant("host1", volume.id, Some(AccessMode::Rw))
            .unwrap_or_else(|e| panic!("{e}"))
            .grant(volume.id)
            .unwrap_or_else(|| panic!("no grant"));
        (ServerState::new(store, config), volume, grant)
    }

    #[test]
    fn session_tokens_resolve_while_attached() {
        let dir = std::env::temp_dir().join(format!("sand-state-test-{}", std::process::id()));
        let (state, volume, grant) = granted_volume(&dir);
        let (connection, _) = state.register_connection("host1");
        state
            .attach(
                connection,
                "host1",
                volume.id,
                grant,
                AccessMode::Rw,
                "token-1".into(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let expected = SessionInfo {
            client: "host1".into(),
            volume_id: volume.id,
            mode: AccessMode::Rw,
            epoch: 1,
        };
        assert_eq!(state.session("token-1"), Some(expected));
        assert_eq!(state.session("token-2"), None);
        assert!(state.detach(connection, volume.id));
        assert_eq!(state.session("token-1"), None);
        state
            .attach(
                connection,
                "host1",
                volume.id,
                grant,
                AccessMode::Ro,
                "token-3".into(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        state.unregister_connection(connection);
        // A closed connection's attachment stays (token accepted) until its lease expires.
        assert!(state.session("token-3").is_some());
        assert!(!state.session_is_live("token-3"));
        assert_eq!(state.reap_expired(), 0);
        assert!(state.session("token-3").is_some());
        // An attach that read the grant before a change committed is refused.
        state
            .store
            .set_grant("host1", volume.id, Some(AccessMode::Ro))
            .unwrap_or_else(|e| panic!("{e}"));
        let (connection, _) = state.register_connection("host1");
        let stale = state.attach(
            connection,
            "host1",
            volume.id,
            grant,
            AccessMode::Rw,
            "token-4".into(),
        );
        assert_eq!(stale.err().map(|e| e.code), Some(ErrorCode::NotGranted));
        assert_eq!(state.session("token-4"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fenced_tokens_stay_refused_until_superseded_and_renewals_name_real_epochs() {
        let dir = std::env::temp_dir().join(format!("sand-state-fenced-{}", std::process::id()));
        let (state, volume, grant) = granted_volume(&dir);
        for round in 0..5 {
            let (connection, _) = state.register_connection("host1");
            let token = format!("token-{round}");
            state
                .attach(
                    connection,
                    "host1",
                    volume.id,
                    grant,
                    AccessMode::Rw,
                    token.clone(),
                )
                .unwrap_or_else(|e| panic!("{e}"));
            // An epoch the server never published is refused; the real one renews.
            let refused = state.renew(connection, volume.id, volume.epoch + 1);
            assert_eq!(refused.err().map(|e| e.code), Some(ErrorCode::BadRequest));
            state
                .renew(connection, volume.id, volume.epoch)
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(state.end_attachments("host1", Some(volume.id)).is_some());
            assert_eq!(state.session(&token), None, "fenced token accepted");
            let fenced = state.renew(connection, volume.id, volume.epoch);
            assert_eq!(fenced.err().map(|e| e.code), Some(ErrorCode::Fenced));
            state.unregister_connection(connection);
            // Each new attachment supersedes the fenced token of the same client and volume.
            assert_eq!(state.live().fenced_tokens.len(), 1, "round {round}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_session_saves_are_all_committed() {
        let dir = std::env::temp_dir().join(format!("sand-state-sessions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(&dir, &dir.join("secrets.redb")).unwrap_or_else(|e| panic!("{e}"));
        let config = Config::from_flags(Flags::default()).unwrap_or_else(|e| panic!("{e}"));
        let state = ServerState::new(store, config);
        let mut saves = tokio::task::JoinSet::new();
        for i in 0..200u64 {
            let state = state.clone();
            saves.spawn(async move {
                let session = SessionRecord {
                    token: format!("token-{i}"),
                    client: format!("host{}", i % 20),
                    volume_id: i / 20,
                    mode: AccessMode::Ro,
                    agent_gone: false,
                    grant_id: 0,
                };
                state.persist_sessions(vec![session]).await
            });
        }
        while let Some(saved) = saves.join_next().await {
            saved
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        for i in 0..200u64 {
            let token = format!("token-{i}");
            let saved = state
                .store
                .session(&token)
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(saved.is_some(), "{token} was not persisted");
        }
        let found = state
            .store
            .session_of("host7", 3)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found.map(|s| s.token), Some("token-67".to_string()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
