// SPDX-License-Identifier: GPL-2.0

//! A slab of fixed-size objects shared by every volume (a static: completions that free
//! objects reach no other state of the module).

use core::sync::atomic::{AtomicPtr, Ordering};
use kernel::bindings;
use kernel::prelude::*;

use super::consts::GFP_NOWAIT;

/// A `kmem_cache` of `T`-sized objects, created in module init and destroyed in module exit.
pub(crate) struct KmemCache<T> {
    cache: AtomicPtr<bindings::kmem_cache>,
    _t: core::marker::PhantomData<T>,
}

// SAFETY: a kmem_cache is designed for concurrent use from any context.
unsafe impl<T> Sync for KmemCache<T> {}

impl<T> KmemCache<T> {
    pub(crate) const fn new() -> Self {
        KmemCache {
            cache: AtomicPtr::new(core::ptr::null_mut()),
            _t: core::marker::PhantomData,
        }
    }

    /// Creates the slab (module init).
    pub(crate) fn create(&self, name: &'static kernel::str::CStr) -> Result {
        // SAFETY: zero is "no alignment, no usercopy region, no constructor".
        let mut args: bindings::kmem_cache_args = unsafe { core::mem::zeroed() };
        // SAFETY: the name is a static string; the cache is destroyed by `destroy`.
        let cache = unsafe {
            bindings::__kmem_cache_create_args(
                name.as_char_ptr(),
                core::mem::size_of::<T>() as u32,
                &mut args,
                0,
            )
        };
        if cache.is_null() {
            return Err(ENOMEM);
        }
        self.cache.store(cache, Ordering::Release);
        Ok(())
    }

    /// An uninitialised object, or null (never waits; also null outside the slab's life).
    pub(crate) fn alloc_nowait(&self) -> *mut T {
        let cache = self.cache.load(Ordering::Acquire);
        if cache.is_null() {
            return core::ptr::null_mut();
        }
        // SAFETY: a live cache; GFP_NOWAIT never sleeps.
        unsafe { bindings::kmem_cache_alloc_noprof(cache, GFP_NOWAIT) }.cast()
    }

    /// # Safety
    ///
    /// `object` came from [`Self::alloc_nowait`] and is used no more.
    pub(crate) unsafe fn free(&self, object: *mut T) {
        // SAFETY: see the function's contract.
        unsafe { bindings::kmem_cache_free(self.cache.load(Ordering::Acquire), object.cast()) };
    }

    /// Destroys the slab (module exit, after every object was freed).
    pub(crate) fn destroy(&self) {
        let cache = self.cache.swap(core::ptr::null_mut(), Ordering::AcqRel);
        if !cache.is_null() {
            // SAFETY: created by `create`; every object is back (the owner's contract).
            unsafe { bindings::kmem_cache_destroy(cache) };
        }
    }
}
