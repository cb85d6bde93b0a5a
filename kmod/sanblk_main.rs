// SPDX-License-Identifier: GPL-2.0

//! sanblk: shared-storage block driver. Exposes volumes described by server-issued maps as
//! block devices and sends their I/O straight to the SAN disks.

use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use kernel::c_str;
use kernel::prelude::*;

#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "../uapi/src/netlink.rs"]
mod abi;
#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "../uapi/src/map.rs"]
mod abi_map;
#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "../uapi/src/frame.rs"]
mod abi_frame;
mod device;
mod errno;
mod genl;
mod health;
mod hook;
mod registry;
mod remap;
mod server;
mod shim;
mod sysfs;
mod volume;

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

/// The registry, owned by the module object; set before netlink is registered and cleared
/// after it is unregistered, so netlink callbacks always see a live registry.
static REGISTRY: AtomicPtr<registry::Registry> = AtomicPtr::new(core::ptr::null_mut());

pub(crate) fn block_major() -> u32 {
    BLOCK_MAJOR.load(Ordering::Relaxed)
}

pub(crate) fn registry() -> &'static registry::Registry {
    // SAFETY: only called from netlink callbacks, which run strictly between REGISTRY being
    // set in init and cleared in drop (netlink registration brackets them).
    unsafe { &*REGISTRY.load(Ordering::Acquire) }
}

/// A dynamically allocated block major; released on drop.
struct BlockMajor(u32);

impl BlockMajor {
    fn register() -> Result<Self> {
        // SAFETY: the name is a static NUL-terminated string; no probe callback.
        let ret = unsafe {
            kernel::bindings::__register_blkdev(0, c_str!("sanblk").as_char_ptr(), None)
        };
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
    // half-torn-down module, then the volumes, then the slab their bios used, then the major.
    genl: Option<shim::GenlFamily>,
    registry: Pin<KBox<registry::Registry>>,
    _hooked_bio_cache: hook::HookedBioCache,
    _major: BlockMajor,
}

impl kernel::Module for SanBlk {
    fn init(module: &'static ThisModule) -> Result<Self> {
        remap::set_owner(module);
        let major = BlockMajor::register()?;
        let hooked_bio_cache = hook::HookedBioCache::create()?;
        BLOCK_MAJOR.store(major.0, Ordering::Relaxed);
        let registry = KBox::pin_init(registry::Registry::new(), GFP_KERNEL)?;
        let registry_ptr = &*registry as *const registry::Registry as *mut registry::Registry;
        REGISTRY.store(registry_ptr, Ordering::Release);
        let genl = match shim::GenlFamily::register() {
            Ok(genl) => genl,
            Err(err) => {
                REGISTRY.store(core::ptr::null_mut(), Ordering::Release);
                return Err(err);
            }
        };
        pr_info!("loaded, block major {}\n", major.0);
        Ok(SanBlk { genl: Some(genl), registry, _hooked_bio_cache: hooked_bio_cache, _major: major })
    }
}

impl Drop for SanBlk {
    fn drop(&mut self) {
        pr_info!("unloading\n");
        // No netlink callback can run after this.
        drop(self.genl.take());
        REGISTRY.store(core::ptr::null_mut(), Ordering::Release);
        let _ = &self.registry;
    }
}
