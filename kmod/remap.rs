// SPDX-License-Identifier: GPL-2.0

//! The direct data path: `submit_bio` of a sanblk disk splits a bio at map boundaries and
//! remaps each piece onto its SAN device(s). A piece going to one device is remapped in place:
//! the bio itself is sent on with its completion hooked (as dm-cache's `dm_hook_bio` does),
//! which costs a small slab object instead of a clone; mirrored writes, PREFLUSHes and chained
//! bios are cloned, as dm-linear does for every bio. No data is copied and nothing waits here
//! beyond mempool allocations with guaranteed forward progress.
//!
//! A syncing extent (`EXTENT_SYNCING`: the server is copying it to a new place) is read from
//! its members as any other, but a write to it goes over the server path, which orders it
//! with the copy and writes both places; a discard to it is dropped (see [`submit`]). So
//! does the first write to a chunk while the volume has snapshots (`crate::copied`): the
//! server preserves the chunk in each snapshot's store before writing it, unless the volume's
//! copier thread does it itself (`crate::copier`: with one snapshot, whose store the map
//! describes), which re-submits the write once the chunk is preserved.

use core::sync::atomic::Ordering;
use kernel::sync::Arc;

use crate::abi_frame::{Op, FLAG_FUA};
use crate::abi_map::{Piece, Target, MAX_MEMBERS};
use crate::ffi::bio::Bio;
use crate::ffi::consts::*;
use crate::ffi::context::{Completed, ContextEndIo, HookEndIo};
use crate::ffi::disk::{self, Operations, Vtable};
use crate::ffi::time::now_ns;
use crate::hold::{Held, Released};
use crate::hook::account_at_completion;
use crate::piece::{Piece as PieceContext, PieceInfo, PieceRef, IN_PLACE};
use crate::volume::{MapState, Volume, MAX_VOLUME_DEVICES};

/// Mirrored reads alternate between replicas in chunks of this many bytes.
const READ_BALANCE_SHIFT: u32 = 20;

/// sanblk disks: each bio goes to [`submit`].
pub(crate) struct SanblkDisk;

impl Operations for SanblkDisk {
    type Data = Volume;

    fn submit_bio(volume: &Volume, bio: Bio) {
        submit_unless_held(volume, bio);
    }
}

/// The entry of every bio, first submission or release from the hold queue: parks it while
/// the volume is quiesced or its lease has lapsed, maps and issues it otherwise.
fn submit_unless_held(volume: &Volume, bio: Bio) {
    // Counts this submission until its pieces hold their own references: QUIESCE, which
    // waits for the count to drain, cannot miss a bio that saw the volume not held.
    let _submitting = volume.inflight.get();
    match volume.hold.try_hold(bio, now_ns()) {
        Held::Go(bio) => submit(volume, bio),
        Held::Parked(report_lapse) => {
            if report_lapse {
                // LEASE_LAPSED needs an allocation: the thread sends it.
                volume.server.kick();
            }
        }
    }
}

/// Re-submits bios released from the hold queue (process context: RESUME, RENEW), each
/// through the normal entry, so each is mapped with the map current now (or parked again if
/// the volume was held again meanwhile).
pub(crate) fn resubmit(volume: &Volume, released: Released) {
    let mut released = released;
    while let Some(bio) = released.bios.pop() {
        submit_unless_held(volume, bio);
    }
}

/// Re-submits a write whose chunks the copier preserved, through the normal entry.
pub(crate) fn resubmit_copied(volume: &Volume, bio: Bio) {
    submit_unless_held(volume, bio);
}

/// The operations table of every sanblk disk (its owner is set in module init).
pub(crate) static BLOCK_OPS: Vtable<SanblkDisk> = Vtable::new();

/// The volume of a bio addressed to a sanblk disk (`None` for any other bio).
fn volume_of(bio: &Bio) -> Option<&Volume> {
    disk::data_of_bio(bio, &BLOCK_OPS)
}

/// A reference to that volume that does not borrow the bio, for handing the bio on.
fn volume_arc_of(bio: &Bio) -> Option<Arc<Volume>> {
    disk::data_arc_of_bio(bio, &BLOCK_OPS)
}

fn submit(volume: &Volume, bio: Bio) {
    let op = bio.op();
    let size = bio.size();
    let is_write = match op {
        REQ_OP_READ => false,
        REQ_OP_WRITE | REQ_OP_DISCARD | REQ_OP_WRITE_ZEROES => true,
        _ => return bio.end_with(BLK_STS_NOTSUPP),
    };
    if is_write && volume.read_only {
        return bio.end_with(BLK_STS_IOERR);
    }
    let offset = bio.sector() << 9;
    let preflush = bio.has_flags(REQ_PREFLUSH);
    // REQ_NOWAIT (io_uring): only a bio that can be remapped in place is served without
    // waiting; any other is refused with BLK_STS_AGAIN, and its submitter re-issues it
    // from a context that may wait (as dm does).
    let nowait = bio.has_flags(REQ_NOWAIT);
    if nowait && preflush {
        return bio.end_with(BLK_STS_AGAIN);
    }
    // One RCU read section maps the whole bio, so it sees exactly one epoch; what the rest
    // needs (targets resolved to device slots) is copied out, since allocating may sleep.
    let mapped = if preflush {
        // Only a PREFLUSH copies every device slot of the map (in the same section).
        let mut slots = [u32::MAX; MAX_VOLUME_DEVICES];
        let mut count = 0;
        let mapped = volume.with_map(|map| {
            for (dst, src) in slots.iter_mut().zip(map.slots.iter()) {
                *dst = *src;
                count += 1;
            }
            Mapped::new(map, offset, size as u64, true, is_write)
        });
        let Some(mapped) = mapped else {
            return bio.end_with(BLK_STS_IOERR);
        };
        flush_all_devices(volume, &slots[..count], &bio, mapped.epoch);
        if size == 0 {
            // Gives the submission's completion: the bio completes once the flushes do.
            return bio.end();
        }
        mapped
    } else {
        match volume.with_map(|map| Mapped::new(map, offset, size as u64, false, is_write)) {
            Some(mapped) => mapped,
            None => return bio.end_with(BLK_STS_IOERR),
        }
    };
    let piece = mapped.piece;
    if nowait && piece.length < size as u64 {
        return bio.end_with(BLK_STS_AGAIN);
    }
    let mut bio = bio;
    if piece.length < size as u64 {
        // Handle the front piece now and resubmit the rest, which re-enters here: at most one
        // split and MAX_MEMBERS clones are allocated per call.
        bio = match bio.split_front((piece.length >> 9) as u32, volume.bioset().bio_set()) {
            Ok(front) => front,
            Err(bio) => return bio.end_with(BLK_STS_IOERR),
        };
    }

    if mapped.copy_here && op == REQ_OP_WRITE {
        if nowait {
            return bio.end_with(BLK_STS_AGAIN);
        }
        // The first write to a chunk since the snapshot: the copier thread preserves the
        // chunk in the snapshot's store, then re-submits the write (nothing waits here).
        volume.copies.push(bio, &volume.inflight);
        return;
    }

    let count = piece.target_count as usize;
    let targets = &piece.targets[..count.min(MAX_MEMBERS)];
    let info = PieceInfo {
        op: match op {
            REQ_OP_READ => Op::Read as u8,
            REQ_OP_WRITE => Op::Write as u8,
            _ => 0,
        },
        flags: if bio.has_flags(REQ_FUA) { FLAG_FUA } else { 0 },
        volume_offset: offset,
        epoch: mapped.epoch,
    };
    // Pieces touching a device already marked failed, and writes to a syncing extent, go
    // straight to the server path (queued for its thread: nothing here waits for the network).
    // Whether there is one is read once: a syncing write must never go direct.
    let redirect = info.op != 0 && volume.server.enabled();
    // Writes to an extent being copied must reach the old place and the new one, and first
    // writes to a chunk since a snapshot must wait for the chunk's copy, which only the
    // server can do: they are routed to it below, or end here without a server path.
    let syncing = is_write && (piece.syncing() || mapped.needs_copy);
    if syncing && !redirect {
        match op {
            // A discard is only a hint, and the server path carries none: sent to the old
            // place alone it could not be mirrored to the new one (nor could an uncopied
            // chunk be preserved first), so it is not issued.
            REQ_OP_DISCARD => return bio.end(),
            // Without a server path the write could only go to the old place, and would be
            // missing from the new one once the map moves there: it fails at once. Parking it
            // (the hold queue) would not help: only a new map or a server path set up by
            // netlink could serve it, and neither releases the hold.
            REQ_OP_WRITE => return bio.end_with(BLK_STS_IOERR),
            // REQ_OP_WRITE_ZEROES does not get here: the disk does not advertise it, so the
            // block layer refuses it (or writes zero pages instead).
            _ => {}
        }
    }
    // A chained bio's status may be set by its children, so its own device's failure could
    // not be told apart: it is cloned, as is a PREFLUSH (its flag is stripped, see above).
    let in_place = !preflush && !bio.is_chained();
    let route = if is_write {
        if redirect && (syncing || targets.iter().any(|t| !device_healthy(volume, t.device))) {
            Route::ToServer
        } else if let ([target], true) = (targets, in_place) {
            Route::InPlace(target)
        } else {
            Route::Clones(targets)
        }
    } else {
        let preferred = ((offset >> READ_BALANCE_SHIFT) as usize) % targets.len().max(1);
        // Healthy replicas first, starting at the preferred one; without any, the preferred.
        let chosen = targets
            .iter()
            .cycle()
            .skip(preferred)
            .take(targets.len())
            .find(|t| device_healthy(volume, t.device))
            .or_else(|| targets.get(preferred));
        match chosen {
            Some(target) if redirect && !device_healthy(volume, target.device) => Route::ToServer,
            Some(target) if in_place => Route::InPlace(target),
            Some(target) => Route::Clones(core::slice::from_ref(target)),
            // An empty target list means a map without members, which validation rejects:
            // this only guards against the impossible.
            None => return bio.end_with(BLK_STS_IOERR),
        }
    };
    if nowait && !matches!(route, Route::InPlace(_)) {
        return bio.end_with(BLK_STS_AGAIN);
    }

    let counters = &volume.counters;
    if is_write {
        counters.write_ios.fetch_add(1, Ordering::Relaxed);
        counters
            .written_bytes
            .fetch_add(piece.length, Ordering::Relaxed);
    } else {
        counters.read_ios.fetch_add(1, Ordering::Relaxed);
        counters
            .read_bytes
            .fetch_add(piece.length, Ordering::Relaxed);
    }

    match route {
        Route::ToServer => {
            account_at_completion(&mut bio, op);
            to_server(volume, &bio, &info);
        }
        Route::InPlace(target) => {
            bio = match remap_in_place(volume, bio, op, target.device, target.offset >> 9, &info) {
                Ok(()) => return,
                Err(bio) => bio,
            };
            if nowait {
                // No context without waiting (or a SAN device that cannot take REQ_NOWAIT):
                // re-issued by the submitter. The final end below completes it.
                bio.set_status(BLK_STS_AGAIN);
            } else {
                clone_to_targets(
                    volume,
                    &mut bio,
                    op,
                    core::slice::from_ref(target),
                    is_write,
                    &info,
                );
            }
        }
        Route::Clones(targets) => clone_to_targets(volume, &mut bio, op, targets, is_write, &info),
    }
    // Gives the submission's completion: the bio completes when its clones do.
    bio.end();
}

/// Where the front piece of a bio goes.
enum Route<'a> {
    /// A device it touches is marked failed, or it writes to a syncing extent: the whole
    /// piece goes to the server path (a REQ_NOWAIT one is refused with BLK_STS_AGAIN).
    ToServer,
    /// One target (healthy, or the server path is off), the bio unchained and no PREFLUSH:
    /// the bio itself is sent on.
    InPlace(&'a Target),
    /// A clone to each target (mirrored writes; chained or PREFLUSH bios).
    Clones(&'a [Target]),
}

/// What one RCU read section of the map yields for a bio.
struct Mapped {
    /// The front piece, its targets' `device` already translated to volume device slots.
    piece: Piece,
    epoch: u64,
    /// A write touching a chunk not known copied for the volume's snapshots.
    needs_copy: bool,
    /// ... and the copier preserves its chunks (otherwise the server does).
    copy_here: bool,
}

impl Mapped {
    /// `None` when the range lies outside the map (an empty PREFLUSH maps to a zero-length piece).
    #[inline]
    fn new(
        map: &MapState,
        offset: u64,
        length: u64,
        preflush: bool,
        is_write: bool,
    ) -> Option<Mapped> {
        let mut piece = if length == 0 && preflush {
            Piece::EMPTY
        } else {
            map.map(offset, length)?
        };
        for target in piece.targets.iter_mut().take(piece.target_count as usize) {
            target.device = map.slot_of(target.device);
        }
        let needs_copy =
            is_write && piece.length != 0 && map.write_needs_copy(offset, piece.length);
        Some(Mapped {
            needs_copy,
            copy_here: needs_copy && map.copies_itself(),
            piece,
            epoch: map.epoch,
        })
    }
}

/// Whether a piece's error status means its device failed, rather than that the device does
/// not support the request (a discard on a disk without discard) or would have had to wait
/// for a REQ_NOWAIT one (BLK_STS_AGAIN: its submitter re-issues it): only a failure marks the
/// path failed and is redirected.
fn device_failed(status: BlkStatus) -> bool {
    status != 0 && status != BLK_STS_NOTSUPP && status != BLK_STS_AGAIN
}

/// Whether a completion status counts in the volume's error counter: a REQ_NOWAIT bio refused
/// with BLK_STS_AGAIN is re-issued by its submitter, not failed.
fn counts_as_error(status: BlkStatus) -> bool {
    status != 0 && status != BLK_STS_AGAIN
}

pub(crate) fn device_healthy(volume: &Volume, slot: u32) -> bool {
    volume
        .devices
        .get(slot)
        .map(|d| d.state() == crate::abi::DeviceState::Healthy as u32)
        .unwrap_or(false)
}

/// The piece of `clone` (a fresh bio of the volume's bioset): it completes into `parent`
/// (which gets one more completion to wait for) and holds an in-flight reference of the volume.
fn clone_piece(volume: &Volume, clone: &Bio, parent: &Bio, info: &PieceInfo) -> PieceContext {
    PieceContext::new(
        Some(parent.share()),
        clone.data(),
        info,
        0,
        volume.inflight.get(),
    )
}

/// Sends `bio` itself on to device `slot` at `device_sector`, its completion hooked so a
/// failure can still be redirected. `Err(bio)`, untouched, when no context could be had
/// without waiting (or the device cannot take a REQ_NOWAIT bio): the caller clones instead.
fn remap_in_place(
    volume: &Volume,
    mut bio: Bio,
    op: ReqOp,
    slot: u32,
    device_sector: u64,
    info: &PieceInfo,
) -> core::result::Result<(), Bio> {
    let Some(device) = volume.devices.get(slot) else {
        return Err(bio);
    };
    if bio.has_flags(REQ_NOWAIT) && !device.bdev().supports_nowait() {
        return Err(bio);
    }
    // The bio is unchained (checked by the caller), so its own completion is the only one its
    // status can come from; its completion stays the hook's until a redirect hands it to the
    // piece.
    let hooked = IN_PLACE.hook::<InPlaceDone>(&mut bio, op, |bio| {
        PieceContext::new(None, bio.data(), info, slot, volume.inflight.get())
    });
    if !hooked {
        return Err(bio);
    }
    bio.set_dev(device.bdev());
    bio.set_sector(device_sector);
    bio.submit_noacct();
    Ok(())
}

/// Completion of a bio sent on by [`remap_in_place`].
struct InPlaceDone;

impl HookEndIo<PieceContext> for InPlaceDone {
    fn end_io(mut bio: Bio, mut piece: PieceRef) {
        // The bio is back on its sanblk disk as it came; the volume outlives its in-flight
        // bios (its teardown waits for their in-flight references).
        let status = bio.status();
        let mut redirect = false;
        if let Some(volume) = volume_of(&bio) {
            if device_failed(status) {
                if let Some(device) = volume.devices.get(piece.slot()) {
                    device.note_error();
                }
                redirect = redirectable(volume, &piece);
            }
            if !redirect && counts_as_error(status) {
                volume.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(volume) = redirect.then(|| volume_arc_of(&bio)).flatten() {
            // Redirect instead of failing, as for a clone: the server path re-issues the
            // piece from the recorded data and completes the bio (with an error only if the
            // server fails it too).
            bio.reset_data(piece.data());
            bio.set_status(BLK_STS_OK);
            piece.set_parent(bio);
            return queue_to_server(&volume, piece);
        }
        let (_, inflight) = piece.finish().into_completion();
        // Completes the bio to its submitter: the end_io restored above runs now.
        bio.end();
        drop(inflight);
    }
}

/// Hands the whole of `bio` to the server path (its target device is marked failed, or it
/// writes to a syncing extent).
fn to_server(volume: &Volume, bio: &Bio, info: &PieceInfo) {
    // The clone only carries the piece (its iterator and vector) and is never submitted.
    let clone = volume.bioset().clone_bio(bio, bio.bdev(), |clone| {
        clone_piece(volume, clone, bio, info)
    });
    let Some(clone) = clone else {
        // The final end of `bio` completes it with the error.
        return bio.set_status(BLK_STS_IOERR);
    };
    queue_to_server(volume, clone.into_context());
}

/// Whether a failed piece can go to the server path instead of failing: a read or write
/// (not a discard) of a volume with a server path.
fn redirectable(volume: &Volume, piece: &PieceRef) -> bool {
    piece.redirectable() && volume.server.enabled()
}

/// Queues `piece` for the server thread, which completes it. The extra in-flight reference
/// around the wake-up keeps the volume and its thread alive while it is woken (teardown
/// waits for in-flight I/O before stopping the thread).
fn queue_to_server(volume: &Volume, piece: PieceRef) {
    let _hold = volume.inflight.get();
    volume.server.queue(piece);
}

/// Sends a clone of `bio` to each of `targets`; `bio` completes when they all have (its
/// statistics are taken at that completion).
fn clone_to_targets(
    volume: &Volume,
    bio: &mut Bio,
    op: ReqOp,
    targets: &[Target],
    strip_flush: bool,
    info: &PieceInfo,
) {
    account_at_completion(bio, op);
    for target in targets {
        clone_to(
            volume,
            bio,
            target.device,
            target.offset >> 9,
            strip_flush,
            info,
        );
    }
}

/// Sends a clone of `bio` (same length and pages) to device `index` at `device_sector`.
fn clone_to(
    volume: &Volume,
    bio: &Bio,
    index: u32,
    device_sector: u64,
    strip_flush: bool,
    info: &PieceInfo,
) {
    let Some(device) = volume.devices.get(index) else {
        // The final end of `bio` completes it with the error.
        return bio.set_status(BLK_STS_IOERR);
    };
    let clone = volume.bioset().clone_bio(bio, device.bdev(), |clone| {
        clone_piece(volume, clone, bio, info)
    });
    let Some(mut clone) = clone else {
        return bio.set_status(BLK_STS_IOERR);
    };
    clone.bio_mut().set_sector(device_sector);
    if strip_flush {
        clone.bio_mut().clear_flags(REQ_PREFLUSH);
    }
    clone.submit_noacct::<CloneDone>();
}

/// Issues an empty PREFLUSH to every device of the volume, each completing into `bio`.
fn flush_all_devices(volume: &Volume, slots: &[u32], bio: &Bio, epoch: u64) {
    let info = PieceInfo {
        op: Op::Flush as u8,
        flags: 0,
        volume_offset: 0,
        epoch,
    };
    for device in slots.iter().filter_map(|slot| volume.devices.get(*slot)) {
        let flush = volume.bioset().alloc(
            device.bdev(),
            REQ_OP_WRITE | REQ_PREFLUSH,
            GFP_NOIO,
            |flush| clone_piece(volume, flush, bio, &info),
        );
        let Some(flush) = flush else {
            bio.set_status(BLK_STS_IOERR);
            continue;
        };
        flush.submit_noacct::<CloneDone>();
    }
}

/// Completion of a clone or flush issued by this module.
struct CloneDone;

impl ContextEndIo<PieceContext> for CloneDone {
    fn end_io(done: Completed, piece: PieceRef) {
        // The parent is addressed to its sanblk disk and waits for this completion; the
        // volume outlives its in-flight bios (teardown waits for their references).
        let Some((parent, volume)) = piece.parent().and_then(|p| Some((p, volume_of(p)?))) else {
            return;
        };
        let status = done.status();
        let mut redirect = false;
        if device_failed(status) {
            if let Some((_, device)) = volume
                .devices
                .iter()
                .find(|(_, d)| done.was_sent_to(d.bdev()))
            {
                device.note_error();
            }
            redirect = redirectable(volume, &piece);
        }
        if !redirect && status != BLK_STS_OK {
            if counts_as_error(status) {
                volume.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            parent.set_status(status);
        }
        if let Some(volume) = redirect
            .then(|| piece.parent().and_then(volume_arc_of))
            .flatten()
        {
            // Redirect instead of failing: the clone, its in-flight reference and its share
            // of the parent pass to the server path, which completes the parent.
            return queue_to_server(&volume, piece);
        }
        let (parent, inflight) = piece.finish().into_completion();
        if let Some(parent) = parent {
            parent.end();
        }
        drop(inflight);
    }
}
