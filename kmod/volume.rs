// SPDX-License-Identifier: GPL-2.0

//! One attached volume: its block device `/dev/sanblkN`, its SAN devices and its current map.

use core::sync::atomic::AtomicU64;
use kernel::prelude::*;
use kernel::str::CString;
use kernel::sync::{Arc, Mutex, SpinLock};
use kernel::{fmt, new_mutex, new_spinlock};

use crate::abi::MAX_TOKEN_BYTES;
use crate::abi_map::{piece_at, Extent, MapView, Piece, MAX_COW_STORES};
use crate::copied::CopiedChunks;
use crate::copy_queue::CopyQueue;
use crate::cow_store::StoreInfo;
use crate::device::SanDevice;
use crate::ffi::consts::{BLK_FEAT_FUA, BLK_FEAT_IO_STAT, BLK_FEAT_NOWAIT, BLK_FEAT_WRITE_CACHE};
use crate::ffi::disk::{GenDisk, GenDiskBuilder, Operations, Vtable};
use crate::ffi::sync::{InFlight, OnceSlots, RcuArc};
use crate::ffi::sysfs::AttributeGroups;
use crate::hold::Hold;
use crate::piece::PieceBioSet;
use crate::server::path::{ServerAddrs, ServerPath};

/// Reserved bios: one call of submit_bio takes at most one split and MAX_MEMBERS clones.
const BIOSET_RESERVE: u32 = 16;

/// An immutable, validated map of one epoch. A bio is mapped inside one RCU read section
/// (`Volume::with_map`), so it sees exactly one epoch; clones only keep device slots, which
/// are set once per volume and outlive every map.
pub(crate) struct MapState {
    bytes: KVec<u8>,
    /// The extents decoded once, in volume order, so mapping a bio decodes nothing.
    extents: KVec<Extent>,
    pub(crate) epoch: u64,
    pub(crate) size: u64,
    /// For each entry of this map's device table, the volume's device slot.
    pub(crate) slots: KVec<u32>,
    /// Non-zero while the volume has active snapshots (`MapHeader::cow_generation`).
    cow_generation: u64,
    cow_chunk_bytes: u32,
    /// The chunks known copied for those snapshots, shared by the maps of one snapshot set;
    /// `None` with snapshots when the bits could not be had (every write then goes through
    /// the server).
    copied: Option<Arc<CopiedChunks>>,
    /// The stores of the active snapshots, by ascending chunk size, when the map describes them: the
    /// copier preserves chunks into them itself.
    stores: KVec<StoreInfo>,
}

impl MapState {
    /// Validates `raw` completely and keeps a copy.
    pub(crate) fn new(raw: &[u8]) -> core::result::Result<Self, (Error, &'static str)> {
        let view = MapView::parse(raw).map_err(|e| (EINVAL, e.message()))?;
        let header = *view.header();
        let mut bytes =
            KVec::with_capacity(raw.len(), GFP_KERNEL).map_err(|_| (ENOMEM, "out of memory"))?;
        bytes
            .extend_from_slice(raw, GFP_KERNEL)
            .map_err(|_| (ENOMEM, "out of memory"))?;
        let mut extents = KVec::with_capacity(header.extent_count as usize, GFP_KERNEL)
            .map_err(|_| (ENOMEM, "out of memory"))?;
        for index in 0..header.extent_count {
            extents
                .push(view.extent(index), GFP_KERNEL)
                .map_err(|_| (ENOMEM, "out of memory"))?;
        }
        let stores = StoreInfo::all_from_view(&view).map_err(|_| (ENOMEM, "out of memory"))?;
        Ok(MapState {
            bytes,
            extents,
            epoch: header.epoch,
            size: header.size,
            slots: KVec::new(),
            cow_generation: header.cow_generation,
            cow_chunk_bytes: header.cow_chunk_bytes,
            copied: None,
            stores,
        })
    }

    /// Takes over what `previous` knew about copied chunks if it was about the same
    /// snapshots; starts afresh otherwise (a snapshot was taken or dropped, the volume grew).
    fn track_copies(&mut self, previous: Option<&MapState>) {
        if self.cow_generation == 0 {
            return;
        }
        let mut store_ids = [0u64; MAX_COW_STORES as usize];
        let count = self.stores.len().min(store_ids.len());
        for (id, store) in store_ids.iter_mut().zip(self.stores.iter()) {
            *id = store.snapshot_id;
        }
        let store_ids = &store_ids[..count];
        let same = previous.and_then(|p| p.copied.as_ref()).filter(|c| {
            c.tracks(
                self.cow_generation,
                self.cow_chunk_bytes,
                self.size,
                store_ids,
            )
        });
        if let Some(copied) = same {
            self.copied = Some(copied.clone());
            return;
        }
        let fresh = CopiedChunks::new(
            self.cow_generation,
            self.cow_chunk_bytes,
            self.size,
            self.epoch,
            store_ids,
        )
        .and_then(|copied| Ok(Arc::new(copied, GFP_KERNEL)?));
        match fresh {
            Ok(copied) => self.copied = Some(copied),
            Err(err) => pr_warn!(
                "epoch {}: copied chunks not tracked (errno {}): every write goes through the server while snapshots are active\n",
                self.epoch,
                -err.to_errno()
            ),
        }
    }

    /// Whether a write to `[offset, offset + length)` must go through the server, which
    /// copies its chunks to the volume's snapshots first.
    #[inline]
    pub(crate) fn write_needs_copy(&self, offset: u64, length: u64) -> bool {
        self.cow_generation != 0
            && !self
                .copied
                .as_ref()
                .is_some_and(|copied| copied.all_copied(offset, length))
    }

    /// The stores the copier preserves chunks into and the bits it sets, while it may
    /// (`None` once it stopped for this snapshot set, or without stores).
    pub(crate) fn copy_target(&self) -> Option<(&[StoreInfo], &CopiedChunks)> {
        let copied = self.copied.as_deref()?;
        if copied.copying_stopped() || self.stores.is_empty() {
            return None;
        }
        Some((&self.stores, copied))
    }

    /// Whether a write that needs its chunks copied goes to the copier.
    #[inline]
    pub(crate) fn copies_itself(&self) -> bool {
        self.copy_target().is_some()
    }

    pub(crate) fn chunk_bytes(&self) -> u32 {
        self.cow_chunk_bytes
    }

    /// The volume device slot of map device `index` (u32::MAX, an empty slot, if out of
    /// range).
    #[inline]
    pub(crate) fn slot_of(&self, index: u32) -> u32 {
        self.slots.get(index as usize).copied().unwrap_or(u32::MAX)
    }

    /// Records a write the server acknowledged (its chunks are copied), mapped with `epoch`.
    pub(crate) fn note_server_write(&self, offset: u64, length: u64, epoch: u64) {
        if let Some(copied) = &self.copied {
            copied.mark(offset, length, epoch);
        }
    }

    /// The first piece of an I/O of `length` bytes at volume `offset` (the submit_bio lookup:
    /// a binary search over the decoded extents); `None` if it starts beyond the volume.
    #[inline]
    pub(crate) fn map(&self, offset: u64, length: u64) -> Option<Piece> {
        piece_at(
            self.extents.len() as u32,
            |i| &self.extents[i as usize],
            self.size,
            offset,
            length,
        )
    }

    pub(crate) fn view(&self) -> MapView<'_> {
        MapView::assume_valid(&self.bytes)
    }

    /// Whether `other` was built from the same encoded map.
    pub(crate) fn same_bytes(&self, other: &MapState) -> bool {
        self.bytes[..] == other.bytes[..]
    }
}

/// The server path's session token (validated non-empty, at most MAX_TOKEN_BYTES bytes).
#[derive(Clone, Copy)]
pub(crate) struct SessionToken {
    bytes: [u8; MAX_TOKEN_BYTES as usize],
    len: usize,
}

impl SessionToken {
    /// `None` for an empty or oversized token.
    pub(crate) fn new(token: &[u8]) -> Option<Self> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES as usize {
            return None;
        }
        let mut bytes = [0u8; MAX_TOKEN_BYTES as usize];
        bytes[..token.len()].copy_from_slice(token);
        Some(SessionToken {
            bytes,
            len: token.len(),
        })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Most SAN devices one volume uses over its lifetime (maps may move it to new devices).
pub(crate) const MAX_VOLUME_DEVICES: usize = 64;

/// The SAN devices a volume has opened, in set-once slots: the data path and completions
/// read them without locks, and a device stays open until the volume goes away, so a bio
/// mapped with an older epoch can never reach a closed device. Slots are only added by
/// netlink commands, which the registry lock serialises.
pub(crate) struct DeviceSlots(OnceSlots<SanDevice, MAX_VOLUME_DEVICES>);

impl DeviceSlots {
    fn new() -> Self {
        DeviceSlots(OnceSlots::new())
    }

    pub(crate) fn get(&self, slot: u32) -> Option<&SanDevice> {
        self.0.get(slot as usize)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &SanDevice)> {
        (0..MAX_VOLUME_DEVICES as u32).filter_map(move |i| self.get(i).map(|d| (i, d)))
    }

    pub(crate) fn find_uuid(&self, uuid: &[u8; 16]) -> Option<u32> {
        self.iter().find(|(_, d)| d.uuid == *uuid).map(|(i, _)| i)
    }

    /// Adds a device (netlink commands, which the registry lock serialises).
    pub(crate) fn insert(&self, device: SanDevice) -> Result<u32> {
        Ok(self.0.insert(device)? as u32)
    }
}

/// I/O counters reported by STATUS.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) read_ios: AtomicU64,
    pub(crate) write_ios: AtomicU64,
    pub(crate) read_bytes: AtomicU64,
    pub(crate) written_bytes: AtomicU64,
    pub(crate) errors: AtomicU64,
}

#[pin_data(PinnedDrop)]
pub(crate) struct Volume {
    pub(crate) id: u64,
    pub(crate) name: CString,
    pub(crate) index: u32,
    pub(crate) read_only: bool,
    /// The current map, read under RCU by submit_bio (no lock, no reference count on the hot
    /// path), replaced under `map_update`, the old one freed after a grace period.
    map: RcuArc<MapState>,
    #[pin]
    map_update: Mutex<()>,
    pub(crate) devices: DeviceSlots,
    #[pin]
    token: SpinLock<SessionToken>,
    /// The second data path: failed direct pieces are re-issued to the server.
    #[pin]
    pub(crate) server: ServerPath,
    /// Writes waiting for their chunks to be preserved for the snapshot.
    #[pin]
    pub(crate) copies: CopyQueue,
    pub(crate) counters: Counters,
    /// Bios sent to SAN devices, pieces on the server path and health probes not yet done.
    #[pin]
    pub(crate) inflight: InFlight,
    /// Bios held while the volume is quiesced or its lease has lapsed.
    #[pin]
    pub(crate) hold: Hold,
    /// The volume's own pool of split and clone bios (stacked drivers must not share the
    /// filesystem pool, or they can deadlock under memory pressure), each with a server-path
    /// piece in front of it (so redirection never allocates).
    bioset: PieceBioSet,
    #[pin]
    disk: Mutex<Option<GenDisk>>,
}

/// What the layers above a volume give it to come alive: its disk's operations and sysfs
/// attributes, and the body of its server thread (so this module imports none of them).
pub(crate) struct Parts<T: Operations<Data = Volume> + 'static> {
    pub(crate) disk_ops: &'static Vtable<T>,
    pub(crate) disk_attributes: &'static AttributeGroups,
    pub(crate) serve: fn(&Volume),
    /// The body of its copier thread.
    pub(crate) copy: fn(&Volume),
}

/// What CREATE hands over once everything is validated and opened.
pub(crate) struct NewVolume {
    pub(crate) id: u64,
    pub(crate) name: CString,
    pub(crate) index: u32,
    pub(crate) read_only: bool,
    pub(crate) map: MapState,
    pub(crate) devices: KVec<SanDevice>,
    pub(crate) token: SessionToken,
    pub(crate) servers: Option<ServerAddrs>,
    /// When the lease lapses (ktime ns).
    pub(crate) lease_deadline: i64,
    pub(crate) io_timeout_ms: u32,
}

impl Volume {
    /// Builds the volume and publishes `/dev/sanblk<index>`.
    pub(crate) fn create<T: Operations<Data = Volume>>(
        new: NewVolume,
        major: u32,
        parts: &Parts<T>,
    ) -> Result<Arc<Volume>> {
        let devices = DeviceSlots::new();
        let mut map = new.map;
        let mut slots = KVec::with_capacity(new.devices.len(), GFP_KERNEL)?;
        for device in new.devices {
            slots.push(devices.insert(device)?, GFP_KERNEL)?;
        }
        map.slots = slots;
        map.track_copies(None);
        let map = Arc::new(map, GFP_KERNEL)?;
        let bioset = PieceBioSet::new(BIOSET_RESERVE)?;
        let volume = Arc::pin_init(
            pin_init!(Volume {
                id: new.id,
                name: new.name,
                index: new.index,
                read_only: new.read_only,
                map: RcuArc::new(map),
                map_update <- new_mutex!((), "sanblk_volume_map_update"),
                devices,
                token <- new_spinlock!(new.token, "sanblk_volume_token"),
                server <- ServerPath::new(new.servers),
                copies <- CopyQueue::new(),
                counters: Counters::default(),
                inflight <- InFlight::new(),
                hold <- Hold::new(new.lease_deadline, new.io_timeout_ms),
                bioset,
                disk <- new_mutex!(None, "sanblk_volume_disk"),
            }),
            GFP_KERNEL,
        )?;
        volume
            .server
            .start(volume.clone(), parts.serve, new.index)?;
        let started = volume
            .copies
            .start(volume.clone(), parts.copy, new.index)
            .and_then(|()| volume.add_disk(major, parts));
        if let Err(err) = started {
            volume.copies.stop();
            volume.server.stop();
            return Err(err);
        }
        Ok(volume)
    }

    fn add_disk<T: Operations<Data = Volume>>(
        self: &Arc<Self>,
        major: u32,
        parts: &Parts<T>,
    ) -> Result {
        let map = self.current_map();
        let disk = GenDiskBuilder::default()
            .block_size(map.view().header().block_size)
            // I/O statistics on by default, as for any disk (`queue/iostats` switches them
            // off). REQ_NOWAIT bios are taken (io_uring issues inline): submit_bio serves
            // those it can without waiting and refuses the others with BLK_STS_AGAIN.
            .features(BLK_FEAT_WRITE_CACHE | BLK_FEAT_FUA | BLK_FEAT_IO_STAT | BLK_FEAT_NOWAIT)
            .max_discard_sectors(u32::MAX >> 9)
            .capacity_sectors(map.size >> 9)
            .read_only(self.read_only)
            .build(
                fmt!("sanblk{}", self.index),
                major,
                self.index,
                parts.disk_ops,
                parts.disk_attributes,
                self.clone(),
            )?;
        *self.disk.lock() = Some(disk);
        Ok(())
    }

    /// Runs `f` on the current map inside an RCU read section: `f` must not sleep. The hot
    /// path of submit_bio, which copies out what it needs.
    pub(crate) fn with_map<R>(&self, f: impl FnOnce(&MapState) -> R) -> R {
        self.map.read(f)
    }

    /// The map new bios are mapped with, as a reference the caller may keep (slow paths).
    pub(crate) fn current_map(&self) -> Arc<MapState> {
        self.map.get()
    }

    /// The session token the server path authenticates with.
    pub(crate) fn session_token(&self) -> SessionToken {
        *self.token.lock()
    }

    /// Replaces the session token; the server path reconnects with it if it differs.
    pub(crate) fn set_token(&self, token: SessionToken) {
        let changed = {
            let mut current = self.token.lock();
            let changed = current.bytes() != token.bytes();
            *current = token;
            changed
        };
        if changed {
            self.server.token_changed();
        }
    }

    /// Installs a newer epoch atomically with respect to bio mapping.
    pub(crate) fn replace_map(&self, map: MapState) -> Result {
        let new_size = map.size;
        let mut map = map;
        let old_size = {
            let _writer = self.map_update.lock();
            map.track_copies(Some(&self.current_map()));
            let map = Arc::new(map, GFP_KERNEL)?;
            // Returns once every submit_bio that could still see the old map is done with it.
            self.map.replace(map).size
        };
        if new_size != old_size {
            if let Some(disk) = self.disk.lock().as_ref() {
                disk.set_capacity_and_notify(new_size >> 9);
            }
        }
        Ok(())
    }

    /// Removes `/dev/sanblkN`, then waits for everything in flight to complete.
    pub(crate) fn remove_disk(&self) {
        let Some(disk) = self.disk.lock().take() else {
            return;
        };
        // No new bio reaches the volume, and submit_bio calls in progress have returned; what
        // they issued is waited for below, before the disk's reference to us goes.
        // Held bios fail, and so do bios that would be held from now on: nothing may wait
        // for a volume that goes away (del_gendisk below must not wait for a held bio
        // either). Bios a RESUME or RENEW took before this are waited for below, as in-flight
        // I/O.
        self.hold.close();
        let deleted = disk.delete();
        // Pieces queued for an unreachable server fail now; connected ones complete, each
        // bounded by the server path's I/O timeout.
        self.server.close();
        self.inflight.wait_idle();
        self.server.stop();
        // The thread may have issued a health probe after the wait above; it is stopped now,
        // so no new one can start.
        self.inflight.wait_idle();
        // Its queue drained with the in-flight I/O above.
        self.copies.stop();
        drop(deleted);
    }

    /// Whether anyone holds `/dev/sanblkN` open (a mounted filesystem, a running dd, ...).
    pub(crate) fn is_open(&self) -> bool {
        self.disk.lock().as_ref().is_some_and(|disk| disk.is_open())
    }

    pub(crate) fn bioset(&self) -> &PieceBioSet {
        &self.bioset
    }
}

#[pinned_drop]
impl PinnedDrop for Volume {
    fn drop(self: Pin<&mut Self>) {
        // Normally stopped by `remove_disk` already.
        self.copies.stop();
        self.server.stop();
    }
}
