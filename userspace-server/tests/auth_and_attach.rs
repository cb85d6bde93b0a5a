//! Authentication, grants, attachments and map pushes against a real `sand` process.

mod common;

use std::time::Duration;

use common::{TestServer, MIB};
use sanblk_proto::auth;
use sanblk_proto::client::{AgentClient, ClientError, Push};
use sanblk_proto::map::AccessMode;
use sanblk_proto::protocol::{
    write_frame, AgentReply, AgentRequest, Attach, AuthResponse, Challenge, ClientRemove,
    ErrorCode, FrameReader, Hello, ListVolumes, VolumeDelete, VolumeDetail, VolumeGrow, VolumeShow,
};
use tokio::net::TcpStream;

fn code(result: Result<impl std::fmt::Debug, ClientError>) -> Option<ErrorCode> {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(error) => error.server_code(),
    }
}

#[tokio::test]
async fn attach_returns_the_map_and_a_session_token() {
    let server = TestServer::start();
    server.pool_of(2, 64 * MIB).await;
    let secret = server
        .volume_with_client("vol", 8 * MIB, "host1", AccessMode::Rw)
        .await;
    let mut agent = server.agent("host1", &secret).await;
    let volumes = agent.list_volumes().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(volumes.len(), 1);
    assert_eq!(volumes[0].name, "vol");
    let attached = agent
        .attach("vol", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(attached.map.name, "vol");
    assert_eq!(attached.map.size_bytes, 8 * MIB);
    assert_eq!(attached.map.block_size, 4096);
    assert_eq!(attached.map.epoch, 1);
    assert_eq!(attached.map.lease_ms, sanblk_proto::map::DEFAULT_LEASE_MS);
    assert_eq!(
        attached.map.extents.iter().map(|e| e.length).sum::<u64>(),
        8 * MIB
    );
    assert_eq!(attached.session_token.len(), 64);
    assert_eq!(
        agent
            .renew(attached.map.volume_id, attached.map.epoch)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        6_000
    );
}

#[tokio::test]
async fn wrong_secret_and_unknown_client_fail_alike() {
    let server = TestServer::start();
    server.pool_of(1, 64 * MIB).await;
    server
        .volume_with_client("vol", MIB, "host1", AccessMode::Rw)
        .await;
    let wrong = auth::random_bytes::<32>();
    let wrong_secret = AgentClient::connect(server.agent_address, "host1", &wrong).await;
    let unknown = AgentClient::connect(server.agent_address, "nobody", &wrong).await;
    // The client notices the server cannot prove knowledge of its (wrong) secret before
    // ever sending its own proof.
    assert!(
        matches!(wrong_secret, Err(ClientError::ServerNotAuthenticated)),
        "{:?}",
        wrong_secret.err()
    );
    assert!(
        matches!(unknown, Err(ClientError::ServerNotAuthenticated)),
        "{:?}",
        unknown.err()
    );

    // An attacker that ignores the server proof and answers anyway gets the same generic error
    // for a known and for an unknown name.
    let mut messages = Vec::new();
    for name in ["host1", "nobody"] {
        let (mut reader, mut writer) = raw_connection(&server).await;
        let hello = AgentRequest::from(Hello {
            client: name.into(),
            client_nonce: hex::encode(auth::new_nonce()),
        });
        write_frame(&mut writer, &hello)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let challenge: AgentReply = reader.read().await.unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(challenge, AgentReply::Challenge(_)),
            "{challenge:?}"
        );
        let guess = AgentRequest::from(AuthResponse {
            mac: hex::encode([7u8; 32]),
        });
        write_frame(&mut writer, &guess)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        match reader.read::<AgentReply>().await {
            Ok(AgentReply::Error(body)) => {
                assert_eq!(body.code, ErrorCode::AuthenticationFailed);
                messages.push(body.message);
            }
            other => panic!("expected authentication failure, got {other:?}"),
        }
        // And the connection is closed afterwards.
        assert!(reader.read::<AgentReply>().await.is_err());
    }
    assert_eq!(
        messages[0], messages[1],
        "no oracle distinguishing unknown clients"
    );
}

async fn raw_connection(
    server: &TestServer,
) -> (
    FrameReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
) {
    let stream = TcpStream::connect(server.agent_address)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (read_half, write_half) = stream.into_split();
    (FrameReader::new(read_half), write_half)
}

#[tokio::test]
async fn a_replayed_response_is_rejected() {
    let server = TestServer::start();
    server.pool_of(1, 64 * MIB).await;
    let secret = server
        .volume_with_client("vol", MIB, "host1", AccessMode::Rw)
        .await;
    let client_nonce = auth::new_nonce();
    let hello = AgentRequest::from(Hello {
        client: "host1".into(),
        client_nonce: hex::encode(client_nonce),
    });

    // A legitimate handshake, recorded by an eavesdropper.
    let (mut reader, mut writer) = raw_connection(&server).await;
    write_frame(&mut writer, &hello)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let Ok(AgentReply::Challenge(Challenge { server_nonce, .. })) = reader.read().await else {
        panic!("no challenge")
    };
    let server_nonce = hex::decode(server_nonce).unwrap_or_default();
    let recorded = AgentRequest::from(AuthResponse {
        mac: hex::encode(auth::client_proof(&secret, &server_nonce, &client_nonce)),
    });
    write_frame(&mut writer, &recorded)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(reader.read().await, Ok(AgentReply::AuthOk(_))));

    // The eavesdropper replays hello and response; the fresh server nonce defeats it.
    let (mut reader, mut writer) = raw_connection(&server).await;
    write_frame(&mut writer, &hello)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let Ok(AgentReply::Challenge(Challenge {
        server_nonce: second_nonce,
        ..
    })) = reader.read().await
    else {
        panic!("no challenge")
    };
    assert_ne!(
        hex::decode(second_nonce).unwrap_or_default(),
        server_nonce,
        "server nonces must be fresh"
    );
    write_frame(&mut writer, &recorded)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    match reader.read::<AgentReply>().await {
        Ok(AgentReply::Error(body)) => assert_eq!(body.code, ErrorCode::AuthenticationFailed),
        other => panic!("replay accepted: {other:?}"),
    }
}

#[tokio::test]
async fn nothing_about_volumes_before_authentication() {
    let server = TestServer::start();
    server.pool_of(1, 64 * MIB).await;
    server
        .volume_with_client("vol", MIB, "host1", AccessMode::Rw)
        .await;
    for request in [
        AgentRequest::from(ListVolumes {}),
        AgentRequest::from(Attach {
            volume: "vol".into(),
            mode: AccessMode::Ro,
        }),
    ] {
        let (mut reader, mut writer) = raw_connection(&server).await;
        write_frame(&mut writer, &request)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        match reader.read::<AgentReply>().await {
            Ok(AgentReply::Error(body)) => {
                assert!(!body.message.contains("vol\""), "{}", body.message)
            }
            other => panic!("unauthenticated request answered: {other:?}"),
        }
        assert!(
            reader.read::<AgentReply>().await.is_err(),
            "connection must be closed"
        );
    }
}

#[tokio::test]
async fn clients_see_only_granted_volumes() {
    let server = TestServer::start();
    server.pool_of(1, 64 * MIB).await;
    let secret = server
        .volume_with_client("mine", MIB, "host1", AccessMode::Ro)
        .await;
    server
        .volume_with_client("theirs", MIB, "host2", AccessMode::Rw)
        .await;
    let mut agent = server.agent("host1", &secret).await;
    let names: Vec<String> = agent
        .list_volumes()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, vec!["mine".to_string()]);
    // An ungranted volume and a non-existent one get the same answer.
    let ungranted = agent.attach("theirs", AccessMode::Ro).await;
    let ungranted_message = ungranted
        .as_ref()
        .err()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert_eq!(code(ungranted), Some(ErrorCode::NotGranted));
    let missing = agent.attach("ghost", AccessMode::Ro).await;
    assert_eq!(
        missing
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default()
            .replace("ghost", "theirs"),
        ungranted_message
    );
    // A read-only grant does not allow read-write.
    assert_eq!(
        code(agent.attach("mine", AccessMode::Rw).await),
        Some(ErrorCode::NotGranted)
    );
    agent
        .attach("mine", AccessMode::Ro)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn only_one_read_write_attachment_per_volume() {
    let server = TestServer::start();
    server.pool_of(1, 64 * MIB).await;
    let first_secret = server
        .volume_with_client("vol", MIB, "host1", AccessMode::Rw)
        .await;
    let second_secret = server.client("host2").await;
    server.grant("host2", "vol", AccessMode::Rw).await;

    let mut first = server.agent("host1", &first_secret).await;
    let attached = first
        .attach("vol", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut second = server.agent("host2", &second_secret).await;
    let refused = second.attach("vol", AccessMode::Rw).await;
    let message = refused
        .as_ref()
        .err()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert_eq!(code(refused), Some(ErrorCode::Busy));
    assert!(message.contains("read-write"), "{message}");
    // Read-only beside the writer is fine.
    let mut reader = server.agent("host2", &second_secret).await;
    reader
        .attach("vol", AccessMode::Ro)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Detach releases the rw slot.
    first
        .detach(attached.map.volume_id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    second
        .attach("vol", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Closing the connection does not release it: only the lease's expiry does (see
    // leases_and_changes.rs), the holder's kernel may still be writing.
    drop(second);
    tokio::time::sleep(Duration::from_millis(200)).await;
    match first.attach("vol", AccessMode::Rw).await {
        Err(ClientError::Server(body)) => {
            assert_eq!(body.code, ErrorCode::Busy);
            assert!(body.message.contains("lease"), "{}", body.message);
        }
        other => panic!("rw slot released by a closed connection: {other:?}"),
    }
}

/// Acks the next `Quiesce` push, as an agent without I/O in flight would.
async fn ack_quiesce(agent: &mut AgentClient) {
    loop {
        let push = tokio::time::timeout(Duration::from_secs(20), agent.next_push())
            .await
            .unwrap_or_else(|_| panic!("no quiesce within 20 s"))
            .unwrap_or_else(|e| panic!("{e}"));
        if let Push::Quiesce(q) = push {
            agent
                .quiesce_ack(q.volume_id, q.epoch)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            return;
        }
    }
}

/// The next pushed map, acked.
async fn acked_update(agent: &mut AgentClient) -> sanblk_proto::map::VolumeMap {
    let update = tokio::time::timeout(Duration::from_secs(20), agent.next_map_update())
        .await
        .unwrap_or_else(|_| panic!("no push within 20 s"))
        .unwrap_or_else(|e| panic!("{e}"));
    agent
        .ack(update.volume_id, update.epoch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    update
}

#[tokio::test]
async fn changes_are_pushed_as_new_epochs() {
    let server = TestServer::start();
    server.pool_of(2, 64 * MIB).await;
    let writer_secret = server
        .volume_with_client("vol", 4 * MIB, "writer", AccessMode::Rw)
        .await;
    let reader_secret = server.client("reader").await;
    server.grant("reader", "vol", AccessMode::Ro).await;
    let mut writer = server.agent("writer", &writer_secret).await;
    let mut reader = server.agent("reader", &reader_secret).await;
    let volume_id = writer
        .attach("vol", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .map
        .volume_id;
    reader
        .attach("vol", AccessMode::Ro)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Admin grow: both clients are quiesced, then receive epoch 2.
    let mut admin = server.admin().await;
    let mut grow_admin = server.admin().await;
    let (grown, ()) = tokio::join!(
        grow_admin.call(VolumeGrow {
            name: "vol".into(),
            new_size_bytes: 6 * MIB,
        }),
        async {
            ack_quiesce(&mut writer).await;
            ack_quiesce(&mut reader).await;
            for agent in [&mut writer, &mut reader] {
                let update = acked_update(agent).await;
                assert_eq!((update.epoch, update.size_bytes), (2, 6 * MIB));
            }
        }
    );
    grown.unwrap_or_else(|e| panic!("{e}"));
    // The server recorded the acks.
    let mut acked = false;
    for _ in 0..50 {
        let detail: VolumeDetail = admin
            .call(VolumeShow { name: "vol".into() })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if detail.attachments.len() == 2 && detail.attachments.iter().all(|a| a.acked_epoch == 2) {
            acked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(acked, "acks not recorded");

    // Client-requested allocation: the writer grows, gets the map, the reader gets a push.
    let (grown, pushed) = tokio::join!(writer.grow(volume_id, 8 * MIB), async {
        ack_quiesce(&mut reader).await;
        acked_update(&mut reader).await
    });
    let grown = grown.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((grown.epoch, grown.size_bytes), (3, 8 * MIB));
    assert_eq!(grown.extents.iter().map(|e| e.length).sum::<u64>(), 8 * MIB);
    assert_eq!(pushed, grown);
    // The writer does not get its own grow pushed back: its next update is the next change.
    let (grown, next) = tokio::join!(
        grow_admin.call(VolumeGrow {
            name: "vol".into(),
            new_size_bytes: 9 * MIB,
        }),
        async {
            ack_quiesce(&mut writer).await;
            ack_quiesce(&mut reader).await;
            acked_update(&mut reader).await;
            acked_update(&mut writer).await
        }
    );
    grown.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        next.epoch, 4,
        "duplicate push of an epoch the client already had"
    );
    // A read-only attachment may not allocate.
    assert_eq!(
        code(reader.grow(volume_id, 16 * MIB).await),
        Some(ErrorCode::NotGranted)
    );
    // Deleting an attached volume is refused.
    let busy = admin
        .call(VolumeDelete {
            name: "vol".into(),
            force: false,
        })
        .await;
    assert_eq!(
        busy.err().and_then(|e| e.server_code()),
        Some(ErrorCode::Busy)
    );
}

#[tokio::test]
async fn removing_a_client_disconnects_it() {
    let server = TestServer::start();
    server.pool_of(1, 64 * MIB).await;
    let secret = server
        .volume_with_client("vol", MIB, "host1", AccessMode::Rw)
        .await;
    let mut agent = server.agent("host1", &secret).await;
    agent
        .attach("vol", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut admin = server.admin().await;
    admin
        .call(ClientRemove {
            name: "host1".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let next = tokio::time::timeout(Duration::from_secs(5), agent.next_map_update()).await;
    assert!(
        matches!(next, Ok(Err(_))),
        "removed client still connected: {next:?}"
    );
    let again = AgentClient::connect(server.agent_address, "host1", &secret).await;
    assert!(again.is_err(), "removed client authenticated");
}
