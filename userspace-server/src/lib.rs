//! `sand`, the sanblk server, as a library: the server itself plus everything a client agent
//! needs (control-protocol client with the client side of authentication, map types, label
//! reader).

pub mod admin;
pub mod agent_service;
pub mod allocator;
pub mod auth;
pub mod client;
pub mod config;
pub mod io_service;
pub mod label;
pub mod map;
pub mod protocol;
pub mod recovery;
pub mod server;
pub mod state;
pub mod store;
