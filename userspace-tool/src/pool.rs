//! `sanctl pool ...`

use clap::Subcommand;
use sanblk_proto::map::format_size;
use sanblk_proto::protocol::{DeviceInfo, PoolAdd, PoolEvacuate, PoolList, RecoveryStatus};

use crate::context::{CliError, Context};
use crate::output::print_table;

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Label a SAN device (block device or image file) and add it to the pool.
    #[command(
        after_help = "Examples:\n  sanctl pool add /dev/sdb\n  sanctl pool add /srv/san/disk0.img --force"
    )]
    Add {
        /// Path of the device as the server sees it.
        path: String,
        /// Wipe foreign data and label anyway: whatever blkid finds (filesystem, swap, LUKS,
        /// RAID, LVM, partition table) or another pool's label.
        #[arg(long)]
        force: bool,
    },
    /// Show the pool's devices with size, free space and state.
    #[command(
        after_help = "STATE is online, failed (declared failed: its data is recovered off it) or missing (its\npath is gone). \"path failed on HOST...\": those clients' direct I/O to the device\nfailed while the server still reads it; their I/O goes through the server and nothing\nis moved. `sanctl recovery start DEVICE` moves the data off it.\n\nExample:\n  sanctl pool list\n  sanctl --json pool list"
    )]
    List,
    /// Move every volume's data off a device (before taking it out of the SAN), live.
    #[command(
        after_help = "Starts one move per volume with data on the device (see `sanctl volume move`)\nand shows their progress until all are done; the device is then empty.\n\nExample:\n  sanctl pool evacuate /srv/san/disk0.img"
    )]
    Evacuate {
        /// The device (its path or UUID, as `pool list` shows).
        device: String,
        /// Return once the moves started instead of showing their progress until they end.
        #[arg(long)]
        no_wait: bool,
    },
}

pub async fn run(command: PoolCommand, context: &mut Context) -> Result<(), CliError> {
    match command {
        PoolCommand::Add { path, force } => {
            let path =
                std::path::absolute(&path).map_err(|e| CliError::Usage(format!("{path}: {e}")))?;
            let device: Option<DeviceInfo> = context
                .call(PoolAdd {
                    path: path.display().to_string(),
                    force,
                })
                .await?;
            if context.json {
                return context.print_json(&device);
            }
            if let Some(device) = device {
                println!(
                    "added {} as device {} ({} usable)",
                    device.path,
                    device.uuid,
                    format_size(device.capacity_bytes)
                );
            }
            Ok(())
        }
        PoolCommand::Evacuate { device, no_wait } => {
            let statuses: Vec<RecoveryStatus> = context
                .call(PoolEvacuate {
                    device: device.clone(),
                })
                .await?;
            crate::relocation_cmd::follow_started(context, &device, &statuses, no_wait).await
        }
        PoolCommand::List => {
            let devices: Vec<DeviceInfo> = context.call(PoolList {}).await?;
            if context.json {
                return context.print_json(&devices);
            }
            let rows: Vec<Vec<String>> = devices
                .iter()
                .map(|d| {
                    vec![
                        d.uuid.to_string(),
                        d.path.clone(),
                        format_size(d.size_bytes),
                        format_size(d.capacity_bytes),
                        format_size(d.free_bytes),
                        if d.path_failed_on.is_empty() {
                            d.state.clone()
                        } else {
                            format!("{}, path failed on {}", d.state, d.path_failed_on.join(" "))
                        },
                    ]
                })
                .collect();
            print_table(
                &["DEVICE", "PATH", "SIZE", "USABLE", "FREE", "STATE"],
                &rows,
            );
            Ok(())
        }
    }
}
