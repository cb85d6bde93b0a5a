//! A host TCP port that leads to a Unix socket, so a guest (which reaches the host only through
//! forwarded TCP ports) can use a service that listens on a Unix socket only, such as `sand`'s
//! NBD export. Bytes are copied unchanged in both directions, one connection per guest
//! connection; the bridge lives as long as its [`UnixBridge`].

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

/// Listens on `127.0.0.1:port` until dropped.
pub struct UnixBridge {
    port: u16,
    stopping: Arc<AtomicBool>,
}

impl UnixBridge {
    /// Starts a bridge from a free loopback port to `socket`.
    pub fn start(socket: &Path) -> io::Result<UnixBridge> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let port = listener.local_addr()?.port();
        let stopping = Arc::new(AtomicBool::new(false));
        let (socket, stop) = (socket.to_path_buf(), stopping.clone());
        thread::spawn(move || {
            for accepted in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(tcp) = accepted else { continue };
                let socket = socket.clone();
                thread::spawn(move || {
                    if let Err(error) = bridge(tcp, &socket) {
                        eprintln!("unix bridge to {}: {error}", socket.display());
                    }
                });
            }
        });
        Ok(UnixBridge { port, stopping })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for UnixBridge {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn bridge(tcp: TcpStream, socket: &Path) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let unix = UnixStream::connect(socket)?;
    let (mut tcp_in, mut unix_out) = (tcp.try_clone()?, unix.try_clone()?);
    let upstream = thread::spawn(move || {
        let copied = io::copy(&mut tcp_in, &mut unix_out);
        let _ = unix_out.shutdown(Shutdown::Write);
        copied
    });
    let (mut unix_in, mut tcp_out) = (unix, tcp);
    let downstream = io::copy(&mut unix_in, &mut tcp_out);
    let _ = tcp_out.shutdown(Shutdown::Both);
    let upstream = upstream
        .join()
        .map_err(|_| io::Error::other("upstream copy panicked"))?;
    upstream.and(downstream).map(|_| ())
}
