// SPDX-License-Identifier: GPL-2.0

//! One attached volume: its block device `/dev/sanblkN`, its SAN devices and its current map.

use core::ffi::c_void;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use kernel::bindings;
use kernel::{fmt, new_mutex, new_spinlock};
use kernel::prelude::*;
use kernel::str::CString;
use kernel::sync::{Arc, ArcBorrow, Mutex, SpinLock};
use kernel::types::Opaque;

use crate::abi::MAX_TOKEN_BYTES;
use crate::abi_map::{piece_at, Extent, MapView, Piece};
use crate::device::SanDevice;
use crate::remap;
use crate::server::{ServerAddrs, ServerPath, FRONT_PAD};

/// Bytes a disk name may hold (`DISK_NAME_LEN` minus the terminator).
const DISK_NAME_MAX: usize = 31;

/// Reserved bios: one call of submit_bio takes at most one split and MAX_MEMBERS clones.
const BIOSET_RESERVE: u32 = 16;

extern "C" {
    fn sanblk_rcu_read_lock();
    fn sanblk_rcu_read_unlock();
}

const BLK_FEAT_WRITE_CACHE: bindings::blk_features_t = 1 << 0;
const BLK_FEAT_FUA: bindings::blk_features_t = 1 << 1;
const BLK_FEAT_IO_STAT: bindings::blk_features_t = 1 << 4;
const BLK_FEAT_NOWAIT: bindings::blk_features_t = 1 << 7;

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
}

impl MapState {
    /// Validates `raw` completely and keeps a copy.
    pub(crate) fn new(raw: &[u8]) -> core::result::Result<Self, (Error, &'static str)> {
        let view = MapView::parse(raw).map_err(|e| (EINVAL, e.message()))?;
        let header = *view.header();
        let mut bytes = KVec::with_capacity(raw.len(), GFP_KERNEL).map_err(|_| (ENOMEM, "out of memory"))?;
        bytes
            .extend_from_slice(raw, GFP_KERNEL)
            .map_err(|_| (ENOMEM, "out of memory"))?;
        let mut extents =
            KVec::with_capacity(header.extent_count as usize, GFP_KERNEL).map_err(|_| (ENOMEM, "out of memory"))?;
        for index in 0..header.extent_count {
            extents.push(view.extent(index), GFP_KERNEL).map_err(|_| (ENOMEM, "out of memory"))?;
        }
        Ok(MapState { bytes, extents, epoch: header.epoch, size: header.size, slots: KVec::new() })
    }

    /// The first piece of an I/O of `length` bytes at volume `offset` (the submit_bio lookup:
    /// a binary search over the decoded extents); `None` if it starts beyond the volume.
    #[inline]
    pub(crate) fn map(&self, offset: u64, length: u64) -> Option<Piece> {
        piece_at(self.extents.len() as u32, |i| &self.extents[i as usize], self.size, offset, length)
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
        Some(SessionToken { bytes, len: token.len() })
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
pub(crate) struct DeviceSlots {
    slots: [AtomicPtr<SanDevice>; MAX_VOLUME_DEVICES],
}

impl DeviceSlots {
    fn new() -> Self {
        DeviceSlots { slots: [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_VOLUME_DEVICES] }
    }

    pub(crate) fn get(&self, slot: u32) -> Option<&SanDevice> {
        let ptr = self.slots.get(slot as usize)?.load(Ordering::Acquire);
        // SAFETY: a non-null slot points to a device boxed by `insert`, freed only in drop.
        unsafe { ptr.as_ref() }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &SanDevice)> {
        (0..MAX_VOLUME_DEVICES as u32).filter_map(move |i| self.get(i).map(|d| (i, d)))
    }

    pub(crate) fn find_uuid(&self, uuid: &[u8; 16]) -> Option<u32> {
        self.iter().find(|(_, d)| d.uuid == *uuid).map(|(i, _)| i)
    }

    /// Adds a device; callers hold the registry lock.
    pub(crate) fn insert(&self, device: SanDevice) -> Result<u32> {
        let free = (0..MAX_VOLUME_DEVICES).find(|i| self.slots[*i].load(Ordering::Acquire).is_null()).ok_or(ENOSPC)?;
        let boxed = KBox::into_raw(KBox::new(device, GFP_KERNEL)?);
        self.slots[free].store(boxed, Ordering::Release);
        Ok(free as u32)
    }
}

impl Drop for DeviceSlots {
    fn drop(&mut self) {
        for slot in self.slots.iter() {
            let ptr = slot.swap(core::ptr::null_mut(), Ordering::AcqRel);
            if !ptr.is_null() {
                // SAFETY: boxed by `insert`; the volume is gone, so no bio can use it.
                drop(unsafe { KBox::from_raw(ptr) });
            }
        }
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

/// The volume's own pool of split and clone bios (stacked drivers must not share the
/// filesystem pool, or they can deadlock under memory pressure).
struct BioSet(KBox<Opaque<bindings::bio_set>>);

// SAFETY: a bio_set is designed for concurrent allocation from any context; it is only
// initialised (before sharing) and exited (after the last user) by its owner.
unsafe impl Send for BioSet {}
// SAFETY: see `Send`.
unsafe impl Sync for BioSet {}

struct LockClass(Opaque<bindings::lock_class_key>);
// SAFETY: lockdep keys are designed for concurrent use and synchronise internally.
unsafe impl Sync for LockClass {}
static DISK_LOCK_CLASS: LockClass = LockClass(Opaque::uninit());

#[pin_data(PinnedDrop)]
pub(crate) struct Volume {
    pub(crate) id: u64,
    pub(crate) name: CString,
    pub(crate) index: u32,
    pub(crate) read_only: bool,
    /// The current map: one `Arc` reference, read under RCU by submit_bio (no lock, no
    /// reference count on the hot path), replaced under `map_update` then freed after a grace
    /// period.
    map: AtomicPtr<MapState>,
    #[pin]
    map_update: Mutex<()>,
    pub(crate) devices: DeviceSlots,
    #[pin]
    token: SpinLock<SessionToken>,
    /// The second data path: failed direct pieces are re-issued to the server.
    pub(crate) server: ServerPath,
    pub(crate) counters: Counters,
    /// Clones submitted to SAN devices and not yet completed.
    pub(crate) inflight: AtomicU64,
    bioset: BioSet,
    disk: AtomicPtr<bindings::gendisk>,
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
}

impl Volume {
    /// Builds the volume and publishes `/dev/sanblk<index>`.
    pub(crate) fn create(new: NewVolume, major: u32) -> Result<Arc<Volume>> {
        let devices = DeviceSlots::new();
        let mut map = new.map;
        let mut slots = KVec::with_capacity(new.devices.len(), GFP_KERNEL)?;
        for device in new.devices {
            slots.push(devices.insert(device)?, GFP_KERNEL)?;
        }
        map.slots = slots;
        let map = Arc::new(map, GFP_KERNEL)?;
        // SAFETY: an all-zero bio_set is the state bioset_init expects to start from.
        let bioset = KBox::new(Opaque::new(unsafe { core::mem::zeroed::<bindings::bio_set>() }), GFP_KERNEL)?;
        // SAFETY: `bioset` is zeroed, pinned in its box and exited in drop. Clones share the
        // original bio's vectors, so no bvec pool is needed. Every bio gets a server-path
        // context in front of it (front_pad), so redirection never allocates.
        kernel::error::to_result(unsafe { bindings::bioset_init(bioset.get(), BIOSET_RESERVE, FRONT_PAD, 0) })?;
        let volume = Arc::pin_init(
            pin_init!(Volume {
                id: new.id,
                name: new.name,
                index: new.index,
                read_only: new.read_only,
                map: AtomicPtr::new(Arc::into_raw(map).cast_mut()),
                map_update <- new_mutex!((), "sanblk_volume_map_update"),
                devices,
                token <- new_spinlock!(new.token, "sanblk_volume_token"),
                server: ServerPath::new(new.servers),
                counters: Counters::default(),
                inflight: AtomicU64::new(0),
                bioset: BioSet(bioset),
                disk: AtomicPtr::new(core::ptr::null_mut()),
            }),
            GFP_KERNEL,
        )?;
        // SAFETY: the thread is stopped in `remove_disk` (or below), before the volume goes.
        unsafe { volume.server.start(&*volume as *const Volume, new.index)? };
        if let Err(err) = volume.add_disk(major) {
            volume.server.stop();
            return Err(err);
        }
        Ok(volume)
    }

    fn add_disk(self: &Arc<Self>, major: u32) -> Result {
        let map = self.current_map();
        let block_size = map.view().header().block_size;
        // SAFETY: queue_limits is a plain C struct for which zero means "default".
        let mut limits: bindings::queue_limits = unsafe { core::mem::zeroed() };
        limits.logical_block_size = block_size;
        limits.physical_block_size = block_size;
        // I/O statistics on by default, as for any disk (`queue/iostats` switches them off).
        // REQ_NOWAIT bios are taken (io_uring issues inline): submit_bio serves those it can
        // without waiting and refuses the others with BLK_STS_AGAIN.
        limits.features = BLK_FEAT_WRITE_CACHE | BLK_FEAT_FUA | BLK_FEAT_IO_STAT | BLK_FEAT_NOWAIT;
        limits.max_hw_discard_sectors = u32::MAX >> 9;
        // SAFETY: `limits` is initialised; the lock class is a static key.
        let disk = kernel::error::from_err_ptr(unsafe {
            bindings::__blk_alloc_disk(&mut limits, bindings::NUMA_NO_NODE, DISK_LOCK_CLASS.0.get())
        })?;
        let name = CString::try_from_fmt(fmt!("sanblk{}", self.index))?;
        let raw_self = Arc::into_raw(self.clone());
        // SAFETY: `disk` is a fresh, not yet added gendisk owned by us; the name fits
        // (checked against DISK_NAME_MAX); private_data holds one Arc reference released in
        // `remove_disk`.
        unsafe {
            (*disk).major = major as i32;
            (*disk).first_minor = self.index as i32;
            (*disk).minors = 1;
            (*disk).fops = remap::block_ops();
            (*disk).private_data = raw_self as *mut c_void;
            let bytes = name.as_bytes();
            let len = bytes.len().min(DISK_NAME_MAX);
            for (dst, src) in (*disk).disk_name.iter_mut().zip(&bytes[..len]) {
                *dst = *src as _;
            }
            (*disk).disk_name[len] = 0;
            bindings::set_capacity(disk, map.size >> 9);
            if self.read_only {
                bindings::set_disk_ro(disk, true);
            }
        }
        // SAFETY: the disk is fully set up; on failure it was never visible and we release it.
        let ret = unsafe { bindings::device_add_disk(core::ptr::null_mut(), disk, crate::sysfs::disk_groups()) };
        if ret != 0 {
            // SAFETY: undo the reference stored in private_data, then free the unadded disk.
            unsafe {
                drop(Arc::from_raw(raw_self));
                bindings::put_disk(disk);
            }
            return Err(Error::from_errno(ret));
        }
        self.disk.store(disk, Ordering::Release);
        Ok(())
    }

    /// Runs `f` on the current map inside an RCU read section: `f` must not sleep. The hot
    /// path of submit_bio, which copies out what it needs.
    pub(crate) fn with_map<R>(&self, f: impl FnOnce(&MapState) -> R) -> R {
        // SAFETY: one-line wrapper of rcu_read_lock; paired with the unlock below.
        unsafe { sanblk_rcu_read_lock() };
        // SAFETY: the pointer always holds an `Arc` reference (set in `create`); an old map is
        // released only after `synchronize_rcu` in `replace_map`, so it outlives this section.
        let result = f(unsafe { &*self.map.load(Ordering::Acquire) });
        // SAFETY: closes the section opened above.
        unsafe { sanblk_rcu_read_unlock() };
        result
    }

    /// The map new bios are mapped with, as a reference the caller may keep (slow paths).
    pub(crate) fn current_map(&self) -> Arc<MapState> {
        // SAFETY: see `with_map`; the reference taken here is a new one, the published one
        // stays owned by the pointer.
        self.with_map(|map| unsafe { ArcBorrow::from_raw(map as *const MapState).into() })
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
        let map = Arc::new(map, GFP_KERNEL)?;
        let old_size = {
            let _writer = self.map_update.lock();
            let old = self.map.swap(Arc::into_raw(map).cast_mut(), Ordering::AcqRel);
            // Every submit_bio that could still see the old map finishes its read section.
            // SAFETY: process context (netlink), no spinlock held.
            unsafe { bindings::synchronize_rcu() };
            // SAFETY: `old` came from `Arc::into_raw` and no reader can reach it any more.
            let old = unsafe { Arc::from_raw(old) };
            old.size
        };
        let disk = self.disk.load(Ordering::Acquire);
        if new_size != old_size && !disk.is_null() {
            // SAFETY: the disk is live until `remove_disk`, which runs after netlink is done
            // with this volume (both under the registry lock).
            unsafe { bindings::set_capacity_and_notify(disk, new_size >> 9) };
        }
        Ok(())
    }

    /// Removes `/dev/sanblkN`, then waits for every clone in flight to complete.
    pub(crate) fn remove_disk(&self) {
        let disk = self.disk.swap(core::ptr::null_mut(), Ordering::AcqRel);
        if disk.is_null() {
            return;
        }
        // SAFETY: `disk` was added by `add_disk`. del_gendisk stops new bios and waits for
        // submit_bio calls in progress; the clones they issued are drained below.
        unsafe { bindings::del_gendisk(disk) };
        // Pieces queued for an unreachable server fail now; connected ones complete, each
        // bounded by the server path's I/O timeout.
        self.server.close();
        while self.inflight.load(Ordering::Acquire) != 0 {
            // SAFETY: sleeping is fine here: process context, no locks held.
            unsafe { bindings::msleep(5) };
        }
        self.server.stop();
        // The thread may have issued a health probe after the wait above; it is stopped now,
        // so no new one can start.
        while self.inflight.load(Ordering::Acquire) != 0 {
            // SAFETY: as above.
            unsafe { bindings::msleep(5) };
        }
        // SAFETY: no more bios can reach the driver through this disk; release the Arc held
        // in private_data and the disk itself.
        unsafe {
            let raw = (*disk).private_data as *const Volume;
            bindings::put_disk(disk);
            drop(Arc::from_raw(raw));
        }
    }

    /// Whether anyone holds `/dev/sanblkN` open (a mounted filesystem, a running dd, ...).
    pub(crate) fn is_open(&self) -> bool {
        let disk = self.disk.load(Ordering::Acquire);
        if disk.is_null() {
            return false;
        }
        // SAFETY: the disk and its part0 live until `remove_disk`; bd_openers is an atomic_t
        // read without the open mutex, as the C helper disk_openers() does.
        unsafe { core::ptr::read_volatile(&(*(*disk).part0).bd_openers.counter) > 0 }
    }

    pub(crate) fn bioset(&self) -> *mut bindings::bio_set {
        self.bioset.0.get()
    }
}

#[pinned_drop]
impl PinnedDrop for Volume {
    fn drop(self: Pin<&mut Self>) {
        // Normally stopped by `remove_disk` already.
        self.server.stop();
        // SAFETY: the disk is gone and every clone completed (remove_disk ran before the last
        // reference was dropped), so the pool is unused.
        unsafe { bindings::bioset_exit(self.bioset.0.get()) };
        // SAFETY: the published map reference; no reader is left (the disk is gone).
        drop(unsafe { Arc::from_raw(self.map.load(Ordering::Acquire)) });
    }
}
