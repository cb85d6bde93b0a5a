//! `sand`, the sanblk server, as a library for its binaries: `sand` itself (`config`,
//! `server`) and the benches (`sand-bench`, `sand-iobench`). Everything else is private; the
//! control protocol, map, clients and label reader that clients need are in `sanblk-proto`.

mod admin;
mod agent_service;
mod allocator;
pub mod config;
mod device;
mod io_service;
mod labelling;
mod recovery;
mod secrets;
pub mod server;
mod service_error;
mod state;
mod store;

/// The I/O bench builds its payloads in the same aligned buffers as the server's O_DIRECT I/O.
pub use io_service::AlignedBuf;
