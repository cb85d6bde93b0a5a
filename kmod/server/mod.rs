// SPDX-License-Identifier: GPL-2.0

//! The server path (second data path), by job: [`path`] is its state in a volume (addresses,
//! the pieces handed over, the thread handle); `connection` a connection to the server's I/O
//! service; `wire` the requests on the wire and the reply stream; [`thread`] the volume's
//! thread that drives them. `path` sits below the volume, the rest above it.

mod connection;
pub(crate) mod path;
pub(crate) mod thread;
mod wire;
