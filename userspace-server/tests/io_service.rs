//! The server I/O path (second data path) against a real `sand` process: a small frame client
//! attaches through an agent, presents the session token and reads/writes; the image files are
//! read directly to prove where every byte landed.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use common::{TestServer, MIB};
use sanblk_proto::client::AgentClient;
use sanblk_proto::map::{AccessMode, Layout, VolumeMap};
use sanblk_proto::protocol::{
    Attachment, ClientGrant, ClientRemove, ClientRevoke, DeviceInfo, PoolList, VolumeDelete,
    VolumeGrow,
};
use sanblk_uapi::frame::{
    Op, ReplyHeader, RequestHeader, FLAG_FUA, REPLY_HEADER_LEN, REQUEST_HEADER_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const EACCES: i32 = -13;
const EROFS: i32 = -30;
const EINVAL: i32 = -22;
const ESTALE: i32 = -116;

/// A minimal server-path client: what the kmod's TCP path does, in userspace.
struct IoClient {
    stream: TcpStream,
}

fn request(op: Op, handle: u64, map: &VolumeMap, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        op,
        flags: 0,
        handle,
        volume_id: map.volume_id,
        epoch: map.epoch,
        offset,
        length,
    }
}

/// Distinct, position-dependent bytes.
fn pattern(seed: u64, length: usize) -> Vec<u8> {
    (0..length)
        .map(|i| ((i as u64).wrapping_mul(31) ^ seed.wrapping_mul(0x9e37_79b9)) as u8)
        .collect()
}

impl IoClient {
    async fn connect(server: &TestServer) -> IoClient {
        let stream = TcpStream::connect(server.io_address())
            .await
            .unwrap_or_else(|e| panic!("io connect: {e}"));
        IoClient { stream }
    }

    /// Connects and says HELLO with the session token; panics unless accepted.
    async fn session(server: &TestServer, attached: &Attachment) -> IoClient {
        let mut client = IoClient::connect(server).await;
        assert_eq!(client.hello(&attached.session_token).await, 0);
        client
    }

    async fn hello(&mut self, token_hex: &str) -> i32 {
        let token = hex::decode(token_hex).unwrap_or_else(|e| panic!("token: {e}"));
        let header = RequestHeader::hello(0, 0, token.len() as u32);
        self.send(&header, &token).await;
        let (reply, _) = self
            .receive()
            .await
            .unwrap_or_else(|e| panic!("hello: {e}"));
        assert_eq!(reply.handle, 0);
        reply.status
    }

    async fn send(&mut self, header: &RequestHeader, payload: &[u8]) {
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        header.encode(&mut raw);
        self.send_raw(&raw).await;
        self.send_raw(payload).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
    }

    async fn receive(&mut self) -> std::io::Result<(ReplyHeader, Vec<u8>)> {
        let mut raw = [0u8; REPLY_HEADER_LEN];
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_exact(&mut raw))
            .await
            .map_err(|_| std::io::Error::other("reply timeout"))??;
        let header = ReplyHeader::decode(&raw)
            .map_err(|e| std::io::Error::other(format!("bad reply: {}", e.message())))?;
        let mut data = vec![0u8; header.length as usize];
        self.stream.read_exact(&mut data).await?;
        Ok((header, data))
    }

    /// One request, one reply.
    async fn call(&mut self, header: &RequestHeader, payload: &[u8]) -> (i32, Vec<u8>) {
        self.send(header, payload).await;
        let (reply, data) = self
            .receive()
            .await
            .unwrap_or_else(|e| panic!("reply to {header:?}: {e}"));
        assert_eq!(reply.handle, header.handle);
        (reply.status, data)
    }

    async fn write(&mut self, map: &VolumeMap, offset: u64, data: &[u8]) -> i32 {
        let header = request(Op::Write, offset, map, offset, data.len() as u32);
        self.call(&header, data).await.0
    }

    async fn read(&mut self, map: &VolumeMap, offset: u64, length: u32) -> (i32, Vec<u8>) {
        self.call(&request(Op::Read, offset + 1, map, offset, length), &[])
            .await
    }

    /// True once the server has closed the connection (EOF or reset within 5 s).
    async fn is_closed(&mut self) -> bool {
        let mut sink = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut sink)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// Device UUID -> image path.
async fn devices(server: &TestServer) -> HashMap<uuid::Uuid, PathBuf> {
    let mut admin = server.admin().await;
    let list: Vec<DeviceInfo> = admin
        .call(PoolList {})
        .await
        .unwrap_or_else(|e| panic!("pool list: {e}"));
    list.into_iter()
        .map(|d| (d.uuid, PathBuf::from(d.path)))
        .collect()
}

/// Reads `length` bytes of volume data at `offset` from every replica's image file directly,
/// following the map; returns one buffer per replica index (all replicas must exist).
fn read_images(
    devices: &HashMap<uuid::Uuid, PathBuf>,
    map: &VolumeMap,
    offset: u64,
    length: usize,
) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut at = offset;
    let end = offset + length as u64;
    while at < end {
        let extent = map
            .extent_at(at)
            .unwrap_or_else(|| panic!("no extent at {at}"));
        let (replicas, run) = extent
            .locate(at - extent.volume_offset)
            .unwrap_or_else(|| panic!("extent does not map {at}"));
        let piece_end = end.min(at + run);
        out.resize(replicas.len().max(out.len()), vec![0u8; length]);
        for (copy, replica) in replicas.iter().enumerate() {
            let path = &devices[&replica.device_uuid];
            let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{e}"));
            let from = (at - offset) as usize;
            let to = (piece_end - offset) as usize;
            file.read_exact_at(&mut out[copy][from..to], replica.device_offset)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        at = piece_end;
    }
    out
}

/// A volume of `layout`, a client granted `mode`, an agent attached; the agent must stay alive
/// for the session to last.
async fn attached(
    server: &TestServer,
    volume: &str,
    size: u64,
    layout: Layout,
    mode: AccessMode,
) -> (AgentClient, Attachment) {
    server.create_volume(volume, size, layout).await;
    let client = format!("host-{volume}");
    let secret = server.client(&client).await;
    server.grant(&client, volume, mode).await;
    let mut agent = server.agent(&client, &secret).await;
    let attachment = agent
        .attach(volume, mode)
        .await
        .unwrap_or_else(|e| panic!("attach: {e}"));
    (agent, attachment)
}

/// A client fenced by a change (it never acked the quiesce, its lease expired) loses its
/// server-path session: requests and a new HELLO with its token are refused.
#[tokio::test]
async fn a_fenced_attachment_loses_its_server_path_session() {
    let server = TestServer::start_with_args(&["--lease-ms", "1000"]);
    server.pool_of(1, 64 * MIB).await;
    let (_silent_agent, vol) =
        attached(&server, "vol", 4 * MIB, Layout::Linear, AccessMode::Rw).await;
    let mut io = IoClient::session(&server, &vol).await;
    assert_eq!(io.write(&vol.map, 0, &pattern(3, 4096)).await, 0);
    let mut admin = server.admin().await;
    let grown: VolumeMap = admin
        .call(VolumeGrow {
            name: "vol".into(),
            new_size_bytes: 8 * MIB,
        })
        .await
        .unwrap_or_else(|e| panic!("grow: {e}"));
    assert_eq!(grown.epoch, vol.map.epoch + 1);
    // Neither the old epoch nor the new one is served to the fenced session.
    assert_ne!(io.write(&grown, 0, &pattern(4, 4096)).await, 0);
    let mut again = IoClient::connect(&server).await;
    assert_eq!(again.hello(&vol.session_token).await, EACCES);
}

#[tokio::test]
async fn writes_land_where_the_map_says_and_read_back() {
    let server = TestServer::start();
    server.pool_of(3, 64 * MIB).await;
    let devices = devices(&server).await;

    // Linear.
    let (_agent, linear) = attached(&server, "lin", 8 * MIB, Layout::Linear, AccessMode::Rw).await;
    let mut io = IoClient::session(&server, &linear).await;
    let data = pattern(1, 64 * 1024);
    let offset = MIB + 4096;
    assert_eq!(io.write(&linear.map, offset, &data).await, 0);
    let (status, back) = io.read(&linear.map, offset, data.len() as u32).await;
    assert_eq!(status, 0);
    assert!(back == data, "read back differs");
    assert!(read_images(&devices, &linear.map, offset, data.len())[0] == data);
    // Sector-sized (not 4096-aligned) I/O takes the page-cache path and still lands right.
    let small = pattern(2, 1536);
    assert_eq!(io.write(&linear.map, 7 * MIB + 512, &small).await, 0);
    assert_eq!(
        io.read(&linear.map, 7 * MIB + 512, 1536).await,
        (0, small.clone())
    );
    assert!(read_images(&devices, &linear.map, 7 * MIB + 512, small.len())[0] == small);
    // FUA write and FLUSH succeed.
    let mut fua = request(Op::Write, 77, &linear.map, 0, 4096);
    fua.flags = FLAG_FUA;
    assert_eq!(io.call(&fua, &pattern(3, 4096)).await.0, 0);
    assert_eq!(
        io.call(&request(Op::Flush, 78, &linear.map, 0, 0), &[])
            .await
            .0,
        0
    );
    // Beyond the end of the volume.
    assert_eq!(io.write(&linear.map, 8 * MIB - 4096, &data).await, EINVAL);
    assert_eq!(io.read(&linear.map, 8 * MIB, 4096).await.0, EINVAL);

    // Mirrored: both replicas get the data.
    let (_agent2, mirror) = attached(&server, "mir", 4 * MIB, Layout::Mirror, AccessMode::Rw).await;
    assert!(mirror.map.extents.iter().all(|e| e.replicas.len() == 2));
    let mut io = IoClient::session(&server, &mirror).await;
    let data = pattern(4, 256 * 1024);
    assert_eq!(io.write(&mirror.map, 2 * MIB, &data).await, 0);
    let copies = read_images(&devices, &mirror.map, 2 * MIB, data.len());
    assert!(
        copies[0] == data && copies[1] == data,
        "mirror copies differ"
    );
    assert_eq!(
        io.read(&mirror.map, 2 * MIB, data.len() as u32).await,
        (0, data)
    );

    // Striped: a write spanning two 1 MiB chunks on different devices is split.
    let striped_layout = Layout::Striped {
        stripe_count: 2,
        stripe_unit_bytes: MIB,
    };
    let (_agent3, striped) =
        attached(&server, "str", 4 * MIB, striped_layout, AccessMode::Rw).await;
    let device_at = |at: u64| {
        let extent = striped.map.extent_at(at)?;
        let (replicas, _) = extent.locate(at - extent.volume_offset)?;
        replicas.first().map(|r| r.device_uuid)
    };
    assert_eq!(striped.map.extents.len(), 1, "one striped extent");
    assert_ne!(
        device_at(MIB - 1),
        device_at(MIB),
        "consecutive stripe chunks on distinct devices"
    );
    let mut io = IoClient::session(&server, &striped).await;
    let data = pattern(5, 128 * 1024);
    let offset = MIB - 64 * 1024;
    assert_eq!(io.write(&striped.map, offset, &data).await, 0);
    assert!(read_images(&devices, &striped.map, offset, data.len())[0] == data);
    assert_eq!(
        io.read(&striped.map, offset, data.len() as u32).await,
        (0, data)
    );
}

#[tokio::test]
async fn pipelined_requests_are_all_answered_by_handle() {
    let server = TestServer::start();
    server.pool_of(2, 64 * MIB).await;
    let striped_layout = Layout::Striped {
        stripe_count: 2,
        stripe_unit_bytes: MIB,
    };
    let (_agent, vol) = attached(&server, "pipe", 8 * MIB, striped_layout, AccessMode::Rw).await;
    let mut io = IoClient::session(&server, &vol).await;
    const COUNT: u64 = 64;
    let chunk = 64 * 1024u64;
    for handle in 0..COUNT {
        let header = request(
            Op::Write,
            1000 + handle,
            &vol.map,
            handle * chunk,
            chunk as u32,
        );
        io.send(&header, &pattern(handle, chunk as usize)).await;
    }
    let mut answered = std::collections::HashSet::new();
    for _ in 0..COUNT {
        let (reply, data) = io.receive().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reply.status, 0, "write {}", reply.handle);
        assert!(data.is_empty());
        assert!(
            answered.insert(reply.handle),
            "duplicate reply {}",
            reply.handle
        );
    }
    assert_eq!(answered, (1000..1000 + COUNT).collect());

    for handle in 0..COUNT {
        let header = request(
            Op::Read,
            5000 + handle,
            &vol.map,
            handle * chunk,
            chunk as u32,
        );
        io.send(&header, &[]).await;
    }
    let mut answered = std::collections::HashSet::new();
    for _ in 0..COUNT {
        let (reply, data) = io.receive().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reply.status, 0);
        let index = reply.handle - 5000;
        assert!(
            data == pattern(index, chunk as usize),
            "read {index} differs"
        );
        assert!(answered.insert(reply.handle));
    }
    assert_eq!(answered.len(), COUNT as usize);
}

#[tokio::test]
async fn bad_connections_are_closed_and_others_unaffected() {
    let server = TestServer::start();
    server.pool_of(1, 64 * MIB).await;
    let (_agent, vol) = attached(&server, "vol", 4 * MIB, Layout::Linear, AccessMode::Rw).await;
    let mut good = IoClient::session(&server, &vol).await;
    let data = pattern(9, 8192);
    assert_eq!(good.write(&vol.map, 0, &data).await, 0);

    // Wrong token: -EACCES, then closed.
    let mut bad = IoClient::connect(&server).await;
    assert_eq!(bad.hello(&hex::encode([0x55u8; 32])).await, EACCES);
    assert!(bad.is_closed().await);

    // No HELLO at all: closed after the handshake timeout (1 s in tests).
    let mut silent = IoClient::connect(&server).await;
    assert!(silent.is_closed().await);

    // READ before HELLO.
    let mut eager = IoClient::connect(&server).await;
    eager
        .send(&request(Op::Read, 1, &vol.map, 0, 4096), &[])
        .await;
    assert!(eager.is_closed().await);

    // Before HELLO nothing larger than a token is read: a WRITE or a HELLO announcing 1 MiB
    // is closed at its header (well before the 1 s handshake timeout), nothing reserved.
    for op in [Op::Write, Op::Hello] {
        let mut big = IoClient::connect(&server).await;
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        request(Op::Write, 1, &vol.map, 0, 4096).encode(&mut raw);
        raw[6] = op as u8;
        raw[40..44].copy_from_slice(&(1u32 << 20).to_le_bytes());
        let started = std::time::Instant::now();
        big.send_raw(&raw).await;
        assert!(big.is_closed().await, "{op:?}");
        assert!(started.elapsed() < Duration::from_millis(700), "{op:?}");
    }

    // Garbage instead of a header.
    let mut garbage = IoClient::connect(&server).await;
    garbage.send_raw(&[0xa5u8; 200]).await;
    assert!(garbage.is_closed().await);

    // After a good HELLO: bad magic, then an oversized length.
    let mut magic = IoClient::session(&server, &vol).await;
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    request(Op::Read, 2, &vol.map, 0, 4096).encode(&mut raw);
    raw[0] = b'X';
    magic.send_raw(&raw).await;
    assert!(magic.is_closed().await);

    let mut huge = IoClient::session(&server, &vol).await;
    request(Op::Write, 3, &vol.map, 0, 4096).encode(&mut raw);
    raw[40..44].copy_from_slice(&(64u32 << 20).to_le_bytes());
    huge.send_raw(&raw).await;
    assert!(huge.is_closed().await);

    // A header cut short and never completed: closed by the frame timeout.
    let mut stalled = IoClient::session(&server, &vol).await;
    stalled.send_raw(&raw[..20]).await;
    assert!(stalled.is_closed().await);

    // Still alive, and the first connection still works.
    assert_eq!(good.read(&vol.map, 0, 8192).await, (0, data));
    let mut fresh = IoClient::session(&server, &vol).await;
    assert_eq!(fresh.read(&vol.map, 4096, 4096).await.0, 0);
}

#[tokio::test]
async fn stale_epoch_is_refused_and_changes_nothing() {
    let server = TestServer::start();
    server.pool_of(2, 64 * MIB).await;
    let devices = devices(&server).await;
    let (mut agent, vol) = attached(&server, "vol", 4 * MIB, Layout::Linear, AccessMode::Rw).await;
    let mut io = IoClient::session(&server, &vol).await;
    let original = pattern(11, 4096);
    assert_eq!(io.write(&vol.map, MIB, &original).await, 0);

    let mut admin = server.admin().await;
    // The agent answers the change (else it is fenced once its lease expires).
    let (grown, _) = tokio::join!(
        admin.call(VolumeGrow {
            name: "vol".into(),
            new_size_bytes: 8 * MIB,
        }),
        common::follow_change(&mut agent, vol.map.epoch)
    );
    let grown: VolumeMap = grown.unwrap_or_else(|e| panic!("grow: {e}"));
    assert_eq!(grown.epoch, vol.map.epoch + 1);

    // Old epoch: -ESTALE for write, read and flush, and the image is untouched.
    assert_eq!(io.write(&vol.map, MIB, &pattern(12, 4096)).await, ESTALE);
    assert_eq!(io.read(&vol.map, MIB, 4096).await.0, ESTALE);
    assert_eq!(
        io.call(&request(Op::Flush, 5, &vol.map, 0, 0), &[]).await.0,
        ESTALE
    );
    assert!(read_images(&devices, &vol.map, MIB, 4096)[0] == original);

    // New epoch: works, including the grown part.
    assert_eq!(io.read(&grown, MIB, 4096).await, (0, original));
    let tail = pattern(13, 8192);
    assert_eq!(io.write(&grown, 6 * MIB, &tail).await, 0);
    assert!(read_images(&devices, &grown, 6 * MIB, tail.len())[0] == tail);
}

#[tokio::test]
async fn read_only_sessions_cannot_write_and_sessions_end_with_the_attachment() {
    let server = TestServer::start();
    server.pool_of(1, 64 * MIB).await;
    let (_agent, ro) = attached(&server, "ro", 4 * MIB, Layout::Linear, AccessMode::Ro).await;
    let mut io = IoClient::session(&server, &ro).await;
    assert_eq!(io.write(&ro.map, 0, &pattern(1, 4096)).await, EROFS);
    assert_eq!(io.read(&ro.map, 0, 4096).await, (0, vec![0u8; 4096]));
    assert_eq!(
        io.call(&request(Op::Flush, 9, &ro.map, 0, 0), &[]).await.0,
        0
    );
    // Another volume's id with this session.
    let mut other = ro.map.clone();
    other.volume_id += 1000;
    assert_eq!(io.read(&other, 0, 4096).await.0, EACCES);

    // Once the attachment is gone, the token is dead: -EACCES and the connection closes.
    let (mut agent, rw) = attached(&server, "rw", 4 * MIB, Layout::Linear, AccessMode::Rw).await;
    let mut io = IoClient::session(&server, &rw).await;
    assert_eq!(io.write(&rw.map, 0, &pattern(2, 4096)).await, 0);
    agent
        .detach(rw.map.volume_id)
        .await
        .unwrap_or_else(|e| panic!("detach: {e}"));
    assert_eq!(io.read(&rw.map, 0, 4096).await.0, EACCES);
    assert!(io.is_closed().await);
    let mut again = IoClient::connect(&server).await;
    assert_eq!(again.hello(&rw.session_token).await, EACCES);
}

#[tokio::test]
async fn shutdown_closes_io_connections_cleanly() {
    let mut server = TestServer::start();
    server.pool_of(1, 64 * MIB).await;
    let (_agent, vol) = attached(&server, "vol", 4 * MIB, Layout::Linear, AccessMode::Rw).await;
    let mut io = IoClient::session(&server, &vol).await;
    assert_eq!(io.write(&vol.map, 0, &pattern(1, 4096)).await, 0);
    let _idle = IoClient::connect(&server).await;
    assert!(
        server.stop(),
        "sand did not exit cleanly; log:\n{}",
        server.log()
    );
    assert!(io.is_closed().await);
}

#[tokio::test]
async fn mirrored_reads_fall_back_to_the_other_replica() {
    let server = TestServer::start();
    server.pool_of(2, 64 * MIB).await;
    let devices = devices(&server).await;
    let (_agent, vol) = attached(&server, "mir", 4 * MIB, Layout::Mirror, AccessMode::Rw).await;
    let mut io = IoClient::session(&server, &vol).await;
    let data = pattern(21, 64 * 1024);
    assert_eq!(io.write(&vol.map, 2 * MIB, &data).await, 0);
    // Cut the first replica's image short: reading it now fails (end of file).
    let first = vol
        .map
        .extent_at(2 * MIB)
        .map(|e| e.replicas[0].device_uuid)
        .unwrap_or_else(|| panic!("no extent"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&devices[&first])
        .and_then(|f| f.set_len(4096))
        .unwrap_or_else(|e| panic!("truncate: {e}"));
    assert_eq!(
        io.read(&vol.map, 2 * MIB, data.len() as u32).await,
        (0, data)
    );
    let log = server.log();
    assert!(log.contains(&format!("device {first} (")), "{log}");
}

/// The session token is persisted with the attachment: after `sand` is killed and restarted,
/// the client's kernel (which keeps its token) is accepted again even before its agent is
/// back, and the agent's re-attach hands out the same token. An agent that disconnects from a
/// running server suspends its token until it attaches again (same token). After a detach the
/// token is dead, also across another restart; another client's attach gets another token.
#[tokio::test]
async fn session_tokens_survive_a_restart_and_die_with_the_detach() {
    let mut server = TestServer::start();
    server.pool_of(1, 64 * MIB).await;
    server.create_volume("keep", 4 * MIB, Layout::Linear).await;
    let secret = server.client("host1").await;
    server.grant("host1", "keep", AccessMode::Rw).await;
    let other_secret = server.client("host2").await;
    server.grant("host2", "keep", AccessMode::Ro).await;
    let mut agent = server.agent("host1", &secret).await;
    let rw = agent
        .attach("keep", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("attach: {e}"));
    // host1 attaches "keep" again (new connection): the token of `first` again.
    async fn reattach(server: &TestServer, secret: &[u8], first: &Attachment) -> AgentClient {
        let mut agent = server.agent("host1", secret).await;
        let again = agent
            .attach("keep", AccessMode::Rw)
            .await
            .unwrap_or_else(|e| panic!("re-attach: {e}"));
        assert_eq!(again.session_token, first.session_token);
        agent
    }
    let data = pattern(21, 4096);
    let mut io = IoClient::session(&server, &rw).await;
    assert_eq!(io.write(&rw.map, 0, &data).await, 0);

    server.kill9();
    drop((agent, io));
    let mut restarted = TestServer::start_in(&server.dir);
    // The kernel reconnects before the agent: same token, same volume, still read-write.
    let mut io = IoClient::session(&restarted, &rw).await;
    assert_eq!(io.read(&rw.map, 0, 4096).await, (0, data.clone()));
    assert_eq!(io.write(&rw.map, 4096, &data).await, 0);
    // The agent re-attaches: the same token again.
    let agent = reattach(&restarted, &secret, &rw).await;
    // The agent goes away while the server runs: the token is not accepted on its own any
    // more (as before tokens were persisted), and comes back with the next attach.
    drop(agent);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut probe = IoClient::connect(&restarted).await;
        if probe.hello(&rw.session_token).await == EACCES {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "token still accepted without its agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut agent = reattach(&restarted, &secret, &rw).await;
    let mut io = IoClient::session(&restarted, &rw).await;
    // Another client, another token.
    let mut other = restarted.agent("host2", &other_secret).await;
    let ro = other
        .attach("keep", AccessMode::Ro)
        .await
        .unwrap_or_else(|e| panic!("attach host2: {e}"));
    assert_ne!(ro.session_token, rw.session_token);

    // Detached: refused at once, and after another restart.
    agent
        .detach(rw.map.volume_id)
        .await
        .unwrap_or_else(|e| panic!("detach: {e}"));
    assert_eq!(io.read(&rw.map, 0, 4096).await.0, EACCES);
    let mut refused = IoClient::connect(&restarted).await;
    assert_eq!(refused.hello(&rw.session_token).await, EACCES);
    restarted.kill9();
    drop((agent, other));
    let third = TestServer::start_in(&server.dir);
    let mut refused = IoClient::connect(&third).await;
    assert_eq!(refused.hello(&rw.session_token).await, EACCES);
    // host2 did not detach: its token still works.
    let mut io = IoClient::session(&third, &ro).await;
    assert_eq!(io.read(&ro.map, 0, 4096).await, (0, data));
}

/// Where sand stops when started with `SAND_CRASH_AT` (debug builds only: the crash points
/// and the tests using them exist only there).
#[cfg(debug_assertions)]
const CRASH_AT_ENV: &str = "SAND_CRASH_AT";

/// Waits until the server process has ended (it was told to crash).
#[cfg(debug_assertions)]
fn wait_for_exit(server: &mut TestServer) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.is_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "sand did not reach its crash point; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(debug_assertions)]
/// A revocation (`change`) that crashes sand between its metadata commit and its
/// secrets/sessions commit: after the restart the old token is refused on the I/O port, and
/// the agent port does not let the client attach (`secret_refused`: not even authenticate).
async fn revocation_survives_a_crash_between_commits(
    crash_at: &str,
    change: impl AsyncFnOnce(&TestServer),
    secret_refused: bool,
) {
    let mut first = TestServer::start();
    first.pool_of(1, 64 * MIB).await;
    first.create_volume("vol", 4 * MIB, Layout::Linear).await;
    let secret = first.client("host1").await;
    first.grant("host1", "vol", AccessMode::Rw).await;
    let mut agent = first.agent("host1", &secret).await;
    let rw = agent
        .attach("vol", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("attach: {e}"));
    let data = pattern(7, 4096);
    let mut io = IoClient::session(&first, &rw).await;
    assert_eq!(io.write(&rw.map, 0, &data).await, 0);

    // Stopped while the agent is connected: its token stays valid for the restart.
    assert!(first.stop(), "sand did not stop cleanly");
    drop((agent, io));
    // The same server, told to crash between the two commits of the change.
    let mut server = TestServer::start_in_with_env(&first.dir, &[(CRASH_AT_ENV, crash_at)]);
    let mut io = IoClient::session(&server, &rw).await;
    assert_eq!(io.read(&rw.map, 0, 4096).await, (0, data.clone()));
    change(&server).await;
    wait_for_exit(&mut server);
    drop(io);
    let restarted = TestServer::start_in(&server.dir);
    let mut io = IoClient::connect(&restarted).await;
    let hello = io.hello(&rw.session_token).await;
    if hello == 0 {
        // Accepted: at least it must not write.
        let written = io.write(&rw.map, 0, &pattern(8, 4096)).await;
        panic!("old token accepted after {crash_at} and a restart (write status {written})");
    }
    assert_eq!(hello, EACCES, "after {crash_at}");
    match AgentClient::connect(restarted.agent_address, "host1", &secret).await {
        Ok(mut agent) => {
            assert!(!secret_refused, "old secret authenticates after {crash_at}");
            let attached = agent.attach("vol", AccessMode::Rw).await;
            assert!(attached.is_err(), "rw attach allowed after {crash_at}");
        }
        Err(error) => assert!(secret_refused, "host1 refused after {crash_at}: {error}"),
    }
}

#[cfg(debug_assertions)]
#[tokio::test]
async fn a_client_removal_interrupted_by_a_crash_still_ends_its_token_and_secret() {
    revocation_survives_a_crash_between_commits(
        "client-remove:after-metadata",
        async |server| {
            let mut admin = server.admin().await;
            let _ = admin
                .call(ClientRemove {
                    name: "host1".into(),
                })
                .await;
        },
        true,
    )
    .await;
}

#[cfg(debug_assertions)]
#[tokio::test]
async fn a_revocation_interrupted_by_a_crash_still_ends_the_token() {
    revocation_survives_a_crash_between_commits(
        "grant:after-metadata",
        async |server| {
            let mut admin = server.admin().await;
            let _ = admin
                .call(ClientRevoke {
                    name: "host1".into(),
                    volume: "vol".into(),
                })
                .await;
        },
        false,
    )
    .await;
}

#[cfg(debug_assertions)]
#[tokio::test]
async fn a_downgrade_interrupted_by_a_crash_still_ends_the_rw_token() {
    revocation_survives_a_crash_between_commits(
        "grant:after-metadata",
        async |server| {
            let mut admin = server.admin().await;
            let _ = admin
                .call(ClientGrant {
                    name: "host1".into(),
                    volume: "vol".into(),
                    mode: AccessMode::Ro,
                })
                .await;
        },
        false,
    )
    .await;
}

/// After a restart, before the agent is back, its kernel's persisted token still works, so the
/// volume is still attached: `volume delete` is refused and names the client; `--force` ends
/// the token first (refused from then on, also on a connection opened before), then deletes.
#[tokio::test]
async fn a_volume_attached_by_a_persisted_token_is_deleted_only_with_force() {
    async fn delete(
        admin: &mut sanblk_proto::client::AdminClient,
        force: bool,
    ) -> Result<sanblk_proto::protocol::VolumeDeleted, sanblk_proto::client::ClientError> {
        let name = "held".into();
        admin.call(VolumeDelete { name, force }).await
    }
    let mut server = TestServer::start();
    server.pool_of(1, 64 * MIB).await;
    let (agent, rw) = attached(&server, "held", 4 * MIB, Layout::Linear, AccessMode::Rw).await;
    let mut admin = server.admin().await;
    let live = delete(&mut admin, false).await;
    let message = live.map(|_| ()).map_err(|e| e.to_string());
    assert!(
        message.as_ref().is_err_and(|m| m.contains("host-held")),
        "delete of a live attachment: {message:?}"
    );
    server.kill9();
    drop(agent);
    let restarted = TestServer::start_in(&server.dir);
    let mut io = IoClient::session(&restarted, &rw).await;
    let mut admin = restarted.admin().await;
    let refused = delete(&mut admin, false).await;
    assert_eq!(
        refused.as_ref().err().and_then(|e| e.server_code()),
        Some(sanblk_proto::protocol::ErrorCode::Busy),
        "delete while a persisted token is valid: {refused:?}"
    );
    let message = refused.map(|_| ()).map_err(|e| e.to_string());
    assert!(
        message.as_ref().is_err_and(|m| m.contains("host-held")),
        "the refusal names the client: {message:?}"
    );
    assert_eq!(io.read(&rw.map, 0, 4096).await.0, 0, "refused delete kept");
    delete(&mut admin, true)
        .await
        .unwrap_or_else(|e| panic!("delete --force: {e}"));
    assert_eq!(io.read(&rw.map, 0, 4096).await.0, EACCES);
    let mut refused = IoClient::connect(&restarted).await;
    assert_eq!(refused.hello(&rw.session_token).await, EACCES);
    // The space is reused by the next volume; the old token must not reach it.
    restarted
        .create_volume("next", 4 * MIB, Layout::Linear)
        .await;
    let mut refused = IoClient::connect(&restarted).await;
    assert_eq!(refused.hello(&rw.session_token).await, EACCES);
}

/// One session pipelining far more reads than the buffer budget holds and never taking its
/// replies (5 connections x 64 reads of 1 MiB, 320 MiB against 256 MiB) must not delay
/// another client's 4 KiB read: each session waits on its own share of the budget.
#[tokio::test]
async fn a_session_hogging_the_buffer_budget_does_not_delay_another() {
    // Replies not taken keep their buffers for up to the frame timeout: make it long.
    let server = TestServer::start_with_args(&["--frame-timeout-ms", "30000"]);
    server.pool_of(2, 256 * MIB).await;
    let (_hog_agent, hog) =
        attached(&server, "hog", 64 * MIB, Layout::Linear, AccessMode::Ro).await;
    let (_agent, victim) =
        attached(&server, "victim", 4 * MIB, Layout::Linear, AccessMode::Rw).await;
    let mut hogs = Vec::new();
    for connection in 0..5u64 {
        let mut io = IoClient::session(&server, &hog).await;
        for index in 0..64u64 {
            let handle = connection * 1000 + index;
            let offset = (index % 64) * MIB;
            io.send(
                &request(Op::Read, handle, &hog.map, offset, MIB as u32),
                &[],
            )
            .await;
        }
        hogs.push(io);
    }
    // Let the hog's reads take what they can of the budget.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut io = IoClient::session(&server, &victim).await;
    let started = std::time::Instant::now();
    let (status, data) =
        tokio::time::timeout(Duration::from_secs(5), io.read(&victim.map, 0, 4096))
            .await
            .unwrap_or_else(|_| panic!("a 4 KiB read waited over 5 s behind another session"));
    assert_eq!(status, 0);
    assert_eq!(data.len(), 4096);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "4 KiB read took {took:?}");
    drop(hogs);
}

/// Milliseconds each device operation holds the simulated one-slot disk in the test below.
const SLOW_DISK_MS: &str = "20";

/// One session floods the I/O port (5 connections of 64 pipelined 4 KiB reads) on a disk that
/// serves one operation at a time for 20 ms (debug-only `SAND_DEVICE_DELAY_MS`): another
/// session's 4 KiB read waits behind at most the flooding session's device-operation slots
/// (`--max-device-ops-per-session`, 4), not behind its 320 queued reads (6.4 s), and every
/// read of the flood is still answered. `extra_args` lets the same run show the queueing
/// without the limit.
async fn flood_then_time_another_session(extra_args: &[&str]) -> Duration {
    let server =
        TestServer::start_with_args_and_env(extra_args, &[("SAND_DEVICE_DELAY_MS", SLOW_DISK_MS)]);
    server.pool_of(2, 64 * MIB).await;
    let (_hog_agent, hog) =
        attached(&server, "flood", 4 * MIB, Layout::Linear, AccessMode::Ro).await;
    let (_agent, victim) =
        attached(&server, "quiet", 4 * MIB, Layout::Linear, AccessMode::Rw).await;
    let mut flood = Vec::new();
    for connection in 0..5u64 {
        let mut io = IoClient::session(&server, &hog).await;
        for index in 0..64u64 {
            let handle = connection * 1000 + index;
            io.send(
                &request(Op::Read, handle, &hog.map, index * 4096, 4096),
                &[],
            )
            .await;
        }
        flood.push(io);
    }
    // The flood's reads are queued at the disk by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut io = IoClient::session(&server, &victim).await;
    let started = std::time::Instant::now();
    let (status, data) =
        tokio::time::timeout(Duration::from_secs(30), io.read(&victim.map, 0, 4096))
            .await
            .unwrap_or_else(|_| panic!("a 4 KiB read waited over 30 s behind another session"));
    let took = started.elapsed();
    assert_eq!(status, 0);
    assert_eq!(data.len(), 4096);
    for mut io in flood {
        for _ in 0..64 {
            let (reply, data) = io
                .receive()
                .await
                .unwrap_or_else(|e| panic!("flood reply: {e}"));
            assert_eq!(reply.status, 0);
            assert_eq!(data.len(), 4096);
        }
    }
    took
}

#[tokio::test]
async fn a_session_flooding_device_io_does_not_queue_another_behind_it() {
    let took = flood_then_time_another_session(&[]).await;
    // At most 4 of the flood's operations (80 ms) are ahead of it at the disk.
    assert!(
        took < Duration::from_millis(1000),
        "a 4 KiB read waited {took:?} behind another session's flood"
    );
    // Without the per-session limit the same read queues behind the whole flood: the
    // measurement above can fail.
    let unlimited =
        flood_then_time_another_session(&["--max-device-ops-per-session", "1000"]).await;
    assert!(
        unlimited > Duration::from_secs(2),
        "without the limit the read took only {unlimited:?}; the test shows nothing"
    );
}
