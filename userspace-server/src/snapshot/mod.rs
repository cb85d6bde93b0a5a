//! Snapshots in the running server: each volume's active snapshot stores, the copy-on-write
//! step of a write, and point-in-time reads.
//!
//! While a volume has an active snapshot its map carries copy-on-write tracking, so every
//! host sends its first write to each chunk through the server (later ones go direct once
//! the server acknowledged one), and the server copies the chunk's old content into every
//! active snapshot's store before the chunk's first write (`before_write`). The copy
//! and the check whether a chunk was copied happen under the volume's COW lock, and the copy
//! is recorded before the write reaches the origin. A point-in-time read plans under that
//! lock where each chunk comes from, reads without it (so a backup's long reads hold up no
//! first write), and takes it again to check that no chunk it read from the origin was
//! copied meanwhile; such chunks are read again from the store. Writes to chunks already
//! copied take the lock only to look.
//!
//! A client may also preserve chunks itself, into the stores of a volume's active snapshots
//! (the map's COW store sections, each store in its own snapshot's chunk size), appending
//! records to each store that lacks the chunk without that lock: slot data,
//! then the record, every record durable before its write reaches the origin or the server.
//! The server reads such records back (`CowStore::absorb`) before copying a chunk itself,
//! after reading a point-in-time chunk from the origin (reading it again from the store if a
//! record of it appeared), and before listing changed chunks or counting a store's records
//! (when a later snapshot is taken). A client sends a first write through the server only
//! once it has stopped preserving chunks itself, so the two never append at once.
//!
//! A store that fills up (or fails) invalidates its snapshot, persisted and shown in
//! `snapshot list`; the origin write goes on, and the other snapshots are kept.

pub mod cow;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use log::{info, warn};

use crate::device::{AlignedBuf, DeviceTable};
use crate::store::{SnapshotRecord, SnapshotState, Store, StoreResult};
use cow::{CowStore, PreserveError};
use sanblk_uapi::cow::CowLayout;

/// Reads `buf.len()` bytes of the origin volume at a byte offset (blocking).
pub type OriginReader<'a> = &'a dyn Fn(u64, &mut [u8]) -> io::Result<()>;

/// The active snapshot stores of one volume, loaded for one epoch.
#[derive(Default)]
struct VolumeStores {
    /// The volume epoch the stores were loaded for (0: never).
    epoch: u64,
    stores: Vec<CowStore>,
}

pub struct Snapshots {
    store: Arc<Store>,
    devices: DeviceTable,
    volumes: Mutex<HashMap<u64, Arc<Mutex<VolumeStores>>>>,
    /// Per snapshot id: the chunks clients reported preserved that its records hold (never
    /// more than its store's slots).
    reported: Mutex<HashMap<u64, BTreeSet<u64>>>,
}

impl Snapshots {
    pub fn new(store: Arc<Store>) -> Snapshots {
        Snapshots {
            devices: DeviceTable::new(store.clone()),
            store,
            volumes: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashMap::new()),
        }
    }

    pub fn devices(&self) -> &DeviceTable {
        &self.devices
    }

    fn volume(&self, volume_id: u64) -> Arc<Mutex<VolumeStores>> {
        self.volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(volume_id)
            .or_default()
            .clone()
    }

    /// The volume's stores, loaded for `epoch` (blocking: reads the stores' records when the
    /// epoch changed).
    fn locked<'a>(
        &self,
        volume: &'a Mutex<VolumeStores>,
        volume_id: u64,
        epoch: u64,
    ) -> io::Result<MutexGuard<'a, VolumeStores>> {
        let mut stores = volume.lock().unwrap_or_else(|p| p.into_inner());
        if stores.epoch != epoch {
            let records = self
                .store
                .snapshots_of(volume_id)
                .map_err(io::Error::other)?;
            let mut loaded = Vec::new();
            for record in records
                .into_iter()
                .filter(|s| s.state == SnapshotState::Active)
            {
                let name = record.name.clone();
                let id = record.id;
                match CowStore::load(&self.devices, record) {
                    Ok(store) => loaded.push(store),
                    Err(error) => {
                        self.invalidate(id, &name, &format!("COW store unreadable: {error}"))
                    }
                }
            }
            // What clients reported of this volume's snapshots that are no longer active is
            // of no use any more.
            let active: BTreeSet<u64> = loaded.iter().map(|s| s.snapshot.id).collect();
            let before: BTreeSet<u64> = stores.stores.iter().map(|s| s.snapshot.id).collect();
            self.reported
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|id, _| active.contains(id) || !before.contains(id));
            stores.stores = loaded;
            stores.epoch = epoch;
        }
        Ok(stores)
    }

    fn invalidate(&self, snapshot_id: u64, name: &str, reason: &str) {
        warn!("snapshot {name}: invalid from now on: {reason}");
        if let Err(error) = self.store.invalidate_snapshot(snapshot_id, reason) {
            warn!("snapshot {name}: cannot record it invalid: {error}");
        }
    }

    /// Before a write of `[offset, offset + length)` of volume `volume_id` at `epoch`: copies
    /// each chunk's old content into every active snapshot store that does not hold it yet
    /// (blocking). Nothing to do without active snapshots. Never fails the write: a store
    /// that cannot take the chunk invalidates its snapshot.
    pub fn before_write(
        &self,
        volume_id: u64,
        epoch: u64,
        offset: u64,
        length: u64,
        read_origin: OriginReader<'_>,
    ) -> io::Result<()> {
        let volume = self.volume(volume_id);
        let mut guard = self.locked(&volume, volume_id, epoch)?;
        if guard.stores.is_empty() {
            return Ok(());
        }
        let mut invalidated = Vec::new();
        let stores = &mut guard.stores;
        // Chunk sizes may differ between snapshots: each store walks its own chunks.
        for (index, store) in stores.iter_mut().enumerate() {
            let chunk_bytes = store.chunk_bytes();
            let origin_bytes = store.snapshot.origin_bytes;
            let end = (offset + length).min(origin_bytes);
            if offset >= end {
                continue;
            }
            let mut absorbed = false;
            for chunk in offset / chunk_bytes..end.div_ceil(chunk_bytes) {
                if store.slot_of(chunk).is_some() {
                    continue;
                }
                // The client may have preserved it itself (the map's COW store section):
                // its record is durable before its write reaches the origin or the server.
                if !absorbed {
                    absorbed = true;
                    if let Err(error) = absorb(&self.devices, store) {
                        invalidated.push((index, format!("reading its COW records: {error}")));
                        break;
                    }
                    if store.slot_of(chunk).is_some() {
                        continue;
                    }
                }
                let start = chunk * chunk_bytes;
                let valid = (origin_bytes - start).min(chunk_bytes);
                let mut old = AlignedBuf::zeroed(chunk_bytes as usize)?;
                let copied = match read_origin(start, &mut old[..valid as usize]) {
                    Ok(()) => store
                        .preserve(&self.devices, chunk, &old)
                        .map_err(|e| match e {
                            PreserveError::Full => "its COW store is full".to_string(),
                            PreserveError::Io(error) => format!("COW store I/O: {error}"),
                        }),
                    Err(error) => Err(format!("reading the origin chunk {chunk}: {error}")),
                };
                if let Err(reason) = copied {
                    invalidated.push((index, reason));
                    break;
                }
                warn_fill(store);
            }
        }
        for (index, reason) in invalidated.into_iter().rev() {
            let store = stores.remove(index);
            self.invalidate(store.snapshot.id, &store.snapshot.name, &reason);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of snapshot `snapshot` as it was taken: copied
    /// chunks from its store, the rest from the origin (blocking).
    pub fn read(
        &self,
        snapshot: &SnapshotRecord,
        volume_epoch: u64,
        offset: u64,
        buf: &mut [u8],
        read_origin: OriginReader<'_>,
    ) -> io::Result<()> {
        let volume = self.volume(snapshot.volume_id);
        let chunk_bytes = u64::from(snapshot.chunk_bytes);
        let chunks = offset / chunk_bytes..(offset + buf.len() as u64).div_ceil(chunk_bytes);
        let (mut runs, mut recorded, layout) = {
            let mut guard = self.locked(&volume, snapshot.volume_id, volume_epoch)?;
            let store = store_of(&mut guard, snapshot)?;
            let runs = plan_runs(store, offset, buf.len());
            (runs, store.slots_used(), store.layout())
        };
        // The data is read without the lock, so requests on other connections and the
        // copies of first writes go on meanwhile. Every copy is recorded (in memory by the
        // server, durably by a client) before its write reaches the origin: so a chunk read
        // from the origin that has a record made since the plan may hold new data, and the
        // request is read again, those chunks from the store. A slot's content never changes
        // once recorded. Each pass adds records, and a chunk is recorded once: this ends.
        loop {
            let from_origin = read_runs(
                &self.devices,
                snapshot,
                layout,
                offset,
                &runs,
                buf,
                read_origin,
            )?;
            let mut guard = self.locked(&volume, snapshot.volume_id, volume_epoch)?;
            let store = store_of(&mut guard, snapshot)?;
            if !from_origin {
                return Ok(());
            }
            absorb(&self.devices, store)?;
            let chunks_now_copied = chunks
                .clone()
                .any(|chunk| store.slot_of(chunk).is_some_and(|slot| slot >= recorded));
            if !chunks_now_copied {
                return Ok(());
            }
            runs = plan_runs(store, offset, buf.len());
            recorded = store.slots_used();
        }
    }

    /// Runs `f` on snapshot `snapshot_id`'s store, loaded for `epoch` with every record a
    /// client appended read back; `None` if it is not active (blocking).
    fn with_store<T>(
        &self,
        volume_id: u64,
        epoch: u64,
        snapshot_id: u64,
        f: impl FnOnce(&CowStore) -> T,
    ) -> io::Result<Option<T>> {
        let volume = self.volume(volume_id);
        let mut guard = self.locked(&volume, volume_id, epoch)?;
        let Some(store) = guard
            .stores
            .iter_mut()
            .find(|s| s.snapshot.id == snapshot_id)
        else {
            return Ok(None);
        };
        absorb(&self.devices, store)?;
        Ok(Some(f(store)))
    }

    /// Where a client starts looking for the end of snapshot `snapshot_id`'s records: the
    /// open record sector as last read here (0 when its store is not loaded, or busy: the
    /// client then reads the record area from its start). Never blocks.
    pub fn scan_hint(&self, volume_id: u64, snapshot_id: u64) -> u32 {
        let volume = self.volume(volume_id);
        let Ok(stores) = volume.try_lock() else {
            return 0;
        };
        stores
            .stores
            .iter()
            .find(|s| s.snapshot.id == snapshot_id)
            .map_or(0, CowStore::open_sector)
    }

    /// The chunks copied so far by snapshot `snapshot_id` (written since it was taken), in
    /// ascending order, and the store's slots used and total (blocking).
    pub fn copied_chunks(
        &self,
        volume_id: u64,
        epoch: u64,
        snapshot_id: u64,
    ) -> io::Result<Option<(Vec<u64>, u64, u64)>> {
        self.with_store(volume_id, epoch, snapshot_id, |store| {
            (
                store.chunks(usize::MAX),
                store.slots_used(),
                store.slots_total(),
            )
        })
    }

    /// Checks chunks a client reports it preserved in snapshot `snapshot_id`'s store against
    /// the store's records (read back first) and notes those they hold. Returns the others
    /// (a client that reports a copy it did not make durable); `None` if the snapshot is not
    /// active (blocking).
    pub fn note_preserved(
        &self,
        volume_id: u64,
        epoch: u64,
        snapshot_id: u64,
        chunks: &[u64],
    ) -> io::Result<Option<Vec<u64>>> {
        let checked = self.with_store(volume_id, epoch, snapshot_id, |store| {
            chunks
                .iter()
                .partition::<Vec<u64>, _>(|&&chunk| store.slot_of(chunk).is_some())
        })?;
        Ok(checked.map(|(recorded, unrecorded)| {
            self.reported
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(snapshot_id)
                .or_default()
                .extend(recorded);
            unrecorded
        }))
    }

    /// How many chunks clients reported preserved in snapshot `snapshot_id` since this
    /// server started (each also in its records).
    pub fn reported_chunks(&self, snapshot_id: u64) -> u64 {
        self.reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&snapshot_id)
            .map_or(0, |chunks| chunks.len() as u64)
    }

    /// The chunks of the first `records` records of snapshot `snapshot_id` (those copied
    /// before a later snapshot was taken), ascending; `None` if it is not active (blocking).
    pub fn copied_records(
        &self,
        volume_id: u64,
        epoch: u64,
        snapshot_id: u64,
        records: u64,
    ) -> io::Result<Option<Vec<u64>>> {
        let first = usize::try_from(records).unwrap_or(usize::MAX);
        self.with_store(volume_id, epoch, snapshot_id, |store| store.chunks(first))
    }
}

/// The store of `snapshot` among the volume's loaded ones (it is gone once deleted or
/// invalid, or its volume's epoch moved on).
fn store_of<'a>(
    stores: &'a mut VolumeStores,
    snapshot: &SnapshotRecord,
) -> io::Result<&'a mut CowStore> {
    stores
        .stores
        .iter_mut()
        .find(|s| s.snapshot.id == snapshot.id)
        .ok_or_else(|| io::Error::other(format!("snapshot {} is no longer valid", snapshot.name)))
}

/// Where a point-in-time read of `length` bytes at `offset` finds them: runs of
/// `(buffer offset, length, first slot)`, the slot `None` for the origin. Consecutive chunks
/// from the same place (the origin, or consecutive slots) make one run, read in one go.
fn plan_runs(store: &CowStore, offset: u64, length: usize) -> Vec<(usize, usize, Option<u64>)> {
    let chunk_bytes = store.chunk_bytes();
    let mut runs = Vec::new();
    let mut done = 0usize;
    while done < length {
        let at = offset + done as u64;
        let first_slot = store.slot_of(at / chunk_bytes);
        let mut run = ((chunk_bytes - at % chunk_bytes) as usize).min(length - done);
        while done + run < length {
            let next = (at + run as u64) / chunk_bytes;
            let steps = next - at / chunk_bytes;
            let continues = match (first_slot, store.slot_of(next)) {
                (None, None) => true,
                (Some(first), Some(slot)) => slot == first + steps,
                _ => false,
            };
            if !continues {
                break;
            }
            run = (run + chunk_bytes as usize).min(length - done);
        }
        runs.push((done, run, first_slot));
        done += run;
    }
    runs
}

/// Reads the runs of a plan into `buf` (at `offset` of the volume); whether any byte came
/// from the origin.
fn read_runs(
    devices: &DeviceTable,
    snapshot: &SnapshotRecord,
    layout: CowLayout,
    offset: u64,
    runs: &[(usize, usize, Option<u64>)],
    buf: &mut [u8],
    read_origin: OriginReader<'_>,
) -> io::Result<bool> {
    let chunk_bytes = u64::from(layout.chunk_bytes);
    let mut from_origin = false;
    for &(start, length, slot) in runs {
        let at = offset + start as u64;
        let target = &mut buf[start..start + length];
        match slot {
            Some(slot) => {
                cow::read_slot(devices, snapshot, layout, slot, at % chunk_bytes, target)?
            }
            None => {
                read_origin(at, target)?;
                from_origin = true;
            }
        }
    }
    Ok(from_origin)
}

/// Reads back the records a client appended to `store` itself, warning as the store fills.
fn absorb(devices: &DeviceTable, store: &mut CowStore) -> io::Result<()> {
    store.absorb(devices)?;
    warn_fill(store);
    Ok(())
}

fn warn_fill(store: &mut CowStore) {
    if let Some(mark) = store.crossed_fill_mark() {
        warn!(
            "snapshot {}: COW store {mark}% used ({} of {} chunks); the snapshot becomes invalid when it is full: back it up and delete it, or delete older snapshots",
            store.snapshot.name,
            store.slots_used(),
            store.slots_total()
        );
    }
}

/// Drops the snapshots a crash left pending (at start).
pub fn drop_pending(store: &Store) -> StoreResult<()> {
    for snapshot in store.drop_pending_snapshots()? {
        info!(
            "snapshot {} of volume {}: not taken before the restart; dropped",
            snapshot.name, snapshot.volume_id
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ChangeKind, ChangeRecord, ChangeStep, DeviceRecord, TakenAfter};
    use sanblk_proto::map::Layout;

    const MIB: u64 = 1 << 20;
    const CHUNK: u64 = 64 << 10;

    /// A store on a 16 MiB image file holding a 1 MiB volume and an active snapshot of it.
    fn volume_with_snapshot(name: &str) -> (std::path::PathBuf, Arc<Store>, SnapshotRecord) {
        let dir =
            std::env::temp_dir().join(format!("sand-snapshots-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let image = dir.join("san0.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(16 * MIB))
            .unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(&dir, &dir.join("secrets.redb")).unwrap_or_else(|e| panic!("{e}"));
        store
            .add_device(&DeviceRecord {
                uuid: uuid::Uuid::from_u128(1),
                path: image.display().to_string(),
                size_bytes: 16 * MIB,
                data_start: MIB,
                state: "online".into(),
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let volume = store
            .create_volume("v", MIB, Layout::Linear)
            .unwrap_or_else(|e| panic!("{e}"));
        let pending = store
            .reserve_snapshot(volume.id, "s", CHUNK as u32, 2 * MIB, 1)
            .unwrap_or_else(|e| panic!("{e}"));
        let store = Arc::new(store);
        CowStore::format(&DeviceTable::new(store.clone()), &pending)
            .unwrap_or_else(|e| panic!("{e}"));
        let change = ChangeRecord {
            volume_id: volume.id,
            from_epoch: volume.epoch,
            to_epoch: volume.epoch + 1,
            kind: ChangeKind::SnapshotTake {
                snapshot_id: pending.id,
                created_unix: 1,
                taken: TakenAfter::default(),
            },
            step: ChangeStep::Quiescing,
        };
        store
            .commit_change(&change)
            .unwrap_or_else(|e| panic!("{e}"));
        let snapshot = store
            .snapshot_named(volume.id, "s")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(snapshot.state, SnapshotState::Active);
        (dir, store, snapshot)
    }

    /// Reads the in-memory origin.
    fn read_from(origin: &Mutex<Vec<u8>>, at: u64, target: &mut [u8]) -> io::Result<()> {
        let origin = origin.lock().unwrap_or_else(|p| p.into_inner());
        target.copy_from_slice(&origin[at as usize..at as usize + target.len()]);
        Ok(())
    }

    #[test]
    fn a_first_write_during_a_point_in_time_read_neither_waits_nor_shows() {
        let (dir, store, snapshot) = volume_with_snapshot("racing-write");
        let snapshots = Arc::new(Snapshots::new(store));
        let (volume_id, epoch) = (snapshot.volume_id, snapshot.epoch);
        // The origin, in memory: pattern A everywhere.
        let origin = Arc::new(Mutex::new(vec![0xaa_u8; MIB as usize]));
        // While the snapshot read is reading the origin, a first write to chunk 3 arrives
        // through the server on another thread: its copy is made (into the store), then B
        // reaches the origin, then the read's data comes off the origin, B included.
        let raced = std::sync::atomic::AtomicBool::new(false);
        let read_racing = |at: u64, target: &mut [u8]| {
            if !raced.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let (snapshots, origin) = (snapshots.clone(), origin.clone());
                let (done, written) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let copied =
                        snapshots.before_write(volume_id, epoch, 3 * CHUNK, 4096, &|at, target| {
                            read_from(&origin, at, target)
                        });
                    let start = 3 * CHUNK as usize;
                    origin.lock().unwrap_or_else(|p| p.into_inner())[start..start + 4096]
                        .fill(0xbb);
                    let _ = done.send(copied);
                });
                // Not a speed limit: a write that waits for the read never finishes at all.
                match written.recv_timeout(std::time::Duration::from_secs(30)) {
                    Ok(copied) => copied?,
                    Err(_) => panic!("the first write waited for the snapshot read"),
                }
            }
            read_from(&origin, at, target)
        };
        let mut buf = vec![0u8; (8 * CHUNK) as usize];
        snapshots
            .read(&snapshot, epoch, 0, &mut buf, &read_racing)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(raced.load(std::sync::atomic::Ordering::SeqCst));
        assert!(
            buf.iter().all(|&b| b == 0xaa),
            "the snapshot read showed the write made during it"
        );
        // The origin holds B, and a second read finds chunk 3 in the store.
        assert_eq!(
            origin.lock().map(|o| o[3 * CHUNK as usize]).ok(),
            Some(0xbb)
        );
        let mut again = vec![0u8; (8 * CHUNK) as usize];
        snapshots
            .read(&snapshot, epoch, 0, &mut again, &|at, target| {
                read_from(&origin, at, target)
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(again.iter().all(|&b| b == 0xaa));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
