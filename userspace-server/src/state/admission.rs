//! Admission of connections that have not authenticated yet: a pool of handshake slots per
//! port, and within it at most a configured number per source address, so one host's idle
//! sockets can neither fill a pool nor starve the other port.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use log::{info, warn};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a connection was not admitted to the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address already has the per-peer number of handshakes in progress.
    PeerLimit,
    /// The port's pool is full.
    PoolFull,
}

#[derive(Default)]
struct PeerCount {
    pending: usize,
    /// Connections refused since the address last went over its limit (logged once).
    refused: u64,
}

/// The handshake slots of one port.
pub struct HandshakePool {
    port: &'static str,
    slots: Arc<Semaphore>,
    per_peer: usize,
    peers: Arc<Mutex<HashMap<IpAddr, PeerCount>>>,
}

/// A slot held by one connection until it authenticates or closes.
pub struct HandshakeSlot {
    _slot: OwnedSemaphorePermit,
    peer: IpAddr,
    port: &'static str,
    peers: Arc<Mutex<HashMap<IpAddr, PeerCount>>>,
}

fn lock(
    peers: &Mutex<HashMap<IpAddr, PeerCount>>,
) -> std::sync::MutexGuard<'_, HashMap<IpAddr, PeerCount>> {
    peers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl HandshakePool {
    /// `size` slots for the port named `port` (in log lines), at most `per_peer` of them per
    /// source address.
    pub fn new(port: &'static str, size: usize, per_peer: usize) -> HandshakePool {
        HandshakePool {
            port,
            slots: Arc::new(Semaphore::new(size)),
            per_peer: per_peer.max(1),
            peers: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A slot for a connection from `peer`, or why not. The first refusal of an address over
    /// its limit is logged; the rest are counted and their number logged when the address's
    /// handshakes are over.
    pub fn try_enter(&self, peer: IpAddr) -> Result<HandshakeSlot, Refusal> {
        let mut peers = lock(&self.peers);
        let count = peers.entry(peer).or_default();
        if count.pending >= self.per_peer {
            count.refused += 1;
            if count.refused == 1 {
                warn!(
                    "{} port: {peer} has {} connections in handshake (the per-peer limit); \
                     refusing more from it",
                    self.port, count.pending
                );
            }
            return Err(Refusal::PeerLimit);
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            if count.pending == 0 {
                peers.remove(&peer);
            }
            return Err(Refusal::PoolFull);
        };
        count.pending += 1;
        Ok(HandshakeSlot {
            _slot: slot,
            peer,
            port: self.port,
            peers: self.peers.clone(),
        })
    }

    /// Handshakes in progress from `peer`.
    #[cfg(test)]
    fn pending(&self, peer: IpAddr) -> usize {
        lock(&self.peers)
            .get(&peer)
            .map_or(0, |count| count.pending)
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut peers = lock(&self.peers);
        let Some(count) = peers.get_mut(&self.peer) else {
            return;
        };
        count.pending = count.pending.saturating_sub(1);
        if count.pending == 0 {
            if count.refused > 1 {
                info!(
                    "{} port: refused {} connections from {} over the per-peer handshake limit",
                    self.port, count.refused, self.peer
                );
            }
            peers.remove(&self.peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> IpAddr {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn one_address_gets_its_share_and_others_still_get_in() {
        let pool = HandshakePool::new("agent", 8, 3);
        let (flood, other) = (address("10.0.0.2"), address("10.0.0.3"));
        let held: Vec<_> = (0..3)
            .map(|_| pool.try_enter(flood).unwrap_or_else(|e| panic!("{e:?}")))
            .collect();
        for _ in 0..100 {
            assert_eq!(pool.try_enter(flood).err(), Some(Refusal::PeerLimit));
        }
        assert_eq!(pool.pending(flood), 3);
        let admitted = pool.try_enter(other);
        assert!(admitted.is_ok());
        drop(held);
        assert_eq!(pool.pending(flood), 0);
        assert!(pool.try_enter(flood).is_ok());
    }

    #[test]
    fn a_full_pool_refuses_and_frees_its_slots() {
        let pool = HandshakePool::new("io", 2, 64);
        let first = pool.try_enter(address("10.0.0.1"));
        let second = pool.try_enter(address("10.0.0.2"));
        assert!(first.is_ok() && second.is_ok());
        assert_eq!(
            pool.try_enter(address("10.0.0.3")).err(),
            Some(Refusal::PoolFull)
        );
        assert_eq!(pool.pending(address("10.0.0.3")), 0);
        drop(first);
        assert!(pool.try_enter(address("10.0.0.3")).is_ok());
    }
}
