// SPDX-License-Identifier: GPL-2.0

//! The direct data path: `submit_bio` of a sanblk disk splits a bio at map boundaries and
//! remaps each piece onto its SAN device(s). A piece going to one device is remapped in place:
//! the bio itself is sent on with its completion hooked (as dm-cache's `dm_hook_bio` does),
//! which costs a small slab object instead of a clone; mirrored writes, PREFLUSHes and chained
//! bios are cloned, as dm-linear does for every bio. No data is copied and nothing waits here
//! beyond mempool allocations with guaranteed forward progress.

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::ptr::addr_of_mut;
use core::sync::atomic::Ordering;
use kernel::bindings;
use kernel::prelude::*;

use crate::abi_frame::{Op, FLAG_FUA};
use crate::abi_map::{Piece, Target, MAX_MEMBERS};
use crate::hook::{account_at_completion, alloc_context, finish, hook, HookedBio};
use crate::server::{Piece as ServerPiece, PieceOwner};
use crate::volume::{MapState, Volume, MAX_VOLUME_DEVICES};

const BLK_STS_NOTSUPP: bindings::blk_status_t = 1;
const BLK_STS_IOERR: bindings::blk_status_t = 10;
const REQ_OP_MASK: bindings::blk_opf_t = (1 << bindings::REQ_OP_BITS) - 1;
const REQ_PREFLUSH: bindings::blk_opf_t = 1 << bindings::req_flag_bits___REQ_PREFLUSH;
const REQ_FUA: bindings::blk_opf_t = 1 << bindings::req_flag_bits___REQ_FUA;
const REQ_NOWAIT: bindings::blk_opf_t = 1 << bindings::req_flag_bits___REQ_NOWAIT;
const BLK_STS_AGAIN: bindings::blk_status_t = 12;
const BLK_FEAT_NOWAIT: bindings::blk_features_t = 1 << 7;

/// What the server path needs to re-issue a piece: its op (0: cannot be redirected), place
/// in the volume and the epoch it was mapped with.
#[derive(Clone, Copy)]
struct PieceInfo {
    op: u8,
    flags: u8,
    volume_offset: u64,
    epoch: u64,
}
const GFP_NOIO: bindings::gfp_t =
    (1 << bindings::___GFP_DIRECT_RECLAIM_BIT) | (1 << bindings::___GFP_KSWAPD_RECLAIM_BIT);
const BIO_CHAIN_FLAG: u16 = 1 << bindings::BIO_CHAIN;
/// Mirrored reads alternate between replicas in chunks of this many bytes.
const READ_BALANCE_SHIFT: u32 = 20;

extern "C" {
    // `struct bio` as an opaque pointer: bindgen's layout is not FFI-safe by rustc's lints.
    fn sanblk_bio_inc_remaining(bio: *mut c_void);
    fn sanblk_bio_set_dev(bio: *mut c_void, bdev: *mut c_void);
}

struct BlockOps(UnsafeCell<bindings::block_device_operations>);

// SAFETY: written once in module init (`set_owner`) before any disk exists, read-only after.
unsafe impl Sync for BlockOps {}

static BLOCK_OPS: BlockOps = BlockOps(UnsafeCell::new(bindings::block_device_operations {
    submit_bio: Some(sanblk_submit_bio),
    // SAFETY: all other members are optional callbacks or pointers for which zero means none.
    ..unsafe { core::mem::zeroed() }
}));

/// Makes open sanblk disks pin the module, so it cannot be unloaded under an opener.
pub(crate) fn set_owner(module: &'static ThisModule) {
    // SAFETY: called once from module init, before any disk (the only reader) exists.
    unsafe { (*BLOCK_OPS.0.get()).owner = module.as_ptr() };
}

pub(crate) fn block_ops() -> *const bindings::block_device_operations {
    BLOCK_OPS.0.get()
}

/// Completes `bio` with an error status.
fn fail_bio(bio: *mut bindings::bio, status: bindings::blk_status_t) {
    // SAFETY: `bio` is a live bio we own the completion of.
    unsafe {
        (*bio).bi_status = status;
        bindings::bio_endio(bio);
    }
}

/// # Safety
///
/// Called by the block layer with a valid bio addressed to a sanblk disk, whose private_data
/// holds a reference to its `Volume` for as long as the disk exists.
unsafe extern "C" fn sanblk_submit_bio(bio: *mut bindings::bio) {
    // SAFETY: see the function's contract.
    let volume = unsafe { &*((*(*(*bio).bi_bdev).bd_disk).private_data as *const Volume) };
    submit(volume, bio);
}

fn submit(volume: &Volume, bio: *mut bindings::bio) {
    // SAFETY: `bio` is valid for the duration of this call.
    let (opf, sector, size) = unsafe { ((*bio).bi_opf, (*bio).bi_iter.bi_sector, (*bio).bi_iter.bi_size) };
    let op = opf & REQ_OP_MASK;
    let is_write = match op {
        bindings::req_op_REQ_OP_READ => false,
        bindings::req_op_REQ_OP_WRITE
        | bindings::req_op_REQ_OP_DISCARD
        | bindings::req_op_REQ_OP_WRITE_ZEROES => true,
        _ => return fail_bio(bio, BLK_STS_NOTSUPP),
    };
    if is_write && volume.read_only {
        return fail_bio(bio, BLK_STS_IOERR);
    }
    let offset = sector << 9;
    let preflush = opf & REQ_PREFLUSH != 0;
    // REQ_NOWAIT (io_uring): only a bio that can be remapped in place is served without
    // waiting; any other is refused with BLK_STS_AGAIN, and its submitter re-issues it
    // from a context that may wait (as dm does).
    let nowait = opf & REQ_NOWAIT != 0;
    if nowait && preflush {
        return fail_bio(bio, BLK_STS_AGAIN);
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
            Mapped::new(map, offset, size as u64, true)
        });
        let Some(mapped) = mapped else {
            return fail_bio(bio, BLK_STS_IOERR);
        };
        flush_all_devices(volume, &slots[..count], bio, mapped.epoch);
        if size == 0 {
            // SAFETY: drops the submission reference; completes once the flushes do.
            unsafe { bindings::bio_endio(bio) };
            return;
        }
        mapped
    } else {
        match volume.with_map(|map| Mapped::new(map, offset, size as u64, false)) {
            Some(mapped) => mapped,
            None => return fail_bio(bio, BLK_STS_IOERR),
        }
    };
    let piece = mapped.piece;
    if nowait && piece.length < size as u64 {
        return fail_bio(bio, BLK_STS_AGAIN);
    }
    let mut bio = bio;
    if piece.length < size as u64 {
        // Handle the front piece now and resubmit the rest, which re-enters here: at most one
        // split and MAX_MEMBERS clones are allocated per call.
        // SAFETY: `bio` is valid and longer than the piece; the split comes from our bioset.
        let front = unsafe {
            bindings::bio_split(bio, (piece.length >> 9) as i32, GFP_NOIO, volume.bioset())
        };
        if front.is_null() {
            return fail_bio(bio, BLK_STS_IOERR);
        }
        // SAFETY: `front` completes into `bio`, whose remainder goes back to the block layer.
        unsafe {
            bindings::bio_chain(front, bio);
            bindings::submit_bio_noacct(bio);
        }
        bio = front;
    }

    let count = piece.target_count as usize;
    let targets = &piece.targets[..count.min(MAX_MEMBERS)];
    let info = PieceInfo {
        op: match op {
            bindings::req_op_REQ_OP_READ => Op::Read as u8,
            bindings::req_op_REQ_OP_WRITE => Op::Write as u8,
            _ => 0,
        },
        flags: if opf & REQ_FUA != 0 { FLAG_FUA } else { 0 },
        volume_offset: offset,
        epoch: mapped.epoch,
    };
    // Pieces touching a device already marked failed go straight to the server path (queued
    // for its thread: nothing here waits for the network).
    let redirect = info.op != 0 && volume.server.enabled();
    // A chained bio's status may be set by its children, so its own device's failure could
    // not be told apart: it is cloned, as is a PREFLUSH (its flag is stripped, see above).
    // SAFETY: `bio` is live.
    let in_place = !preflush && unsafe { (*bio).bi_flags } & BIO_CHAIN_FLAG == 0;
    let route = if is_write {
        if redirect && targets.iter().any(|t| !device_healthy(volume, t.device)) {
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
            None => return fail_bio(bio, BLK_STS_IOERR),
        }
    };
    if nowait && !matches!(route, Route::InPlace(_)) {
        return fail_bio(bio, BLK_STS_AGAIN);
    }

    let counters = &volume.counters;
    if is_write {
        counters.write_ios.fetch_add(1, Ordering::Relaxed);
        counters.written_bytes.fetch_add(piece.length, Ordering::Relaxed);
    } else {
        counters.read_ios.fetch_add(1, Ordering::Relaxed);
        counters.read_bytes.fetch_add(piece.length, Ordering::Relaxed);
    }

    match route {
        Route::ToServer => {
            account_at_completion(bio, op);
            to_server(volume, bio, &info);
        }
        Route::InPlace(target) => {
            if remap_in_place(volume, bio, op, target.device, target.offset >> 9, &info) {
                return;
            }
            if nowait {
                // No context without waiting (or a SAN device that cannot take REQ_NOWAIT):
                // re-issued by the submitter. The final bio_endio below completes it.
                // SAFETY: `bio` is live and ours.
                unsafe { (*bio).bi_status = BLK_STS_AGAIN };
            } else {
                account_at_completion(bio, op);
                clone_to(volume, bio, target.device, target.offset >> 9, is_write, &info);
            }
        }
        Route::Clones(targets) => {
            account_at_completion(bio, op);
            for target in targets {
                clone_to(volume, bio, target.device, target.offset >> 9, is_write, &info);
            }
        }
    }
    // SAFETY: drops the submission reference; the bio completes when its clones do.
    unsafe { bindings::bio_endio(bio) };
}

/// Where the front piece of a bio goes.
enum Route<'a> {
    /// A device it touches is marked failed: the whole piece goes to the server path.
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
}

impl Mapped {
    /// `None` when the range lies outside the map (an empty PREFLUSH maps to a zero-length piece).
    #[inline]
    fn new(map: &MapState, offset: u64, length: u64, preflush: bool) -> Option<Mapped> {
        let mut piece = if length == 0 && preflush {
            Piece { length: 0, target_count: 0, targets: [Target { device: 0, offset: 0 }; MAX_MEMBERS] }
        } else {
            map.map(offset, length)?
        };
        for target in piece.targets.iter_mut().take(piece.target_count as usize) {
            target.device = slot_of(&map.slots, target.device);
        }
        Some(Mapped { piece, epoch: map.epoch })
    }
}

/// The volume device slot of map device `index` (u32::MAX, an empty slot, if out of range).
fn slot_of(slots: &[u32], index: u32) -> u32 {
    slots.get(index as usize).copied().unwrap_or(u32::MAX)
}

/// Whether a piece's error status means its device failed, rather than that the device does
/// not support the request (a discard on a disk without discard) or would have had to wait
/// for a REQ_NOWAIT one (BLK_STS_AGAIN: its submitter re-issues it): only a failure marks the
/// path failed and is redirected.
fn device_failed(status: bindings::blk_status_t) -> bool {
    status != 0 && status != BLK_STS_NOTSUPP && status != BLK_STS_AGAIN
}

/// Whether a completion status counts in the volume's error counter: a REQ_NOWAIT bio refused
/// with BLK_STS_AGAIN is re-issued by its submitter, not failed.
fn counts_as_error(status: bindings::blk_status_t) -> bool {
    status != 0 && status != BLK_STS_AGAIN
}

fn device_healthy(volume: &Volume, slot: u32) -> bool {
    volume
        .devices
        .get(slot)
        .map(|d| d.state() == crate::abi::DeviceState::Healthy as u32)
        .unwrap_or(false)
}

/// Records in the clone's reserved context what the server path needs to re-issue it.
///
/// # Safety
///
/// `clone` is a live bio of the volume's bioset, cloned from `parent` and not yet submitted.
unsafe fn fill_piece(clone: *mut bindings::bio, parent: *mut bindings::bio, info: &PieceInfo) {
    // SAFETY: the context lies in front of the clone in the same allocation (contract).
    unsafe { record_piece(ServerPiece::of(clone), clone, parent, info, PieceOwner::Clone) };
}

/// Records in `piece` what the server path needs to re-issue `data` (its iterator and
/// vector, as they are before submission) and to complete `parent`.
///
/// # Safety
///
/// `piece` is writable and ours; `data` is a live bio not yet submitted.
unsafe fn record_piece(
    piece: *mut ServerPiece,
    data: *mut bindings::bio,
    parent: *mut bindings::bio,
    info: &PieceInfo,
    owner: PieceOwner,
) {
    // SAFETY: see the function's contract.
    unsafe {
        (*piece).parent = parent;
        (*piece).volume_offset = info.volume_offset;
        (*piece).epoch = info.epoch;
        (*piece).iter = (*data).bi_iter;
        (*piece).bvecs = (*data).bi_io_vec;
        (*piece).op = info.op;
        (*piece).flags = info.flags;
        (*piece).stale_retries = 0;
        (*piece).owner = owner;
    }
}

/// Sends `bio` itself on to device `slot` at `device_sector`, its completion hooked so a
/// failure can still be redirected. `false`, with `bio` untouched, when no context could be
/// had without waiting: the caller clones instead.
fn remap_in_place(
    volume: &Volume,
    bio: *mut bindings::bio,
    op: bindings::req_op,
    slot: u32,
    device_sector: u64,
    info: &PieceInfo,
) -> bool {
    let Some(device) = volume.devices.get(slot) else {
        return false;
    };
    // SAFETY: `bio` is live; the device's bdev is open, its disk and queue live with it.
    let refuses_nowait = unsafe {
        (*bio).bi_opf & REQ_NOWAIT != 0
            && (*(*(*device.bdev()).bd_disk).queue).limits.features & BLK_FEAT_NOWAIT == 0
    };
    if refuses_nowait {
        return false;
    }
    let context = alloc_context();
    if context.is_null() {
        return false;
    }
    volume.inflight.fetch_add(1, Ordering::AcqRel);
    // SAFETY: `context` is ours; `bio` is live, ours until submitted, and unchained (checked
    // by the caller), so its own completion is the only one its status can come from. The
    // device's bdev is open while the volume exists.
    unsafe {
        record_piece(addr_of_mut!((*context).piece), bio, bio, info, PieceOwner::InPlace);
        hook(context, bio, op);
        (*context).slot = slot;
        sanblk_bio_set_dev(bio.cast(), device.bdev().cast());
        (*bio).bi_iter.bi_sector = device_sector;
        (*bio).bi_end_io = Some(in_place_endio);
        (*bio).bi_private = context.cast();
        bindings::submit_bio_noacct(bio);
    }
    true
}

/// # Safety
///
/// Completion of a bio sent on by [`remap_in_place`]: `bi_private` is its context.
unsafe extern "C" fn in_place_endio(bio: *mut bindings::bio) {
    // SAFETY: see the function's contract; the volume outlives its in-flight bios because
    // `Volume::remove_disk` waits for `inflight` to reach zero.
    unsafe {
        let context = (*bio).bi_private.cast::<HookedBio>();
        // Back to the sanblk disk as it came. bio_endio already released the SAN device's
        // cgroup association, so the block device pointer is all there is to restore.
        (*bio).bi_end_io = (*context).end_io;
        (*bio).bi_private = (*context).private;
        (*bio).bi_bdev = (*context).bdev;
        let volume = &*((*(*(*context).bdev).bd_disk).private_data as *const Volume);
        let status = (*bio).bi_status;
        if device_failed(status) {
            if let Some(device) = volume.devices.get((*context).slot) {
                device.note_error();
            }
            let piece = addr_of_mut!((*context).piece);
            if redirectable(volume, piece) {
                // Redirect instead of failing, as for a clone: the server path re-issues the
                // piece from the recorded iterator and completes the bio (with an error only
                // if the server fails it too).
                (*bio).bi_iter = (*piece).iter;
                (*bio).bi_status = 0;
                queue_to_server(volume, piece);
                return;
            }
        }
        if counts_as_error(status) {
            volume.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        finish(context);
        // Completes the bio to its submitter: the end_io restored above runs now.
        bindings::bio_endio(bio);
        volume.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Hands the whole of `bio` to the server path (its target device is marked failed).
fn to_server(volume: &Volume, bio: *mut bindings::bio, info: &PieceInfo) {
    // SAFETY: `bio` is live; the clone only carries the piece (its iterator and vector) and
    // is never submitted. GFP_NOIO with the bioset's mempool: never fails.
    let clone = unsafe { bindings::bio_alloc_clone((*bio).bi_bdev, bio, GFP_NOIO, volume.bioset()) };
    if clone.is_null() {
        // SAFETY: `bio` is live; the final bio_endio completes it with the error.
        unsafe { (*bio).bi_status = BLK_STS_IOERR };
        return;
    }
    volume.inflight.fetch_add(1, Ordering::AcqRel);
    // SAFETY: `clone` is ours; the parent gets one more completion, given by the server path.
    unsafe {
        fill_piece(clone, bio, info);
        sanblk_bio_inc_remaining(bio.cast());
        queue_to_server(volume, ServerPiece::of(clone));
    }
}

/// Whether a failed piece can go to the server path instead of failing: a read or write
/// (not a discard) of a volume with a server path.
///
/// # Safety
///
/// `piece` is live.
unsafe fn redirectable(volume: &Volume, piece: *const ServerPiece) -> bool {
    // SAFETY: see the function's contract.
    let op = unsafe { (*piece).op };
    op != 0 && volume.server.enabled()
}

/// Queues `piece`, with the in-flight count it holds, for the server thread, which completes
/// it. The extra count around the wake-up keeps the thread alive while it is woken (teardown
/// waits for in-flight to reach zero before stopping it).
///
/// # Safety
///
/// `piece` is live, ours, on no list, and counted in `volume.inflight`.
unsafe fn queue_to_server(volume: &Volume, piece: *mut ServerPiece) {
    volume.inflight.fetch_add(1, Ordering::AcqRel);
    // SAFETY: see the function's contract.
    unsafe { volume.server.queue(piece) };
    volume.inflight.fetch_sub(1, Ordering::AcqRel);
}

/// Sends a clone of `bio` (same length and pages) to device `index` at `device_sector`.
fn clone_to(volume: &Volume, bio: *mut bindings::bio, index: u32, device_sector: u64, strip_flush: bool, info: &PieceInfo) {
    let Some(device) = volume.devices.get(index) else {
        // SAFETY: `bio` is live; record the failure, the final bio_endio completes it.
        unsafe { (*bio).bi_status = BLK_STS_IOERR };
        return;
    };
    // SAFETY: `bio` is live and the device's bdev is open; the clone comes from our bioset
    // (GFP_NOIO with a mempool: may wait for a clone to complete, never fails).
    let clone = unsafe { bindings::bio_alloc_clone(device.bdev(), bio, GFP_NOIO, volume.bioset()) };
    if clone.is_null() {
        // SAFETY: as above.
        unsafe { (*bio).bi_status = BLK_STS_IOERR };
        return;
    }
    volume.inflight.fetch_add(1, Ordering::AcqRel);
    // SAFETY: `clone` is ours until submitted; the parent gets one more completion to wait for.
    unsafe {
        fill_piece(clone, bio, info);
        (*clone).bi_iter.bi_sector = device_sector;
        if strip_flush {
            (*clone).bi_opf &= !REQ_PREFLUSH;
        }
        (*clone).bi_end_io = Some(clone_endio);
        (*clone).bi_private = bio.cast();
        sanblk_bio_inc_remaining(bio.cast());
        bindings::submit_bio_noacct(clone);
    }
}

/// Issues an empty PREFLUSH to every device of the volume, each completing into `bio`.
fn flush_all_devices(volume: &Volume, slots: &[u32], bio: *mut bindings::bio, epoch: u64) {
    let info = PieceInfo { op: Op::Flush as u8, flags: 0, volume_offset: 0, epoch };
    for device in slots.iter().filter_map(|slot| volume.devices.get(*slot)) {
        // SAFETY: a data-less bio from our bioset for an open device.
        let flush = unsafe {
            bindings::bio_alloc_bioset(
                device.bdev(),
                0,
                bindings::req_op_REQ_OP_WRITE | REQ_PREFLUSH,
                GFP_NOIO,
                volume.bioset(),
            )
        };
        if flush.is_null() {
            // SAFETY: `bio` is live.
            unsafe { (*bio).bi_status = BLK_STS_IOERR };
            continue;
        }
        volume.inflight.fetch_add(1, Ordering::AcqRel);
        // SAFETY: as in `clone_to`.
        unsafe {
            fill_piece(flush, bio, &info);
            (*flush).bi_end_io = Some(clone_endio);
            (*flush).bi_private = bio.cast();
            sanblk_bio_inc_remaining(bio.cast());
            bindings::submit_bio_noacct(flush);
        }
    }
}

/// # Safety
///
/// Completion of a clone or flush issued by this module: `bi_private` is its parent bio,
/// which waits for this completion and is addressed to a live sanblk disk.
unsafe extern "C" fn clone_endio(clone: *mut bindings::bio) {
    // SAFETY: see the function's contract; the volume outlives its in-flight clones because
    // `Volume::remove_disk` waits for `inflight` to reach zero.
    unsafe {
        let parent = (*clone).bi_private as *mut bindings::bio;
        let volume = &*((*(*(*parent).bi_bdev).bd_disk).private_data as *const Volume);
        let status = (*clone).bi_status;
        if device_failed(status) {
            let bdev = (*clone).bi_bdev;
            if let Some((_, device)) = volume.devices.iter().find(|(_, d)| d.bdev() == bdev) {
                device.note_error();
            }
            let piece = ServerPiece::of(clone);
            if redirectable(volume, piece) {
                // Redirect instead of failing: the clone, its in-flight count and its share
                // of the parent pass to the server path, which completes the parent.
                queue_to_server(volume, piece);
                return;
            }
        }
        if status != 0 {
            if counts_as_error(status) {
                volume.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            (*parent).bi_status = status;
        }
        bindings::bio_put(clone);
        bindings::bio_endio(parent);
        volume.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}
