//! The transmission phase: the client's requests on its export, answered in order. READs a
//! client pipelines are read from the export together (up to 8 MiB in flight), so the disk
//! reads the next while the last reply is sent; any other request waits for the READs
//! before it.
//!
//! On every export READ and BLOCK_STATUS do the work. On a read-only export FLUSH has nothing
//! to do and writes of any kind fail with EPERM. On a writable one WRITE, WRITE_ZEROES and
//! FLUSH reach the export, and FUA makes a write durable before it is acknowledged; TRIM,
//! which is not offered, fails with EINVAL rather than being acknowledged without discarding
//! anything.
//!
//! A failed request gets an error reply and the session goes on; only what leaves the stream
//! unreadable ends it: a bad magic, or a WRITE payload too large to read or skip.

use std::collections::VecDeque;

use log::{debug, warn};
use sanblk_proto::nbd::{
    command_name, ChunkHeader, Request, SimpleReply, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_DF,
    CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, EINVAL, EIO, ENOSPC, EPERM, MAX_REQUEST_LENGTH, MAX_STATUS_DESCRIPTORS,
    MAX_STRING_LENGTH, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR,
    REPLY_TYPE_OFFSET_DATA, REQUEST_LEN,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::contexts::MetaContext;
use super::handshake::Session;
use super::{blocking, shutdown_signalled, Export, Hangup};
use crate::device::AlignedBuf;
use crate::log_text::peer_text;

/// WRITE_ZEROES writes its zeroes in pieces of at most this much, from one buffer: a request
/// may cover 4 GiB, the memory it takes stays small.
const ZERO_PIECE: usize = 1 << 20;

/// How a session ended without error.
#[derive(Debug)]
pub(super) enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnected,
    /// The server is shutting down; the connection is closed between requests.
    Shutdown,
}

/// Largest READ buffer a connection keeps for its next READ (`sanctl backup` reads 4 MiB).
const KEEP_READ_BUFFER: usize = 8 << 20;

/// READ bytes a connection may have in flight at once (any one READ may be alone, up to the
/// protocol's limit): a client pipelining reads gets the next from the disk while the last
/// is sent, and the memory a connection holds stays bounded.
const READ_AHEAD_BYTES: usize = 8 << 20;

/// A READ being answered: its data coming off the export on the blocking pool, or its
/// refusal.
struct PendingRead {
    request: Request,
    data: Result<JoinHandle<std::io::Result<AlignedBuf>>, Refusal>,
}

/// What the transmission loop waits for.
enum Event {
    Shutdown,
    /// A whole request header arrived.
    Request([u8; REQUEST_LEN]),
    /// Part of one did.
    Partial,
    /// The oldest pending READ's data is read (or failed).
    ReadDone(Option<std::io::Result<AlignedBuf>>),
}

/// Serves requests until the client disconnects, the server shuts down, or the stream
/// breaks. READs are read from the export while later requests arrive and earlier replies
/// go out (up to [`READ_AHEAD_BYTES`]); replies keep the order of the requests, and any
/// other request waits until the READs before it are answered.
pub(super) async fn serve_requests<R, W>(
    reader: &mut R,
    writer: &mut W,
    session: &Session,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<End, Hangup>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Finished READs' buffers, filled again by the next: a fresh 4 MiB buffer per request is
    // an mmap, 1024 page faults and an munmap, a large part of a backup's CPU time. Kept only
    // up to KEEP_READ_BUFFER, so an idle connection does not pin a 32 MiB one.
    let mut spares: Vec<AlignedBuf> = Vec::new();
    let mut pending: VecDeque<PendingRead> = VecDeque::new();
    // A request header read so far: `read` (not `read_exact`) is cancel-safe, so a header
    // may arrive in pieces while replies are sent.
    let mut raw = [0u8; REQUEST_LEN];
    let mut have = 0;
    loop {
        // At a shutdown, the READs under way are answered first; no new request is taken.
        let stopping = *shutdown.borrow();
        let reading: usize = pending.iter().map(|p| p.request.length as usize).sum();
        let may_take_request = !stopping && (pending.is_empty() || reading < READ_AHEAD_BYTES);
        let event = tokio::select! {
            biased;
            _ = shutdown_signalled(shutdown), if pending.is_empty() => Event::Shutdown,
            done = oldest_read(&mut pending), if !pending.is_empty() => Event::ReadDone(done),
            read = reader.read(&mut raw[have..]), if may_take_request => {
                match read? {
                    0 => return Err(Hangup::Io(std::io::ErrorKind::UnexpectedEof.into())),
                    n if have + n < REQUEST_LEN => {
                        have += n;
                        Event::Partial
                    }
                    _ => {
                        have = 0;
                        Event::Request(raw)
                    }
                }
            }
        };
        let request = match event {
            Event::Shutdown => return Ok(End::Shutdown),
            Event::Partial => continue,
            Event::ReadDone(done) => {
                if let Some(entry) = pending.pop_front() {
                    answer_read(writer, session, entry, done, &mut spares).await?;
                    writer.flush().await?;
                }
                continue;
            }
            Event::Request(raw) => Request::decode(&raw)
                .ok_or_else(|| Hangup::protocol("request without the request magic"))?,
        };
        if request.command == CMD_READ {
            let data = start_read(session, &request, spares.pop());
            pending.push_back(PendingRead { request, data });
            continue;
        }
        // Everything else is answered after the READs before it, in order.
        while !pending.is_empty() {
            let done = oldest_read(&mut pending).await;
            if let Some(entry) = pending.pop_front() {
                answer_read(writer, session, entry, done, &mut spares).await?;
            }
        }
        if let Some(end) = serve_other(reader, writer, session, &request).await? {
            return Ok(end);
        }
        writer.flush().await?;
    }
}

/// Waits for the oldest pending READ's data (`None` for a refused READ: nothing to wait for).
/// Cancel-safe: the read goes on, and is waited for again.
async fn oldest_read(pending: &mut VecDeque<PendingRead>) -> Option<std::io::Result<AlignedBuf>> {
    let Some(PendingRead { data: Ok(read), .. }) = pending.front_mut() else {
        return None;
    };
    Some(match read.await {
        Ok(done) => done,
        Err(e) => Err(std::io::Error::other(format!("export task failed: {e}"))),
    })
}

/// Answers a READ with the data read (`done`), or its refusal.
async fn answer_read<W: AsyncWrite + Unpin>(
    writer: &mut W,
    session: &Session,
    entry: PendingRead,
    done: Option<std::io::Result<AlignedBuf>>,
    spares: &mut Vec<AlignedBuf>,
) -> std::io::Result<()> {
    let structured = session.structured_replies;
    let request = &entry.request;
    let refusal = match (entry.data, done) {
        (Err(refusal), _) => refusal,
        (Ok(_), Some(Ok(data))) => {
            send_data(writer, structured, request, &data).await?;
            if data.len() <= KEEP_READ_BUFFER && spares.len() < 2 {
                spares.push(data);
            }
            return Ok(());
        }
        (Ok(_), done) => {
            let error = match done {
                Some(Err(error)) => error,
                _ => std::io::Error::other("the read was lost"),
            };
            warn!(
                "NBD: reading {} bytes at {} of {}: {error}",
                request.length,
                request.offset,
                peer_text(&session.name)
            );
            Refusal {
                error: EIO,
                message: format!("cannot read the snapshot at offset {}", request.offset),
            }
        }
    };
    send_refusal(writer, structured, request, refusal).await
}

/// Answers a request other than READ; `Some` if it ends the session.
async fn serve_other<R, W>(
    reader: &mut R,
    writer: &mut W,
    session: &Session,
    request: &Request,
) -> Result<Option<End>, Hangup>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let structured = session.structured_replies;
    match request.command {
        CMD_DISC => return Ok(Some(End::Disconnected)),
        CMD_BLOCK_STATUS => match block_status(session, request).await {
            Ok(chunks) => send_status(writer, request, &chunks).await?,
            Err(refusal) => send_refusal(writer, structured, request, refusal).await?,
        },
        CMD_WRITE if session.writable => {
            // The payload comes off the stream whatever the answer, or the next request
            // would be read from the middle of it; a refused one is not even buffered.
            let outcome = match check_write(session, request) {
                Ok(()) => {
                    let data = read_payload(reader, request.length).await?;
                    write(session, request, data).await
                }
                Err(refusal) => {
                    skip_payload(reader, request.length).await?;
                    Err(refusal)
                }
            };
            send_outcome(writer, structured, request, outcome).await?;
        }
        CMD_WRITE_ZEROES if session.writable => {
            let outcome = write_zeroes(session, request).await;
            send_outcome(writer, structured, request, outcome).await?;
        }
        CMD_FLUSH if session.writable => {
            let outcome = flush(session, request).await;
            send_outcome(writer, structured, request, outcome).await?;
        }
        // Acknowledging a trim without discarding would be allowed, but a client would
        // then believe the blocks gone; it was not offered, so it is refused.
        CMD_TRIM if session.writable => {
            let refusal = Refusal::invalid("NBD_CMD_TRIM is not supported by this export");
            send_refusal(writer, structured, request, refusal).await?;
        }
        CMD_FLUSH => send_simple(writer, request, 0).await?,
        CMD_WRITE => {
            skip_payload(reader, request.length).await?;
            send_refusal(writer, structured, request, read_only()).await?;
        }
        CMD_TRIM | CMD_WRITE_ZEROES => {
            send_refusal(writer, structured, request, read_only()).await?
        }
        command => {
            let refusal = Refusal::invalid(format!("unknown command {command}"));
            send_refusal(writer, structured, request, refusal).await?;
        }
    }
    Ok(None)
}

/// Why a request failed: the error value and a message for the user (structured replies
/// only).
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    error: u32,
    message: String,
}

impl Refusal {
    fn invalid(message: impl Into<String>) -> Refusal {
        Refusal {
            error: EINVAL,
            message: message.into(),
        }
    }
}

fn read_only() -> Refusal {
    Refusal {
        error: EPERM,
        message: "the export is a read-only snapshot".to_string(),
    }
}

/// Refuses flags outside `allowed`. FUA is always allowed: the protocol notes clients that
/// set it on any command. Writes honour it; elsewhere nothing was written that it could make
/// durable.
fn check_flags(request: &Request, allowed: u16) -> Result<(), Refusal> {
    let unknown = request.flags & !(allowed | CMD_FLAG_FUA);
    if unknown != 0 {
        return Err(Refusal::invalid(format!(
            "flags {unknown:#x} are not valid for {}",
            command_name(request.command)
        )));
    }
    Ok(())
}

/// Refuses empty requests and requests longer than `max_length` with EINVAL, requests reaching
/// beyond the export with `beyond_end` (the protocol asks for EINVAL from reads, ENOSPC from
/// writes).
fn check_range(
    request: &Request,
    size: u64,
    max_length: u32,
    beyond_end: u32,
) -> Result<(), Refusal> {
    if request.length == 0 {
        return Err(Refusal::invalid("empty request"));
    }
    if request.length > max_length {
        return Err(Refusal::invalid(format!(
            "{} bytes at once (at most {max_length})",
            request.length
        )));
    }
    match request.offset.checked_add(u64::from(request.length)) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Refusal {
            error: beyond_end,
            message: format!(
                "{} bytes at offset {} reach beyond the end of the export ({size} bytes)",
                request.length, request.offset
            ),
        }),
    }
}

/// Starts reading a READ's data into `spare` (a finished READ's buffer) or a new buffer on
/// the blocking pool, or refuses the READ.
fn start_read(
    session: &Session,
    request: &Request,
    spare: Option<AlignedBuf>,
) -> Result<JoinHandle<std::io::Result<AlignedBuf>>, Refusal> {
    // "Don't fragment" is only valid with structured replies, and always honoured: a read is
    // answered with a single data chunk.
    let allowed = if session.structured_replies {
        CMD_FLAG_DF
    } else {
        0
    };
    check_flags(request, allowed)?;
    check_range(request, session.export.size(), MAX_REQUEST_LENGTH, EINVAL)?;
    let export = session.export.clone();
    let (offset, length) = (request.offset, request.length as usize);
    Ok(tokio::task::spawn_blocking(move || {
        // Aligned, so the devices are read with O_DIRECT (an unaligned buffer falls back to
        // the page cache): a backup streams the whole volume once, and through the cache it
        // would evict the host's working set.
        let mut data = match spare {
            Some(buf) => buf.reused_for(length)?,
            None => AlignedBuf::zeroed(length)?,
        };
        export.read(offset, &mut data)?;
        Ok(data)
    }))
}

/// Whether a WRITE may go ahead, before its payload is read. Only FUA applies to it.
fn check_write(session: &Session, request: &Request) -> Result<(), Refusal> {
    check_flags(request, 0)?;
    check_range(request, session.export.size(), MAX_REQUEST_LENGTH, ENOSPC)
}

/// Writes a checked WRITE's payload, made durable first if the client asked for FUA.
async fn write(session: &Session, request: &Request, data: Vec<u8>) -> Result<(), Refusal> {
    let export = session.export.clone();
    let (offset, length) = (request.offset, data.len());
    let fua = request.flags & CMD_FLAG_FUA != 0;
    blocking(move || {
        export.write(offset, &data)?;
        flush_if(&*export, fua)
    })
    .await
    .map_err(|e| {
        write_failed(
            session,
            format!("write {length} bytes at offset {offset}"),
            &e,
        )
    })
}

/// Writes zeroes over the range, piece by piece, made durable first if the client asked for
/// FUA. "No hole" is accepted: every byte is written, so nothing is left unprovisioned as far
/// as the export can tell. "Fast zero" is not (it was not offered): EINVAL, as the protocol
/// asks.
async fn write_zeroes(session: &Session, request: &Request) -> Result<(), Refusal> {
    check_flags(request, CMD_FLAG_NO_HOLE)?;
    check_range(request, session.export.size(), u32::MAX, ENOSPC)?;
    let export = session.export.clone();
    let (offset, length) = (request.offset, u64::from(request.length));
    let fua = request.flags & CMD_FLAG_FUA != 0;
    blocking(move || {
        // `length` is a nonzero u32, so the piece fits usize.
        let zeroes = vec![0u8; length.min(ZERO_PIECE as u64) as usize];
        let mut done = 0u64;
        while done < length {
            let piece = (length - done).min(zeroes.len() as u64) as usize;
            export.write(offset + done, &zeroes[..piece])?;
            done += piece as u64;
        }
        flush_if(&*export, fua)
    })
    .await
    .map_err(|e| {
        write_failed(
            session,
            format!("write {length} zero bytes at offset {offset}"),
            &e,
        )
    })
}

/// The flush a FUA write ends with.
fn flush_if(export: &dyn Export, fua: bool) -> std::io::Result<()> {
    if fua {
        export.flush()?;
    }
    Ok(())
}

/// Logs a failed write, write-zeroes or flush (`what`: "write 4096 bytes at offset 0") and
/// turns it into the client's refusal, its error value taken from the I/O error.
fn write_failed(session: &Session, what: String, error: &std::io::Error) -> Refusal {
    warn!(
        "NBD: cannot {what} of {}: {error}",
        peer_text(&session.name)
    );
    Refusal {
        error: io_error_value(error),
        message: format!("cannot {what}"),
    }
}

async fn flush(session: &Session, request: &Request) -> Result<(), Refusal> {
    check_flags(request, 0)?;
    let export = session.export.clone();
    blocking(move || export.flush())
        .await
        .map_err(|e| write_failed(session, "flush the export".to_string(), &e))
}

/// The protocol's error value for a failed export call: ENOSPC for a full volume, an
/// exhausted quota or a too large file, which the protocol asks servers to report so (a
/// client can tell "the target is too small" from a failing disk), else EIO.
fn io_error_value(error: &std::io::Error) -> u32 {
    use std::io::ErrorKind::{FileTooLarge, QuotaExceeded, StorageFull};
    match error.kind() {
        StorageFull | QuotaExceeded | FileTooLarge => ENOSPC,
        _ => EIO,
    }
}

/// The status descriptors of every negotiated context, in negotiation order.
async fn block_status(
    session: &Session,
    request: &Request,
) -> Result<Vec<(MetaContext, Vec<(u32, u32)>)>, Refusal> {
    if session.contexts.is_empty() {
        return Err(Refusal::invalid(
            "no metadata context was selected for this export",
        ));
    }
    check_flags(request, CMD_FLAG_REQ_ONE)?;
    check_range(request, session.export.size(), u32::MAX, EINVAL)?;
    let only_one = request.flags & CMD_FLAG_REQ_ONE != 0;
    let mut chunks = Vec::with_capacity(session.contexts.len());
    for &context in &session.contexts {
        let runs = match context {
            MetaContext::Allocation => vec![(u64::from(request.length), 0)],
            MetaContext::Changed => {
                let export = session.export.clone();
                let (offset, length) = (request.offset, u64::from(request.length));
                blocking(move || export.changed(offset, length))
                    .await
                    .map_err(|e| {
                        warn!(
                            "NBD: changed blocks of {} at {offset}: {e}",
                            peer_text(&session.name)
                        );
                        Refusal {
                            error: EIO,
                            message: format!("cannot tell which blocks changed at offset {offset}"),
                        }
                    })?
            }
        };
        let descriptors = status_descriptors(&runs, request.length, only_one);
        if descriptors.is_empty() {
            warn!(
                "NBD: {} reported no {} status at {}",
                peer_text(&session.name),
                context.name(),
                request.offset
            );
            return Err(Refusal {
                error: EIO,
                message: format!("no {} status for this range", context.name()),
            });
        }
        chunks.push((context, descriptors));
    }
    Ok(chunks)
}

/// Turns an export's runs into block status descriptors for a request of `requested` bytes:
/// empty runs dropped, neighbours with the same flags merged (the protocol asks for
/// alternating statuses), cut at the requested length and at [`MAX_STATUS_DESCRIPTORS`]
/// (the protocol lets the server describe less than asked), and a single one if the client
/// asked for one. Cutting at the request, a u32, is also what keeps every length within a
/// descriptor's u32.
fn status_descriptors(runs: &[(u64, u32)], requested: u32, only_one: bool) -> Vec<(u32, u32)> {
    let limit = if only_one { 1 } else { MAX_STATUS_DESCRIPTORS };
    let mut left = requested;
    let mut descriptors: Vec<(u32, u32)> = Vec::new();
    for &(length, flags) in runs {
        if left == 0 {
            break;
        }
        let taken = u32::try_from(length).map_or(left, |length| length.min(left));
        if taken == 0 {
            continue;
        }
        match descriptors.last_mut() {
            Some((last_length, last_flags)) if *last_flags == flags => *last_length += taken,
            _ => {
                if descriptors.len() == limit {
                    break;
                }
                descriptors.push((taken, flags));
            }
        }
        left -= taken;
    }
    descriptors
}

/// A WRITE payload longer than a request may be can be neither buffered nor worth skipping:
/// the session ends.
fn check_payload_length(length: u32) -> Result<(), Hangup> {
    if length > MAX_REQUEST_LENGTH {
        return Err(Hangup::protocol(format!(
            "NBD_CMD_WRITE with {length} bytes of data (at most {MAX_REQUEST_LENGTH})"
        )));
    }
    Ok(())
}

/// Reads a WRITE's payload.
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    length: u32,
) -> Result<Vec<u8>, Hangup> {
    check_payload_length(length)?;
    let mut data = vec![0u8; length as usize];
    reader.read_exact(&mut data).await?;
    Ok(data)
}

/// Reads and drops a WRITE's payload, so the next request can be read.
async fn skip_payload<R: AsyncRead + Unpin>(reader: &mut R, length: u32) -> Result<(), Hangup> {
    check_payload_length(length)?;
    let wanted = u64::from(length);
    let skipped = tokio::io::copy(&mut (&mut *reader).take(wanted), &mut tokio::io::sink()).await?;
    if skipped < wanted {
        return Err(Hangup::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

async fn send_simple<W: AsyncWrite + Unpin>(
    writer: &mut W,
    request: &Request,
    error: u32,
) -> std::io::Result<()> {
    let reply = SimpleReply {
        error,
        cookie: request.cookie,
    };
    writer.write_all(&reply.encode()).await
}

async fn send_chunk_header<W: AsyncWrite + Unpin>(
    writer: &mut W,
    request: &Request,
    flags: u16,
    kind: u16,
    length: usize,
) -> std::io::Result<()> {
    // Payloads are built here: at most a read's 32 MiB plus its offset.
    let length =
        u32::try_from(length).map_err(|_| std::io::Error::other("reply chunk too long to send"))?;
    let header = ChunkHeader {
        flags,
        kind,
        cookie: request.cookie,
        length,
    };
    writer.write_all(&header.encode()).await
}

async fn send_data<W: AsyncWrite + Unpin>(
    writer: &mut W,
    structured: bool,
    request: &Request,
    data: &[u8],
) -> std::io::Result<()> {
    if structured {
        let length = 8 + data.len();
        send_chunk_header(
            writer,
            request,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            length,
        )
        .await?;
        writer.write_all(&request.offset.to_be_bytes()).await?;
    } else {
        send_simple(writer, request, 0).await?;
    }
    writer.write_all(data).await
}

/// Success as a simple reply (allowed even with structured replies, having no payload), or
/// the refusal.
async fn send_outcome<W: AsyncWrite + Unpin>(
    writer: &mut W,
    structured: bool,
    request: &Request,
    outcome: Result<(), Refusal>,
) -> std::io::Result<()> {
    match outcome {
        Ok(()) => send_simple(writer, request, 0).await,
        Err(refusal) => send_refusal(writer, structured, request, refusal).await,
    }
}

/// The error as an error chunk with its message if structured replies were negotiated (the
/// protocol requires it for reads and prefers it otherwise), else as a simple reply.
async fn send_refusal<W: AsyncWrite + Unpin>(
    writer: &mut W,
    structured: bool,
    request: &Request,
    refusal: Refusal,
) -> std::io::Result<()> {
    debug!(
        "NBD: {} refused: {} ({})",
        command_name(request.command),
        refusal.message,
        refusal.error
    );
    if !structured {
        return send_simple(writer, request, refusal.error).await;
    }
    let message = cut_to_string_limit(&refusal.message);
    let message_length = u16::try_from(message.len()).unwrap_or(u16::MAX);
    send_chunk_header(
        writer,
        request,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + message.len(),
    )
    .await?;
    writer.write_all(&refusal.error.to_be_bytes()).await?;
    writer.write_all(&message_length.to_be_bytes()).await?;
    writer.write_all(message.as_bytes()).await
}

/// One block status chunk per context, the last one marked done.
async fn send_status<W: AsyncWrite + Unpin>(
    writer: &mut W,
    request: &Request,
    chunks: &[(MetaContext, Vec<(u32, u32)>)],
) -> std::io::Result<()> {
    for (index, (context, descriptors)) in chunks.iter().enumerate() {
        let flags = if index + 1 == chunks.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        let length = 4 + 8 * descriptors.len();
        send_chunk_header(writer, request, flags, REPLY_TYPE_BLOCK_STATUS, length).await?;
        writer.write_all(&context.id().to_be_bytes()).await?;
        for (length, status) in descriptors {
            writer.write_all(&length.to_be_bytes()).await?;
            writer.write_all(&status.to_be_bytes()).await?;
        }
    }
    Ok(())
}

/// The protocol's strings are at most 4096 bytes; cut on a character boundary.
fn cut_to_string_limit(message: &str) -> &str {
    let mut end = message.len().min(MAX_STRING_LENGTH);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use sanblk_proto::nbd::CHANGED_FLAG;

    const C: u32 = CHANGED_FLAG;

    #[test]
    fn descriptors_are_cut_at_the_request_and_merged() {
        let runs = [(100, 0), (0, C), (50, 0), (200, C), (300, 0)];
        assert_eq!(
            status_descriptors(&runs, 400, false),
            vec![(150, 0), (200, C), (50, 0)]
        );
        assert_eq!(status_descriptors(&runs, 120, false), vec![(120, 0)]);
        assert_eq!(status_descriptors(&runs, 400, true), vec![(150, 0)]);
        assert_eq!(status_descriptors(&[], 400, false), vec![]);
        assert_eq!(status_descriptors(&[(0, C)], 400, false), vec![]);
    }

    #[test]
    fn descriptors_fit_u32_whatever_the_runs() {
        let runs = [(u64::MAX, C), (5, 0)];
        assert_eq!(
            status_descriptors(&runs, u32::MAX, false),
            vec![(u32::MAX, C)]
        );
        assert_eq!(
            status_descriptors(&[(1 << 33, 0), (1 << 33, C)], 4096, false),
            vec![(4096, 0)]
        );
    }

    #[test]
    fn descriptors_stop_at_the_limit() {
        let runs: Vec<(u64, u32)> = (0..MAX_STATUS_DESCRIPTORS + 10)
            .map(|index| (512, (index % 2) as u32))
            .collect();
        let descriptors = status_descriptors(&runs, u32::MAX, false);
        assert_eq!(descriptors.len(), MAX_STATUS_DESCRIPTORS);
        assert_eq!(descriptors[0], (512, 0));
        assert_eq!(descriptors[MAX_STATUS_DESCRIPTORS - 1], (512, 1));
    }

    fn request(offset: u64, length: u32, flags: u16) -> Request {
        Request {
            flags,
            command: CMD_READ,
            cookie: 1,
            offset,
            length,
        }
    }

    #[test]
    fn ranges_must_be_nonempty_bounded_and_inside_the_export() {
        let size = 1 << 20;
        assert_eq!(
            check_range(&request(0, 4096, 0), size, MAX_REQUEST_LENGTH, EINVAL),
            Ok(())
        );
        assert_eq!(
            check_range(&request(size - 1, 1, 0), size, MAX_REQUEST_LENGTH, EINVAL),
            Ok(())
        );
        for bad in [
            request(0, 0, 0),
            request(size, 1, 0),
            request(u64::MAX, 1, 0),
            request(0, MAX_REQUEST_LENGTH + 1, 0),
        ] {
            let refusal = check_range(&bad, u64::MAX, MAX_REQUEST_LENGTH, EINVAL)
                .and_then(|()| check_range(&bad, size, MAX_REQUEST_LENGTH, EINVAL));
            assert_eq!(
                refusal.map_err(|refusal| refusal.error),
                Err(EINVAL),
                "{bad:?}"
            );
        }
        assert_eq!(
            check_range(&request(size, 1, 0), size, MAX_REQUEST_LENGTH, EINVAL)
                .map_err(|refusal| refusal.message),
            Err(
                "1 bytes at offset 1048576 reach beyond the end of the export (1048576 bytes)"
                    .to_string()
            )
        );
    }

    #[test]
    fn writes_beyond_the_end_are_enospc_but_malformed_ones_einval() {
        let size = 1 << 20;
        let error = |request: Request| {
            check_range(&request, size, MAX_REQUEST_LENGTH, ENOSPC).map_err(|r| r.error)
        };
        assert_eq!(error(request(size - 512, 512, 0)), Ok(()));
        assert_eq!(error(request(size - 512, 1024, 0)), Err(ENOSPC));
        assert_eq!(error(request(u64::MAX, 1, 0)), Err(ENOSPC));
        assert_eq!(error(request(0, 0, 0)), Err(EINVAL));
        assert_eq!(error(request(0, MAX_REQUEST_LENGTH + 1, 0)), Err(EINVAL));
    }

    #[test]
    fn a_full_volume_is_enospc_anything_else_eio() {
        for errno in [libc::ENOSPC, libc::EDQUOT, libc::EFBIG] {
            let error = std::io::Error::from_raw_os_error(errno);
            assert_eq!(io_error_value(&error), ENOSPC, "{error}");
        }
        let error = std::io::Error::from_raw_os_error(libc::EIO);
        assert_eq!(io_error_value(&error), EIO);
        assert_eq!(io_error_value(&std::io::Error::other("lost")), EIO);
    }

    #[test]
    fn flags_outside_the_command_are_refused_but_fua_passes() {
        assert_eq!(check_flags(&request(0, 1, CMD_FLAG_FUA), 0), Ok(()));
        assert_eq!(
            check_flags(&request(0, 1, CMD_FLAG_DF), CMD_FLAG_DF),
            Ok(())
        );
        assert_eq!(
            check_flags(&request(0, 1, CMD_FLAG_DF), 0).map_err(|refusal| refusal.message),
            Err("flags 0x4 are not valid for NBD_CMD_READ".to_string())
        );
    }

    #[test]
    fn messages_are_cut_on_a_character_boundary() {
        let long = "é".repeat(3000);
        let cut = cut_to_string_limit(&long);
        assert_eq!(cut.len(), MAX_STRING_LENGTH);
        assert_eq!(cut_to_string_limit("short"), "short");
    }
}
