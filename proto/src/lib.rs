//! `sanblk-proto`: what the server (`sand`), the CLI and agent (`sanctl`) and the end-to-end
//! tests share about the control plane.

pub mod auth;
pub mod client;
pub mod label;
pub mod map;
pub mod protocol;
