// SPDX-License-Identifier: GPL-2.0

//! A kernel TCP connection (IPv4, in the initial network namespace), as nbd's and nvme-tcp's:
//! blocking sends and receives with timeouts, poll, and batched non-blocking reception of
//! whatever has arrived through the socket's `read_sock`.

use core::ffi::{c_int, c_uint, c_void};
use core::ptr::addr_of_mut;
use kernel::bindings;

use super::consts::{IPPROTO_TCP, POLL_READABLE, TCP_NODELAY, TCP_QUICKACK};
use super::helpers::{release_sock, rust_helper_lock_sock, sock_setsockopt};
use super::sync::WaitHead;

/// Why an operation on the connection failed; it is then unusable (drop it).
#[derive(Debug)]
pub(crate) struct Broken;

/// A connected TCP socket; released on drop.
pub(crate) struct TcpStream(*mut bindings::socket);

// SAFETY: a kernel socket may be used from any thread; this type is used by one at a time.
unsafe impl Send for TcpStream {}

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

/// A `sockptr_t` to kernel memory (`KERNEL_SOCKPTR`, a static inline).
fn kernel_sockptr<T>(value: &T) -> bindings::sockptr_t {
    // SAFETY: an all-zero sockptr_t is a null user pointer; both fields are set below.
    let mut ptr: bindings::sockptr_t = unsafe { core::mem::zeroed() };
    ptr.__bindgen_anon_1.kernel = core::ptr::from_ref(value).cast_mut().cast::<c_void>();
    ptr.set_is_kernel(true);
    ptr
}

impl TcpStream {
    /// Connects to `ip:port`, bounding the connection and every later send or receive by
    /// `timeout_ms`, with Nagle off (requests go out at once).
    pub(crate) fn connect(
        ip: [u8; 4],
        port: u16,
        timeout_ms: u32,
    ) -> core::result::Result<Self, Broken> {
        let mut sock: *mut bindings::socket = core::ptr::null_mut();
        // SAFETY: creates a kernel TCP socket in init_net; `sock` receives it.
        let ret = unsafe {
            bindings::sock_create_kern(
                addr_of_mut!(bindings::init_net),
                bindings::AF_INET as c_int,
                bindings::sock_type_SOCK_STREAM as c_int,
                IPPROTO_TCP,
                &mut sock,
            )
        };
        if ret < 0 || sock.is_null() {
            return Err(Broken);
        }
        let stream = TcpStream(sock);
        stream.set_timeout(timeout_ms)?;
        let mut addr = SockaddrIn {
            family: bindings::AF_INET as u16,
            port_be: port.to_be(),
            addr: ip,
            zero: [0; 8],
        };
        // SAFETY: a live socket; `addr` is a sockaddr_in of the right size, live for the call.
        let ret = unsafe {
            bindings::kernel_connect(
                sock,
                addr_of_mut!(addr).cast(),
                core::mem::size_of::<SockaddrIn>() as c_int,
                0,
            )
        };
        if ret < 0 {
            return Err(Broken);
        }
        stream.set_tcp_option(TCP_NODELAY, 1)?;
        Ok(stream)
    }

    fn ops(&self) -> &bindings::proto_ops {
        // SAFETY: a created socket always has its protocol's ops, static for its lifetime.
        unsafe { &*(*self.0).ops }
    }

    fn sk(&self) -> *mut bindings::sock {
        // SAFETY: a created socket always has its sock until released.
        unsafe { (*self.0).sk }
    }

    /// Bounds every later send and receive by `ms` (whole seconds and microseconds).
    pub(crate) fn set_timeout(&self, ms: u32) -> core::result::Result<(), Broken> {
        let tv = bindings::__kernel_sock_timeval {
            tv_sec: i64::from(ms / 1000),
            tv_usec: i64::from(ms % 1000) * 1000,
        };
        for option in [bindings::SO_RCVTIMEO_NEW, bindings::SO_SNDTIMEO_NEW] {
            // SAFETY: a live socket; `tv` is a kernel value of the option's type, live for
            // the call, which copies it.
            let ret = unsafe {
                sock_setsockopt(
                    self.0.cast(),
                    bindings::SOL_SOCKET as c_int,
                    option as c_int,
                    kernel_sockptr(&tv),
                    core::mem::size_of_val(&tv) as c_uint,
                )
            };
            if ret != 0 {
                return Err(Broken);
            }
        }
        Ok(())
    }

    fn set_tcp_option(&self, option: i32, value: c_int) -> core::result::Result<(), Broken> {
        let setsockopt = self.ops().setsockopt.ok_or(Broken)?;
        // SAFETY: a live TCP socket; `value` is an int option value, copied by the call.
        let ret = unsafe {
            setsockopt(
                self.0,
                bindings::SOL_TCP as c_int,
                option,
                kernel_sockptr(&value),
                core::mem::size_of::<c_int>() as c_uint,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(Broken)
        }
    }

    /// Asks TCP to acknowledge at once (delayed ACKs stall a request/reply protocol behind a
    /// peer or proxy that uses Nagle).
    pub(crate) fn quickack(&self) {
        // Best effort: a failure only costs latency.
        let _ = self.set_tcp_option(TCP_QUICKACK, 1);
    }

    /// Sends all of `bytes`; `more` tells TCP that more data follows at once.
    pub(crate) fn send(&self, bytes: &[u8], more: bool) -> core::result::Result<(), Broken> {
        let mut vec = bindings::kvec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        };
        // SAFETY: an all-zero msghdr is a valid "no name, no control" header.
        let mut msg: bindings::msghdr = unsafe { core::mem::zeroed() };
        msg.msg_flags = bindings::MSG_NOSIGNAL | if more { bindings::MSG_MORE } else { 0 };
        // SAFETY: a connected socket; `vec` describes `bytes`, live for the call.
        let ret = unsafe { bindings::kernel_sendmsg(self.0, &mut msg, &mut vec, 1, bytes.len()) };
        if ret == bytes.len() as c_int {
            Ok(())
        } else {
            Err(Broken)
        }
    }

    /// Receives exactly `bytes.len()` bytes.
    pub(crate) fn recv(&self, bytes: &mut [u8]) -> core::result::Result<(), Broken> {
        self.quickack();
        let mut vec = bindings::kvec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: bytes.len(),
        };
        // SAFETY: as in `send`.
        let mut msg: bindings::msghdr = unsafe { core::mem::zeroed() };
        // SAFETY: a connected socket; `vec` describes `bytes`, live for the call.
        let ret = unsafe {
            bindings::kernel_recvmsg(
                self.0,
                &mut msg,
                &mut vec,
                1,
                bytes.len(),
                bindings::MSG_WAITALL as c_int,
            )
        };
        if ret == bytes.len() as c_int {
            Ok(())
        } else {
            Err(Broken)
        }
    }

    /// Sends the `len` bytes `iter` describes.
    ///
    /// # Safety
    ///
    /// `iter` describes `len` bytes of memory that stays live for the call.
    pub(crate) unsafe fn send_iter(
        &self,
        iter: bindings::iov_iter,
        len: u32,
    ) -> core::result::Result<(), Broken> {
        // SAFETY: as in `send`.
        let mut msg: bindings::msghdr = unsafe { core::mem::zeroed() };
        msg.msg_iter = iter;
        msg.msg_flags = bindings::MSG_NOSIGNAL;
        // SAFETY: a connected socket; the iterator's memory is live (contract).
        let ret = unsafe { bindings::sock_sendmsg(self.0, &mut msg) };
        if ret == len as c_int {
            Ok(())
        } else {
            Err(Broken)
        }
    }

    /// Whether a read would not block (data arriving, or the connection failed).
    pub(crate) fn readable(&self) -> bool {
        let Some(poll) = self.ops().poll else {
            return true;
        };
        // SAFETY: a live socket; a NULL file and poll table only query its state.
        unsafe { poll(core::ptr::null_mut(), self.0, core::ptr::null_mut()) & POLL_READABLE != 0 }
    }

    /// The wait queue woken when data arrives (or the connection fails).
    pub(crate) fn wait_head(&self) -> &WaitHead {
        // SAFETY: an inet socket's sock waits on the socket's own `wq` (sock_init_data), which
        // lives as long as the socket.
        unsafe { WaitHead::from_raw(addr_of_mut!((*self.0).wq.wait)) }
    }

    /// Hands every byte received so far to `reader` (socket locked, no blocking), then sets
    /// the receive low-water mark to what `reader` reports it still expects. `Err` when the
    /// reader failed, or nothing was there to read although the socket was readable (the
    /// peer closed the connection or it failed).
    pub(crate) fn read_available<R: Reader>(
        &self,
        reader: &mut R,
    ) -> core::result::Result<(), Broken> {
        let (Some(read_sock), Some(set_rcvlowat)) = (self.ops().read_sock, self.ops().set_rcvlowat)
        else {
            return Err(Broken);
        };
        self.quickack();
        let mut state = ReadState {
            reader,
            failed: false,
        };
        // SAFETY: an all-zero descriptor is valid; `count` must be non-zero to read at all.
        let mut desc: bindings::read_descriptor_t = unsafe { core::mem::zeroed() };
        desc.count = 1;
        desc.arg.data = addr_of_mut!(state).cast();
        // SAFETY: a connected socket; the actor runs within `read_sock` with `desc.arg.data`
        // pointing at `state`, which outlives the call; the socket lock is held around it as
        // `read_sock` and `set_rcvlowat` require.
        let copied = unsafe {
            rust_helper_lock_sock(self.sk());
            let copied = read_sock(self.sk(), &mut desc, Some(read_actor::<R>));
            set_rcvlowat(self.sk(), state.reader.low_water_mark());
            release_sock(self.sk());
            copied
        };
        if state.failed || copied <= 0 {
            return Err(Broken);
        }
        Ok(())
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        // SAFETY: created by sock_create_kern and released once.
        unsafe { bindings::sock_release(self.0) };
    }
}

/// Received bytes, as `read_sock` hands them: one socket buffer at a time.
pub(crate) struct SkBuff(bindings::sk_buff);

impl SkBuff {
    /// Copies bytes `offset..offset + out.len()` into `out`.
    pub(crate) fn copy_to(
        &self,
        offset: usize,
        out: &mut [u8],
    ) -> core::result::Result<(), Broken> {
        // SAFETY: `read_sock` hands live buffers holding the range it reports; `out` has room.
        let ret = unsafe {
            bindings::skb_copy_bits(
                core::ptr::from_ref(&self.0),
                offset as c_int,
                out.as_mut_ptr().cast(),
                out.len() as c_int,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(Broken)
        }
    }

    /// Copies `len` bytes from `offset` into the memory `iter` describes.
    ///
    /// # Safety
    ///
    /// `iter` describes at least `len` bytes of live, writable memory.
    pub(crate) unsafe fn copy_to_iter(
        &self,
        offset: usize,
        mut iter: bindings::iov_iter,
        len: usize,
    ) -> core::result::Result<(), Broken> {
        // SAFETY: as in `copy_to`; the destination is the caller's contract.
        let ret = unsafe {
            bindings::skb_copy_datagram_iter(
                core::ptr::from_ref(&self.0),
                offset as c_int,
                &mut iter,
                len as c_int,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(Broken)
        }
    }
}

/// Consumes received bytes for [`TcpStream::read_available`].
pub(crate) trait Reader {
    /// Takes up to `len` bytes of `skb` from `offset`; returns how many.
    fn consume(
        &mut self,
        skb: &SkBuff,
        offset: usize,
        len: usize,
    ) -> core::result::Result<usize, Broken>;

    /// Bytes to be woken for next (at least 1).
    fn low_water_mark(&self) -> c_int;
}

struct ReadState<'a, R> {
    reader: &'a mut R,
    failed: bool,
}

/// # Safety
///
/// Called by `read_sock` from [`TcpStream::read_available`], whose descriptor points at a
/// live `ReadState`.
unsafe extern "C" fn read_actor<R: Reader>(
    desc: *mut bindings::read_descriptor_t,
    skb: *mut bindings::sk_buff,
    offset: c_uint,
    len: usize,
) -> c_int {
    // SAFETY: `arg.data` is the `ReadState` that `read_available` set, live for the call;
    // `read_sock` hands a live buffer holding bytes `offset..offset + len`.
    let (state, skb) = unsafe {
        (
            &mut *(*desc).arg.data.cast::<ReadState<'_, R>>(),
            &*skb.cast::<SkBuff>(),
        )
    };
    match state.reader.consume(skb, offset as usize, len) {
        Ok(used) => used as c_int,
        Err(Broken) => {
            state.failed = true;
            // Stops read_sock.
            -1
        }
    }
}
