// SPDX-License-Identifier: GPL-2.0

//! A SAN device opened by the driver: exclusive while a volume uses it, closed on drop.

use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use kernel::bindings;
use kernel::error::from_err_ptr;
use kernel::page::Page;
use kernel::prelude::*;
use kernel::str::CString;

use crate::abi::DeviceState;

const BLK_OPEN_READ: bindings::blk_mode_t = 1 << 0;
const BLK_OPEN_WRITE: bindings::blk_mode_t = 1 << 1;
const BLK_OPEN_EXCL: bindings::blk_mode_t = 1 << 2;

/// The holder of every exclusive open: the module itself, so volumes of this module may share
/// a SAN device (on different extents) while nobody else can open it exclusively or mount it.
static HOLDER: u8 = 0;

pub(crate) struct SanDevice {
    file: *mut bindings::file,
    bdev: *mut bindings::block_device,
    pub(crate) path: CString,
    /// UUID the map gives this device.
    pub(crate) uuid: [u8; 16],
    state: AtomicU32,
    errors: AtomicU64,
    /// Whether the failure of this device was multicast (by the volume's server thread).
    pub(crate) failure_reported: AtomicBool,
    /// Health probe of a failed device ([`Probe`] as u32), driven by the server thread.
    pub(crate) probe: AtomicU32,
    /// Destination page of the probe READ (one page, allocated with the device).
    pub(crate) probe_page: Page,
    /// Set when the device is reported failed while a probe is in flight: that probe's
    /// outcome predates the failure and is discarded.
    pub(crate) probe_stale: AtomicBool,
    /// When the last probe was issued (ktime ns; 0: never).
    pub(crate) probe_issued_ns: AtomicI64,
    /// When PATH_HEALED was last multicast for this device (ktime ns; 0: never).
    pub(crate) healed_reported_ns: AtomicI64,
}

/// States of a device's health probe.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Probe {
    /// No probe in flight and no result pending.
    Idle = 0,
    /// A probe READ is in flight (its completion holds an in-flight count of the volume).
    InFlight = 1,
    /// The last probe READ succeeded.
    Succeeded = 2,
}

// SAFETY: `file` and `bdev` are kernel objects usable from any thread; this value only reads
// them (and closes the file once, in drop).
unsafe impl Send for SanDevice {}
// SAFETY: see `Send`; the mutable state is atomic.
unsafe impl Sync for SanDevice {}

impl SanDevice {
    /// Opens the block device at `path` exclusively.
    pub(crate) fn open(path: CString, uuid: [u8; 16], writable: bool) -> Result<Self> {
        let mode = BLK_OPEN_READ | BLK_OPEN_EXCL | if writable { BLK_OPEN_WRITE } else { 0 };
        let holder = core::ptr::addr_of!(HOLDER) as *mut c_void;
        // SAFETY: `path` is NUL-terminated; the holder is a static address; no holder ops.
        let file = from_err_ptr(unsafe {
            bindings::bdev_file_open_by_path(path.as_char_ptr(), mode, holder, core::ptr::null())
        })?;
        let probe_page = match Page::alloc_page(GFP_KERNEL) {
            Ok(page) => page,
            Err(_) => {
                // SAFETY: opened just above, closed once here.
                unsafe { bindings::bdev_fput(file) };
                return Err(ENOMEM);
            }
        };
        // SAFETY: `file` was just opened as a block device file.
        let bdev = unsafe { bindings::file_bdev(file) };
        Ok(SanDevice {
            file,
            bdev,
            path,
            uuid,
            state: AtomicU32::new(DeviceState::Healthy as u32),
            errors: AtomicU64::new(0),
            failure_reported: AtomicBool::new(false),
            probe: AtomicU32::new(Probe::Idle as u32),
            probe_page,
            probe_stale: AtomicBool::new(false),
            probe_issued_ns: AtomicI64::new(0),
            healed_reported_ns: AtomicI64::new(0),
        })
    }

    pub(crate) fn bdev(&self) -> *mut bindings::block_device {
        self.bdev
    }

    /// Device size in bytes.
    pub(crate) fn size_bytes(&self) -> u64 {
        // SAFETY: `bdev` stays valid while the file is open (until drop).
        let sectors = unsafe { (*self.bdev).bd_nr_sectors };
        sectors << 9
    }

    pub(crate) fn state(&self) -> u32 {
        self.state.load(Ordering::Relaxed)
    }

    pub(crate) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Records a failed direct I/O on this device.
    pub(crate) fn note_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.state.store(DeviceState::Failed as u32, Ordering::Relaxed);
    }

    /// Fail-back (SET_DEVICE_STATE healthy): new bios go direct again; a later failure is
    /// reported again, and probing restarts from scratch.
    pub(crate) fn mark_healthy(&self) {
        self.healed_reported_ns.store(0, Ordering::Relaxed);
        self.failure_reported.store(false, Ordering::Release);
        self.state.store(DeviceState::Healthy as u32, Ordering::Release);
    }
}

impl Drop for SanDevice {
    fn drop(&mut self) {
        // SAFETY: the file was opened by `open` and is closed exactly once; the volume has
        // drained its I/O before dropping its devices.
        unsafe { bindings::bdev_fput(self.file) };
    }
}
