// SPDX-License-Identifier: GPL-2.0

//! The one `extern "C"` block: the C shim's helpers (`sanblk_shim.c`, one-line wrappers of
//! static inlines, macros and the generic-netlink family, named `rust_helper_*` as in the
//! kernel's `rust/helpers/*.c`), and the few exported kernel symbols that 6.12's bindings do
//! not declare (the kernel build adds `net/genetlink.h` to `bindings_helper.h`, which brings
//! generic netlink and `init_net`, but not `net/sock.h`).

use core::ffi::{c_int, c_uint, c_void};
use kernel::bindings;
use kernel::ffi::c_char;

/// `struct genl_info`, as bindgen lays it out (passed to the shim as `void *`: its layout
/// holds types rustc's FFI lint rejects, as `struct bio`'s does).
pub(crate) type GenlInfo = bindings::genl_info;

extern "C" {
    // The calling task's allocations may not start I/O to reclaim memory.
    pub(crate) fn rust_helper_memalloc_noio_save() -> c_uint;
    // Generic netlink: the family is a static table in the shim (generated from uapi), so
    // the helpers that take a family bind it and drop that argument.
    pub(crate) fn rust_helper_genl_register_family() -> c_int;
    pub(crate) fn rust_helper_genl_unregister_family() -> c_int;
    pub(crate) fn rust_helper_GENL_REQ_ATTR_CHECK(info: *mut c_void, attr_type: c_int) -> bool;
    pub(crate) fn rust_helper_NL_SET_ERR_MSG(info: *mut c_void, msg: *const c_char);
    pub(crate) fn rust_helper_genlmsg_new(
        payload: usize,
        flags: bindings::gfp_t,
    ) -> *mut bindings::sk_buff;
    pub(crate) fn rust_helper_genlmsg_put_reply(
        skb: *mut bindings::sk_buff,
        info: *mut c_void,
        cmd: u8,
    ) -> *mut c_void;
    pub(crate) fn rust_helper_genlmsg_put(
        skb: *mut bindings::sk_buff,
        portid: u32,
        seq: u32,
        flags: c_int,
        cmd: u8,
    ) -> *mut c_void;
    pub(crate) fn rust_helper_genlmsg_end(skb: *mut bindings::sk_buff, hdr: *mut c_void);
    pub(crate) fn rust_helper_genlmsg_reply(
        skb: *mut bindings::sk_buff,
        info: *mut c_void,
    ) -> c_int;
    pub(crate) fn rust_helper_genlmsg_multicast(
        skb: *mut bindings::sk_buff,
        portid: u32,
        group: c_uint,
        flags: bindings::gfp_t,
    ) -> c_int;
    pub(crate) fn rust_helper_nlmsg_free(skb: *mut bindings::sk_buff);
    pub(crate) fn rust_helper_nla_put_u32(
        skb: *mut bindings::sk_buff,
        attr_type: c_int,
        value: u32,
    ) -> c_int;
    pub(crate) fn rust_helper_nla_put_u64_64bit(
        skb: *mut bindings::sk_buff,
        attr_type: c_int,
        value: u64,
        padattr: c_int,
    ) -> c_int;
    pub(crate) fn rust_helper_nla_put_string(
        skb: *mut bindings::sk_buff,
        attr_type: c_int,
        value: *const c_char,
    ) -> c_int;
    pub(crate) fn rust_helper_nla_nest_start(
        skb: *mut bindings::sk_buff,
        attr_type: c_int,
    ) -> *mut bindings::nlattr;
    pub(crate) fn rust_helper_nla_nest_end(
        skb: *mut bindings::sk_buff,
        start: *mut bindings::nlattr,
    ) -> c_int;

    // Block layer static inlines. `struct bio` is passed opaquely: bindgen's layout is not
    // FFI-safe by rustc's lints.
    pub(crate) fn rust_helper_bio_inc_remaining(bio: *mut c_void);
    pub(crate) fn rust_helper_bio_set_dev(bio: *mut c_void, bdev: *mut c_void);

    pub(crate) fn rust_helper_wq_has_sleeper(wq_head: *mut bindings::wait_queue_head) -> bool;

    pub(crate) fn rust_helper_rcu_read_lock();
    pub(crate) fn rust_helper_rcu_read_unlock();

    pub(crate) fn rust_helper_lock_sock(sk: *mut bindings::sock);

    // Exported by the kernel, absent from 6.12's bindings (net/sock.h is not included there).
    // `struct socket` goes opaquely too (its layout drags in types rustc deems not FFI-safe).
    pub(crate) fn release_sock(sk: *mut bindings::sock);
    pub(crate) fn sock_setsockopt(
        sock: *mut c_void,
        level: c_int,
        optname: c_int,
        optval: bindings::sockptr_t,
        optlen: c_uint,
    ) -> c_int;
}
