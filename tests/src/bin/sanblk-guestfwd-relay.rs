//! The host end of a port the tests forward to their guests (QEMU `-netdev user,guestfwd=
//! ...-cmd:sanblk-guestfwd-relay PORT`): copies one guest connection to and from
//! `127.0.0.1:PORT`, until either side closes.
//!
//! Why not `nc` or `socat`: libslirp hands the command one end of a loopback TCP pair as its
//! stdin and stdout, and writes each TCP segment the guest sends into its own end as it comes,
//! with Nagle's algorithm on. A 4 KiB write request is three segments from the guest, so its
//! second and third wait for this end's ACK, which Linux delays by 40 ms once the connection
//! looks interactive: every request larger than a segment took 40 ms. This relay asks for an
//! immediate ACK after each read (TCP_QUICKACK does not stick, so it is set again each time),
//! and sets TCP_NODELAY on both of its sockets, so neither direction waits.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::thread;

use socket2::SockRef;

const BUFFER_BYTES: usize = 256 << 10;

fn main() -> ExitCode {
    let Some(port) = std::env::args().nth(1).and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("usage: sanblk-guestfwd-relay PORT (stdin/stdout: the guest's connection)");
        return ExitCode::from(2);
    };
    match relay(port) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sanblk-guestfwd-relay: {error}");
            ExitCode::FAILURE
        }
    }
}

fn relay(port: u16) -> io::Result<()> {
    let guest = TcpStream::from(io::stdin().as_fd().try_clone_to_owned()?);
    // Not a TCP socket (run by hand from a terminal): the options do not apply.
    let _ = guest.set_nodelay(true);
    let server = TcpStream::connect(("127.0.0.1", port))?;
    server.set_nodelay(true)?;

    let (mut from_guest, mut to_server) = (guest.try_clone()?, server.try_clone()?);
    let upstream = thread::spawn(move || -> io::Result<()> {
        let mut buffer = vec![0u8; BUFFER_BYTES];
        let copied = loop {
            match from_guest.read(&mut buffer) {
                Ok(0) => break to_server.shutdown(Shutdown::Write),
                Ok(read) => {
                    let _ = SockRef::from(&from_guest).set_tcp_quickack(true);
                    if let Err(error) = to_server.write_all(&buffer[..read]) {
                        break Err(error);
                    }
                }
                Err(error) => break Err(error),
            }
        };
        if copied.is_err() {
            // Wakes the other direction's read, so the relay does not outlive the guest.
            let _ = to_server.shutdown(Shutdown::Both);
        }
        copied
    });
    let (mut from_server, mut to_guest) = (server, guest);
    let mut buffer = vec![0u8; BUFFER_BYTES];
    let downstream = loop {
        match from_server.read(&mut buffer) {
            Ok(0) => break to_guest.shutdown(Shutdown::Write),
            Ok(read) => {
                if let Err(error) = to_guest.write_all(&buffer[..read]) {
                    break Err(error);
                }
            }
            Err(error) => break Err(error),
        }
    };
    // A broken direction ends the connection: closing both sockets wakes the other thread.
    downstream?;
    upstream
        .join()
        .map_err(|_| io::Error::other("guest-to-server copy panicked"))?
}
