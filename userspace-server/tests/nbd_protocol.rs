//! The NBD server (`sand::nbd`) in-process on a temporary Unix socket, exporting in-memory
//! snapshots, against sanblk's own client, against `qemu-img` (a stock client), and against
//! hostile byte sequences written by hand. After every hostile exchange the server must still
//! serve a normal client.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use sanblk_proto::nbd::*;
use sand::nbd::{serve, Export, Exports};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const MIB: u64 = 1 << 20;
/// The pattern export's size and its unit of change.
const SNAPSHOT_SIZE: u64 = 8 * MIB;
const CHANGE_CHUNK: u64 = 64 * 1024;
/// The failing export's size; reads from its second half fail.
const FAILING_SIZE: u64 = MIB;
/// How long any single exchange in these tests may take.
const PROMPT: Duration = Duration::from_secs(10);

/// A deterministic byte for every offset, different from block to block.
fn pattern_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

fn pattern(offset: u64, length: u64) -> Vec<u8> {
    (offset..offset + length).map(pattern_byte).collect()
}

/// 8 MiB of the pattern; every odd 64 KiB chunk changed since the previous snapshot.
struct PatternSnapshot;

impl Export for PatternSnapshot {
    fn size(&self) -> u64 {
        SNAPSHOT_SIZE
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if offset + buf.len() as u64 > SNAPSHOT_SIZE {
            return Err(std::io::Error::other("read beyond the snapshot"));
        }
        for (at, byte) in buf.iter_mut().enumerate() {
            *byte = pattern_byte(offset + at as u64);
        }
        Ok(())
    }

    fn changed(&self, offset: u64, length: u64) -> std::io::Result<Vec<(u64, u32)>> {
        let end = (offset + length).min(SNAPSHOT_SIZE);
        let mut runs = Vec::new();
        let mut at = offset;
        while at < end {
            let chunk = at / CHANGE_CHUNK;
            let chunk_end = ((chunk + 1) * CHANGE_CHUNK).min(end);
            let flags = if chunk % 2 == 1 { CHANGED_FLAG } else { 0 };
            runs.push((chunk_end - at, flags));
            at = chunk_end;
        }
        Ok(runs)
    }
}

/// 1 MiB whose second half cannot be read and whose changes cannot be told.
struct FailingSnapshot;

impl Export for FailingSnapshot {
    fn size(&self) -> u64 {
        FAILING_SIZE
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if offset + buf.len() as u64 > FAILING_SIZE / 2 {
            return Err(std::io::Error::other("medium error"));
        }
        buf.fill(0xa5);
        Ok(())
    }

    fn changed(&self, _offset: u64, _length: u64) -> std::io::Result<Vec<(u64, u32)>> {
        Err(std::io::Error::other("change map lost"))
    }
}

struct TestExports;

impl Exports for TestExports {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, String> {
        match name {
            "snap-1" => Ok(Arc::new(PatternSnapshot)),
            "failing" => Ok(Arc::new(FailingSnapshot)),
            _ => Err(format!("no snapshot named {name}")),
        }
    }

    fn names(&self) -> Vec<String> {
        vec!["snap-1".to_string(), "failing".to_string()]
    }
}

struct TestServer {
    socket: PathBuf,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    dir: tempfile::TempDir,
}

impl TestServer {
    /// A server only this test's user (and root) may use.
    fn start() -> TestServer {
        TestServer::start_with(uid_of)
    }

    /// A server for the uid `allowed_uid` picks, given the server's directory.
    fn start_with(allowed_uid: impl FnOnce(&Path) -> u32) -> TestServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let socket = dir.path().join("nbd.sock");
        let listener =
            UnixListener::bind(&socket).unwrap_or_else(|e| panic!("bind {socket:?}: {e}"));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(serve(
            listener,
            Arc::new(TestExports),
            allowed_uid(dir.path()),
            shutdown_rx,
        ));
        TestServer {
            socket,
            shutdown,
            task,
            dir,
        }
    }

    async fn client(&self, export: &str, want_changed_context: bool) -> NbdClient {
        within(NbdClient::connect_unix(
            &self.socket,
            export,
            want_changed_context,
        ))
        .await
        .unwrap_or_else(|e| panic!("connecting to {export}: {e}"))
    }

    /// A normal client still gets exact data and changes.
    async fn assert_still_serves(&self) {
        let mut client = self.client("snap-1", true).await;
        let data = within(client.read(CHANGE_CHUNK - 100, 300))
            .await
            .unwrap_or_else(|e| panic!("read: {e}"));
        assert_eq!(data, pattern(CHANGE_CHUNK - 100, 300));
        let changes = within(client.changed_extents(CHANGE_CHUNK - 100, 300))
            .await
            .unwrap_or_else(|e| panic!("changed_extents: {e}"));
        assert_eq!(changes, vec![(100, 0), (200, CHANGED_FLAG)]);
        within(client.disconnect())
            .await
            .unwrap_or_else(|e| panic!("disconnect: {e}"));
    }

    async fn raw(&self) -> Raw {
        let stream = within(UnixStream::connect(&self.socket))
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        Raw { stream }
    }

    /// A raw connection past the greeting, with these client flags sent.
    async fn raw_haggling(&self, client_flags: u32) -> Raw {
        let mut raw = self.raw().await;
        let mut greeting = [0u8; 18];
        raw.read_exact(&mut greeting).await;
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([greeting[16], greeting[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        raw.send(&client_flags.to_be_bytes()).await;
        raw
    }

    /// A raw connection in transmission on `export`, with or without structured replies and
    /// with the metadata contexts named in `contexts` selected.
    async fn raw_transmitting(&self, export: &str, structured: bool, contexts: &[&str]) -> Raw {
        let mut raw = self
            .raw_haggling(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .await;
        if structured {
            raw.option(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(
                raw.option_reply().await,
                (OPT_STRUCTURED_REPLY, REP_ACK, vec![])
            );
        }
        if !contexts.is_empty() {
            let queries: Vec<String> = contexts.iter().map(|name| name.to_string()).collect();
            raw.option(OPT_SET_META_CONTEXT, &context_request(export, &queries))
                .await;
            for _ in contexts {
                let (_, reply, _) = raw.option_reply().await;
                assert_eq!(reply, REP_META_CONTEXT);
            }
            assert_eq!(raw.option_reply().await.1, REP_ACK);
        }
        raw.option(OPT_GO, &export_request(export, &[])).await;
        let (option, reply, info) = raw.option_reply().await;
        assert_eq!((option, reply), (OPT_GO, REP_INFO));
        assert_eq!(&info[..2], &INFO_EXPORT.to_be_bytes());
        assert_eq!(raw.option_reply().await, (OPT_GO, REP_ACK, vec![]));
        raw
    }

    async fn stop(self) {
        let _ = self.shutdown.send(true);
        within(self.task)
            .await
            .unwrap_or_else(|e| panic!("server task: {e}"));
    }
}

fn uid_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {path:?}: {e}"))
        .uid()
}

async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PROMPT, future)
        .await
        .unwrap_or_else(|_| panic!("no progress within {PROMPT:?}"))
}

fn string32(text: &str) -> Vec<u8> {
    let mut data = (text.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(text.as_bytes());
    data
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data.
fn export_request(export: &str, info: &[u16]) -> Vec<u8> {
    let mut data = string32(export);
    data.extend_from_slice(&(info.len() as u16).to_be_bytes());
    for kind in info {
        data.extend_from_slice(&kind.to_be_bytes());
    }
    data
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` data.
fn context_request(export: &str, queries: &[String]) -> Vec<u8> {
    let mut data = string32(export);
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        data.extend_from_slice(&string32(query));
    }
    data
}

/// `NBD_REP_META_CONTEXT` data.
fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut data = id.to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(
        bytes
            .try_into()
            .unwrap_or_else(|_| panic!("{} bytes for a u32", bytes.len())),
    )
}

/// A hand-driven client connection.
struct Raw {
    stream: UnixStream,
}

impl Raw {
    async fn send(&mut self, bytes: &[u8]) {
        within(self.stream.write_all(bytes))
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
    }

    async fn read_exact(&mut self, buf: &mut [u8]) {
        within(self.stream.read_exact(buf))
            .await
            .unwrap_or_else(|e| panic!("reading {} bytes: {e}", buf.len()));
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        let header = OptionHeader {
            option,
            length: data.len() as u32,
        };
        self.send(&header.encode()).await;
        self.send(data).await;
    }

    /// An option without data, sent while the server may be closing the connection.
    async fn option_best_effort(&mut self, option: u32) {
        let header = OptionHeader { option, length: 0 };
        let _ = within(self.stream.write_all(&header.encode())).await;
    }

    /// The next option reply: option, reply type, data.
    async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut raw = [0u8; OPTION_REPLY_HEADER_LEN];
        self.read_exact(&mut raw).await;
        let header = OptionReplyHeader::decode(&raw)
            .unwrap_or_else(|| panic!("option reply without its magic: {raw:02x?}"));
        assert!(header.length <= MAX_OPTION_LENGTH, "{header:?}");
        let mut data = vec![0u8; header.length as usize];
        self.read_exact(&mut data).await;
        (header.option, header.reply, data)
    }

    async fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let request = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.send(&request.encode()).await;
    }

    /// The next simple reply: error and cookie.
    async fn simple_reply(&mut self) -> (u32, u64) {
        let mut raw = [0u8; SIMPLE_REPLY_LEN];
        self.read_exact(&mut raw).await;
        assert_eq!(be_u32(&raw[0..4]), SIMPLE_REPLY_MAGIC, "{raw:02x?}");
        let cookie = u64::from_be_bytes(raw[8..16].try_into().unwrap_or_default());
        (be_u32(&raw[4..8]), cookie)
    }

    /// The next structured chunk: flags, type, cookie, payload.
    async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut raw = [0u8; CHUNK_HEADER_LEN];
        self.read_exact(&mut raw).await;
        assert_eq!(be_u32(&raw[0..4]), STRUCTURED_REPLY_MAGIC, "{raw:02x?}");
        let flags = u16::from_be_bytes([raw[4], raw[5]]);
        let kind = u16::from_be_bytes([raw[6], raw[7]]);
        let cookie = u64::from_be_bytes(raw[8..16].try_into().unwrap_or_default());
        let length = be_u32(&raw[16..20]);
        assert!(u64::from(length) <= 8 + 32 * MIB, "chunk of {length} bytes");
        let mut payload = vec![0u8; length as usize];
        self.read_exact(&mut payload).await;
        (flags, kind, cookie, payload)
    }

    /// An error chunk's error and message.
    async fn error_chunk(&mut self, cookie: u64) -> (u32, String) {
        let (flags, kind, got_cookie, payload) = self.chunk().await;
        assert_eq!(
            (flags, kind, got_cookie),
            (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie)
        );
        let message_length = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
        assert_eq!(payload.len(), 6 + message_length);
        let message = String::from_utf8_lossy(&payload[6..]).into_owned();
        (be_u32(&payload[0..4]), message)
    }

    /// The server closes the connection (possibly after bytes already in flight, which are
    /// discarded) and sends nothing more.
    async fn assert_closed(&mut self) {
        let mut sink = [0u8; 4096];
        loop {
            match within(self.stream.read(&mut sink)).await {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("reading until close: {e}"),
            }
        }
    }

    /// Nothing at all arrives before the server closes the connection.
    async fn assert_closed_silently(&mut self) {
        let mut byte = [0u8; 1];
        match within(self.stream.read(&mut byte)).await {
            Ok(0) => {}
            Ok(_) => panic!("the server sent {byte:02x?} instead of closing"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }
}

// --- (a) sanblk's client ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reads_exact_data_size_and_changed_blocks() {
    let server = TestServer::start();
    let mut client = server.client("snap-1", true).await;
    assert_eq!(client.size(), SNAPSHOT_SIZE);
    assert!(client.structured_replies());
    assert!(client.has_changed_context());
    assert_eq!(
        client.transmission_flags(),
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_DF | FLAG_CAN_MULTI_CONN
    );

    for (offset, length) in [(0, 4096), (12_345, 100_000), (SNAPSHOT_SIZE - 512, 512)] {
        let data = within(client.read(offset, length))
            .await
            .unwrap_or_else(|e| panic!("read {length} at {offset}: {e}"));
        assert_eq!(
            data,
            pattern(offset, u64::from(length)),
            "{length} at {offset}"
        );
    }
    let whole = within(client.read(0, SNAPSHOT_SIZE as u32))
        .await
        .unwrap_or_else(|e| panic!("read everything: {e}"));
    assert_eq!(whole, pattern(0, SNAPSHOT_SIZE));

    let changes = within(client.changed_extents(0, 4 * CHANGE_CHUNK as u32))
        .await
        .unwrap_or_else(|e| panic!("changed_extents: {e}"));
    assert_eq!(
        changes,
        vec![
            (CHANGE_CHUNK, 0),
            (CHANGE_CHUNK, CHANGED_FLAG),
            (CHANGE_CHUNK, 0),
            (CHANGE_CHUNK, CHANGED_FLAG)
        ]
    );
    let changes = within(client.changed_extents(CHANGE_CHUNK / 2, 2 * CHANGE_CHUNK as u32))
        .await
        .unwrap_or_else(|e| panic!("changed_extents: {e}"));
    assert_eq!(
        changes,
        vec![
            (CHANGE_CHUNK / 2, 0),
            (CHANGE_CHUNK, CHANGED_FLAG),
            (CHANGE_CHUNK / 2, 0)
        ]
    );
    let everything = within(client.changed_extents(0, SNAPSHOT_SIZE as u32))
        .await
        .unwrap_or_else(|e| panic!("changed_extents: {e}"));
    let expected: Vec<(u64, u32)> = (0..SNAPSHOT_SIZE / CHANGE_CHUNK)
        .map(|chunk| (CHANGE_CHUNK, if chunk % 2 == 1 { CHANGED_FLAG } else { 0 }))
        .collect();
    assert_eq!(everything, expected);

    assert!(matches!(
        client.read(SNAPSHOT_SIZE - 100, 200).await,
        Err(NbdError::InvalidArgument(_))
    ));
    within(client.disconnect())
        .await
        .unwrap_or_else(|e| panic!("disconnect: {e}"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reports_server_errors_and_keeps_going() {
    let server = TestServer::start();

    let unknown = within(NbdClient::connect_unix(&server.socket, "nope", true)).await;
    let error = match unknown {
        Ok(_) => panic!("connected to an export that does not exist"),
        Err(error) => error,
    };
    assert_eq!(error.option_reply(), Some(REP_ERR_UNKNOWN));
    assert_eq!(
        error.to_string(),
        "the NBD server refused NBD_OPT_SET_META_CONTEXT: unknown export (NBD_REP_ERR_UNKNOWN): \
         no export \"nope\": no snapshot named nope"
    );
    let unknown = within(NbdClient::connect_unix(&server.socket, "nope", false)).await;
    match unknown {
        Err(NbdError::OptionRefused { option, reply, .. }) => {
            assert_eq!((option, reply), (OPT_GO, REP_ERR_UNKNOWN))
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("connected to an export that does not exist"),
    }

    let mut client = server.client("failing", true).await;
    let failed = within(client.read(FAILING_SIZE / 2, 4096)).await;
    let error = match failed {
        Ok(_) => panic!("read of the failing half succeeded"),
        Err(error) => error,
    };
    assert_eq!(error.request_error(), Some(EIO));
    assert_eq!(
        error.to_string(),
        "NBD_CMD_READ failed: input/output error (EIO): cannot read the snapshot at offset 524288"
    );
    let data = within(client.read(0, 4096))
        .await
        .unwrap_or_else(|e| panic!("read after a failed read: {e}"));
    assert_eq!(data, vec![0xa5; 4096]);
    let failed = within(client.changed_extents(0, 4096)).await;
    assert_eq!(failed.map_err(|e| e.request_error()), Err(Some(EIO)));

    let mut without_context = server.client("snap-1", false).await;
    assert!(!without_context.has_changed_context());
    assert!(matches!(
        without_context.changed_extents(0, 4096).await,
        Err(NbdError::ChangedContextNotNegotiated)
    ));
    server.assert_still_serves().await;
    server.stop().await;
}

// --- (b) a stock client -----------------------------------------------------------------------

fn qemu_img(args: &[&str], uid: Option<u32>) -> Output {
    let mut command = Command::new("qemu-img");
    command.args(args);
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    command
        .output()
        .unwrap_or_else(|e| panic!("running qemu-img (package qemu-utils): {e}"))
}

async fn qemu_img_async(args: Vec<String>, uid: Option<u32>) -> Output {
    within(tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        qemu_img(&args, uid)
    }))
    .await
    .unwrap_or_else(|e| panic!("qemu-img task: {e}"))
}

fn nbd_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_copies_the_export_exactly() {
    let server = TestServer::start();
    let uri = nbd_uri(&server.socket, "snap-1");

    let info = qemu_img_async(
        vec![
            "info".into(),
            "--output=json".into(),
            "-f".into(),
            "raw".into(),
            uri.clone(),
        ],
        None,
    )
    .await;
    assert!(
        info.status.success(),
        "qemu-img info: {}",
        String::from_utf8_lossy(&info.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)
        .unwrap_or_else(|e| panic!("qemu-img info output: {e}"));
    assert_eq!(info["virtual-size"], serde_json::json!(SNAPSHOT_SIZE));
    assert_eq!(info["format"], serde_json::json!("raw"));

    let copy = server.dir.path().join("copy.raw");
    let converted = qemu_img_async(
        vec![
            "convert".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            "raw".into(),
            uri,
            copy.display().to_string(),
        ],
        None,
    )
    .await;
    assert!(
        converted.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&converted.stderr)
    );
    let copied = std::fs::read(&copy).unwrap_or_else(|e| panic!("reading the copy: {e}"));
    assert_eq!(copied.len() as u64, SNAPSHOT_SIZE);
    assert!(copied == pattern(0, SNAPSHOT_SIZE), "the copy differs");
    server.assert_still_serves().await;
    server.stop().await;
}

// --- (c) hostile peers ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_without_the_magic_close_the_connection() {
    let server = TestServer::start();
    let mut raw = server
        .raw_haggling(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .await;
    raw.send(b"GET / HTTP/1.1\r\n").await;
    raw.assert_closed_silently().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_fixed_newstyle_or_with_unknown_flags_are_refused() {
    let server = TestServer::start();
    for flags in [0, FLAG_C_NO_ZEROES, FLAG_C_FIXED_NEWSTYLE | 1 << 7] {
        let mut raw = server.raw_haggling(flags).await;
        raw.assert_closed_silently().await;
    }
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_option_of_4_gib_is_refused_and_the_connection_closed() {
    let server = TestServer::start();
    let mut raw = server
        .raw_haggling(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .await;
    let header = OptionHeader {
        option: OPT_GO,
        length: u32::MAX,
    };
    raw.send(&header.encode()).await;
    let (option, reply, message) = raw.option_reply().await;
    assert_eq!((option, reply), (OPT_GO, REP_ERR_TOO_BIG));
    assert_eq!(message, b"option data of at most 65536 bytes");
    raw.assert_closed().await;

    // NBD_OPT_EXPORT_NAME has no error reply: only the close.
    let mut raw = server
        .raw_haggling(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .await;
    let header = OptionHeader {
        option: OPT_EXPORT_NAME,
        length: u32::MAX,
    };
    raw.send(&header.encode()).await;
    raw.assert_closed_silently().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_options_are_refused_and_haggling_goes_on() {
    let server = TestServer::start();
    let mut raw = server
        .raw_haggling(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .await;

    raw.option(0x1234, b"whatever").await;
    assert_eq!(
        raw.option_reply().await,
        (
            0x1234,
            REP_ERR_UNSUP,
            b"option 4660 is not supported".to_vec()
        )
    );
    raw.option(OPT_STARTTLS, &[]).await;
    assert_eq!(raw.option_reply().await.1, REP_ERR_POLICY);

    // A name length pointing past the data, a missing info count, trailing bytes.
    let mut past_the_end = 100u32.to_be_bytes().to_vec();
    past_the_end.extend_from_slice(b"snap-1\0\0");
    let missing_count = string32("snap-1");
    let mut trailing = export_request("snap-1", &[]);
    trailing.push(0);
    for data in [past_the_end, missing_count, trailing, vec![1, 2]] {
        raw.option(OPT_GO, &data).await;
        let (option, reply, _) = raw.option_reply().await;
        assert_eq!((option, reply), (OPT_GO, REP_ERR_INVALID), "{data:02x?}");
    }
    raw.option(OPT_LIST, b"x").await;
    assert_eq!(raw.option_reply().await.1, REP_ERR_INVALID);
    raw.option(OPT_STRUCTURED_REPLY, b"x").await;
    assert_eq!(raw.option_reply().await.1, REP_ERR_INVALID);
    let queries = vec![CHANGED_CONTEXT.to_string()];
    raw.option(OPT_SET_META_CONTEXT, &context_request("snap-1", &queries))
        .await;
    let (_, reply, message) = raw.option_reply().await;
    assert_eq!(reply, REP_ERR_INVALID);
    assert_eq!(
        message,
        b"negotiate structured replies first (NBD_OPT_STRUCTURED_REPLY)"
    );

    // Still haggling: the list, the contexts, and an unknown export's refusal.
    raw.option(OPT_LIST, &[]).await;
    assert_eq!(
        raw.option_reply().await,
        (OPT_LIST, REP_SERVER, string32("snap-1"))
    );
    assert_eq!(
        raw.option_reply().await,
        (OPT_LIST, REP_SERVER, string32("failing"))
    );
    assert_eq!(raw.option_reply().await, (OPT_LIST, REP_ACK, vec![]));

    raw.option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(raw.option_reply().await.1, REP_ACK);
    let listings: [(&[&str], &[&str]); 5] = [
        (&[], &[BASE_ALLOCATION, CHANGED_CONTEXT]),
        (&["sanblk:"], &[CHANGED_CONTEXT]),
        (&["base:"], &[BASE_ALLOCATION]),
        (&["qemu:dirty-bitmap:x", "sanblk:nothing"], &[]),
        (
            &["base:allocation", "sanblk:changed"],
            &[BASE_ALLOCATION, CHANGED_CONTEXT],
        ),
    ];
    for (queries, listed) in listings {
        let queries: Vec<String> = queries.iter().map(|query| query.to_string()).collect();
        raw.option(OPT_LIST_META_CONTEXT, &context_request("snap-1", &queries))
            .await;
        for name in listed {
            assert_eq!(
                raw.option_reply().await,
                (
                    OPT_LIST_META_CONTEXT,
                    REP_META_CONTEXT,
                    meta_context(0, name)
                ),
                "{queries:?}"
            );
        }
        assert_eq!(
            raw.option_reply().await,
            (OPT_LIST_META_CONTEXT, REP_ACK, vec![]),
            "{queries:?}"
        );
    }
    let no_namespace = vec!["allocation".to_string()];
    raw.option(
        OPT_LIST_META_CONTEXT,
        &context_request("snap-1", &no_namespace),
    )
    .await;
    assert_eq!(raw.option_reply().await.1, REP_ERR_INVALID);
    raw.option(OPT_LIST_META_CONTEXT, &context_request("nope", &[]))
        .await;
    assert_eq!(raw.option_reply().await.1, REP_ERR_UNKNOWN);

    raw.option(OPT_INFO, &export_request("nope", &[])).await;
    let (option, reply, message) = raw.option_reply().await;
    assert_eq!((option, reply), (OPT_INFO, REP_ERR_UNKNOWN));
    assert_eq!(message, b"no export \"nope\": no snapshot named nope");
    raw.option(
        OPT_INFO,
        &export_request("snap-1", &[INFO_NAME, INFO_BLOCK_SIZE]),
    )
    .await;
    let mut export_info = INFO_EXPORT.to_be_bytes().to_vec();
    export_info.extend_from_slice(&SNAPSHOT_SIZE.to_be_bytes());
    let flags =
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_DF | FLAG_CAN_MULTI_CONN;
    export_info.extend_from_slice(&flags.to_be_bytes());
    assert_eq!(raw.option_reply().await, (OPT_INFO, REP_INFO, export_info));
    let mut name_info = INFO_NAME.to_be_bytes().to_vec();
    name_info.extend_from_slice(b"snap-1");
    assert_eq!(raw.option_reply().await, (OPT_INFO, REP_INFO, name_info));
    let mut block_info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for size in [1u32, 4096, 32 << 20] {
        block_info.extend_from_slice(&size.to_be_bytes());
    }
    assert_eq!(raw.option_reply().await, (OPT_INFO, REP_INFO, block_info));
    assert_eq!(raw.option_reply().await, (OPT_INFO, REP_ACK, vec![]));

    raw.option(OPT_ABORT, &[]).await;
    assert_eq!(raw.option_reply().await, (OPT_ABORT, REP_ACK, vec![]));
    raw.assert_closed_silently().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_options_close_the_connection() {
    let server = TestServer::start();
    let mut raw = server
        .raw_haggling(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .await;
    for _ in 0..64 {
        raw.option(OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(raw.option_reply().await.1, REP_ACK);
    }
    // The server hangs up after the 64th without waiting for more; the 65th may not even
    // get through.
    raw.option_best_effort(OPT_STRUCTURED_REPLY).await;
    raw.assert_closed_silently().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_enters_transmission_or_closes_for_an_unknown_export() {
    let server = TestServer::start();
    let mut raw = server
        .raw_haggling(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .await;
    raw.option(OPT_EXPORT_NAME, b"nope").await;
    raw.assert_closed_silently().await;

    // Without NO_ZEROES: size, flags, then 124 zeroes; then requests work.
    let mut raw = server.raw_haggling(FLAG_C_FIXED_NEWSTYLE).await;
    raw.option(OPT_EXPORT_NAME, b"snap-1").await;
    let mut answer = [0xffu8; 8 + 2 + 124];
    raw.read_exact(&mut answer).await;
    assert_eq!(&answer[..8], &SNAPSHOT_SIZE.to_be_bytes());
    let flags = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
    assert_eq!(&answer[8..10], &flags.to_be_bytes());
    assert!(answer[10..].iter().all(|&byte| byte == 0));
    raw.request(CMD_READ, 0, 9, 4096, 16).await;
    assert_eq!(raw.simple_reply().await, (0, 9));
    let mut data = [0u8; 16];
    raw.read_exact(&mut data).await;
    assert_eq!(data.to_vec(), pattern(4096, 16));
    raw.request(CMD_DISC, 0, 10, 0, 0).await;
    raw.assert_closed_silently().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_replies_refuse_bad_requests_and_writes() {
    let server = TestServer::start();
    let mut raw = server.raw_transmitting("snap-1", false, &[]).await;

    raw.request(CMD_READ, 0, 1, SNAPSHOT_SIZE - 512, 1024).await;
    assert_eq!(raw.simple_reply().await, (EINVAL, 1));
    raw.request(CMD_READ, 0, 2, u64::MAX - 10, 512).await;
    assert_eq!(raw.simple_reply().await, (EINVAL, 2));
    raw.request(CMD_READ, 0, 3, 0, 1 << 30).await;
    assert_eq!(raw.simple_reply().await, (EINVAL, 3));
    raw.request(CMD_READ, 0, 4, 0, 0).await;
    assert_eq!(raw.simple_reply().await, (EINVAL, 4));
    // "Don't fragment" needs structured replies.
    raw.request(CMD_READ, CMD_FLAG_DF, 5, 0, 512).await;
    assert_eq!(raw.simple_reply().await, (EINVAL, 5));

    // The payload is skipped: the next request is read where it starts.
    raw.request(CMD_WRITE, 0, 6, 0, 4096).await;
    raw.send(&[0x5a; 4096]).await;
    assert_eq!(raw.simple_reply().await, (EPERM, 6));
    raw.request(CMD_TRIM, 0, 7, 0, 4096).await;
    assert_eq!(raw.simple_reply().await, (EPERM, 7));
    raw.request(CMD_WRITE_ZEROES, 0, 8, 0, 4096).await;
    assert_eq!(raw.simple_reply().await, (EPERM, 8));
    raw.request(CMD_FLUSH, 0, 9, 0, 0).await;
    assert_eq!(raw.simple_reply().await, (0, 9));
    raw.request(99, 0, 10, 0, 0).await;
    assert_eq!(raw.simple_reply().await, (EINVAL, 10));
    raw.request(CMD_BLOCK_STATUS, 0, 11, 0, 4096).await;
    assert_eq!(raw.simple_reply().await, (EINVAL, 11));

    // Pipelined: both requests sent before either reply is read, answered in order.
    raw.request(CMD_READ, 0, 12, 0, 512).await;
    raw.request(CMD_READ, 0, 13, SNAPSHOT_SIZE - 512, 512).await;
    for (cookie, offset) in [(12, 0), (13, SNAPSHOT_SIZE - 512)] {
        assert_eq!(raw.simple_reply().await, (0, cookie));
        let mut data = vec![0u8; 512];
        raw.read_exact(&mut data).await;
        assert_eq!(data, pattern(offset, 512));
    }

    let mut bad_magic = Request {
        flags: 0,
        command: CMD_READ,
        cookie: 14,
        offset: 0,
        length: 512,
    }
    .encode();
    bad_magic[0] ^= 0xff;
    raw.send(&bad_magic).await;
    raw.assert_closed_silently().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_too_large_to_skip_closes_the_connection() {
    let server = TestServer::start();
    let mut raw = server.raw_transmitting("snap-1", true, &[]).await;
    raw.request(CMD_WRITE, 0, 1, 0, u32::MAX).await;
    raw.assert_closed_silently().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_replies_carry_data_errors_and_both_contexts() {
    let server = TestServer::start();
    let mut raw = server
        .raw_transmitting("snap-1", true, &[BASE_ALLOCATION, CHANGED_CONTEXT])
        .await;

    raw.request(CMD_READ, CMD_FLAG_DF, 1, 1000, 3000).await;
    let (flags, kind, cookie, payload) = raw.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1)
    );
    assert_eq!(&payload[..8], &1000u64.to_be_bytes());
    assert_eq!(payload[8..].to_vec(), pattern(1000, 3000));

    raw.request(CMD_READ, 0, 2, SNAPSHOT_SIZE, 512).await;
    let (error, message) = raw.error_chunk(2).await;
    assert_eq!(error, EINVAL);
    assert_eq!(
        message,
        "512 bytes at offset 8388608 reach beyond the end of the export (8388608 bytes)"
    );
    raw.request(CMD_READ, 0, 3, 0, 1 << 30).await;
    assert_eq!(
        raw.error_chunk(3).await,
        (
            EINVAL,
            "1073741824 bytes at once (at most 33554432)".to_string()
        )
    );
    raw.request(CMD_WRITE, 0, 4, 0, 512).await;
    raw.send(&[1u8; 512]).await;
    assert_eq!(
        raw.error_chunk(4).await,
        (EPERM, "the export is a read-only snapshot".to_string())
    );

    // One chunk per context, in the order selected, the last one done.
    raw.request(
        CMD_BLOCK_STATUS,
        0,
        5,
        CHANGE_CHUNK / 2,
        3 * CHANGE_CHUNK as u32,
    )
    .await;
    let (flags, kind, cookie, payload) = raw.chunk().await;
    assert_eq!((flags, kind, cookie), (0, REPLY_TYPE_BLOCK_STATUS, 5));
    let mut allocation = 1u32.to_be_bytes().to_vec();
    allocation.extend_from_slice(&(3 * CHANGE_CHUNK as u32).to_be_bytes());
    allocation.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(payload, allocation);
    let (flags, kind, cookie, payload) = raw.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 5)
    );
    let mut changed = 2u32.to_be_bytes().to_vec();
    for (length, status) in [
        (CHANGE_CHUNK / 2, 0),
        (CHANGE_CHUNK, CHANGED_FLAG),
        (CHANGE_CHUNK, 0),
        (CHANGE_CHUNK / 2, CHANGED_FLAG),
    ] {
        changed.extend_from_slice(&(length as u32).to_be_bytes());
        changed.extend_from_slice(&status.to_be_bytes());
    }
    assert_eq!(payload, changed);

    // One descriptor per context when asked for one.
    raw.request(
        CMD_BLOCK_STATUS,
        CMD_FLAG_REQ_ONE,
        6,
        CHANGE_CHUNK,
        4096 * 100,
    )
    .await;
    let (_, _, _, payload) = raw.chunk().await;
    assert_eq!(
        payload[4..],
        [(4096u32 * 100).to_be_bytes(), 0u32.to_be_bytes()].concat()
    );
    let (flags, _, _, payload) = raw.chunk().await;
    assert_eq!(flags, REPLY_FLAG_DONE);
    assert_eq!(
        payload[4..],
        [
            (CHANGE_CHUNK as u32).to_be_bytes(),
            CHANGED_FLAG.to_be_bytes()
        ]
        .concat()
    );

    raw.request(CMD_BLOCK_STATUS, 0, 7, SNAPSHOT_SIZE - 512, 1024)
        .await;
    assert_eq!(raw.error_chunk(7).await.0, EINVAL);
    raw.request(CMD_FLUSH, 0, 8, 0, 0).await;
    assert_eq!(raw.simple_reply().await, (0, 8));
    raw.request(CMD_DISC, 0, 9, 0, 0).await;
    raw.assert_closed_silently().await;

    // Contexts selected for another export do not follow the client to this one.
    let mut raw = server
        .raw_haggling(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .await;
    raw.option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(raw.option_reply().await.1, REP_ACK);
    let queries = vec![CHANGED_CONTEXT.to_string(), "base:".to_string()];
    raw.option(OPT_SET_META_CONTEXT, &context_request("failing", &queries))
        .await;
    assert_eq!(
        raw.option_reply().await,
        (
            OPT_SET_META_CONTEXT,
            REP_META_CONTEXT,
            meta_context(2, CHANGED_CONTEXT)
        )
    );
    assert_eq!(raw.option_reply().await.1, REP_ACK);
    raw.option(OPT_GO, &export_request("snap-1", &[])).await;
    assert_eq!(raw.option_reply().await.1, REP_INFO);
    assert_eq!(raw.option_reply().await.1, REP_ACK);
    raw.request(CMD_BLOCK_STATUS, 0, 1, 0, 4096).await;
    assert_eq!(
        raw.error_chunk(1).await,
        (
            EINVAL,
            "no metadata context was selected for this export".to_string()
        )
    );
    server.assert_still_serves().await;
    server.stop().await;
}

// --- (d) peer credentials, shutdown -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_another_uid_are_refused() {
    let probe = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let me = uid_of(probe.path());
    if me != 0 {
        // Not root: a server for someone else refuses us before its greeting.
        let server = TestServer::start_with(|_| me + 1);
        let mut raw = server.raw().await;
        raw.assert_closed_silently().await;
        server.stop().await;
        return;
    }
    // Root is always allowed, so the refused peer is qemu-img running as another user.
    const ALLOWED: u32 = 65534;
    const OTHER: u32 = 65533;
    let server = TestServer::start_with(|dir| {
        // The peer must reach the socket to be refused by the server, not by the file mode.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {dir:?}: {e}"));
        ALLOWED
    });
    std::fs::set_permissions(&server.socket, std::fs::Permissions::from_mode(0o777))
        .unwrap_or_else(|e| panic!("chmod socket: {e}"));
    let uri = nbd_uri(&server.socket, "snap-1");
    let info = |uid| {
        qemu_img_async(
            vec!["info".into(), "-f".into(), "raw".into(), uri.clone()],
            Some(uid),
        )
    };
    let allowed = info(ALLOWED).await;
    assert!(
        allowed.status.success(),
        "uid {ALLOWED}: {}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    let refused = info(OTHER).await;
    let complaint = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "uid {OTHER} got in");
    // Closed by the server before its greeting, not stopped by the socket's file mode.
    assert!(
        complaint.contains("Failed to read initial magic"),
        "uid {OTHER}: {complaint}"
    );
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_and_stops_serving() {
    let server = TestServer::start();
    let mut client = server.client("snap-1", true).await;
    within(client.read(0, 512))
        .await
        .unwrap_or_else(|e| panic!("read: {e}"));
    let mut haggling = server
        .raw_haggling(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .await;
    let TestServer {
        socket,
        shutdown,
        task,
        dir: _dir,
    } = server;
    let _ = shutdown.send(true);
    within(task)
        .await
        .unwrap_or_else(|e| panic!("server task: {e}"));
    haggling.assert_closed_silently().await;
    assert!(within(client.read(0, 512)).await.is_err());
    assert!(UnixStream::connect(&socket).await.is_err());
}
