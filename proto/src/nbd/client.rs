//! An NBD client for one export (see [`NbdClient`]), bounding everything it reads from the
//! server.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::UnixStream;

use crate::unix_path::SocketPath;

use super::wire::*;

/// How long the handshake, and then each request's reply, may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Option replies the client reads for one option before calling the server broken (a server
/// answers a meta context request with one reply per context it selects, then an ack).
const MAX_REPLIES_PER_OPTION: usize = 64;
/// Characters of a server's error message kept in an [`NbdError`].
const MAX_SHOWN_MESSAGE_CHARS: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("NBD connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol; the connection is unusable.
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// The server answered an option of the handshake with an error reply.
    #[error("the NBD server refused {}: {}{}", option_name(*.option), reply_name(*.reply), MessageSuffix(.message))]
    OptionRefused {
        option: u32,
        reply: u32,
        message: String,
    },
    /// The server failed a request; the connection is still usable.
    #[error("{} failed: {}{}", command_name(*.command), ErrorValue(*.error), MessageSuffix(.message))]
    Request {
        command: u16,
        error: u32,
        message: String,
    },
    #[error("the NBD server did not agree to the {CHANGED_CONTEXT} metadata context")]
    ChangedContextNotNegotiated,
    /// Refused before anything was sent.
    #[error("invalid NBD request: {0}")]
    InvalidArgument(String),
    #[error("no answer from the NBD server within {0:?}")]
    Timeout(Duration),
    #[error("the NBD connection is unusable after an earlier error")]
    Broken,
}

impl NbdError {
    /// The option reply type, if the server refused an option.
    pub fn option_reply(&self) -> Option<u32> {
        match self {
            NbdError::OptionRefused { reply, .. } => Some(*reply),
            _ => None,
        }
    }

    /// The protocol error value, if the server failed a request.
    pub fn request_error(&self) -> Option<u32> {
        match self {
            NbdError::Request { error, .. } => Some(*error),
            _ => None,
        }
    }

    /// Whether the stream may be out of step with the server after this error, so that no
    /// further request can be matched to its reply.
    fn breaks_connection(&self) -> bool {
        matches!(
            self,
            NbdError::Io(_) | NbdError::Protocol(_) | NbdError::Timeout(_)
        )
    }
}

/// A request's error value by name, or by number if the protocol does not define it.
struct ErrorValue(u32);

impl fmt::Display for ErrorValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match error_name(self.0) {
            Some(name) => f.write_str(name),
            None => write!(f, "unknown error {}", self.0),
        }
    }
}

/// ": message", or nothing for an empty message.
struct MessageSuffix<'a>(&'a String);

impl fmt::Display for MessageSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, ": {}", self.0)
        }
    }
}

/// A server's message as the client keeps it: cut short, and with control characters replaced
/// so it cannot garble a terminal or a log line.
fn server_message(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .chars()
        .take(MAX_SHOWN_MESSAGE_CHARS)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

fn protocol(message: impl Into<String>) -> NbdError {
    NbdError::Protocol(message.into())
}

/// What a handshake settled.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    size: u64,
    transmission_flags: u16,
    structured_replies: bool,
    changed_context_id: Option<u32>,
}

/// An NBD client for one export, one request in flight at a time. `S` is the byte stream:
/// a Unix socket ([`NbdClient::connect_unix`]) or anything else ([`NbdClient::handshake`]),
/// such as a TCP stream.
pub struct NbdClient<S = UnixStream> {
    stream: BufStream<S>,
    negotiated: Negotiated,
    next_cookie: u64,
    /// Set once a reply could not be read whole: later replies could not be told apart.
    broken: bool,
}

impl NbdClient<UnixStream> {
    /// Connects to the server's Unix socket and negotiates `export`, asking for the
    /// [`CHANGED_CONTEXT`] metadata context if `want_changed_context`. A server that does not
    /// offer the context is not an error here: [`NbdClient::changed_extents`] reports it.
    pub async fn connect_unix(
        path: &Path,
        export: &str,
        want_changed_context: bool,
    ) -> Result<NbdClient, NbdError> {
        let connect_error = |source| NbdError::Connect {
            target: path.display().to_string(),
            source,
        };
        let reachable = SocketPath::new(path).map_err(connect_error)?;
        let stream =
            match tokio::time::timeout(REPLY_TIMEOUT, UnixStream::connect(reachable.as_path()))
                .await
            {
                Ok(connected) => connected.map_err(connect_error)?,
                Err(_) => return Err(NbdError::Timeout(REPLY_TIMEOUT)),
            };
        NbdClient::handshake(stream, export, want_changed_context).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> NbdClient<S> {
    /// Negotiates `export` over an already connected stream (see
    /// [`NbdClient::connect_unix`]).
    pub async fn handshake(
        stream: S,
        export: &str,
        want_changed_context: bool,
    ) -> Result<NbdClient<S>, NbdError> {
        if export.len() > MAX_STRING_LENGTH {
            return Err(NbdError::InvalidArgument(format!(
                "export name of {} bytes (the protocol allows {MAX_STRING_LENGTH})",
                export.len()
            )));
        }
        let mut stream = BufStream::new(stream);
        let negotiated = match tokio::time::timeout(
            REPLY_TIMEOUT,
            negotiate(&mut stream, export, want_changed_context),
        )
        .await
        {
            Ok(negotiated) => negotiated?,
            Err(_) => return Err(NbdError::Timeout(REPLY_TIMEOUT)),
        };
        Ok(NbdClient {
            stream,
            negotiated,
            next_cookie: 1,
            broken: false,
        })
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.negotiated.size
    }

    /// The export's transmission flags (`FLAG_*`), as the server sent them.
    pub fn transmission_flags(&self) -> u16 {
        self.negotiated.transmission_flags
    }

    pub fn structured_replies(&self) -> bool {
        self.negotiated.structured_replies
    }

    /// Whether the server refuses writes to the export ([`FLAG_READ_ONLY`]).
    pub fn read_only(&self) -> bool {
        self.negotiated.transmission_flags & FLAG_READ_ONLY != 0
    }

    /// Whether the server agreed to [`CHANGED_CONTEXT`], which [`NbdClient::changed_extents`]
    /// needs.
    pub fn has_changed_context(&self) -> bool {
        self.negotiated.changed_context_id.is_some()
    }

    /// Reads `length` bytes at `offset`.
    pub async fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, NbdError> {
        let mut data = Vec::new();
        self.read_into(offset, length, &mut data).await?;
        Ok(data)
    }

    /// Reads `length` bytes at `offset` into `data` (resized to `length`), so a caller that
    /// streams a device reuses one buffer instead of faulting in a fresh one per request.
    /// After an error, what `data` holds is unspecified.
    pub async fn read_into(
        &mut self,
        offset: u64,
        length: u32,
        data: &mut Vec<u8>,
    ) -> Result<(), NbdError> {
        self.check_range(offset, length, MAX_REQUEST_LENGTH)?;
        if length == 0 {
            data.clear();
            return Ok(());
        }
        let request = self.request(CMD_READ, offset, length);
        let structured = self.negotiated.structured_replies;
        let answered = tokio::time::timeout(REPLY_TIMEOUT, async {
            self.send(&request).await?;
            read_read_reply(&mut self.stream, &request, structured, data).await
        })
        .await;
        self.settle(answered)
    }

    /// The [`CHANGED_CONTEXT`] status of the range from `offset`: consecutive `(length,
    /// flags)` runs, flags [`CHANGED_FLAG`] or 0. The server may describe less than `length`
    /// bytes (ask again from where the runs end) and its last run may reach beyond it.
    pub async fn changed_extents(
        &mut self,
        offset: u64,
        length: u32,
    ) -> Result<Vec<(u64, u32)>, NbdError> {
        let context_id = self
            .negotiated
            .changed_context_id
            .ok_or(NbdError::ChangedContextNotNegotiated)?;
        if length == 0 {
            return Err(NbdError::InvalidArgument(
                "block status of an empty range".to_string(),
            ));
        }
        self.check_range(offset, length, u32::MAX)?;
        let request = self.request(CMD_BLOCK_STATUS, offset, length);
        let answered = tokio::time::timeout(REPLY_TIMEOUT, async {
            self.send(&request).await?;
            read_status_reply(&mut self.stream, &request, context_id).await
        })
        .await;
        self.settle(answered)
    }

    /// Writes `data` (at most [`MAX_REQUEST_LENGTH`] bytes) at `offset`. With `fua` the write
    /// is durable when this returns: sent with `NBD_CMD_FLAG_FUA` if the server offers it,
    /// else followed by [`NbdClient::flush`].
    ///
    /// Writes to a read-only export, and writes reaching beyond the export, are refused
    /// before anything is sent.
    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::Broken);
        }
        if self.read_only() {
            return Err(NbdError::InvalidArgument(
                "the export is read-only".to_string(),
            ));
        }
        let length = u32::try_from(data.len())
            .ok()
            .filter(|&length| length <= MAX_REQUEST_LENGTH)
            .ok_or_else(|| {
                NbdError::InvalidArgument(format!(
                    "{} bytes at once (at most {MAX_REQUEST_LENGTH})",
                    data.len()
                ))
            })?;
        self.check_range(offset, length, MAX_REQUEST_LENGTH)?;
        if length == 0 {
            return Ok(());
        }
        let fua_offered = self.negotiated.transmission_flags & FLAG_SEND_FUA != 0;
        let mut request = self.request(CMD_WRITE, offset, length);
        if fua && fua_offered {
            request.flags |= CMD_FLAG_FUA;
        }
        let structured = self.negotiated.structured_replies;
        let answered = tokio::time::timeout(REPLY_TIMEOUT, async {
            self.stream.write_all(&request.encode()).await?;
            self.stream.write_all(data).await?;
            self.stream.flush().await?;
            read_ack_reply(&mut self.stream, &request, structured).await
        })
        .await;
        self.settle(answered)?;
        if fua && !fua_offered {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes every write the server acknowledged so far durable (`NBD_CMD_FLUSH`). A server
    /// that does not offer flush ([`FLAG_SEND_FLUSH`]) must not be sent one; it has no write
    /// cache to flush, so there is nothing to do (qemu's client does the same).
    pub async fn flush(&mut self) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::Broken);
        }
        if self.negotiated.transmission_flags & FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        let request = self.request(CMD_FLUSH, 0, 0);
        let structured = self.negotiated.structured_replies;
        let answered = tokio::time::timeout(REPLY_TIMEOUT, async {
            self.send(&request).await?;
            read_ack_reply(&mut self.stream, &request, structured).await
        })
        .await;
        self.settle(answered)
    }

    /// Tells the server the session is over (`NBD_CMD_DISC`) and closes the connection.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        if self.broken {
            return Ok(());
        }
        let request = self.request(CMD_DISC, 0, 0);
        let sent = tokio::time::timeout(REPLY_TIMEOUT, async {
            self.send(&request).await?;
            self.stream.shutdown().await?;
            Ok::<(), NbdError>(())
        })
        .await;
        self.settle(sent)
    }

    fn check_range(&self, offset: u64, length: u32, max_length: u32) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::Broken);
        }
        if length > max_length {
            return Err(NbdError::InvalidArgument(format!(
                "{length} bytes at once (at most {max_length})"
            )));
        }
        match offset.checked_add(u64::from(length)) {
            Some(end) if end <= self.negotiated.size => Ok(()),
            _ => Err(NbdError::InvalidArgument(format!(
                "{length} bytes at offset {offset} are beyond the end of the export ({} bytes)",
                self.negotiated.size
            ))),
        }
    }

    fn request(&mut self, command: u16, offset: u64, length: u32) -> Request {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        }
    }

    async fn send(&mut self, request: &Request) -> Result<(), NbdError> {
        self.stream.write_all(&request.encode()).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Marks the connection broken if the exchange left the stream out of step.
    fn settle<T>(
        &mut self,
        answered: Result<Result<T, NbdError>, tokio::time::error::Elapsed>,
    ) -> Result<T, NbdError> {
        let result = answered.unwrap_or(Err(NbdError::Timeout(REPLY_TIMEOUT)));
        if let Err(error) = &result {
            if error.breaks_connection() {
                self.broken = true;
            }
        }
        result
    }
}

// --- Handshake --------------------------------------------------------------------------------

async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufStream<S>,
    export: &str,
    want_changed_context: bool,
) -> Result<Negotiated, NbdError> {
    if stream.read_u64().await? != NBDMAGIC {
        return Err(protocol("the peer is not an NBD server (no NBDMAGIC)"));
    }
    match stream.read_u64().await? {
        IHAVEOPT => {}
        CLISERV_MAGIC => {
            return Err(protocol(
                "the server speaks the old-style handshake, which has no export names",
            ))
        }
        other => return Err(protocol(format!("unknown greeting magic {other:#x}"))),
    }
    let handshake_flags = stream.read_u16().await?;
    if handshake_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol(
            "the server does not speak the fixed newstyle handshake",
        ));
    }
    let no_zeroes = handshake_flags & FLAG_NO_ZEROES != 0;
    let client_flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    stream.write_u32(client_flags).await?;

    send_option(stream, OPT_STRUCTURED_REPLY, &[]).await?;
    let reply = read_option_reply(stream, OPT_STRUCTURED_REPLY).await?;
    let structured_replies = match reply.reply {
        REP_ACK => true,
        // Old servers: simple replies only, so no metadata contexts either.
        REP_ERR_UNSUP => false,
        _ => return Err(unexpected_reply(OPT_STRUCTURED_REPLY, reply)),
    };

    let changed_context_id = if want_changed_context && structured_replies {
        select_changed_context(stream, export).await?
    } else {
        None
    };

    let (size, transmission_flags) = go(stream, export, no_zeroes).await?;
    Ok(Negotiated {
        size,
        transmission_flags,
        structured_replies,
        changed_context_id,
    })
}

/// `NBD_OPT_SET_META_CONTEXT` for [`CHANGED_CONTEXT`] alone: its context id, or `None` if the
/// server does not offer it.
async fn select_changed_context<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufStream<S>,
    export: &str,
) -> Result<Option<u32>, NbdError> {
    let mut data = Vec::new();
    put_string32(&mut data, export);
    data.extend_from_slice(&1u32.to_be_bytes());
    put_string32(&mut data, CHANGED_CONTEXT);
    send_option(stream, OPT_SET_META_CONTEXT, &data).await?;
    let mut context_id = None;
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let reply = read_option_reply(stream, OPT_SET_META_CONTEXT).await?;
        match reply.reply {
            REP_META_CONTEXT => {
                let Some((id, name)) = reply.data.split_first_chunk::<4>() else {
                    return Err(protocol("NBD_REP_META_CONTEXT shorter than a context id"));
                };
                if name != CHANGED_CONTEXT.as_bytes() {
                    return Err(protocol(format!(
                        "the server selected the metadata context \"{}\", which was not asked for",
                        server_message(name)
                    )));
                }
                context_id = Some(u32::from_be_bytes(*id));
            }
            REP_ACK => return Ok(context_id),
            REP_ERR_UNSUP => return Ok(None),
            _ => return Err(unexpected_reply(OPT_SET_META_CONTEXT, reply)),
        }
    }
    Err(protocol(format!(
        "more than {MAX_REPLIES_PER_OPTION} replies to NBD_OPT_SET_META_CONTEXT"
    )))
}

/// `NBD_OPT_GO` (or, on servers without it, `NBD_OPT_EXPORT_NAME`): the export's size and
/// transmission flags.
async fn go<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufStream<S>,
    export: &str,
    no_zeroes: bool,
) -> Result<(u64, u16), NbdError> {
    let mut data = Vec::new();
    put_string32(&mut data, export);
    // No information requests: the export information comes anyway, and asking for block
    // sizes would bind this client to them.
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(stream, OPT_GO, &data).await?;
    let mut export_info = None;
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let reply = read_option_reply(stream, OPT_GO).await?;
        match reply.reply {
            REP_INFO => {
                let Some((kind, info)) = reply.data.split_first_chunk::<2>() else {
                    return Err(protocol("NBD_REP_INFO without an information type"));
                };
                // Other information types are only hints; the client may ignore them.
                if u16::from_be_bytes(*kind) == INFO_EXPORT {
                    if reply.data.len() != INFO_EXPORT_LEN {
                        return Err(protocol(format!(
                            "NBD_INFO_EXPORT of {} bytes (expected {INFO_EXPORT_LEN})",
                            reply.data.len()
                        )));
                    }
                    export_info = Some((be_u64(&info[0..8]), be_u16(&info[8..10])));
                }
            }
            REP_ACK => {
                return export_info
                    .ok_or_else(|| protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT"));
            }
            REP_ERR_UNSUP => return export_name(stream, export, no_zeroes).await,
            _ => return Err(unexpected_reply(OPT_GO, reply)),
        }
    }
    Err(protocol(format!(
        "more than {MAX_REPLIES_PER_OPTION} replies to NBD_OPT_GO"
    )))
}

/// The pre-`NBD_OPT_GO` way into transmission. A server that does not have the export can
/// only hang up.
async fn export_name<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufStream<S>,
    export: &str,
    no_zeroes: bool,
) -> Result<(u64, u16), NbdError> {
    send_option(stream, OPT_EXPORT_NAME, export.as_bytes()).await?;
    let answer = async {
        let size = stream.read_u64().await?;
        let flags = stream.read_u16().await?;
        if !no_zeroes {
            let mut padding = [0u8; EXPORT_NAME_PADDING];
            stream.read_exact(&mut padding).await?;
        }
        Ok::<_, std::io::Error>((size, flags))
    };
    answer.await.map_err(|error| {
        if error.kind() == std::io::ErrorKind::UnexpectedEof {
            protocol(format!(
                "the server closed the connection on NBD_OPT_EXPORT_NAME (no export \"{}\"?)",
                server_message(export.as_bytes())
            ))
        } else {
            NbdError::Io(error)
        }
    })
}

fn put_string32(data: &mut Vec<u8>, text: &str) {
    // Callers pass names of at most MAX_STRING_LENGTH bytes, far below u32::MAX.
    let length = u32::try_from(text.len()).unwrap_or(u32::MAX);
    data.extend_from_slice(&length.to_be_bytes());
    data.extend_from_slice(text.as_bytes());
}

async fn send_option<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufStream<S>,
    option: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let length = u32::try_from(data.len())
        .map_err(|_| NbdError::InvalidArgument("option data too long".to_string()))?;
    stream
        .write_all(&OptionHeader { option, length }.encode())
        .await?;
    stream.write_all(data).await?;
    stream.flush().await?;
    Ok(())
}

struct OptionReply {
    reply: u32,
    data: Vec<u8>,
}

async fn read_option_reply<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufStream<S>,
    option: u32,
) -> Result<OptionReply, NbdError> {
    let mut raw = [0u8; OPTION_REPLY_HEADER_LEN];
    stream.read_exact(&mut raw).await?;
    let header = OptionReplyHeader::decode(&raw)
        .ok_or_else(|| protocol("option reply without the reply magic"))?;
    if header.option != option {
        return Err(protocol(format!(
            "reply for option {} to {}",
            header.option,
            option_name(option)
        )));
    }
    if header.length > MAX_OPTION_LENGTH {
        return Err(protocol(format!(
            "option reply of {} bytes (at most {MAX_OPTION_LENGTH})",
            header.length
        )));
    }
    let mut data = vec![0u8; header.length as usize];
    stream.read_exact(&mut data).await?;
    Ok(OptionReply {
        reply: header.reply,
        data,
    })
}

/// The error for a reply the client did not expect: the server's refusal (with its message)
/// if it is an error reply.
fn unexpected_reply(option: u32, reply: OptionReply) -> NbdError {
    if reply.reply & REP_FLAG_ERROR != 0 {
        NbdError::OptionRefused {
            option,
            reply: reply.reply,
            message: server_message(&reply.data),
        }
    } else {
        protocol(format!(
            "unexpected {} ({}) to {}",
            reply_name(reply.reply),
            reply.reply,
            option_name(option)
        ))
    }
}

// --- Transmission replies ---------------------------------------------------------------------

/// The parts of a structured reply chunk header after its magic.
struct Chunk {
    flags: u16,
    kind: u16,
    length: u32,
}

impl Chunk {
    fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Reads the rest of a chunk header whose magic was read, checking it answers `request`.
async fn read_chunk_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    request: &Request,
) -> Result<Chunk, NbdError> {
    let flags = stream.read_u16().await?;
    let kind = stream.read_u16().await?;
    let cookie = stream.read_u64().await?;
    let length = stream.read_u32().await?;
    if cookie != request.cookie {
        return Err(protocol(format!(
            "reply for request {cookie} while waiting for request {}",
            request.cookie
        )));
    }
    Ok(Chunk {
        flags,
        kind,
        length,
    })
}

/// Reads the next reply's magic: `true` for a structured chunk, `false` for a simple reply.
async fn read_reply_magic<S: AsyncRead + Unpin>(
    stream: &mut S,
    structured_replies: bool,
) -> Result<bool, NbdError> {
    match stream.read_u32().await? {
        SIMPLE_REPLY_MAGIC => Ok(false),
        STRUCTURED_REPLY_MAGIC if structured_replies => Ok(true),
        STRUCTURED_REPLY_MAGIC => Err(protocol(
            "structured reply although structured replies were not negotiated",
        )),
        other => Err(protocol(format!("unknown reply magic {other:#x}"))),
    }
}

/// Reads the magic of a reply's next chunk: once a reply is structured, all its parts are.
async fn expect_chunk_magic<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(), NbdError> {
    match stream.read_u32().await? {
        STRUCTURED_REPLY_MAGIC => Ok(()),
        other => Err(protocol(format!(
            "magic {other:#x} where the next chunk of a structured reply was due"
        ))),
    }
}

/// Reads the rest of a simple reply header: its error value.
async fn read_simple_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    request: &Request,
) -> Result<u32, NbdError> {
    let error = stream.read_u32().await?;
    let cookie = stream.read_u64().await?;
    if cookie != request.cookie {
        return Err(protocol(format!(
            "reply for request {cookie} while waiting for request {}",
            request.cookie
        )));
    }
    Ok(error)
}

/// An error chunk's content.
struct ChunkError {
    error: u32,
    message: String,
}

/// Reads an error chunk's payload (any type with [`REPLY_TYPE_FLAG_ERROR`]: the protocol gives
/// them all the same start).
async fn read_error_chunk<S: AsyncRead + Unpin>(
    stream: &mut S,
    chunk: &Chunk,
) -> Result<ChunkError, NbdError> {
    if chunk.length < 6 || chunk.length > MAX_OPTION_LENGTH {
        return Err(protocol(format!(
            "error chunk of {} bytes (6 to {MAX_OPTION_LENGTH})",
            chunk.length
        )));
    }
    let mut payload = vec![0u8; chunk.length as usize];
    stream.read_exact(&mut payload).await?;
    let error = be_u32(&payload[0..4]);
    let message_length = usize::from(be_u16(&payload[4..6]));
    let trailer = if chunk.kind == REPLY_TYPE_ERROR_OFFSET {
        8
    } else {
        0
    };
    if 6 + message_length + trailer > payload.len() {
        return Err(protocol("error chunk message longer than the chunk"));
    }
    if error == 0 {
        return Err(protocol("error chunk with error value 0"));
    }
    Ok(ChunkError {
        error,
        message: server_message(&payload[6..6 + message_length]),
    })
}

/// Byte ranges of a read already covered by content chunks, which must not overlap.
#[derive(Default)]
struct Coverage {
    /// start -> end, relative to the request's offset.
    ranges: BTreeMap<u64, u64>,
    bytes: u64,
}

impl Coverage {
    /// Records `start..end`; `false` if it overlaps a range recorded before.
    fn claim(&mut self, start: u64, end: u64) -> bool {
        let before_ends_in_time = self
            .ranges
            .range(..=start)
            .next_back()
            .is_none_or(|(_, &before_end)| before_end <= start);
        let after_starts_in_time = self
            .ranges
            .range(start..)
            .next()
            .is_none_or(|(&after_start, _)| after_start >= end);
        if !(before_ends_in_time && after_starts_in_time) {
            return false;
        }
        self.ranges.insert(start, end);
        self.bytes += end - start;
        true
    }
}

/// The reply to a READ: the data, or the server's error.
async fn read_read_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    request: &Request,
    structured_replies: bool,
    data: &mut Vec<u8>,
) -> Result<(), NbdError> {
    let length = u64::from(request.length);
    // Every byte is written below: data chunks read into it, holes zeroed, and success needs
    // every byte covered. So a reused buffer is not cleared first (4 MiB of memset a read).
    data.resize(request.length as usize, 0);
    if !read_reply_magic(stream, structured_replies).await? {
        let error = read_simple_reply(stream, request).await?;
        if error != 0 {
            return Err(request_failed(request, error, String::new()));
        }
        stream.read_exact(data).await?;
        return Ok(());
    }
    let mut coverage = Coverage::default();
    let mut failure: Option<ChunkError> = None;
    loop {
        let chunk = read_chunk_header(stream, request).await?;
        match chunk.kind {
            REPLY_TYPE_OFFSET_DATA => {
                if chunk.length <= 8 || u64::from(chunk.length) > 8 + length {
                    return Err(protocol(format!(
                        "data chunk of {} bytes for a read of {length}",
                        chunk.length
                    )));
                }
                let start = chunk_start(stream.read_u64().await?, request)?;
                let end = start + u64::from(chunk.length - 8);
                if end > length || !coverage.claim(start, end) {
                    return Err(protocol(
                        "data chunk outside the read or overlapping another",
                    ));
                }
                // `end <= length`, a u32, so both fit in usize.
                stream
                    .read_exact(&mut data[start as usize..end as usize])
                    .await?;
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if chunk.length != 12 {
                    return Err(protocol(format!(
                        "hole chunk of {} bytes (expected 12)",
                        chunk.length
                    )));
                }
                let start = chunk_start(stream.read_u64().await?, request)?;
                let hole = stream.read_u32().await?;
                let end = start + u64::from(hole);
                if hole == 0 || end > length || !coverage.claim(start, end) {
                    return Err(protocol(
                        "hole chunk empty, outside the read or overlapping",
                    ));
                }
                // `end <= length`, a u32, so both fit in usize.
                data[start as usize..end as usize].fill(0);
            }
            REPLY_TYPE_NONE => check_none_chunk(&chunk)?,
            kind if kind & REPLY_TYPE_FLAG_ERROR != 0 => {
                let error = read_error_chunk(stream, &chunk).await?;
                failure.get_or_insert(error);
            }
            kind => {
                return Err(protocol(format!(
                    "chunk type {kind} in the reply to a read"
                )))
            }
        }
        if chunk.done() {
            break;
        }
        expect_chunk_magic(stream).await?;
    }
    if let Some(failure) = failure {
        return Err(request_failed(request, failure.error, failure.message));
    }
    if coverage.bytes != length {
        return Err(protocol(format!(
            "the server reported success after sending {} of {length} bytes",
            coverage.bytes
        )));
    }
    Ok(())
}

/// A content chunk's offset relative to the request, which it must not start before.
fn chunk_start(offset: u64, request: &Request) -> Result<u64, NbdError> {
    offset
        .checked_sub(request.offset)
        .ok_or_else(|| protocol("chunk before the start of the read"))
}

fn check_none_chunk(chunk: &Chunk) -> Result<(), NbdError> {
    if chunk.length != 0 || !chunk.done() {
        return Err(protocol(
            "NBD_REPLY_TYPE_NONE with a payload or without the done flag",
        ));
    }
    Ok(())
}

fn request_failed(request: &Request, error: u32, message: String) -> NbdError {
    NbdError::Request {
        command: request.command,
        error,
        message,
    }
}

/// The reply to a request that carries no data back (WRITE, FLUSH): a simple reply, or
/// structured chunks holding only errors and a final `NBD_REPLY_TYPE_NONE`.
async fn read_ack_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    request: &Request,
    structured_replies: bool,
) -> Result<(), NbdError> {
    if !read_reply_magic(stream, structured_replies).await? {
        let error = read_simple_reply(stream, request).await?;
        return if error == 0 {
            Ok(())
        } else {
            Err(request_failed(request, error, String::new()))
        };
    }
    let mut failure: Option<ChunkError> = None;
    loop {
        let chunk = read_chunk_header(stream, request).await?;
        match chunk.kind {
            REPLY_TYPE_NONE => check_none_chunk(&chunk)?,
            kind if kind & REPLY_TYPE_FLAG_ERROR != 0 => {
                let error = read_error_chunk(stream, &chunk).await?;
                failure.get_or_insert(error);
            }
            kind => {
                return Err(protocol(format!(
                    "chunk type {kind} in the reply to {}",
                    command_name(request.command)
                )))
            }
        }
        if chunk.done() {
            break;
        }
        expect_chunk_magic(stream).await?;
    }
    match failure {
        Some(failure) => Err(request_failed(request, failure.error, failure.message)),
        None => Ok(()),
    }
}

/// The reply to a BLOCK_STATUS with one context: its descriptors.
async fn read_status_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    request: &Request,
    context_id: u32,
) -> Result<Vec<(u64, u32)>, NbdError> {
    if !read_reply_magic(stream, true).await? {
        // Allowed for errors only: a successful block status has a payload.
        let error = read_simple_reply(stream, request).await?;
        return Err(if error == 0 {
            protocol("simple reply without error to a block status request")
        } else {
            request_failed(request, error, String::new())
        });
    }
    let mut extents: Option<Vec<(u64, u32)>> = None;
    let mut failure: Option<ChunkError> = None;
    loop {
        let chunk = read_chunk_header(stream, request).await?;
        match chunk.kind {
            REPLY_TYPE_BLOCK_STATUS => {
                if extents.is_some() {
                    return Err(protocol("two block status chunks for one context"));
                }
                extents = Some(read_status_chunk(stream, &chunk, request, context_id).await?);
            }
            REPLY_TYPE_NONE => check_none_chunk(&chunk)?,
            kind if kind & REPLY_TYPE_FLAG_ERROR != 0 => {
                let error = read_error_chunk(stream, &chunk).await?;
                failure.get_or_insert(error);
            }
            kind => {
                return Err(protocol(format!(
                    "chunk type {kind} in the reply to a block status request"
                )))
            }
        }
        if chunk.done() {
            break;
        }
        expect_chunk_magic(stream).await?;
    }
    if let Some(failure) = failure {
        return Err(request_failed(request, failure.error, failure.message));
    }
    extents.ok_or_else(|| protocol("block status reply without a status chunk"))
}

async fn read_status_chunk<S: AsyncRead + Unpin>(
    stream: &mut S,
    chunk: &Chunk,
    request: &Request,
    context_id: u32,
) -> Result<Vec<(u64, u32)>, NbdError> {
    let length = chunk.length as usize;
    let descriptors = length.saturating_sub(4) / 8;
    if length < 12 || !(length - 4).is_multiple_of(8) || descriptors > MAX_STATUS_DESCRIPTORS {
        return Err(protocol(format!(
            "block status chunk of {length} bytes (4 + 8 per descriptor, at most \
             {MAX_STATUS_DESCRIPTORS} descriptors)"
        )));
    }
    let id = stream.read_u32().await?;
    if id != context_id {
        return Err(protocol(format!(
            "block status for context {id}, not the negotiated {context_id}"
        )));
    }
    let mut extents = Vec::with_capacity(descriptors);
    let mut described = 0u64;
    for _ in 0..descriptors {
        let extent_length = stream.read_u32().await?;
        let flags = stream.read_u32().await?;
        // Only the last descriptor may reach beyond the request.
        if extent_length == 0 || described >= u64::from(request.length) {
            return Err(protocol(
                "empty block status descriptor, or descriptors after the requested range",
            ));
        }
        described += u64::from(extent_length);
        extents.push((u64::from(extent_length), flags));
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    /// The server end of a test connection, scripted step by step by each test.
    struct FakeServer {
        stream: DuplexStream,
    }

    impl FakeServer {
        async fn greet(&mut self) {
            let mut greeting = Vec::new();
            greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
            greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
            greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
            self.write(&greeting).await;
            let flags = self
                .stream
                .read_u32()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(flags, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        }

        async fn write(&mut self, bytes: &[u8]) {
            self.stream
                .write_all(bytes)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }

        /// Reads one option; returns its number and data.
        async fn option(&mut self) -> (u32, Vec<u8>) {
            let mut raw = [0u8; OPTION_HEADER_LEN];
            self.stream
                .read_exact(&mut raw)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let header =
                OptionHeader::decode(&raw).unwrap_or_else(|| panic!("option without IHAVEOPT"));
            let mut data = vec![0u8; header.length as usize];
            self.stream
                .read_exact(&mut data)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            (header.option, data)
        }

        async fn reply(&mut self, option: u32, reply: u32, data: &[u8]) {
            let header = OptionReplyHeader {
                option,
                reply,
                length: data.len() as u32,
            };
            self.write(&header.encode()).await;
            self.write(data).await;
        }

        /// Structured replies, the changed context as id 7, then GO with `size`, read-only.
        async fn handshake(&mut self, size: u64) {
            self.handshake_with_flags(size, FLAG_HAS_FLAGS | FLAG_READ_ONLY)
                .await;
        }

        /// As [`FakeServer::handshake`], with these transmission flags.
        async fn handshake_with_flags(&mut self, size: u64, flags: u16) {
            self.greet().await;
            let (option, _) = self.option().await;
            assert_eq!(option, OPT_STRUCTURED_REPLY);
            self.reply(option, REP_ACK, &[]).await;
            let (option, _) = self.option().await;
            assert_eq!(option, OPT_SET_META_CONTEXT);
            let mut context = 7u32.to_be_bytes().to_vec();
            context.extend_from_slice(CHANGED_CONTEXT.as_bytes());
            self.reply(option, REP_META_CONTEXT, &context).await;
            self.reply(option, REP_ACK, &[]).await;
            let (option, _) = self.option().await;
            assert_eq!(option, OPT_GO);
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&size.to_be_bytes());
            info.extend_from_slice(&flags.to_be_bytes());
            self.reply(option, REP_INFO, &info).await;
            self.reply(option, REP_ACK, &[]).await;
        }

        async fn request(&mut self) -> Request {
            let mut raw = [0u8; REQUEST_LEN];
            self.stream
                .read_exact(&mut raw)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            Request::decode(&raw).unwrap_or_else(|| panic!("bad request magic"))
        }

        /// Reads `length` bytes of a WRITE's payload.
        async fn payload(&mut self, length: u32) -> Vec<u8> {
            let mut data = vec![0u8; length as usize];
            self.stream
                .read_exact(&mut data)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            data
        }

        async fn simple(&mut self, cookie: u64, error: u32) {
            self.write(&SimpleReply { error, cookie }.encode()).await;
        }

        async fn chunk(&mut self, cookie: u64, flags: u16, kind: u16, payload: &[u8]) {
            let header = ChunkHeader {
                flags,
                kind,
                cookie,
                length: payload.len() as u32,
            };
            self.write(&header.encode()).await;
            self.write(payload).await;
        }
    }

    fn pair() -> (DuplexStream, FakeServer) {
        let (client, server) = tokio::io::duplex(1 << 20);
        (client, FakeServer { stream: server })
    }

    fn offset_payload(offset: u64, rest: &[u8]) -> Vec<u8> {
        let mut payload = offset.to_be_bytes().to_vec();
        payload.extend_from_slice(rest);
        payload
    }

    #[tokio::test]
    async fn read_reassembles_data_and_hole_chunks_in_any_order() {
        let (client_end, mut server) = pair();
        let serving = tokio::spawn(async move {
            server.handshake(1 << 20).await;
            let request = server.request().await;
            assert_eq!(
                (request.command, request.offset, request.length),
                (CMD_READ, 4096, 12)
            );
            // Last four bytes first, then a hole, then the first four.
            server
                .chunk(
                    request.cookie,
                    0,
                    REPLY_TYPE_OFFSET_DATA,
                    &offset_payload(4104, b"wxyz"),
                )
                .await;
            let mut hole = 4100u64.to_be_bytes().to_vec();
            hole.extend_from_slice(&4u32.to_be_bytes());
            server
                .chunk(request.cookie, 0, REPLY_TYPE_OFFSET_HOLE, &hole)
                .await;
            server
                .chunk(
                    request.cookie,
                    0,
                    REPLY_TYPE_OFFSET_DATA,
                    &offset_payload(4096, b"abcd"),
                )
                .await;
            server
                .chunk(request.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[])
                .await;
            server
        });
        let mut client = NbdClient::handshake(client_end, "snap", true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(client.size(), 1 << 20);
        assert!(client.has_changed_context());
        // A reused buffer, as a backup's: the hole must not keep its old bytes.
        let mut data = vec![0xff_u8; 64];
        client
            .read_into(4096, 12, &mut data)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(data, b"abcd\0\0\0\0wxyz");
        serving.await.unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test]
    async fn error_chunk_fails_the_read_with_the_server_message_and_keeps_the_connection() {
        let (client_end, mut server) = pair();
        let serving = tokio::spawn(async move {
            server.handshake(1 << 20).await;
            let request = server.request().await;
            let mut error = EIO.to_be_bytes().to_vec();
            error.extend_from_slice(&9u16.to_be_bytes());
            error.extend_from_slice(b"bad\nsect0");
            server
                .chunk(request.cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &error)
                .await;
            let request = server.request().await;
            let mut status = 7u32.to_be_bytes().to_vec();
            for (length, flags) in [(512u32, CHANGED_FLAG), (1536, 0)] {
                status.extend_from_slice(&length.to_be_bytes());
                status.extend_from_slice(&flags.to_be_bytes());
            }
            server
                .chunk(
                    request.cookie,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    &status,
                )
                .await;
            server
        });
        let mut client = NbdClient::handshake(client_end, "snap", true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let error = match client.read(0, 512).await {
            Ok(_) => panic!("read succeeded despite the error chunk"),
            Err(error) => error,
        };
        assert_eq!(error.request_error(), Some(EIO));
        assert_eq!(
            error.to_string(),
            "NBD_CMD_READ failed: input/output error (EIO): bad\u{fffd}sect0"
        );
        let extents = client
            .changed_extents(0, 2048)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(extents, vec![(512, CHANGED_FLAG), (1536, 0)]);
        serving.await.unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test]
    async fn overlapping_chunks_break_the_connection() {
        let (client_end, mut server) = pair();
        let serving = tokio::spawn(async move {
            server.handshake(1 << 20).await;
            let request = server.request().await;
            server
                .chunk(
                    request.cookie,
                    0,
                    REPLY_TYPE_OFFSET_DATA,
                    &offset_payload(0, b"abcd"),
                )
                .await;
            server
                .chunk(
                    request.cookie,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    &offset_payload(2, b"cdef"),
                )
                .await;
            server
        });
        let mut client = NbdClient::handshake(client_end, "snap", true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            client.read(0, 6).await,
            Err(NbdError::Protocol(_))
        ));
        assert!(matches!(client.read(0, 6).await, Err(NbdError::Broken)));
        serving.await.unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test]
    async fn refused_go_carries_the_server_message() {
        let (client_end, mut server) = pair();
        let serving = tokio::spawn(async move {
            server.greet().await;
            let (option, _) = server.option().await;
            server.reply(option, REP_ACK, &[]).await;
            let (option, data) = server.option().await;
            assert_eq!(option, OPT_GO);
            assert_eq!(&data[4..data.len() - 2], b"nope");
            server
                .reply(option, REP_ERR_UNKNOWN, b"no snapshot named nope")
                .await;
            server
        });
        let error = match NbdClient::handshake(client_end, "nope", false).await {
            Ok(_) => panic!("handshake succeeded for an unknown export"),
            Err(error) => error,
        };
        assert_eq!(error.option_reply(), Some(REP_ERR_UNKNOWN));
        assert_eq!(
            error.to_string(),
            "the NBD server refused NBD_OPT_GO: unknown export (NBD_REP_ERR_UNKNOWN): \
             no snapshot named nope"
        );
        serving.await.unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test]
    async fn oversized_option_reply_is_refused_unread() {
        let (client_end, mut server) = pair();
        let serving = tokio::spawn(async move {
            server.greet().await;
            let (option, _) = server.option().await;
            let header = OptionReplyHeader {
                option,
                reply: REP_ACK,
                length: u32::MAX,
            };
            server.write(&header.encode()).await;
            server
        });
        match NbdClient::handshake(client_end, "snap", false).await {
            Err(NbdError::Protocol(message)) => {
                assert_eq!(message, "option reply of 4294967295 bytes (at most 65536)")
            }
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("handshake accepted a 4 GiB option reply"),
        }
        serving.await.unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test]
    async fn requests_beyond_the_export_are_refused_before_sending() {
        let (client_end, mut server) = pair();
        let serving = tokio::spawn(async move {
            server.handshake(8192).await;
            server
        });
        let mut client = NbdClient::handshake(client_end, "snap", true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            client.read(8000, 200).await,
            Err(NbdError::InvalidArgument(_))
        ));
        assert!(matches!(
            client.read(u64::MAX, 1).await,
            Err(NbdError::InvalidArgument(_))
        ));
        assert!(matches!(
            client.changed_extents(0, 0).await,
            Err(NbdError::InvalidArgument(_))
        ));
        let mut server = serving.await.unwrap_or_else(|e| panic!("{e}"));
        // Nothing reached the server: the next thing it reads is the disconnect.
        let disconnect = tokio::spawn(async move { server.request().await });
        client.disconnect().await.unwrap_or_else(|e| panic!("{e}"));
        let request = disconnect.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(request.command, CMD_DISC);
    }

    const WRITABLE: u16 = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;

    fn error_payload(error: u32, message: &[u8]) -> Vec<u8> {
        let mut payload = error.to_be_bytes().to_vec();
        payload.extend_from_slice(&(message.len() as u16).to_be_bytes());
        payload.extend_from_slice(message);
        payload
    }

    #[tokio::test]
    async fn writes_carry_their_payload_and_fua_and_errors_keep_the_connection() {
        let (client_end, mut server) = pair();
        let serving = tokio::spawn(async move {
            server.handshake_with_flags(1 << 20, WRITABLE).await;
            let request = server.request().await;
            assert_eq!(
                (
                    request.command,
                    request.flags,
                    request.offset,
                    request.length
                ),
                (CMD_WRITE, CMD_FLAG_FUA, 4096, 5)
            );
            assert_eq!(server.payload(5).await, b"hello");
            server.simple(request.cookie, 0).await;

            let request = server.request().await;
            assert_eq!((request.command, request.flags), (CMD_WRITE, 0));
            assert_eq!(server.payload(3).await, b"abc");
            server
                .chunk(
                    request.cookie,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_ERROR,
                    &error_payload(ENOSPC, b"volume full"),
                )
                .await;

            let request = server.request().await;
            assert_eq!(
                (request.command, request.offset, request.length),
                (CMD_FLUSH, 0, 0)
            );
            server
                .chunk(request.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[])
                .await;

            let request = server.request().await;
            assert_eq!(request.command, CMD_FLUSH);
            server.simple(request.cookie, EIO).await;
            server
        });
        let mut client = NbdClient::handshake(client_end, "volume", true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!client.read_only());
        client
            .write(4096, b"hello", true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let error = match client.write(0, b"abc", false).await {
            Ok(()) => panic!("write succeeded despite the error chunk"),
            Err(error) => error,
        };
        assert_eq!(error.request_error(), Some(ENOSPC));
        assert_eq!(
            error.to_string(),
            "NBD_CMD_WRITE failed: no space left (ENOSPC): volume full"
        );
        client.flush().await.unwrap_or_else(|e| panic!("{e}"));
        let error = match client.flush().await {
            Ok(()) => panic!("flush succeeded despite the error"),
            Err(error) => error,
        };
        assert_eq!(error.request_error(), Some(EIO));
        assert_eq!(
            error.to_string(),
            "NBD_CMD_FLUSH failed: input/output error (EIO)"
        );
        serving.await.unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test]
    async fn fua_is_a_flush_after_the_write_when_the_server_does_not_offer_it() {
        let (client_end, mut server) = pair();
        let serving = tokio::spawn(async move {
            server
                .handshake_with_flags(1 << 20, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH)
                .await;
            let request = server.request().await;
            assert_eq!((request.command, request.flags), (CMD_WRITE, 0));
            assert_eq!(server.payload(2).await, b"ok");
            server.simple(request.cookie, 0).await;
            let request = server.request().await;
            assert_eq!(request.command, CMD_FLUSH);
            server.simple(request.cookie, 0).await;
            server
        });
        let mut client = NbdClient::handshake(client_end, "volume", true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        client
            .write(0, b"ok", true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        serving.await.unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test]
    async fn a_data_chunk_in_reply_to_a_write_breaks_the_connection() {
        let (client_end, mut server) = pair();
        let serving = tokio::spawn(async move {
            server.handshake_with_flags(1 << 20, WRITABLE).await;
            let request = server.request().await;
            server.payload(request.length).await;
            server
                .chunk(
                    request.cookie,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    &offset_payload(0, b"x"),
                )
                .await;
            server
        });
        let mut client = NbdClient::handshake(client_end, "volume", true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            client.write(0, b"x", false).await,
            Err(NbdError::Protocol(_))
        ));
        assert!(matches!(client.flush().await, Err(NbdError::Broken)));
        serving.await.unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test]
    async fn bad_writes_are_refused_before_sending() {
        // A read-only export: no write is sent, whatever its range.
        let (client_end, mut server) = pair();
        let serving = tokio::spawn(async move {
            server.handshake(8192).await;
            server
        });
        let mut client = NbdClient::handshake(client_end, "snap", true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(client.read_only());
        assert!(matches!(
            client.write(0, b"x", false).await,
            Err(NbdError::InvalidArgument(_))
        ));
        let mut server = serving.await.unwrap_or_else(|e| panic!("{e}"));
        let disconnect = tokio::spawn(async move { server.request().await });
        client.disconnect().await.unwrap_or_else(|e| panic!("{e}"));
        let request = disconnect.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(request.command, CMD_DISC);

        // A writable export without flush: beyond the end, too much at once, and a flush,
        // which such a server must not be sent.
        let (client_end, mut server) = pair();
        let serving = tokio::spawn(async move {
            server.handshake_with_flags(8192, FLAG_HAS_FLAGS).await;
            server
        });
        let mut client = NbdClient::handshake(client_end, "volume", true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!client.read_only());
        assert!(matches!(
            client.write(8000, &[1; 200], false).await,
            Err(NbdError::InvalidArgument(_))
        ));
        assert!(matches!(
            client.write(u64::MAX, b"x", true).await,
            Err(NbdError::InvalidArgument(_))
        ));
        let too_much = vec![0u8; MAX_REQUEST_LENGTH as usize + 1];
        match client.write(0, &too_much, false).await {
            Err(NbdError::InvalidArgument(message)) => {
                assert_eq!(message, "33554433 bytes at once (at most 33554432)")
            }
            other => panic!("unexpected {other:?}"),
        }
        client
            .write(0, &[], false)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        client.flush().await.unwrap_or_else(|e| panic!("{e}"));
        let mut server = serving.await.unwrap_or_else(|e| panic!("{e}"));
        let disconnect = tokio::spawn(async move { server.request().await });
        client.disconnect().await.unwrap_or_else(|e| panic!("{e}"));
        let request = disconnect.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(request.command, CMD_DISC);
    }
}
