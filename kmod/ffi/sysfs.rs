// SPDX-License-Identifier: GPL-2.0

//! Static, read-only sysfs attributes of a disk (`/sys/block/<disk>/<group>/<name>`), each
//! shown from the disk's data.

use core::cell::UnsafeCell;
use core::marker::PhantomData;
use kernel::bindings;
use kernel::ffi::c_char;

use super::blockdev::BlockDevice;
use super::disk::{data_of, Operations};

/// Room a show callback may fill (sysfs hands it a page; one byte stays for the newline).
const SHOW_MAX: usize = 4000;

/// One read-only attribute of disks built with `T`.
pub(crate) trait Show<T: Operations> {
    /// Writes the value (without the trailing newline) into `out`.
    fn show(data: &T::Data, out: &mut ShowBuffer);
}

/// The page a show callback writes into.
pub(crate) struct ShowBuffer {
    buf: *mut c_char,
    len: usize,
}

impl ShowBuffer {
    /// Appends `text`, cut to the room left.
    pub(crate) fn write(&mut self, text: &[u8]) {
        let n = text.len().min(SHOW_MAX - self.len);
        // SAFETY: sysfs hands show() a PAGE_SIZE buffer and `len + n <= SHOW_MAX` < its size.
        unsafe {
            core::ptr::copy_nonoverlapping(text.as_ptr(), self.buf.add(self.len).cast::<u8>(), n)
        };
        self.len += n;
    }

    /// Ends the value with a newline; returns the bytes written.
    fn finish(self) -> isize {
        // SAFETY: `len <= SHOW_MAX`, so the newline still lies within the page.
        unsafe { *self.buf.add(self.len) = b'\n' as c_char };
        (self.len + 1) as isize
    }
}

impl core::fmt::Write for ShowBuffer {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.write(s.as_bytes());
        Ok(())
    }
}

/// # Safety
///
/// Called by sysfs for an attribute of a live disk built with `T`.
unsafe extern "C" fn show_callback<T: Operations, S: Show<T>>(
    dev: *mut bindings::device,
    _attr: *mut bindings::device_attribute,
    buf: *mut c_char,
) -> isize {
    // SAFETY: a disk's device is its `part0->bd_device`: container_of gives the block device,
    // live while sysfs calls show (the attributes go in del_gendisk, before the disk's data
    // is released); the disk was built with `T` (the attribute is only in `T`'s groups).
    let data = unsafe {
        let bdev = dev
            .cast::<u8>()
            .sub(core::mem::offset_of!(bindings::block_device, bd_device));
        data_of::<T>(BlockDevice::from_raw(bdev.cast()))
    };
    let mut out = ShowBuffer { buf, len: 0 };
    S::show(data, &mut out);
    out.finish()
}

/// A read-only attribute, shown by `S` from the data of a `T` disk.
pub(crate) struct Attribute<T: Operations, S: Show<T>> {
    attr: UnsafeCell<bindings::device_attribute>,
    _types: PhantomData<(T, S)>,
}

// SAFETY: never written after compilation; the kernel reads it concurrently.
unsafe impl<T: Operations, S: Show<T>> Sync for Attribute<T, S> {}

impl<T: Operations, S: Show<T>> Attribute<T, S> {
    pub(crate) const fn new(name: &'static core::ffi::CStr) -> Self {
        Attribute {
            attr: UnsafeCell::new(bindings::device_attribute {
                attr: bindings::attribute {
                    name: name.as_ptr().cast(),
                    mode: 0o444,
                    // SAFETY: the remaining fields are lockdep bookkeeping: zero is correct.
                    ..unsafe { core::mem::zeroed() }
                },
                show: Some(show_callback::<T, S>),
                store: None,
            }),
            _types: PhantomData,
        }
    }

    pub(crate) const fn as_ptr(&'static self) -> *mut bindings::attribute {
        self.attr.get().cast()
    }
}

/// A null-terminated list of attributes (`N` counts the terminator).
pub(crate) struct AttributeList<const N: usize>(UnsafeCell<[*mut bindings::attribute; N]>);

// SAFETY: never written after compilation; the kernel reads it concurrently.
unsafe impl<const N: usize> Sync for AttributeList<N> {}

impl<const N: usize> AttributeList<N> {
    /// `attrs` ends with a null pointer.
    pub(crate) const fn new(attrs: [*mut bindings::attribute; N]) -> Self {
        AttributeList(UnsafeCell::new(attrs))
    }
}

/// A named group of attributes.
pub(crate) struct AttributeGroup(UnsafeCell<bindings::attribute_group>);

// SAFETY: never written after compilation; the kernel reads it concurrently.
unsafe impl Sync for AttributeGroup {}

impl AttributeGroup {
    pub(crate) const fn new<const N: usize>(
        name: &'static core::ffi::CStr,
        attrs: &'static AttributeList<N>,
    ) -> Self {
        AttributeGroup(UnsafeCell::new(bindings::attribute_group {
            name: name.as_ptr().cast(),
            attrs: attrs.0.get().cast(),
            // SAFETY: optional callbacks and binary attributes: none.
            ..unsafe { core::mem::zeroed() }
        }))
    }
}

/// The null-terminated list of groups of a disk, as `device_add_disk` takes it.
pub(crate) struct AttributeGroups(UnsafeCell<[*const bindings::attribute_group; 2]>);

// SAFETY: never written after compilation; the kernel reads it concurrently.
unsafe impl Sync for AttributeGroups {}

impl AttributeGroups {
    /// The single group `group`.
    pub(crate) const fn one(group: &'static AttributeGroup) -> Self {
        AttributeGroups(UnsafeCell::new([
            group.0.get().cast_const(),
            core::ptr::null(),
        ]))
    }

    pub(crate) fn as_ptr(&self) -> *mut *const bindings::attribute_group {
        self.0.get().cast()
    }
}
