//! The NBD server: snapshots exported read-only as NBD "pseudo-devices" on a Unix socket, so
//! stock tools (`qemu-img`, `nbdcopy`, the kernel's `nbd-client`) and sanblk's own client
//! (`sanblk_proto::nbd::NbdClient`) can read them, and ask which blocks changed since the
//! previous snapshot (the `sanblk:changed` metadata context). An export may also be writable
//! ([`Export::writable`]): a new volume a backup image is restored onto, with the same tools.
//!
//! - this file: what is exported ([`Export`], [`Exports`]), the accept loop with its peer
//!   check, and the life of a connection;
//! - `handshake`: option haggling, up to the chosen export;
//! - `contexts`: the metadata contexts and how queries name them;
//! - `transmission`: the requests on the chosen export.
//!
//! The socket is local and the peer is authenticated by its credentials (root or one allowed
//! uid), so there is no TLS. Everything the peer sends is bounded: option data, the number of
//! options, the handshake's duration, request lengths, and the number of connections.

mod contexts;
mod handshake;
mod transmission;

use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::log_text::peer_text;

/// What the server exports: a snapshot (read-only), or a volume being restored (writable).
///
/// The write side is provided methods, so read-only exports need not mention it: they are
/// never asked to write, because the server refuses writes unless [`Export::writable`] says
/// otherwise.
pub trait Export: Send + Sync + 'static {
    fn size(&self) -> u64;
    /// Reads exactly buf.len() bytes at offset. Blocking (called inside spawn_blocking).
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Changed-since-previous-snapshot status from `offset` for up to `length` bytes: a
    /// non-empty list of (length, flags) runs, starting at offset, flags = CHANGED_FLAG or 0.
    /// Blocking.
    fn changed(&self, offset: u64, length: u64) -> std::io::Result<Vec<(u64, u32)>>;
    /// Whether clients may write; [`Export::write`] and [`Export::flush`] are called only if
    /// so. Asked during the handshake, so it must not block; a session keeps the answer it
    /// got when the client chose the export, so what was advertised is what is enforced.
    fn writable(&self) -> bool {
        false
    }
    /// Writes all of `data` at `offset` (the server has checked the range lies inside the
    /// export). May leave the data in a volatile cache until [`Export::flush`]. Blocking.
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let _ = (offset, data);
        Err(std::io::Error::from_raw_os_error(libc::EPERM))
    }
    /// Makes every write that returned before this call durable. Blocking.
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Finds exports by name. Both calls may block (they run inside spawn_blocking).
pub trait Exports: Send + Sync + 'static {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, String>;
    fn names(&self) -> Vec<String>;
}

/// How long a client may take to choose an export.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed on accept. Each may hold a 32 MiB read or
/// write buffer, so this also bounds the memory clients can make the server use.
const MAX_CONNECTIONS: usize = 64;
/// How long connections get to end by themselves after shutdown before they are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed accept (typically EMFILE) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves NBD on `listener` until `shutdown` becomes true (or its sender goes away), then
/// waits for the connections to end, which they do at their next request boundary.
pub async fn serve(
    listener: UnixListener,
    exports: Arc<dyn Exports>,
    allowed_uid: u32,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let mut next_connection = 0u64;
    loop {
        tokio::select! {
            _ = shutdown_signalled(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Some(uid) = admitted_uid(&stream, allowed_uid) else { continue };
                    if connections.len() >= MAX_CONNECTIONS {
                        warn!("NBD: refusing a connection from uid {uid}: {MAX_CONNECTIONS} already open");
                        continue;
                    }
                    next_connection += 1;
                    let connection = Connection {
                        id: next_connection,
                        uid,
                        exports: exports.clone(),
                        shutdown: shutdown.clone(),
                    };
                    connections.spawn(connection.run(stream));
                }
                Err(e) => {
                    warn!("NBD: accepting a connection: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    let all_ended = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, all_ended)
        .await
        .is_err()
    {
        warn!(
            "NBD: {} connections still open {SHUTDOWN_GRACE:?} after shutdown; cutting them",
            connections.len()
        );
        connections.shutdown().await;
    }
}

/// Whether a peer with `uid` may use the exports: root, or the one user they are for.
pub fn peer_allowed(uid: u32, allowed_uid: u32) -> bool {
    uid == 0 || uid == allowed_uid
}

/// The peer's uid if it may connect; otherwise logs why not (the stream is then dropped,
/// which closes it before a byte is sent).
fn admitted_uid(stream: &UnixStream, allowed_uid: u32) -> Option<u32> {
    match stream.peer_cred() {
        Ok(credentials) if peer_allowed(credentials.uid(), allowed_uid) => Some(credentials.uid()),
        Ok(credentials) => {
            warn!(
                "NBD: refusing a connection from uid {} (only root and uid {allowed_uid} may connect)",
                credentials.uid()
            );
            None
        }
        Err(e) => {
            warn!("NBD: refusing a connection whose credentials cannot be read: {e}");
            None
        }
    }
}

/// Resolves once `shutdown` is true or its sender is gone (the server is going away either
/// way).
async fn shutdown_signalled(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Why a connection ended before the client disconnected.
#[derive(Debug, thiserror::Error)]
enum Hangup {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol, or asked for something that can only end the session.
    #[error("{0}")]
    Protocol(String),
}

impl Hangup {
    fn protocol(message: impl Into<String>) -> Hangup {
        Hangup::Protocol(message.into())
    }

    /// Whether the client simply went away, which is no reason for a warning.
    fn client_left(&self) -> bool {
        matches!(self, Hangup::Io(e) if matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
        ))
    }
}

/// Runs `work` on the blocking pool: export calls do disk I/O.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| std::io::Error::other(format!("export task failed: {e}")))?
}

struct Connection {
    /// Numbers the connection in the log.
    id: u64,
    uid: u32,
    exports: Arc<dyn Exports>,
    shutdown: watch::Receiver<bool>,
}

impl Connection {
    async fn run(mut self, stream: UnixStream) {
        let id = self.id;
        info!("NBD #{id}: connection from uid {}", self.uid);
        let (read_half, write_half) = stream.into_split();
        let mut reader = BufReader::new(read_half);
        let mut writer = BufWriter::new(write_half);
        let negotiated = tokio::select! {
            _ = shutdown_signalled(&mut self.shutdown) => return,
            negotiated = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                handshake::negotiate(&mut reader, &mut writer, &self.exports),
            ) => negotiated,
        };
        let session = match negotiated {
            Ok(Ok(Some(session))) => session,
            Ok(Ok(None)) => {
                info!("NBD #{id}: client ended the handshake");
                return;
            }
            Ok(Err(hangup)) => {
                log_hangup(id, "handshake", &hangup);
                return;
            }
            Err(_) => {
                warn!("NBD #{id}: no export chosen within {HANDSHAKE_TIMEOUT:?}; closing");
                return;
            }
        };
        info!(
            "NBD #{id}: export {} opened ({}, {} bytes, {} replies, contexts {:?})",
            peer_text(&session.name),
            if session.writable {
                "writable"
            } else {
                "read-only"
            },
            session.export.size(),
            if session.structured_replies {
                "structured"
            } else {
                "simple"
            },
            session.context_names(),
        );
        match transmission::serve_requests(&mut reader, &mut writer, &session, &mut self.shutdown)
            .await
        {
            Ok(transmission::End::Disconnected) => info!("NBD #{id}: client disconnected"),
            Ok(transmission::End::Shutdown) => info!("NBD #{id}: closed for shutdown"),
            Err(hangup) => log_hangup(id, "transmission", &hangup),
        }
        let _ = writer.shutdown().await;
    }
}

fn log_hangup(id: u64, phase: &str, hangup: &Hangup) {
    if hangup.client_left() {
        info!("NBD #{id}: client went away during {phase}: {hangup}");
    } else {
        warn!("NBD #{id}: closing during {phase}: {hangup}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_and_the_allowed_uid_may_connect() {
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(!peer_allowed(65534, 1000));
        assert!(peer_allowed(0, 0));
        assert!(!peer_allowed(1000, 0));
    }
}
