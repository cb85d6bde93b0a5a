//! Mutual challenge–response authentication (HMAC-SHA256 over fresh nonces from both sides).
//!
//! 1. client -> server: hello { client name, client nonce (32 random bytes) }
//! 2. server -> client: server nonce (32 random bytes), HMAC(secret, "server" | cn | sn)
//! 3. client verifies the server, then sends HMAC(secret, "client" | sn | cn)
//! 4. server verifies and answers auth_ok, or a generic "authentication failed".
//!
//! The secret never crosses the wire. Because each side contributes a fresh nonce, a recorded
//! response is useless in a later handshake. The two MACs use distinct prefixes and nonce
//! orders, so a server MAC cannot be reflected back as a client MAC.
//!
//! Both roles' MACs are defined here, side by side, because they are one definition: the
//! server computes the MAC the client verifies and the other way round. The client's own
//! part (its secret file, the handshake it drives) is in this crate too; the server's (issuing
//! secrets and session tokens, the handshake it answers) is in sand.

use std::path::Path;

use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

pub const NONCE_BYTES: usize = 32;
pub const SECRET_BYTES: usize = 32;

/// Fresh random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    OsRng.fill_bytes(&mut bytes);
    bytes
}

pub fn new_nonce() -> [u8; NONCE_BYTES] {
    random_bytes()
}

/// Decodes a hex secret (whitespace around it, e.g. a trailing newline in a file, is ignored).
pub fn decode_secret(secret_hex: &str) -> Result<Vec<u8>, String> {
    let bytes =
        hex::decode(secret_hex.trim()).map_err(|_| "secret is not valid hex".to_string())?;
    if bytes.len() != SECRET_BYTES {
        return Err(format!(
            "secret must be {SECRET_BYTES} bytes, got {}",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// Reads a client secret file (hex, as printed by `sanctl client add`).
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    decode_secret(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn mac_over(secret: &[u8], role: &[u8], first: &[u8], second: &[u8]) -> HmacSha256 {
    // new_from_slice accepts any key length for HMAC, so this never fails; fall back to an
    // empty-key MAC that simply will not verify rather than panicking.
    let mut mac = HmacSha256::new_from_slice(secret)
        .unwrap_or_else(|_| <HmacSha256 as hmac::digest::KeyInit>::new(&Default::default()));
    mac.update(role);
    mac.update(first);
    mac.update(second);
    mac
}

/// The server's proof: HMAC(secret, "server" | client_nonce | server_nonce).
pub fn server_proof(secret: &[u8], client_nonce: &[u8], server_nonce: &[u8]) -> Vec<u8> {
    mac_over(secret, b"server", client_nonce, server_nonce)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// The client's proof: HMAC(secret, "client" | server_nonce | client_nonce).
pub fn client_proof(secret: &[u8], server_nonce: &[u8], client_nonce: &[u8]) -> Vec<u8> {
    mac_over(secret, b"client", server_nonce, client_nonce)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Constant-time check of a server proof.
pub fn verify_server_proof(
    secret: &[u8],
    client_nonce: &[u8],
    server_nonce: &[u8],
    proof: &[u8],
) -> bool {
    mac_over(secret, b"server", client_nonce, server_nonce)
        .verify_slice(proof)
        .is_ok()
}

/// Constant-time check of a client proof.
pub fn verify_client_proof(
    secret: &[u8],
    server_nonce: &[u8],
    client_nonce: &[u8],
    proof: &[u8],
) -> bool {
    mac_over(secret, b"client", server_nonce, client_nonce)
        .verify_slice(proof)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_right_secret_and_nonces() {
        let secret = random_bytes::<SECRET_BYTES>();
        let other = random_bytes::<SECRET_BYTES>();
        let (cn, sn) = (new_nonce(), new_nonce());
        let proof = client_proof(&secret, &sn, &cn);
        assert!(verify_client_proof(&secret, &sn, &cn, &proof));
        assert!(!verify_client_proof(&other, &sn, &cn, &proof));
        assert!(!verify_client_proof(&secret, &new_nonce(), &cn, &proof));
        let server = server_proof(&secret, &cn, &sn);
        assert!(verify_server_proof(&secret, &cn, &sn, &server));
        // A server proof cannot be reflected as a client proof.
        assert!(!verify_client_proof(&secret, &sn, &cn, &server));
    }
}
