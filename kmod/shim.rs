// SPDX-License-Identifier: GPL-2.0

//! Safe wrappers over the generic-netlink C shim (`sanblk_shim.c`).
//!
//! The kernel's netlink structures are opaque here: Rust only ever holds pointers the kernel
//! handed to a callback, for the duration of that callback.

use core::ffi::{c_int, c_void};
use kernel::ffi::c_char;
use crate::errno::emsgsize;
use kernel::error::{code::*, to_result};
use kernel::prelude::*;
use kernel::str::CStr;

/// Opaque `struct sk_buff`.
#[repr(C)]
pub(crate) struct SkBuff {
    _opaque: [u8; 0],
}

/// Opaque `struct genl_info`.
#[repr(C)]
pub(crate) struct GenlInfo {
    _opaque: [u8; 0],
}

/// Opaque `struct nlattr`.
#[repr(C)]
pub(crate) struct NlAttr {
    _opaque: [u8; 0],
}

extern "C" {
    fn sanblk_genl_register() -> c_int;
    fn sanblk_genl_unregister();
    fn sanblk_genl_cmd(info: *const GenlInfo) -> u8;
    fn sanblk_genl_attr(info: *const GenlInfo, attr_type: c_int) -> *const NlAttr;
    fn sanblk_genl_attr_missing(info: *mut GenlInfo, attr_type: c_int) -> bool;
    fn sanblk_genl_set_err_msg(info: *mut GenlInfo, msg: *const c_char);
    fn sanblk_genlmsg_new(payload: usize) -> *mut SkBuff;
    fn sanblk_genlmsg_put_reply(skb: *mut SkBuff, info: *mut GenlInfo, cmd: u8) -> *mut c_void;
    fn sanblk_genlmsg_end(skb: *mut SkBuff, hdr: *mut c_void);
    fn sanblk_genlmsg_reply(skb: *mut SkBuff, info: *mut GenlInfo) -> c_int;
    fn sanblk_nlmsg_free(skb: *mut SkBuff);
    fn sanblk_genlmsg_put_event(skb: *mut SkBuff, cmd: u8) -> *mut c_void;
    fn sanblk_genlmsg_multicast_events(skb: *mut SkBuff, flags: kernel::bindings::gfp_t) -> c_int;
    fn sanblk_nla_put_u32(skb: *mut SkBuff, attr_type: c_int, value: u32) -> c_int;
    fn sanblk_nla_put_u64(skb: *mut SkBuff, attr_type: c_int, value: u64) -> c_int;
    fn sanblk_nla_put_string(skb: *mut SkBuff, attr_type: c_int, value: *const c_char) -> c_int;
    fn sanblk_nla_nest_start(skb: *mut SkBuff, attr_type: c_int) -> *mut NlAttr;
    fn sanblk_nla_nest_end(skb: *mut SkBuff, start: *mut NlAttr);
    fn sanblk_nla_get_u32(attr: *const NlAttr) -> u32;
    fn sanblk_nla_get_u64(attr: *const NlAttr) -> u64;
    fn sanblk_nla_data(attr: *const NlAttr) -> *const c_void;
    fn sanblk_nla_len(attr: *const NlAttr) -> c_int;
}

/// Registration of the `sanblk` generic-netlink family; unregisters on drop.
pub(crate) struct GenlFamily(());

impl GenlFamily {
    /// Registers the family; its commands are dispatched to `genl::sanblk_nl_doit`.
    pub(crate) fn register() -> Result<Self> {
        // SAFETY: registers the shim's static family; called once from module init.
        to_result(unsafe { sanblk_genl_register() })?;
        Ok(GenlFamily(()))
    }
}

impl Drop for GenlFamily {
    fn drop(&mut self) {
        // SAFETY: the family was registered by `register`. Unregistering waits for running
        // callbacks (they hold genl_mutex), so none runs after this returns.
        unsafe { sanblk_genl_unregister() };
    }
}

/// One netlink request, valid for the duration of the doit callback that received it.
pub(crate) struct Request {
    info: *mut GenlInfo,
}

impl Request {
    /// Wraps the `genl_info` of a doit callback.
    ///
    /// # Safety
    ///
    /// `info` must be the valid `genl_info` passed to the running doit callback, and the
    /// returned value must not outlive that callback.
    pub(crate) unsafe fn new(info: *mut GenlInfo) -> Self {
        Request { info }
    }

    /// Command number from the genl header (not yet validated against the uapi table).
    pub(crate) fn command(&self) -> u8 {
        // SAFETY: `info` is valid for the callback (constructor contract).
        unsafe { sanblk_genl_cmd(self.info) }
    }

    /// Whether `attr_type` is absent; if so, marks it as the missing attribute in the extack.
    pub(crate) fn attr_missing(&self, attr_type: u16) -> bool {
        // SAFETY: `info` is valid; the attribute type is at most ATTR_MAX (uapi table).
        unsafe { sanblk_genl_attr_missing(self.info, attr_type as c_int) }
    }

    /// The attribute, already checked by the kernel against the policy from uapi.
    pub(crate) fn attr(&self, attr_type: u16) -> Option<Attribute<'_>> {
        // SAFETY: `info` is valid; attrs[] has ATTR_MAX + 1 slots and attr_type comes from the
        // uapi table whose largest value is ATTR_MAX.
        let raw = unsafe { sanblk_genl_attr(self.info, attr_type as c_int) };
        if raw.is_null() {
            None
        } else {
            Some(Attribute { raw, _request: core::marker::PhantomData })
        }
    }

    /// Records a human-readable reason in the extack and returns `err` for the reply.
    pub(crate) fn fail(&self, err: Error, msg: &CStr) -> Error {
        // SAFETY: `info` is valid; the shim copies `msg` into the extack's own buffer.
        unsafe { sanblk_genl_set_err_msg(self.info, msg.as_char_ptr()) };
        err
    }

    /// Starts the reply message to this request.
    pub(crate) fn reply(&self, command: u8, payload: usize) -> Result<Reply<'_>> {
        // SAFETY: plain allocation; a null result is handled below.
        let skb = unsafe { sanblk_genlmsg_new(payload) };
        if skb.is_null() {
            return Err(ENOMEM);
        }
        // SAFETY: `skb` is the fresh buffer above and `info` is valid.
        let hdr = unsafe { sanblk_genlmsg_put_reply(skb, self.info, command) };
        let reply = Reply { skb, hdr, request: self };
        if hdr.is_null() {
            return Err(emsgsize());
        }
        Ok(reply)
    }
}

/// A received attribute; borrows the request it came with.
pub(crate) struct Attribute<'a> {
    raw: *const NlAttr,
    _request: core::marker::PhantomData<&'a Request>,
}

impl Attribute<'_> {
    /// Value of an `NLA_U32` attribute (length checked by the policy).
    pub(crate) fn u32(&self) -> u32 {
        // SAFETY: `raw` is a policy-validated attribute of the live request.
        unsafe { sanblk_nla_get_u32(self.raw) }
    }

    /// Value of an `NLA_U64` attribute (length checked by the policy).
    pub(crate) fn u64(&self) -> u64 {
        // SAFETY: `raw` is a policy-validated attribute of the live request.
        unsafe { sanblk_nla_get_u64(self.raw) }
    }

    /// Payload bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `raw` is a live attribute; nla_data/nla_len describe its payload, which stays
        // valid and unmodified while the request (and so this borrow) lives.
        unsafe {
            let len = sanblk_nla_len(self.raw).max(0) as usize;
            core::slice::from_raw_parts(sanblk_nla_data(self.raw).cast::<u8>(), len)
        }
    }
}

/// An open nested attribute of a reply.
pub(crate) struct Nest(*mut NlAttr);

/// A reply being built; freed on drop unless sent.
pub(crate) struct Reply<'a> {
    skb: *mut SkBuff,
    hdr: *mut c_void,
    request: &'a Request,
}

impl Reply<'_> {
    pub(crate) fn put_u32(&mut self, attr_type: u16, value: u32) -> Result {
        // SAFETY: `skb` is owned by this reply and not yet sent.
        to_result(unsafe { sanblk_nla_put_u32(self.skb, attr_type as c_int, value) })
    }

    pub(crate) fn put_u64(&mut self, attr_type: u16, value: u64) -> Result {
        // SAFETY: `skb` is owned by this reply and not yet sent.
        to_result(unsafe { sanblk_nla_put_u64(self.skb, attr_type as c_int, value) })
    }

    pub(crate) fn put_str(&mut self, attr_type: u16, value: &CStr) -> Result {
        // SAFETY: `skb` is owned by this reply; `value` is NUL-terminated and copied.
        to_result(unsafe {
            sanblk_nla_put_string(self.skb, attr_type as c_int, value.as_char_ptr())
        })
    }

    /// Opens a nested attribute; close it with [`Reply::end_nest`].
    pub(crate) fn begin_nest(&mut self, attr_type: u16) -> Result<Nest> {
        // SAFETY: `skb` is owned by this reply and not yet sent.
        let start = unsafe { sanblk_nla_nest_start(self.skb, attr_type as c_int) };
        if start.is_null() {
            return Err(emsgsize());
        }
        Ok(Nest(start))
    }

    pub(crate) fn end_nest(&mut self, nest: Nest) {
        // SAFETY: `nest` was opened on this reply's skb, and nests are closed in order.
        unsafe { sanblk_nla_nest_end(self.skb, nest.0) };
    }

    /// Finalises and unicasts the reply to the requester.
    pub(crate) fn send(self) -> Result {
        let this = core::mem::ManuallyDrop::new(self);
        // SAFETY: `skb`/`hdr` come from `Request::reply`; genlmsg_reply consumes the skb in
        // every case, so it must not be freed again (hence ManuallyDrop).
        unsafe {
            sanblk_genlmsg_end(this.skb, this.hdr);
            to_result(sanblk_genlmsg_reply(this.skb, this.request.info))
        }
    }
}

impl Drop for Reply<'_> {
    fn drop(&mut self) {
        // SAFETY: the skb is still owned by us (not sent).
        unsafe { sanblk_nlmsg_free(self.skb) };
    }
}

/// A multicast notification on the `events` group being built (process context only).
pub(crate) struct Event {
    skb: *mut SkBuff,
    hdr: *mut c_void,
}

impl Event {
    pub(crate) fn new(command: u8, payload: usize) -> Result<Self> {
        // SAFETY: plain allocation (GFP_KERNEL); a null result is handled below.
        let skb = unsafe { sanblk_genlmsg_new(payload) };
        if skb.is_null() {
            return Err(ENOMEM);
        }
        // SAFETY: `skb` is the fresh buffer above.
        let hdr = unsafe { sanblk_genlmsg_put_event(skb, command) };
        let event = Event { skb, hdr };
        if hdr.is_null() {
            return Err(emsgsize());
        }
        Ok(event)
    }

    pub(crate) fn put_u32(&mut self, attr_type: u16, value: u32) -> Result {
        // SAFETY: `skb` is owned by this event and not yet sent.
        to_result(unsafe { sanblk_nla_put_u32(self.skb, attr_type as c_int, value) })
    }

    pub(crate) fn put_u64(&mut self, attr_type: u16, value: u64) -> Result {
        // SAFETY: `skb` is owned by this event and not yet sent.
        to_result(unsafe { sanblk_nla_put_u64(self.skb, attr_type as c_int, value) })
    }

    pub(crate) fn put_str(&mut self, attr_type: u16, value: &CStr) -> Result {
        // SAFETY: `skb` is owned by this event; `value` is NUL-terminated and copied.
        to_result(unsafe { sanblk_nla_put_string(self.skb, attr_type as c_int, value.as_char_ptr()) })
    }

    /// Finalises and multicasts the event; no listener is not an error.
    pub(crate) fn send(self) {
        let this = core::mem::ManuallyDrop::new(self);
        // SAFETY: `skb`/`hdr` come from `new`; genlmsg_multicast consumes the skb in every
        // case (hence ManuallyDrop). Called from process context: GFP_KERNEL is allowed.
        unsafe {
            sanblk_genlmsg_end(this.skb, this.hdr);
            let _ = sanblk_genlmsg_multicast_events(this.skb, kernel::bindings::GFP_KERNEL);
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the skb is still owned by us (not sent).
        unsafe { sanblk_nlmsg_free(self.skb) };
    }
}
