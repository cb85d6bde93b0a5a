// SPDX-License-Identifier: GPL-2.0

//! Bios: a [`Bio`] handle owns one completion of a bio (the submission reference, or one
//! more taken with [`Bio::share`]) and is consumed by what gives it (end, submit, put), so a
//! completion is given exactly once. Completion callbacks are typed ([`BoxedEndIo`], and those of `context`); a bio whose
//! completion is hooked keeps what the hook replaced in a [`Hooked`] record.

use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut, NonNull};
use kernel::bindings;
use kernel::page::Page;
use kernel::prelude::*;
use kernel::types::Opaque;

use super::blockdev::BlockDevice;
use super::consts::{BlkStatus, Opf, ReqOp, BLK_STS_OK, GFP_NOIO, REQ_OP_MASK};
use super::helpers::{rust_helper_bio_inc_remaining, rust_helper_bio_set_dev};

/// One completion of a live bio. Dropping a handle without giving its completion would leave
/// the bio hanging, hence `#[must_use]`.
#[must_use]
pub(crate) struct Bio(NonNull<bindings::bio>);

// SAFETY: bios are completed and submitted from any context and thread.
unsafe impl Send for Bio {}

/// A completion callback with a boxed context (in any context, hard-IRQ included).
pub(crate) trait BoxedEndIo<C> {
    fn end_io(bio: Bio, context: KBox<C>);
}

/// # Safety
///
/// Called by the block layer with a completed bio whose `bi_end_io` this is, set by
/// [`Bio::set_end_io`] with `C`.
unsafe extern "C" fn boxed_end_io_callback<C, E: BoxedEndIo<C>>(bio: *mut bindings::bio) {
    // SAFETY: the block layer completes a live bio; the callback owns its completion.
    let bio = unsafe { Bio::from_raw(bio) };
    // SAFETY: the private pointer is the box `set_end_io` leaked for this bio, taken once.
    let context = unsafe { KBox::from_raw(bio.private().cast::<C>()) };
    E::end_io(bio, context)
}

impl Bio {
    /// # Safety
    ///
    /// `ptr` is a live bio whose completion (one `bi_remaining` count) the caller owns and
    /// hands to the new handle.
    pub(crate) unsafe fn from_raw(ptr: *mut bindings::bio) -> Bio {
        // SAFETY: non-null by the contract.
        Bio(unsafe { NonNull::new_unchecked(ptr) })
    }

    fn raw(&self) -> *mut bindings::bio {
        self.0.as_ptr()
    }

    pub(crate) fn opf(&self) -> Opf {
        // SAFETY: a live bio (type invariant); read-only fields while we own a completion.
        unsafe { (*self.raw()).bi_opf }
    }

    pub(crate) fn op(&self) -> ReqOp {
        self.opf() & REQ_OP_MASK
    }

    pub(crate) fn has_flags(&self, flags: Opf) -> bool {
        self.opf() & flags != 0
    }

    pub(crate) fn clear_flags(&mut self, flags: Opf) {
        // SAFETY: live bio, not yet submitted (`&mut`: the handle is not shared).
        unsafe { (*self.raw()).bi_opf &= !flags };
    }

    pub(crate) fn sector(&self) -> u64 {
        // SAFETY: live bio.
        unsafe { (*self.raw()).bi_iter.bi_sector }
    }

    pub(crate) fn set_sector(&mut self, sector: u64) {
        // SAFETY: live bio, not yet submitted.
        unsafe { (*self.raw()).bi_iter.bi_sector = sector };
    }

    /// Bytes left to do.
    pub(crate) fn size(&self) -> u32 {
        // SAFETY: live bio.
        unsafe { (*self.raw()).bi_iter.bi_size }
    }

    pub(crate) fn status(&self) -> BlkStatus {
        // SAFETY: live bio; children write it before completing into it, as in C.
        unsafe { core::ptr::read_volatile(addr_of!((*self.raw()).bi_status)) }
    }

    /// Records an error (or, with `BLK_STS_OK`, clears one before a retry) that the bio
    /// completes with once its last completion is given.
    pub(crate) fn set_status(&self, status: BlkStatus) {
        // SAFETY: live bio; a plain store, as C's `bio->bi_status = status`.
        unsafe { core::ptr::write_volatile(addr_of_mut!((*self.raw()).bi_status), status) };
    }

    /// Whether other bios complete into this one (its status may come from them).
    pub(crate) fn is_chained(&self) -> bool {
        // SAFETY: live bio.
        unsafe { (*self.raw()).bi_flags & (1 << bindings::BIO_CHAIN) != 0 }
    }

    /// The device the bio is addressed to.
    pub(crate) fn bdev(&self) -> &BlockDevice {
        // SAFETY: a live bio keeps its block device (and that device's disk) alive.
        unsafe { BlockDevice::from_raw((*self.raw()).bi_bdev) }
    }

    /// Readdresses the bio (before submission).
    pub(crate) fn set_dev(&mut self, bdev: &BlockDevice) {
        // SAFETY: live bio, not yet submitted; the device is live.
        unsafe { rust_helper_bio_set_dev(self.raw().cast(), bdev.as_ptr().cast()) };
    }

    /// Its data as it stands now (iterator and vector).
    pub(crate) fn data(&self) -> BioData {
        // SAFETY: live bio.
        unsafe {
            BioData {
                iter: (*self.raw()).bi_iter,
                bvecs: (*self.raw()).bi_io_vec,
            }
        }
    }

    /// Rewinds the bio to `data` (taken from it before submission), to re-issue it.
    pub(crate) fn reset_data(&mut self, data: &BioData) {
        // SAFETY: live bio, completed by its device and not resubmitted yet.
        unsafe { (*self.raw()).bi_iter = data.iter };
    }

    /// One more completion to give: the bio completes when every handle has given its own.
    pub(crate) fn share(&self) -> Bio {
        // SAFETY: live bio; the count taken is the one the new handle owns.
        unsafe { rust_helper_bio_inc_remaining(self.raw().cast()) };
        Bio(self.0)
    }

    /// Gives this handle's completion.
    pub(crate) fn end(self) {
        // SAFETY: the handle owns one completion (type invariant), given once here.
        unsafe { bindings::bio_endio(self.raw()) };
    }

    /// Gives this handle's completion with an error status (kept if already set).
    pub(crate) fn end_with(self, status: BlkStatus) {
        if status != BLK_STS_OK {
            self.set_status(status);
        }
        self.end();
    }

    /// Sends the bio on to its device (already accounted on the disk it came from).
    pub(crate) fn submit_noacct(self) {
        // SAFETY: the handle owns the bio's completion, passed to the device.
        unsafe { bindings::submit_bio_noacct(self.raw()) };
    }

    /// Submits a bio this module built.
    pub(crate) fn submit(self) {
        // SAFETY: as in `submit_noacct`.
        unsafe { bindings::submit_bio(self.raw()) };
    }

    /// Submits a bio this module built and waits for its completion (process context: may
    /// sleep); the bio stays ours ([`Bio::put`] it).
    pub(crate) fn submit_and_wait(&mut self) -> Result {
        // SAFETY: a live bio this module allocated and filled, not submitted before; the call
        // returns once it has completed, and does not free it.
        let status = unsafe { bindings::submit_bio_wait(self.raw()) };
        kernel::error::to_result(status)
    }

    /// Chains this bio (allocated by this module, not submitted) into `parent` (likewise)
    /// and submits it: `parent` completes only once this one has, and fails if it failed.
    /// This bio is freed when it completes (as `blk_next_bio` does).
    pub(crate) fn submit_chained(self, parent: &mut Bio) {
        // SAFETY: both are live bios this module allocated and has not submitted; bio_chain
        // takes a completion reference on `parent` and makes this one's completion end it
        // and put this bio, which is not touched again here.
        unsafe {
            bindings::bio_chain(self.raw(), parent.raw());
            bindings::submit_bio(self.raw());
        }
    }

    /// Frees a completed bio this module allocated.
    pub(crate) fn put(self) {
        // SAFETY: the bio was allocated by this module and has completed; the last reference.
        unsafe { bindings::bio_put(self.raw()) };
    }

    /// Splits off the front `sectors` (from `set`, may wait for the set's reserve, never
    /// fails for lack of memory), chains it into the rest and sends the rest back through the
    /// block layer; returns the front. `Err(self)` when the split failed.
    pub(crate) fn split_front(self, sectors: u32, set: &BioSet) -> core::result::Result<Bio, Bio> {
        // SAFETY: live bio longer than `sectors`; the split comes from a live set.
        let front =
            unsafe { bindings::bio_split(self.raw(), sectors as i32, GFP_NOIO, set.as_ptr()) };
        if front.is_null() {
            return Err(self);
        }
        // SAFETY: `front` completes into `self`, whose remainder goes back to the block layer
        // (the chain takes the count `front`'s handle owns).
        unsafe {
            bindings::bio_chain(front, self.raw());
            bindings::submit_bio_noacct(self.raw());
            Ok(Bio::from_raw(front))
        }
    }

    /// A clone of the bio (same pages and range) addressed to `bdev`, from `set` (GFP_NOIO
    /// with the set's reserve: may wait for a clone to complete, does not fail in practice).
    pub(crate) fn clone_to(&self, bdev: &BlockDevice, set: &BioSet) -> Option<Bio> {
        // SAFETY: live bio and device; the set is live.
        let clone =
            unsafe { bindings::bio_alloc_clone(bdev.as_ptr(), self.raw(), GFP_NOIO, set.as_ptr()) };
        // A fresh clone: its completion is ours.
        NonNull::new(clone).map(Bio)
    }

    /// A new bio for `bdev` with room for `vecs` pages, from `set` (or the kernel's general
    /// pool `fs_bio_set` when `None`).
    pub(crate) fn alloc(
        bdev: &BlockDevice,
        vecs: u16,
        opf: Opf,
        gfp: bindings::gfp_t,
        set: Option<&BioSet>,
    ) -> Option<Bio> {
        let set = match set {
            Some(set) => set.as_ptr(),
            None => addr_of_mut!(bindings::fs_bio_set),
        };
        // SAFETY: live device and set.
        let bio = unsafe { bindings::bio_alloc_bioset(bdev.as_ptr(), vecs, opf, gfp, set) };
        NonNull::new(bio).map(Bio)
    }

    /// Adds `len` bytes of `page` at `offset` (the bio has room: sized by [`Bio::alloc`]).
    pub(crate) fn add_page(&mut self, page: &Page, len: u32, offset: u32) {
        // SAFETY: a bio not yet submitted, with a free vector slot (contract above); the page
        // outlives the bio's I/O (callers keep it until completion).
        unsafe { bindings::__bio_add_page(self.raw(), page.as_ptr(), len, offset) };
    }

    /// Sets the completion callback and its private pointer.
    pub(super) fn set_end_io_fn(&mut self, end_io: bindings::bio_end_io_t, private: *mut c_void) {
        // SAFETY: a bio not yet submitted, its completion ours.
        unsafe {
            (*self.raw()).bi_end_io = end_io;
            (*self.raw()).bi_private = private;
        }
    }

    /// Hands the bio's completion to `E` with `context`, which `E` gets back.
    pub(crate) fn set_end_io<C, E: BoxedEndIo<C>>(&mut self, context: KBox<C>) {
        self.set_end_io_fn(
            Some(boxed_end_io_callback::<C, E>),
            KBox::into_raw(context).cast(),
        );
    }

    /// The private pointer set with the callback.
    pub(super) fn private(&self) -> *mut c_void {
        // SAFETY: live bio.
        unsafe { (*self.raw()).bi_private }
    }

    /// Diverts the bio's completion to `end_io` with `private`, returning what is replaced.
    pub(super) fn hook_fn(
        &mut self,
        end_io: bindings::bio_end_io_t,
        private: *mut c_void,
    ) -> Hooked {
        // SAFETY: live bio whose completion we own: nothing reads these fields meanwhile.
        let hooked = unsafe {
            Hooked {
                end_io: (*self.raw()).bi_end_io,
                private: (*self.raw()).bi_private,
                bdev: (*self.raw()).bi_bdev,
            }
        };
        self.set_end_io_fn(end_io, private);
        hooked
    }

    /// Undoes [`Bio::hook`] (the bio is back on the device it came with).
    pub(super) fn unhook(&mut self, hooked: &Hooked) {
        // SAFETY: the bio completed to our hook; bio_endio already released the device's
        // cgroup association, so the block device pointer is all there is to restore.
        unsafe {
            (*self.raw()).bi_end_io = hooked.end_io;
            (*self.raw()).bi_private = hooked.private;
            (*self.raw()).bi_bdev = hooked.bdev;
        }
    }

    /// The context a bio of `set` carries in front of it (`BioSet::new`'s `front_pad`).
    /// Only a pointer: the caller knows which bios come from which set.
    pub(super) fn front_pad<T>(&self, front_pad: u32) -> *mut T {
        self.raw()
            .cast::<u8>()
            .wrapping_sub(front_pad as usize)
            .cast::<T>()
    }

    /// The bio whose front pad is `context` (inverse of [`Bio::front_pad`]).
    ///
    /// # Safety
    ///
    /// `context` is the front pad of a live bio of a set with `front_pad`, and the caller owns
    /// that bio's completion.
    pub(super) unsafe fn from_front_pad<T>(context: *mut T, front_pad: u32) -> Bio {
        // SAFETY: the bio lies `front_pad` bytes after its context, in the same allocation.
        unsafe { Bio::from_raw(context.cast::<u8>().add(front_pad as usize).cast()) }
    }
}

/// What [`Bio::hook`] replaced: restored by [`Bio::unhook`].
pub(super) struct Hooked {
    end_io: bindings::bio_end_io_t,
    private: *mut c_void,
    bdev: *mut bindings::block_device,
}

impl Hooked {
    /// The device the bio was addressed to when hooked.
    pub(crate) fn bdev(&self) -> &BlockDevice {
        // SAFETY: the device a bio was submitted to (a sanblk disk) outlives the bio, whose
        // hook record this is.
        unsafe { BlockDevice::from_raw(self.bdev) }
    }
}

/// A bio's data range at one moment: its iterator and page vector.
#[derive(Clone, Copy)]
pub(crate) struct BioData {
    iter: bindings::bvec_iter,
    bvecs: *mut bindings::bio_vec,
}

// SAFETY: only a description of the range; the pages are reached through it only while the
// bio is live (`iov_iter`'s contract), from whichever thread owns the bio then.
unsafe impl Send for BioData {}

impl BioData {
    pub(crate) fn size(&self) -> u32 {
        self.iter.bi_size
    }

    /// An iterator over bytes `off..off + len` of the range: the source of a send (`write`)
    /// or the destination of a receive.
    ///
    /// # Safety
    ///
    /// The bio this was taken from is live (its pages cover the range) and `off + len` is
    /// within the range.
    pub(crate) unsafe fn iov_iter(&self, off: u32, len: u32, write: bool) -> bindings::iov_iter {
        let iter = self.iter;
        let needed = iter.bi_bvec_done as usize + iter.bi_size as usize;
        // SAFETY: the bvecs from bi_idx on cover bi_bvec_done + bi_size bytes (bio invariant).
        let first = unsafe { self.bvecs.add(iter.bi_idx as usize) };
        let mut segments = 0usize;
        let mut covered = 0usize;
        while covered < needed {
            // SAFETY: within the covered range of the vector (see above).
            covered += unsafe { (*first.add(segments)).bv_len } as usize;
            segments += 1;
        }
        // SAFETY: an all-zero iov_iter is initialised by iov_iter_bvec below.
        let mut it: bindings::iov_iter = unsafe { core::mem::zeroed() };
        let start = iter.bi_bvec_done as usize + off as usize;
        let direction = if write {
            bindings::ITER_SOURCE
        } else {
            bindings::ITER_DEST
        };
        // SAFETY: `first[..segments]` is valid; the count stays within the range.
        unsafe {
            bindings::iov_iter_bvec(
                &mut it,
                direction,
                first,
                segments as _,
                start + len as usize,
            );
            bindings::iov_iter_advance(&mut it, start);
        }
        it
    }
}

/// A pool of bios with a reserve (stacked drivers need their own, or they can deadlock under
/// memory pressure), each with `front_pad` bytes of context in front of it.
pub(crate) struct BioSet(KBox<Opaque<bindings::bio_set>>);

// SAFETY: a bio_set is built for concurrent allocation from any context; it is initialised
// before it is shared and exited in drop, after the last user.
unsafe impl Send for BioSet {}
// SAFETY: see `Send`.
unsafe impl Sync for BioSet {}

impl BioSet {
    /// Clones share the original bio's vectors, so no bvec pool is made.
    pub(crate) fn new(reserve: u32, front_pad: u32) -> Result<Self> {
        // SAFETY: an all-zero bio_set is the state bioset_init starts from.
        let set = KBox::new(
            Opaque::new(unsafe { core::mem::zeroed::<bindings::bio_set>() }),
            GFP_KERNEL,
        )?;
        // SAFETY: zeroed and pinned in its box; exited in drop.
        kernel::error::to_result(unsafe {
            bindings::bioset_init(set.get(), reserve, front_pad, 0)
        })?;
        Ok(BioSet(set))
    }

    fn as_ptr(&self) -> *mut bindings::bio_set {
        self.0.get()
    }
}

impl Drop for BioSet {
    fn drop(&mut self) {
        // SAFETY: every bio of the set was freed (its owner drained them first).
        unsafe { bindings::bioset_exit(self.as_ptr()) };
    }
}

/// A FIFO of bios linked through `bi_next` (the kernel's `bio_list`): bios a driver holds
/// back, each with its completion owned by the list until it is popped. Not synchronised:
/// the owner keeps it under a lock.
pub(crate) struct BioList {
    head: *mut bindings::bio,
    tail: *mut bindings::bio,
    len: usize,
}

// SAFETY: the list owns the completions of the bios on it, which may be given from any
// thread (see `Bio`'s `Send`).
unsafe impl Send for BioList {}

impl BioList {
    pub(crate) const fn new() -> Self {
        BioList {
            head: core::ptr::null_mut(),
            tail: core::ptr::null_mut(),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends `bio`; the list owns its completion until [`BioList::pop`].
    pub(crate) fn push(&mut self, bio: Bio) {
        // The handle is consumed here (it has no destructor): its completion passes to the
        // list.
        let raw = bio.raw();
        // SAFETY: a live bio whose completion we own: nobody else links it while it is held
        // (a bio submitted to us is on no list, as in dm's `bio_list_add`).
        unsafe { (*raw).bi_next = core::ptr::null_mut() };
        if self.tail.is_null() {
            self.head = raw;
        } else {
            // SAFETY: the tail is a bio of this list, owned by it.
            unsafe { (*self.tail).bi_next = raw };
        }
        self.tail = raw;
        self.len += 1;
    }

    /// Takes the oldest bio, with its completion.
    pub(crate) fn pop(&mut self) -> Option<Bio> {
        let raw = NonNull::new(self.head)?;
        // SAFETY: the head is a bio of this list; it is unlinked before it is handed out.
        unsafe {
            self.head = (*raw.as_ptr()).bi_next;
            (*raw.as_ptr()).bi_next = core::ptr::null_mut();
        }
        if self.head.is_null() {
            self.tail = core::ptr::null_mut();
        }
        self.len -= 1;
        Some(Bio(raw))
    }

    /// Moves every bio of `other` to the end of this list.
    pub(crate) fn append(&mut self, other: &mut BioList) {
        while let Some(bio) = other.pop() {
            self.push(bio);
        }
    }
}

impl Drop for BioList {
    fn drop(&mut self) {
        // Owners drain their lists; a bio left over is failed rather than leaked (its
        // submitter would wait for it forever).
        while let Some(bio) = self.pop() {
            bio.end_with(super::consts::BLK_STS_IOERR);
        }
    }
}
