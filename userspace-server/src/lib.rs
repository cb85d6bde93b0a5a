//! `sand`, the sanblk server, as a library: the server itself plus everything a client agent
//! needs (control-protocol client with the client side of authentication, map types, label
//! reader).

// Moved to `sanblk-proto`; re-exported until sand's users import it from there.
pub use sanblk_proto::{auth, client, label, map, protocol};

pub mod admin;
pub mod agent_service;
pub mod allocator;
pub mod config;
pub mod io_service;
pub mod recovery;
pub mod server;
pub mod state;
pub mod store;
