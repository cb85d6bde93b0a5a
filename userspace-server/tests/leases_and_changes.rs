//! Leases and the change protocol, against the real sand binary with real `AgentClient`s:
//! a read-write slot outlives a closed connection until the lease (plus the in-flight bound)
//! expires, a fenced attachment's renewals are refused, a grow quiesces every attached client
//! before it commits, and a sand killed in the middle of a change finishes or rolls it back.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, MIB};
use sanblk_proto::client::{AgentClient, ClientError, Push};
use sanblk_proto::map::{AccessMode, VolumeMap, IN_FLIGHT_BOUND_MS};
use sanblk_proto::protocol::{
    ClientInfo, ClientList, ClientRevoke, ErrorCode, Quiesce, Resume, VolumeDetail, VolumeGrow,
    VolumeShow,
};

/// The short lease these tests run sand with.
const LEASE_MS: u64 = 1000;
/// Longest wait for anything expected to happen (generous: a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(20);

fn code<T>(result: Result<T, ClientError>) -> Option<ErrorCode> {
    result.err().and_then(|e| e.server_code())
}

async fn next_push(agent: &mut AgentClient) -> Push {
    tokio::time::timeout(WAIT, agent.next_push())
        .await
        .unwrap_or_else(|_| panic!("no push within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("push: {e}"))
}

/// A server with one 64 MiB device, volume "vol" (4 MiB) and clients "a" and "b", both
/// granted read-write; returns their secrets.
async fn setup(server: &TestServer) -> (Vec<u8>, Vec<u8>) {
    server.pool_of(1, 64 * MIB).await;
    let a = server
        .volume_with_client("vol", 4 * MIB, "a", AccessMode::Rw)
        .await;
    let b = server.client("b").await;
    server.grant("b", "vol", AccessMode::Rw).await;
    (a, b)
}

async fn attach(agent: &mut AgentClient, mode: AccessMode) -> VolumeMap {
    agent
        .attach("vol", mode)
        .await
        .unwrap_or_else(|e| panic!("attach: {e}"))
        .map
}

async fn show(server: &TestServer) -> VolumeDetail {
    server
        .admin()
        .await
        .call(VolumeShow { name: "vol".into() })
        .await
        .unwrap_or_else(|e| panic!("volume show: {e}"))
}

/// The change `grow` runs has not committed: after a while it still runs, and the volume is
/// still at `epoch`.
async fn assert_uncommitted<T>(server: &TestServer, grow: &tokio::task::JoinHandle<T>, epoch: u64) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!grow.is_finished());
    assert_eq!(show(server).await.map.epoch, epoch);
}

/// The map the background grow answered with.
async fn finished(grow: tokio::task::JoinHandle<Result<VolumeMap, ClientError>>) -> VolumeMap {
    tokio::time::timeout(WAIT, grow)
        .await
        .unwrap_or_else(|_| panic!("grow did not finish within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("grow: {e}"))
}

/// Runs `volume grow` to `size` on its own admin connection.
fn grow_in_background(
    server: &TestServer,
    size: u64,
) -> tokio::task::JoinHandle<Result<VolumeMap, ClientError>> {
    let socket = server.admin_socket.clone();
    tokio::spawn(async move {
        let mut admin = sanblk_proto::client::AdminClient::connect(&socket).await?;
        admin
            .call(VolumeGrow {
                name: "vol".into(),
                new_size_bytes: size,
            })
            .await
    })
}

/// Waits until the server has seen the connection of the volume's one attachment close.
async fn wait_disconnected(server: &TestServer) {
    let deadline = Instant::now() + WAIT;
    while !show(server)
        .await
        .attachments
        .iter()
        .all(|a| a.disconnected)
    {
        assert!(Instant::now() < deadline, "the server never saw the close");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn read_write_slot_is_freed_by_lease_expiry_or_detach() {
    let lease = LEASE_MS.to_string();
    let server = TestServer::start_with_args(&["--lease-ms", &lease]);
    let (a_secret, b_secret) = setup(&server).await;

    // a's own reconnect takes its slot over at once, with the same token.
    let mut a = server.agent("a", &a_secret).await;
    let first = a
        .attach("vol", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(a);
    wait_disconnected(&server).await;
    let mut a = server.agent("a", &a_secret).await;
    let again = a
        .attach("vol", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("reattach after a closed connection: {e}"));
    assert_eq!(again.session_token, first.session_token);

    // A closed connection does not free the slot for another client before the lease.
    drop(a);
    wait_disconnected(&server).await;
    let mut a = server.agent("a", &a_secret).await;
    let attached_at = Instant::now();
    attach(&mut a, AccessMode::Rw).await;
    drop(a);
    wait_disconnected(&server).await;
    let mut b = server.agent("b", &b_secret).await;
    let refused = b.attach("vol", AccessMode::Rw).await;
    let message = match refused {
        Err(ClientError::Server(body)) => {
            assert_eq!(body.code, ErrorCode::Busy);
            body.message
        }
        other => panic!("rw attach while a's lease runs: {other:?}"),
    };
    assert!(message.contains("lease"), "{message}");
    let detail = show(&server).await;
    assert_eq!(detail.attachments.len(), 1);
    assert!(detail.attachments[0].disconnected);
    let clients: Vec<ClientInfo> = server
        .admin()
        .await
        .call(ClientList {})
        .await
        .unwrap_or_else(|e| panic!("client list: {e}"));
    let held: Vec<(String, bool)> = clients
        .iter()
        .flat_map(|c| {
            c.attachments
                .iter()
                .map(|a| (a.volume.clone(), a.disconnected))
        })
        .collect();
    assert_eq!(held, vec![("vol".to_string(), true)]);
    assert!(detail.attachments[0].lease_left_ms <= LEASE_MS + IN_FLIGHT_BOUND_MS);
    let freed = loop {
        match b.attach("vol", AccessMode::Rw).await {
            Ok(_) => break Instant::now(),
            Err(ClientError::Server(body)) if body.code == ErrorCode::Busy => {
                assert!(attached_at.elapsed() < WAIT, "slot never freed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!("{other}"),
        }
    };
    // The server received a's attach after `attached_at`; its lease and the bound run from
    // then at least.
    let held = freed.duration_since(attached_at);
    assert!(
        held >= Duration::from_millis(LEASE_MS + IN_FLIGHT_BOUND_MS),
        "slot freed after {held:?}"
    );

    // An explicit detach frees it at once.
    b.detach(1).await.unwrap_or_else(|e| panic!("detach: {e}"));
    let mut a = server.agent("a", &a_secret).await;
    attach(&mut a, AccessMode::Rw).await;
}

/// A partitioned or stopped agent keeps its TCP connection open but stops renewing: its slot
/// is freed after its lease and the bound all the same, and it is fenced.
#[tokio::test]
async fn a_silent_client_with_an_open_connection_loses_its_slot_after_its_lease() {
    let lease = LEASE_MS.to_string();
    let server = TestServer::start_with_args(&["--lease-ms", &lease]);
    let (a_secret, b_secret) = setup(&server).await;
    let mut a = server.agent("a", &a_secret).await;
    let attached_at = Instant::now();
    let a_map = attach(&mut a, AccessMode::Rw).await;
    let mut b = server.agent("b", &b_secret).await;
    let freed = loop {
        match b.attach("vol", AccessMode::Rw).await {
            Ok(_) => break Instant::now(),
            Err(ClientError::Server(body)) if body.code == ErrorCode::Busy => {
                assert!(
                    attached_at.elapsed() < WAIT,
                    "slot of a silent, connected client never freed: {}",
                    body.message
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!("{other}"),
        }
    };
    let held = freed.duration_since(attached_at);
    assert!(
        held >= Duration::from_millis(LEASE_MS + IN_FLIGHT_BOUND_MS),
        "slot freed after {held:?}, before a's lease and the bound ran out"
    );
    assert_eq!(
        code(a.renew(a_map.volume_id, a_map.epoch).await),
        Some(ErrorCode::Fenced),
        "a late renewal of the fenced client must be refused"
    );
}

#[tokio::test]
async fn grow_quiesces_every_client_and_commits_after_both_acks() {
    // The default lease: nobody is fenced during this test.
    let server = TestServer::start();
    let (a_secret, b_secret) = setup(&server).await;
    let mut a = server.agent("a", &a_secret).await;
    let mut b = server.agent("b", &b_secret).await;
    let map = attach(&mut a, AccessMode::Rw).await;
    attach(&mut b, AccessMode::Ro).await;
    // Attaching resumes the client at the current epoch (no change in progress).
    for agent in [&mut a, &mut b] {
        match next_push(agent).await {
            Push::Resume(resume) => assert_eq!(resume.epoch, map.epoch),
            other => panic!("expected resume after attach: {other:?}"),
        }
    }
    let grow = grow_in_background(&server, 8 * MIB);
    let quiesce = Quiesce {
        volume_id: map.volume_id,
        epoch: map.epoch,
    };
    for agent in [&mut a, &mut b] {
        match next_push(agent).await {
            Push::Quiesce(q) => assert_eq!(q, quiesce),
            other => panic!("expected quiesce: {other:?}"),
        }
    }
    // Nothing commits before both acks.
    assert_uncommitted(&server, &grow, map.epoch).await;
    a.quiesce_ack(map.volume_id, map.epoch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_uncommitted(&server, &grow, map.epoch).await;
    b.quiesce_ack(map.volume_id, map.epoch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Then the new map, and only after it is acked, the resume.
    for agent in [&mut a, &mut b] {
        match next_push(agent).await {
            Push::MapUpdate(update) => {
                assert_eq!((update.epoch, update.size_bytes), (map.epoch + 1, 8 * MIB));
                agent
                    .ack(update.volume_id, update.epoch)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            other => panic!("expected the new map: {other:?}"),
        }
    }
    for agent in [&mut a, &mut b] {
        match next_push(agent).await {
            Push::Resume(resume) => assert_eq!(
                resume,
                Resume {
                    volume_id: map.volume_id,
                    epoch: map.epoch + 1
                }
            ),
            other => panic!("expected resume: {other:?}"),
        }
    }
    let grown = finished(grow).await;
    assert_eq!(grown.epoch, map.epoch + 1);
    // Both still hold their attachments (nobody fenced).
    a.renew(map.volume_id, grown.epoch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.renew(map.volume_id, grown.epoch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // A client-requested grow goes through the same protocol; `grow` acks its own quiesce.
    let grow = tokio::spawn(async move {
        let map = a.grow(1, 12 * MIB).await;
        (a, map)
    });
    match next_push(&mut b).await {
        Push::Quiesce(q) => {
            assert_eq!(q.epoch, map.epoch + 1);
            b.quiesce_ack(q.volume_id, q.epoch)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        other => panic!("expected quiesce: {other:?}"),
    }
    let update = tokio::time::timeout(WAIT, b.next_map_update())
        .await
        .unwrap_or_else(|_| panic!("no map"))
        .unwrap_or_else(|e| panic!("{e}"));
    b.ack(update.volume_id, update.epoch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (mut a, grown) = tokio::time::timeout(WAIT, grow)
        .await
        .unwrap_or_else(|_| panic!("client grow did not finish"))
        .unwrap_or_else(|e| panic!("{e}"));
    let grown = grown.unwrap_or_else(|e| panic!("client grow: {e}"));
    assert_eq!((grown.epoch, grown.size_bytes), (map.epoch + 2, 12 * MIB));
    assert_eq!(update, grown);
    a.ack(grown.volume_id, grown.epoch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    loop {
        match next_push(&mut a).await {
            Push::Resume(resume) => {
                assert_eq!(resume.epoch, grown.epoch);
                break;
            }
            Push::MapUpdate(m) => assert_eq!(m.epoch, grown.epoch),
            other => panic!("expected resume: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_client_that_never_acks_delays_the_change_by_its_lease_then_is_fenced() {
    let lease = LEASE_MS.to_string();
    let server = TestServer::start_with_args(&["--lease-ms", &lease]);
    let (a_secret, b_secret) = setup(&server).await;
    let mut silent = server.agent("a", &a_secret).await;
    let before_attach = Instant::now();
    let map = attach(&mut silent, AccessMode::Rw).await;
    let mut good = server.agent("b", &b_secret).await;
    attach(&mut good, AccessMode::Ro).await;
    let grow = grow_in_background(&server, 8 * MIB);
    // b answers everything and renews its lease; a answers nothing and does not renew.
    let volume_id = map.volume_id;
    let good = tokio::spawn(async move {
        let mut renew = tokio::time::interval(Duration::from_millis(LEASE_MS / 4));
        loop {
            let push = tokio::select! {
                push = good.next_push() => push,
                _ = renew.tick() => {
                    if let Err(e) = good.renew(volume_id, 0).await {
                        panic!("b's renewal: {e}");
                    }
                    continue;
                }
            };
            match push {
                Ok(Push::Quiesce(q)) => {
                    let _ = good.quiesce_ack(q.volume_id, q.epoch).await;
                }
                Ok(Push::MapUpdate(m)) => {
                    let _ = good.ack(m.volume_id, m.epoch).await;
                }
                Ok(Push::Resume(r)) if r.epoch > 1 => return (good, r),
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
    });
    let grown = finished(grow).await;
    let took = before_attach.elapsed();
    let bound = Duration::from_millis(LEASE_MS + IN_FLIGHT_BOUND_MS);
    // Not before a's lease and bound expired (counted from before its attach was sent) ...
    assert!(
        took >= bound,
        "change done after {took:?}, before the lease"
    );
    // ... and not much after (generous margin for a loaded machine).
    assert!(
        took < bound + Duration::from_secs(8),
        "change took {took:?}"
    );
    assert_eq!(grown.epoch, map.epoch + 1);
    let (mut good, resume) = tokio::time::timeout(WAIT, good)
        .await
        .unwrap_or_else(|_| panic!("b never resumed"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resume.epoch, grown.epoch);
    // The silent client is fenced: its renewals are refused as such.
    assert_eq!(
        code(silent.renew(map.volume_id, map.epoch).await),
        Some(ErrorCode::Fenced)
    );
    good.renew(map.volume_id, grown.epoch)
        .await
        .unwrap_or_else(|e| panic!("b fenced too: {e}"));
    let detail = show(&server).await;
    assert_eq!(detail.attachments.len(), 1);
    assert_eq!(detail.attachments[0].client, "b");
    // Fenced frees the read-write slot.
    let mut b_rw = server.agent("b", &b_secret).await;
    attach(&mut b_rw, AccessMode::Rw).await;
}

#[tokio::test]
async fn a_client_attaching_during_a_change_is_quiesced_too() {
    let server = TestServer::start();
    let (a_secret, b_secret) = setup(&server).await;
    let mut a = server.agent("a", &a_secret).await;
    let map = attach(&mut a, AccessMode::Rw).await;
    let grow = grow_in_background(&server, 8 * MIB);
    loop {
        if let Push::Quiesce(q) = next_push(&mut a).await {
            assert_eq!(q.epoch, map.epoch);
            break;
        }
    }
    // b attaches while a has not acked: b is quiesced as well, and the change waits for it.
    let mut b = server.agent("b", &b_secret).await;
    attach(&mut b, AccessMode::Ro).await;
    match next_push(&mut b).await {
        Push::Quiesce(q) => assert_eq!(q.epoch, map.epoch),
        other => panic!("expected quiesce: {other:?}"),
    }
    a.quiesce_ack(map.volume_id, map.epoch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_uncommitted(&server, &grow, map.epoch).await;
    let (_, resumed) = tokio::join!(common::follow_change(&mut a, map.epoch), async {
        b.quiesce_ack(map.volume_id, map.epoch)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        common::follow_change(&mut b, map.epoch).await
    });
    assert_eq!(resumed, map.epoch + 1);
    let grown = finished(grow).await;
    assert_eq!(grown.epoch, map.epoch + 1);
}

#[tokio::test]
async fn revoke_returns_once_the_client_is_fenced() {
    let lease = LEASE_MS.to_string();
    let server = TestServer::start_with_args(&["--lease-ms", &lease]);
    let (a_secret, _) = setup(&server).await;
    let mut a = server.agent("a", &a_secret).await;
    let before_attach = Instant::now();
    let map = attach(&mut a, AccessMode::Rw).await;
    a.renew(map.volume_id, map.epoch)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let renewed_before = Instant::now();
    let mut admin = server.admin().await;
    admin
        .call(ClientRevoke {
            name: "a".into(),
            volume: "vol".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("revoke: {e}"));
    // Not before the lease (renewed no earlier than `before_attach`) plus the bound ...
    let took = before_attach.elapsed();
    assert!(
        took >= Duration::from_millis(LEASE_MS + IN_FLIGHT_BOUND_MS),
        "revoke returned after {took:?}"
    );
    // ... and not long after the last renewal's expiry.
    assert!(
        renewed_before.elapsed() < Duration::from_millis(LEASE_MS + IN_FLIGHT_BOUND_MS) + WAIT,
        "revoke took {took:?}"
    );
    // The client is cut off: its connection is closed or its renewal refused.
    assert!(a.renew(map.volume_id, map.epoch).await.is_err());
    assert!(show(&server).await.attachments.is_empty());
}

/// Where sand stops when started with `SAND_CRASH_AT` (debug builds only).
#[cfg(debug_assertions)]
const CRASH_AT_ENV: &str = "SAND_CRASH_AT";

#[cfg(debug_assertions)]
#[tokio::test]
async fn a_change_interrupted_by_a_crash_finishes_or_rolls_back_at_restart() {
    for (crash_at, committed) in [
        ("change:after-record", false),
        ("change:after-quiesce", false),
        ("change:after-commit", true),
    ] {
        let mut first = TestServer::start();
        let (a_secret, _) = setup(&first).await;
        assert!(first.stop(), "sand did not stop cleanly");
        let mut server = TestServer::start_in_with_env(&first.dir, &[(CRASH_AT_ENV, crash_at)]);
        let mut agent = server.agent("a", &a_secret).await;
        let map = attach(&mut agent, AccessMode::Rw).await;
        let _grow = grow_in_background(&server, 8 * MIB);
        // Answer the quiesce (if it comes before the crash) like an agent would.
        let answering = tokio::spawn(async move {
            while let Ok(push) = agent.next_push().await {
                if let Push::Quiesce(q) = push {
                    let _ = agent.quiesce_ack(q.volume_id, q.epoch).await;
                }
            }
        });
        common::wait_for_crash(&mut server, crash_at).await;
        let _ = tokio::time::timeout(WAIT, answering).await;
        let restarted = TestServer::start_in(&server.dir);
        let expected = if committed { map.epoch + 1 } else { map.epoch };
        assert_eq!(
            show(&restarted).await.map.epoch,
            expected,
            "after {crash_at}"
        );
        let log = restarted.log();
        assert!(
            log.contains(if committed {
                "finishing"
            } else {
                "rolled back"
            }),
            "after {crash_at}: {log}"
        );
        // The agent reconnecting gets the current map and is resumed at its epoch.
        let mut agent = restarted.agent("a", &a_secret).await;
        let again = attach(&mut agent, AccessMode::Rw).await;
        assert_eq!(again.epoch, expected, "after {crash_at}");
        match next_push(&mut agent).await {
            Push::Resume(resume) => assert_eq!(resume.epoch, expected, "after {crash_at}"),
            other => panic!("after {crash_at}: expected resume, got {other:?}"),
        }
        // And a new change goes through (no change record left behind).
        let grow = grow_in_background(&restarted, 16 * MIB);
        assert_eq!(
            common::follow_change(&mut agent, expected).await,
            expected + 1
        );
        let grown = tokio::time::timeout(WAIT, grow)
            .await
            .unwrap_or_else(|_| panic!("grow after restart did not finish"))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("grow after {crash_at} and a restart: {e}"));
        assert_eq!(grown.epoch, expected + 1);
        drop((first, server));
    }
}
