//! NBD wire formats: magic numbers, option and command values, headers, and names for
//! messages and logs, shared by the server and the client.

// --- Magic numbers ----------------------------------------------------------------------------

/// First 8 bytes a server sends ("NBDMAGIC").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second 8 bytes of a newstyle greeting, and the start of every option request ("IHAVEOPT").
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// What an old-style server sends instead of [`IHAVEOPT`] (it has no export names).
pub const CLISERV_MAGIC: u64 = 0x4202_8186_1253;
/// Start of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// --- Handshake flags (server, 16 bits) and client flags (32 bits) -----------------------------

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// --- Options ----------------------------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// --- Option reply types -----------------------------------------------------------------------

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
/// Set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR + 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR + 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR + 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR + 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR + 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR + 9;

// --- Information types (NBD_REP_INFO, requested by NBD_OPT_INFO and NBD_OPT_GO) ---------------

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;
/// Payload of an `NBD_INFO_EXPORT` reply: type, size, transmission flags.
pub const INFO_EXPORT_LEN: usize = 2 + 8 + 2;
/// Payload of an `NBD_INFO_BLOCK_SIZE` reply: type, minimum, preferred, maximum.
pub const INFO_BLOCK_SIZE_LEN: usize = 2 + 4 + 4 + 4;

// --- Transmission flags (16 bits, per export) -------------------------------------------------

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// --- Commands and command flags ---------------------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// --- Structured replies -----------------------------------------------------------------------

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Set in every error chunk type.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR + 2;

// --- Errors in replies (the protocol's own values, which happen to be Linux errnos) -----------

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// --- Metadata contexts ------------------------------------------------------------------------

/// The standard context: flags [`STATE_HOLE`] and [`STATE_ZERO`].
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// sanblk's context: which blocks changed since the previous snapshot of the volume.
pub const CHANGED_CONTEXT: &str = "sanblk:changed";
/// In [`CHANGED_CONTEXT`] status: the block changed since the previous snapshot.
pub const CHANGED_FLAG: u32 = 1;

// --- Limits -----------------------------------------------------------------------------------

/// Largest option request or option reply payload either end accepts. Names and query lists
/// are a few hundred bytes; a peer announcing more is broken or hostile.
pub const MAX_OPTION_LENGTH: u32 = 64 * 1024;
/// The protocol's limit on strings (export names, context names, error messages).
pub const MAX_STRING_LENGTH: usize = 4096;
/// Largest READ (and WRITE payload) the server handles, the size the protocol says no peer
/// may treat as a denial of service (2^25).
pub const MAX_REQUEST_LENGTH: u32 = 32 << 20;
/// Most descriptors in one block status chunk: the server stops there (the protocol lets it
/// answer short), and the client refuses chunks announcing more.
pub const MAX_STATUS_DESCRIPTORS: usize = 64 * 1024;

// --- Wire headers -----------------------------------------------------------------------------

/// Option request header: IHAVEOPT, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Request: magic, command flags, command, cookie, offset, length.
pub const REQUEST_LEN: usize = 28;
/// Simple reply: magic, error, cookie.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header: magic, flags, type, cookie, payload length.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Zeroes a server sends after its `NBD_OPT_EXPORT_NAME` answer unless the client asked for
/// none.
pub const EXPORT_NAME_PADDING: usize = 124;

/// A client's option request header (its data follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut raw = [0u8; OPTION_HEADER_LEN];
        raw[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        raw[8..12].copy_from_slice(&self.option.to_be_bytes());
        raw[12..16].copy_from_slice(&self.length.to_be_bytes());
        raw
    }

    /// `None` if the header does not start with [`IHAVEOPT`].
    pub fn decode(raw: &[u8; OPTION_HEADER_LEN]) -> Option<OptionHeader> {
        if be_u64(&raw[0..8]) != IHAVEOPT {
            return None;
        }
        Some(OptionHeader {
            option: be_u32(&raw[8..12]),
            length: be_u32(&raw[12..16]),
        })
    }
}

/// A server's option reply header (its data follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub fn encode(&self) -> [u8; OPTION_REPLY_HEADER_LEN] {
        let mut raw = [0u8; OPTION_REPLY_HEADER_LEN];
        raw[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        raw[8..12].copy_from_slice(&self.option.to_be_bytes());
        raw[12..16].copy_from_slice(&self.reply.to_be_bytes());
        raw[16..20].copy_from_slice(&self.length.to_be_bytes());
        raw
    }

    /// `None` if the header does not start with [`OPTION_REPLY_MAGIC`].
    pub fn decode(raw: &[u8; OPTION_REPLY_HEADER_LEN]) -> Option<OptionReplyHeader> {
        if be_u64(&raw[0..8]) != OPTION_REPLY_MAGIC {
            return None;
        }
        Some(OptionReplyHeader {
            option: be_u32(&raw[8..12]),
            reply: be_u32(&raw[12..16]),
            length: be_u32(&raw[16..20]),
        })
    }
}

/// A transmission request (a WRITE's data follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    /// Chosen by the client, echoed in every reply to the request (the spec's "handle").
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut raw = [0u8; REQUEST_LEN];
        raw[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        raw[4..6].copy_from_slice(&self.flags.to_be_bytes());
        raw[6..8].copy_from_slice(&self.command.to_be_bytes());
        raw[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        raw[16..24].copy_from_slice(&self.offset.to_be_bytes());
        raw[24..28].copy_from_slice(&self.length.to_be_bytes());
        raw
    }

    /// `None` if the request does not start with [`REQUEST_MAGIC`].
    pub fn decode(raw: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be_u32(&raw[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be_u16(&raw[4..6]),
            command: be_u16(&raw[6..8]),
            cookie: be_u64(&raw[8..16]),
            offset: be_u64(&raw[16..24]),
            length: be_u32(&raw[24..28]),
        })
    }
}

/// A simple reply (a successful READ's data follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut raw = [0u8; SIMPLE_REPLY_LEN];
        raw[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        raw[4..8].copy_from_slice(&self.error.to_be_bytes());
        raw[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        raw
    }
}

/// A structured reply chunk header (its payload follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut raw = [0u8; CHUNK_HEADER_LEN];
        raw[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        raw[4..6].copy_from_slice(&self.flags.to_be_bytes());
        raw[6..8].copy_from_slice(&self.kind.to_be_bytes());
        raw[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        raw[16..20].copy_from_slice(&self.length.to_be_bytes());
        raw
    }
}

pub(super) fn be_u16(bytes: &[u8]) -> u16 {
    let mut raw = [0u8; 2];
    raw.copy_from_slice(bytes);
    u16::from_be_bytes(raw)
}

pub(super) fn be_u32(bytes: &[u8]) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(bytes);
    u32::from_be_bytes(raw)
}

pub(super) fn be_u64(bytes: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(bytes);
    u64::from_be_bytes(raw)
}

// --- Names for messages and logs --------------------------------------------------------------

pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "an unknown option",
    }
}

pub fn reply_name(reply: u32) -> &'static str {
    match reply {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "unsupported option (NBD_REP_ERR_UNSUP)",
        REP_ERR_POLICY => "forbidden by policy (NBD_REP_ERR_POLICY)",
        REP_ERR_INVALID => "invalid option (NBD_REP_ERR_INVALID)",
        REP_ERR_PLATFORM => "unsupported on this platform (NBD_REP_ERR_PLATFORM)",
        REP_ERR_TLS_REQD => "TLS required (NBD_REP_ERR_TLS_REQD)",
        REP_ERR_UNKNOWN => "unknown export (NBD_REP_ERR_UNKNOWN)",
        REP_ERR_SHUTDOWN => "server shutting down (NBD_REP_ERR_SHUTDOWN)",
        REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required (NBD_REP_ERR_BLOCK_SIZE_REQD)",
        REP_ERR_TOO_BIG => "request too big (NBD_REP_ERR_TOO_BIG)",
        _ if reply & REP_FLAG_ERROR != 0 => "unknown error reply",
        _ => "unknown reply",
    }
}

pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "an unknown command",
    }
}

/// The name of a request error value, `None` for values the protocol does not define.
pub fn error_name(error: u32) -> Option<&'static str> {
    let name = match error {
        EPERM => "operation not permitted (EPERM)",
        EIO => "input/output error (EIO)",
        ENOMEM => "out of memory (ENOMEM)",
        EINVAL => "invalid argument (EINVAL)",
        ENOSPC => "no space left (ENOSPC)",
        EOVERFLOW => "value too large (EOVERFLOW)",
        ENOTSUP => "not supported (ENOTSUP)",
        ESHUTDOWN => "server shutting down (ESHUTDOWN)",
        _ => return None,
    };
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_bad_magic() {
        let request = Request {
            flags: CMD_FLAG_REQ_ONE,
            command: CMD_BLOCK_STATUS,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let raw = request.encode();
        assert_eq!(&raw[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::decode(&raw), Some(request));
        let mut bad = raw;
        bad[0] ^= 1;
        assert_eq!(Request::decode(&bad), None);

        let option = OptionHeader {
            option: OPT_GO,
            length: 7,
        };
        let raw = option.encode();
        assert_eq!(&raw[0..8], b"IHAVEOPT");
        assert_eq!(OptionHeader::decode(&raw), Some(option));

        let reply = OptionReplyHeader {
            option: OPT_GO,
            reply: REP_ERR_UNKNOWN,
            length: 3,
        };
        let raw = reply.encode();
        assert_eq!(
            &raw[0..8],
            &[0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]
        );
        assert_eq!(OptionReplyHeader::decode(&raw), Some(reply));
        assert_eq!(NBDMAGIC.to_be_bytes(), *b"NBDMAGIC");
        assert_eq!(REP_ERR_UNKNOWN, 0x8000_0006);
        assert_eq!(REPLY_TYPE_ERROR_OFFSET, 0x8002);
    }
}
