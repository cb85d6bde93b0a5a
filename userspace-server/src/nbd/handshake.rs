//! Option haggling, the fixed newstyle handshake: from the greeting to the export the client
//! chooses (with `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`), or to its `NBD_OPT_ABORT`.
//!
//! Options the server does not know are refused with `NBD_REP_ERR_UNSUP`, malformed ones
//! with `NBD_REP_ERR_INVALID`; the session goes on after either. It ends on what cannot be
//! answered: a bad magic, oversized option data (skipping up to 4 GiB is not worth it), too
//! many options, or an unknown export chosen with `NBD_OPT_EXPORT_NAME` (which has no error
//! reply).

use std::sync::Arc;

use log::debug;
use sanblk_proto::nbd::{
    option_name, OptionHeader, OptionReplyHeader, EXPORT_NAME_PADDING, FLAG_CAN_MULTI_CONN,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS, FLAG_NO_ZEROES,
    FLAG_READ_ONLY, FLAG_SEND_DF, FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_WRITE_ZEROES, IHAVEOPT,
    INFO_BLOCK_SIZE, INFO_EXPORT, INFO_NAME, MAX_OPTION_LENGTH, MAX_REQUEST_LENGTH,
    MAX_STRING_LENGTH, NBDMAGIC, OPTION_HEADER_LEN, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO,
    OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY,
    REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP,
    REP_INFO, REP_META_CONTEXT, REP_SERVER,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::contexts::{self, MetaContext};
use super::{Export, Exports, Hangup};
use crate::log_text::peer_text;

/// Options one handshake may send. A real client needs four or five; the rest is a peer
/// keeping the connection busy.
const MAX_OPTIONS: usize = 64;
/// Block sizes advertised to clients that ask (`NBD_INFO_BLOCK_SIZE`): any alignment works,
/// 4 KiB is what the devices below prefer, and reads are bounded as the protocol suggests.
const MIN_BLOCK_SIZE: u32 = 1;
const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Characters of a client-supplied name quoted back in an error message.
const MAX_QUOTED_CHARS: usize = 128;

/// The export a client chose and what it negotiated for the transmission phase.
pub(super) struct Session {
    pub(super) name: String,
    pub(super) export: Arc<dyn Export>,
    pub(super) structured_replies: bool,
    /// [`Export::writable`] when the client chose the export: the flags it was sent.
    pub(super) writable: bool,
    /// Selected by the last `NBD_OPT_SET_META_CONTEXT`, if it named this export.
    pub(super) contexts: Vec<MetaContext>,
}

impl Session {
    pub(super) fn context_names(&self) -> Vec<&'static str> {
        self.contexts.iter().map(|context| context.name()).collect()
    }
}

/// A read-only export is a snapshot: no writes, so nothing to flush (flush is still
/// advertised, and acknowledged, for clients that always send one), and connections cannot
/// disagree about the content, so several may serve one client.
///
/// A writable export offers what a restore needs: flush and FUA, so a client can make its
/// writes durable, and write zeroes, so holes in the image cost no payload. Not trim:
/// [`Export`] has no way to discard, and a restore wants zeroes, not undefined blocks. Not
/// multi-conn either: that promises a flush on one connection covers the writes made on all
/// the others, and [`Export`] promises nothing across the exports each connection opens.
///
/// Reads are always one chunk, so "don't fragment" costs nothing; the protocol allows
/// offering it only with structured replies.
fn transmission_flags(structured_replies: bool, writable: bool) -> u16 {
    let base = if writable {
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_WRITE_ZEROES
    } else {
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN
    };
    if structured_replies {
        base | FLAG_SEND_DF
    } else {
        base
    }
}

/// Greets the client and haggles until it chooses an export (`Some`) or aborts (`None`).
pub(super) async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    exports: &Arc<dyn Exports>,
) -> Result<Option<Session>, Hangup>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&NBDMAGIC.to_be_bytes()).await?;
    writer.write_all(&IHAVEOPT.to_be_bytes()).await?;
    writer
        .write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
        .await?;
    writer.flush().await?;

    let client_flags = reader.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(Hangup::protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(Hangup::protocol(
            "the client does not speak the fixed newstyle handshake",
        ));
    }
    let mut haggle = Haggle {
        writer,
        exports,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured_replies: false,
        selected: None,
    };
    for _ in 0..MAX_OPTIONS {
        let mut raw = [0u8; OPTION_HEADER_LEN];
        reader.read_exact(&mut raw).await?;
        let header = OptionHeader::decode(&raw)
            .ok_or_else(|| Hangup::protocol("option without the IHAVEOPT magic"))?;
        debug!(
            "NBD: {} ({}), {} bytes",
            option_name(header.option),
            header.option,
            header.length
        );
        if header.length > MAX_OPTION_LENGTH {
            if header.option != OPT_EXPORT_NAME {
                let message = format!("option data of at most {MAX_OPTION_LENGTH} bytes");
                haggle
                    .refuse(header.option, REP_ERR_TOO_BIG, &message)
                    .await?;
                haggle.writer.flush().await?;
            }
            return Err(Hangup::protocol(format!(
                "{} with {} bytes of data",
                option_name(header.option),
                header.length
            )));
        }
        let mut data = vec![0u8; header.length as usize];
        reader.read_exact(&mut data).await?;
        let next = haggle.option(header.option, &data).await?;
        haggle.writer.flush().await?;
        match next {
            Next::Haggle => {}
            Next::Abort => return Ok(None),
            Next::Transmit(session) => return Ok(Some(session)),
        }
    }
    Err(Hangup::protocol(format!(
        "more than {MAX_OPTIONS} options in one handshake"
    )))
}

/// What follows an option.
enum Next {
    Haggle,
    Abort,
    Transmit(Session),
}

/// The handshake's state between options.
struct Haggle<'a, W> {
    writer: &'a mut W,
    exports: &'a Arc<dyn Exports>,
    no_zeroes: bool,
    structured_replies: bool,
    /// The export named by the last `NBD_OPT_SET_META_CONTEXT`, and what it selected.
    selected: Option<(String, Vec<MetaContext>)>,
}

impl<W: AsyncWrite + Unpin> Haggle<'_, W> {
    async fn option(&mut self, option: u32, data: &[u8]) -> Result<Next, Hangup> {
        match option {
            OPT_EXPORT_NAME => self.export_name(data).await,
            OPT_ABORT => {
                // The client may already be gone: it need not wait for this ack.
                let _ = self.reply(option, REP_ACK, &[]).await;
                let _ = self.writer.flush().await;
                Ok(Next::Abort)
            }
            OPT_LIST => {
                self.list(data).await?;
                Ok(Next::Haggle)
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data).await,
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured_replies = true;
                    self.reply(option, REP_ACK, &[]).await?;
                } else {
                    self.refuse(option, REP_ERR_INVALID, "this option takes no data")
                        .await?;
                }
                Ok(Next::Haggle)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data).await?;
                Ok(Next::Haggle)
            }
            OPT_STARTTLS => {
                self.refuse(option, REP_ERR_POLICY, "no TLS on this local socket")
                    .await?;
                Ok(Next::Haggle)
            }
            _ => {
                let message = format!("option {option} is not supported");
                self.refuse(option, REP_ERR_UNSUP, &message).await?;
                Ok(Next::Haggle)
            }
        }
    }

    /// The old way into transmission: the data is the bare name, and the only possible
    /// refusal is hanging up.
    async fn export_name(&mut self, data: &[u8]) -> Result<Next, Hangup> {
        let name = std::str::from_utf8(data)
            .map_err(|_| Hangup::protocol("NBD_OPT_EXPORT_NAME with a name that is not UTF-8"))?;
        let export = open(self.exports, name).await.map_err(|reason| {
            Hangup::protocol(format!(
                "NBD_OPT_EXPORT_NAME for {}: {reason}",
                peer_text(name)
            ))
        })?;
        let writable = export.writable();
        self.writer.write_all(&export.size().to_be_bytes()).await?;
        self.writer
            .write_all(&transmission_flags(self.structured_replies, writable).to_be_bytes())
            .await?;
        if !self.no_zeroes {
            self.writer.write_all(&[0u8; EXPORT_NAME_PADDING]).await?;
        }
        Ok(Next::Transmit(self.session(name, export, writable)))
    }

    async fn list(&mut self, data: &[u8]) -> Result<(), Hangup> {
        if !data.is_empty() {
            return self
                .refuse(OPT_LIST, REP_ERR_INVALID, "this option takes no data")
                .await;
        }
        let exports = self.exports.clone();
        let names = super::blocking(move || Ok(exports.names())).await?;
        // A name longer than the protocol's strings could not be chosen anyway.
        for name in names.iter().filter(|name| name.len() <= MAX_STRING_LENGTH) {
            let mut entry = Vec::with_capacity(4 + name.len());
            put_string32(&mut entry, name);
            self.reply(OPT_LIST, REP_SERVER, &entry).await?;
        }
        self.reply(OPT_LIST, REP_ACK, &[]).await
    }

    async fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Next, Hangup> {
        let (name, requested) = match parse_export_request(data) {
            Ok(parsed) => parsed,
            Err(message) => {
                self.refuse(option, REP_ERR_INVALID, &message).await?;
                return Ok(Next::Haggle);
            }
        };
        let export = match open(self.exports, &name).await {
            Ok(export) => export,
            Err(reason) => {
                self.refuse_unknown(option, &name, &reason).await?;
                return Ok(Next::Haggle);
            }
        };
        let writable = export.writable();
        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&export.size().to_be_bytes());
        info.extend_from_slice(
            &transmission_flags(self.structured_replies, writable).to_be_bytes(),
        );
        self.reply(option, REP_INFO, &info).await?;
        if requested.contains(&INFO_NAME) {
            let mut info = INFO_NAME.to_be_bytes().to_vec();
            info.extend_from_slice(name.as_bytes());
            self.reply(option, REP_INFO, &info).await?;
        }
        if requested.contains(&INFO_BLOCK_SIZE) {
            let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for size in [MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_REQUEST_LENGTH] {
                info.extend_from_slice(&size.to_be_bytes());
            }
            self.reply(option, REP_INFO, &info).await?;
        }
        self.reply(option, REP_ACK, &[]).await?;
        if option == OPT_GO {
            Ok(Next::Transmit(self.session(&name, export, writable)))
        } else {
            Ok(Next::Haggle)
        }
    }

    async fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), Hangup> {
        if option == OPT_SET_META_CONTEXT {
            // A new selection replaces the old one even when it fails.
            self.selected = None;
        }
        if !self.structured_replies {
            return self
                .refuse(
                    option,
                    REP_ERR_INVALID,
                    "negotiate structured replies first (NBD_OPT_STRUCTURED_REPLY)",
                )
                .await;
        }
        let (name, queries) = match parse_context_request(data) {
            Ok(parsed) => parsed,
            Err(message) => return self.refuse(option, REP_ERR_INVALID, &message).await,
        };
        if let Err(reason) = open(self.exports, &name).await {
            return self.refuse_unknown(option, &name, &reason).await;
        }
        let listing = option == OPT_LIST_META_CONTEXT;
        let matching = if listing {
            contexts::listed(&queries)
        } else {
            contexts::selected(&queries)
        };
        for context in &matching {
            // Listed contexts carry no id: the protocol reserves 0 there.
            let id = if listing { 0 } else { context.id() };
            let mut entry = id.to_be_bytes().to_vec();
            entry.extend_from_slice(context.name().as_bytes());
            self.reply(option, REP_META_CONTEXT, &entry).await?;
        }
        if !listing {
            self.selected = Some((name, matching));
        }
        self.reply(option, REP_ACK, &[]).await
    }

    fn session(&self, name: &str, export: Arc<dyn Export>, writable: bool) -> Session {
        let contexts = match &self.selected {
            Some((selected_for, contexts)) if selected_for == name => contexts.clone(),
            _ => Vec::new(),
        };
        Session {
            name: name.to_string(),
            export,
            structured_replies: self.structured_replies,
            writable,
            contexts,
        }
    }

    async fn reply(&mut self, option: u32, reply: u32, data: &[u8]) -> Result<(), Hangup> {
        // Replies are built here from bounded parts (names of at most MAX_STRING_LENGTH).
        let length = u32::try_from(data.len())
            .map_err(|_| Hangup::protocol("option reply too long to send"))?;
        let header = OptionReplyHeader {
            option,
            reply,
            length,
        };
        self.writer.write_all(&header.encode()).await?;
        self.writer.write_all(data).await?;
        Ok(())
    }

    /// An error reply with a message for the user.
    async fn refuse(&mut self, option: u32, reply: u32, message: &str) -> Result<(), Hangup> {
        debug!("NBD: refusing {}: {message}", option_name(option));
        self.reply(option, reply, message.as_bytes()).await
    }

    async fn refuse_unknown(
        &mut self,
        option: u32,
        name: &str,
        reason: &str,
    ) -> Result<(), Hangup> {
        let message = format!("no export \"{}\": {}", quoted(name), quoted(reason));
        self.refuse(option, REP_ERR_UNKNOWN, &message).await
    }
}

/// `NBD_OPT_INFO` and `NBD_OPT_GO` data: the export name and the information requested.
fn parse_export_request(data: &[u8]) -> Result<(String, Vec<u16>), String> {
    let mut fields = Fields::new(data);
    let name = fields.string32("export name")?;
    let count = fields.u16()?;
    let mut requested = Vec::new();
    for _ in 0..count {
        requested.push(fields.u16()?);
    }
    fields.finish()?;
    Ok((name, requested))
}

/// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT` data: the export name and the
/// queries.
fn parse_context_request(data: &[u8]) -> Result<(String, Vec<String>), String> {
    let mut fields = Fields::new(data);
    let name = fields.string32("export name")?;
    let count = fields.u32()?;
    // Not preallocated from the peer's count: each query takes at least 4 bytes of the
    // (bounded) data, which bounds the loop.
    let mut queries = Vec::new();
    for _ in 0..count {
        let query = fields.string32("query")?;
        if !contexts::query_well_formed(&query) {
            return Err(format!(
                "query \"{}\" does not start with a namespace and a colon",
                quoted(&query)
            ));
        }
        queries.push(query);
    }
    fields.finish()?;
    Ok((name, queries))
}

/// Opens an export on the blocking pool (finding a snapshot may read metadata).
async fn open(exports: &Arc<dyn Exports>, name: &str) -> Result<Arc<dyn Export>, String> {
    let (exports, name) = (exports.clone(), name.to_string());
    match tokio::task::spawn_blocking(move || exports.open(&name)).await {
        Ok(opened) => opened,
        Err(e) => Err(format!("opening the export failed: {e}")),
    }
}

/// `text` cut to [`MAX_QUOTED_CHARS`], so messages stay within the protocol's string limit.
fn quoted(text: &str) -> String {
    let mut chars = text.chars();
    let mut shown: String = chars.by_ref().take(MAX_QUOTED_CHARS).collect();
    if chars.next().is_some() {
        shown.push('…');
    }
    shown
}

fn put_string32(data: &mut Vec<u8>, text: &str) {
    // Callers pass strings of at most MAX_STRING_LENGTH bytes.
    let length = u32::try_from(text.len()).unwrap_or(u32::MAX);
    data.extend_from_slice(&length.to_be_bytes());
    data.extend_from_slice(text.as_bytes());
}

/// Reads an option's data front to back, checking every field against what is left, so a
/// length field cannot point past the data.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(data: &'a [u8]) -> Fields<'a> {
        Fields { rest: data }
    }

    fn take(&mut self, length: usize) -> Result<&'a [u8], String> {
        if length > self.rest.len() {
            return Err(format!(
                "option data ends {} bytes short",
                length - self.rest.len()
            ));
        }
        let (taken, rest) = self.rest.split_at(length);
        self.rest = rest;
        Ok(taken)
    }

    fn u16(&mut self) -> Result<u16, String> {
        let raw = self.take(2)?;
        Ok(u16::from_be_bytes([raw[0], raw[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let raw = self.take(4)?;
        Ok(u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]))
    }

    /// A 32-bit length and that many bytes of UTF-8.
    fn string32(&mut self, what: &str) -> Result<String, String> {
        let length = self.u32()? as usize;
        if length > MAX_STRING_LENGTH {
            return Err(format!(
                "{what} of {length} bytes (at most {MAX_STRING_LENGTH})"
            ));
        }
        let raw = self.take(length)?;
        String::from_utf8(raw.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn finish(self) -> Result<(), String> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} unexpected bytes after the option data",
                self.rest.len()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_stop_at_the_end_of_the_data() {
        let mut data = 3u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"abc");
        data.extend_from_slice(&1u16.to_be_bytes());
        let mut fields = Fields::new(&data);
        assert_eq!(fields.string32("name"), Ok("abc".to_string()));
        assert_eq!(fields.u16(), Ok(1));
        assert_eq!(
            fields.u16(),
            Err("option data ends 2 bytes short".to_string())
        );

        let mut long = u32::MAX.to_be_bytes().to_vec();
        long.extend_from_slice(b"abc");
        assert_eq!(
            Fields::new(&long).string32("name"),
            Err("name of 4294967295 bytes (at most 4096)".to_string())
        );
        let short = 5u32.to_be_bytes();
        assert_eq!(
            Fields::new(&short).string32("name"),
            Err("option data ends 5 bytes short".to_string())
        );
        assert_eq!(
            Fields::new(&[0, 0, 0, 0, 9]).finish(),
            Err("5 unexpected bytes after the option data".to_string())
        );
    }

    #[test]
    fn transmission_flags_offer_df_only_with_structured_replies() {
        assert_eq!(transmission_flags(false, false), 0b1_0000_0111);
        assert_eq!(transmission_flags(true, false), 0b1_1000_0111);
    }

    #[test]
    fn writable_exports_offer_flush_fua_and_zeroes_but_not_trim_or_multi_conn() {
        assert_eq!(transmission_flags(false, true), 0b0_0100_1101);
        assert_eq!(transmission_flags(true, true), 0b0_1100_1101);
    }

    #[test]
    fn quoted_names_are_cut() {
        assert_eq!(quoted("snap"), "snap");
        let long = "é".repeat(200);
        assert_eq!(quoted(&long), format!("{}…", "é".repeat(MAX_QUOTED_CHARS)));
    }
}
