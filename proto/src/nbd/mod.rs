//! NBD (Network Block Device) wire formats and a client, for the exports `sand` serves:
//! read-only snapshots, and writable volumes a backup image is restored onto. The protocol is
//! <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>: a fixed newstyle
//! handshake (options), then requests answered by simple or structured replies. Only what
//! those exports need is here: reads, block status, writes and flushes; no TLS, no extended
//! headers, no trim or write zeroes from the client.
//!
//! Besides the standard `base:allocation`, the exports offer one metadata context of their own,
//! [`CHANGED_CONTEXT`], whose flag [`CHANGED_FLAG`] marks the blocks that changed since the
//! previous snapshot: what an incremental backup has to copy.
//!
//! The wire headers ([`Request`], [`OptionHeader`], ...) are shared with the server so both
//! ends encode them in one place; the client, [`NbdClient`], bounds everything it reads from
//! the server.
//!
//! [`wire`] holds the protocol's constants and headers, [`client`] the client.

pub mod client;
pub mod wire;

pub use client::*;
pub use wire::*;
