//! Server configuration: an optional TOML file, overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use sanblk_proto::map::{parse_size, DEFAULT_LEASE_MS};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
pub const DEFAULT_METADATA_DIR: &str = "/var/lib/sand";
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_FRAME_TIMEOUT_MS: u64 = 10_000;
/// Connections from one source address that may be in the handshake at once, per port.
pub const DEFAULT_MAX_HANDSHAKES_PER_PEER: usize = 64;
/// I/O-port connections one session token may hold at once.
pub const DEFAULT_MAX_CONNECTIONS_PER_SESSION: usize = 16;
/// Default most device operations one session has executing at once on the I/O port.
pub const DEFAULT_MAX_DEVICE_OPS_PER_SESSION: usize = 4;
/// File in the metadata dir where sand writes the address it actually listens on (useful with
/// port 0).
pub const AGENT_ADDRESS_FILE: &str = "agent.addr";
pub const ADMIN_SOCKET_FILE: &str = "admin.sock";
pub const NBD_SOCKET_FILE: &str = "nbd.sock";
pub const SECRETS_FILE: &str = "secrets.redb";

/// Command-line flags of `sand`. Every flag overrides the same key of the config file.
#[derive(Debug, Parser, Default)]
#[command(
    name = "sand",
    version,
    about = "sanblk server: storage pool, volumes, clients and volume maps",
    after_help = "Examples:\n  sand --metadata-dir /var/lib/sand --listen 0.0.0.0:7700\n  sand --config /etc/sand.toml\n  sand --config /etc/sand.toml --recovery-max-rate 200M   # cap rebuild copying at 200 MiB/s\n\nConfig file keys (TOML): listen, io_listen, metadata_dir, secrets_file, admin_socket,\nnbd_socket, handshake_timeout_ms, frame_timeout_ms, max_handshakes_per_peer, max_connections_per_session,\nmax_device_ops_per_session, lease_ms, recovery_max_rate. Logging: RUST_LOG=debug."
)]
pub struct Flags {
    /// TOML configuration file.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// TCP address for agents (default 127.0.0.1:7700; port 0 picks a free port, written to
    /// METADATA_DIR/agent.addr).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// TCP address of the server I/O path for client kmods (default: the --listen address with
    /// the next port, 127.0.0.1:7701; port 0 picks a free port, written to METADATA_DIR/io.addr).
    #[arg(long)]
    pub io_listen: Option<SocketAddr>,
    /// Directory holding the metadata store and the admin socket (default /var/lib/sand).
    #[arg(long)]
    pub metadata_dir: Option<PathBuf>,
    /// Client secrets store, created with mode 0600 (default METADATA_DIR/secrets.redb).
    #[arg(long)]
    pub secrets_file: Option<PathBuf>,
    /// Admin Unix socket, mode 0600 (default METADATA_DIR/admin.sock).
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// Unix socket (mode 0600, root only) exporting every snapshot read-only over NBD, as
    /// `VOLUME@SNAPSHOT` (default: next to the admin socket, `nbd.sock`).
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
    /// How long an unauthenticated connection may take to authenticate.
    #[arg(long)]
    pub handshake_timeout_ms: Option<u64>,
    /// How long an authenticated connection may take to finish a frame it has started.
    #[arg(long)]
    pub frame_timeout_ms: Option<u64>,
    /// Most connections from one source address (IP) that may be unauthenticated at once on
    /// each port (agent handshake, I/O before HELLO); more from it are closed at once. Each
    /// port also has its own pool of 4096 such connections (default 64).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_handshakes_per_peer: Option<u64>,
    /// Most I/O-port connections one session token may hold at once; a HELLO beyond it is
    /// answered -EBUSY and closed (default 16).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections_per_session: Option<u64>,
    /// Most disk operations (reads, writes, flushes) one session token has executing at once
    /// on the I/O port, over all its connections; its other requests wait in order, so one
    /// client pipelining deep queues delays another's request by at most this many operations
    /// per busy session (the whole service runs at most 64 at once). Default 4.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_device_ops_per_session: Option<u64>,
    /// Lease duration put in every map.
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// Most bytes per second a recovery copies, per recovering volume, so rebuilding onto a
    /// spare leaves the SAN devices' bandwidth to the clients (as md's sync_speed_max does);
    /// binary units, e.g. 200M or 512K. Default and 0: no limit.
    #[arg(long, value_name = "BYTES_PER_S", value_parser = parse_size)]
    pub recovery_max_rate: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    io_listen: Option<SocketAddr>,
    metadata_dir: Option<PathBuf>,
    secrets_file: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
    nbd_socket: Option<PathBuf>,
    handshake_timeout_ms: Option<u64>,
    frame_timeout_ms: Option<u64>,
    max_handshakes_per_peer: Option<u64>,
    max_connections_per_session: Option<u64>,
    max_device_ops_per_session: Option<u64>,
    lease_ms: Option<u64>,
    /// Bytes per second: a number, or a string with a unit ("200M").
    recovery_max_rate: Option<Rate>,
}

/// A rate in the config file: `recovery_max_rate = 1048576` or `recovery_max_rate = "1M"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Rate {
    BytesPerSecond(u64),
    WithUnit(String),
}

impl Rate {
    fn bytes_per_second(self) -> anyhow::Result<u64> {
        match self {
            Rate::BytesPerSecond(rate) => Ok(rate),
            Rate::WithUnit(text) => {
                parse_size(&text).map_err(|e| anyhow::anyhow!("recovery_max_rate: {e}"))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub io_listen: SocketAddr,
    pub metadata_dir: PathBuf,
    pub secrets_file: PathBuf,
    pub admin_socket: PathBuf,
    pub nbd_socket: PathBuf,
    pub handshake_timeout: Duration,
    pub frame_timeout: Duration,
    /// Unauthenticated connections per source address and port.
    pub max_handshakes_per_peer: usize,
    /// I/O connections per session token.
    pub max_connections_per_session: usize,
    /// Device operations per session token executing at once (I/O port).
    pub max_device_ops_per_session: usize,
    pub lease_ms: u64,
    /// Most bytes per second one recovery copies; `None`: as fast as the devices go.
    pub recovery_max_rate: Option<u64>,
}

impl Config {
    pub fn from_flags(flags: Flags) -> anyhow::Result<Config> {
        let file = match &flags.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let default_listen: SocketAddr = DEFAULT_LISTEN.parse()?;
        let metadata_dir = flags
            .metadata_dir
            .or(file.metadata_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_METADATA_DIR));
        let listen = flags.listen.or(file.listen).unwrap_or(default_listen);
        let recovery_max_rate = match flags.recovery_max_rate {
            Some(rate) => Some(rate),
            None => file
                .recovery_max_rate
                .map(Rate::bytes_per_second)
                .transpose()?,
        };
        let at_least_one = |key: &str, value: Option<u64>, default: usize| match value {
            None => Ok(default),
            Some(0) => Err(anyhow::anyhow!("{key} must be at least 1")),
            Some(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        let max_handshakes_per_peer = at_least_one(
            "max_handshakes_per_peer",
            flags
                .max_handshakes_per_peer
                .or(file.max_handshakes_per_peer),
            DEFAULT_MAX_HANDSHAKES_PER_PEER,
        )?;
        let max_connections_per_session = at_least_one(
            "max_connections_per_session",
            flags
                .max_connections_per_session
                .or(file.max_connections_per_session),
            DEFAULT_MAX_CONNECTIONS_PER_SESSION,
        )?;
        let max_device_ops_per_session = at_least_one(
            "max_device_ops_per_session",
            flags
                .max_device_ops_per_session
                .or(file.max_device_ops_per_session),
            DEFAULT_MAX_DEVICE_OPS_PER_SESSION,
        )?;
        let admin_socket = flags
            .admin_socket
            .or(file.admin_socket)
            .unwrap_or_else(|| metadata_dir.join(ADMIN_SOCKET_FILE));
        let nbd_socket = flags
            .nbd_socket
            .or(file.nbd_socket)
            .unwrap_or_else(|| admin_socket.with_file_name(NBD_SOCKET_FILE));
        Ok(Config {
            listen,
            max_handshakes_per_peer,
            max_connections_per_session,
            max_device_ops_per_session,
            io_listen: flags
                .io_listen
                .or(file.io_listen)
                .unwrap_or_else(|| default_io_listen(listen)),
            secrets_file: flags
                .secrets_file
                .or(file.secrets_file)
                .unwrap_or_else(|| metadata_dir.join(SECRETS_FILE)),
            admin_socket,
            nbd_socket,
            handshake_timeout: Duration::from_millis(
                flags
                    .handshake_timeout_ms
                    .or(file.handshake_timeout_ms)
                    .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_MS),
            ),
            frame_timeout: Duration::from_millis(
                flags
                    .frame_timeout_ms
                    .or(file.frame_timeout_ms)
                    .unwrap_or(DEFAULT_FRAME_TIMEOUT_MS),
            ),
            lease_ms: flags.lease_ms.or(file.lease_ms).unwrap_or(DEFAULT_LEASE_MS),
            recovery_max_rate: recovery_max_rate.filter(|rate| *rate > 0),
            metadata_dir,
        })
    }
}

fn read_file_config(path: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Default I/O address: the agent address with the next port (127.0.0.1:7700 gives
/// 127.0.0.1:7701); port 0 (ephemeral) stays 0.
pub fn default_io_listen(agent_listen: SocketAddr) -> SocketAddr {
    let port = match agent_listen.port() {
        0 => 0,
        port => port.checked_add(1).unwrap_or(0),
    };
    SocketAddr::new(agent_listen.ip(), port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_config_file() {
        let dir = std::env::temp_dir().join(format!("sand-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let file = dir.join("sand.toml");
        std::fs::write(
            &file,
            "listen = \"0.0.0.0:7800\"\nmetadata_dir = \"/srv/sand\"\nlease_ms = 5000\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let from_file = Config::from_flags(Flags {
            config: Some(file.clone()),
            ..Flags::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(from_file.listen.to_string(), "0.0.0.0:7800");
        assert_eq!(from_file.metadata_dir, PathBuf::from("/srv/sand"));
        assert_eq!(
            from_file.secrets_file,
            PathBuf::from("/srv/sand/secrets.redb")
        );
        assert_eq!(
            from_file.admin_socket,
            PathBuf::from("/srv/sand/admin.sock")
        );
        assert_eq!(from_file.lease_ms, 5000);
        assert_eq!(
            from_file.handshake_timeout,
            Duration::from_millis(DEFAULT_HANDSHAKE_TIMEOUT_MS)
        );

        let overridden = Config::from_flags(Flags {
            config: Some(file.clone()),
            metadata_dir: Some(PathBuf::from("/tmp/other")),
            lease_ms: Some(100),
            ..Flags::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(overridden.metadata_dir, PathBuf::from("/tmp/other"));
        assert_eq!(
            overridden.admin_socket,
            PathBuf::from("/tmp/other/admin.sock")
        );
        assert_eq!(overridden.lease_ms, 100);
        assert_eq!(overridden.listen.to_string(), "0.0.0.0:7800");

        std::fs::write(&file, "listen_adress = \"typo\"\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(Config::from_flags(Flags {
            config: Some(file),
            ..Flags::default()
        })
        .is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn io_listen_comes_from_flags_then_file_then_the_agent_port() {
        use crate::config::{Config, Flags};
        let dir = std::env::temp_dir().join(format!("sand-io-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let file = dir.join("sand.toml");
        std::fs::write(&file, "listen = \"0.0.0.0:7800\"\n").unwrap_or_else(|e| panic!("{e}"));
        let config = |flags: Flags| Config::from_flags(flags).unwrap_or_else(|e| panic!("{e}"));
        let derived = config(Flags {
            config: Some(file.clone()),
            ..Flags::default()
        });
        assert_eq!(derived.io_listen.to_string(), "0.0.0.0:7801");
        std::fs::write(&file, "io_listen = \"10.0.0.1:9000\"\n").unwrap_or_else(|e| panic!("{e}"));
        let from_file = config(Flags {
            config: Some(file.clone()),
            ..Flags::default()
        });
        assert_eq!(from_file.io_listen.to_string(), "10.0.0.1:9000");
        let from_flag = config(Flags {
            config: Some(file),
            io_listen: Some("127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"))),
            ..Flags::default()
        });
        assert_eq!(from_flag.io_listen.to_string(), "127.0.0.1:0");
        assert_eq!(
            config(Flags::default()).io_listen.to_string(),
            "127.0.0.1:7701"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn recovery_max_rate_comes_from_flags_then_file_and_0_means_no_limit() {
        let dir = std::env::temp_dir().join(format!("sand-rate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let file = dir.join("sand.toml");
        let config = |flags: Flags| Config::from_flags(flags).map(|c| c.recovery_max_rate);
        assert_eq!(config(Flags::default()).ok(), Some(None));
        for (text, rate) in [
            ("\"200M\"", Some(200 << 20)),
            ("4096", Some(4096)),
            ("0", None),
        ] {
            std::fs::write(&file, format!("recovery_max_rate = {text}\n"))
                .unwrap_or_else(|e| panic!("{e}"));
            let from_file = config(Flags {
                config: Some(file.clone()),
                ..Flags::default()
            });
            assert_eq!(from_file.ok(), Some(rate), "{text}");
        }
        let overridden = config(Flags {
            config: Some(file.clone()),
            recovery_max_rate: Some(1 << 20),
            ..Flags::default()
        });
        assert_eq!(overridden.ok(), Some(Some(1 << 20)));
        std::fs::write(&file, "recovery_max_rate = \"fast\"\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(config(Flags {
            config: Some(file),
            ..Flags::default()
        })
        .is_err());
        let parsed = Flags::try_parse_from(["sand", "--recovery-max-rate", "512K"]);
        assert_eq!(
            parsed.ok().and_then(|f| f.recovery_max_rate),
            Some(512 << 10)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn connection_limits_come_from_flags_then_file_and_must_be_positive() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("sand.toml");
        let limits = |flags: Flags| {
            Config::from_flags(flags)
                .map(|c| (c.max_handshakes_per_peer, c.max_connections_per_session))
        };
        assert_eq!(
            limits(Flags::default()).ok(),
            Some((
                DEFAULT_MAX_HANDSHAKES_PER_PEER,
                DEFAULT_MAX_CONNECTIONS_PER_SESSION
            ))
        );
        std::fs::write(
            &file,
            "max_handshakes_per_peer = 8\nmax_connections_per_session = 2\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let with_file = |flags: Flags| {
            limits(Flags {
                config: Some(file.clone()),
                ..flags
            })
        };
        assert_eq!(with_file(Flags::default()).ok(), Some((8, 2)));
        assert_eq!(
            with_file(Flags {
                max_handshakes_per_peer: Some(3),
                ..Flags::default()
            })
            .ok(),
            Some((3, 2))
        );
        std::fs::write(&file, "max_connections_per_session = 0\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(with_file(Flags::default()).is_err());
        assert!(Flags::try_parse_from(["sand", "--max-handshakes-per-peer", "0"]).is_err());
        let parsed = Flags::try_parse_from(["sand", "--max-connections-per-session", "4"]);
        assert_eq!(
            parsed.ok().and_then(|f| f.max_connections_per_session),
            Some(4)
        );
    }

    #[test]
    fn the_io_port_follows_the_agent_port() {
        let address = |text: &str| -> SocketAddr { text.parse().unwrap_or_else(|e| panic!("{e}")) };
        assert_eq!(
            default_io_listen(address("127.0.0.1:7700")),
            address("127.0.0.1:7701")
        );
        assert_eq!(
            default_io_listen(address("0.0.0.0:0")),
            address("0.0.0.0:0")
        );
        assert_eq!(
            default_io_listen(address("[::1]:65535")),
            address("[::1]:0")
        );
    }
}
