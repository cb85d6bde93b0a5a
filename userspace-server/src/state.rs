//! Shared server state: the metadata store plus the live attachments and the current map of
//! every attached volume (a `watch` channel per volume, which is how changes reach clients).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{watch, Notify, Semaphore};

use crate::config::Config;
use crate::map::{AccessMode, VolumeMap};
use crate::protocol::{encode_frame, AttachmentInfo, ErrorBody, ErrorCode};
use crate::store::{Store, StoreResult, VolumeRecord};

pub type ConnectionId = u64;

struct Attachment {
    client: String,
    mode: AccessMode,
    acked_epoch: u64,
    #[allow(dead_code)] // read by the server I/O path (later issue)
    session_token: String,
}

/// A map as published to attached clients, with its `map_update` frame encoded once (not once
/// per client: with thousands of clients the encoding dominated the push time).
pub struct PublishedMap {
    pub map: VolumeMap,
    pub update_frame: Vec<u8>,
}

impl PublishedMap {
    pub fn new(map: VolumeMap) -> Arc<PublishedMap> {
        // Same JSON as `AgentReply::MapUpdate { map }`, built from a reference. Encoding fails
        // only beyond the frame limit, which the allocator's extent counts stay far below; an
        // empty frame is then not sent (the client still gets the map on its next attach).
        let update = serde_json::json!({ "type": "map_update", "map": &map });
        let update_frame = encode_frame(&update).unwrap_or_default();
        Arc::new(PublishedMap { map, update_frame })
    }
}

struct LiveVolume {
    map: watch::Sender<Arc<PublishedMap>>,
    attachments: HashMap<ConnectionId, Attachment>,
}

#[derive(Default)]
struct Live {
    volumes: HashMap<u64, LiveVolume>,
    /// Authenticated connections: client name and a handle to disconnect them.
    connections: HashMap<ConnectionId, (String, Arc<Notify>)>,
}

/// Connections allowed to be in the handshake at once.
pub const MAX_PENDING_HANDSHAKES: usize = 4096;

pub struct ServerState {
    pub store: Store,
    pub config: Config,
    pub handshake_slots: Arc<Semaphore>,
    live: Mutex<Live>,
    next_connection_id: AtomicU64,
}

/// What a successful attach hands the connection.
pub struct AttachGrant {
    pub map: VolumeMap,
    pub updates: watch::Receiver<Arc<PublishedMap>>,
}

impl ServerState {
    pub fn new(store: Store, config: Config) -> Arc<ServerState> {
        Arc::new(ServerState {
            store,
            config,
            handshake_slots: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
            live: Mutex::new(Live::default()),
            next_connection_id: AtomicU64::new(1),
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
        let id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        let kick = Arc::new(Notify::new());
        self.live()
            .connections
            .insert(id, (client.to_string(), kick.clone()));
        (id, kick)
    }

    /// Drops every attachment of a closing connection.
    pub fn unregister_connection(&self, connection: ConnectionId) {
        let mut live = self.live();
        live.connections.remove(&connection);
        live.volumes.retain(|_, volume| {
            volume.attachments.remove(&connection);
            !volume.attachments.is_empty()
        });
    }

    /// Disconnects every connection of `client` (after removal or a revoked grant).
    pub fn disconnect_client(&self, client: &str) {
        for (name, kick) in self.live().connections.values() {
            if name == client {
                kick.notify_one();
            }
        }
    }

    /// Attaches a connection to a volume, enforcing one read-write attachment per volume.
    /// The store is read under the lock so that a concurrent grow is never missed.
    pub fn attach(
        &self,
        connection: ConnectionId,
        client: &str,
        volume_id: u64,
        mode: AccessMode,
        session_token: String,
    ) -> StoreResult<AttachGrant> {
        let mut live = self.live();
        let volume = match live.volumes.entry(volume_id) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let record = self.store.volume_by_id(volume_id)?;
                let (sender, _) =
                    watch::channel(PublishedMap::new(record.map(self.config.lease_ms)));
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
        if mode == AccessMode::Rw {
            if let Some(holder) = volume
                .attachments
                .values()
                .find(|a| a.mode == AccessMode::Rw)
            {
                return Err(ErrorBody::new(
                    ErrorCode::Busy,
                    format!(
                        "volume is already attached read-write by client {:?}",
                        holder.client
                    ),
                ));
            }
        }
        let map = volume.map.borrow().map.clone();
        volume.attachments.insert(
            connection,
            Attachment {
                client: client.to_string(),
                mode,
                acked_epoch: map.epoch,
                session_token,
            },
        );
        Ok(AttachGrant {
            map,
            updates: volume.map.subscribe(),
        })
    }

    pub fn detach(&self, connection: ConnectionId, volume_id: u64) -> bool {
        let mut live = self.live();
        let Some(volume) = live.volumes.get_mut(&volume_id) else {
            return false;
        };
        let removed = volume.attachments.remove(&connection).is_some();
        if volume.attachments.is_empty() {
            live.volumes.remove(&volume_id);
        }
        removed
    }

    /// The mode of this connection's attachment to the volume, if any.
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
        let Some(attachment) = live
            .volumes
            .get_mut(&volume_id)
            .and_then(|v| v.attachments.get_mut(&connection))
        else {
            return false;
        };
        attachment.acked_epoch = attachment.acked_epoch.max(epoch);
        true
    }

    /// Pushes a changed volume to every attached client (no-op if nobody is attached, or if
    /// a newer epoch was already published).
    pub fn publish(&self, record: &VolumeRecord) {
        let live = self.live();
        if let Some(volume) = live.volumes.get(&record.id) {
            let map = PublishedMap::new(record.map(self.config.lease_ms));
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
            })
            .collect();
        list.sort_by(|a, b| a.client.cmp(&b.client));
        list.truncate(limit);
        (volume.attachments.len(), acked, list)
    }

    /// Deletes a volume unless someone is attached (checked and deleted under the lock, so no
    /// attach can slip in between).
    pub fn delete_volume(&self, volume_id: u64) -> StoreResult<VolumeRecord> {
        let live = self.live();
        if let Some(volume) = live.volumes.get(&volume_id) {
            if !volume.attachments.is_empty() {
                return Err(ErrorBody::new(
                    ErrorCode::Busy,
                    format!(
                        "volume is attached by {} client(s); detach them first",
                        volume.attachments.len()
                    ),
                ));
            }
        }
        let deleted = self.store.delete_volume(volume_id);
        drop(live);
        deleted
    }
}

/// Runs blocking store work off the async worker threads.
pub async fn blocking<T: Send + 'static>(
    state: &Arc<ServerState>,
    work: impl FnOnce(&ServerState) -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || work(&state))
        .await
        .unwrap_or_else(|e| {
            Err(ErrorBody::new(
                ErrorCode::Internal,
                format!("worker failed: {e}"),
            ))
        })
}
