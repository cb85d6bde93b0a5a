// SPDX-License-Identifier: GPL-2.0

//! The server path's state in a volume: addresses, connection state, the pieces handed to its
//! thread from any context, and the thread itself.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use kernel::prelude::*;
use kernel::sync::Arc;

use crate::abi::{ServerPathState, MAX_SERVERS};
use crate::ffi::kthread::Kthread;
use crate::ffi::sync::{LockClass, WaitQueue};
use crate::piece::{PieceList, PieceRef};

/// The server addresses of a volume, validated (IPv4 bytes in network order, port).
#[derive(Clone, Copy, Default)]
pub(crate) struct ServerAddrs {
    addrs: [([u8; 4], u16); MAX_SERVERS],
    count: usize,
}

impl ServerAddrs {
    /// Appends an address (the caller checked the count against MAX_SERVERS).
    pub(crate) fn push(&mut self, ip: [u8; 4], port: u16) {
        if self.count < MAX_SERVERS {
            self.addrs[self.count] = (ip, port);
            self.count += 1;
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &([u8; 4], u16)> {
        self.addrs[..self.count].iter()
    }
}

/// The server path of one volume.
#[pin_data]
pub(crate) struct ServerPath {
    /// Packed addresses: bit 48 valid, bits 16..48 IPv4 (network order bytes), 0..16 port.
    addrs: [AtomicU64; MAX_SERVERS],
    pub(super) state: AtomicU32,
    pub(super) redirected: AtomicU64,
    pub(super) pending: PieceList,
    thread: Kthread,
    /// Where the thread sleeps when it has nothing to do or waits for a pause to pass; it is
    /// woken by [`ServerPath::queue`], a new token, `close` and `stop`.
    #[pin]
    pub(super) wakeup: WaitQueue,
    pub(super) closing: AtomicBool,
    /// Bumped whenever UPDATE_MAP delivers a new session token: the thread drops its
    /// connection and authenticates again with the new token.
    token_generation: AtomicU64,
}

static WAKEUP_CLASS: LockClass = LockClass::new();

fn pack(ip: [u8; 4], port: u16) -> u64 {
    (1 << 48) | (u64::from(u32::from_be_bytes(ip)) << 16) | u64::from(port)
}

fn unpack(packed: u64) -> Option<([u8; 4], u16)> {
    if packed & (1 << 48) == 0 {
        return None;
    }
    Some((((packed >> 16) as u32).to_be_bytes(), packed as u16))
}

impl ServerPath {
    pub(crate) fn new(addrs: Option<ServerAddrs>) -> impl PinInit<Self> {
        let state = match addrs {
            Some(addrs) if !addrs.is_empty() => ServerPathState::Disconnected,
            _ => ServerPathState::None,
        };
        let packed = addrs.unwrap_or_default();
        pin_init!(ServerPath {
            addrs: core::array::from_fn(|i| {
                AtomicU64::new(if i < packed.count { pack(packed.addrs[i].0, packed.addrs[i].1) } else { 0 })
            }),
            state: AtomicU32::new(state as u32),
            redirected: AtomicU64::new(0),
            pending: PieceList::new(),
            thread: Kthread::new(),
            wakeup <- WaitQueue::new(kernel::c_str!("sanblk_server_wakeup"), &WAKEUP_CLASS),
            closing: AtomicBool::new(false),
            token_generation: AtomicU64::new(0),
        })
    }

    /// Replaces the address list (netlink, process context).
    pub(crate) fn set_addrs(&self, addrs: ServerAddrs) {
        for (i, slot) in self.addrs.iter().enumerate() {
            let value = if i < addrs.count {
                pack(addrs.addrs[i].0, addrs.addrs[i].1)
            } else {
                0
            };
            slot.store(value, Ordering::Release);
        }
        if !addrs.is_empty() {
            let _ = self.state.compare_exchange(
                ServerPathState::None as u32,
                ServerPathState::Disconnected as u32,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    pub(crate) fn addrs(&self) -> ServerAddrs {
        let mut out = ServerAddrs::default();
        for slot in self.addrs.iter() {
            if let Some((ip, port)) = unpack(slot.load(Ordering::Acquire)) {
                out.push(ip, port);
            }
        }
        out
    }

    pub(crate) fn state(&self) -> u32 {
        self.state.load(Ordering::Relaxed)
    }

    pub(crate) fn redirected(&self) -> u64 {
        self.redirected.load(Ordering::Relaxed)
    }

    /// Whether failed direct I/O can be redirected (an address and a running thread).
    pub(crate) fn enabled(&self) -> bool {
        self.thread.is_running() && unpack(self.addrs[0].load(Ordering::Acquire)).is_some()
    }

    /// Starts the volume's thread, `serve(&data)`, named after the volume's `index`.
    pub(crate) fn start<T: Send + Sync>(&self, data: Arc<T>, serve: fn(&T), index: u32) -> Result {
        self.thread.start(data, serve, c"sanblk%u-srv", index)
    }

    /// A new session token is in place (`Volume::set_token`): reconnect with it.
    pub(crate) fn token_changed(&self) {
        self.token_generation.fetch_add(1, Ordering::AcqRel);
        // A refused path gets another chance at once (the thread reconnects when it has I/O).
        let _ = self.state.compare_exchange(
            ServerPathState::Refused as u32,
            ServerPathState::Disconnected as u32,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        self.wake();
    }

    pub(super) fn token_generation(&self) -> u64 {
        self.token_generation.load(Ordering::Acquire)
    }

    /// Marks the volume as going away: disconnected pieces fail instead of waiting.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.wake();
    }

    /// Stops the thread (after the volume's in-flight I/O is done).
    pub(crate) fn stop(&self) {
        self.thread.stop();
    }

    fn wake(&self) {
        self.thread.wake();
    }

    /// Wakes the thread for the volume's upkeep (a lease lapse to report); any context.
    pub(crate) fn kick(&self) {
        self.thread.wake();
    }

    /// Queues `piece` for the thread; callable from any context (hard-IRQ included). Callers
    /// hold an in-flight reference of the volume around it, which keeps the path alive.
    pub(crate) fn queue(&self, piece: PieceRef) {
        self.pending.push(piece);
        self.wake();
    }
}
