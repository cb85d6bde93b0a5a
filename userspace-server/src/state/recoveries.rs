//! Recoveries as the running server sees them: each volume's write gate, and the latest
//! status of every recovery since the server started, with each change broadcast to the
//! agent connections.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use uuid::Uuid;

use sanblk_proto::protocol::RecoveryStatus;

use crate::recovery_gate::VolumeGate;

/// A relocation that found no space when it was due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitingForSpace {
    /// A recovery off a reported-failed device.
    Recovery { device: Uuid, reason: String },
    /// A mirror that runs degraded (its copies on a failed device dropped): a mirror add.
    Remirror,
}

/// Status changes buffered per agent connection; a slower one skips to newer ones.
const RECOVERY_EVENT_BACKLOG: usize = 256;

pub struct Recoveries {
    /// Per-volume write gate (see `recovery_gate`), created on first use.
    gates: Mutex<HashMap<u64, Arc<VolumeGate>>>,
    /// Latest status of every recovery since the server started, by volume id.
    statuses: Mutex<HashMap<u64, RecoveryStatus>>,
    /// Every status change, for the agent connections attached to the volume.
    events: broadcast::Sender<RecoveryStatus>,
    /// What found no space, by volume; started again when a device joins the pool.
    waiting_for_space: Mutex<HashMap<u64, WaitingForSpace>>,
    /// Clients whose direct path to a device failed while the server still read it, by device.
    path_failures: Mutex<HashMap<Uuid, BTreeSet<String>>>,
}

impl Recoveries {
    pub fn new() -> Recoveries {
        Recoveries {
            gates: Mutex::new(HashMap::new()),
            statuses: Mutex::new(HashMap::new()),
            events: broadcast::channel(RECOVERY_EVENT_BACKLOG).0,
            waiting_for_space: Mutex::new(HashMap::new()),
            path_failures: Mutex::new(HashMap::new()),
        }
    }

    fn path_failure_table(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, BTreeSet<String>>> {
        self.path_failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that `client`'s direct path to `device` failed (the server's did not).
    pub fn note_path_failure(&self, device: Uuid, client: String) {
        self.path_failure_table()
            .entry(device)
            .or_default()
            .insert(client);
    }

    /// `client`'s path to `device` works again.
    pub fn clear_path_failure(&self, device: Uuid, client: &str) {
        let mut table = self.path_failure_table();
        if let Some(clients) = table.get_mut(&device) {
            clients.remove(client);
            if clients.is_empty() {
                table.remove(&device);
            }
        }
    }

    /// The device is being recovered: its path failures no longer matter.
    pub fn clear_path_failures(&self, device: Uuid) {
        self.path_failure_table().remove(&device);
    }

    /// Clients whose direct path to `device` failed, by name.
    pub fn path_failures(&self, device: Uuid) -> Vec<String> {
        self.path_failure_table()
            .get(&device)
            .map(|clients| clients.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Remembers a relocation of `volume_id` that could not start for lack of space.
    pub fn wait_for_space(&self, volume_id: u64, waiting: WaitingForSpace) {
        self.waiting_for_space
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(volume_id, waiting);
    }

    /// Takes what waits for space (to try it again).
    pub fn take_waiting_for_space(&self) -> Vec<(u64, WaitingForSpace)> {
        self.waiting_for_space
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect()
    }

    /// The write gate of a volume.
    pub fn gate(&self, volume_id: u64) -> Arc<VolumeGate> {
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(volume_id)
            .or_default()
            .clone()
    }

    /// Records a recovery's status and sends it to the agents attached to its volume.
    pub fn set_status(&self, status: RecoveryStatus) {
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(status.volume_id, status.clone());
        // No receiver (no agent connected) is fine.
        let _ = self.events.send(status);
    }

    pub fn status(&self, volume_id: u64) -> Option<RecoveryStatus> {
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&volume_id)
            .cloned()
    }

    /// Every known status, by volume id.
    pub fn statuses(&self) -> Vec<RecoveryStatus> {
        let mut statuses: Vec<RecoveryStatus> = self
            .statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        statuses.sort_by_key(|s| s.volume_id);
        statuses
    }

    pub fn subscribe(&self) -> broadcast::Receiver<RecoveryStatus> {
        self.events.subscribe()
    }
}
