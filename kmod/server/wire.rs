// SPDX-License-Identifier: GPL-2.0

//! The requests on the wire and the reply stream, over uapi's pure bookkeeping
//! (`pipeline::InFlight`, `pipeline::ReplyReader`, unit-tested on the host): replies are
//! matched to requests by handle (never trusted as a pointer), and READ data is copied from
//! the received buffers straight into the bio pages.

use core::ffi::c_int;

use crate::abi_frame::{ReplyHeader, REPLY_HEADER_LEN};
use crate::abi_pipeline::{reply_data_len, InFlight, ReplyReader, Request, Want};
use crate::ffi::socket::{Broken, Reader, SkBuff};
use crate::piece::PieceRef;

/// Requests in flight at once on the connection (the server executes up to 64 concurrently).
pub(super) const MAX_IN_FLIGHT: usize = 32;
/// Most reply bytes the thread waits for before reading (socket low-water mark).
const WAKE_BYTES: usize = 32 << 10;

/// Requests on the wire, each owning its piece (one chunk of it) until answered.
pub(super) type OnWire = InFlight<PieceRef, MAX_IN_FLIGHT>;

/// What one read of the socket works on: answered requests are handed to `answered` (with
/// the server's status) as soon as their reply is whole. A reply cut between two reads waits
/// in `reader`.
pub(super) struct ReceiveBatch<'a, F: FnMut(Request<PieceRef>, i32)> {
    pub(super) on_wire: &'a mut OnWire,
    pub(super) reader: &'a mut ReplyReader,
    pub(super) answered: F,
}

impl<F: FnMut(Request<PieceRef>, i32)> ReceiveBatch<'_, F> {
    /// A whole reply header arrived: checks it against its request and either hands the
    /// request over or expects its READ data next.
    fn header_done(&mut self, reply: ReplyHeader) -> Result<(), Broken> {
        // A handle not on the wire (unknown or answered twice) is a protocol error.
        let request = self.on_wire.get(reply.handle).ok_or(Broken)?;
        let op = request.item.op().ok_or(Broken)?;
        let data = reply_data_len(op, reply.status, request.len);
        if reply.length != data {
            return Err(Broken);
        }
        if data > 0 {
            self.reader.expect_data(reply.handle, data);
            return Ok(());
        }
        self.finish(reply.handle, reply.status);
        Ok(())
    }

    fn finish(&mut self, handle: u64, status: i32) {
        if let Some(request) = self.on_wire.remove(handle) {
            (self.answered)(request, status);
        }
    }
}

impl<F: FnMut(Request<PieceRef>, i32)> Reader for ReceiveBatch<'_, F> {
    fn consume(&mut self, skb: &SkBuff, offset: usize, len: usize) -> Result<usize, Broken> {
        let mut used = 0usize;
        while used < len {
            let at = offset + used;
            let available = len - used;
            match self.reader.want(!self.on_wire.is_empty()) {
                // Nothing asked for: leave further bytes unread (a misbehaving server's extra
                // reply is caught as an unknown handle once something is on the wire again).
                Want::Nothing => break,
                Want::Header(missing) => {
                    let n = available.min(missing);
                    let mut bytes = [0u8; REPLY_HEADER_LEN];
                    skb.copy_to(at, &mut bytes[..n])?;
                    used += n;
                    if let Some(reply) = self.reader.push_header(&bytes[..n]).map_err(|_| Broken)? {
                        self.header_done(reply)?;
                    }
                }
                Want::Data {
                    handle,
                    at: received,
                    len: missing,
                } => {
                    let n = available.min(missing as usize);
                    let request = self.on_wire.get(handle).ok_or(Broken)?;
                    // SAFETY: a piece on the wire is owned, so its bio and pages are live, and
                    // the request's `offset + received + n` is within it.
                    unsafe {
                        let pages = request.item.data().iov_iter(
                            request.offset + received,
                            n as u32,
                            false,
                        );
                        skb.copy_to_iter(at, pages, n)?;
                    }
                    used += n;
                    if let Some(handle) = self.reader.push_data(n as u32) {
                        self.finish(handle, 0);
                    }
                }
            }
        }
        Ok(used)
    }

    /// At most [`WAKE_BYTES`], so the receive window never fills up waiting for us; a 1 MiB
    /// READ is hundreds of segments: be woken when a good part of it is here, not for each.
    fn low_water_mark(&self) -> c_int {
        self.reader
            .low_water_mark(!self.on_wire.is_empty(), WAKE_BYTES) as c_int
    }
}
