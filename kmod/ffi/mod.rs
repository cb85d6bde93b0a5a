// SPDX-License-Identifier: GPL-2.0

//! The kernel FFI layer: the only code of the module that calls C or reads C structures.
//!
//! Every type here is a small safe wrapper around raw kernel objects, in the manner of
//! `rust/kernel/block/mq/` (rnull's support code): a [`bio::Bio`] handle that owns one
//! completion of a bio, per-bio contexts that travel with a bio ([`context`]), a disk builder ([`disk::GenDiskBuilder`]), a SAN device file
//! ([`blockdev::BdevFile`]), a kernel TCP connection ([`socket::TcpStream`]), a kernel thread
//! ([`kthread::Kthread`]), wait queues and RCU ([`sync`]), a slab ([`slab::KmemCache`]),
//! static sysfs attributes ([`sysfs`]) and the generic-netlink family ([`genl`]).
//! Constants come from `kernel::bindings` wherever bindgen exports them ([`consts`]).
//!
//! The C shim's functions are declared once, in [`helpers`]; the rest of the module holds
//! almost no `unsafe` of its own.

pub(crate) mod bio;
pub(crate) mod blockdev;
pub(crate) mod consts;
pub(crate) mod context;
pub(crate) mod disk;
pub(crate) mod errno;
pub(crate) mod genl;
mod helpers;
pub(crate) mod kthread;
pub(crate) mod pages;
pub(crate) mod slab;
pub(crate) mod socket;
pub(crate) mod sync;
pub(crate) mod sysfs;
pub(crate) mod time;
