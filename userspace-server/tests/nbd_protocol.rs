//! The NBD server (`sand::nbd`) in-process on a temporary Unix socket, exporting in-memory
//! snapshots (read-only) and in-memory volumes (writable, as when a backup is restored),
//! against sanblk's own client, against `qemu-img` (a stock client), and against hostile byte
//! sequences written by hand. After every hostile exchange the server must still serve a
//! normal client.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
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
/// The writable volume's size: room for a write of the largest payload and more, so a payload
/// over the limit can lie inside the volume and be refused for its size alone.
const VOLUME_SIZE: u64 = 40 * MIB;
/// The small volumes' size (the read-only one and the failing one).
const SMALL_VOLUME_SIZE: u64 = MIB;
/// What a volume holds before anything is written: not zero, so written zeroes show.
const FRESH_BYTE: u8 = 0xee;
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

/// The pattern snapshot, whose reads come in pairs: each waits (up to [`PROMPT`]) until the
/// other read of its pair is being read too, and fails if none comes. A server that reads a
/// connection's requests one at a time fails every read of it.
#[derive(Default)]
struct PairedSnapshot {
    arrived: Mutex<u64>,
    paired: std::sync::Condvar,
}

impl Export for PairedSnapshot {
    fn size(&self) -> u64 {
        SNAPSHOT_SIZE
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut arrived = self.arrived.lock().unwrap_or_else(|p| p.into_inner());
        *arrived += 1;
        let pair_complete = arrived.div_ceil(2) * 2;
        self.paired.notify_all();
        let (arrived, waited) = self
            .paired
            .wait_timeout_while(arrived, PROMPT, |arrived| *arrived < pair_complete)
            .unwrap_or_else(|p| p.into_inner());
        drop(arrived);
        if waited.timed_out() {
            return Err(std::io::Error::other(
                "no other read came while this one was read",
            ));
        }
        PatternSnapshot.read(offset, buf)
    }

    fn changed(&self, offset: u64, length: u64) -> std::io::Result<Vec<(u64, u32)>> {
        PatternSnapshot.changed(offset, length)
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

/// A volume in memory, counting the calls that reach it.
struct MemoryVolume {
    data: Mutex<Vec<u8>>,
    writable: bool,
    /// Writes reaching beyond this offset fail, as on a disk with bad sectors.
    bad_from: u64,
    /// Flushes fail as on a full thin pool.
    flush_fails: bool,
    writes: AtomicUsize,
    flushes: AtomicUsize,
}

impl MemoryVolume {
    fn new(size: u64, writable: bool) -> MemoryVolume {
        MemoryVolume {
            data: Mutex::new(vec![FRESH_BYTE; size as usize]),
            writable,
            bad_from: size,
            flush_fails: false,
            writes: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
        }
    }

    /// Writable, but writes into its second half and every flush fail.
    fn failing() -> MemoryVolume {
        MemoryVolume {
            bad_from: SMALL_VOLUME_SIZE / 2,
            flush_fails: true,
            ..MemoryVolume::new(SMALL_VOLUME_SIZE, true)
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A test that panicked while holding the lock has failed already.
        self.data
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    fn flushes(&self) -> usize {
        self.flushes.load(Ordering::SeqCst)
    }
}

impl Export for MemoryVolume {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let data = self.lock();
        let start = offset as usize;
        let source = data
            .get(start..start + buf.len())
            .ok_or_else(|| std::io::Error::other("read beyond the volume"))?;
        buf.copy_from_slice(source);
        Ok(())
    }

    fn changed(&self, offset: u64, length: u64) -> std::io::Result<Vec<(u64, u32)>> {
        let _ = offset;
        Ok(vec![(length, 0)])
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        if offset + data.len() as u64 > self.bad_from {
            return Err(std::io::Error::other("medium error"));
        }
        let mut volume = self.lock();
        let start = offset as usize;
        volume
            .get_mut(start..start + data.len())
            .ok_or_else(|| std::io::Error::other("write beyond the volume"))?
            .copy_from_slice(data);
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        if self.flush_fails {
            return Err(std::io::ErrorKind::StorageFull.into());
        }
        Ok(())
    }
}

struct TestExports {
    /// `volume`: writable, [`VOLUME_SIZE`].
    volume: Arc<MemoryVolume>,
    /// `volume-locked`: an in-memory volume that would take writes, exported read-only.
    locked: Arc<MemoryVolume>,
    /// `volume-failing`: see [`MemoryVolume::failing`].
    failing: Arc<MemoryVolume>,
}

impl Exports for TestExports {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, String> {
        match name {
            "snap-1" => Ok(Arc::new(PatternSnapshot)),
            "failing" => Ok(Arc::new(FailingSnapshot)),
            "paired" => Ok(Arc::new(PairedSnapshot::default())),
            "volume" => Ok(self.volume.clone()),
            "volume-locked" => Ok(self.locked.clone()),
            "volume-failing" => Ok(self.failing.clone()),
            _ => Err(format!("no snapshot named {name}")),
        }
    }

    fn names(&self) -> Vec<String> {
        [
            "snap-1",
            "failing",
            "paired",
            "volume",
            "volume-locked",
            "volume-failing",
        ]
        .map(String::from)
        .to_vec()
    }
}

struct TestServer {
    socket: PathBuf,
    exports: Arc<TestExports>,
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
        let exports = Arc::new(TestExports {
            volume: Arc::new(MemoryVolume::new(VOLUME_SIZE, true)),
            locked: Arc::new(MemoryVolume::new(SMALL_VOLUME_SIZE, false)),
            failing: Arc::new(MemoryVolume::failing()),
        });
        let task = tokio::spawn(serve(
            listener,
            exports.clone(),
            allowed_uid(dir.path()),
            shutdown_rx,
        ));
        TestServer {
            socket,
            exports,
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

    /// A normal client still writes to the writable volume, and reads back what it wrote.
    async fn assert_still_writes(&self) {
        let volume = &self.exports.volume;
        let mut expected = volume.contents();
        let (offset, data) = (3 * MIB + 7, pattern(11, 1000));
        let mut client = self.client("volume", false).await;
        within(client.write(offset, &data, true))
            .await
            .unwrap_or_else(|e| panic!("write: {e}"));
        expected[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        assert_same(
            &volume.contents(),
            &expected,
            "the volume after a normal write",
        );
        let read = within(client.read(offset, data.len() as u32))
            .await
            .unwrap_or_else(|e| panic!("read: {e}"));
        assert_same(&read, &data, "the normal write read back");
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

/// Exact equality of two images, reporting the first difference rather than megabytes.
fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if actual == expected {
        return;
    }
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: byte {at} is {:#04x}, expected {:#04x}",
            actual[at], expected[at]
        );
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

    /// Bytes sent while the server may be closing the connection.
    async fn send_best_effort(&mut self, bytes: &[u8]) {
        let _ = within(self.stream.write_all(bytes)).await;
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

/// Writes `data` at `offset` of `image` (the model of what a volume should hold).
fn put(image: &mut [u8], offset: u64, data: &[u8]) {
    image[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_writes_fua_writes_flushes_and_reads_back_exactly() {
    let server = TestServer::start();
    let volume = server.exports.volume.clone();
    let mut client = server.client("volume", false).await;
    assert_eq!(client.size(), VOLUME_SIZE);
    assert!(!client.read_only());
    assert_eq!(
        client.transmission_flags(),
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_DF
    );

    // Unaligned, at the very end, and the largest payload a request may carry. The data is
    // the pattern of another place, so a write landing at the wrong offset shows.
    let mut expected = vec![FRESH_BYTE; VOLUME_SIZE as usize];
    let largest = u64::from(MAX_REQUEST_LENGTH);
    let writes = [
        (0, 4096),
        (12_345, 100_000),
        (VOLUME_SIZE - 512, 512),
        (VOLUME_SIZE - 512 - largest, largest),
    ];
    for (offset, length) in writes {
        let data = pattern(offset + 1, length);
        within(client.write(offset, &data, false))
            .await
            .unwrap_or_else(|e| panic!("write {length} at {offset}: {e}"));
        put(&mut expected, offset, &data);
    }
    assert_eq!(volume.flushes(), 0, "a write without FUA flushed");
    assert_same(
        &volume.contents(),
        &expected,
        "the volume after plain writes",
    );

    let (offset, data) = (3 * MIB + 1, pattern(99, 70_000));
    within(client.write(offset, &data, true))
        .await
        .unwrap_or_else(|e| panic!("FUA write: {e}"));
    put(&mut expected, offset, &data);
    assert_eq!(volume.flushes(), 1, "a FUA write did not flush");
    within(client.flush())
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    assert_eq!(volume.flushes(), 2, "a flush did not reach the volume");
    assert_same(&volume.contents(), &expected, "the volume after writing");

    for (offset, length) in writes.into_iter().chain([(offset, data.len() as u64)]) {
        let read = within(client.read(offset, length as u32))
            .await
            .unwrap_or_else(|e| panic!("read {length} at {offset}: {e}"));
        let start = offset as usize;
        assert_same(&read, &expected[start..start + read.len()], "read back");
    }
    assert!(matches!(
        client.write(VOLUME_SIZE - 100, &[0; 200], false).await,
        Err(NbdError::InvalidArgument(_))
    ));
    within(client.disconnect())
        .await
        .unwrap_or_else(|e| panic!("disconnect: {e}"));

    // What was written is what the next connection reads.
    let mut client = server.client("volume", false).await;
    let head = within(client.read(0, 200_000))
        .await
        .unwrap_or_else(|e| panic!("read: {e}"));
    assert_same(&head, &expected[..200_000], "read back on a new connection");
    assert_eq!(volume.flushes(), 2);
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_zeroes_fua_and_flush_on_the_wire() {
    let server = TestServer::start();
    let volume = server.exports.volume.clone();
    let mut expected = volume.contents();
    let mut raw = server.raw_transmitting("volume", true, &[]).await;

    // Over three 1 MiB pieces, unaligned at both ends; "no hole" accepted.
    let (zero_offset, zero_length) = (MIB - 7, 3 * MIB + 11);
    raw.request(
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
        1,
        zero_offset,
        zero_length as u32,
    )
    .await;
    assert_eq!(raw.simple_reply().await, (0, 1));
    put(&mut expected, zero_offset, &vec![0; zero_length as usize]);
    assert_eq!(volume.flushes(), 1, "FUA on write zeroes did not flush");
    assert_same(&volume.contents(), &expected, "after write zeroes");

    // Pipelined: a write, zeroes inside it, and a read of both, answered in order.
    let data = pattern(5, 8192);
    raw.request(CMD_WRITE, 0, 2, 6 * MIB, 8192).await;
    raw.send(&data).await;
    raw.request(CMD_WRITE_ZEROES, 0, 3, 6 * MIB + 100, 50).await;
    raw.request(CMD_READ, 0, 4, 6 * MIB, 8192).await;
    put(&mut expected, 6 * MIB, &data);
    put(&mut expected, 6 * MIB + 100, &[0; 50]);
    assert_eq!(raw.simple_reply().await, (0, 2));
    assert_eq!(raw.simple_reply().await, (0, 3));
    let (flags, kind, cookie, payload) = raw.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 4)
    );
    assert_eq!(&payload[..8], &(6 * MIB).to_be_bytes());
    let start = 6 * MIB as usize;
    assert_same(&payload[8..], &expected[start..start + 8192], "read back");
    assert_eq!(volume.flushes(), 1, "a write without FUA flushed");

    raw.request(CMD_WRITE, CMD_FLAG_FUA, 5, 7 * MIB, 3).await;
    raw.send(b"abc").await;
    assert_eq!(raw.simple_reply().await, (0, 5));
    put(&mut expected, 7 * MIB, b"abc");
    assert_eq!(volume.flushes(), 2);
    raw.request(CMD_FLUSH, 0, 6, 0, 0).await;
    assert_eq!(raw.simple_reply().await, (0, 6));
    assert_eq!(volume.flushes(), 3);
    assert_same(&volume.contents(), &expected, "after the wire writes");
    raw.request(CMD_DISC, 0, 7, 0, 0).await;
    raw.assert_closed_silently().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_and_flushes_are_eio_or_enospc_with_a_message() {
    let server = TestServer::start();
    let volume = server.exports.failing.clone();
    let mut client = server.client("volume-failing", false).await;
    let good = pattern(0, 4096);
    within(client.write(0, &good, false))
        .await
        .unwrap_or_else(|e| panic!("write to the good half: {e}"));

    let failed = within(client.write(SMALL_VOLUME_SIZE / 2, &[7; 4096], false)).await;
    let error = failed
        .err()
        .unwrap_or_else(|| panic!("a bad write succeeded"));
    assert_eq!(error.request_error(), Some(EIO));
    assert_eq!(
        error.to_string(),
        "NBD_CMD_WRITE failed: input/output error (EIO): cannot write 4096 bytes at offset 524288"
    );
    // The flush a FUA write ends with fails as the volume is full: the write is not durable.
    let failed = within(client.write(4096, &[8; 512], true)).await;
    let error = failed
        .err()
        .unwrap_or_else(|| panic!("a FUA write survived its flush"));
    assert_eq!(
        error.to_string(),
        "NBD_CMD_WRITE failed: no space left (ENOSPC): cannot write 512 bytes at offset 4096"
    );
    let failed = within(client.flush()).await;
    let error = failed
        .err()
        .unwrap_or_else(|| panic!("a failing flush succeeded"));
    assert_eq!(
        error.to_string(),
        "NBD_CMD_FLUSH failed: no space left (ENOSPC): cannot flush the export"
    );
    assert_eq!(volume.flushes(), 2);
    let read = within(client.read(0, 4096))
        .await
        .unwrap_or_else(|e| panic!("read after failures: {e}"));
    assert_same(&read, &good, "the good half");
    within(client.disconnect())
        .await
        .unwrap_or_else(|e| panic!("disconnect: {e}"));

    // Simple replies carry the value alone.
    let mut raw = server.raw_transmitting("volume-failing", false, &[]).await;
    raw.request(CMD_WRITE_ZEROES, 0, 1, SMALL_VOLUME_SIZE / 2, 4096)
        .await;
    assert_eq!(raw.simple_reply().await, (EIO, 1));
    raw.request(CMD_FLUSH, 0, 2, 0, 0).await;
    assert_eq!(raw.simple_reply().await, (ENOSPC, 2));
    let mut expected = vec![FRESH_BYTE; SMALL_VOLUME_SIZE as usize];
    put(&mut expected, 0, &good);
    put(&mut expected, 4096, &[8; 512]);
    assert_same(&volume.contents(), &expected, "the failing volume");
    server.assert_still_writes().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_restores_an_image_into_the_writable_export_exactly() {
    let server = TestServer::start();
    let volume = server.exports.volume.clone();
    // An image with zero runs (leading, short, longer than the zero piece, trailing) between
    // data: the volume starts non-zero, so the zeroes have to be written too.
    let mut image = pattern(0, VOLUME_SIZE);
    for (start, end) in [
        (0, MIB),
        (5 * MIB, 5 * MIB + 64 * 1024),
        (20 * MIB + 3, 33 * MIB),
        (VOLUME_SIZE - 4096, VOLUME_SIZE),
    ] {
        image[start as usize..end as usize].fill(0);
    }
    let source = server.dir.path().join("image.raw");
    std::fs::write(&source, &image).unwrap_or_else(|e| panic!("writing the image: {e}"));

    let converted = qemu_img_async(
        vec![
            "convert".into(),
            "-n".into(),
            "-f".into(),
            "raw".into(),
            source.display().to_string(),
            "-O".into(),
            "raw".into(),
            nbd_uri(&server.socket, "volume"),
        ],
        None,
    )
    .await;
    assert!(
        converted.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&converted.stderr)
    );
    assert_same(&volume.contents(), &image, "the restored volume");
    assert!(volume.flushes() >= 1, "qemu-img never flushed");

    // And qemu-img reads the restored volume back as the image.
    let copy = server.dir.path().join("copy.raw");
    let converted = qemu_img_async(
        vec![
            "convert".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            "raw".into(),
            nbd_uri(&server.socket, "volume"),
            copy.display().to_string(),
        ],
        None,
    )
    .await;
    assert!(
        converted.status.success(),
        "qemu-img convert back: {}",
        String::from_utf8_lossy(&converted.stderr)
    );
    let copied = std::fs::read(&copy).unwrap_or_else(|e| panic!("reading the copy: {e}"));
    assert_same(&copied, &image, "the volume copied back");
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
    for name in [
        "failing",
        "paired",
        "volume",
        "volume-locked",
        "volume-failing",
    ] {
        assert_eq!(
            raw.option_reply().await,
            (OPT_LIST, REP_SERVER, string32(name))
        );
    }
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
async fn bad_writes_to_a_writable_export_change_nothing() {
    let server = TestServer::start();
    let volume = server.exports.volume.clone();
    let before = volume.contents();
    let mut raw = server.raw_transmitting("volume", true, &[]).await;

    // Beyond the end: ENOSPC, as the protocol asks of writes; the payload is skipped.
    raw.request(CMD_WRITE, 0, 1, VOLUME_SIZE - 512, 1024).await;
    raw.send(&[0x11; 1024]).await;
    assert_eq!(
        raw.error_chunk(1).await,
        (
            ENOSPC,
            "1024 bytes at offset 41942528 reach beyond the end of the export (41943040 bytes)"
                .to_string()
        )
    );
    raw.request(CMD_WRITE, 0, 2, u64::MAX - 10, 512).await;
    raw.send(&[0x22; 512]).await;
    assert_eq!(raw.error_chunk(2).await.0, ENOSPC);
    raw.request(CMD_WRITE, 0, 3, 0, 0).await;
    assert_eq!(
        raw.error_chunk(3).await,
        (EINVAL, "empty request".to_string())
    );
    // "Don't fragment" is for reads.
    raw.request(CMD_WRITE, CMD_FLAG_DF, 4, 0, 512).await;
    raw.send(&[0x44; 512]).await;
    assert_eq!(
        raw.error_chunk(4).await,
        (
            EINVAL,
            "flags 0x4 are not valid for NBD_CMD_WRITE".to_string()
        )
    );
    raw.request(CMD_WRITE_ZEROES, 0, 5, VOLUME_SIZE - 512, 1024)
        .await;
    assert_eq!(raw.error_chunk(5).await.0, ENOSPC);
    // Fast zero was not offered.
    raw.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 6, 0, 4096)
        .await;
    assert_eq!(raw.error_chunk(6).await.0, EINVAL);
    raw.request(CMD_WRITE_ZEROES, 0, 7, 0, 0).await;
    assert_eq!(raw.error_chunk(7).await.0, EINVAL);
    // Trim was not offered either, and is not pretended.
    raw.request(CMD_TRIM, 0, 8, 0, 4096).await;
    assert_eq!(
        raw.error_chunk(8).await,
        (
            EINVAL,
            "NBD_CMD_TRIM is not supported by this export".to_string()
        )
    );
    // Still in step: the next request is read where it starts.
    raw.request(CMD_READ, 0, 9, 0, 512).await;
    let (_, kind, cookie, payload) = raw.chunk().await;
    assert_eq!((kind, cookie), (REPLY_TYPE_OFFSET_DATA, 9));
    assert_same(&payload[8..], &before[..512], "read after refusals");
    assert_eq!(volume.writes(), 0, "a refused write reached the volume");
    assert_same(&volume.contents(), &before, "the volume after refusals");

    // Simple replies: the same values.
    let mut raw = server.raw_transmitting("volume", false, &[]).await;
    raw.request(CMD_WRITE, 0, 1, VOLUME_SIZE, 512).await;
    raw.send(&[0x55; 512]).await;
    assert_eq!(raw.simple_reply().await, (ENOSPC, 1));
    raw.request(CMD_TRIM, 0, 2, 0, 4096).await;
    assert_eq!(raw.simple_reply().await, (EINVAL, 2));

    // A payload over the limit, inside the volume: neither buffered nor skipped.
    raw.request(CMD_WRITE, 0, 3, 0, MAX_REQUEST_LENGTH + 1)
        .await;
    raw.send_best_effort(&[0x66; 64 * 1024]).await;
    raw.assert_closed_silently().await;
    assert_eq!(volume.writes(), 0, "a refused write reached the volume");
    assert_same(&volume.contents(), &before, "the volume after the hang-up");
    server.assert_still_serves().await;
    server.assert_still_writes().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_exports_refuse_writes_even_if_the_volume_would_take_them() {
    let server = TestServer::start();
    let volume = server.exports.locked.clone();
    let before = volume.contents();
    let mut client = server.client("volume-locked", false).await;
    assert!(client.read_only());
    assert_eq!(
        client.transmission_flags(),
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_DF | FLAG_CAN_MULTI_CONN
    );
    assert!(matches!(
        client.write(0, b"x", false).await,
        Err(NbdError::InvalidArgument(_))
    ));
    within(client.flush())
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    within(client.disconnect())
        .await
        .unwrap_or_else(|e| panic!("disconnect: {e}"));

    // Sent anyway, by hand: EPERM for every kind of write.
    let mut raw = server.raw_transmitting("volume-locked", true, &[]).await;
    raw.request(CMD_WRITE, CMD_FLAG_FUA, 1, 0, 4096).await;
    raw.send(&[0x5a; 4096]).await;
    assert_eq!(
        raw.error_chunk(1).await,
        (EPERM, "the export is a read-only snapshot".to_string())
    );
    raw.request(CMD_WRITE_ZEROES, 0, 2, 0, 4096).await;
    assert_eq!(raw.error_chunk(2).await.0, EPERM);
    raw.request(CMD_TRIM, 0, 3, 0, 4096).await;
    assert_eq!(raw.error_chunk(3).await.0, EPERM);
    raw.request(CMD_FLUSH, 0, 4, 0, 0).await;
    assert_eq!(raw.simple_reply().await, (0, 4));
    raw.request(CMD_READ, 0, 5, 0, 4096).await;
    let (_, kind, cookie, payload) = raw.chunk().await;
    assert_eq!((kind, cookie), (REPLY_TYPE_OFFSET_DATA, 5));
    assert_same(&payload[8..], &before[..4096], "read after refusals");
    raw.request(CMD_WRITE, 0, 6, 0, MAX_REQUEST_LENGTH + 1)
        .await;
    raw.assert_closed_silently().await;

    assert_eq!(volume.writes(), 0, "a write reached a read-only export");
    assert_eq!(volume.flushes(), 0, "a read-only export was flushed");
    assert_same(&volume.contents(), &before, "the read-only volume");
    server.assert_still_serves().await;
    server.assert_still_writes().await;
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
        exports: _,
    } = server;
    let _ = shutdown.send(true);
    within(task)
        .await
        .unwrap_or_else(|e| panic!("server task: {e}"));
    haggling.assert_closed_silently().await;
    assert!(within(client.read(0, 512)).await.is_err());
    assert!(UnixStream::connect(&socket).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_reads_are_read_together_and_answered_in_order() {
    let server = TestServer::start();
    let mut raw = server.raw_transmitting("paired", true, &[]).await;
    // Two reads, then two more and a flush, each group sent before any reply is read: the
    // export only completes a read while another one is being read.
    raw.request(CMD_READ, 0, 1, 0, 4096).await;
    raw.request(CMD_READ, 0, 2, 3 * MIB, 65536).await;
    for (cookie, offset, length) in [(1, 0, 4096), (2, 3 * MIB, 65536)] {
        let (flags, kind, got, payload) = raw.chunk().await;
        assert_eq!(
            (flags, kind, got),
            (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie)
        );
        assert_eq!(&payload[..8], &offset.to_be_bytes());
        assert!(payload[8..] == pattern(offset, length)[..], "read {cookie}");
    }
    raw.request(CMD_READ, 0, 3, 100, 1000).await;
    raw.request(CMD_READ, 0, 4, 5 * MIB, 4096).await;
    raw.request(CMD_FLUSH, 0, 5, 0, 0).await;
    for cookie in [3, 4] {
        let (_, kind, got, _) = raw.chunk().await;
        assert_eq!((kind, got), (REPLY_TYPE_OFFSET_DATA, cookie));
    }
    assert_eq!(raw.simple_reply().await, (0, 5));
    server.assert_still_serves().await;
    server.stop().await;
}
