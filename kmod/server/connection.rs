// SPDX-License-Identifier: GPL-2.0

//! One authenticated connection to the server's I/O service: connecting and HELLO, sending
//! request frames (with a WRITE's data from the bio pages) and waiting for input.

use crate::abi_frame::{Op, ReplyHeader, RequestHeader, REPLY_HEADER_LEN, REQUEST_HEADER_LEN};
use crate::ffi::socket::{Broken, Reader, TcpStream};
use crate::ffi::sync::{wait_until, TASK_INTERRUPTIBLE};
use crate::ffi::time::{msecs_to_jiffies, now_ns};
use crate::piece::PieceRef;
use crate::server::path::ServerPath;
use crate::volume::Volume;

/// Socket send/receive timeout; a request not answered within it counts as a lost connection.
pub(super) const IO_TIMEOUT_MS: u32 = 30_000;
/// Bound on connecting and on the HELLO exchange, so an unreachable address fails over fast.
const CONNECT_TIMEOUT_MS: u32 = 5_000;

/// A connected, authenticated socket; released on drop.
pub(super) struct Conn(TcpStream);

pub(super) enum ConnectError {
    /// The server refused the token.
    Refused,
    /// Unreachable, timed out, or a protocol error.
    Failed,
}

impl From<Broken> for ConnectError {
    fn from(_: Broken) -> Self {
        ConnectError::Failed
    }
}

impl Conn {
    /// Connects to `ip:port` and presents the volume's session token.
    pub(super) fn connect(ip: [u8; 4], port: u16, volume: &Volume) -> Result<Conn, ConnectError> {
        let stream = TcpStream::connect(ip, port, CONNECT_TIMEOUT_MS)?;
        let session = volume.session_token();
        let token = session.bytes();
        let header =
            RequestHeader::hello(volume.id, volume.current_map().epoch, token.len() as u32);
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        header.encode(&mut raw);
        stream.send(&raw, false)?;
        stream.send(token, false)?;
        let mut reply = [0u8; REPLY_HEADER_LEN];
        stream.recv(&mut reply)?;
        let reply = ReplyHeader::decode(&reply).map_err(|_| ConnectError::Failed)?;
        if reply.handle != 0 || reply.length != 0 {
            return Err(ConnectError::Failed);
        }
        if reply.status != 0 {
            return Err(ConnectError::Refused);
        }
        stream.set_timeout(IO_TIMEOUT_MS)?;
        Ok(Conn(stream))
    }

    /// Whether a read would not block (a reply is arriving, or the connection failed).
    pub(super) fn readable(&self) -> bool {
        self.0.readable()
    }

    /// Sleeps until the socket is readable or new pieces are queued for the thread; `false`
    /// when neither happened by `deadline_ns`. The thread waits on the socket's wait queue (as
    /// poll(2) would) and on its own, and is woken directly by `ServerPath::queue`.
    pub(super) fn wait_for_input(&self, path: &ServerPath, deadline_ns: i64) -> bool {
        let left = deadline_ns - now_ns();
        if left <= 0 {
            return self.readable() || !path.pending.is_empty();
        }
        // At least one jiffy, at most the I/O timeout.
        let ms = (left / 1_000_000).clamp(1, i64::from(IO_TIMEOUT_MS)) as u32;
        wait_until(
            &[self.0.wait_head(), &path.wakeup],
            TASK_INTERRUPTIBLE,
            Some(msecs_to_jiffies(ms)),
            || self.readable() || !path.pending.is_empty(),
        )
    }

    /// Hands every reply byte received so far to `reader` (see `TcpStream::read_available`).
    pub(super) fn read_available<R: Reader>(&self, reader: &mut R) -> Result<(), Broken> {
        self.0.read_available(reader)
    }

    /// Sends the request frame for bytes `off..off + len` of `piece` (and a WRITE's data).
    pub(super) fn send_request(
        &self,
        volume: &Volume,
        piece: &PieceRef,
        op: Op,
        handle: u64,
        off: u32,
        len: u32,
    ) -> Result<(), Broken> {
        let info = piece.info();
        let header = RequestHeader {
            op,
            flags: info.flags,
            handle,
            volume_id: volume.id,
            epoch: info.epoch,
            offset: info.volume_offset + u64::from(off),
            length: len,
        };
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        header.encode(&mut raw);
        // `more`: one segment for header and data, which matters behind proxies that forward
        // each read separately.
        self.0.send(&raw, op == Op::Write)?;
        if op == Op::Write {
            // SAFETY: an owned piece keeps its bio and pages live; `off + len` is within it.
            unsafe {
                self.0
                    .send_iter(piece.data().iov_iter(off, len, true), len)?
            };
        }
        Ok(())
    }
}
