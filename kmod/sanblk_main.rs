// SPDX-License-Identifier: GPL-2.0

//! sanblk: shared-storage block driver. Exposes volumes described by server-issued maps as
//! block devices and sends their I/O straight to the SAN disks.
//!
//! Layers, lowest first; a module only imports modules of its own layer or below, and no two
//! modules import each other:
//!
//! 0. `abi`, `abi_map`, `abi_cow`, `abi_frame`, `abi_pipeline` (the uapi sources: wire
//!    formats, the map model, the COW store format and the server path's bookkeeping, pure logic unit-tested on the host), and
//!    [`ffi`], the only code that calls C or uses `kernel::bindings`: safe types for bios,
//!    disks, block devices, per-bio contexts (in a bioset's front pad or a hook slab), sockets,
//!    kernel threads, wait queues and RCU, the slab, sysfs attributes, generic netlink and
//!    errnos, over the C helpers in `sanblk_shim.c`.
//! 1. `copied` (the chunks known copied for a volume's snapshots), `cow_store` (where the
//!    snapshots' COW stores lie), `device` (an opened SAN device) and `piece` (the
//!    context of a piece the server path may re-issue, in front of every clone and in every
//!    in-place bio's hook context).
//! 2. `copy_queue` (writes waiting for their chunks to be preserved), `hold` (bios held
//!    while quiesced or the lease lapsed), `hook` (the hook slabs, and
//!    block-layer statistics of cloned bios), `server::path` (the
//!    server path's state in a volume) and `server::wire` (requests on the wire, replies).
//! 3. `volume`: one attached volume (map, devices, disk, server path, in-flight I/O).
//! 4. `remap` (the direct data path: `submit_bio` and completions), `health` (fail-back
//!    probes) and `server::connection` (a connection to the server's I/O service).
//! 5. `server::thread` (the volume's server-path thread), `copier` (the volume's copier
//!    thread), `sysfs` and `registry`.
//! 6. `genl`: the netlink commands, which put volumes together from the layers below.
//! 7. This crate root: module init and exit.

use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use kernel::c_str;
use kernel::prelude::*;

// The uapi crate states its own rust-version; the module is built with the toolchain the
// kernel tree was configured with, newer than the kernel's minimum that clippy assumes.
#[allow(dead_code, unreachable_pub, missing_docs, clippy::incompatible_msrv)]
#[path = "../uapi/src/netlink.rs"]
mod abi;
#[allow(dead_code, unreachable_pub, missing_docs, clippy::incompatible_msrv)]
#[path = "../uapi/src/frame.rs"]
mod abi_frame;
#[allow(dead_code, unreachable_pub, missing_docs, clippy::incompatible_msrv)]
#[path = "../uapi/src/pipeline.rs"]
mod abi_pipeline;
// uapi's modules name each other as in their crate.
use abi_frame as frame;
#[allow(
    dead_code,
    unused_imports,
    unreachable_pub,
    missing_docs,
    clippy::incompatible_msrv
)]
#[path = "../uapi/src/cow.rs"]
mod abi_cow;
#[allow(dead_code, unreachable_pub, missing_docs, clippy::incompatible_msrv)]
#[path = "../uapi/src/map.rs"]
mod abi_map;
use abi_map as map;
mod copied;
mod copier;
mod copy_queue;
mod cow_store;
mod device;
mod ffi;
mod genl;
mod health;
mod hold;
mod hook;
mod piece;
mod registry;
mod remap;
mod server;
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

struct SanBlk {
    // Field order is teardown order: netlink goes first so no command runs against a
    // half-torn-down module, then the volumes, then the slabs their bios used, then the major.
    genl: Option<ffi::genl::GenlFamily>,
    registry: Pin<KBox<registry::Registry>>,
    _hook_caches: hook::HookCaches,
    _major: ffi::disk::Major,
}

impl kernel::Module for SanBlk {
    fn init(module: &'static ThisModule) -> Result<Self> {
        remap::BLOCK_OPS.set_owner(module);
        let major = ffi::disk::Major::register(c_str!("sanblk"))?;
        let hook_caches = hook::HookCaches::create()?;
        BLOCK_MAJOR.store(major.number(), Ordering::Relaxed);
        let registry = KBox::pin_init(registry::Registry::new(), GFP_KERNEL)?;
        let registry_ptr = &*registry as *const registry::Registry as *mut registry::Registry;
        REGISTRY.store(registry_ptr, Ordering::Release);
        let genl = match ffi::genl::GenlFamily::register() {
            Ok(genl) => genl,
            Err(err) => {
                REGISTRY.store(core::ptr::null_mut(), Ordering::Release);
                return Err(err);
            }
        };
        pr_info!("loaded, block major {}\n", major.number());
        Ok(SanBlk {
            genl: Some(genl),
            registry,
            _hook_caches: hook_caches,
            _major: major,
        })
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
