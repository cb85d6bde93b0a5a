// SPDX-License-Identifier: GPL-2.0

//! Generic-netlink command dispatch: validates every request against the uapi table and
//! answers it. Invalid input gets an errno plus an extack message and changes nothing.

use crate::abi::{Attr, Command, PROTOCOL_VERSION};
use crate::shim::{GenlInfo, Request, SkBuff};
use core::ffi::c_int;
use crate::errno::eopnotsupp;
use kernel::error::code::*;
use kernel::prelude::*;
use kernel::str::CString;
use kernel::{c_str, fmt};

/// Room for a STATUS reply; grows with the volume list in later versions.
const STATUS_REPLY_BYTES: usize = 4096;

/// The doit callback of every command (referenced from the shim's op table).
///
/// # Safety
///
/// Called by the generic-netlink core with a valid `genl_info` for this request.
#[no_mangle]
unsafe extern "C" fn sanblk_nl_doit(_skb: *mut SkBuff, info: *mut GenlInfo) -> c_int {
    // SAFETY: `info` is valid for the whole callback, and `request` does not outlive it.
    let request = unsafe { Request::new(info) };
    match dispatch(&request) {
        Ok(()) => 0,
        Err(err) => err.to_errno(),
    }
}

fn dispatch(request: &Request) -> Result {
    let command = Command::from_u8(request.command())
        .filter(|c| c.accepted_from_userspace())
        .ok_or_else(|| request.fail(eopnotsupp(), c_str!("unknown sanblk command")))?;
    for attr in command.required_attributes() {
        if request.attr_missing(*attr as u16) {
            let msg = CString::try_from_fmt(fmt!(
                "{} needs attribute {}",
                command.name(),
                attr.spec().name
            ))?;
            return Err(request.fail(EINVAL, &msg));
        }
    }
    match command {
        Command::Status => status(request),
        _ => Err(request.fail(
            eopnotsupp(),
            c_str!("command not supported by this module version"),
        )),
    }
}

fn status(request: &Request) -> Result {
    let mut reply = request.reply(Command::Status as u8, STATUS_REPLY_BYTES)?;
    reply.put_u32(Attr::ProtocolVersion as u16, PROTOCOL_VERSION)?;
    reply.put_str(Attr::ModuleVersion as u16, crate::MODULE_VERSION)?;
    reply.put_u32(Attr::BlockMajor as u16, crate::block_major())?;
    reply.put_u32(Attr::VolumeCount as u16, 0)?;
    reply.send()
}
