//! Unix socket paths of any length. `sockaddr_un` holds 108 bytes, so a socket deep in a
//! directory tree (a metadata dir under a long CI or container path) cannot be bound or
//! reached by its plain path. A longer path is reached through the parent directory's open
//! descriptor, `/proc/self/fd/N/<name>`, which is short whatever the parent's depth.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The longest path passed to bind(2)/connect(2) as it is: `sun_path` less the terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// A path usable in bind(2) or connect(2) for as long as this value lives.
#[derive(Debug)]
pub struct SocketPath {
    usable: PathBuf,
    // Keeps `/proc/self/fd/N` pointing at the parent directory.
    _parent: Option<File>,
}

impl SocketPath {
    pub fn new(path: &Path) -> std::io::Result<SocketPath> {
        if path.as_os_str().len() <= SUN_PATH_MAX {
            return Ok(SocketPath {
                usable: path.to_path_buf(),
                _parent: None,
            });
        }
        let name = path.file_name().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("socket path {} has no file name", path.display()),
            )
        })?;
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let directory = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(parent)?;
        let usable = PathBuf::from(format!("/proc/self/fd/{}", directory.as_raw_fd())).join(name);
        if usable.as_os_str().len() > SUN_PATH_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "socket file name {:?} is longer than a Unix socket path",
                    name
                ),
            ));
        }
        Ok(SocketPath {
            usable,
            _parent: Some(directory),
        })
    }

    pub fn as_path(&self) -> &Path {
        &self.usable
    }
}

#[cfg(test)]
mod tests {
    use super::SocketPath;

    #[test]
    fn a_socket_under_a_deep_directory_can_be_bound_and_reached() {
        let root = tempfile::tempdir().expect("tempdir");
        let deep = root.path().join("d".repeat(100)).join("e".repeat(100));
        std::fs::create_dir_all(&deep).expect("mkdir");
        let socket = deep.join("admin.sock");
        assert!(std::os::unix::net::UnixListener::bind(&socket).is_err());

        let bind_path = SocketPath::new(&socket).expect("bind path");
        let _listener =
            std::os::unix::net::UnixListener::bind(bind_path.as_path()).expect("bind via parent");
        drop(bind_path);
        assert!(
            socket.exists(),
            "the socket was created in its own directory"
        );
        let connect_path = SocketPath::new(&socket).expect("connect path");
        std::os::unix::net::UnixStream::connect(connect_path.as_path()).expect("connect");
    }

    #[test]
    fn a_short_path_is_used_as_it_is() {
        let path = std::path::Path::new("/run/sand/admin.sock");
        assert_eq!(SocketPath::new(path).expect("short").as_path(), path);
    }
}
