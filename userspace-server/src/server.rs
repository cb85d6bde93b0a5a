//! Listeners and lifecycle: binds the agent TCP port and the admin Unix socket, spawns one
//! task per connection, and shuts everything down when the shutdown channel flips.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use log::{error, info, warn};
use sanblk_proto::unix_path::SocketPath;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio::sync::{mpsc, watch};

use crate::admin::serve_admin_connection;
use crate::agent_service::serve_agent_connection;
use crate::config::{Config, AGENT_ADDRESS_FILE};
use crate::io_service::{self, IoService};
use crate::snapshot_export::SnapshotExports;
use crate::state::ServerState;
use crate::store::Store;

/// How long connection tasks get to finish after shutdown is signalled.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Accept queue length requested for the agent port (the kernel caps it at somaxconn).
const LISTEN_BACKLOG: u32 = 4096;

/// Runs the server until `shutdown` becomes true.
pub async fn run(config: Config, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.metadata_dir)
        .with_context(|| format!("creating metadata dir {}", config.metadata_dir.display()))?;
    std::fs::set_permissions(&config.metadata_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", config.metadata_dir.display()))?;
    let store = Store::open(&config.metadata_dir, &config.secrets_file)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    match raise_open_file_limit() {
        Ok(limit) => info!("open file limit {limit}"),
        Err(error) => warn!("cannot raise the open file limit: {error}"),
    }
    info!(
        "pool {} metadata at {}",
        store.pool_uuid(),
        store.metadata_path.display()
    );

    let agent_listener =
        bind_agent_listener(config.listen).with_context(|| format!("binding {}", config.listen))?;
    let agent_address = agent_listener.local_addr()?;
    std::fs::write(
        config.metadata_dir.join(AGENT_ADDRESS_FILE),
        agent_address.to_string(),
    )
    .context("writing the agent address file")?;
    let io_listener = io_service::bind(config.io_listen)
        .with_context(|| format!("binding the I/O service to {}", config.io_listen))?;
    let io_address = io_listener.local_addr()?;
    std::fs::write(
        config.metadata_dir.join(io_service::IO_ADDRESS_FILE),
        io_address.to_string(),
    )
    .context("writing the I/O address file")?;

    // A stale socket from a killed server would make bind fail.
    if config.admin_socket.exists() {
        std::fs::remove_file(&config.admin_socket)
            .with_context(|| format!("removing stale {}", config.admin_socket.display()))?;
    }
    let admin_listener = bind_admin_socket(&config.admin_socket)
        .with_context(|| format!("binding admin socket {}", config.admin_socket.display()))?;
    info!(
        "listening for agents on {agent_address}, server I/O on {io_address}, admin on {}",
        config.admin_socket.display()
    );

    if config.nbd_socket.exists() {
        std::fs::remove_file(&config.nbd_socket)
            .with_context(|| format!("removing stale {}", config.nbd_socket.display()))?;
    }
    // Mode 0600 like the admin socket; the NBD service also checks the peer's uid.
    let nbd_listener = bind_admin_socket(&config.nbd_socket)
        .with_context(|| format!("binding NBD socket {}", config.nbd_socket.display()))?;
    info!(
        "snapshots exported over NBD on {}",
        config.nbd_socket.display()
    );
    crate::snapshot::drop_pending(&store).map_err(|e| anyhow::anyhow!("{e}"))?;

    let admin_socket = config.admin_socket.clone();
    let nbd_socket = config.nbd_socket.clone();
    // Attach replies tell agents the address actually bound (an ephemeral port included).
    let mut config = config;
    config.io_listen = io_address;
    let state = ServerState::new(store, config);
    // Before any agent is served: a change the last run left is finished or rolled back.
    let redo = crate::change::recover_all(&state).context("resolving unfinished changes")?;
    // Frees the attachments of closed connections once their leases have expired.
    let reaper = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        loop {
            tick.tick().await;
            reaper.reap_expired();
        }
    });
    // Every connection task holds a clone of this sender; when all are gone, recv() ends.
    let (task_alive, mut all_tasks_done) = mpsc::channel::<()>(1);
    // The server's own I/O failing on a device is what declares it failed.
    let (device_failures, failed_devices) = mpsc::unbounded_channel();
    tokio::spawn(crate::recovery::recover_failed_devices(
        state.clone(),
        failed_devices,
    ));
    let (io, io_shutdown, io_alive) = (
        IoService::new(state.clone(), device_failures),
        shutdown.clone(),
        task_alive.clone(),
    );
    tokio::spawn(async move {
        io.serve(io_listener, io_shutdown).await;
        drop(io_alive);
    });
    let (exports, nbd_shutdown, nbd_alive) = (
        Arc::new(SnapshotExports {
            state: state.clone(),
        }),
        shutdown.clone(),
        task_alive.clone(),
    );
    tokio::spawn(async move {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let own_uid = unsafe { libc::geteuid() };
        crate::nbd::serve(nbd_listener, exports, own_uid, nbd_shutdown).await;
        drop(nbd_alive);
    });
    // After the I/O service is up: resumed jobs register with the volumes' write gates.
    if let Err(error) = crate::recovery::resume_all(&state).await {
        error!("cannot resume recoveries: {error}");
    }
    // Relocations an administrator started or cancelled whose change a crash rolled back.
    crate::recovery::redo_all(&state, redo);
    crate::recovery::recover_failed_devices_left(&state).await;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = agent_listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (state, shutdown, alive) = (state.clone(), shutdown.clone(), task_alive.clone());
                    tokio::spawn(async move {
                        serve_agent_connection(stream, peer, state, shutdown).await;
                        drop(alive);
                    });
                }
                // Typically EMFILE under load: back off instead of spinning.
                Err(e) => {
                    warn!("accepting agent connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            accepted = admin_listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (state, shutdown, alive) = (state.clone(), shutdown.clone(), task_alive.clone());
                    tokio::spawn(async move {
                        serve_admin_connection(stream, state, shutdown).await;
                        drop(alive);
                    });
                }
                Err(e) => {
                    warn!("accepting admin connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    info!("shutting down");
    drop(agent_listener);
    drop(admin_listener);
    drop(task_alive);
    if tokio::time::timeout(SHUTDOWN_GRACE, all_tasks_done.recv())
        .await
        .is_err()
    {
        error!("connections did not close within {SHUTDOWN_GRACE:?}");
    }
    let _ = std::fs::remove_file(&admin_socket);
    let _ = std::fs::remove_file(&nbd_socket);
    info!("stopped");
    Ok(())
}

/// Binds the admin socket with its final mode, 0600, from the start: the file appears
/// with the mode the umask leaves, so a later chmod would leave a window in which any user
/// could connect (and the socket has no other authentication). The umask is process-wide;
/// only files created in these few instructions by other threads get it too, and they get a
/// stricter mode, never a looser one. The socket is bound under a temporary name and renamed
/// into place once it listens, so whoever sees `path` can connect (bind(2) creates the file
/// before listen(2) makes it accept).
pub(crate) fn bind_admin_socket(path: &Path) -> std::io::Result<UnixListener> {
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the admin socket path has no file name"))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(file_name);
    temporary_name.push(format!(".{}.tmp", std::process::id()));
    let temporary = path.with_file_name(temporary_name);
    let bindable = SocketPath::new(&temporary)?;
    // Left behind by a killed server of the same pid.
    match std::fs::remove_file(&temporary) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    // SAFETY: umask(2) only swaps the process's file mode mask; it cannot fail.
    let previous = unsafe { libc::umask(0o177) };
    let listener = std::os::unix::net::UnixListener::bind(bindable.as_path());
    // SAFETY: as above, restoring the mask the process had.
    unsafe { libc::umask(previous) };
    let listener = listener?;
    if let Err(error) = std::fs::rename(&temporary, path) {
        let _ = std::fs::remove_file(&temporary);
        return Err(error);
    }
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Binds with a deep accept queue: after a server restart every agent reconnects at once, and
/// the default backlog overflows (dropped SYNs cost clients a 1 s retransmit).
fn bind_agent_listener(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises the open-file soft limit to the hard limit: every agent holds a socket, and the
/// usual soft default (1024) would cap the server at about a thousand clients.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid, local `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the valid, local `limit`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Flips `shutdown` on SIGTERM or SIGINT.
pub async fn signal_shutdown(shutdown: watch::Sender<bool>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM received"),
        _ = interrupt.recv() => info!("SIGINT received"),
    }
    let _ = shutdown.send(true);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::bind_admin_socket;

    /// Under the loosest umask the socket is 0600 the moment it exists (no bind-then-chmod
    /// window in which another user could connect).
    #[tokio::test]
    async fn the_admin_socket_is_private_from_the_bind_on() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("admin.sock");
        // SAFETY: umask(2) only swaps the process's file mode mask.
        let previous = unsafe { libc::umask(0) };
        let bound = bind_admin_socket(&path);
        // SAFETY: as above, restoring the mask.
        unsafe { libc::umask(previous) };
        let _listener = bound.unwrap_or_else(|e| panic!("bind: {e}"));
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{e}"))
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "admin socket mode {:o} at bind",
            mode & 0o777
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(Result::ok)
            .map(|entry| entry.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("admin.sock")]);
        // Whoever sees the socket can connect: it listens before it appears.
        std::os::unix::net::UnixStream::connect(&path).unwrap_or_else(|e| panic!("{e}"));
    }

    /// A metadata dir deep in a CI checkout puts the socket past `sockaddr_un`'s 108 bytes;
    /// sand must still bind it and the admin client still reach it.
    #[tokio::test]
    async fn an_admin_socket_under_a_deep_directory_is_bound_and_reached() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let deep = dir.path().join("m".repeat(90)).join("sand-metadata");
        std::fs::create_dir_all(&deep).unwrap_or_else(|e| panic!("{e}"));
        let path = deep.join("admin.sock");
        assert!(path.as_os_str().len() > 108);
        let listener = bind_admin_socket(&path).unwrap_or_else(|e| panic!("bind: {e}"));
        let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        sanblk_proto::client::AdminClient::connect(&path)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        accept
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("accept: {e}"));
    }
}
