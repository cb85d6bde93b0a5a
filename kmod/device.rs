// SPDX-License-Identifier: GPL-2.0

//! A SAN device opened by the driver: exclusive while a volume uses it, closed on drop.

use core::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use kernel::page::Page;
use kernel::prelude::*;
use kernel::str::CString;

use crate::abi::DeviceState;
use crate::ffi::blockdev::{BdevFile, BlockDevice};

/// The holder of every exclusive open: the module itself, so volumes of this module may share
/// a SAN device (on different extents) while nobody else can open it exclusively or mount it.
static HOLDER: u8 = 0;

pub(crate) struct SanDevice {
    file: BdevFile,
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

impl SanDevice {
    /// Opens the block device at `path` exclusively.
    pub(crate) fn open(path: CString, uuid: [u8; 16], writable: bool) -> Result<Self> {
        let file = BdevFile::open(&path, writable, &HOLDER)?;
        let probe_page = Page::alloc_page(GFP_KERNEL)?;
        Ok(SanDevice {
            file,
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

    pub(crate) fn bdev(&self) -> &BlockDevice {
        self.file.bdev()
    }

    /// Device size in bytes.
    pub(crate) fn size_bytes(&self) -> u64 {
        self.bdev().size_bytes()
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
        self.state
            .store(DeviceState::Failed as u32, Ordering::Relaxed);
    }

    /// Fail-back (SET_DEVICE_STATE healthy): new bios go direct again; a later failure is
    /// reported again, and probing restarts from scratch.
    pub(crate) fn mark_healthy(&self) {
        self.healed_reported_ns.store(0, Ordering::Relaxed);
        self.failure_reported.store(false, Ordering::Release);
        self.state
            .store(DeviceState::Healthy as u32, Ordering::Release);
    }
}
