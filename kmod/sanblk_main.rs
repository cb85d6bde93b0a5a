// SPDX-License-Identifier: GPL-2.0

//! sanblk: shared-storage block driver. Exposes volumes described by server-issued maps as
//! block devices and sends their I/O straight to the SAN disks.

use core::sync::atomic::{AtomicU32, Ordering};
use kernel::c_str;
use kernel::prelude::*;
use kernel::str::CStr;

#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "../uapi/src/netlink.rs"]
mod abi;
mod errno;
mod genl;
mod shim;

module! {
    type: SanBlk,
    name: "sanblk",
    author: "sanblk developers",
    description: "sanblk shared-storage block driver",
    license: "GPL",
}

/// Reported by STATUS.
pub(crate) const MODULE_VERSION: &CStr = c_str!("0.1.0");

/// Major number of sanblk block devices, readable from netlink callbacks.
static BLOCK_MAJOR: AtomicU32 = AtomicU32::new(0);

pub(crate) fn block_major() -> u32 {
    BLOCK_MAJOR.load(Ordering::Relaxed)
}

/// A dynamically allocated block major; released on drop.
struct BlockMajor(u32);

impl BlockMajor {
    fn register() -> Result<Self> {
        // SAFETY: the name is a static NUL-terminated string; no probe callback.
        let ret = unsafe { kernel::bindings::__register_blkdev(0, c_str!("sanblk").as_char_ptr(), None) };
        if ret < 0 {
            return Err(Error::from_errno(ret));
        }
        Ok(BlockMajor(ret as u32))
    }
}

impl Drop for BlockMajor {
    fn drop(&mut self) {
        // SAFETY: this major was registered by `register` under the same name.
        unsafe { kernel::bindings::unregister_blkdev(self.0, c_str!("sanblk").as_char_ptr()) };
    }
}

struct SanBlk {
    // Field order is teardown order: netlink goes first so no command runs against a
    // half-torn-down module.
    _genl: shim::GenlFamily,
    _major: BlockMajor,
}

impl kernel::Module for SanBlk {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let major = BlockMajor::register()?;
        BLOCK_MAJOR.store(major.0, Ordering::Relaxed);
        let genl = shim::GenlFamily::register()?;
        pr_info!("loaded, block major {}\n", major.0);
        Ok(SanBlk { _genl: genl, _major: major })
    }
}

impl Drop for SanBlk {
    fn drop(&mut self) {
        pr_info!("unloading\n");
    }
}
