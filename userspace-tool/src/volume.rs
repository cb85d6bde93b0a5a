//! `sanctl volume ...`

use clap::Subcommand;
use sanblk_proto::map::{format_size, ExtentKind, Layout, VolumeMap};
use sanblk_proto::protocol::{
    VolumeCreate, VolumeDelete, VolumeDetail, VolumeGrow, VolumeList, VolumeShow, VolumeSummary,
};

use crate::context::{parse_size_arg, CliError, Context};
use crate::output::print_table;

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume and allocate its space.
    #[command(
        after_help = "Examples:\n  sanctl volume create db1 10G\n  sanctl volume create scratch 512M --layout striped:2\n  sanctl volume create logs 1G --layout mirror"
    )]
    Create {
        name: String,
        /// Size: bytes or with a unit (K, M, G, T; binary), a multiple of 4096.
        size: String,
        /// linear, striped:N (N = 2 to 4 devices, 1 MiB stripe unit) or mirror (2 copies).
        #[arg(long, default_value = "linear", value_parser = parse_layout)]
        layout: Layout,
    },
    /// Grow a volume to a new total size (attached clients receive the new map).
    #[command(after_help = "Example:\n  sanctl volume grow db1 20G")]
    Grow { name: String, size: String },
    /// Delete a volume and free its space (refused while clients are attached).
    #[command(
        after_help = "A volume counts as attached while an agent holds it, and also after a server restart\nuntil its clients' agents are back: their kernels still hold its session tokens.\n\nExamples:\n  sanctl volume delete scratch\n  sanctl volume delete scratch --force"
    )]
    Delete {
        name: String,
        /// Delete it even though clients are attached: their attachments and session tokens
        /// are ended first (the server path refuses them from then on), then the space is
        /// freed. Their block devices stop working; data written to them is lost.
        #[arg(long)]
        force: bool,
    },
    /// List volumes.
    List,
    /// Show a volume's map (extent table) and attachments.
    Show { name: String },
}

fn parse_layout(text: &str) -> Result<Layout, String> {
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
            println!("deleted volume {name}");
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
                    "  recovery {} off device {}: {}",
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
                    let kind = match e.kind {
                        ExtentKind::Replicated => "replicated".to_string(),
                        ExtentKind::Striped { stripe_unit } => {
                            format!("striped/{}", format_size(stripe_unit))
                        }
                    };
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
