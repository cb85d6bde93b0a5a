// SPDX-License-Identifier: GPL-2.0

//! The context of one piece of a bio that the server path may have to re-issue: where it
//! lies in the volume, its data, the bio it completes into, and the in-flight reference that
//! keeps the volume's teardown waiting for it. It lives in front of every bio of a volume's
//! bioset ([`FRONT_PAD`]) and at the head of every hooked-bio context, so redirecting a failed
//! piece never allocates in completion context.

use core::ptr::{addr_of_mut, NonNull};

use crate::abi_frame::Op;
use crate::abi_pipeline::next_chunk;
use crate::ffi::bio::{Bio, BioData};
use crate::ffi::sync::{AtomicList, InFlightRef, ListNode};

/// What the server path needs to re-issue a piece: its op (0: cannot be redirected), flags,
/// place in the volume and the epoch it was mapped with.
#[derive(Clone, Copy)]
pub(crate) struct PieceInfo {
    pub(crate) op: u8,
    pub(crate) flags: u8,
    pub(crate) volume_offset: u64,
    pub(crate) epoch: u64,
}

/// See the module documentation.
#[repr(C)]
pub(crate) struct Piece {
    /// First: a queued piece is linked through it.
    node: ListNode,
    /// The completion this piece gives once done (for a bio remapped in place, set when it is
    /// redirected: until then the bio's own completion is its hook's).
    parent: Option<Bio>,
    /// The data as it was at submission.
    data: BioData,
    info: PieceInfo,
    /// The volume device slot it was sent to (in place only).
    slot: u32,
    /// Times the server answered -ESTALE (the piece is re-sent with the current epoch).
    stale_retries: u8,
    /// Bytes the server has answered (a piece larger than one frame goes in chunks).
    done: u32,
    /// Frees what holds this context, once the piece is done.
    release: unsafe fn(*mut Piece),
    inflight: InFlightRef,
}

/// Bytes reserved in front of each bio of a volume's bioset (keeps the bio 8-byte aligned).
pub(crate) const FRONT_PAD: u32 = ((core::mem::size_of::<Piece>() + 7) & !7) as u32;

/// The context in front of `bio`, a bio of a volume's bioset (only a pointer).
pub(crate) fn of(bio: &Bio) -> *mut Piece {
    bio.front_pad(FRONT_PAD)
}

/// The bio behind the context `piece`.
///
/// # Safety
///
/// `piece` is the context of a live bio of a volume's bioset whose completion the caller owns.
pub(crate) unsafe fn bio_of(piece: *mut Piece) -> Bio {
    // SAFETY: see the function's contract.
    unsafe { Bio::from_front_pad(piece, FRONT_PAD) }
}

/// Sets up the context at `piece`.
///
/// # Safety
///
/// `piece` is writable, ours, and not set up (or done with); `release(piece)` frees what holds
/// it once the piece is done.
pub(crate) unsafe fn init(
    piece: *mut Piece,
    parent: Option<Bio>,
    data: BioData,
    info: &PieceInfo,
    slot: u32,
    release: unsafe fn(*mut Piece),
    inflight: InFlightRef,
) {
    // SAFETY: see the function's contract; a plain write: nothing was there to drop.
    unsafe {
        piece.write(Piece {
            node: ListNode::new(),
            parent,
            data,
            info: *info,
            slot,
            stale_retries: 0,
            done: 0,
            release,
            inflight,
        })
    };
}

/// A piece set up by [`init`] and owned by one party at a time (the data path that failed it,
/// the server path's queue, the request on the wire), until [`PieceRef::finish`].
#[repr(transparent)]
pub(crate) struct PieceRef(NonNull<Piece>);

// SAFETY: a piece is handed between contexts, owned by one at a time.
unsafe impl Send for PieceRef {}

impl PieceRef {
    /// # Safety
    ///
    /// `piece` was set up by [`init`], is not finished, and the caller owns it (no other
    /// `PieceRef` to it exists).
    pub(crate) unsafe fn from_raw(piece: *mut Piece) -> PieceRef {
        // SAFETY: non-null by the contract.
        PieceRef(unsafe { NonNull::new_unchecked(piece) })
    }

    fn get(&self) -> &Piece {
        // SAFETY: a set-up piece we own (type invariant).
        unsafe { self.0.as_ref() }
    }

    fn get_mut(&mut self) -> &mut Piece {
        // SAFETY: as in `get`; owned exclusively.
        unsafe { self.0.as_mut() }
    }

    /// The frame op, or `None` when the piece cannot go to the server (discard, zeroes).
    pub(crate) fn op(&self) -> Option<Op> {
        match self.get().info.op {
            2 => Some(Op::Read),
            3 => Some(Op::Write),
            4 => Some(Op::Flush),
            _ => None,
        }
    }

    /// Whether it can go to the server path instead of failing.
    pub(crate) fn redirectable(&self) -> bool {
        self.op().is_some()
    }

    pub(crate) fn info(&self) -> &PieceInfo {
        &self.get().info
    }

    /// Payload bytes of its request (none for a flush).
    pub(crate) fn len(&self) -> u32 {
        if self.op() == Some(Op::Flush) {
            0
        } else {
            self.get().data.size()
        }
    }

    pub(crate) fn data(&self) -> &BioData {
        &self.get().data
    }

    /// Counts one -ESTALE answer; `false` once `limit` are used up.
    pub(crate) fn retry_stale(&mut self, limit: u8) -> bool {
        let piece = self.get_mut();
        if piece.stale_retries >= limit {
            return false;
        }
        piece.stale_retries += 1;
        true
    }

    pub(crate) fn slot(&self) -> u32 {
        self.get().slot
    }

    /// The bio this piece completes into, if known yet (see [`Piece`]'s `parent`).
    pub(crate) fn parent(&self) -> Option<&Bio> {
        self.get().parent.as_ref()
    }

    /// Hands the piece the completion it gives once done.
    pub(crate) fn set_parent(&mut self, parent: Bio) {
        self.get_mut().parent = Some(parent);
    }

    /// The next request of the piece: offset and length (see `pipeline::next_chunk`).
    pub(crate) fn next_chunk(&self) -> Option<(u32, u32)> {
        next_chunk(self.len(), self.get().done)
    }

    /// The server answered bytes `..done` of the piece; `true` once that is all of it.
    pub(crate) fn answered(&mut self, done: u32) -> bool {
        self.get_mut().done = done;
        done >= self.len()
    }

    pub(crate) fn set_epoch(&mut self, epoch: u64) {
        self.get_mut().info.epoch = epoch;
    }

    pub(crate) fn as_ptr(&self) -> *mut Piece {
        self.0.as_ptr()
    }

    /// Done with the piece: frees what holds its context and returns the completion it gives
    /// and its in-flight reference (dropped by the caller after giving the completion).
    pub(crate) fn finish(self) -> (Option<Bio>, InFlightRef) {
        let piece = self.0.as_ptr();
        // SAFETY: owned and set up; the fields are moved out once, then the holder is freed
        // by the release function `init` was given.
        unsafe {
            let parent = addr_of_mut!((*piece).parent).read();
            let inflight = addr_of_mut!((*piece).inflight).read();
            ((*piece).release)(piece);
            (parent, inflight)
        }
    }
}

/// Pieces handed to the server thread from any context.
pub(crate) struct PieceList(AtomicList);

impl PieceList {
    pub(crate) const fn new() -> Self {
        PieceList(AtomicList::new())
    }

    pub(crate) fn push(&self, piece: PieceRef) {
        // SAFETY: the node is the piece's own (first member, repr(C)); an owned piece is on no
        // list and stays live until the consumer takes it.
        unsafe { self.0.push(piece.as_ptr().cast::<ListNode>()) };
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every piece pushed so far, oldest first.
    pub(crate) fn take_all(&self) -> impl Iterator<Item = PieceRef> {
        // SAFETY: only owned pieces are pushed, and taking them hands the ownership over.
        self.0
            .take_all()
            .map(|node| unsafe { PieceRef::from_raw(node.cast::<Piece>()) })
    }
}

/// A FIFO of owned pieces (linked through their nodes, so it never allocates).
pub(crate) struct PieceQueue {
    head: *mut Piece,
    tail: *mut Piece,
}

// SAFETY: it owns its pieces, which may be handed between threads.
unsafe impl Send for PieceQueue {}

impl PieceQueue {
    pub(crate) const fn new() -> Self {
        PieceQueue {
            head: core::ptr::null_mut(),
            tail: core::ptr::null_mut(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.head.is_null()
    }

    pub(crate) fn push(&mut self, piece: PieceRef) {
        let piece = piece.as_ptr();
        // SAFETY: `piece` is owned (so on no list) and becomes the queue's; the tail is ours.
        unsafe {
            (*piece).node.next = core::ptr::null_mut();
            if self.tail.is_null() {
                self.head = piece;
            } else {
                (*self.tail).node.next = piece.cast();
            }
        }
        self.tail = piece;
    }

    /// Puts `piece` first (its next chunk goes out before anything else).
    pub(crate) fn push_front(&mut self, piece: PieceRef) {
        let piece = piece.as_ptr();
        // SAFETY: as in `push`.
        unsafe { (*piece).node.next = self.head.cast() };
        if self.head.is_null() {
            self.tail = piece;
        }
        self.head = piece;
    }

    /// The oldest piece, left on the queue.
    pub(crate) fn front(&self) -> Option<&PieceRef> {
        if self.head.is_null() {
            return None;
        }
        // SAFETY: `PieceRef` is a transparent-sized non-null pointer; `head` is a non-null
        // pointer to a piece the queue owns, borrowed with the queue.
        Some(unsafe { &*core::ptr::addr_of!(self.head).cast::<PieceRef>() })
    }

    pub(crate) fn pop(&mut self) -> Option<PieceRef> {
        let piece = self.head;
        if piece.is_null() {
            return None;
        }
        // SAFETY: `piece` is on this queue, which owns it and hands it over.
        unsafe {
            self.head = (*piece).node.next.cast();
            if self.head.is_null() {
                self.tail = core::ptr::null_mut();
            }
            Some(PieceRef::from_raw(piece))
        }
    }
}
