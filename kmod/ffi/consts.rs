// SPDX-License-Identifier: GPL-2.0

//! Kernel constants, each defined once. Taken from `kernel::bindings` wherever bindgen exports
//! them; the others are C macros with casts (`((__force blk_status_t)10)`, `(1u << n)` over a
//! typedef) or from headers 6.12's bindings do not include, so they are written here, next
//! to the C definition they restate.

use kernel::bindings;

/// `GFP_KERNEL` as a raw mask (for C calls that take one).
pub(crate) const GFP_KERNEL_RAW: bindings::gfp_t = bindings::GFP_KERNEL;
pub(crate) use bindings::GFP_NOWAIT;

/// Block-layer completion status (`blk_status_t`).
pub(crate) type BlkStatus = bindings::blk_status_t;
pub(crate) const BLK_STS_OK: BlkStatus = bindings::BLK_STS_OK as BlkStatus;
/// include/linux/blk_types.h: `BLK_STS_NOTSUPP ((__force blk_status_t)1)`.
pub(crate) const BLK_STS_NOTSUPP: BlkStatus = 1;
/// include/linux/blk_types.h: `BLK_STS_IOERR ((__force blk_status_t)10)`.
pub(crate) const BLK_STS_IOERR: BlkStatus = 10;
/// include/linux/blk_types.h: `BLK_STS_AGAIN ((__force blk_status_t)12)`.
pub(crate) const BLK_STS_AGAIN: BlkStatus = 12;

/// Block operation (`enum req_op`).
pub(crate) type ReqOp = bindings::req_op;
pub(crate) const REQ_OP_READ: ReqOp = bindings::req_op_REQ_OP_READ;
pub(crate) const REQ_OP_WRITE: ReqOp = bindings::req_op_REQ_OP_WRITE;
pub(crate) const REQ_OP_DISCARD: ReqOp = bindings::req_op_REQ_OP_DISCARD;
pub(crate) const REQ_OP_WRITE_ZEROES: ReqOp = bindings::req_op_REQ_OP_WRITE_ZEROES;

/// Operation and flags of a bio (`blk_opf_t`).
pub(crate) type Opf = bindings::blk_opf_t;
pub(crate) const REQ_OP_MASK: Opf = (1 << bindings::REQ_OP_BITS) - 1;
pub(crate) const REQ_PREFLUSH: Opf = 1 << bindings::req_flag_bits___REQ_PREFLUSH;
pub(crate) const REQ_FUA: Opf = 1 << bindings::req_flag_bits___REQ_FUA;
pub(crate) const REQ_NOWAIT: Opf = 1 << bindings::req_flag_bits___REQ_NOWAIT;

/// `GFP_NOIO` (`__GFP_RECLAIM`): bindings export only GFP_KERNEL, GFP_NOWAIT and GFP_ATOMIC.
pub(crate) const GFP_NOIO: bindings::gfp_t =
    (1 << bindings::___GFP_DIRECT_RECLAIM_BIT) | (1 << bindings::___GFP_KSWAPD_RECLAIM_BIT);

/// Queue features (`blk_features_t`, include/linux/blkdev.h `(__force blk_features_t)(1u << n)`;
/// bindings export only BLK_FEAT_ROTATIONAL).
pub(crate) type Features = bindings::blk_features_t;
pub(crate) const BLK_FEAT_WRITE_CACHE: Features = 1 << 0;
pub(crate) const BLK_FEAT_FUA: Features = 1 << 1;
pub(crate) const BLK_FEAT_IO_STAT: Features = 1 << 4;
pub(crate) const BLK_FEAT_NOWAIT: Features = 1 << 7;

/// include/linux/blkdev.h `BLK_OPEN_*` (`(__force blk_mode_t)(1 << n)`).
pub(crate) const BLK_OPEN_READ: bindings::blk_mode_t = 1 << 0;
pub(crate) const BLK_OPEN_WRITE: bindings::blk_mode_t = 1 << 1;
pub(crate) const BLK_OPEN_EXCL: bindings::blk_mode_t = 1 << 2;

/// poll bits meaning "a read will not block": EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP
/// (include/uapi/linux/eventpoll.h, not in 6.12's bindings).
pub(crate) const POLL_READABLE: u32 = 0x1 | 0x8 | 0x10 | 0x2000;
/// include/uapi/linux/in.h `IPPROTO_TCP` (an enum of a header the bindings lack).
pub(crate) const IPPROTO_TCP: i32 = 6;
/// include/uapi/linux/tcp.h socket options.
pub(crate) const TCP_NODELAY: i32 = 1;
pub(crate) const TCP_QUICKACK: i32 = 12;

/// -ESTALE, as the server's replies carry it.
pub(crate) const ESTALE: i32 = -(bindings::ESTALE as i32);
