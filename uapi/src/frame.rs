//! Frames of the server I/O path (the second data path): fixed little-endian headers,
//! pipelined, replies matched to requests by handle.
//!
//! Request: [`RequestHeader`] (48 bytes) followed by `length` payload bytes for WRITE and HELLO.
//! Reply: [`ReplyHeader`] (24 bytes) followed by `length` payload bytes for a successful READ.

/// Magic of a request header ("SBLQ" little-endian).
pub const REQUEST_MAGIC: u32 = u32::from_le_bytes(*b"SBLQ");
/// Magic of a reply header ("SBLR" little-endian).
pub const REPLY_MAGIC: u32 = u32::from_le_bytes(*b"SBLR");
/// Frame protocol version.
pub const FRAME_VERSION: u16 = 1;
/// Encoded size of a request header.
pub const REQUEST_HEADER_LEN: usize = 48;
/// Encoded size of a reply header.
pub const REPLY_HEADER_LEN: usize = 24;
/// Largest payload of one request or reply; larger I/O is split by the sender.
pub const MAX_PAYLOAD: u32 = 1024 * 1024;
/// I/O offsets and lengths are multiples of this.
pub const SECTOR_SIZE: u32 = 512;

/// Operation of a request. Values are part of the ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Present the session token (payload) before any I/O on a connection.
    Hello = 1,
    /// Read `length` bytes at `offset`.
    Read = 2,
    /// Write the payload at `offset`.
    Write = 3,
    /// Make all completed writes durable.
    Flush = 4,
}

impl Op {
    fn from_u8(value: u8) -> Option<Op> {
        match value {
            1 => Some(Op::Hello),
            2 => Some(Op::Read),
            3 => Some(Op::Write),
            4 => Some(Op::Flush),
            _ => None,
        }
    }

    /// Whether a request with this op carries `length` payload bytes.
    pub fn has_payload(self) -> bool {
        matches!(self, Op::Hello | Op::Write)
    }
}

/// Request flag: the write must be durable when it completes (FUA).
pub const FLAG_FUA: u8 = 1;
const KNOWN_FLAGS: u8 = FLAG_FUA;

/// Why a header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than a header.
    Short,
    /// Magic number wrong: not a sanblk frame or the stream lost sync.
    BadMagic,
    /// A protocol version this side does not speak.
    BadVersion,
    /// Unknown operation.
    BadOp,
    /// Unknown flag bits or non-zero reserved field.
    BadFlags,
    /// Length above [`MAX_PAYLOAD`], or offset + length overflows.
    TooLarge,
    /// Offset or length not a multiple of [`SECTOR_SIZE`], or a zero-length READ/WRITE.
    Misaligned,
}

impl FrameError {
    /// Human-readable reason.
    pub fn message(self) -> &'static str {
        match self {
            FrameError::Short => "frame shorter than its header",
            FrameError::BadMagic => "bad frame magic",
            FrameError::BadVersion => "unsupported frame version",
            FrameError::BadOp => "unknown frame operation",
            FrameError::BadFlags => "unknown flags or non-zero reserved field",
            FrameError::TooLarge => "frame length too large",
            FrameError::Misaligned => "offset or length not sector aligned",
        }
    }
}

/// Header of a request from a client to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Operation.
    pub op: Op,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Chosen by the client, echoed in the reply.
    pub handle: u64,
    /// Volume the request addresses.
    pub volume_id: u64,
    /// Map epoch the client used; the server refuses stale epochs.
    pub epoch: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Byte length of the I/O (and of the payload for WRITE/HELLO).
    pub length: u32,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(raw)
}

impl RequestHeader {
    /// The HELLO that opens a connection: a session token of `token_len` bytes follows it.
    /// The server identifies the session by the token alone; the kernel also names its
    /// volume and epoch, for the server's log.
    pub fn hello(volume_id: u64, epoch: u64, token_len: u32) -> RequestHeader {
        RequestHeader {
            op: Op::Hello,
            flags: 0,
            handle: 0,
            volume_id,
            epoch,
            offset: 0,
            length: token_len,
        }
    }

    /// Encodes into the first [`REQUEST_HEADER_LEN`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8; REQUEST_HEADER_LEN]) {
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&FRAME_VERSION.to_le_bytes());
        out[6] = self.op as u8;
        out[7] = self.flags;
        out[8..16].copy_from_slice(&self.handle.to_le_bytes());
        out[16..24].copy_from_slice(&self.volume_id.to_le_bytes());
        out[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        out[32..40].copy_from_slice(&self.offset.to_le_bytes());
        out[40..44].copy_from_slice(&self.length.to_le_bytes());
        out[44..48].copy_from_slice(&0u32.to_le_bytes());
    }

    /// Decodes and validates a header; the payload (if any) follows it on the wire.
    pub fn decode(bytes: &[u8]) -> Result<RequestHeader, FrameError> {
        if bytes.len() < REQUEST_HEADER_LEN {
            return Err(FrameError::Short);
        }
        if le_u32(bytes, 0) != REQUEST_MAGIC {
            return Err(FrameError::BadMagic);
        }
        if le_u16(bytes, 4) != FRAME_VERSION {
            return Err(FrameError::BadVersion);
        }
        let op = Op::from_u8(bytes[6]).ok_or(FrameError::BadOp)?;
        let flags = bytes[7];
        if flags & !KNOWN_FLAGS != 0 || le_u32(bytes, 44) != 0 {
            return Err(FrameError::BadFlags);
        }
        let header = RequestHeader {
            op,
            flags,
            handle: le_u64(bytes, 8),
            volume_id: le_u64(bytes, 16),
            epoch: le_u64(bytes, 24),
            offset: le_u64(bytes, 32),
            length: le_u32(bytes, 40),
        };
        header.validate()?;
        Ok(header)
    }

    fn validate(&self) -> Result<(), FrameError> {
        if self.length > MAX_PAYLOAD {
            return Err(FrameError::TooLarge);
        }
        if self.offset.checked_add(self.length as u64).is_none() {
            return Err(FrameError::TooLarge);
        }
        match self.op {
            Op::Read | Op::Write => {
                if self.length == 0
                    || !self.length.is_multiple_of(SECTOR_SIZE)
                    || !self.offset.is_multiple_of(SECTOR_SIZE as u64)
                {
                    return Err(FrameError::Misaligned);
                }
            }
            Op::Hello => {
                if self.length == 0 || self.length > 64 {
                    return Err(FrameError::TooLarge);
                }
            }
            Op::Flush => {
                if self.length != 0 {
                    return Err(FrameError::TooLarge);
                }
            }
        }
        Ok(())
    }
}

/// Header of a reply from the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyHeader {
    /// Handle of the request this answers.
    pub handle: u64,
    /// 0 on success, a negative Linux errno otherwise (-ESTALE for a stale epoch).
    pub status: i32,
    /// Payload bytes that follow (READ data).
    pub length: u32,
}

impl ReplyHeader {
    /// Encodes into `out`.
    pub fn encode(&self, out: &mut [u8; REPLY_HEADER_LEN]) {
        out[0..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.status.to_le_bytes());
        out[8..16].copy_from_slice(&self.handle.to_le_bytes());
        out[16..20].copy_from_slice(&self.length.to_le_bytes());
        out[20..24].copy_from_slice(&0u32.to_le_bytes());
    }

    /// Decodes and validates a reply header.
    pub fn decode(bytes: &[u8]) -> Result<ReplyHeader, FrameError> {
        if bytes.len() < REPLY_HEADER_LEN {
            return Err(FrameError::Short);
        }
        if le_u32(bytes, 0) != REPLY_MAGIC {
            return Err(FrameError::BadMagic);
        }
        if le_u32(bytes, 20) != 0 {
            return Err(FrameError::BadFlags);
        }
        let status = le_u32(bytes, 4) as i32;
        let length = le_u32(bytes, 16);
        if length > MAX_PAYLOAD || (status != 0 && length != 0) {
            return Err(FrameError::TooLarge);
        }
        Ok(ReplyHeader {
            handle: le_u64(bytes, 8),
            status,
            length,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_request() -> RequestHeader {
        RequestHeader {
            op: Op::Write,
            flags: FLAG_FUA,
            handle: 0x0102_0304_0506_0708,
            volume_id: 7,
            epoch: 42,
            offset: 4096,
            length: 8192,
        }
    }

    #[test]
    fn request_round_trips() {
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        write_request().encode(&mut raw);
        assert_eq!(&raw[0..4], b"SBLQ");
        assert_eq!(RequestHeader::decode(&raw), Ok(write_request()));
    }

    #[test]
    fn request_layout_is_little_endian_at_fixed_offsets() {
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        write_request().encode(&mut raw);
        assert_eq!(raw[6], Op::Write as u8);
        assert_eq!(raw[8], 0x08);
        assert_eq!(raw[24], 42);
        assert_eq!(&raw[32..40], &4096u64.to_le_bytes());
    }

    #[test]
    fn hostile_requests_are_refused() {
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        write_request().encode(&mut raw);
        assert_eq!(RequestHeader::decode(&raw[..47]), Err(FrameError::Short));

        let mut bad = raw;
        bad[0] ^= 0xff;
        assert_eq!(RequestHeader::decode(&bad), Err(FrameError::BadMagic));

        let mut bad = raw;
        bad[4] = 9;
        assert_eq!(RequestHeader::decode(&bad), Err(FrameError::BadVersion));

        let mut bad = raw;
        bad[6] = 99;
        assert_eq!(RequestHeader::decode(&bad), Err(FrameError::BadOp));

        let mut bad = raw;
        bad[7] = 0x80;
        assert_eq!(RequestHeader::decode(&bad), Err(FrameError::BadFlags));

        let mut bad = raw;
        bad[47] = 1;
        assert_eq!(RequestHeader::decode(&bad), Err(FrameError::BadFlags));

        let mut huge = write_request();
        huge.length = MAX_PAYLOAD + 512;
        huge.encode(&mut bad);
        assert_eq!(RequestHeader::decode(&bad), Err(FrameError::TooLarge));

        let mut wrap = write_request();
        wrap.offset = u64::MAX - 511;
        wrap.encode(&mut bad);
        assert_eq!(RequestHeader::decode(&bad), Err(FrameError::TooLarge));

        let mut odd = write_request();
        odd.offset = 100;
        odd.encode(&mut bad);
        assert_eq!(RequestHeader::decode(&bad), Err(FrameError::Misaligned));

        let mut empty = write_request();
        empty.length = 0;
        empty.encode(&mut bad);
        assert_eq!(RequestHeader::decode(&bad), Err(FrameError::Misaligned));

        let mut flush = write_request();
        flush.op = Op::Flush;
        flush.encode(&mut bad);
        assert_eq!(RequestHeader::decode(&bad), Err(FrameError::TooLarge));
        flush.length = 0;
        flush.encode(&mut bad);
        assert_eq!(RequestHeader::decode(&bad), Ok(flush));
    }

    #[test]
    fn reply_round_trips_and_hostile_replies_are_refused() {
        let reply = ReplyHeader {
            handle: 99,
            status: 0,
            length: 4096,
        };
        let mut raw = [0u8; REPLY_HEADER_LEN];
        reply.encode(&mut raw);
        assert_eq!(ReplyHeader::decode(&raw), Ok(reply));

        let mut bad = raw;
        bad[1] ^= 1;
        assert_eq!(ReplyHeader::decode(&bad), Err(FrameError::BadMagic));

        let error_with_data = ReplyHeader {
            handle: 1,
            status: -5,
            length: 512,
        };
        error_with_data.encode(&mut bad);
        assert_eq!(ReplyHeader::decode(&bad), Err(FrameError::TooLarge));

        let stale = ReplyHeader {
            handle: 1,
            status: -116,
            length: 0,
        };
        stale.encode(&mut bad);
        assert_eq!(ReplyHeader::decode(&bad), Ok(stale));
    }
}
