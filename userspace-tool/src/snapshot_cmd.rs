//! `sanctl snapshot ...`: point-in-time snapshots of volumes.

use clap::Subcommand;
use sanblk_proto::map::format_size;
use sanblk_proto::protocol::{
    SnapshotChanges, SnapshotCreate, SnapshotDelete, SnapshotDiff, SnapshotInfo, SnapshotList,
};
use sanblk_uapi::cow::CowLayout;

use crate::context::{parse_size_arg, CliError, Context};
use crate::output::print_table;

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a crash-consistent snapshot of a volume while clients write it.
    #[command(
        after_help = "Every attached host is quiesced for the moment the snapshot is taken, so all of them\nstart copying at the same point. Until the snapshot is deleted, the first write to each\nchunk waits until the chunk's old content is durable in the COW store of every snapshot\nthat lacks it (copied by the host's kernel module, or by the server when the module cannot\nreach the stores); later writes to that chunk go straight to the SAN devices. A COW store that fills up makes the snapshot invalid (shown by\n`snapshot list`); the volume keeps working. Each snapshot is exported read-only over NBD\nas VOLUME@NAME (`snapshot list` shows the socket), e.g. for `sanctl backup`.\n\nExamples:\n  sanctl snapshot create db1 monday\n  sanctl snapshot create db1 tuesday --cow-size 20G --chunk-size 128K"
    )]
    Create {
        /// The volume to snapshot.
        volume: String,
        /// Name of the new snapshot (unique within the volume; its NBD export is VOLUME@NAME).
        name: String,
        /// Size of the COW store (the space kept for overwritten chunks), e.g. 10G. Default:
        /// a quarter of the volume.
        #[arg(long)]
        cow_size: Option<String>,
        /// Chunk size: the unit copied before a first write, a power of two from 4K to 1M.
        #[arg(long, default_value = "64K")]
        chunk_size: String,
    },
    /// List a volume's snapshots: state, COW space used, chunks changed since each.
    #[command(after_help = "Example:\n  sanctl snapshot list db1")]
    List {
        /// The volume whose snapshots are listed.
        volume: String,
    },
    /// Delete a snapshot and free its COW store.
    #[command(after_help = "Example:\n  sanctl snapshot delete db1 monday")]
    Delete {
        /// The snapshot's volume.
        volume: String,
        /// The snapshot to delete.
        name: String,
    },
    /// Print the chunks written between two snapshots (the older one first).
    #[command(
        after_help = "Prints one line per run of changed chunks: byte offset and length; nothing when no chunk\nchanged (a note says so on stderr). With --json, the chunk size (FROM's, which may differ from\nTO's) and the changed chunk numbers.\n\nExample:\n  sanctl snapshot diff db1 monday tuesday"
    )]
    Diff {
        /// The snapshots' volume.
        volume: String,
        /// The older snapshot.
        from: String,
        /// The newer snapshot: the chunks written after FROM was taken and before it.
        to: String,
    },
}

/// COW use from which `snapshot list` warns that a snapshot will soon become invalid (the
/// server logs from 75 %).
const NEARLY_FULL_PERCENT: u64 = 75;

/// Percentage of the COW store's slots in use, rounded down, as the server counts it (its
/// header and records take space too: a full store has fewer chunk slots than its bytes).
fn cow_percent(snapshot: &SnapshotInfo) -> u64 {
    let slots = CowLayout::new(snapshot.cow_bytes, snapshot.chunk_bytes).map_or(0, |l| l.slots);
    (snapshot.cow_used_bytes / u64::from(snapshot.chunk_bytes.max(1)))
        .saturating_mul(100)
        .checked_div(slots)
        .unwrap_or(0)
}

/// A snapshot's row in `snapshot list`. An invalid snapshot's store no longer counts: its
/// use and changes are unknown (`-`), not zero.
fn list_row(s: &SnapshotInfo) -> Vec<String> {
    let active = s.state == "active";
    vec![
        s.name.clone(),
        match &s.reason {
            Some(reason) => format!("{} ({reason})", s.state),
            None => s.state.clone(),
        },
        s.epoch.to_string(),
        format_size(s.size_bytes),
        if active {
            format!(
                "{} of {} ({}%)",
                format_size(s.cow_used_bytes),
                format_size(s.cow_bytes),
                cow_percent(s)
            )
        } else {
            format!("- of {}", format_size(s.cow_bytes))
        },
        if active {
            s.changed_chunks.to_string()
        } else {
            "-".to_string()
        },
        s.export.clone(),
    ]
}

pub async fn run(command: SnapshotCommand, context: &mut Context) -> Result<(), CliError> {
    match command {
        SnapshotCommand::Create {
            volume,
            name,
            cow_size,
            chunk_size,
        } => {
            let chunk_bytes = u32::try_from(parse_size_arg(&chunk_size)?)
                .map_err(|_| CliError::Usage(format!("chunk size {chunk_size} is too large")))?;
            let cow_bytes = cow_size.as_deref().map(parse_size_arg).transpose()?;
            let info: SnapshotInfo = context
                .call(SnapshotCreate {
                    volume,
                    name,
                    chunk_bytes: Some(chunk_bytes),
                    cow_bytes,
                })
                .await?;
            if context.json {
                return context.print_json(&info);
            }
            println!(
                "snapshot {} of {} taken at epoch {} ({} COW store, {} chunks); NBD export {} on {}",
                info.name,
                info.volume,
                info.epoch,
                format_size(info.cow_bytes),
                format_size(u64::from(info.chunk_bytes)),
                info.export,
                info.nbd_socket
            );
            Ok(())
        }
        SnapshotCommand::List { volume } => {
            let infos: Vec<SnapshotInfo> = context
                .call(SnapshotList {
                    volume: volume.clone(),
                })
                .await?;
            if context.json {
                return context.print_json(&infos);
            }
            if infos.is_empty() {
                eprintln!(
                    "volume {volume} has no snapshots (take one with `sanctl snapshot create {volume} NAME`)"
                );
            }
            let rows: Vec<Vec<String>> = infos.iter().map(list_row).collect();
            print_table(
                &[
                    "SNAPSHOT", "STATE", "EPOCH", "SIZE", "COW USED", "CHANGED", "EXPORT",
                ],
                &rows,
            );
            if let Some(first) = infos.first() {
                println!("NBD socket: {}", first.nbd_socket);
            }
            for nearly_full in infos
                .iter()
                .filter(|s| s.state == "active" && cow_percent(s) >= NEARLY_FULL_PERCENT)
            {
                println!(
                    "warning: snapshot {} has used {}% of its COW store; it becomes invalid when the store is full (back it up and delete it, or delete older snapshots)",
                    nearly_full.name,
                    cow_percent(nearly_full)
                );
            }
            Ok(())
        }
        SnapshotCommand::Delete { volume, name } => {
            let info: SnapshotInfo = context.call(SnapshotDelete { volume, name }).await?;
            if context.json {
                return context.print_json(&info);
            }
            println!(
                "snapshot {} of {} deleted; {} of COW store freed",
                info.name,
                info.volume,
                format_size(info.cow_bytes)
            );
            Ok(())
        }
        SnapshotCommand::Diff { volume, from, to } => {
            let (chunk_bytes, chunks) = changed_chunks(context, &volume, &from, &to).await?;
            if context.json {
                return context.print_json(&serde_json::json!({
                    "chunk_bytes": chunk_bytes,
                    "chunks": chunks,
                }));
            }
            if chunks.is_empty() {
                // Stdout stays empty for scripts; a person learns the diff did run.
                eprintln!("no chunk of {volume} was written between {from} and {to}");
            }
            for (first, count) in runs(&chunks) {
                println!(
                    "{} {}",
                    first * u64::from(chunk_bytes),
                    count * u64::from(chunk_bytes)
                );
            }
            Ok(())
        }
    }
}

/// Every chunk changed between snapshots `from` and `to` of `volume` (all pages).
pub async fn changed_chunks(
    context: &mut Context,
    volume: &str,
    from: &str,
    to: &str,
) -> Result<(u32, Vec<u64>), CliError> {
    let mut chunks = Vec::new();
    let mut start_chunk = 0;
    loop {
        let page: SnapshotChanges = context
            .call(SnapshotDiff {
                volume: volume.to_string(),
                from: from.to_string(),
                to: to.to_string(),
                start_chunk,
            })
            .await?;
        chunks.extend_from_slice(&page.chunks);
        match page.next_chunk {
            Some(next) if next > start_chunk => start_chunk = next,
            _ => return Ok((page.chunk_bytes, chunks)),
        }
    }
}

/// Runs of consecutive chunk numbers: (first, count).
pub fn runs(chunks: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &chunk in chunks {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == chunk => *count += 1,
            _ => runs.push((chunk, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_store_is_at_100_percent() {
        let info = |used_chunks: u64| SnapshotInfo {
            id: 1,
            name: "s".into(),
            volume: "v".into(),
            state: "active".into(),
            reason: None,
            created_unix: 0,
            epoch: 2,
            size_bytes: 32 << 20,
            chunk_bytes: 64 << 10,
            cow_bytes: 1 << 20,
            cow_used_bytes: used_chunks << 16,
            changed_chunks: used_chunks,
            reported_chunks: 0,
            export: "v@s".into(),
            nbd_socket: "nbd.sock".into(),
            cow_store: Vec::new(),
        };
        // 1 MiB of 64 KiB chunks: 15 slots after the header and records.
        assert_eq!(cow_percent(&info(15)), 100);
        assert_eq!(cow_percent(&info(12)), 80);
        assert_eq!(cow_percent(&info(0)), 0);
        assert_eq!(list_row(&info(15))[4], "960K of 1M (100%)");
        let invalid = SnapshotInfo {
            state: "invalid".into(),
            reason: Some("its COW store is full".into()),
            ..info(0)
        };
        assert_eq!(list_row(&invalid)[4..6], ["- of 1M", "-"]);
    }

    #[test]
    fn consecutive_chunks_make_one_run() {
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
        assert!(runs(&[]).is_empty());
    }
}
