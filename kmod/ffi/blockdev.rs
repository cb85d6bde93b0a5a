// SPDX-License-Identifier: GPL-2.0

//! Block devices: a borrowed [`BlockDevice`] (a SAN device or a sanblk disk's part0) and an
//! exclusively opened device file, [`BdevFile`].

use core::ffi::c_void;
use kernel::bindings;
use kernel::error::from_err_ptr;
use kernel::prelude::*;
use kernel::str::CStr;
use kernel::types::Opaque;

use super::consts::{
    Features, ReqOp, BLK_FEAT_IO_STAT, BLK_FEAT_NOWAIT, BLK_OPEN_EXCL, BLK_OPEN_READ,
    BLK_OPEN_WRITE,
};
use super::time::jiffies;

/// A `struct block_device`, borrowed from whoever keeps it alive (an open file, a bio).
#[repr(transparent)]
pub(crate) struct BlockDevice(Opaque<bindings::block_device>);

impl BlockDevice {
    /// # Safety
    ///
    /// `ptr` is a live block device that outlives `'a`.
    pub(crate) unsafe fn from_raw<'a>(ptr: *mut bindings::block_device) -> &'a BlockDevice {
        // SAFETY: `BlockDevice` is a transparent wrapper; liveness is the caller's contract.
        unsafe { &*ptr.cast::<BlockDevice>() }
    }

    pub(crate) fn as_ptr(&self) -> *mut bindings::block_device {
        self.0.get()
    }

    fn features(&self) -> Features {
        // SAFETY: a live block device has a live disk and queue (type invariant).
        unsafe { (*(*(*self.as_ptr()).bd_disk).queue).limits.features }
    }

    /// Size in bytes.
    pub(crate) fn size_bytes(&self) -> u64 {
        // SAFETY: live block device (type invariant).
        unsafe { (*self.as_ptr()).bd_nr_sectors << 9 }
    }

    /// Whether its queue takes REQ_NOWAIT bios.
    pub(crate) fn supports_nowait(&self) -> bool {
        self.features() & BLK_FEAT_NOWAIT != 0
    }

    /// Whether its disk keeps I/O statistics (`queue/iostats`).
    pub(crate) fn io_stat_enabled(&self) -> bool {
        self.features() & BLK_FEAT_IO_STAT != 0
    }

    /// Starts the block-layer statistics of one I/O; the result goes to [`Self::end_io_acct`].
    pub(crate) fn start_io_acct(&self, op: ReqOp) -> usize {
        // SAFETY: live block device.
        unsafe { bindings::bdev_start_io_acct(self.as_ptr(), op, jiffies()) }
    }

    pub(crate) fn end_io_acct(&self, op: ReqOp, sectors: u32, start: usize) {
        // SAFETY: live block device.
        unsafe { bindings::bdev_end_io_acct(self.as_ptr(), op, sectors, start) }
    }

    /// The operations table of the device's disk.
    pub(crate) fn disk_fops(&self) -> *const bindings::block_device_operations {
        // SAFETY: a live block device has a live disk (type invariant).
        unsafe { (*(*self.as_ptr()).bd_disk).fops }
    }

    /// The `private_data` of the device's disk.
    pub(crate) fn disk_private(&self) -> *mut c_void {
        // SAFETY: a live block device has a live disk (type invariant).
        unsafe { (*(*self.as_ptr()).bd_disk).private_data }
    }
}

/// A block device opened by path, exclusively for `holder`; closed on drop.
pub(crate) struct BdevFile {
    file: *mut bindings::file,
    bdev: *mut bindings::block_device,
}

// SAFETY: the file and its block device are kernel objects usable from any thread; this value
// only reads them and closes the file once, in drop.
unsafe impl Send for BdevFile {}
// SAFETY: see `Send`.
unsafe impl Sync for BdevFile {}

impl BdevFile {
    /// Opens `path` for reading (and writing if `writable`), exclusively for `holder`.
    pub(crate) fn open(path: &CStr, writable: bool, holder: &'static u8) -> Result<Self> {
        let mode = BLK_OPEN_READ | BLK_OPEN_EXCL | if writable { BLK_OPEN_WRITE } else { 0 };
        let holder = core::ptr::from_ref(holder).cast_mut().cast::<c_void>();
        // SAFETY: `path` is NUL-terminated; the holder is a static address; no holder ops.
        let file = from_err_ptr(unsafe {
            bindings::bdev_file_open_by_path(path.as_char_ptr(), mode, holder, core::ptr::null())
        })?;
        // SAFETY: `file` was just opened as a block device file.
        let bdev = unsafe { bindings::file_bdev(file) };
        Ok(BdevFile { file, bdev })
    }

    pub(crate) fn bdev(&self) -> &BlockDevice {
        // SAFETY: the block device lives while its file is open (until drop).
        unsafe { BlockDevice::from_raw(self.bdev) }
    }
}

impl Drop for BdevFile {
    fn drop(&mut self) {
        // SAFETY: opened by `open`, closed exactly once here.
        unsafe { bindings::bdev_fput(self.file) };
    }
}
