//! kill -9 in the middle of allocations, and malformed frames, against a real `sand` process.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{TestServer, MIB};
use sanblk_proto::map::{AccessMode, Layout, VolumeMap, DEFAULT_STRIPE_UNIT_BYTES};
use sanblk_proto::protocol::{
    write_frame, AgentReply, AgentRequest, Attach, AuthResponse, Challenge, DeviceInfo, ErrorCode,
    FrameReader, Hello, PoolList, VolumeCreate, VolumeDetail, VolumeGrow, VolumeList, VolumeShow,
    VolumeSummary, MAX_PRE_AUTH_FRAME_BYTES, PROTOCOL_VERSION,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use uuid::Uuid;

#[tokio::test]
async fn kill_9_mid_allocation_leaves_no_double_or_lost_space() {
    let mut server = TestServer::start();
    server.pool_of(3, 256 * MIB).await;
    let socket = server.admin_socket.clone();
    // Allocate in a loop until the connection breaks; remember what the server confirmed.
    let worker = tokio::spawn(async move {
        let mut confirmed: BTreeMap<String, VolumeMap> = BTreeMap::new();
        let Ok(mut admin) = sanblk_proto::client::AdminClient::connect(&socket).await else {
            return confirmed;
        };
        let layouts = [
            Layout::Linear,
            Layout::Mirror,
            Layout::Striped {
                stripe_count: 3,
                stripe_unit_bytes: DEFAULT_STRIPE_UNIT_BYTES,
            },
        ];
        for index in 0u64.. {
            let name = format!("v{index}");
            let layout = layouts[(index % 3) as usize];
            let answer = if index % 4 == 3 {
                // Grow an earlier volume instead of creating one.
                let target = format!("v{}", index - 3);
                let current = confirmed.get(&target).map_or(0, |m| m.size_bytes);
                admin
                    .call(VolumeGrow {
                        name: target,
                        new_size_bytes: current + MIB,
                    })
                    .await
            } else {
                admin
                    .call(VolumeCreate {
                        name: name.clone(),
                        size_bytes: (1 + index % 3) * MIB,
                        layout,
                    })
                    .await
            };
            match answer {
                Ok(map) => {
                    confirmed.insert(map.name.clone(), map);
                }
                Err(error) if error.server_code().is_some() => {} // e.g. pool full: keep going
                Err(_) => break,                                  // server gone
            }
        }
        confirmed
    });
    // Let the loop run, then kill the server while it allocates.
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.kill9();
    let confirmed = worker.await.unwrap_or_else(|e| panic!("worker: {e}"));
    eprintln!("{} allocations confirmed before the kill", confirmed.len());
    assert!(
        confirmed.len() >= 3,
        "only {} allocations in {:?}; too slow to test",
        confirmed.len(),
        started.elapsed()
    );

    let restarted = TestServer::start_in(&server.dir);
    let mut admin = restarted.admin().await;
    let devices: Vec<DeviceInfo> = admin
        .call(PoolList {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let volumes: Vec<VolumeSummary> = admin
        .call(VolumeList {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut maps = Vec::new();
    for volume in &volumes {
        let detail: VolumeDetail = admin
            .call(VolumeShow {
                name: volume.name.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        maps.push(detail.map);
    }
    // Durability: every confirmed allocation is there, at least as large as confirmed (a grow
    // in flight at the kill may have committed after all).
    for (name, map) in &confirmed {
        let now = maps
            .iter()
            .find(|m| &m.name == name)
            .unwrap_or_else(|| panic!("confirmed volume {name} lost"));
        assert!(
            now.epoch >= map.epoch && now.size_bytes >= map.size_bytes,
            "{name} went back in time"
        );
        assert_eq!(
            now.extents[..map.extents.len() - 1],
            map.extents[..map.extents.len() - 1]
        );
    }
    // At most the one allocation in flight may have committed without confirmation.
    assert!(
        maps.len() <= confirmed.len() + 1,
        "{} volumes, {} confirmed",
        maps.len(),
        confirmed.len()
    );
    // Consistency, checked independently of the server: every volume fully backed, no two
    // replicas overlap, and free + used == capacity on every device.
    let mut used: BTreeMap<Uuid, Vec<(u64, u64)>> = BTreeMap::new();
    for map in &maps {
        assert_eq!(
            map.extents.iter().map(|e| e.length).sum::<u64>(),
            map.size_bytes,
            "{} not fully backed",
            map.name
        );
        for extent in &map.extents {
            for replica in &extent.replicas {
                used.entry(replica.device_uuid)
                    .or_default()
                    .push((replica.device_offset, extent.member_span()));
            }
        }
    }
    for device in &devices {
        let mut ranges = used.remove(&device.uuid).unwrap_or_default();
        ranges.sort_unstable();
        for pair in ranges.windows(2) {
            assert!(
                pair[0].0 + pair[0].1 <= pair[1].0,
                "overlap on {}: {:?}",
                device.uuid,
                pair
            );
        }
        let used_bytes: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(
            device.free_bytes + used_bytes,
            device.capacity_bytes,
            "space lost on {}",
            device.uuid
        );
    }
    assert!(used.is_empty(), "extents on unknown devices: {used:?}");
    // And the server keeps allocating after the crash.
    admin
        .call(VolumeCreate {
            name: "after".into(),
            size_bytes: MIB,
            layout: Layout::Linear,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Sends raw bytes on a fresh connection and returns the server's answer (if any) and whether
/// the server then closed the connection.
async fn send_raw(
    server: &TestServer,
    bytes: &[u8],
    wait_for_close: Duration,
) -> (Option<AgentReply>, bool) {
    let stream = TcpStream::connect(server.agent_address)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (read_half, mut write_half) = stream.into_split();
    let _ = write_half.write_all(bytes).await;
    let mut reader = FrameReader::new(read_half);
    let first = tokio::time::timeout(wait_for_close, reader.read::<AgentReply>()).await;
    let reply = match first {
        Ok(Ok(reply)) => Some(reply),
        Ok(Err(_)) => return (None, true),
        Err(_) => return (None, false),
    };
    let closed = matches!(
        tokio::time::timeout(wait_for_close, reader.read::<AgentReply>()).await,
        Ok(Err(_))
    );
    (reply, closed)
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

/// A server with one 1 MiB volume "vol" that client "host1" may attach read-write.
async fn server_with_rw_client() -> (TestServer, Vec<u8>) {
    let server = TestServer::start();
    server.pool_of(1, 64 * MIB).await;
    let secret = server
        .volume_with_client("vol", MIB, "host1", AccessMode::Rw)
        .await;
    (server, secret)
}

/// A new agent still authenticates and sees the volume.
async fn assert_new_agents_are_served(server: &TestServer, secret: &[u8]) {
    let mut fresh = server.agent("host1", secret).await;
    assert_eq!(
        fresh
            .list_volumes()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .len(),
        1
    );
}

#[tokio::test]
async fn bad_frames_close_only_their_connection() {
    let (server, secret) = server_with_rw_client().await;
    // A good client, attached before and used after the abuse.
    let mut good = server.agent("host1", &secret).await;
    let volume_id = good
        .attach("vol", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .map
        .volume_id;

    let oversized = (64u32 * 1024 * 1024).to_be_bytes().to_vec();
    let unknown_type = format!(r#"{{"v":{PROTOCOL_VERSION},"type":"format_disk"}}"#);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("oversized length prefix", oversized),
        ("invalid JSON", frame(b"{\"v\":1, \"type\": hello")),
        (
            "wrong version",
            frame(br#"{"v":99,"type":"hello","client":"x","client_nonce":"00"}"#),
        ),
        (
            "missing version",
            frame(br#"{"type":"hello","client":"x","client_nonce":"00"}"#),
        ),
        ("unknown type", frame(unknown_type.as_bytes())),
        ("garbage", b"\x00\x00\x00\x05\xff\xfe\xfd\xfc\xfb".to_vec()),
    ];
    for (name, bytes) in cases {
        let (reply, closed) = send_raw(&server, &bytes, Duration::from_secs(3)).await;
        match reply {
            Some(AgentReply::Error(body)) => assert!(
                matches!(body.code, ErrorCode::BadFrame | ErrorCode::BadRequest),
                "{name}: unexpected error code {:?}",
                body.code
            ),
            other => panic!("{name}: expected an error frame, got {other:?}"),
        }
        assert!(closed, "{name}: connection left open");
    }
    // Slowloris: half a frame, then silence; the handshake timeout (1 s in tests) closes it.
    let started = Instant::now();
    let (_, closed) = send_raw(&server, &[0, 0, 0, 100, b'{'], Duration::from_secs(4)).await;
    assert!(closed, "slowloris connection never closed");
    assert!(started.elapsed() < Duration::from_secs(4));

    // Garbage after authentication closes that connection too.
    let (mut reader, mut write_half) = authenticated_raw(&server, &secret).await;
    write_half
        .write_all(&frame(b"\x01garbage"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(reader.read().await, Ok(AgentReply::Error(_))),
        "no error frame after garbage"
    );
    assert!(
        reader.read::<AgentReply>().await.is_err(),
        "authenticated connection left open after garbage"
    );
    // Slowloris after authentication: a started frame must finish within the frame timeout.
    let (mut reader, mut write_half) = authenticated_raw(&server, &secret).await;
    write_half
        .write_all(&[0, 0, 0, 50, b'{'])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(4), reader.read::<AgentReply>()).await;
    assert!(
        matches!(&answer, Ok(Ok(AgentReply::Error(body))) if body.code == ErrorCode::BadFrame),
        "authenticated slowloris not timed out: {answer:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        reader.read::<AgentReply>().await.is_err(),
        "slowloris connection left open"
    );

    // The good client is still served, and the server is still up for new clients.
    assert_eq!(
        good.renew(volume_id, 1)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        6_000
    );
    assert_new_agents_are_served(&server, &secret).await;
    let mut admin = server.admin().await;
    admin
        .call(PoolList {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Before authentication only handshake-sized frames are accepted: a length prefix above the
/// pre-auth cap is refused at once with an error naming the cap (not after the handshake
/// timeout, and without reserving the announced size), the server stays up, and the full
/// maximum applies once authenticated.
#[tokio::test]
async fn large_frames_before_authentication_are_refused_at_once() {
    let (server, secret) = server_with_rw_client().await;
    for announced in [64 * 1024u32, 1024 * 1024] {
        let mut bytes = announced.to_be_bytes().to_vec();
        bytes.extend_from_slice(
            format!(r#"{{"v":{PROTOCOL_VERSION},"type":"hello","client":""#).as_bytes(),
        );
        let started = Instant::now();
        let (reply, closed) = send_raw(&server, &bytes, Duration::from_millis(700)).await;
        match reply {
            Some(AgentReply::Error(body)) => {
                assert_eq!(body.code, ErrorCode::BadFrame);
                assert!(
                    body.message.contains(&format!(
                        "frame of {announced} bytes exceeds the limit of {MAX_PRE_AUTH_FRAME_BYTES} bytes before authentication"
                    )),
                    "{}",
                    body.message
                );
            }
            other => panic!("{announced}-byte pre-auth frame: expected an error, got {other:?}"),
        }
        assert!(closed, "connection left open");
        assert!(started.elapsed() < Duration::from_millis(700));
    }
    // Authenticated, a frame above the pre-auth cap is fine (a long volume name is simply
    // not found).
    let (mut reader, mut write_half) = authenticated_raw(&server, &secret).await;
    let request = AgentRequest::from(Attach {
        volume: "v".repeat(2 * MAX_PRE_AUTH_FRAME_BYTES),
        mode: AccessMode::Ro,
    });
    write_frame(&mut write_half, &request)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    match reader.read::<AgentReply>().await {
        Ok(AgentReply::Error(body)) => assert_ne!(body.code, ErrorCode::BadFrame, "{body:?}"),
        other => panic!("expected a refusal of the unknown volume, got {other:?}"),
    }
    assert_new_agents_are_served(&server, &secret).await;
}

/// Many unauthenticated peers each half-sending a 1 MiB frame make the server hold nothing
/// like their sum (it used to reserve every announced frame and keep what arrived until the
/// handshake timeout).
#[tokio::test]
async fn half_sent_large_frames_before_authentication_hold_no_memory() {
    const PEERS: usize = 100;
    const SENT: usize = 768 * 1024;
    let (server, secret) = server_with_rw_client().await;
    let before = server.peak_rss();
    let mut peers = tokio::task::JoinSet::new();
    for _ in 0..PEERS {
        let address = server.agent_address;
        peers.spawn(async move {
            let Ok(mut stream) = TcpStream::connect(address).await else {
                return;
            };
            let mut bytes = (MIB as u32).to_be_bytes().to_vec();
            bytes.resize(4 + SENT, b' ');
            // Refused early, the server closes and the rest of the write fails: fine.
            let _ = stream.write_all(&bytes).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        });
    }
    while peers.join_next().await.is_some() {}
    let growth = server.peak_rss().saturating_sub(before);
    assert!(
        growth < 16 * MIB,
        "{PEERS} half-sent pre-auth frames grew sand's peak RSS by {} MiB",
        growth / MIB
    );
    assert_new_agents_are_served(&server, &secret).await;
}

async fn authenticated_raw(
    server: &TestServer,
    secret: &[u8],
) -> (
    FrameReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
) {
    let stream = TcpStream::connect(server.agent_address)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = FrameReader::new(read_half);
    let client_nonce = sanblk_proto::auth::new_nonce();
    let hello = AgentRequest::from(Hello {
        client: "host1".into(),
        client_nonce: hex::encode(client_nonce),
    });
    write_frame(&mut write_half, &hello)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let Ok(AgentReply::Challenge(Challenge { server_nonce, .. })) = reader.read().await else {
        panic!("no challenge")
    };
    let server_nonce = hex::decode(server_nonce).unwrap_or_default();
    let proof = hex::encode(sanblk_proto::auth::client_proof(
        secret,
        &server_nonce,
        &client_nonce,
    ));
    write_frame(
        &mut write_half,
        &AgentRequest::from(AuthResponse { mac: proof }),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(reader.read().await, Ok(AgentReply::AuthOk(_))));
    (reader, write_half)
}

#[tokio::test]
async fn bad_admin_frames_do_not_hurt_the_server() {
    use tokio::net::UnixStream;
    let server = TestServer::start();
    let wrong_version = format!(r#"{{"v":{},"type":"pool_list"}}"#, PROTOCOL_VERSION + 1);
    for bytes in [
        frame(b"not json"),
        (u32::MAX).to_be_bytes().to_vec(),
        frame(wrong_version.as_bytes()),
    ] {
        let stream = UnixStream::connect(&server.admin_socket)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (read_half, mut write_half) = stream.into_split();
        write_half
            .write_all(&bytes)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut reader = FrameReader::new(read_half);
        let reply: sanblk_proto::protocol::AdminReply<serde_json::Value> =
            reader.read().await.unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(reply, sanblk_proto::protocol::AdminReply::Error(_)),
            "{reply:?}"
        );
        assert!(
            reader
                .read::<sanblk_proto::protocol::AdminReply<serde_json::Value>>()
                .await
                .is_err(),
            "admin connection left open"
        );
    }
    let mut admin = server.admin().await;
    admin
        .call(PoolList {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Unauthenticated peers cannot flood or forge the log: an unknown `type` or client name full
/// of control characters and newlines is logged escaped and cut short. (The pre-auth frame
/// cap refuses anything near 500 KB outright, so the text is as long as a frame under that
/// cap can carry.)
#[tokio::test]
async fn peer_text_is_logged_escaped_and_bounded() {
    let server = TestServer::start();
    let logged_before = server.log().len();
    let hostile: String = "evil\n[INFO forged line]\r\x1b[31m\x07\0"
        .chars()
        .cycle()
        .take(2_000)
        .collect();
    // An unknown message type.
    let mut stream = TcpStream::connect(server.agent_address)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let frame = serde_json::json!({ "type": hostile, "v": PROTOCOL_VERSION });
    write_frame(&mut stream, &frame)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut reader = FrameReader::new(stream);
    let _ = reader.read::<AgentReply>().await;
    // A hello with that client name, then a wrong proof.
    let stream = TcpStream::connect(server.agent_address)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (read_half, mut write_half) = stream.into_split();
    let hello = serde_json::json!({
        "type": "hello",
        "client": hostile,
        "client_nonce": hex::encode([7u8; 32]),
        "v": PROTOCOL_VERSION,
    });
    write_frame(&mut write_half, &hello)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut reader = FrameReader::new(read_half);
    let _ = reader.read::<AgentReply>().await;
    write_frame(
        &mut write_half,
        &AgentRequest::from(AuthResponse {
            mac: hex::encode([0u8; 32]),
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let _ = reader.read::<AgentReply>().await;
    // Both failures are logged by now (before the replies were sent).
    let log = server.log();
    let added = &log[logged_before..];
    assert!(
        added.contains("client name") && added.contains("handshake failed"),
        "both failures logged:\n{added}"
    );
    assert!(
        added.len() < 8 * 1024,
        "{} bytes of log for two hostile peers",
        added.len()
    );
    for line in added.lines() {
        assert!(line.len() < 1024, "log line of {} bytes", line.len());
        assert!(
            !line.contains("[INFO forged line]") || line.contains("\\n[INFO forged line]"),
            "a peer started a log line: {line}"
        );
        assert!(
            !line.chars().any(|c| c.is_control()),
            "control character in the log: {line:?}"
        );
    }
    assert!(
        added.contains("(2000 bytes)"),
        "the cut is marked:\n{added}"
    );
}
