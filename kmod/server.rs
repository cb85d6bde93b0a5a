// SPDX-License-Identifier: GPL-2.0

//! The server path (second data path): a per-volume kernel thread owning a TCP connection to
//! `sand`'s I/O service. Direct pieces that fail (or whose device is already marked failed)
//! are queued here from any context (lock-free llist, then a wake-up) and re-issued to the
//! server, which performs them on its own path to the SAN devices.
//!
//! Delivered shape: **continuous pipelining in one thread**, like nbd's stream of requests
//! but without a second thread: the thread keeps up to [`MAX_IN_FLIGHT`] requests (at most
//! [`WINDOW_BYTES`] of payload) on the wire, each request sent as soon as it is queued. It
//! never blocks in a receive: when the socket is readable it takes every reply byte there
//! through the socket's `read_sock` (as nvme-tcp and iscsi do: one socket lock per batch,
//! READ data copied from the received buffers straight into the bio pages), matching each
//! reply by handle against the requests on the wire (an unknown or repeated handle is a
//! protocol error that drops the connection) and completing its piece at once; a reply cut
//! between two reads waits in a cursor. Between reads it sleeps on the socket's wait queue,
//! woken by arriving replies (low-water mark: the rest of the reply under way, up to
//! [`WAKE_BYTES`]) or by newly queued pieces, which go out at once. The bound stays below the
//! server's own per-connection limit, so the server always reads every request sent and
//! neither side can block the other. A piece larger than one frame ([`MAX_PAYLOAD`]) goes alone, in
//! sequential chunks, once the wire is empty.
//!
//! Reconnection: 100 ms doubling to 5 s, trying every address in order; the requests a
//! connection loss left on the wire are re-sent after reconnecting (none of them has
//! completed upward yet, and reads and writes of a block device are idempotent).
//! A new session token (UPDATE_MAP with TOKEN, after the agent reconnected to the server)
//! drops the connection once the requests on the wire are answered and authenticates again with it; pieces still
//! queued go out on the new connection.
//!
//! The thread also drives fail-back probes of failed devices (`health.rs`).
//!
//! Failure policy (the I/O never hangs forever):
//! - the server refuses the session token (HELLO status != 0): state `Refused`, every queued
//!   piece fails with an I/O error; retries continue with backoff;
//! - no server reachable for [`NO_PATH_TIMEOUT_NS`]: queued pieces fail with an I/O error;
//! - a reply with an error status fails the piece, except -ESTALE (the server has a newer
//!   epoch): the piece is re-sent with the volume's current epoch, after a short pause while
//!   the new map has not arrived yet (bounded, see [`STALE_RETRIES`]);
//! - teardown (`Volume::remove_disk`) sets `closing`: while disconnected, queued pieces fail
//!   at once; while connected they complete, each bounded by [`IO_TIMEOUT_MS`].

use core::ffi::{c_int, c_void};
use kernel::ffi::c_long;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use kernel::bindings;
use kernel::prelude::*;
use kernel::types::Opaque;

use crate::abi::{DeviceState, EventKind, ServerPathState, MAX_SERVERS};
use crate::health;
use crate::abi_frame::{Op, ReplyHeader, RequestHeader, MAX_PAYLOAD, REPLY_HEADER_LEN, REQUEST_HEADER_LEN};
use crate::volume::Volume;

/// Socket send/receive timeout; a request not answered within it counts as a lost connection.
const IO_TIMEOUT_MS: u32 = 30_000;
/// Bound on connecting and on the HELLO exchange, so an unreachable address fails over fast.
const CONNECT_TIMEOUT_MS: u32 = 5_000;
/// Queued pieces fail once no server has been reachable for this long.
const NO_PATH_TIMEOUT_NS: i64 = 30_000_000_000;
const BACKOFF_MIN_MS: u32 = 100;
const BACKOFF_MAX_MS: u32 = 5_000;
/// Attempts of one piece that the server answers with -ESTALE. The server refuses the old
/// epoch as soon as it commits a new map, but the map reaches this module only after the agent
/// relays it (tens to hundreds of milliseconds): a piece whose map has not changed yet is
/// re-sent after [`STALE_PAUSE_MS`], so this bounds the wait for the new map to about 20 s.
const STALE_RETRIES: u8 = 200;
/// Pause before re-sending pieces refused with -ESTALE while the map is still the old one.
const STALE_PAUSE_MS: u32 = 100;
/// Requests in flight at once on the connection (the server executes up to 64 concurrently).
const MAX_IN_FLIGHT: usize = 32;
/// How often a busy stream reports newly failed devices and drives fail-back probes.
const UPKEEP_INTERVAL_NS: i64 = 100_000_000;
/// Payload bytes on the wire at once (bounds what the server buffers for this client; room for
/// a queue of 8 x 1 MiB reads or writes at once, as nbd has).
const WINDOW_BYTES: u64 = 16 << 20;
/// Most reply bytes the thread waits for before reading (socket low-water mark).
const WAKE_BYTES: usize = 32 << 10;

const BLK_STS_IOERR: bindings::blk_status_t = 10;
/// poll(2) bits meaning "a read will not block": data, hang-up or error.
const POLL_READABLE: u32 = 0x1 | 0x8 | 0x10 | 0x2000;
const IPPROTO_TCP: c_int = 6;
const ESTALE: i32 = 116;

extern "C" {
    fn sanblk_init_net() -> *mut bindings::net;
    // `struct socket` as an opaque pointer: bindgen's layout is not FFI-safe by rustc's lints.
    fn sanblk_sock_set_timeouts(sock: *mut c_void, timeout: c_long);
    fn sanblk_sock_nodelay(sock: *mut c_void);
    fn sanblk_sock_poll(sock: *mut c_void) -> u32;
    fn sanblk_sock_wait_head(sock: *mut c_void) -> *mut bindings::wait_queue_head;
    fn sanblk_wait_entry_init(entry: *mut bindings::wait_queue_entry);
    fn sanblk_sock_quickack(sock: *mut c_void);
    fn sanblk_lock_sock(sock: *mut c_void);
    fn sanblk_release_sock(sock: *mut c_void);
    fn sanblk_sock_set_rcvlowat(sock: *mut c_void, bytes: c_int) -> c_int;
    fn sanblk_sock_read(
        sock: *mut c_void,
        desc: *mut bindings::read_descriptor_t,
        actor: bindings::sk_read_actor_t,
    ) -> c_int;
    fn sanblk_llist_add(node: *mut bindings::llist_node, head: *mut bindings::llist_head) -> bool;
    fn sanblk_llist_del_all(head: *mut bindings::llist_head) -> *mut bindings::llist_node;
    fn sanblk_set_current_interruptible();
    fn sanblk_set_current_running();
}

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

/// Per-piece context, reserved in front of every bio of the volume's bioset (front_pad) and
/// at the head of every in-place context, so handing a failed piece to the server path needs
/// no allocation in completion context.
#[repr(C)]
pub(crate) struct Piece {
    node: bindings::llist_node,
    /// The bio this piece completes into (its clone holds one `bi_remaining` count).
    pub(crate) parent: *mut bindings::bio,
    pub(crate) volume_offset: u64,
    pub(crate) epoch: u64,
    /// The clone's iterator at submission: position in `bvecs` and length.
    pub(crate) iter: bindings::bvec_iter,
    pub(crate) bvecs: *mut bindings::bio_vec,
    /// Frame op, or 0 when the piece cannot go to the server (discard, write zeroes).
    pub(crate) op: u8,
    pub(crate) flags: u8,
    /// Times the server answered -ESTALE (the piece is re-sent with the current epoch).
    pub(crate) stale_retries: u8,
    /// Where the piece lives, which decides how it is released once complete.
    pub(crate) owner: PieceOwner,
}

/// Where a [`Piece`] lives.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum PieceOwner {
    /// In front of a clone from the volume's bioset; `parent` is the bio it was cloned from.
    Clone,
    /// In the context of a bio remapped in place (`hook::HookedBio`); `parent` is that bio.
    InPlace,
}

/// Bytes reserved in front of each bio of the bioset (keeps the bio 8-byte aligned).
pub(crate) const FRONT_PAD: u32 = ((core::mem::size_of::<Piece>() + 7) & !7) as u32;

impl Piece {
    /// The context of `bio`, a bio allocated from a volume's bioset.
    ///
    /// # Safety
    ///
    /// `bio` must come from a bioset initialised with [`FRONT_PAD`] and be live.
    pub(crate) unsafe fn of(bio: *mut bindings::bio) -> *mut Piece {
        // SAFETY: bioset allocations put FRONT_PAD bytes right before the bio (contract).
        unsafe { bio.cast::<u8>().sub(FRONT_PAD as usize).cast::<Piece>() }
    }

    /// An iterator over bytes `off..off + len` of the piece's pages: the source of a WRITE's
    /// data (`write`) or the destination of a READ's.
    ///
    /// # Safety
    ///
    /// The piece describes a live bio whose pages cover its iterator, and `off + len` is
    /// within it.
    unsafe fn pages(&self, off: u32, len: u32, write: bool) -> bindings::iov_iter {
        let iter = self.iter;
        let needed = iter.bi_bvec_done as usize + iter.bi_size as usize;
        // SAFETY: the bvecs from bi_idx on cover bi_bvec_done + bi_size bytes (bio invariant).
        let first = unsafe { self.bvecs.add(iter.bi_idx as usize) };
        let mut segments = 0usize;
        let mut covered = 0usize;
        while covered < needed {
            // SAFETY: within the covered range of the vector (see above).
            covered += unsafe { (*first.add(segments)).bv_len } as usize;
            segments += 1;
        }
        // SAFETY: an all-zero iov_iter is initialised by iov_iter_bvec below.
        let mut it: bindings::iov_iter = unsafe { core::mem::zeroed() };
        let start = iter.bi_bvec_done as usize + off as usize;
        let direction = if write { bindings::ITER_SOURCE } else { bindings::ITER_DEST };
        // SAFETY: `first[..segments]` is valid; the count stays within the piece.
        unsafe {
            bindings::iov_iter_bvec(&mut it, direction, first, segments as _, start + len as usize);
            bindings::iov_iter_advance(&mut it, start);
        }
        it
    }

    /// The bio this context belongs to.
    fn bio(this: *mut Piece) -> *mut bindings::bio {
        // SAFETY: pointer arithmetic within the same bioset allocation (inverse of `of`).
        unsafe { this.cast::<u8>().add(FRONT_PAD as usize).cast::<bindings::bio>() }
    }
}

/// The server path of one volume.
pub(crate) struct ServerPath {
    /// Packed addresses: bit 48 valid, bits 16..48 IPv4 (network order bytes), 0..16 port.
    addrs: [AtomicU64; MAX_SERVERS],
    state: AtomicU32,
    redirected: AtomicU64,
    pending: Opaque<bindings::llist_head>,
    task: AtomicPtr<bindings::task_struct>,
    closing: AtomicBool,
    /// Bumped whenever UPDATE_MAP delivers a new session token: the thread drops its
    /// connection and authenticates again with the new token.
    token_generation: AtomicU64,
}

// SAFETY: `pending` is only touched through the lock-free llist primitives, the rest is atomic.
unsafe impl Sync for ServerPath {}
// SAFETY: see `Sync`.
unsafe impl Send for ServerPath {}

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
    pub(crate) fn new(addrs: Option<ServerAddrs>) -> Self {
        let path = ServerPath {
            addrs: [const { AtomicU64::new(0) }; MAX_SERVERS],
            state: AtomicU32::new(ServerPathState::None as u32),
            redirected: AtomicU64::new(0),
            pending: Opaque::new(bindings::llist_head { first: core::ptr::null_mut() }),
            task: AtomicPtr::new(core::ptr::null_mut()),
            closing: AtomicBool::new(false),
            token_generation: AtomicU64::new(0),
        };
        if let Some(addrs) = addrs {
            path.set_addrs(addrs);
        }
        path
    }

    /// Replaces the address list (netlink, process context).
    pub(crate) fn set_addrs(&self, addrs: ServerAddrs) {
        for (i, slot) in self.addrs.iter().enumerate() {
            let value = if i < addrs.count { pack(addrs.addrs[i].0, addrs.addrs[i].1) } else { 0 };
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
        !self.task.load(Ordering::Acquire).is_null() && unpack(self.addrs[0].load(Ordering::Acquire)).is_some()
    }

    /// Starts the volume's thread.
    ///
    /// # Safety
    ///
    /// `volume` owns this path and stays alive until [`ServerPath::stop`] has returned.
    pub(crate) unsafe fn start(&self, volume: *const Volume, index: u32) -> Result {
        // SAFETY: the thread function matches the kthread signature; `volume` outlives the
        // thread (contract); the format takes one unsigned int.
        let task = kernel::error::from_err_ptr(unsafe {
            bindings::kthread_create_on_node(
                Some(thread_main),
                volume as *mut c_void,
                bindings::NUMA_NO_NODE,
                c"sanblk%u-srv".as_ptr().cast(),
                index as core::ffi::c_uint,
            )
        })?;
        self.task.store(task, Ordering::Release);
        // SAFETY: `task` was just created and not yet stopped.
        unsafe { bindings::wake_up_process(task) };
        Ok(())
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

    fn token_generation(&self) -> u64 {
        self.token_generation.load(Ordering::Acquire)
    }

    /// Marks the volume as going away: disconnected pieces fail instead of waiting.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.wake();
    }

    /// Stops the thread (after the volume's in-flight count reached zero).
    pub(crate) fn stop(&self) {
        let task = self.task.swap(core::ptr::null_mut(), Ordering::AcqRel);
        if !task.is_null() {
            // SAFETY: `task` is our kthread, which only exits when asked to by kthread_stop.
            unsafe { bindings::kthread_stop(task) };
        }
    }

    fn wake(&self) {
        let task = self.task.load(Ordering::Acquire);
        if !task.is_null() {
            // SAFETY: the task is alive until `stop`, which runs only when nothing is in
            // flight (callers hold an in-flight count while waking).
            unsafe { bindings::wake_up_process(task) };
        }
    }

    /// Queues `piece` for the thread; callable from any context (hardirq included).
    ///
    /// # Safety
    ///
    /// `piece` is the context of a live clone whose completion the caller owns; the caller
    /// holds an in-flight count of the volume until this returns.
    pub(crate) unsafe fn queue(&self, piece: *mut Piece) {
        // SAFETY: `pending` is a valid llist head; the node belongs to the piece, which is not
        // on any list.
        unsafe { sanblk_llist_add(core::ptr::addr_of_mut!((*piece).node), self.pending.get()) };
        self.wake();
    }
}

/// A connected, authenticated socket; released on drop.
struct Conn(*mut bindings::socket);

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: created by sock_create_kern and released once.
        unsafe { bindings::sock_release(self.0) };
    }
}

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

enum ConnectError {
    /// The server refused the token.
    Refused,
    /// Unreachable, timed out, or a protocol error.
    Failed,
}

fn msecs_to_jiffies(ms: u32) -> c_long {
    // SAFETY: pure conversion function.
    unsafe { bindings::__msecs_to_jiffies(ms) as c_long }
}

fn nsecs_to_jiffies(ns: i64) -> c_long {
    // At least one jiffy, at most the I/O timeout.
    let ms = (ns / 1_000_000).clamp(1, i64::from(IO_TIMEOUT_MS)) as u32;
    msecs_to_jiffies(ms)
}

fn now_ns() -> i64 {
    // SAFETY: reads the monotonic clock.
    unsafe { bindings::ktime_get() }
}

fn should_stop() -> bool {
    // SAFETY: called from our kthread.
    unsafe { bindings::kthread_should_stop() }
}

impl Conn {
    fn send(&self, bytes: &[u8]) -> core::result::Result<(), ()> {
        self.send_flags(bytes, false)
    }

    /// Sends `bytes`; `more` tells TCP a payload follows (one segment for header + data, which
    /// matters behind proxies that forward each read separately).
    fn send_flags(&self, bytes: &[u8], more: bool) -> core::result::Result<(), ()> {
        let mut vec = bindings::kvec { iov_base: bytes.as_ptr() as *mut c_void, iov_len: bytes.len() };
        // SAFETY: an all-zero msghdr is a valid "no name, no control" header.
        let mut msg: bindings::msghdr = unsafe { core::mem::zeroed() };
        msg.msg_flags = bindings::MSG_NOSIGNAL | if more { bindings::MSG_MORE } else { 0 };
        // SAFETY: the socket is connected; `vec` describes `bytes`, live for the call.
        let ret = unsafe { bindings::kernel_sendmsg(self.0, &mut msg, &mut vec, 1, bytes.len()) };
        if ret == bytes.len() as c_int { Ok(()) } else { Err(()) }
    }

    /// Asks TCP to acknowledge at once (delayed ACKs stall a request/reply protocol behind a
    /// peer or proxy that uses Nagle).
    fn quickack(&self) {
        // SAFETY: `self.0` is a live, connected TCP socket.
        unsafe { sanblk_sock_quickack(self.0.cast()) };
    }

    /// Whether a read would not block (a reply is arriving, or the connection failed).
    fn readable(&self) -> bool {
        // SAFETY: the socket is live and connected; a NULL file and poll table only query.
        unsafe { sanblk_sock_poll(self.0.cast()) & POLL_READABLE != 0 }
    }

    /// Sleeps until the socket is readable or new pieces are queued for the thread; `false`
    /// when neither happened by `deadline_ns`. The thread is on the socket's wait queue (as
    /// poll(2) would be) and is woken directly by `ServerPath::queue`.
    fn wait_for_input(&self, path: &ServerPath, deadline_ns: i64) -> bool {
        // SAFETY: an all-zero entry is what init_waitqueue_entry starts from.
        let mut entry: bindings::wait_queue_entry = unsafe { core::mem::zeroed() };
        // SAFETY: the entry outlives its time on the socket's wait queue (removed below);
        // the head lives as long as the socket.
        let head = unsafe {
            sanblk_wait_entry_init(&mut entry);
            let head = sanblk_sock_wait_head(self.0.cast());
            bindings::add_wait_queue(head, &mut entry);
            head
        };
        let woken = loop {
            // SAFETY: state set before the checks, so a wake-up in between is not lost.
            unsafe { sanblk_set_current_interruptible() };
            // SAFETY: `pending` is a valid llist head.
            if self.readable() || !unsafe { (*path.pending.get()).first.is_null() } {
                break true;
            }
            let left = deadline_ns - now_ns();
            if left <= 0 {
                break false;
            }
            // SAFETY: process context (our kthread), no locks held.
            unsafe { bindings::schedule_timeout(nsecs_to_jiffies(left)) };
        };
        // SAFETY: undoes the state and the wait queue entry set up above.
        unsafe {
            sanblk_set_current_running();
            bindings::remove_wait_queue(head, &mut entry);
        }
        woken
    }

    fn recv(&self, bytes: &mut [u8]) -> core::result::Result<(), ()> {
        self.quickack();
        let mut vec = bindings::kvec { iov_base: bytes.as_mut_ptr().cast(), iov_len: bytes.len() };
        // SAFETY: as in `send`.
        let mut msg: bindings::msghdr = unsafe { core::mem::zeroed() };
        // SAFETY: the socket is connected; `vec` describes `bytes`, live for the call.
        let ret = unsafe {
            bindings::kernel_recvmsg(self.0, &mut msg, &mut vec, 1, bytes.len(), bindings::MSG_WAITALL as c_int)
        };
        if ret == bytes.len() as c_int { Ok(()) } else { Err(()) }
    }

    /// Sends (`write`) or receives into the bio pages of `piece`, bytes `off..off + len`.
    ///
    /// # Safety
    ///
    /// `piece` describes a live bio whose pages cover its iterator.
    unsafe fn transfer_pages(&self, piece: &Piece, off: u32, len: u32, write: bool) -> core::result::Result<(), ()> {
        // SAFETY: contract of this function.
        let it = unsafe { piece.pages(off, len, write) };
        // SAFETY: as in `send`.
        let mut msg: bindings::msghdr = unsafe { core::mem::zeroed() };
        msg.msg_iter = it;
        let ret = if write {
            msg.msg_flags = bindings::MSG_NOSIGNAL;
            // SAFETY: connected socket; the iterator describes live pages of the bio.
            unsafe { bindings::sock_sendmsg(self.0, &mut msg) }
        } else {
            self.quickack();
            // SAFETY: as above; the pages are the bio's destination pages.
            unsafe { bindings::sock_recvmsg(self.0, &mut msg, bindings::MSG_WAITALL as c_int) }
        };
        if ret == len as c_int { Ok(()) } else { Err(()) }
    }

    fn connect(ip: [u8; 4], port: u16, volume: &Volume) -> core::result::Result<Conn, ConnectError> {
        let mut sock: *mut bindings::socket = core::ptr::null_mut();
        // SAFETY: creates a kernel TCP socket in init_net; `sock` receives it.
        let ret = unsafe {
            bindings::sock_create_kern(
                sanblk_init_net(),
                bindings::AF_INET as c_int,
                bindings::sock_type_SOCK_STREAM as c_int,
                IPPROTO_TCP,
                &mut sock,
            )
        };
        if ret < 0 || sock.is_null() {
            return Err(ConnectError::Failed);
        }
        let conn = Conn(sock);
        // SAFETY: `sock` is a live socket with its sock attached.
        unsafe { sanblk_sock_set_timeouts(sock.cast(), msecs_to_jiffies(CONNECT_TIMEOUT_MS)) };
        let mut addr = SockaddrIn { family: bindings::AF_INET as u16, port_be: port.to_be(), addr: ip, zero: [0; 8] };
        // SAFETY: `addr` is a sockaddr_in of the right size, live for the call.
        let ret = unsafe {
            bindings::kernel_connect(
                sock,
                core::ptr::addr_of_mut!(addr).cast(),
                core::mem::size_of::<SockaddrIn>() as c_int,
                0,
            )
        };
        if ret < 0 {
            return Err(ConnectError::Failed);
        }
        // SAFETY: connected TCP socket.
        unsafe { sanblk_sock_nodelay(sock.cast()) };
        let session = volume.session_token();
        let token = session.bytes();
        let header = RequestHeader {
            op: Op::Hello,
            flags: 0,
            handle: 0,
            volume_id: volume.id,
            epoch: volume.current_map().epoch,
            offset: 0,
            length: token.len() as u32,
        };
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        header.encode(&mut raw);
        conn.send(&raw).map_err(|_| ConnectError::Failed)?;
        conn.send(token).map_err(|_| ConnectError::Failed)?;
        let mut reply = [0u8; REPLY_HEADER_LEN];
        conn.recv(&mut reply).map_err(|_| ConnectError::Failed)?;
        let reply = ReplyHeader::decode(&reply).map_err(|_| ConnectError::Failed)?;
        if reply.handle != 0 || reply.length != 0 {
            return Err(ConnectError::Failed);
        }
        if reply.status != 0 {
            return Err(ConnectError::Refused);
        }
        // SAFETY: `sock` is a live socket with its sock attached.
        unsafe { sanblk_sock_set_timeouts(sock.cast(), msecs_to_jiffies(IO_TIMEOUT_MS)) };
        Ok(conn)
    }

    /// Performs `piece` on the server; `Ok(status)` is the server's answer (0 or -errno),
    /// `Err` a lost connection (the piece is to be re-sent).
    ///
    /// # Safety
    ///
    /// `piece` describes a live, queued piece of `volume`.
    unsafe fn execute(&self, volume: &Volume, piece: &Piece, handle: &mut u64) -> core::result::Result<i32, ()> {
        let Some(op) = frame_op(piece) else {
            return Ok(-(bindings::EOPNOTSUPP as i32));
        };
        let total = frame_len(piece, op);
        let mut done = 0u32;
        loop {
            let len = (total - done).min(MAX_PAYLOAD);
            *handle = handle.wrapping_add(1);
            // SAFETY: the piece is live until it completes (contract).
            unsafe { self.send_request(volume, piece, op, *handle, done, len)? };
            let mut reply = [0u8; REPLY_HEADER_LEN];
            self.recv(&mut reply)?;
            let reply = ReplyHeader::decode(&reply).map_err(|_| ())?;
            // Sequential: the only valid answer is the one to the request just sent.
            if reply.handle != *handle {
                return Err(());
            }
            if reply.status != 0 {
                return Ok(reply.status);
            }
            let expected = if op == Op::Read { len } else { 0 };
            if reply.length != expected {
                return Err(());
            }
            if op == Op::Read {
                // SAFETY: as above; READ data lands in the bio's pages.
                unsafe { self.transfer_pages(piece, done, len, false)? };
            }
            done += len;
            if done >= total {
                return Ok(0);
            }
        }
    }
}

fn frame_op(piece: &Piece) -> Option<Op> {
    match piece.op {
        2 => Some(Op::Read),
        3 => Some(Op::Write),
        4 => Some(Op::Flush),
        _ => None,
    }
}

fn frame_len(piece: &Piece, op: Op) -> u32 {
    if op == Op::Flush {
        0
    } else {
        piece.iter.bi_size
    }
}

/// Requests on the wire, matched to replies by handle (never trusted as a pointer).
struct InFlight {
    slots: [(u64, *mut Piece); MAX_IN_FLIGHT],
    count: usize,
    bytes: u64,
}

impl InFlight {
    fn new() -> Self {
        InFlight { slots: [(0, core::ptr::null_mut()); MAX_IN_FLIGHT], count: 0, bytes: 0 }
    }

    fn add(&mut self, handle: u64, piece: *mut Piece, bytes: u64) {
        self.slots[self.count] = (handle, piece);
        self.count += 1;
        self.bytes += bytes;
    }

    /// The piece of the request `handle`, left on the wire list.
    fn find(&self, handle: u64) -> Option<*mut Piece> {
        self.slots[..self.count].iter().find(|(h, _)| *h == handle).map(|(_, piece)| *piece)
    }

    /// Takes the request answered by `handle` off the wire list.
    fn remove(&mut self, handle: u64) -> Option<*mut Piece> {
        let i = self.slots[..self.count].iter().position(|(h, _)| *h == handle)?;
        let piece = self.slots[i].1;
        self.count -= 1;
        self.slots[i] = self.slots[self.count];
        // SAFETY: pieces on the wire are live and ours.
        self.bytes -= u64::from(unsafe { (*piece).iter.bi_size });
        Some(piece)
    }

    /// After a lost connection: every request on the wire goes back to the queue, to be
    /// re-sent (none completed upward; block reads and writes are idempotent).
    fn requeue(&mut self, queue: &mut Queue) {
        for (_, piece) in &self.slots[..self.count] {
            queue.push(*piece);
        }
        self.count = 0;
        self.bytes = 0;
    }
}

/// Why `Conn::stream` returned with the connection intact.
enum StreamEnd {
    /// Nothing queued and nothing on the wire.
    Idle,
    /// A piece came back -ESTALE before the new map arrived: pause, then go on.
    StaleWait,
    /// The session token changed or the thread must stop: nothing is on the wire.
    Drained,
}

impl Conn {
    /// Continuous pipelining: keeps up to [`MAX_IN_FLIGHT`] requests (at most [`WINDOW_BYTES`]
    /// of payload) on the wire, sending newly queued pieces as soon as a reply frees room, and
    /// completes each piece when its reply arrives, in whatever order. A piece larger than one
    /// frame goes alone, in sequential chunks, once the wire is empty.
    /// `Err`: the connection is lost; the requests on the wire are left in `inflight`.
    ///
    /// # Safety
    ///
    /// The queued pieces are live and ours until completed.
    unsafe fn stream(
        &self,
        volume: &Volume,
        queue: &mut Queue,
        inflight: &mut InFlight,
        handle: &mut u64,
        seen_token: u64,
    ) -> core::result::Result<StreamEnd, ()> {
        let path = &volume.server;
        let mut stale_wait = false;
        // Last sign of life of the server while requests are on the wire.
        let mut progress = now_ns();
        // Device bookkeeping walks every slot and takes the map: not once per reply.
        let mut last_upkeep = 0i64;
        let mut cursor = ReplyCursor::default();
        loop {
            // SAFETY: `pending` is a valid llist head.
            queue.take(unsafe { sanblk_llist_del_all(path.pending.get()) });
            if now_ns() - last_upkeep >= UPKEEP_INTERVAL_NS {
                last_upkeep = now_ns();
                report_failed_devices(volume);
                if !path.closing.load(Ordering::Acquire) {
                    health::tick(volume);
                }
            }
            let draining = stale_wait || should_stop() || path.token_generation() != seen_token;
            while !draining && inflight.count < MAX_IN_FLIGHT && !queue.head.is_null() {
                let piece = queue.head;
                // SAFETY: queued pieces are live and ours.
                let size = u64::from(unsafe { (*piece).iter.bi_size });
                if size > u64::from(MAX_PAYLOAD) {
                    if inflight.count > 0 {
                        break;
                    }
                    queue.pop();
                    // SAFETY: as above; on a lost connection the piece is re-queued first.
                    match unsafe { self.execute(volume, &*piece, handle) } {
                        // SAFETY: popped above: completed or re-queued exactly once here.
                        Ok(answer) => stale_wait |= unsafe { settle(volume, queue, piece, answer) },
                        Err(()) => {
                            inflight.add(0, piece, size);
                            return Err(());
                        }
                    }
                    continue;
                }
                if inflight.count > 0 && inflight.bytes + size > WINDOW_BYTES {
                    break;
                }
                queue.pop();
                // SAFETY: live piece (contract).
                let Some(op) = frame_op(unsafe { &*piece }) else {
                    // SAFETY: popped, completed once.
                    unsafe { complete(volume, piece, BLK_STS_IOERR) };
                    continue;
                };
                *handle = handle.wrapping_add(1);
                if *handle == 0 {
                    *handle = 1;
                }
                // On the wire list before sending: a failed send re-queues it with the rest.
                inflight.add(*handle, piece, size);
                // Each request goes out at once: corking a batch (MSG_MORE) measured slower
                // (4 KiB random writes 0.83-0.96x nbd with it, 1.46x without).
                // SAFETY: live piece (contract).
                unsafe { self.send_request(volume, &*piece, op, *handle, 0, frame_len(&*piece, op))? };
            }
            if inflight.count == 0 {
                return Ok(if stale_wait {
                    StreamEnd::StaleWait
                } else if draining {
                    StreamEnd::Drained
                } else if queue.head.is_null() {
                    StreamEnd::Idle
                } else {
                    continue;
                });
            }
            // Read only when a reply is arriving: pieces queued meanwhile go out first, so
            // the wire stays full instead of waiting for the next reply.
            if !self.readable() {
                // SAFETY: `pending` is a valid llist head.
                let queued = !unsafe { (*path.pending.get()).first.is_null() };
                if !queued && !self.wait_for_input(path, progress + i64::from(IO_TIMEOUT_MS) * 1_000_000) {
                    return Err(());
                }
                continue;
            }
            // SAFETY: the pieces on the wire are live and ours (contract).
            unsafe { self.receive_replies(volume, queue, inflight, &mut cursor, &mut stale_wait)? };
            progress = now_ns();
        }
    }

    /// Consumes every reply byte the socket holds, without blocking: completes each piece
    /// whose reply is whole, and leaves a partly received reply in `cursor` for the next call.
    /// `Err` on a protocol error or a closed connection (readable, yet nothing to read).
    ///
    /// Reads through the socket's `read_sock` (as nvme-tcp and iscsi do): one socket lock per
    /// batch of replies, and READ data copied from the received buffers straight into the bio
    /// pages, instead of two blocking `recvmsg` calls per reply.
    ///
    /// # Safety
    ///
    /// The pieces in `inflight` are live and ours.
    unsafe fn receive_replies(
        &self,
        volume: &Volume,
        queue: &mut Queue,
        inflight: &mut InFlight,
        cursor: &mut ReplyCursor,
        stale_wait: &mut bool,
    ) -> core::result::Result<(), ()> {
        self.quickack();
        let mut batch = ReceiveBatch { volume, queue, inflight, cursor, stale_wait: false, failed: false };
        // SAFETY: an all-zero descriptor is valid; `count` must be non-zero to read at all.
        let mut desc: bindings::read_descriptor_t = unsafe { core::mem::zeroed() };
        desc.count = 1;
        desc.arg.data = core::ptr::addr_of_mut!(batch).cast();
        // SAFETY: the socket is live and connected; the actor runs within this call with
        // `desc.arg.data` pointing at `batch`, which outlives it; the socket lock is taken
        // and released around the read as `read_sock` requires.
        let copied = unsafe {
            sanblk_lock_sock(self.0.cast());
            let copied = sanblk_sock_read(self.0.cast(), &mut desc, Some(receive_actor));
            // Be woken when a good part of the reply under way is here, not for every segment
            // of it (a 1 MiB READ is hundreds of segments): the low-water mark is never more
            // than the server still owes, so it cannot hold back an answer.
            sanblk_sock_set_rcvlowat(self.0.cast(), batch.wake_bytes());
            sanblk_release_sock(self.0.cast());
            copied
        };
        *stale_wait |= batch.stale_wait;
        if batch.failed {
            return Err(());
        }
        // Readable yet nothing to read: the peer closed the connection or it failed.
        if copied <= 0 {
            return Err(());
        }
        Ok(())
    }

    /// Sends the request frame of `piece` (and a WRITE's data).
    ///
    /// # Safety
    ///
    /// `piece` is live and fits in one frame.
    unsafe fn send_request(
        &self,
        volume: &Volume,
        piece: &Piece,
        op: Op,
        handle: u64,
        off: u32,
        len: u32,
    ) -> core::result::Result<(), ()> {
        let header = RequestHeader {
            op,
            flags: piece.flags,
            handle,
            volume_id: volume.id,
            epoch: piece.epoch,
            offset: piece.volume_offset + u64::from(off),
            length: len,
        };
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        header.encode(&mut raw);
        self.send_flags(&raw, op == Op::Write)?;
        if op == Op::Write {
            // SAFETY: the piece's pages are live until it completes (contract).
            unsafe { self.transfer_pages(piece, off, len, true)? };
        }
        Ok(())
    }
}

/// Where the reply stream stands between two reads: a partly received header, or the READ
/// whose data is arriving (its piece stays on the wire list until the data is complete, so a
/// lost connection re-sends it).
#[derive(Default)]
struct ReplyCursor {
    header: [u8; REPLY_HEADER_LEN],
    header_received: usize,
    data: Option<DataInProgress>,
}

struct DataInProgress {
    handle: u64,
    piece: *mut Piece,
    received: u32,
    len: u32,
}

/// What `receive_actor` works on during one `read_sock` call.
struct ReceiveBatch<'a> {
    volume: &'a Volume,
    queue: &'a mut Queue,
    inflight: &'a mut InFlight,
    cursor: &'a mut ReplyCursor,
    stale_wait: bool,
    failed: bool,
}

impl ReceiveBatch<'_> {
    /// Bytes to be woken for: what the server certainly still sends (the rest of the reply
    /// under way, or a header when requests await an answer; 1 when none does), at most
    /// [`WAKE_BYTES`] so the receive window never fills up waiting for us.
    fn wake_bytes(&self) -> c_int {
        let owed = match &self.cursor.data {
            Some(data) => (data.len - data.received) as usize,
            None if self.cursor.header_received > 0 || self.inflight.count > 0 => {
                REPLY_HEADER_LEN - self.cursor.header_received
            }
            None => 1,
        };
        owed.min(WAKE_BYTES) as c_int
    }

    /// A whole reply header arrived: checks it against its request and either completes the
    /// piece or expects its READ data next. `Err`: protocol error.
    ///
    /// # Safety
    ///
    /// The pieces on the wire are live and ours.
    unsafe fn header_done(&mut self) -> core::result::Result<(), ()> {
        let reply = ReplyHeader::decode(&self.cursor.header).map_err(|_| ())?;
        // A handle not on the wire (unknown or answered twice) is a protocol error.
        let piece = self.inflight.find(reply.handle).ok_or(())?;
        // SAFETY: pieces on the wire are live (contract).
        let op = frame_op(unsafe { &*piece }).ok_or(())?;
        // SAFETY: as above.
        let len = frame_len(unsafe { &*piece }, op);
        let data = if reply.status == 0 && op == Op::Read { len } else { 0 };
        if reply.length != data {
            return Err(());
        }
        if data > 0 {
            self.cursor.data = Some(DataInProgress { handle: reply.handle, piece, received: 0, len });
            return Ok(());
        }
        // SAFETY: on the wire until now, so live; settled exactly once here.
        unsafe { self.finish(reply.handle, reply.status) };
        Ok(())
    }

    /// Takes the answered piece off the wire and completes (or re-queues) it.
    ///
    /// # Safety
    ///
    /// `handle` is on the wire, with a live piece.
    unsafe fn finish(&mut self, handle: u64, status: i32) {
        if let Some(piece) = self.inflight.remove(handle) {
            // SAFETY: taken off the wire: completed or re-queued exactly once.
            self.stale_wait |= unsafe { settle(self.volume, self.queue, piece, status) };
        }
    }

    /// Consumes up to `len` bytes of `skb` from `offset`; returns how many.
    ///
    /// # Safety
    ///
    /// `skb` holds `offset + len` bytes; the pieces on the wire are live and ours.
    unsafe fn consume(&mut self, skb: *const bindings::sk_buff, offset: usize, len: usize) -> core::result::Result<usize, ()> {
        let mut used = 0usize;
        while used < len {
            let at = offset + used;
            let available = len - used;
            if let Some(data) = self.cursor.data.as_mut() {
                let n = available.min((data.len - data.received) as usize);
                // SAFETY: the piece is on the wire (live) and `received + n` is within it.
                let mut pages = unsafe { (*data.piece).pages(data.received, n as u32, false) };
                // SAFETY: `skb` holds `at + n` bytes (contract); `pages` has room for `n`.
                if unsafe { bindings::skb_copy_datagram_iter(skb, at as c_int, &mut pages, n as c_int) } != 0 {
                    return Err(());
                }
                data.received += n as u32;
                used += n;
                if data.received == data.len {
                    let handle = data.handle;
                    self.cursor.data = None;
                    // SAFETY: still on the wire until now.
                    unsafe { self.finish(handle, 0) };
                }
                continue;
            }
            // Nothing asked for: leave further bytes unread (a misbehaving server's extra
            // reply is caught as an unknown handle once something is on the wire again).
            if self.cursor.header_received == 0 && self.inflight.count == 0 {
                break;
            }
            let n = available.min(REPLY_HEADER_LEN - self.cursor.header_received);
            let into = &mut self.cursor.header[self.cursor.header_received..][..n];
            // SAFETY: `skb` holds `at + n` bytes; `into` has room for `n`.
            if unsafe { bindings::skb_copy_bits(skb, at as c_int, into.as_mut_ptr().cast(), n as c_int) } != 0 {
                return Err(());
            }
            self.cursor.header_received += n;
            used += n;
            if self.cursor.header_received == REPLY_HEADER_LEN {
                self.cursor.header_received = 0;
                // SAFETY: contract.
                unsafe { self.header_done()? };
            }
        }
        Ok(used)
    }
}

/// `read_sock` actor: called with the socket locked, in our thread, for each received buffer.
///
/// # Safety
///
/// Called by `read_sock` from `Conn::receive_replies`, whose descriptor points at a live
/// `ReceiveBatch`.
unsafe extern "C" fn receive_actor(
    desc: *mut bindings::read_descriptor_t,
    skb: *mut bindings::sk_buff,
    offset: core::ffi::c_uint,
    len: usize,
) -> c_int {
    // SAFETY: `arg.data` is the batch `receive_replies` set, live for the read_sock call.
    let batch = unsafe { &mut *(*desc).arg.data.cast::<ReceiveBatch<'_>>() };
    // SAFETY: read_sock hands bytes `offset..offset + len` of a live skb.
    match unsafe { batch.consume(skb, offset as usize, len) } {
        Ok(used) => used as c_int,
        Err(()) => {
            batch.failed = true;
            // Stops read_sock; the connection is dropped and everything on the wire re-sent.
            -1
        }
    }
}

/// Completes `piece` with the server's `answer`, or re-queues it with the current epoch on
/// -ESTALE (bounded by [`STALE_RETRIES`]). Returns whether the new map has not arrived yet,
/// so the caller should pause before re-sending.
///
/// # Safety
///
/// `piece` is live, ours, on no list, and is completed or re-queued exactly once here.
unsafe fn settle(volume: &Volume, queue: &mut Queue, piece: *mut Piece, answer: i32) -> bool {
    // SAFETY: see the function's contract.
    unsafe {
        if answer == -ESTALE && (*piece).stale_retries < STALE_RETRIES {
            // The volume offset does not depend on the epoch: re-send with the epoch the
            // server now expects, once the agent has delivered it.
            (*piece).stale_retries += 1;
            let current = volume.current_map().epoch;
            let wait = current == (*piece).epoch;
            (*piece).epoch = current;
            queue.push(piece);
            wait
        } else {
            complete(volume, piece, if answer == 0 { 0 } else { BLK_STS_IOERR });
            false
        }
    }
}

/// Completes a piece: its clone or in-place context is released and its parent gets one
/// completion.
///
/// # Safety
///
/// `piece` was queued by `ServerPath::queue` and is completed exactly once.
unsafe fn complete(volume: &Volume, piece: *mut Piece, status: bindings::blk_status_t) {
    // SAFETY: the piece and its clone are live until here (contract); the parent waits for
    // this completion.
    unsafe {
        let parent = (*piece).parent;
        if status != 0 {
            (*parent).bi_status = status;
            volume.counters.errors.fetch_add(1, Ordering::Relaxed);
        } else {
            volume.server.redirected.fetch_add(1, Ordering::Relaxed);
        }
        match (*piece).owner {
            PieceOwner::Clone => bindings::bio_put(Piece::bio(piece)),
            PieceOwner::InPlace => crate::hook::release_in_place(piece),
        }
        bindings::bio_endio(parent);
    }
    volume.inflight.fetch_sub(1, Ordering::AcqRel);
}

/// FIFO of pieces owned by the thread (linked through their llist nodes).
struct Queue {
    head: *mut Piece,
    tail: *mut Piece,
}

impl Queue {
    /// Appends a batch from `llist_del_all` (newest first) in arrival order.
    fn take(&mut self, mut node: *mut bindings::llist_node) {
        let mut reversed: *mut bindings::llist_node = core::ptr::null_mut();
        while !node.is_null() {
            // SAFETY: nodes of a detached llist are ours; `node` is first in its Piece.
            unsafe {
                let next = (*node).next;
                (*node).next = reversed;
                reversed = node;
                node = next;
            }
        }
        while !reversed.is_null() {
            let piece = reversed.cast::<Piece>();
            // SAFETY: as above.
            reversed = unsafe { (*reversed).next };
            self.push(piece);
        }
    }

    /// Appends one piece (taken off this queue before).
    fn push(&mut self, piece: *mut Piece) {
        // SAFETY: `piece` is ours and on no list.
        unsafe {
            (*piece).node.next = core::ptr::null_mut();
            if self.tail.is_null() {
                self.head = piece;
            } else {
                (*self.tail).node.next = piece.cast();
            }
        }
        self.tail = piece;
    }

    fn pop(&mut self) -> *mut Piece {
        let piece = self.head;
        if !piece.is_null() {
            // SAFETY: `piece` is on this queue.
            self.head = unsafe { (*piece).node.next }.cast();
            if self.head.is_null() {
                self.tail = core::ptr::null_mut();
            }
        }
        piece
    }

    fn fail_all(&mut self, volume: &Volume) {
        loop {
            let piece = self.pop();
            if piece.is_null() {
                break;
            }
            // SAFETY: popped pieces are ours to complete, once.
            unsafe { complete(volume, piece, BLK_STS_IOERR) };
        }
    }
}

/// Multicasts PATH_FAILED once for each device of `volume` newly marked failed (the failure
/// is noted in completion context, where no message can be allocated).
fn report_failed_devices(volume: &Volume) {
    for (_, device) in volume.devices.iter() {
        if device.state() != DeviceState::Failed as u32 || device.failure_reported.swap(true, Ordering::AcqRel) {
            continue;
        }
        pr_warn!("volume {}: direct path to {} failed; using the server path\n", volume.id, &*device.path);
        health::restart(device);
        if health::multicast_device_event(volume, device, EventKind::PathFailed).is_err() {
            pr_warn!("volume {}: cannot multicast the path failure event\n", volume.id);
        }
    }
}

/// Sleeps up to `ms`, in short steps, returning early if the thread must stop.
/// Also returns early when a new session token arrives (`token_generation` moves off `seen`).
fn pause(ms: u32, path: &ServerPath, seen: u64) {
    let mut left = ms;
    while left > 0 && !should_stop() && path.token_generation() == seen {
        let step = left.min(50);
        // SAFETY: process context (our kthread), no locks held.
        unsafe { bindings::msleep(step) };
        left -= step;
    }
}

/// # Safety
///
/// Started by `ServerPath::start` with `data` a volume that outlives the thread.
unsafe extern "C" fn thread_main(data: *mut c_void) -> c_int {
    // SAFETY: see the function's contract.
    let volume = unsafe { &*(data as *const Volume) };
    let path = &volume.server;
    let mut queue = Queue { head: core::ptr::null_mut(), tail: core::ptr::null_mut() };
    let mut conn: Option<Conn> = None;
    let mut backoff = BACKOFF_MIN_MS;
    let mut down_since: Option<i64> = None;
    let mut handle = 0u64;
    let mut seen_token = path.token_generation();
    loop {
        let generation = path.token_generation();
        if generation != seen_token {
            // Nothing is on the wire here (the stream drains on a new token): pieces not yet completed stay queued
            // and go out on the new connection.
            seen_token = generation;
            backoff = BACKOFF_MIN_MS;
            if conn.take().is_some() {
                pr_info!("volume {}: new session token; reconnecting the server path\n", volume.id);
                path.state.store(ServerPathState::Disconnected as u32, Ordering::Relaxed);
            }
        }
        if !path.closing.load(Ordering::Acquire) {
            health::tick(volume);
        }
        // SAFETY: `pending` is a valid llist head.
        queue.take(unsafe { sanblk_llist_del_all(path.pending.get()) });
        if should_stop() {
            queue.fail_all(volume);
            break;
        }
        if !queue.head.is_null() {
            report_failed_devices(volume);
        }
        if queue.head.is_null() {
            down_since = None;
            // SAFETY: standard kthread sleep: state set before re-checking the condition, so
            // a wake-up between the check and schedule() is not lost.
            unsafe {
                sanblk_set_current_interruptible();
                if (*path.pending.get()).first.is_null() && !should_stop() {
                    bindings::schedule_timeout(msecs_to_jiffies(1000));
                }
                sanblk_set_current_running();
            }
            continue;
        }
        let Some(active) = conn.as_ref() else {
            let closing = path.closing.load(Ordering::Acquire);
            let since = *down_since.get_or_insert_with(now_ns);
            if closing || now_ns() - since > NO_PATH_TIMEOUT_NS {
                queue.fail_all(volume);
                continue;
            }
            let mut refused = false;
            for (ip, port) in path.addrs().iter() {
                match Conn::connect(*ip, *port, volume) {
                    Ok(fresh) => {
                        pr_info!("volume {}: server path connected to {}.{}.{}.{}:{}\n",
                            volume.id, ip[0], ip[1], ip[2], ip[3], port);
                        conn = Some(fresh);
                        break;
                    }
                    Err(ConnectError::Refused) => refused = true,
                    Err(ConnectError::Failed) => {}
                }
            }
            if conn.is_some() {
                path.state.store(ServerPathState::Connected as u32, Ordering::Relaxed);
                backoff = BACKOFF_MIN_MS;
                down_since = None;
                continue;
            }
            if refused {
                pr_warn!("volume {}: server refused the session token; failing queued I/O\n", volume.id);
                path.state.store(ServerPathState::Refused as u32, Ordering::Relaxed);
                queue.fail_all(volume);
            } else {
                path.state.store(ServerPathState::Disconnected as u32, Ordering::Relaxed);
            }
            pause(backoff, path, seen_token);
            backoff = (backoff * 2).min(BACKOFF_MAX_MS);
            continue;
        };
        let mut inflight = InFlight::new();
        // SAFETY: the queued pieces are live and ours until completed.
        match unsafe { active.stream(volume, &mut queue, &mut inflight, &mut handle, seen_token) } {
            Ok(StreamEnd::Idle) | Ok(StreamEnd::Drained) => {}
            Ok(StreamEnd::StaleWait) => pause(STALE_PAUSE_MS, path, path.token_generation()),
            Err(()) => {
                pr_warn!("volume {}: server path connection lost; reconnecting\n", volume.id);
                inflight.requeue(&mut queue);
                conn = None;
                down_since = Some(now_ns());
                path.state.store(ServerPathState::Disconnected as u32, Ordering::Relaxed);
            }
        }
    }
    drop(conn);
    0
}
