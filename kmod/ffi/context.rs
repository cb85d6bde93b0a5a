// SPDX-License-Identifier: GPL-2.0

//! Per-bio contexts: a value `T` that travels with one bio and is owned by one [`Owned`]
//! handle at a time, wherever it lives:
//! - in front of a bio of a [`ContextBioSet`] (a clone or a bio built by the module), freed
//!   with that bio, as dm keeps its per-bio data in the bioset's front pad;
//! - in a slab object of a [`HookCache`] that hooked the completion of a bio the module sends
//!   on itself, which also times the bio's block-layer statistics until the context is done.
//!
//! An owned context links into an [`OwnedFifo`] or an [`OwnedAtomicList`] through a node of
//! its own, so handing it between contexts never allocates. Completions are typed
//! ([`ContextEndIo`], [`HookEndIo`]): the trampolines here are the only code that turns a
//! completed bio back into its context.

use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ops::{Deref, DerefMut};
use core::ptr::{addr_of_mut, NonNull};
use kernel::bindings;
use kernel::prelude::*;

use super::bio::{Bio, BioSet, Hooked};
use super::blockdev::BlockDevice;
use super::consts::{BlkStatus, Opf, ReqOp};
use super::slab::KmemCache;
use super::sync::{AtomicList, ListNode};

/// Where a context lives, and so how it is freed.
enum Holder<T: 'static> {
    /// In front of a bio of a [`ContextBioSet<T>`]: the bio is put.
    FrontPad,
    /// In a [`HookSlot`] of this cache: its statistics end and the object is freed.
    Hook(&'static HookCache<T>),
}

/// The memory of every context: linked through `node`, which comes first.
#[repr(C)]
struct Slot<T: 'static> {
    node: ListNode,
    holder: Holder<T>,
    value: T,
}

/// Bytes in front of each bio of a [`ContextBioSet<T>`] (keeps the bio 8-byte aligned).
const fn front_pad<T: 'static>() -> usize {
    (core::mem::size_of::<Slot<T>>() + 7) & !7
}

/// The single owner of a context (see the module documentation); finishing it (or dropping
/// it) frees what holds it.
pub(crate) struct Owned<T: 'static>(NonNull<Slot<T>>);

// SAFETY: an owned context is handed between contexts and threads, owned by one at a time;
// freeing its holder may happen in any context.
unsafe impl<T: Send + 'static> Send for Owned<T> {}

impl<T: 'static> Owned<T> {
    /// Done with the context: frees what holds it (putting its bio, or ending the hooked bio's
    /// statistics) and hands its value back.
    pub(crate) fn finish(self) -> T {
        let this = ManuallyDrop::new(self);
        let slot = this.0.as_ptr();
        // SAFETY: an owned, set-up slot (type invariant); the value is moved out once, then
        // the holder is released and not touched again.
        unsafe {
            let value = addr_of_mut!((*slot).value).read();
            match (*slot).holder {
                Holder::FrontPad => Bio::from_front_pad(slot, front_pad::<T>() as u32).put(),
                Holder::Hook(cache) => cache.release(slot.cast::<HookSlot<T>>()),
            }
            value
        }
    }

    fn into_node(self) -> *mut ListNode {
        // `node` comes first in the repr(C) slot.
        ManuallyDrop::new(self).0.as_ptr().cast()
    }

    /// # Safety
    ///
    /// `node` came from [`Owned::into_node`] of an `Owned<T>` and is handed back once.
    unsafe fn from_node(node: *mut ListNode) -> Self {
        // SAFETY: non-null: it came from a live handle (contract).
        Owned(unsafe { NonNull::new_unchecked(node.cast()) })
    }
}

impl<T: 'static> Deref for Owned<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: a set-up slot owned by this handle (type invariant).
        unsafe { &(*self.0.as_ptr()).value }
    }
}

impl<T: 'static> DerefMut for Owned<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; the handle is the only owner.
        unsafe { &mut (*self.0.as_ptr()).value }
    }
}

impl<T: 'static> Drop for Owned<T> {
    fn drop(&mut self) {
        drop(Owned(self.0).finish());
    }
}

/// A bio pool whose bios each carry a `T` in front of them.
pub(crate) struct ContextBioSet<T: 'static> {
    set: BioSet,
    _t: PhantomData<fn(T) -> T>,
}

impl<T: 'static> ContextBioSet<T> {
    pub(crate) fn new(reserve: u32) -> Result<Self> {
        Ok(ContextBioSet {
            set: BioSet::new(reserve, front_pad::<T>() as u32)?,
            _t: PhantomData,
        })
    }

    /// The pool itself, for bios that carry no context (splits).
    pub(crate) fn bio_set(&self) -> &BioSet {
        &self.set
    }

    /// A clone of `bio` addressed to `bdev` (see [`Bio::clone_to`]) with the context
    /// `make(&clone)`; `None` (and `make` not called) when there is no clone.
    pub(crate) fn clone_bio(
        &self,
        bio: &Bio,
        bdev: &BlockDevice,
        make: impl FnOnce(&Bio) -> T,
    ) -> Option<ContextBio<T>> {
        let clone = bio.clone_to(bdev, &self.set)?;
        Some(ContextBio::new(clone, make))
    }

    /// A new bio for `bdev` without data pages (a flush), with the context `make(&bio)`.
    pub(crate) fn alloc(
        &self,
        bdev: &BlockDevice,
        opf: Opf,
        gfp: bindings::gfp_t,
        make: impl FnOnce(&Bio) -> T,
    ) -> Option<ContextBio<T>> {
        let bio = Bio::alloc(bdev, 0, opf, gfp, Some(&self.set))?;
        Some(ContextBio::new(bio, make))
    }
}

/// A bio of a [`ContextBioSet<T>`] with its context, not submitted yet.
pub(crate) struct ContextBio<T: 'static> {
    bio: Bio,
    slot: NonNull<Slot<T>>,
}

impl<T: 'static> ContextBio<T> {
    fn new(bio: Bio, make: impl FnOnce(&Bio) -> T) -> Self {
        let slot = bio.front_pad::<Slot<T>>(front_pad::<T>() as u32);
        // SAFETY: a fresh bio of a set with this front pad: the slot is ours and holds nothing
        // to drop.
        unsafe {
            slot.write(Slot {
                node: ListNode::new(),
                holder: Holder::FrontPad,
                value: make(&bio),
            })
        };
        ContextBio {
            bio,
            // SAFETY: `front_pad` of a live bio is not null.
            slot: unsafe { NonNull::new_unchecked(slot) },
        }
    }

    pub(crate) fn bio_mut(&mut self) -> &mut Bio {
        &mut self.bio
    }

    /// Sends the bio on (accounted already); its completion goes to `E` with the context.
    pub(crate) fn submit_noacct<E: ContextEndIo<T>>(self) {
        let mut bio = self.bio;
        bio.set_end_io_fn(Some(context_end_io::<T, E>), core::ptr::null_mut());
        bio.submit_noacct();
    }

    /// The context alone, for a bio that is never submitted (it only carries the context's
    /// data); the bio is put when the context is finished.
    pub(crate) fn into_context(self) -> Owned<T> {
        Owned(self.slot)
    }
}

/// How a bio of a [`ContextBioSet`] completed (the bio itself is put with its context).
pub(crate) struct Completed {
    status: BlkStatus,
    bdev: *mut bindings::block_device,
}

impl Completed {
    pub(crate) fn status(&self) -> BlkStatus {
        self.status
    }

    /// Whether the bio had been sent to `bdev`.
    pub(crate) fn was_sent_to(&self, bdev: &BlockDevice) -> bool {
        bdev.as_ptr() == self.bdev
    }
}

/// The completion of a bio of a [`ContextBioSet<T>`] (any context, hard-IRQ included).
pub(crate) trait ContextEndIo<T: 'static> {
    fn end_io(done: Completed, context: Owned<T>);
}

/// # Safety
///
/// Called by the block layer with a completed bio of a `ContextBioSet<T>` submitted by
/// [`ContextBio::submit_noacct`].
unsafe extern "C" fn context_end_io<T: 'static, E: ContextEndIo<T>>(bio: *mut bindings::bio) {
    // The bio's handle is not given: the bio goes with its context, which puts it.
    let (completed, slot) = {
        // SAFETY: a live completed bio, owned by this callback (contract).
        let done = unsafe { Bio::from_raw(bio) };
        let completed = Completed {
            status: done.status(),
            bdev: done.bdev().as_ptr(),
        };
        (
            completed,
            done.front_pad::<Slot<T>>(front_pad::<T>() as u32),
        )
    };
    // SAFETY: its context was set up by `ContextBio::new`; the completion owns it.
    E::end_io(completed, Owned(unsafe { NonNull::new_unchecked(slot) }));
}

/// A context that hooked a bio's completion: what the hook replaced, and the bio's
/// block-layer statistics (op, sectors, start) if they are on.
#[repr(C)]
struct HookSlot<T: 'static> {
    slot: Slot<T>,
    hooked: Hooked,
    accounting: Option<(ReqOp, u32, usize)>,
}

/// The slab of hook contexts carrying a `T` (a static, created in module init and destroyed
/// after every volume is gone).
pub(crate) struct HookCache<T: 'static>(KmemCache<HookSlot<T>>);

/// The completion of a bio hooked through a [`HookCache<T>`], with the hook undone (the bio
/// is back on its own device with its own completion).
pub(crate) trait HookEndIo<T: 'static> {
    fn end_io(bio: Bio, context: Owned<T>);
}

impl<T: 'static> HookCache<T> {
    pub(crate) const fn new() -> Self {
        HookCache(KmemCache::new())
    }

    pub(crate) fn create(&self, name: &'static kernel::str::CStr) -> Result {
        self.0.create(name)
    }

    pub(crate) fn destroy(&self) {
        self.0.destroy()
    }

    /// Diverts `bio`'s completion to `E` with the context `make(bio)`, starting its
    /// block-layer statistics on the disk it is addressed to (`/sys/block/*/stat`) unless they
    /// are off there; they end when the context is finished. `false` (bio untouched, `make`
    /// not called) when the slab has no object without waiting.
    pub(crate) fn hook<E: HookEndIo<T>>(
        &'static self,
        bio: &mut Bio,
        op: ReqOp,
        make: impl FnOnce(&Bio) -> T,
    ) -> bool {
        let object = self.0.alloc_nowait();
        if object.is_null() {
            return false;
        }
        let bdev = bio.bdev();
        let accounting = if bdev.io_stat_enabled() {
            Some((op, bio.size() >> 9, bdev.start_io_acct(op)))
        } else {
            None
        };
        let value = make(bio);
        let hooked = bio.hook_fn(Some(hook_end_io::<T, E>), object.cast());
        // SAFETY: a fresh object of the slab, ours, holding nothing to drop.
        unsafe {
            object.write(HookSlot {
                slot: Slot {
                    node: ListNode::new(),
                    holder: Holder::Hook(self),
                    value,
                },
                hooked,
                accounting,
            })
        };
        true
    }

    /// Ends the statistics of a hook context whose value is gone, and frees it.
    ///
    /// # Safety
    ///
    /// `object` is a set-up object of this cache whose value was moved out, used no more.
    unsafe fn release(&self, object: *mut HookSlot<T>) {
        // SAFETY: see the function's contract; the hooked disk outlives its bios.
        unsafe {
            if let Some((op, sectors, start)) = (*object).accounting {
                (*object).hooked.bdev().end_io_acct(op, sectors, start);
            }
            self.0.free(object);
        }
    }
}

/// # Safety
///
/// Called by the block layer with a completed bio hooked by [`HookCache::hook`] with `E`.
unsafe extern "C" fn hook_end_io<T: 'static, E: HookEndIo<T>>(bio: *mut bindings::bio) {
    // SAFETY: a live completed bio whose completion this callback owns (contract).
    let mut bio = unsafe { Bio::from_raw(bio) };
    let object = bio.private().cast::<HookSlot<T>>();
    // SAFETY: a hooked bio's private pointer is its context, set up by `hook` and owned by
    // this completion.
    unsafe {
        bio.unhook(&(*object).hooked);
        E::end_io(bio, Owned(NonNull::new_unchecked(object.cast())));
    }
}

/// A FIFO of owned contexts, linked through their nodes (never allocates). Not synchronised:
/// its owner keeps it.
pub(crate) struct OwnedFifo<T: 'static> {
    head: *mut ListNode,
    tail: *mut ListNode,
    _t: PhantomData<Owned<T>>,
}

// SAFETY: it owns its contexts, which may be handed between threads.
unsafe impl<T: Send + 'static> Send for OwnedFifo<T> {}

impl<T: 'static> OwnedFifo<T> {
    pub(crate) const fn new() -> Self {
        OwnedFifo {
            head: core::ptr::null_mut(),
            tail: core::ptr::null_mut(),
            _t: PhantomData,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.head.is_null()
    }

    pub(crate) fn push(&mut self, context: Owned<T>) {
        let node = context.into_node();
        // SAFETY: the node is owned (so on no list) and becomes the queue's; the tail is ours.
        unsafe {
            (*node).next = core::ptr::null_mut();
            if self.tail.is_null() {
                self.head = node;
            } else {
                (*self.tail).next = node;
            }
        }
        self.tail = node;
    }

    pub(crate) fn push_front(&mut self, context: Owned<T>) {
        let node = context.into_node();
        // SAFETY: as in `push`.
        unsafe { (*node).next = self.head };
        if self.head.is_null() {
            self.tail = node;
        }
        self.head = node;
    }

    /// The oldest context, left on the queue.
    pub(crate) fn front(&self) -> Option<&T> {
        if self.head.is_null() {
            return None;
        }
        // SAFETY: the head is the node of a slot the queue owns, borrowed with the queue.
        Some(unsafe { &(*self.head.cast::<Slot<T>>()).value })
    }

    pub(crate) fn pop(&mut self) -> Option<Owned<T>> {
        let node = self.head;
        if node.is_null() {
            return None;
        }
        // SAFETY: the node is on this queue, which owns it and hands it over.
        unsafe {
            self.head = (*node).next;
            if self.head.is_null() {
                self.tail = core::ptr::null_mut();
            }
            Some(Owned::from_node(node))
        }
    }
}

/// Contexts handed to one consumer from any context (lock-free, never allocates).
pub(crate) struct OwnedAtomicList<T: 'static> {
    list: AtomicList,
    _t: PhantomData<Owned<T>>,
}

// SAFETY: it owns its contexts, which may be handed between threads; the list is atomic.
unsafe impl<T: Send + 'static> Sync for OwnedAtomicList<T> {}
// SAFETY: see `Sync`.
unsafe impl<T: Send + 'static> Send for OwnedAtomicList<T> {}

impl<T: 'static> OwnedAtomicList<T> {
    pub(crate) const fn new() -> Self {
        OwnedAtomicList {
            list: AtomicList::new(),
            _t: PhantomData,
        }
    }

    /// Pushes `context`; returns whether the list was empty.
    pub(crate) fn push(&self, context: Owned<T>) -> bool {
        // SAFETY: an owned node is on no list and stays live until the consumer takes it.
        unsafe { self.list.push(context.into_node()) }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Every context pushed so far, oldest first.
    pub(crate) fn take_all(&self) -> impl Iterator<Item = Owned<T>> {
        // SAFETY: only owned contexts are pushed, and taking them hands the ownership over.
        self.list
            .take_all()
            .map(|node| unsafe { Owned::from_node(node) })
    }
}
