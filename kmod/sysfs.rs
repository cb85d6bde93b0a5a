// SPDX-License-Identifier: GPL-2.0

//! `/sys/block/sanblkN/sanblk/{volume_name,volume_id,epoch}`: find a volume's block device by
//! name (udev rules or scripts can link /dev/disk/by-sanblk/NAME from these).

use core::cell::UnsafeCell;
use kernel::ffi::c_char;
use core::ptr::null_mut;
use kernel::bindings;
use kernel::fmt;
use kernel::str::CString;

use crate::volume::Volume;

/// Static sysfs tables: the kernel only reads them (static attributes need no lockdep key).
struct Table<T>(UnsafeCell<T>);
// SAFETY: never written after compilation; the kernel reads them concurrently.
unsafe impl<T> Sync for Table<T> {}

const fn attribute(name: &'static core::ffi::CStr, show: ShowFn) -> bindings::device_attribute {
    bindings::device_attribute {
        attr: bindings::attribute {
            name: name.as_ptr().cast(),
            mode: 0o444,
            // SAFETY: the remaining fields are lockdep bookkeeping for which zero is correct.
            ..unsafe { core::mem::zeroed() }
        },
        show: Some(show),
        store: None,
    }
}

type ShowFn = unsafe extern "C" fn(*mut bindings::device, *mut bindings::device_attribute, *mut c_char) -> isize;

static NAME: Table<bindings::device_attribute> = Table(UnsafeCell::new(attribute(c"volume_name", show_name)));
static ID: Table<bindings::device_attribute> = Table(UnsafeCell::new(attribute(c"volume_id", show_id)));
static EPOCH: Table<bindings::device_attribute> = Table(UnsafeCell::new(attribute(c"epoch", show_epoch)));
static ATTRS: Table<[*mut bindings::attribute; 4]> = Table(UnsafeCell::new([
    NAME.0.get() as *mut bindings::attribute,
    ID.0.get() as *mut bindings::attribute,
    EPOCH.0.get() as *mut bindings::attribute,
    null_mut(),
]));
static GROUP: Table<bindings::attribute_group> = Table(UnsafeCell::new(bindings::attribute_group {
    name: c"sanblk".as_ptr().cast(),
    attrs: ATTRS.0.get() as *mut *mut bindings::attribute,
    // SAFETY: optional callbacks and binary attributes: none.
    ..unsafe { core::mem::zeroed() }
}));
static GROUPS: Table<[*const bindings::attribute_group; 2]> =
    Table(UnsafeCell::new([GROUP.0.get() as *const bindings::attribute_group, core::ptr::null()]));

/// Attribute groups for `device_add_disk`.
pub(crate) fn disk_groups() -> *mut *const bindings::attribute_group {
    GROUPS.0.get() as *mut *const bindings::attribute_group
}

/// # Safety
///
/// `dev` is the device of a live sanblk disk (sysfs removes these attributes in del_gendisk,
/// before the volume reference in private_data is released).
unsafe fn volume_of<'a>(dev: *mut bindings::device) -> &'a Volume {
    // SAFETY: a disk's device is `part0->bd_device`; container_of gives the block_device.
    unsafe {
        let bdev = (dev as *mut u8).sub(core::mem::offset_of!(bindings::block_device, bd_device))
            as *mut bindings::block_device;
        &*((*(*bdev).bd_disk).private_data as *const Volume)
    }
}

/// Copies `text` and a newline into the sysfs page buffer.
fn emit(buf: *mut c_char, text: &[u8]) -> isize {
    let len = text.len().min(4000);
    // SAFETY: sysfs hands show() a PAGE_SIZE buffer; at most 4001 bytes are written.
    unsafe {
        core::ptr::copy_nonoverlapping(text.as_ptr(), buf as *mut u8, len);
        *buf.add(len) = b'\n';
    }
    (len + 1) as isize
}

fn emit_number(buf: *mut c_char, value: u64) -> isize {
    match CString::try_from_fmt(fmt!("{}", value)) {
        Ok(text) => emit(buf, text.as_bytes()),
        Err(err) => err.to_errno() as isize,
    }
}

unsafe extern "C" fn show_name(dev: *mut bindings::device, _: *mut bindings::device_attribute, buf: *mut c_char) -> isize {
    // SAFETY: called by sysfs for a live sanblk disk.
    let volume = unsafe { volume_of(dev) };
    emit(buf, volume.name.as_bytes())
}

unsafe extern "C" fn show_id(dev: *mut bindings::device, _: *mut bindings::device_attribute, buf: *mut c_char) -> isize {
    // SAFETY: called by sysfs for a live sanblk disk.
    emit_number(buf, unsafe { volume_of(dev) }.id)
}

unsafe extern "C" fn show_epoch(dev: *mut bindings::device, _: *mut bindings::device_attribute, buf: *mut c_char) -> isize {
    // SAFETY: called by sysfs for a live sanblk disk.
    emit_number(buf, unsafe { volume_of(dev) }.current_map().epoch)
}
