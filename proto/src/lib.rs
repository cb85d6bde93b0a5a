//! `sanblk-proto`: what the server (`sand`), the CLI and agent (`sanctl`) and the end-to-end
//! tests share about the control plane. Nothing here depends on the server.
//!
//! Layers, lowest first; a module imports only from layers below it:
//! 1. `map` (the serde volume map and its units), `auth` (the handshake's MACs, nonces and the
//!    client's secret file), `label` (the on-disk device label and its reader), `unix_path`
//!    (Unix socket paths longer than `sockaddr_un` holds).
//! 2. `protocol`: frames (length-prefixed JSON with a version), agent and admin messages,
//!    each agent and admin request paired with its reply type.
//! 3. `client`: the admin client (Unix socket) and the agent client (TCP, authenticated).

pub mod auth;
pub mod client;
pub mod label;
pub mod map;
pub mod nbd;
pub mod protocol;
pub mod unix_path;
