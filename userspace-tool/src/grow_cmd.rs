//! `sanctl grow VOL SIZE` on a client host: asks the server, as this host's client, to grow a
//! volume its agent holds read-write. The server allocates through its change protocol (the
//! agent quiesces the kernel, the new map is committed and pushed) and the agent installs the
//! new map, which gives the block device its new size; the command returns once the kernel
//! shows it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use sanblk_proto::auth::read_secret_file;
use sanblk_proto::client::{AgentClient, ClientError};
use sanblk_proto::map::format_size;

use crate::agent::AgentConnection;
use crate::context::{parse_size_arg, CliError};
use crate::kernel_link::KernelLink;

/// How long the agent may take to install the new map after the server committed it.
const INSTALL_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Args)]
pub struct GrowArgs {
    /// Name of the volume attached on this host (read-write) by `sanctl attach`.
    volume: String,
    /// New total size: bytes or with a unit (K, M, G, T; binary), a multiple of 4096.
    size: String,
    /// The agent's run directory (as given to `sanctl attach`).
    #[arg(long, default_value = "/run/sanblk")]
    run_dir: PathBuf,
}

pub async fn grow(args: GrowArgs, json: bool) -> Result<(), CliError> {
    let new_size_bytes = parse_size_arg(&args.size)?;
    let path = AgentConnection::path(&args.run_dir, &args.volume);
    let text = std::fs::read(&path).map_err(|e| {
        CliError::Usage(format!(
            "{} is not attached on this host by `sanctl attach` ({}: {e})",
            args.volume,
            path.display()
        ))
    })?;
    let connection: AgentConnection = serde_json::from_slice(&text)
        .map_err(|e| CliError::Local(format!("{}: {e}", path.display())))?;
    let secret = read_secret_file(&connection.secret_file).map_err(CliError::Usage)?;
    let mut client = AgentClient::connect(connection.server.as_str(), &connection.client, &secret)
        .await
        .map_err(|e| match e {
            ClientError::Connect { .. } | ClientError::Timeout(_) => {
                CliError::Unreachable(format!("{}: {e}", connection.server))
            }
            other => CliError::Refused(format!("{}: {other}", connection.server)),
        })?;
    // This connection holds no attachment, so no quiesce comes to it: the agent's does.
    let map = client
        .grow_with(connection.volume_id, new_size_bytes, |_| false)
        .await
        .map_err(|e| CliError::Refused(format!("grow {}: {e}", args.volume)))?;
    let kernel = KernelLink::open().map_err(|e| CliError::Local(e.to_string()))?;
    let deadline = Instant::now() + INSTALL_WAIT;
    let device = loop {
        let status = kernel
            .status()
            .map_err(|e| CliError::Local(e.to_string()))?;
        let volume = status
            .volumes
            .into_iter()
            .find(|v| v.volume_id == connection.volume_id);
        match volume {
            Some(volume) if volume.size_bytes >= map.size_bytes => break volume.device,
            _ if Instant::now() > deadline => {
                return Err(CliError::Local(format!(
                    "the server grew {} to {} bytes (epoch {}), but the kernel did not show the \
                     new size within {INSTALL_WAIT:?}; is the agent running?",
                    args.volume, map.size_bytes, map.epoch
                )))
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    if json {
        let text =
            serde_json::to_string_pretty(&map).map_err(|e| CliError::Local(e.to_string()))?;
        println!("{text}");
    } else {
        println!(
            "volume {} is now {} (epoch {}); {device} has the new size",
            map.name,
            format_size(map.size_bytes),
            map.epoch
        );
    }
    Ok(())
}
