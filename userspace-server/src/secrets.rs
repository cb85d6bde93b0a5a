//! Secrets the server issues: client secrets (`client add`) and session tokens of the server
//! I/O path (attach). The handshake's MACs are in `sanblk_proto::auth`.

use sanblk_proto::auth::{random_bytes, SECRET_BYTES};

const SESSION_TOKEN_BYTES: usize = 32;

/// A new client secret, hex encoded (that is how it is printed, stored and read back).
pub fn new_secret_hex() -> String {
    hex::encode(random_bytes::<SECRET_BYTES>())
}

/// A new session token for the server I/O path, hex encoded.
pub fn new_session_token_hex() -> String {
    hex::encode(random_bytes::<SESSION_TOKEN_BYTES>())
}
