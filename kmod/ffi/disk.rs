// SPDX-License-Identifier: GPL-2.0

//! Bio-based disks, in the manner of `rust/kernel/block/mq/gen_disk.rs`: a builder for the
//! queue limits and geometry, a typed operations table, and the disk's data (an `Arc`) kept
//! in `private_data` until the disk is released.

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::marker::PhantomData;
use kernel::bindings;
use kernel::prelude::*;
use kernel::str::CString;
use kernel::sync::{Arc, ArcBorrow};
use kernel::types::Opaque;
use kernel::ThisModule;

use super::bio::Bio;
use super::blockdev::BlockDevice;
use super::consts::Features;
use super::sysfs::AttributeGroups;

/// What a disk does with its bios.
pub(crate) trait Operations {
    /// What every bio of the disk is handed with (the disk holds an `Arc` of it).
    type Data: Send + Sync;

    /// Called for each bio submitted to the disk; may not block beyond mempool allocations.
    fn submit_bio(data: &Self::Data, bio: Bio);
}

/// The data of the disk `bdev` belongs to: the one place a block device is chased to the
/// module's own data.
///
/// # Safety
///
/// `bdev` belongs to a disk built by [`GenDiskBuilder::build`] with `T`, which lives (holds
/// its data) for `'a`.
pub(crate) unsafe fn data_of<'a, T: Operations>(bdev: &BlockDevice) -> &'a T::Data {
    // SAFETY: `build` stored an `Arc<T::Data>` reference in private_data, released only after
    // the disk is deleted (contract).
    unsafe { &*bdev.disk_private().cast::<T::Data>() }
}

/// The data of the disk `bio` is addressed to, if that disk was built with `vtable`: a disk's
/// data outlives its bios, since the owner of a [`GenDisk`] drains them before it drops the
/// [`DeletedDisk`] that releases the data.
pub(crate) fn data_of_bio<'a, T: Operations>(
    bio: &'a Bio,
    vtable: &'static Vtable<T>,
) -> Option<&'a T::Data> {
    let bdev = bio.bdev();
    if bdev.disk_fops() != vtable.ops.get().cast_const() {
        return None;
    }
    // SAFETY: a disk with this table was built with `T` (see above for the lifetime).
    Some(unsafe { data_of::<T>(bdev) })
}

/// A reference of the data of the disk `bio` is addressed to (see [`data_of_bio`]), for a
/// caller that hands the bio on while it still needs the data.
pub(crate) fn data_arc_of_bio<T: Operations>(
    bio: &Bio,
    vtable: &'static Vtable<T>,
) -> Option<Arc<T::Data>> {
    let data = data_of_bio(bio, vtable)?;
    // SAFETY: the disk holds an `Arc` reference of its data (stored by `build`), live for as
    // long as the borrow above; one more is taken from it.
    Some(unsafe { ArcBorrow::from_raw(data) }.into())
}

/// # Safety
///
/// Called by the block layer with a bio submitted to a disk of this table.
unsafe extern "C" fn submit_bio_callback<T: Operations>(bio: *mut bindings::bio) {
    // SAFETY: the block layer hands a live bio and its completion; it is addressed to a disk
    // of this table, so to a disk built with `T` that lives while it has bios.
    let bio = unsafe { Bio::from_raw(bio) };
    // SAFETY: as above.
    let data = unsafe { data_of::<T>(bio.bdev()) };
    T::submit_bio(data, bio);
}

/// The `block_device_operations` of disks built with `T`; a static, since open disks keep
/// pointing at it. [`Vtable::set_owner`] makes open disks pin the module.
pub(crate) struct Vtable<T: Operations> {
    ops: UnsafeCell<bindings::block_device_operations>,
    _t: PhantomData<T>,
}

// SAFETY: written once in module init (`set_owner`), before any disk exists; only read after.
unsafe impl<T: Operations> Sync for Vtable<T> {}

impl<T: Operations> Vtable<T> {
    pub(crate) const fn new() -> Self {
        Vtable {
            ops: UnsafeCell::new(bindings::block_device_operations {
                submit_bio: Some(submit_bio_callback::<T>),
                // SAFETY: all other members are optional callbacks or pointers: zero is none.
                ..unsafe { core::mem::zeroed() }
            }),
            _t: PhantomData,
        }
    }

    /// Call once from module init, before any disk of this table is built.
    pub(crate) fn set_owner(&self, module: &'static ThisModule) {
        // SAFETY: no disk exists yet, so nothing reads the table concurrently (see above).
        unsafe { (*self.ops.get()).owner = module.as_ptr() };
    }
}

/// Limits and geometry of a disk to build.
#[derive(Default)]
pub(crate) struct GenDiskBuilder {
    block_size: u32,
    features: Features,
    max_discard_sectors: u32,
    capacity_sectors: u64,
    read_only: bool,
}

/// Bytes a disk name may hold (`DISK_NAME_LEN` minus the terminator).
const DISK_NAME_MAX: usize = 31;

struct LockClass(Opaque<bindings::lock_class_key>);
// SAFETY: lockdep keys are designed for concurrent use and synchronise internally.
unsafe impl Sync for LockClass {}
static DISK_LOCK_CLASS: LockClass = LockClass(Opaque::uninit());

impl GenDiskBuilder {
    /// Logical and physical block size.
    pub(crate) fn block_size(mut self, bytes: u32) -> Self {
        self.block_size = bytes;
        self
    }

    pub(crate) fn features(mut self, features: Features) -> Self {
        self.features = features;
        self
    }

    pub(crate) fn max_discard_sectors(mut self, sectors: u32) -> Self {
        self.max_discard_sectors = sectors;
        self
    }

    pub(crate) fn capacity_sectors(mut self, sectors: u64) -> Self {
        self.capacity_sectors = sectors;
        self
    }

    pub(crate) fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Allocates the disk `name` (major, minor), hands it `data`, and adds it with the
    /// sysfs attribute `groups`.
    pub(crate) fn build<T: Operations>(
        self,
        name: core::fmt::Arguments<'_>,
        major: u32,
        minor: u32,
        vtable: &'static Vtable<T>,
        groups: &'static AttributeGroups,
        data: Arc<T::Data>,
    ) -> Result<GenDisk> {
        let name = CString::try_from_fmt(name)?;
        // SAFETY: queue_limits is a plain C struct for which zero means "default".
        let mut limits: bindings::queue_limits = unsafe { core::mem::zeroed() };
        limits.logical_block_size = self.block_size;
        limits.physical_block_size = self.block_size;
        limits.features = self.features;
        limits.max_hw_discard_sectors = self.max_discard_sectors;
        // SAFETY: `limits` is initialised; the lock class is a static key.
        let disk = kernel::error::from_err_ptr(unsafe {
            bindings::__blk_alloc_disk(&mut limits, bindings::NUMA_NO_NODE, DISK_LOCK_CLASS.0.get())
        })?;
        let private = Arc::into_raw(data).cast_mut().cast::<c_void>();
        // SAFETY: `disk` is a fresh gendisk, not yet added, ours; the name is cut to fit.
        unsafe {
            (*disk).major = major as i32;
            (*disk).first_minor = minor as i32;
            (*disk).minors = 1;
            (*disk).fops = vtable.ops.get();
            (*disk).private_data = private;
            let bytes = name.as_bytes();
            let len = bytes.len().min(DISK_NAME_MAX);
            for (dst, src) in (*disk).disk_name.iter_mut().zip(&bytes[..len]) {
                *dst = *src as _;
            }
            (*disk).disk_name[len] = 0;
            bindings::set_capacity(disk, self.capacity_sectors);
            if self.read_only {
                bindings::set_disk_ro(disk, true);
            }
        }
        let mut disk = GenDisk {
            disk,
            release: release_data::<T>,
            added: false,
        };
        // SAFETY: the disk is fully set up; the groups are static.
        let ret =
            unsafe { bindings::device_add_disk(core::ptr::null_mut(), disk.disk, groups.as_ptr()) };
        if ret != 0 {
            // Never visible: dropping `disk` frees it and its data reference.
            return Err(Error::from_errno(ret));
        }
        disk.added = true;
        Ok(disk)
    }
}

/// Releases the `Arc` reference `build` stored in private_data.
///
/// # Safety
///
/// `private` came from `build::<T>` and is released once.
unsafe fn release_data<T: Operations>(private: *mut c_void) {
    // SAFETY: see the function's contract.
    drop(unsafe { Arc::from_raw(private.cast::<T::Data>().cast_const()) });
}

/// A disk built by [`GenDiskBuilder`]; deleted (if added) and freed on drop, which first
/// waits for `submit_bio` calls in progress: bios they issued may still be in flight, so the
/// owner drains those before dropping it (see [`GenDisk::delete`]).
pub(crate) struct GenDisk {
    disk: *mut bindings::gendisk,
    release: unsafe fn(*mut c_void),
    added: bool,
}

// SAFETY: a gendisk is usable from any thread; `&GenDisk` only reads it or calls functions that
// lock internally.
unsafe impl Send for GenDisk {}
// SAFETY: see `Send`.
unsafe impl Sync for GenDisk {}

impl GenDisk {
    /// Sets the capacity and tells userspace (a uevent) if it changed.
    pub(crate) fn set_capacity_and_notify(&self, sectors: u64) {
        // SAFETY: a live disk.
        unsafe { bindings::set_capacity_and_notify(self.disk, sectors) };
    }

    /// Whether anyone holds the disk open (a mounted filesystem, a running dd, ...).
    pub(crate) fn is_open(&self) -> bool {
        // SAFETY: the disk and its part0 live until drop; bd_openers is an atomic_t read
        // without the open mutex, as the C helper disk_openers() does.
        unsafe { core::ptr::read_volatile(&(*(*self.disk).part0).bd_openers.counter) > 0 }
    }

    /// Removes the disk from the system: no new bio reaches it, and `submit_bio` calls in
    /// progress have returned. The disk's data stays held until the result is dropped, which
    /// its owner does once the bios those calls issued have completed.
    pub(crate) fn delete(self) -> DeletedDisk {
        let this = core::mem::ManuallyDrop::new(self);
        if this.added {
            // SAFETY: added by `build`, deleted once (the value is consumed).
            unsafe { bindings::del_gendisk(this.disk) };
        }
        DeletedDisk {
            disk: this.disk,
            release: this.release,
        }
    }
}

impl Drop for GenDisk {
    fn drop(&mut self) {
        if self.added {
            // SAFETY: added by `build` and not deleted (`delete` consumes the value).
            unsafe { bindings::del_gendisk(self.disk) };
        }
        drop(DeletedDisk {
            disk: self.disk,
            release: self.release,
        });
    }
}

/// A deleted disk whose memory and data are released on drop.
pub(crate) struct DeletedDisk {
    disk: *mut bindings::gendisk,
    release: unsafe fn(*mut c_void),
}

impl Drop for DeletedDisk {
    fn drop(&mut self) {
        // SAFETY: the disk is deleted (or was never added), so no bio can reach it; its
        // private_data holds the reference `build` stored, released once here.
        unsafe {
            let private = (*self.disk).private_data;
            bindings::put_disk(self.disk);
            (self.release)(private);
        }
    }
}

/// A dynamically allocated block major; released on drop.
pub(crate) struct Major {
    number: u32,
    name: &'static kernel::str::CStr,
}

impl Major {
    pub(crate) fn register(name: &'static kernel::str::CStr) -> Result<Self> {
        // SAFETY: the name is a static NUL-terminated string; no probe callback.
        let ret = unsafe { bindings::__register_blkdev(0, name.as_char_ptr(), None) };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        Ok(Major {
            number: ret as u32,
            name,
        })
    }

    pub(crate) fn number(&self) -> u32 {
        self.number
    }
}

impl Drop for Major {
    fn drop(&mut self) {
        // SAFETY: registered by `register` under the same name.
        unsafe { bindings::unregister_blkdev(self.number, self.name.as_char_ptr()) };
    }
}
