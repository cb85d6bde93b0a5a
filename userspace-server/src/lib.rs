//! `sand`, the sanblk server, as a library for its binaries: `sand` itself (`config`,
//! `server`) and the benches (`sand-bench`, `sand-iobench`, which also use `AlignedBuf`).
//! Everything else is private. What clients share with the server (control protocol, map,
//! clients, label reader) is in `sanblk-proto`.
//!
//! Layers, lowest first; a module imports only from layers below it:
//! 1. `config` (flags and file), `allocator` (extent placement), `labelling` (writing device
//!    labels), `secrets` (client secrets, session tokens), `failpoint` (test-only crash
//!    points), `log_text` (peer-supplied text made safe to log).
//! 2. `store`: the redb metadata (pool, volumes, recovery records, snapshots, clients,
//!    sessions), with its own error type; `nbd`: the NBD protocol server (exports behind a
//!    trait).
//! 3. `service_error`: the wire error the services answer with, and the store errors mapped
//!    onto it; `device`: the server's own path to the SAN devices (aligned buffers, opened
//!    device files, request pieces).
//! 4. `recovery_gate`: what I/O must know about a running recovery (the write gate, the read
//!    and write plans); `snapshot`: the snapshots' COW stores and copy-on-write.
//! 5. `state`: the shared server state (store, config, live attachments and maps, recovery
//!    statuses), behind one lock for the live part.
//! 6. `recovery` (the copy job), `io_service` (the server I/O path), `snapshot_export` (the
//!    snapshots as NBD exports).
//! 7. `admin`, `agent_service`, `relocation_admin`, `snapshot_admin`: the control-protocol
//!    services.
//! 8. `server`: listeners, startup, shutdown.

mod admin;
mod agent_service;
mod allocator;
mod change;
pub mod config;
mod device;
mod failpoint;
mod io_service;
mod labelling;
mod log_text;
pub mod nbd;
mod recovery;
mod recovery_gate;
mod relocation_admin;
mod secrets;
pub mod server;
mod service_error;
mod snapshot;
mod snapshot_admin;
mod snapshot_export;
mod state;
mod store;

/// The I/O bench builds its payloads in the same aligned buffers as the server's O_DIRECT I/O.
pub use device::AlignedBuf;
