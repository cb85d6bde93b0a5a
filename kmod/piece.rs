// SPDX-License-Identifier: GPL-2.0

//! The context of one piece of a bio that the server path may have to re-issue: where it
//! lies in the volume, its data, the bio it completes into, and the in-flight reference that
//! keeps the volume's teardown waiting for it. It travels with its bio as a per-bio context
//! (`ffi::context`): in front of every clone of a volume's bioset and in the hook context of
//! every bio remapped in place, so redirecting a failed piece never allocates in completion
//! context.

use crate::abi_frame::Op;
use crate::abi_pipeline::next_chunk;
use crate::ffi::bio::{Bio, BioData};
use crate::ffi::context::{ContextBioSet, HookCache, Owned, OwnedAtomicList, OwnedFifo};
use crate::ffi::sync::InFlightRef;

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
pub(crate) struct Piece {
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
    inflight: InFlightRef,
}

/// A piece and what holds it (its clone, or its in-place bio's hook context).
pub(crate) type PieceRef = Owned<Piece>;
/// Pieces handed to the server thread from any context.
pub(crate) type PieceList = OwnedAtomicList<Piece>;
/// A FIFO of owned pieces (linked through their contexts, so it never allocates).
pub(crate) type PieceQueue = OwnedFifo<Piece>;
/// A volume's clones and flushes, each with its piece.
pub(crate) type PieceBioSet = ContextBioSet<Piece>;

/// The hook contexts of bios remapped in place, shared by all volumes.
pub(crate) static IN_PLACE: HookCache<Piece> = HookCache::new();

impl Piece {
    /// A piece of `data`, completing into `parent` (if known yet), sent to device `slot`.
    pub(crate) fn new(
        parent: Option<Bio>,
        data: BioData,
        info: &PieceInfo,
        slot: u32,
        inflight: InFlightRef,
    ) -> Self {
        Piece {
            parent,
            data,
            info: *info,
            slot,
            stale_retries: 0,
            done: 0,
            inflight,
        }
    }

    /// The frame op, or `None` when the piece cannot go to the server (discard, zeroes).
    pub(crate) fn op(&self) -> Option<Op> {
        match self.info.op {
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
        &self.info
    }

    /// Payload bytes of its request (none for a flush).
    pub(crate) fn len(&self) -> u32 {
        if self.op() == Some(Op::Flush) {
            0
        } else {
            self.data.size()
        }
    }

    pub(crate) fn data(&self) -> &BioData {
        &self.data
    }

    /// Counts one -ESTALE answer; `false` once `limit` are used up.
    pub(crate) fn retry_stale(&mut self, limit: u8) -> bool {
        if self.stale_retries >= limit {
            return false;
        }
        self.stale_retries += 1;
        true
    }

    pub(crate) fn slot(&self) -> u32 {
        self.slot
    }

    /// The bio this piece completes into, if known yet (see [`Piece`]'s `parent`).
    pub(crate) fn parent(&self) -> Option<&Bio> {
        self.parent.as_ref()
    }

    /// Hands the piece the completion it gives once done.
    pub(crate) fn set_parent(&mut self, parent: Bio) {
        self.parent = Some(parent);
    }

    /// The next request of the piece: offset and length (see `pipeline::next_chunk`).
    pub(crate) fn next_chunk(&self) -> Option<(u32, u32)> {
        next_chunk(self.len(), self.done)
    }

    /// The server answered bytes `..done` of the piece; `true` once that is all of it.
    pub(crate) fn answered(&mut self, done: u32) -> bool {
        self.done = done;
        done >= self.len()
    }

    pub(crate) fn set_epoch(&mut self, epoch: u64) {
        self.info.epoch = epoch;
    }

    /// What is left of a finished piece: the completion it gives and its in-flight reference
    /// (dropped by the caller after giving the completion).
    pub(crate) fn into_completion(self) -> (Option<Bio>, InFlightRef) {
        (self.parent, self.inflight)
    }
}
