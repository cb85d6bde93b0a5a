// SPDX-License-Identifier: GPL-2.0

//! The requests on the wire and the reply stream: replies are matched to requests by handle
//! (never trusted as a pointer), READ data is copied from the received buffers straight into
//! the bio pages, and a reply cut between two reads waits in a cursor.

use core::ffi::c_int;

use crate::abi_frame::{Op, ReplyHeader, REPLY_HEADER_LEN};
use crate::ffi::socket::{Broken, Reader, SkBuff};
use crate::piece::{PieceQueue, PieceRef};

/// Requests in flight at once on the connection (the server executes up to 64 concurrently).
pub(super) const MAX_IN_FLIGHT: usize = 32;
/// Most reply bytes the thread waits for before reading (socket low-water mark).
const WAKE_BYTES: usize = 32 << 10;

/// Requests on the wire, each owning its piece until answered.
pub(super) struct OnWire {
    slots: [(u64, Option<PieceRef>); MAX_IN_FLIGHT],
    count: usize,
    bytes: u64,
}

impl OnWire {
    pub(super) fn new() -> Self {
        OnWire {
            slots: core::array::from_fn(|_| (0, None)),
            count: 0,
            bytes: 0,
        }
    }

    pub(super) fn count(&self) -> usize {
        self.count
    }

    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(super) fn add(&mut self, handle: u64, piece: PieceRef) {
        self.bytes += u64::from(piece.size());
        self.slots[self.count] = (handle, Some(piece));
        self.count += 1;
    }

    /// The piece of the request `handle`, left on the wire.
    pub(super) fn find(&self, handle: u64) -> Option<&PieceRef> {
        self.slots[..self.count]
            .iter()
            .find(|(h, _)| *h == handle)
            .and_then(|(_, piece)| piece.as_ref())
    }

    /// Takes the request answered by `handle` off the wire.
    pub(super) fn remove(&mut self, handle: u64) -> Option<PieceRef> {
        let i = self.slots[..self.count]
            .iter()
            .position(|(h, _)| *h == handle)?;
        self.count -= 1;
        self.slots.swap(i, self.count);
        let piece = self.slots[self.count].1.take()?;
        self.bytes -= u64::from(piece.size());
        Some(piece)
    }

    /// After a lost connection: every request on the wire goes back to the queue, to be
    /// re-sent (none completed upward; block reads and writes are idempotent).
    pub(super) fn requeue(&mut self, queue: &mut PieceQueue) {
        for (_, piece) in self.slots[..self.count].iter_mut() {
            if let Some(piece) = piece.take() {
                queue.push(piece);
            }
        }
        self.count = 0;
        self.bytes = 0;
    }
}

/// Where the reply stream stands between two reads: a partly received header, or the READ
/// whose data is arriving (its piece stays on the wire until the data is complete, so a lost
/// connection re-sends it).
#[derive(Default)]
pub(super) struct ReplyCursor {
    header: [u8; REPLY_HEADER_LEN],
    header_received: usize,
    data: Option<DataInProgress>,
}

struct DataInProgress {
    handle: u64,
    received: u32,
    len: u32,
}

/// What one read of the socket works on: answered requests are handed to `answered` (with
/// the server's status) as soon as their reply is whole.
pub(super) struct ReceiveBatch<'a, F: FnMut(PieceRef, i32)> {
    pub(super) on_wire: &'a mut OnWire,
    pub(super) cursor: &'a mut ReplyCursor,
    pub(super) answered: F,
}

impl<F: FnMut(PieceRef, i32)> ReceiveBatch<'_, F> {
    /// A whole reply header arrived: checks it against its request and either completes the
    /// piece or expects its READ data next.
    fn header_done(&mut self) -> Result<(), Broken> {
        let reply = ReplyHeader::decode(&self.cursor.header).map_err(|_| Broken)?;
        // A handle not on the wire (unknown or answered twice) is a protocol error.
        let piece = self.on_wire.find(reply.handle).ok_or(Broken)?;
        let op = piece.op().ok_or(Broken)?;
        let len = piece.len();
        let data = if reply.status == 0 && op == Op::Read {
            len
        } else {
            0
        };
        if reply.length != data {
            return Err(Broken);
        }
        if data > 0 {
            self.cursor.data = Some(DataInProgress {
                handle: reply.handle,
                received: 0,
                len,
            });
            return Ok(());
        }
        self.finish(reply.handle, reply.status);
        Ok(())
    }

    /// Takes the answered request off the wire and hands its piece over.
    fn finish(&mut self, handle: u64, status: i32) {
        if let Some(piece) = self.on_wire.remove(handle) {
            (self.answered)(piece, status);
        }
    }
}

impl<F: FnMut(PieceRef, i32)> Reader for ReceiveBatch<'_, F> {
    fn consume(&mut self, skb: &SkBuff, offset: usize, len: usize) -> Result<usize, Broken> {
        let mut used = 0usize;
        while used < len {
            let at = offset + used;
            let available = len - used;
            if let Some(data) = self.cursor.data.as_mut() {
                let n = available.min((data.len - data.received) as usize);
                let piece = self.on_wire.find(data.handle).ok_or(Broken)?;
                // SAFETY: a piece on the wire is owned, so its bio and pages are live, and
                // `received + n` is within it.
                unsafe {
                    skb.copy_to_iter(at, piece.data().iov_iter(data.received, n as u32, false), n)?
                };
                data.received += n as u32;
                used += n;
                if data.received == data.len {
                    let handle = data.handle;
                    self.cursor.data = None;
                    self.finish(handle, 0);
                }
                continue;
            }
            // Nothing asked for: leave further bytes unread (a misbehaving server's extra
            // reply is caught as an unknown handle once something is on the wire again).
            if self.cursor.header_received == 0 && self.on_wire.count == 0 {
                break;
            }
            let n = available.min(REPLY_HEADER_LEN - self.cursor.header_received);
            skb.copy_to(
                at,
                &mut self.cursor.header[self.cursor.header_received..][..n],
            )?;
            self.cursor.header_received += n;
            used += n;
            if self.cursor.header_received == REPLY_HEADER_LEN {
                self.cursor.header_received = 0;
                self.header_done()?;
            }
        }
        Ok(used)
    }

    /// What the server certainly still sends (the rest of the reply under way, or a header
    /// when requests await an answer; 1 when none does), at most [`WAKE_BYTES`] so the
    /// receive window never fills up waiting for us. A 1 MiB READ is hundreds of segments: be
    /// woken when a good part of it is here, not for each.
    fn low_water_mark(&self) -> c_int {
        let owed = match &self.cursor.data {
            Some(data) => (data.len - data.received) as usize,
            None if self.cursor.header_received > 0 || self.on_wire.count > 0 => {
                REPLY_HEADER_LEN - self.cursor.header_received
            }
            None => 1,
        };
        owed.min(WAKE_BYTES) as c_int
    }
}
