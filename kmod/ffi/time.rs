// SPDX-License-Identifier: GPL-2.0

//! Clocks and jiffies.

use kernel::bindings;
use kernel::ffi::c_long;

/// The monotonic clock, in nanoseconds.
pub(crate) fn now_ns() -> i64 {
    // SAFETY: reads the monotonic clock; callable from any context.
    unsafe { bindings::ktime_get() }
}

/// The current jiffies count.
pub(crate) fn jiffies() -> usize {
    // SAFETY: `jiffies` is always mapped; a volatile read, as the C `READ_ONCE` of it.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(bindings::jiffies)) }
}

pub(crate) fn msecs_to_jiffies(ms: u32) -> c_long {
    // SAFETY: a pure conversion.
    unsafe { bindings::__msecs_to_jiffies(ms) as c_long }
}
