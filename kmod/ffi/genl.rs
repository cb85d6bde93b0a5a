// SPDX-License-Identifier: GPL-2.0

//! The generic-netlink family: registration, requests, replies and events (safe wrappers
//! over the shim's generic-netlink helpers).
//!
//! The kernel's netlink structures are opaque here: Rust only ever holds pointers the kernel
//! handed to a callback, for the duration of that callback.

use core::ffi::{c_int, c_void};
use kernel::bindings;
use kernel::error::{code::*, to_result};
use kernel::prelude::*;
use kernel::str::CStr;

pub(crate) use super::helpers::GenlInfo;
use super::helpers::*;
use crate::abi::Attr;
use crate::ffi::errno::emsgsize;

/// `struct sk_buff` as bindgen declares it (opaque).
pub(crate) type SkBuff = bindings::sk_buff;

/// Netlink attribute header length (`NLA_HDRLEN`: the aligned `struct nlattr`).
const NLA_HDRLEN: usize = (core::mem::size_of::<bindings::nlattr>() + 3) & !3;

/// Registration of the `sanblk` generic-netlink family; unregisters on drop.
pub(crate) struct GenlFamily(());

impl GenlFamily {
    /// Registers the family; its commands are dispatched to `genl::sanblk_nl_doit`.
    pub(crate) fn register() -> Result<Self> {
        // SAFETY: registers the shim's static family; called once from module init.
        to_result(unsafe { rust_helper_genl_register_family() })?;
        Ok(GenlFamily(()))
    }
}

impl Drop for GenlFamily {
    fn drop(&mut self) {
        // SAFETY: the family was registered by `register`. Unregistering waits for running
        // callbacks (they hold genl_mutex), so none runs after this returns.
        unsafe { rust_helper_genl_unregister_family() };
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
        // SAFETY: `info` is valid for the callback (constructor contract), with its header.
        unsafe { (*(*self.info).genlhdr).cmd }
    }

    /// Whether `attr_type` is absent; if so, marks it as the missing attribute in the extack.
    pub(crate) fn attr_missing(&self, attr_type: u16) -> bool {
        // SAFETY: `info` is valid; the attribute type is at most ATTR_MAX (uapi table).
        unsafe { rust_helper_GENL_REQ_ATTR_CHECK(self.info.cast(), attr_type as c_int) }
    }

    /// The attribute, already checked by the kernel against the policy from uapi.
    pub(crate) fn attr(&self, attr_type: u16) -> Option<Attribute<'_>> {
        // SAFETY: `info` is valid; attrs[] has ATTR_MAX + 1 slots and attr_type comes from the
        // uapi table whose largest value is ATTR_MAX.
        let raw = unsafe { *(*self.info).attrs.add(usize::from(attr_type)) }.cast_const();
        if raw.is_null() {
            None
        } else {
            Some(Attribute {
                raw,
                _request: core::marker::PhantomData,
            })
        }
    }

    /// Records a human-readable reason in the extack and returns `err` for the reply.
    pub(crate) fn fail(&self, err: Error, msg: &CStr) -> Error {
        // SAFETY: `info` is valid; the shim copies `msg` into the extack's own buffer.
        unsafe { rust_helper_NL_SET_ERR_MSG(self.info.cast(), msg.as_char_ptr()) };
        err
    }

    /// Starts the reply message to this request.
    pub(crate) fn reply(&self, command: u8, payload: usize) -> Result<Reply<'_>> {
        let mut msg = Message::alloc(payload)?;
        // SAFETY: `msg.skb` is a fresh buffer and `info` is valid.
        msg.hdr = unsafe { rust_helper_genlmsg_put_reply(msg.skb, self.info.cast(), command) };
        if msg.hdr.is_null() {
            return Err(emsgsize());
        }
        Ok(Reply { msg, request: self })
    }
}

/// A received attribute; borrows the request it came with.
pub(crate) struct Attribute<'a> {
    raw: *const bindings::nlattr,
    _request: core::marker::PhantomData<&'a Request>,
}

impl Attribute<'_> {
    /// Payload bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `raw` is a live, policy-validated attribute of the request: `nla_len` bytes
        // from its header, which stay valid and unmodified while the request (and so this
        // borrow) lives; the payload follows the aligned header (`nla_data`, `nla_len`).
        unsafe {
            let len = usize::from((*self.raw).nla_len).saturating_sub(NLA_HDRLEN);
            core::slice::from_raw_parts(self.raw.cast::<u8>().add(NLA_HDRLEN), len)
        }
    }

    /// Value of an `NLA_U32` attribute (length checked by the policy).
    pub(crate) fn u32(&self) -> u32 {
        let mut raw = [0u8; 4];
        raw.copy_from_slice(&self.bytes()[..4]);
        u32::from_ne_bytes(raw)
    }

    /// Value of an `NLA_U64` attribute (length checked by the policy).
    pub(crate) fn u64(&self) -> u64 {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&self.bytes()[..8]);
        u64::from_ne_bytes(raw)
    }
}

/// An open nested attribute of a reply.
pub(crate) struct Nest(*mut bindings::nlattr);

/// A generic-netlink message being built; freed on drop unless sent.
pub(crate) struct Message {
    skb: *mut SkBuff,
    hdr: *mut c_void,
}

impl Message {
    fn alloc(payload: usize) -> Result<Self> {
        // SAFETY: a plain allocation (GFP_KERNEL: netlink callbacks and the server thread run
        // in process context); a null result is handled below.
        let skb = unsafe { rust_helper_genlmsg_new(payload, bindings::GFP_KERNEL) };
        if skb.is_null() {
            return Err(ENOMEM);
        }
        Ok(Message {
            skb,
            hdr: core::ptr::null_mut(),
        })
    }

    pub(crate) fn put_u32(&mut self, attr_type: u16, value: u32) -> Result {
        // SAFETY: `skb` is owned by this message and not yet sent.
        to_result(unsafe { rust_helper_nla_put_u32(self.skb, attr_type as c_int, value) })
    }

    pub(crate) fn put_u64(&mut self, attr_type: u16, value: u64) -> Result {
        // SAFETY: `skb` is owned by this message and not yet sent.
        to_result(unsafe {
            rust_helper_nla_put_u64_64bit(self.skb, attr_type as c_int, value, Attr::Pad as c_int)
        })
    }

    pub(crate) fn put_str(&mut self, attr_type: u16, value: &CStr) -> Result {
        // SAFETY: `skb` is owned by this message; `value` is NUL-terminated and copied.
        to_result(unsafe {
            rust_helper_nla_put_string(self.skb, attr_type as c_int, value.as_char_ptr())
        })
    }

    pub(crate) fn put_bytes(&mut self, attr_type: u16, value: &[u8]) -> Result {
        let length = c_int::try_from(value.len()).map_err(|_| emsgsize())?;
        // SAFETY: `skb` is owned by this message and not yet sent; `value` is valid for
        // `length` bytes, which nla_put copies.
        to_result(unsafe {
            bindings::nla_put(self.skb, attr_type as c_int, length, value.as_ptr().cast())
        })
    }

    /// Opens a nested attribute; close it with [`Message::end_nest`].
    pub(crate) fn begin_nest(&mut self, attr_type: u16) -> Result<Nest> {
        // SAFETY: `skb` is owned by this message and not yet sent.
        let start = unsafe { rust_helper_nla_nest_start(self.skb, attr_type as c_int) };
        if start.is_null() {
            return Err(emsgsize());
        }
        Ok(Nest(start))
    }

    pub(crate) fn end_nest(&mut self, nest: Nest) {
        // SAFETY: `nest` was opened on this message's skb, and nests are closed in order.
        unsafe { rust_helper_nla_nest_end(self.skb, nest.0) };
    }

    /// Finalises the message and hands its skb over to be sent (which consumes it).
    fn finish(self) -> *mut SkBuff {
        let this = core::mem::ManuallyDrop::new(self);
        // SAFETY: `skb`/`hdr` are this message's, the header put by its constructor.
        unsafe { rust_helper_genlmsg_end(this.skb, this.hdr) };
        this.skb
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        // SAFETY: the skb is still owned by us (not sent).
        unsafe { rust_helper_nlmsg_free(self.skb) };
    }
}

/// A reply being built (see [`Message`]).
pub(crate) struct Reply<'a> {
    msg: Message,
    request: &'a Request,
}

impl core::ops::Deref for Reply<'_> {
    type Target = Message;

    fn deref(&self) -> &Message {
        &self.msg
    }
}

impl core::ops::DerefMut for Reply<'_> {
    fn deref_mut(&mut self) -> &mut Message {
        &mut self.msg
    }
}

impl Reply<'_> {
    /// Finalises and unicasts the reply to the requester.
    pub(crate) fn send(self) -> Result {
        let info = self.request.info;
        let skb = self.msg.finish();
        // SAFETY: a finished message; genlmsg_reply consumes the skb in every case.
        to_result(unsafe { rust_helper_genlmsg_reply(skb, info.cast()) })
    }
}

/// A multicast notification on the `events` group being built (process context only).
pub(crate) struct Event(Message);

impl core::ops::Deref for Event {
    type Target = Message;

    fn deref(&self) -> &Message {
        &self.0
    }
}

impl core::ops::DerefMut for Event {
    fn deref_mut(&mut self) -> &mut Message {
        &mut self.0
    }
}

impl Event {
    pub(crate) fn new(command: u8, payload: usize) -> Result<Self> {
        let mut msg = Message::alloc(payload)?;
        // SAFETY: `msg.skb` is a fresh buffer.
        msg.hdr = unsafe { rust_helper_genlmsg_put(msg.skb, 0, 0, 0, command) };
        if msg.hdr.is_null() {
            return Err(emsgsize());
        }
        Ok(Event(msg))
    }

    /// Finalises and multicasts the event; no listener is not an error.
    pub(crate) fn send(self) {
        let skb = self.0.finish();
        // SAFETY: a finished message; genlmsg_multicast consumes the skb in every case.
        // Process context: GFP_KERNEL is allowed.
        let _ = unsafe { rust_helper_genlmsg_multicast(skb, 0, 0, bindings::GFP_KERNEL) };
    }
}
