//! `sanctl volume ...`

use clap::Subcommand;
use sanblk_proto::map::{format_size, ExtentKind, Layout, VolumeMap};
use sanblk_proto::protocol::{
    MirrorAdd, MirrorRemove, RecoveryStatus, VolumeCreate, VolumeDelete, VolumeDetail, VolumeGrow,
    VolumeList, VolumeMove, VolumeShow, VolumeSummary,
};

use crate::context::{parse_size_arg, CliError, Context};
use crate::output::print_table;
use crate::relocation_cmd;

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume and allocate its space.
    #[command(
        after_help = "Examples:\n  sanctl volume create db1 10G\n  sanctl volume create scratch 512M --layout striped:2\n  sanctl volume create logs 1G --layout mirror"
    )]
    Create {
        /// Name of the new volume.
        name: String,
        /// Size: bytes or with a unit (K, M, G, T; binary), a multiple of 4096.
        size: String,
        /// linear, striped:N (N = 2 to 4 devices, 1 MiB stripe unit) or mirror (2 copies).
        #[arg(long, default_value = "linear", value_parser = parse_layout)]
        layout: Layout,
    },
    /// Grow a volume to a new total size (attached clients receive the new map).
    #[command(after_help = "Example:\n  sanctl volume grow db1 20G")]
    Grow {
        /// The volume to grow.
        name: String,
        /// New total size: bytes or with a unit (K, M, G, T; binary), a multiple of 4096.
        size: String,
    },
    /// Delete a volume and free its space (refused while clients are attached or while it
    /// has snapshots).
    #[command(
        after_help = "A volume counts as attached while an agent holds it, and also after a server restart\nuntil its clients' agents are back: their kernels still hold its session tokens.\nIts snapshots (`sanctl snapshot list NAME`) would go with it: delete them first, or use --force.\n\nExamples:\n  sanctl volume delete scratch\n  sanctl volume delete scratch --force"
    )]
    Delete {
        /// The volume to delete.
        name: String,
        /// Delete it even though clients are attached: their attachments and session tokens
        /// are ended first (the server path refuses them from then on), then the space is
        /// freed. Their block devices stop working; data written to them is lost. Its
        /// snapshots, if any, are deleted with it (and their COW stores freed).
        #[arg(long)]
        force: bool,
    },
    /// List volumes.
    List,
    /// Show a volume's map (extent table) and attachments.
    Show {
        /// The volume to show.
        name: String,
    },
    /// Move a volume's data off a device while clients keep using it.
    #[command(
        after_help = "The server copies every extent on the device to free space elsewhere (or on --to)\nwhile clients keep reading and writing: during the copy their writes to the moving\nextents go through the server, which writes old and new place. Then the new map is\npublished and the old space freed. A server restart resumes the copy.\n\nExamples:\n  sanctl volume move db1 --from /srv/san/disk0.img\n  sanctl volume move db1 --from /srv/san/disk0.img --to /srv/san/disk3.img\n  sanctl volume move db1 --cancel"
    )]
    Move {
        /// The volume to move.
        name: String,
        /// Device to move the data off (its path or UUID, as `pool list` shows).
        #[arg(long, required_unless_present = "cancel")]
        from: Option<String>,
        /// Device to move the data onto (default: wherever there is space).
        #[arg(long)]
        to: Option<String>,
        /// Roll back the move in progress: the data stays where it was.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        cancel: bool,
        /// Return once the move started instead of showing its progress until it ends.
        #[arg(long)]
        no_wait: bool,
    },
    /// Mirrors: turn a linear volume into a two-way mirror, or drop a mirror leg.
    #[command(subcommand)]
    Mirror(MirrorCommand),
}

#[derive(Debug, Subcommand)]
pub enum MirrorCommand {
    /// Give every extent of a linear volume a second copy on another device, live.
    #[command(
        after_help = "Examples:\n  sanctl volume mirror add db1\n  sanctl volume mirror add db1 --cancel"
    )]
    Add {
        /// The linear volume to mirror.
        name: String,
        /// Roll back the mirror add in progress.
        #[arg(long)]
        cancel: bool,
        /// Return once the copy started instead of showing its progress until it ends.
        #[arg(long)]
        no_wait: bool,
    },
    /// Drop a mirrored volume's copies on a device (every extent keeps its other copy).
    #[command(after_help = "Example:\n  sanctl volume mirror remove db1 /srv/san/disk1.img")]
    Remove {
        /// The mirrored volume.
        name: String,
        /// Device whose copies are dropped (its path or UUID).
        device: String,
    },
}

pub fn parse_layout(text: &str) -> Result<Layout, String> {
    text.parse()
}

pub async fn run(command: VolumeCommand, context: &mut Context) -> Result<(), CliError> {
    match command {
        VolumeCommand::Create { name, size, layout } => {
            let size_bytes = parse_size_arg(&size)?;
            let map: VolumeMap = context
                .call(VolumeCreate {
                    name,
                    size_bytes,
                    layout,
                })
                .await?;
            if context.json {
                return context.print_json(&map);
            }
            println!(
                "created volume {} (id {}): {} {}, {} extents",
                map.name,
                map.volume_id,
                format_size(map.size_bytes),
                map.layout,
                map.extents.len()
            );
            Ok(())
        }
        VolumeCommand::Grow { name, size } => {
            let new_size_bytes = parse_size_arg(&size)?;
            let map: VolumeMap = context
                .call(VolumeGrow {
                    name,
                    new_size_bytes,
                })
                .await?;
            if context.json {
                return context.print_json(&map);
            }
            println!(
                "volume {} is now {} (epoch {})",
                map.name,
                format_size(map.size_bytes),
                map.epoch
            );
            Ok(())
        }
        VolumeCommand::Delete { name, force } => {
            let result = context
                .call(VolumeDelete {
                    name: name.clone(),
                    force,
                })
                .await?;
            if context.json {
                return context.print_json(&result);
            }
            if result.snapshots_deleted.is_empty() {
                println!("deleted volume {name}");
            } else {
                println!(
                    "deleted volume {name} and its snapshot(s) {}",
                    result.snapshots_deleted.join(", ")
                );
            }
            Ok(())
        }
        VolumeCommand::List => {
            let volumes: Vec<VolumeSummary> = context.call(VolumeList {}).await?;
            if context.json {
                return context.print_json(&volumes);
            }
            let rows: Vec<Vec<String>> = volumes
                .iter()
                .map(|v| {
                    vec![
                        v.id.to_string(),
                        v.name.clone(),
                        format_size(v.size_bytes),
                        v.layout.to_string(),
                        v.epoch.to_string(),
                        v.extent_count.to_string(),
                    ]
                })
                .collect();
            print_table(&["ID", "NAME", "SIZE", "LAYOUT", "EPOCH", "EXTENTS"], &rows);
            Ok(())
        }
        VolumeCommand::Move {
            name,
            from,
            to,
            cancel,
            no_wait,
        } => {
            let status: RecoveryStatus = context
                .call(VolumeMove {
                    name,
                    from,
                    to,
                    cancel,
                })
                .await?;
            if cancel || no_wait {
                return relocation_cmd::print_started(context, &[status]);
            }
            relocation_cmd::follow(context, &[status.volume_id]).await
        }
        VolumeCommand::Mirror(MirrorCommand::Add {
            name,
            cancel,
            no_wait,
        }) => {
            let status: RecoveryStatus = context.call(MirrorAdd { name, cancel }).await?;
            if cancel || no_wait {
                return relocation_cmd::print_started(context, &[status]);
            }
            relocation_cmd::follow(context, &[status.volume_id]).await
        }
        VolumeCommand::Mirror(MirrorCommand::Remove { name, device }) => {
            let map: VolumeMap = context.call(MirrorRemove { name, device }).await?;
            if context.json {
                return context.print_json(&map);
            }
            println!(
                "volume {} is now {} (epoch {})",
                map.name, map.layout, map.epoch
            );
            Ok(())
        }
        VolumeCommand::Show { name } => {
            let detail: VolumeDetail = context.call(VolumeShow { name }).await?;
            if context.json {
                return context.print_json(&detail);
            }
            let map = &detail.map;
            println!("volume {} (id {})", map.name, map.volume_id);
            println!(
                "  size    {} ({} bytes)",
                format_size(map.size_bytes),
                map.size_bytes
            );
            println!("  layout  {}", map.layout);
            println!("  epoch   {}", map.epoch);
            println!("  lease   {} ms", map.lease_ms);
            if let Some(recovery) = &detail.recovery {
                println!(
                    "  {} {} (device {}): {}",
                    recovery.kind,
                    recovery.state,
                    recovery.device_uuid,
                    crate::recovery_cmd::progress_line(recovery)
                );
                if !recovery.message.is_empty() {
                    println!("           {}", recovery.message);
                }
            }
            println!();
            let rows: Vec<Vec<String>> = map
                .extents
                .iter()
                .map(|e| {
                    let replicas: Vec<String> = e
                        .replicas
                        .iter()
                        .map(|r| format!("{}@{}", r.device_uuid, r.device_offset))
                        .collect();
                    let mut kind = match e.kind {
                        ExtentKind::Replicated => "replicated".to_string(),
                        ExtentKind::Striped { stripe_unit } => {
                            format!("striped/{}", format_size(stripe_unit))
                        }
                    };
                    // Being copied: clients write it through the server.
                    if map.is_syncing(e.volume_offset, e.length) {
                        kind.push_str(",syncing");
                    }
                    vec![
                        e.volume_offset.to_string(),
                        e.length.to_string(),
                        kind,
                        replicas.join(" "),
                    ]
                })
                .collect();
            print_table(
                &[
                    "VOLUME_OFFSET",
                    "LENGTH",
                    "KIND",
                    "REPLICAS (device@offset)",
                ],
                &rows,
            );
            if detail.attachment_count > 0 {
                println!();
                println!(
                    "attached clients: {}, acknowledged epoch {}: {}",
                    detail.attachment_count, map.epoch, detail.acked_current_epoch
                );
                let rows: Vec<Vec<String>> = detail
                    .attachments
                    .iter()
                    .map(|a| {
                        vec![
                            a.client.clone(),
                            a.mode.to_string(),
                            a.acked_epoch.to_string(),
                            format!("{:.1}s", a.lease_left_ms as f64 / 1000.0),
                            if a.disconnected {
                                "disconnected (held until the lease expires)".into()
                            } else {
                                "connected".into()
                            },
                        ]
                    })
                    .collect();
                print_table(
                    &["CLIENT", "MODE", "ACKED_EPOCH", "LEASE LEFT", "AGENT"],
                    &rows,
                );
            }
            Ok(())
        }
    }
}
