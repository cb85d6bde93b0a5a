//! Snapshots against a real `sand`: taken through the change protocol with a client attached,
//! copy-on-write of server-path writes, point-in-time reads over the NBD export (the project's
//! client and a stock one, `qemu-img`), the changed-chunk lists, a full COW store, a crash in
//! the middle of copy-on-write traffic, and bad requests. Image files are read directly to
//! check the origin.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::io_client::IoClient;
use common::{follow_change_to_map, TestServer, MIB};
use sanblk_proto::client::AgentClient;
use sanblk_proto::map::{AccessMode, Layout, VolumeMap};
use sanblk_proto::nbd::{NbdClient, CHANGED_FLAG};
use sanblk_proto::protocol::{
    ErrorCode, SnapshotChanges, SnapshotCreate, SnapshotDelete, SnapshotDiff, SnapshotInfo,
    SnapshotList, VolumeShow,
};
use uuid::Uuid;

const VOLUME: u64 = 8 * MIB;
const CHUNK: u64 = 64 << 10;

/// Distinct bytes per (seed, position).
fn pattern(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

struct Setup {
    /// host1's secret, for an agent of a restarted server.
    secret: Vec<u8>,
    agent: AgentClient,
    io: IoClient,
    map: VolumeMap,
}

/// A server with three 64 MiB devices, the 8 MiB linear volume `vol` attached read-write by
/// `host1` (agent and server-path session), filled with pattern `seed`.
async fn setup(server: &TestServer, seed: u64) -> (Setup, Vec<u8>) {
    server.pool_of(3, 64 * MIB).await;
    let secret = server.client("host1").await;
    server.create_volume("vol", VOLUME, Layout::Linear).await;
    server.grant("host1", "vol", AccessMode::Rw).await;
    let mut agent = server.agent("host1", &secret).await;
    let attached = agent
        .attach("vol", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("attach: {e}"));
    let mut io = IoClient::session(server, &attached).await;
    let data = pattern(seed, VOLUME as usize);
    io.write(&attached.map, 0, &data).await;
    let map = attached.map.clone();
    (
        Setup {
            secret,
            agent,
            io,
            map,
        },
        data,
    )
}

impl Setup {
    /// Detaches the volume (its agent stays connected).
    async fn detach(&mut self) {
        self.agent
            .detach(self.map.volume_id)
            .await
            .unwrap_or_else(|e| panic!("detach: {e}"));
    }

    /// Deletes snapshot `name` (answering the change as the client's agent); returns the
    /// new map.
    async fn delete_snapshot(&mut self, server: &TestServer, name: &str) -> VolumeMap {
        let mut admin = server.admin().await;
        let request = SnapshotDelete {
            volume: "vol".into(),
            name: name.into(),
        };
        let (deleted, map) = tokio::join!(
            admin.call(request),
            follow_change_to_map(&mut self.agent, self.map.epoch)
        );
        let deleted = deleted.unwrap_or_else(|e| panic!("delete {name}: {e}"));
        // The reply describes the snapshot as the delete left it.
        assert_eq!(
            (deleted.name.as_str(), deleted.state.as_str()),
            (name, "deleted")
        );
        map
    }

    /// Takes snapshot `name` of `chunk_bytes` chunks (answering the change as the client's
    /// agent); returns it, the new map in `self.map`.
    async fn snapshot_of_chunks(
        &mut self,
        server: &TestServer,
        name: &str,
        chunk_bytes: u32,
    ) -> SnapshotInfo {
        let mut admin = server.admin().await;
        let request = SnapshotCreate {
            volume: "vol".into(),
            name: name.into(),
            chunk_bytes: Some(chunk_bytes),
            cow_bytes: None,
        };
        let (created, map) = tokio::join!(
            admin.call(request),
            follow_change_to_map(&mut self.agent, self.map.epoch)
        );
        self.map = map;
        created.unwrap_or_else(|e| panic!("snapshot create {name}: {e}"))
    }

    /// Takes snapshot `name` (answering the change as the client's agent) and returns it.
    async fn snapshot(
        &mut self,
        server: &TestServer,
        name: &str,
        cow_bytes: Option<u64>,
    ) -> SnapshotInfo {
        let mut admin = server.admin().await;
        let request = SnapshotCreate {
            volume: "vol".into(),
            name: name.into(),
            chunk_bytes: None,
            cow_bytes,
        };
        let (created, map) = tokio::join!(
            admin.call(request),
            follow_change_to_map(&mut self.agent, self.map.epoch)
        );
        let created = created.unwrap_or_else(|e| panic!("snapshot create {name}: {e}"));
        // Each chunk's first write goes through the server now, from a new snapshot set.
        let cow = map
            .copy_on_write
            .as_ref()
            .unwrap_or_else(|| panic!("no copy-on-write in {map:?}"));
        assert_eq!(cow.chunk_bytes as u64, CHUNK, "{map:?}");
        assert!(
            self.map
                .copy_on_write
                .as_ref()
                .is_none_or(|before| before.generation < cow.generation),
            "the snapshot set did not change: {:?} -> {map:?}",
            self.map.copy_on_write
        );
        assert!(map.syncing.is_empty(), "{map:?}");
        self.map = map;
        created
    }

    async fn write(&mut self, offset: u64, data: &[u8]) {
        let map = self.map.clone();
        self.io.write(&map, offset, data).await;
    }
}

async fn list(server: &TestServer) -> Vec<SnapshotInfo> {
    server
        .admin()
        .await
        .call(SnapshotList {
            volume: "vol".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("snapshot list: {e}"))
}

/// The whole snapshot read over NBD with the project's client.
async fn read_export(info: &SnapshotInfo) -> Vec<u8> {
    let mut client = NbdClient::connect_unix(Path::new(&info.nbd_socket), &info.export, true)
        .await
        .unwrap_or_else(|e| panic!("nbd connect {}: {e}", info.export));
    assert_eq!(client.size(), info.size_bytes);
    let mut data = Vec::new();
    let mut at = 0;
    while at < info.size_bytes {
        let step = (info.size_bytes - at).min(MIB);
        data.extend(
            client
                .read(at, step as u32)
                .await
                .unwrap_or_else(|e| panic!("nbd read at {at}: {e}")),
        );
        at += step;
    }
    let _ = client.disconnect().await;
    data
}

/// The whole snapshot as a stock NBD client sees it: `qemu-img convert` to a raw file.
fn read_with_qemu_img(info: &SnapshotInfo, dir: &Path) -> Vec<u8> {
    let out: PathBuf = dir.join(format!("{}.raw", info.name));
    let url = format!("nbd+unix:///{}?socket={}", info.export, info.nbd_socket);
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &url])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("qemu-img: {e}"));
    assert!(status.success(), "qemu-img convert {url} failed: {status}");
    std::fs::read(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()))
}

/// The chunks touched by writes of `[offset, offset + length)`.
fn chunks_of(writes: &[(u64, u64)]) -> BTreeSet<u64> {
    writes
        .iter()
        .flat_map(|&(offset, length)| offset / CHUNK..(offset + length).div_ceil(CHUNK))
        .collect()
}

async fn diff(
    server: &TestServer,
    from: &str,
    to: &str,
) -> Result<SnapshotChanges, sanblk_proto::client::ClientError> {
    server
        .admin()
        .await
        .call(SnapshotDiff {
            volume: "vol".into(),
            from: from.into(),
            to: to.into(),
            start_chunk: 0,
        })
        .await
}

/// Reads the origin volume from the image files, where its map says.
async fn origin(server: &TestServer) -> Vec<u8> {
    let detail: sanblk_proto::protocol::VolumeDetail = server
        .admin()
        .await
        .call(VolumeShow { name: "vol".into() })
        .await
        .unwrap_or_else(|e| panic!("volume show: {e}"));
    let paths = server.device_paths().await;
    let mut data = vec![0u8; detail.map.size_bytes as usize];
    for extent in &detail.map.extents {
        let replica = &extent.replicas[0];
        let file =
            std::fs::File::open(&paths[&replica.device_uuid]).unwrap_or_else(|e| panic!("{e}"));
        use std::os::unix::fs::FileExt;
        let at = extent.volume_offset as usize;
        file.read_exact_at(
            &mut data[at..at + extent.length as usize],
            replica.device_offset,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    data
}

#[tokio::test]
async fn a_snapshot_keeps_its_point_in_time_while_the_volume_is_overwritten() {
    let server = TestServer::start();
    let (mut setup, a) = setup(&server, 1).await;
    let first = setup.snapshot(&server, "first", None).await;
    assert_eq!(first.state, "active");
    assert_eq!(first.size_bytes, VOLUME);
    assert_eq!(first.changed_chunks, 0);

    // Overwrite parts: whole chunks, a piece inside one, one straddling two chunks.
    let writes_b = [(0, MIB), (3 * MIB + 4096, 8192), (5 * MIB - 4096, 8192)];
    let mut b = a.clone();
    for (i, &(offset, length)) in writes_b.iter().enumerate() {
        let fresh = pattern(100 + i as u64, length as usize);
        setup.write(offset, &fresh).await;
        b[offset as usize..(offset + length) as usize].copy_from_slice(&fresh);
    }
    assert!(
        read_export(&first).await == a,
        "snapshot changed by later writes"
    );
    assert!(
        read_with_qemu_img(&first, &server.dir) == a,
        "qemu-img read another snapshot content"
    );
    assert!(
        origin(&server).await == b,
        "origin does not hold the new data"
    );
    let listed = list(&server).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].changed_chunks, chunks_of(&writes_b).len() as u64);
    assert_eq!(listed[0].cow_used_bytes, listed[0].changed_chunks * CHUNK);

    // A second snapshot; its changed list is exactly what B touched.
    let second = setup.snapshot(&server, "second", None).await;
    let writes_c = [(6 * MIB, 2 * CHUNK)];
    let mut c = b.clone();
    let fresh = pattern(200, (2 * CHUNK) as usize);
    setup.write(6 * MIB, &fresh).await;
    c[(6 * MIB) as usize..(6 * MIB + 2 * CHUNK) as usize].copy_from_slice(&fresh);
    let listed = list(&server).await;
    let second_listed = listed
        .iter()
        .find(|s| s.name == "second")
        .unwrap_or_else(|| panic!("{listed:?}"));
    assert_eq!(
        second_listed.changed_chunks,
        chunks_of(&writes_c).len() as u64
    );
    let changed = diff(&server, "first", "second")
        .await
        .unwrap_or_else(|e| panic!("diff: {e}"));
    assert_eq!(changed.chunk_bytes as u64, CHUNK);
    assert_eq!(
        changed.chunks.iter().copied().collect::<BTreeSet<u64>>(),
        chunks_of(&writes_b)
    );
    assert_eq!(changed.next_chunk, None);
    assert!(read_export(&second).await == b);
    assert!(read_export(&first).await == a);
    assert!(origin(&server).await == c);
    // The export of the second snapshot marks what changed since the first.
    let mut client = NbdClient::connect_unix(Path::new(&second.nbd_socket), &second.export, true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut marked = BTreeSet::new();
    let mut at = 0;
    while at < VOLUME {
        let runs = client
            .changed_extents(at, (VOLUME - at) as u32)
            .await
            .unwrap_or_else(|e| panic!("block status: {e}"));
        assert!(!runs.is_empty());
        for (length, flags) in runs {
            if flags & CHANGED_FLAG != 0 {
                marked.extend(at / CHUNK..(at + length).div_ceil(CHUNK));
            }
            at += length;
        }
    }
    assert_eq!(marked, chunks_of(&writes_b));
    // Wrong order, unknown names: refused.
    let refused = diff(&server, "second", "first").await;
    assert_eq!(
        refused.err().and_then(|e| e.server_code()),
        Some(ErrorCode::BadRequest)
    );
    let refused = diff(&server, "first", "nope").await;
    assert_eq!(
        refused.err().and_then(|e| e.server_code()),
        Some(ErrorCode::NotFound)
    );

    // Deleting the first keeps the second; the last delete ends copy-on-write.
    let map = setup.delete_snapshot(&server, "first").await;
    // The second snapshot's set stays what the clients know; both stores were offered to
    // them (same chunk size, newest first), now only the second one's.
    let store_ids = |map: &VolumeMap| -> Option<(u64, u32, Vec<u64>)> {
        map.copy_on_write.as_ref().map(|c| {
            let ids = c.stores.iter().map(|s| s.snapshot_id).collect();
            (c.generation, c.chunk_bytes, ids)
        })
    };
    assert_eq!(
        store_ids(&setup.map),
        Some((second.id, CHUNK as u32, vec![second.id, first.id])),
        "{:?}",
        setup.map
    );
    assert_eq!(
        store_ids(&map),
        Some((second.id, CHUNK as u32, vec![second.id])),
        "{map:?}"
    );
    setup.map = map;
    assert!(read_export(&second).await == b);
    let map = setup.delete_snapshot(&server, "second").await;
    assert!(
        map.syncing.is_empty() && map.copy_on_write.is_none(),
        "still copying on write without a snapshot: {map:?}"
    );
    assert!(list(&server).await.is_empty());
}

/// Preserves `old` as the content of `chunk` the way a client does with the map's COW store
/// section of snapshot `snapshot_id`: into the slot after the last record found on disk, then
/// the record (synced in that order). Returns the slot.
fn preserve_as_a_client(
    paths: &HashMap<Uuid, PathBuf>,
    map: &VolumeMap,
    snapshot_id: u64,
    chunk: u64,
    old: &[u8],
) -> u64 {
    use sanblk_uapi::cow::{
        CowLayout, Record, RecordSector, HEADER_BYTES, RECORDS_PER_SECTOR, SECTOR_BYTES,
    };
    let store = map
        .copy_on_write
        .iter()
        .flat_map(|c| c.stores.iter())
        .find(|s| s.snapshot_id == snapshot_id)
        .unwrap_or_else(|| panic!("no COW store offered for snapshot {snapshot_id}: {map:?}"));
    assert_eq!(
        old.len() as u64,
        u64::from(store.chunk_bytes),
        "a chunk of the store's"
    );
    let layout = CowLayout::new(store.store_bytes, store.chunk_bytes).expect("store layout");
    // Store offset -> (file, offset) through the store's extents.
    let locate = |at: u64| {
        let extent = store
            .extents
            .iter()
            .find(|e| e.volume_offset <= at && at < e.volume_offset + e.length)
            .unwrap_or_else(|| panic!("{at} outside the store"));
        let replica = &extent.replicas[0];
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&paths[&replica.device_uuid])
            .unwrap_or_else(|e| panic!("{e}"));
        (file, replica.device_offset + at - extent.volume_offset)
    };
    use std::os::unix::fs::FileExt;
    let mut index = u64::from(store.scan_from_sector);
    let mut sector = loop {
        let (file, at) = locate(HEADER_BYTES + index * SECTOR_BYTES as u64);
        let mut bytes = [0u8; SECTOR_BYTES];
        file.read_exact_at(&mut bytes, at)
            .unwrap_or_else(|e| panic!("{e}"));
        let sector = RecordSector::decode(&bytes, index as u32, &layout, store.snapshot_id)
            .unwrap_or_else(|e| panic!("record sector {index}: {e:?}"));
        if (sector.count as usize) < RECORDS_PER_SECTOR {
            break sector;
        }
        index += 1;
    };
    let slot = index * RECORDS_PER_SECTOR as u64 + u64::from(sector.count);
    let (file, at) = locate(layout.slot_offset(slot));
    file.write_all_at(old, at).unwrap_or_else(|e| panic!("{e}"));
    file.sync_all().unwrap_or_else(|e| panic!("{e}"));
    assert!(sector.push(Record {
        origin_chunk: chunk,
        slot
    }));
    let mut bytes = [0u8; SECTOR_BYTES];
    sector.encode(store.snapshot_id, &mut bytes);
    let (file, at) = locate(layout.record_sector_offset(slot));
    file.write_all_at(&bytes, at)
        .unwrap_or_else(|e| panic!("{e}"));
    file.sync_all().unwrap_or_else(|e| panic!("{e}"));
    slot
}

/// The snapshots whose COW stores a map offers clients, in its order.
fn offered_stores(map: &VolumeMap) -> Vec<u64> {
    map.copy_on_write
        .iter()
        .flat_map(|c| c.stores.iter().map(|s| s.snapshot_id))
        .collect()
}

/// Writes `data` at volume `offset` straight into the image files, as a direct write does.
fn write_direct(paths: &HashMap<Uuid, PathBuf>, map: &VolumeMap, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let extent = map.extent_at(offset).expect("inside the volume");
    assert!(offset + data.len() as u64 <= extent.volume_offset + extent.length);
    for replica in &extent.replicas {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&paths[&replica.device_uuid])
            .unwrap_or_else(|e| panic!("{e}"));
        file.write_all_at(data, replica.device_offset + offset - extent.volume_offset)
            .unwrap_or_else(|e| panic!("{e}"));
        file.sync_all().unwrap_or_else(|e| panic!("{e}"));
    }
}

#[tokio::test]
async fn chunks_a_client_preserved_itself_are_read_back_by_the_server() {
    let mut server = TestServer::start();
    let (mut setup, a) = setup(&server, 6).await;
    let snap = setup.snapshot(&server, "snap", None).await;
    let paths = server.device_paths().await;
    // The client preserves chunk 10, then writes it straight to the origin; the server has
    // not seen either write when the snapshot is read.
    let chunk_range = |chunk: u64| (chunk * CHUNK) as usize..((chunk + 1) * CHUNK) as usize;
    let mut b = a.clone();
    assert_eq!(
        preserve_as_a_client(&paths, &setup.map, snap.id, 10, &a[chunk_range(10)]),
        0
    );
    let fresh = pattern(600, CHUNK as usize);
    write_direct(&paths, &setup.map, 10 * CHUNK, &fresh);
    b[chunk_range(10)].copy_from_slice(&fresh);
    assert!(
        read_export(&snap).await == a,
        "the client's copy was not read back"
    );
    // A first write through the server to another chunk takes the next slot, not the
    // client's; the client then continues after it.
    let fresh = pattern(601, 4096);
    setup.write(11 * CHUNK, &fresh).await;
    b[11 * CHUNK as usize..11 * CHUNK as usize + 4096].copy_from_slice(&fresh);
    assert_eq!(
        preserve_as_a_client(&paths, &setup.map, snap.id, 12, &a[chunk_range(12)]),
        2
    );
    let fresh = pattern(602, CHUNK as usize);
    write_direct(&paths, &setup.map, 12 * CHUNK, &fresh);
    b[chunk_range(12)].copy_from_slice(&fresh);
    // A write through the server to a chunk the client preserved copies nothing again.
    let fresh = pattern(603, 4096);
    setup.write(10 * CHUNK, &fresh).await;
    b[10 * CHUNK as usize..10 * CHUNK as usize + 4096].copy_from_slice(&fresh);
    assert!(
        origin(&server).await == b,
        "origin does not hold the new data"
    );
    assert!(
        read_export(&snap).await == a,
        "the snapshot lost its point in time"
    );
    // The client's agent relays what its kernel preserved: chunks 10 and 12 are in the
    // records, 13 is not (a copy that never became durable) and is named back.
    let noted = setup
        .agent
        .report_preserved(setup.map.volume_id, snap.id, vec![10, 12, 13])
        .await
        .unwrap_or_else(|e| panic!("report: {e}"));
    assert_eq!((noted.recorded, noted.unrecorded), (2, vec![13]));
    let listed = list(&server).await;
    assert_eq!(listed[0].changed_chunks, 3, "{listed:?}");
    assert_eq!(listed[0].cow_used_bytes, 3 * CHUNK, "{listed:?}");
    assert_eq!(listed[0].reported_chunks, 2, "{listed:?}");
    // Hostile reports are refused and change nothing: no chunk, too many, beyond the
    // volume, a snapshot that does not exist, a volume not attached.
    let volume_id = setup.map.volume_id;
    let hostile: Vec<(u64, u64, Vec<u64>, ErrorCode)> = vec![
        (volume_id, snap.id, Vec::new(), ErrorCode::BadRequest),
        (volume_id, snap.id, vec![0; 5000], ErrorCode::BadRequest),
        (
            volume_id,
            snap.id,
            vec![VOLUME / CHUNK],
            ErrorCode::BadRequest,
        ),
        (volume_id, snap.id + 100, vec![1], ErrorCode::NotFound),
        (volume_id + 100, snap.id, vec![1], ErrorCode::NotGranted),
    ];
    for (volume, snapshot, chunks, code) in hostile {
        let what = format!(
            "volume {volume} snapshot {snapshot} {} chunk(s)",
            chunks.len()
        );
        let refused = setup.agent.report_preserved(volume, snapshot, chunks).await;
        assert_eq!(
            refused.err().and_then(|e| e.server_code()),
            Some(code),
            "{what}"
        );
    }
    let again = list(&server).await;
    assert_eq!(
        (again[0].changed_chunks, again[0].reported_chunks),
        (3, 2),
        "{again:?}"
    );
    // A second snapshot: the first's changed chunks are exactly those three, and the map
    // offers both stores, the newest first.
    let second = setup.snapshot(&server, "second", None).await;
    let offered = offered_stores(&setup.map);
    assert_eq!(offered, [second.id, snap.id], "{:?}", setup.map);
    let changed = diff(&server, "snap", "second")
        .await
        .unwrap_or_else(|e| panic!("diff: {e}"));
    assert_eq!(changed.chunks, vec![10, 11, 12]);
    assert!(read_export(&second).await == b);
    // The client preserves chunk 20 into both stores, then writes it straight to the origin:
    // the server reads both copies back.
    for id in [second.id, snap.id] {
        preserve_as_a_client(&paths, &setup.map, id, 20, &b[chunk_range(20)]);
    }
    let mut c = b.clone();
    let fresh = pattern(604, CHUNK as usize);
    write_direct(&paths, &setup.map, 20 * CHUNK, &fresh);
    c[chunk_range(20)].copy_from_slice(&fresh);
    // Another host, which had not read those records, copies chunk 20 into `second` again
    // after the write: the chunk's first record holds its point in time, the later one
    // (read back by the listing) is not what the snapshot reads.
    preserve_as_a_client(&paths, &setup.map, second.id, 20, &fresh);
    let listed = list(&server).await;
    let second_info = listed
        .iter()
        .find(|s| s.name == "second")
        .expect("second listed");
    assert_eq!(second_info.changed_chunks, 1, "{second_info:?}");
    assert!(read_export(&second).await == b, "second lost chunk 20");
    assert!(read_export(&snap).await == a, "snap lost chunk 20");
    // Chunk 21 too, with nothing reading the stores before a third snapshot is taken: what
    // the older stores held then counts the client's records.
    for id in [second.id, snap.id] {
        preserve_as_a_client(&paths, &setup.map, id, 21, &b[chunk_range(21)]);
    }
    let fresh = pattern(605, CHUNK as usize);
    write_direct(&paths, &setup.map, 21 * CHUNK, &fresh);
    c[chunk_range(21)].copy_from_slice(&fresh);
    let third = setup.snapshot(&server, "third", None).await;
    let offered = offered_stores(&setup.map);
    assert_eq!(offered, [third.id, second.id, snap.id], "{:?}", setup.map);
    for (from, to, chunks) in [
        ("snap", "second", vec![10, 11, 12]),
        ("second", "third", vec![20, 21]),
        ("snap", "third", vec![10, 11, 12, 20, 21]),
    ] {
        let changed = diff(&server, from, to)
            .await
            .unwrap_or_else(|e| panic!("diff {from} {to}: {e}"));
        assert_eq!(changed.chunks, chunks, "{from} -> {to}");
    }
    assert!(read_export(&third).await == c);
    assert!(read_export(&second).await == b);
    // After a restart the records are loaded again, the client's among them.
    drop(setup);
    server.kill9();
    let _restarted = TestServer::start_in(&server.dir);
    assert!(read_export(&snap).await == a, "lost after a restart");
}

/// Every chunk the export's `sanblk:changed` context marks in `info`, in chunks of `chunk`.
async fn marked_chunks(info: &SnapshotInfo, chunk: u64) -> BTreeSet<u64> {
    let mut client = NbdClient::connect_unix(Path::new(&info.nbd_socket), &info.export, true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut marked = BTreeSet::new();
    let mut at = 0;
    while at < info.size_bytes {
        let runs = client
            .changed_extents(at, (info.size_bytes - at).min(u64::from(u32::MAX)) as u32)
            .await
            .unwrap_or_else(|e| panic!("block status: {e}"));
        assert!(!runs.is_empty());
        for (length, flags) in runs {
            let end = (at + length).min(info.size_bytes);
            if flags & CHANGED_FLAG != 0 {
                marked.extend(at / chunk..end.div_ceil(chunk));
            }
            at = end;
        }
    }
    let _ = client.disconnect().await;
    marked
}

/// `sanblk:changed` marks, in the snapshot's own chunks, what was written since the previous
/// snapshot also when that one has other chunks, and everything the volume grew by since
/// (it did not exist then); `snapshot diff` still lists the written chunks only.
#[tokio::test]
async fn changed_chunks_are_marked_in_the_snapshots_chunks_and_growth_counts() {
    let server = TestServer::start();
    let (mut setup, _) = setup(&server, 8).await;
    setup.snapshot(&server, "first", None).await;
    setup.write(2 * CHUNK, &pattern(81, CHUNK as usize)).await;
    // Grown by 1 MiB (answering the change as the client), written in the middle of it.
    let mut admin = server.admin().await;
    let grow = sanblk_proto::protocol::VolumeGrow {
        name: "vol".into(),
        new_size_bytes: VOLUME + MIB,
    };
    let (grown, map) = tokio::join!(
        admin.call(grow),
        follow_change_to_map(&mut setup.agent, setup.map.epoch)
    );
    grown.unwrap_or_else(|e| panic!("grow: {e}"));
    setup.map = map;
    setup.write(VOLUME + MIB / 2, &pattern(82, 4096)).await;
    const FINE: u64 = 4096;
    let fine = setup.snapshot_of_chunks(&server, "fine", FINE as u32).await;
    let mut expected: BTreeSet<u64> = (2 * CHUNK / FINE..3 * CHUNK / FINE).collect();
    expected.extend(VOLUME / FINE..(VOLUME + MIB) / FINE);
    assert_eq!(marked_chunks(&fine, FINE).await, expected);
    // Between snapshots of different chunk sizes, the diff is in the older one's chunks.
    let across = diff(&server, "first", "fine")
        .await
        .unwrap_or_else(|e| panic!("diff across chunk sizes: {e}"));
    assert_eq!((across.chunk_bytes, across.chunks), (CHUNK as u32, vec![2]));
    // The same with the snapshots' chunk size: one more chunk written, and the growth.
    setup.write(5 * CHUNK, &pattern(83, 4096)).await;
    setup.map = setup.delete_snapshot(&server, "fine").await;
    let second = setup.snapshot(&server, "second", None).await;
    let mut expected: BTreeSet<u64> = [2, 5].into();
    expected.extend(VOLUME / CHUNK..(VOLUME + MIB) / CHUNK);
    assert_eq!(marked_chunks(&second, CHUNK).await, expected);
    let changed = diff(&server, "first", "second")
        .await
        .unwrap_or_else(|e| panic!("diff: {e}"));
    assert_eq!(changed.chunks, [2, 5], "a diff lists written chunks only");
}

/// The map offers the COW store of every active snapshot, each with its own chunk size (the
/// map's is the smallest): a client preserves a chunk of a coarse store in that store's
/// chunks, and the server reads it back.
#[tokio::test]
async fn stores_of_every_chunk_size_are_offered_each_with_its_own() {
    let server = TestServer::start();
    let (mut setup, a) = setup(&server, 7).await;
    let first = setup.snapshot(&server, "first", None).await;
    let offered = offered_stores;
    assert_eq!(offered(&setup.map), [first.id], "{:?}", setup.map);
    const COARSE: u64 = 4 * CHUNK;
    let coarse = setup
        .snapshot_of_chunks(&server, "coarse", COARSE as u32)
        .await;
    let map = setup.map.clone();
    let cow = map
        .copy_on_write
        .as_ref()
        .unwrap_or_else(|| panic!("no copy-on-write in {map:?}"));
    assert_eq!((cow.generation, cow.chunk_bytes), (coarse.id, CHUNK as u32));
    let sizes: Vec<(u64, u32)> = cow
        .stores
        .iter()
        .map(|s| (s.snapshot_id, s.chunk_bytes))
        .collect();
    assert_eq!(
        sizes,
        [(coarse.id, COARSE as u32), (first.id, CHUNK as u32)],
        "{map:?}"
    );
    // A client's first write to volume chunk 9 (coarse chunk 2): chunk 9 into the fine
    // store, coarse chunk 2 (volume chunks 8 to 11) whole into the coarse one, then the
    // write straight to the origin.
    let paths = server.device_paths().await;
    let range = |offset: u64, length: u64| offset as usize..(offset + length) as usize;
    preserve_as_a_client(&paths, &map, first.id, 9, &a[range(9 * CHUNK, CHUNK)]);
    preserve_as_a_client(&paths, &map, coarse.id, 2, &a[range(2 * COARSE, COARSE)]);
    let fresh = pattern(700, CHUNK as usize);
    write_direct(&paths, &map, 9 * CHUNK, &fresh);
    assert!(read_export(&first).await == a, "first lost chunk 9");
    assert!(read_export(&coarse).await == a, "coarse lost its chunk 2");
    let listed = list(&server).await;
    let changed = |name: &str| {
        listed
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.changed_chunks)
    };
    assert_eq!(changed("first"), Some(1), "{listed:?}");
    assert_eq!(changed("coarse"), Some(1), "{listed:?}");
    // A write through the server to volume chunk 10: coarse chunk 2 is held already, so
    // only the fine store takes a copy.
    setup.write(10 * CHUNK, &pattern(701, 4096)).await;
    let listed = list(&server).await;
    let used: Vec<(String, u64)> = listed
        .iter()
        .map(|s| (s.name.clone(), s.cow_used_bytes))
        .collect();
    assert!(
        used.contains(&("first".into(), 2 * CHUNK)) && used.contains(&("coarse".into(), COARSE)),
        "{used:?}"
    );
    assert!(read_export(&coarse).await == a, "coarse lost its chunk 2");
    // Without the first snapshot, the coarse store alone, and the map's chunk is its.
    let map = setup.delete_snapshot(&server, "first").await;
    assert_eq!(offered(&map), [coarse.id], "{map:?}");
    assert_eq!(
        map.copy_on_write.as_ref().map(|c| c.chunk_bytes),
        Some(COARSE as u32)
    );
    // Two of the same chunk size again: both, the newest first.
    setup.map = map;
    let coarse2 = setup
        .snapshot_of_chunks(&server, "coarse2", COARSE as u32)
        .await;
    assert_eq!(
        offered(&setup.map),
        [coarse2.id, coarse.id],
        "{:?}",
        setup.map
    );
}

#[tokio::test]
async fn a_full_cow_store_invalidates_its_snapshot_only() {
    let server = TestServer::start();
    let (mut setup, a) = setup(&server, 2).await;
    let roomy = setup.snapshot(&server, "roomy", None).await;
    // Room for a few chunks only.
    let small = setup.snapshot(&server, "small", Some(MIB)).await;
    let fresh = pattern(300, (4 * MIB) as usize);
    setup.write(0, &fresh).await;
    let mut b = a.clone();
    b[..(4 * MIB) as usize].copy_from_slice(&fresh);
    assert!(origin(&server).await == b, "origin writes failed");
    let listed = list(&server).await;
    let shown = |name: &str| {
        listed
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} not listed: {listed:?}"))
            .clone()
    };
    assert_eq!(shown("small").state, "invalid");
    assert!(
        shown("small").reason.unwrap_or_default().contains("full"),
        "{listed:?}"
    );
    assert_eq!(shown("roomy").state, "active");
    // The server warned as the small store filled, before it gave up on it.
    let log = server.log();
    for mark in [75, 90, 99] {
        assert!(
            log.contains(&format!("snapshot small: COW store {mark}% used")),
            "no {mark}% warning in the log: {log}"
        );
    }
    assert!(read_export(&roomy).await == a);
    // The invalid one is not exported.
    let refused = NbdClient::connect_unix(Path::new(&small.nbd_socket), &small.export, false).await;
    assert!(refused.is_err(), "an invalid snapshot was exported");
}

#[tokio::test]
async fn a_snapshot_survives_a_crash_in_the_middle_of_copy_on_write() {
    let mut server = TestServer::start();
    let (mut setup, a) = setup(&server, 3).await;
    let snap = setup.snapshot(&server, "snap", None).await;
    // Writes run while the server is killed; whatever was acknowledged or not, the
    // snapshot must still read back as it was taken. Each write is the first to its two
    // chunks; the server dies once 8 of them are acknowledged, with 24 still to come (their
    // 64 chunks fit the store: a full store would invalidate the snapshot instead).
    let map = setup.map.clone();
    let acknowledged = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let progress = acknowledged.clone();
    let writer = tokio::spawn(async move {
        let mut io = setup.io;
        for i in 0..32u64 {
            let data = pattern(400 + i, (2 * CHUNK) as usize);
            let header = sanblk_uapi::frame::RequestHeader {
                op: sanblk_uapi::frame::Op::Write,
                flags: 0,
                handle: i + 1,
                volume_id: map.volume_id,
                epoch: map.epoch,
                offset: i * 2 * CHUNK,
                length: data.len() as u32,
            };
            if io.try_call(&header, &data).await.is_none() {
                break;
            }
            progress.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    while acknowledged.load(std::sync::atomic::Ordering::SeqCst) < 8 && !writer.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    server.kill9();
    let written = acknowledged.load(std::sync::atomic::Ordering::SeqCst);
    assert!(written < 32, "every write finished before the kill");
    let _ = writer.await;
    let restarted = TestServer::start_in(&server.dir);
    let listed = list(&restarted).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].state, "active", "{listed:?}");
    assert!(
        read_export(&snap).await == a,
        "the snapshot lost its point in time"
    );
}

#[tokio::test]
async fn bad_snapshot_requests_are_refused_and_change_nothing() {
    let server = TestServer::start();
    let (mut setup, _) = setup(&server, 4).await;
    setup.snapshot(&server, "one", None).await;
    let epoch = setup.map.epoch;
    let mut admin = server.admin().await;
    let cases: Vec<(SnapshotCreate, ErrorCode)> = vec![
        (create("one", None, None), ErrorCode::AlreadyExists),
        (create("bad name!", None, None), ErrorCode::BadRequest),
        (create("odd", Some(3000), None), ErrorCode::BadRequest),
        (
            create("huge-chunk", Some(2 << 20), None),
            ErrorCode::BadRequest,
        ),
        (create("tiny", None, Some(4096)), ErrorCode::BadRequest),
        (create("enormous", None, Some(1 << 50)), ErrorCode::NoSpace),
        (
            SnapshotCreate {
                volume: "nope".into(),
                ..create("x", None, None)
            },
            ErrorCode::NotFound,
        ),
    ];
    for (request, code) in cases {
        let what = format!("{request:?}");
        let refused = admin.call(request).await;
        assert_eq!(
            refused.err().and_then(|e| e.server_code()),
            Some(code),
            "{what}"
        );
    }
    let refused = admin.call(create("vast", None, Some(1 << 50))).await;
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("for the COW store"), "{message}");
    // A store too small for one chunk says how small it may be.
    let refused = admin.call(create("small", None, Some(100 << 10))).await;
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("at least 128K"), "{message}");
    let refused = admin
        .call(SnapshotDelete {
            volume: "vol".into(),
            name: "missing".into(),
        })
        .await;
    assert_eq!(
        refused.err().and_then(|e| e.server_code()),
        Some(ErrorCode::NotFound)
    );
    let listed = list(&server).await;
    assert_eq!(listed.len(), 1);
    let detail: sanblk_proto::protocol::VolumeDetail = admin
        .call(VolumeShow { name: "vol".into() })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        detail.map.epoch, epoch,
        "a refused request changed the volume"
    );
}

fn create(name: &str, chunk_bytes: Option<u32>, cow_bytes: Option<u64>) -> SnapshotCreate {
    SnapshotCreate {
        volume: "vol".into(),
        name: name.into(),
        chunk_bytes,
        cow_bytes,
    }
}

/// The writable export a restore uses: refused while a client has the volume attached or
/// while it has a snapshot; while it is open, attaches are refused; what it writes lands where
/// the volume's map says.
#[tokio::test]
async fn a_restore_export_excludes_clients_and_writes_the_volume() {
    let server = TestServer::start();
    let (mut setup, _) = setup(&server, 5).await;
    let socket = server.admin_socket.with_file_name("nbd.sock");
    let refused = NbdClient::connect_unix(&socket, "vol", false).await;
    assert!(refused.is_err(), "a writable export of an attached volume");
    setup.detach().await;
    let mut restore = NbdClient::connect_unix(&socket, "vol", false)
        .await
        .unwrap_or_else(|e| panic!("restore export: {e}"));
    assert!(!restore.read_only());
    let secret = server.client("host2").await;
    server.grant("host2", "vol", AccessMode::Rw).await;
    let mut other = server.agent("host2", &secret).await;
    let attach = other.attach("vol", AccessMode::Rw).await;
    assert_eq!(
        attach.err().and_then(|e| e.server_code()),
        Some(ErrorCode::Busy),
        "attached during a restore"
    );
    let image = pattern(500, VOLUME as usize);
    for (index, piece) in image.chunks(MIB as usize).enumerate() {
        restore
            .write(index as u64 * MIB, piece, false)
            .await
            .unwrap_or_else(|e| panic!("restore write: {e}"));
    }
    restore
        .flush()
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    let _ = restore.disconnect().await;
    assert!(
        origin(&server).await == image,
        "restored data not where the map says"
    );
    // Closed: clients may attach again, and a volume with a snapshot is not restored onto.
    let mut attached = None;
    for _ in 0..50 {
        match other.attach("vol", AccessMode::Rw).await {
            Ok(done) => {
                attached = Some(done);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    let attached = attached.unwrap_or_else(|| panic!("no attach after the restore"));
    setup.agent = other;
    setup.map = attached.map;
    setup.snapshot(&server, "kept", None).await;
    setup.detach().await;
    let refused = NbdClient::connect_unix(&socket, "vol", false).await;
    assert!(refused.is_err(), "restored onto a volume with a snapshot");
}

/// Deleting a volume that has snapshots is refused, naming them, and changes nothing;
/// `--force` deletes them with it: their COW stores' space is free again.
#[tokio::test]
async fn deleting_a_volume_frees_its_snapshots() {
    let server = TestServer::start();
    let (mut setup, _) = setup(&server, 6).await;
    let before = server.pool_free_bytes().await;
    setup.snapshot(&server, "one", Some(4 * MIB)).await;
    setup.snapshot(&server, "two", Some(4 * MIB)).await;
    let with_snapshot = server.pool_free_bytes().await;
    assert!(with_snapshot < before, "the COW store took no space");
    setup.detach().await;
    let mut admin = server.admin().await;
    let refused = admin
        .call(sanblk_proto::protocol::VolumeDelete {
            name: "vol".into(),
            force: false,
        })
        .await;
    let error = refused
        .err()
        .unwrap_or_else(|| panic!("deleted with snapshots"));
    assert_eq!(error.server_code(), Some(ErrorCode::Busy), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("one, two") && message.contains("--force"),
        "{message}"
    );
    assert_eq!(server.pool_free_bytes().await, with_snapshot);
    let names: Vec<String> = list(&server).await.into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["one", "two"]);
    let deleted = admin
        .call(sanblk_proto::protocol::VolumeDelete {
            name: "vol".into(),
            force: true,
        })
        .await
        .unwrap_or_else(|e| panic!("volume delete: {e}"));
    assert_eq!(deleted.snapshots_deleted, ["one", "two"]);
    let after = server.pool_free_bytes().await;
    assert_eq!(
        after,
        before + VOLUME,
        "space left allocated after the delete"
    );
    server.create_volume("vol", VOLUME, Layout::Linear).await;
    assert!(
        list(&server).await.is_empty(),
        "the old volume's snapshots came back"
    );
}

/// Where sand stops when started with `SAND_CRASH_AT` (debug builds only).
#[cfg(debug_assertions)]
const CRASH_AT_ENV: &str = "SAND_CRASH_AT";

/// The change's crash points, and whether the change is committed at each.
#[cfg(debug_assertions)]
const CHANGE_CRASH_POINTS: [(&str, bool); 4] = [
    ("change:after-record", false),
    ("change:after-quiesce", false),
    ("change:after-commit", true),
    ("change:after-map-acks", true),
];

/// `snapshot create` or `snapshot delete` of "snap" with sand crashing at `crash_at` in its
/// change, the client's agent answering like the kernel would; then a restart. A committed
/// change is finished (the snapshot taken and reading back its point in time, or deleted
/// and its store's space free), one that was not is rolled back (no snapshot and its space
/// free, or the snapshot as it was): nothing in between, and the next change goes through.
#[cfg(debug_assertions)]
async fn crash_during_snapshot_change(deleting: bool, crash_at: &str, committed: bool) {
    use sanblk_proto::client::Push;
    // Pattern A written, and for a delete the snapshot taken (chunks 0 and 1 preserved by
    // the server since), by a server without the crash point.
    let mut first = TestServer::start();
    let (mut setup, a) = setup(&first, 11).await;
    let free_without = first.pool_free_bytes().await;
    if deleting {
        setup.snapshot(&first, "snap", None).await;
        setup.write(0, &pattern(12, 2 * CHUNK as usize)).await;
    }
    let free_before = first.pool_free_bytes().await;
    let secret = setup.secret.clone();
    drop(setup);
    assert!(first.stop(), "sand did not stop cleanly");

    let mut server = TestServer::start_in_with_env(&first.dir, &[(CRASH_AT_ENV, crash_at)]);
    let mut agent = server.agent("host1", &secret).await;
    agent
        .attach("vol", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("attach: {e}"));
    let mut admin = server.admin().await;
    let change = tokio::spawn(async move {
        if deleting {
            admin
                .call(SnapshotDelete {
                    volume: "vol".into(),
                    name: "snap".into(),
                })
                .await
                .map(|_| ())
        } else {
            admin.call(create("snap", None, None)).await.map(|_| ())
        }
    });
    let answering = tokio::spawn(async move {
        while let Ok(push) = agent.next_push().await {
            let _ = match push {
                Push::Quiesce(q) => agent.quiesce_ack(q.volume_id, q.epoch).await,
                Push::MapUpdate(m) => agent.ack(m.volume_id, m.epoch).await,
                _ => Ok(()),
            };
        }
    });
    common::wait_for_crash(&mut server, crash_at).await;
    let what = format!(
        "{} crashing at {crash_at}",
        if deleting { "delete" } else { "create" }
    );
    assert!(
        matches!(change.await, Ok(Err(_))),
        "{what}: the request was answered as done"
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), answering).await;

    let restarted = TestServer::start_in(&server.dir);
    let listed = list(&restarted).await;
    let present = deleting != committed;
    assert_eq!(listed.len(), usize::from(present), "{what}: {listed:?}");
    if present {
        assert_eq!(listed[0].state, "active", "{what}: {listed:?}");
        assert!(
            read_export(&listed[0]).await == a,
            "{what}: the snapshot lost its point in time"
        );
        let free = restarted.pool_free_bytes().await;
        assert!(free < free_without, "{what}: the COW store lost its space");
        if deleting {
            assert_eq!(free, free_before, "{what}: space changed");
        }
    } else {
        assert_eq!(
            restarted.pool_free_bytes().await,
            free_without,
            "{what}: the COW store's space was not freed"
        );
    }
    // The volume takes changes again: a new snapshot of the name, or a second one.
    let mut agent = restarted.agent("host1", &secret).await;
    let again = agent
        .attach("vol", AccessMode::Rw)
        .await
        .unwrap_or_else(|e| panic!("{what}: attach after the restart: {e}"));
    let next = if present { "snap2" } else { "snap" };
    let mut admin = restarted.admin().await;
    let (created, _) = tokio::join!(
        admin.call(create(next, None, None)),
        follow_change_to_map(&mut agent, again.map.epoch)
    );
    created.unwrap_or_else(|e| panic!("{what}: snapshot create {next} after the restart: {e}"));
    assert_eq!(
        list(&restarted).await.len(),
        usize::from(present) + 1,
        "{what}"
    );
    drop((first, server));
}

#[cfg(debug_assertions)]
#[tokio::test]
async fn a_snapshot_create_interrupted_by_a_crash_is_taken_or_undone() {
    for (crash_at, committed) in CHANGE_CRASH_POINTS {
        crash_during_snapshot_change(false, crash_at, committed).await;
    }
}

#[cfg(debug_assertions)]
#[tokio::test]
async fn a_snapshot_delete_interrupted_by_a_crash_is_done_or_undone() {
    for (crash_at, committed) in CHANGE_CRASH_POINTS {
        crash_during_snapshot_change(true, crash_at, committed).await;
    }
}
