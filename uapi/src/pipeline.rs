//! Bookkeeping of a pipelined server I/O connection, shared by the kernel module and tests:
//! the requests on the wire (matched to replies by handle, never trusted as a pointer), the
//! cutting of a large I/O into requests of at most [`MAX_PAYLOAD`] bytes, and the reply
//! stream reader, which takes bytes in whatever pieces the transport hands them.

use crate::frame::{FrameError, Op, ReplyHeader, MAX_PAYLOAD, REPLY_HEADER_LEN};

/// The handle after `handle` (0 is the HELLO's, never used for I/O).
pub fn next_handle(handle: u64) -> u64 {
    match handle.wrapping_add(1) {
        0 => 1,
        next => next,
    }
}

/// The next request of an I/O of `total` bytes of which `done` are answered: its offset in
/// the I/O and its length (at most [`MAX_PAYLOAD`]); `None` once all is done. An I/O without
/// payload (FLUSH) is one request of length 0.
pub fn next_chunk(total: u32, done: u32) -> Option<(u32, u32)> {
    if total == 0 {
        return if done == 0 { Some((0, 0)) } else { None };
    }
    if done >= total {
        return None;
    }
    Some((done, (total - done).min(MAX_PAYLOAD)))
}

/// Payload bytes a reply to a request of `op` and `len` bytes carries for `status`.
pub fn reply_data_len(op: Op, status: i32, len: u32) -> u32 {
    if status == 0 && op == Op::Read {
        len
    } else {
        0
    }
}

/// A request on the wire: its handle, the part of its I/O it carries and what it belongs to.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<T> {
    /// Handle sent with the request.
    pub handle: u64,
    /// Offset of the request in its I/O.
    pub offset: u32,
    /// Payload length.
    pub len: u32,
    /// The I/O it belongs to.
    pub item: T,
}

/// At most `N` requests on the wire.
pub struct InFlight<T, const N: usize> {
    slots: [Option<Request<T>>; N],
    count: usize,
    bytes: u64,
}

impl<T, const N: usize> Default for InFlight<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const N: usize> InFlight<T, N> {
    /// Nothing on the wire.
    pub fn new() -> Self {
        InFlight {
            slots: core::array::from_fn(|_| None),
            count: 0,
            bytes: 0,
        }
    }

    /// Requests on the wire.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether nothing is on the wire.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Payload bytes on the wire.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether a request of `len` payload bytes may go now: a free slot, and at most `window`
    /// bytes on the wire with it (a request larger than the window goes when the wire is
    /// empty).
    pub fn has_room(&self, len: u32, window: u64) -> bool {
        self.count < N && (self.count == 0 || self.bytes + u64::from(len) <= window)
    }

    /// Puts a request on the wire; `Err` gives it back when all `N` slots are taken.
    pub fn add(&mut self, request: Request<T>) -> Result<(), Request<T>> {
        if self.count == N {
            return Err(request);
        }
        self.bytes += u64::from(request.len);
        self.slots[self.count] = Some(request);
        self.count += 1;
        Ok(())
    }

    fn position(&self, handle: u64) -> Option<usize> {
        self.slots[..self.count]
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.handle == handle))
    }

    /// The request sent with `handle`, left on the wire.
    pub fn get(&self, handle: u64) -> Option<&Request<T>> {
        self.slots[self.position(handle)?].as_ref()
    }

    /// Takes the request answered by `handle` off the wire (`None`: unknown, or answered
    /// already).
    pub fn remove(&mut self, handle: u64) -> Option<Request<T>> {
        let i = self.position(handle)?;
        self.count -= 1;
        self.slots.swap(i, self.count);
        let request = self.slots[self.count].take()?;
        self.bytes -= u64::from(request.len);
        Some(request)
    }

    /// Takes every request off the wire (after a lost connection).
    pub fn drain(&mut self) -> impl Iterator<Item = Request<T>> + '_ {
        let count = core::mem::take(&mut self.count);
        self.bytes = 0;
        self.slots[..count].iter_mut().filter_map(Option::take)
    }
}

/// Where the next received bytes go, as [`ReplyReader::want`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Up to this many bytes of a reply header.
    Header(usize),
    /// Up to `len` bytes of READ data for request `handle`, from byte `at` of its payload.
    Data {
        /// The request the data answers.
        handle: u64,
        /// Payload bytes received so far.
        at: u32,
        /// Payload bytes still missing.
        len: u32,
    },
    /// Nothing is expected: leave further bytes unread.
    Nothing,
}

/// The reply stream between two reads: a partly received header, or the READ data arriving.
#[derive(Default)]
pub struct ReplyReader {
    header: [u8; REPLY_HEADER_LEN],
    header_len: usize,
    data: Option<(u64, u32, u32)>,
}

impl ReplyReader {
    /// Where the next bytes go; `expecting`: whether requests await an answer.
    pub fn want(&self, expecting: bool) -> Want {
        if let Some((handle, at, len)) = self.data {
            return Want::Data {
                handle,
                at,
                len: len - at,
            };
        }
        if self.header_len == 0 && !expecting {
            return Want::Nothing;
        }
        Want::Header(REPLY_HEADER_LEN - self.header_len)
    }

    /// Appends header bytes (at most what [`Want::Header`] asked for); returns the header once
    /// it is whole.
    pub fn push_header(&mut self, bytes: &[u8]) -> Result<Option<ReplyHeader>, FrameError> {
        let n = bytes.len().min(REPLY_HEADER_LEN - self.header_len);
        self.header[self.header_len..][..n].copy_from_slice(&bytes[..n]);
        self.header_len += n;
        if self.header_len < REPLY_HEADER_LEN {
            return Ok(None);
        }
        self.header_len = 0;
        ReplyHeader::decode(&self.header).map(Some)
    }

    /// The reply just decoded carries `len` bytes of READ data for `handle`.
    pub fn expect_data(&mut self, handle: u64, len: u32) {
        if len > 0 {
            self.data = Some((handle, 0, len));
        }
    }

    /// `n` bytes of the expected data arrived (at most what [`Want::Data`] asked for);
    /// returns the handle once all of it has.
    pub fn push_data(&mut self, n: u32) -> Option<u64> {
        let (handle, at, len) = self.data.as_mut()?;
        *at = (*at + n).min(*len);
        if at == len {
            let handle = *handle;
            self.data = None;
            return Some(handle);
        }
        None
    }

    /// Bytes the peer certainly still sends (the rest of the reply under way, or a header
    /// when requests await an answer; 1 when none does), at most `max`: a receiver can sleep
    /// until that many have arrived without holding back an answer.
    pub fn low_water_mark(&self, expecting: bool, max: usize) -> usize {
        let owed = match self.want(expecting) {
            Want::Data { len, .. } => len as usize,
            Want::Header(n) => n,
            Want::Nothing => 1,
        };
        owed.clamp(1, max.max(1))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::frame::ReplyHeader;
    use proptest::prelude::*;
    use std::vec::Vec;

    #[test]
    fn handles_skip_zero() {
        assert_eq!(next_handle(0), 1);
        assert_eq!(next_handle(7), 8);
        assert_eq!(next_handle(u64::MAX), 1);
    }

    #[test]
    fn chunks_cover_an_io_once() {
        assert_eq!(next_chunk(0, 0), Some((0, 0)));
        assert_eq!(next_chunk(0, 1), None);
        assert_eq!(next_chunk(4096, 0), Some((0, 4096)));
        assert_eq!(next_chunk(4096, 4096), None);
        let total = 3 * MAX_PAYLOAD + 512;
        assert_eq!(
            next_chunk(total, 3 * MAX_PAYLOAD),
            Some((3 * MAX_PAYLOAD, 512))
        );
    }

    #[test]
    fn window_admits_one_large_request_alone() {
        let mut wire: InFlight<u8, 2> = InFlight::new();
        assert!(wire.has_room(MAX_PAYLOAD, 4096));
        wire.add(Request {
            handle: 1,
            offset: 0,
            len: 4096,
            item: 0,
        })
        .unwrap();
        assert!(!wire.has_room(1, 4096));
        assert!(wire.has_room(0, 4096));
        wire.add(Request {
            handle: 2,
            offset: 0,
            len: 0,
            item: 1,
        })
        .unwrap();
        assert!(!wire.has_room(0, u64::MAX));
        assert!(wire
            .add(Request {
                handle: 3,
                offset: 0,
                len: 0,
                item: 2
            })
            .is_err());
        assert_eq!(wire.remove(1).map(|r| r.item), Some(0));
        assert_eq!(wire.remove(1), None);
        assert_eq!(wire.bytes(), 0);
    }

    #[test]
    fn reader_wants_nothing_when_idle() {
        let reader = ReplyReader::default();
        assert_eq!(reader.want(false), Want::Nothing);
        assert_eq!(reader.want(true), Want::Header(REPLY_HEADER_LEN));
        assert_eq!(reader.low_water_mark(false, 100), 1);
    }

    fn reply_strategy() -> impl Strategy<Value = (u64, i32, u32)> {
        (
            1u64..1000,
            prop_oneof![Just(0i32), Just(-5), Just(-116)],
            0u32..3000,
        )
            .prop_map(|(handle, status, len)| (handle, status, if status == 0 { len } else { 0 }))
    }

    proptest! {
        /// Any replies, cut into any pieces, are read back as they were sent.
        #[test]
        fn reader_reassembles_any_cut(replies in proptest::collection::vec(reply_strategy(), 1..20),
                                      cuts in proptest::collection::vec(1usize..64, 1..400)) {
            let mut stream = Vec::new();
            for (handle, status, len) in &replies {
                let mut raw = [0u8; REPLY_HEADER_LEN];
                ReplyHeader { handle: *handle, status: *status, length: *len }.encode(&mut raw);
                stream.extend_from_slice(&raw);
                stream.extend((0..*len).map(|i| (i as u8) ^ (*handle as u8)));
            }
            let mut reader = ReplyReader::default();
            let mut got = Vec::new();
            let mut data: Vec<u8> = Vec::new();
            let mut pending = None;
            let mut at = 0usize;
            let mut cut = cuts.iter().cycle();
            while at < stream.len() {
                let mut take = (*cut.next().unwrap()).min(stream.len() - at);
                while take > 0 {
                    match reader.want(true) {
                        Want::Header(n) => {
                            let n = n.min(take);
                            if let Some(header) = reader.push_header(&stream[at..at + n]).unwrap() {
                                let len = reply_data_len(Op::Read, header.status, header.length);
                                reader.expect_data(header.handle, len);
                                if len == 0 {
                                    got.push((header.handle, header.status, 0, Vec::new()));
                                } else {
                                    pending = Some(header);
                                    data.clear();
                                }
                            }
                            at += n;
                            take -= n;
                        }
                        Want::Data { handle, at: done, len } => {
                            let n = (len as usize).min(take);
                            prop_assert_eq!(done as usize, data.len());
                            data.extend_from_slice(&stream[at..at + n]);
                            if let Some(done) = reader.push_data(n as u32) {
                                prop_assert_eq!(Some(done), pending.map(|h| h.handle));
                                let header = pending.take().unwrap();
                                got.push((handle, header.status, header.length, data.clone()));
                            }
                            at += n;
                            take -= n;
                        }
                        Want::Nothing => unreachable!(),
                    }
                }
            }
            prop_assert_eq!(got.len(), replies.len());
            for ((handle, status, len), (h, s, l, bytes)) in replies.iter().zip(got.iter()) {
                prop_assert_eq!((handle, status, len), (h, s, l));
                let expected: Vec<u8> = (0..*len).map(|i| (i as u8) ^ (*handle as u8)).collect();
                prop_assert_eq!(&expected, bytes);
            }
        }

        /// The wire list behaves as a map from handle to request, with its byte count.
        #[test]
        fn in_flight_matches_a_model(ops in proptest::collection::vec((any::<bool>(), 0u64..12, 0u32..5000), 1..200)) {
            let mut wire: InFlight<u64, 8> = InFlight::new();
            let mut model: Vec<(u64, u32)> = Vec::new();
            for (add, handle, len) in ops {
                if add {
                    if model.iter().any(|(h, _)| *h == handle) {
                        continue;
                    }
                    let result = wire.add(Request { handle, offset: 0, len, item: handle });
                    prop_assert_eq!(result.is_ok(), model.len() < 8);
                    if result.is_ok() {
                        model.push((handle, len));
                    }
                } else {
                    let expected = model.iter().position(|(h, _)| *h == handle).map(|i| model.remove(i));
                    let removed = wire.remove(handle).map(|r| (r.item, r.len));
                    prop_assert_eq!(removed, expected);
                }
                prop_assert_eq!(wire.len(), model.len());
                prop_assert_eq!(wire.bytes(), model.iter().map(|(_, l)| u64::from(*l)).sum::<u64>());
                for (h, l) in &model {
                    prop_assert_eq!(wire.get(*h).map(|r| r.len), Some(*l));
                }
            }
            let drained: Vec<u64> = wire.drain().map(|r| r.item).collect();
            prop_assert_eq!(drained.len(), model.len());
            prop_assert!(wire.is_empty());
        }

        /// Chunks of any I/O are contiguous, within one frame, and cover it exactly.
        #[test]
        fn chunks_tile_any_io(total in 0u32..(8 * MAX_PAYLOAD)) {
            let mut done = 0u32;
            let mut count = 0;
            while let Some((offset, len)) = next_chunk(total, done) {
                prop_assert_eq!(offset, done);
                prop_assert!(len <= MAX_PAYLOAD);
                prop_assert!(len > 0 || total == 0);
                done += len;
                count += 1;
                if total == 0 {
                    done = 1;
                }
            }
            prop_assert_eq!(count, if total == 0 { 1 } else { total.div_ceil(MAX_PAYLOAD) });
        }

        /// Request headers survive encoding for any valid field values.
        #[test]
        fn request_headers_round_trip(handle in any::<u64>(), volume_id in any::<u64>(), epoch in any::<u64>(),
                                      sectors in 0u64..(1 << 40), len_sectors in 1u32..=(MAX_PAYLOAD / 512), fua in any::<bool>()) {
            use crate::frame::{RequestHeader, FLAG_FUA, REQUEST_HEADER_LEN};
            let header = RequestHeader {
                op: Op::Write,
                flags: if fua { FLAG_FUA } else { 0 },
                handle,
                volume_id,
                epoch,
                offset: sectors * 512,
                length: len_sectors * 512,
            };
            let mut raw = [0u8; REQUEST_HEADER_LEN];
            header.encode(&mut raw);
            prop_assert_eq!(RequestHeader::decode(&raw), Ok(header));
        }
    }
}
