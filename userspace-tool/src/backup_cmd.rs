//! `sanctl backup`: copies a snapshot into an image file over the server's NBD export, in full
//! or only the chunks changed since the snapshot an earlier backup of the same file holds.
//! `sanctl restore`: creates a volume and writes an image into it through its writable NBD
//! export.
//!
//! Next to the image, `IMAGE.sanblk-backup.json` says which snapshot of which volume the image
//! holds; it is written (atomically) only once the image is complete and synced, so a backup
//! that dies midway is simply run again: it reads the snapshot, never changes it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use sanblk_proto::map::format_size;
use sanblk_proto::map::{Layout, VolumeMap, BLOCK_SIZE};
use sanblk_proto::nbd::NbdClient;
use sanblk_proto::protocol::{SnapshotInfo, SnapshotList, VolumeCreate, VolumeDetail, VolumeShow};

use crate::context::{CliError, Context};
use crate::snapshot_cmd::{changed_chunks, runs};

/// Bytes per NBD read.
const READ_BYTES: u64 = 4 << 20;
/// NBD connections a backup reads over at once.
const CONNECTIONS: usize = 4;

#[derive(Debug, Args)]
pub struct BackupArgs {
    volume: String,
    snapshot: String,
    /// The image file to write (created if missing; a full backup truncates it).
    #[arg(long)]
    to: PathBuf,
    /// Copy only the chunks changed since this snapshot, into an image that holds it (a
    /// backup of it made earlier with `--to` the same file).
    #[arg(long)]
    since: Option<String>,
}

/// What an image file holds, kept next to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct BackupRecord {
    volume: String,
    snapshot: String,
    size_bytes: u64,
    chunk_bytes: u32,
    created_unix: u64,
}

fn record_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".sanblk-backup.json");
    PathBuf::from(name)
}

fn local(what: &Path, error: impl std::fmt::Display) -> CliError {
    CliError::Local(format!("{}: {error}", what.display()))
}

fn read_record(image: &Path) -> Result<BackupRecord, CliError> {
    let path = record_path(image);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        CliError::Usage(format!(
            "{} holds no backup sanctl knows ({}: {e}); make a full backup first",
            image.display(),
            path.display()
        ))
    })?;
    serde_json::from_str(&text).map_err(|e| local(&path, format!("not a backup record: {e}")))
}

fn write_record(image: &Path, record: &BackupRecord) -> Result<(), CliError> {
    let path = record_path(image);
    let temporary = path.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(record).map_err(|e| local(&path, e))?;
    std::fs::write(&temporary, json).map_err(|e| local(&temporary, e))?;
    File::open(&temporary)
        .and_then(|f| f.sync_all())
        .map_err(|e| local(&temporary, e))?;
    std::fs::rename(&temporary, &path).map_err(|e| local(&path, e))
}

/// Removes the record of what `image` holds, durably, before a full backup overwrites it: a
/// full backup that died midway must not leave the image claiming the older snapshot, which
/// an incremental backup would then build on.
fn forget_record(image: &Path) -> Result<(), CliError> {
    let path = record_path(image);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(local(&path, e)),
    }
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(directory)
        .and_then(|d| d.sync_all())
        .map_err(|e| local(directory, e))
}

async fn snapshot_info(
    context: &mut Context,
    volume: &str,
    snapshot: &str,
) -> Result<SnapshotInfo, CliError> {
    let infos: Vec<SnapshotInfo> = context
        .call(SnapshotList {
            volume: volume.to_string(),
        })
        .await?;
    let info = infos
        .into_iter()
        .find(|s| s.name == snapshot)
        .ok_or_else(|| CliError::Refused(format!("volume {volume} has no snapshot {snapshot}")))?;
    if info.state != "active" {
        return Err(CliError::Refused(format!(
            "snapshot {snapshot} is {}{}: it cannot be read",
            info.state,
            info.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        )));
    }
    Ok(info)
}

fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("#>."),
    );
    bar.set_prefix(what.to_string());
    bar
}

pub async fn backup(args: BackupArgs, context: &mut Context) -> Result<(), CliError> {
    let info = snapshot_info(context, &args.volume, &args.snapshot).await?;
    // The byte ranges to copy: everything, or the changed chunks plus what the volume grew by.
    let (ranges, image) = match &args.since {
        None => {
            forget_record(&args.to)?;
            let image = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&args.to)
                .map_err(|e| local(&args.to, e))?;
            (vec![(0, info.size_bytes)], image)
        }
        Some(since) => {
            let held = read_record(&args.to)?;
            if held.volume != args.volume || held.snapshot != *since {
                return Err(CliError::Usage(format!(
                    "{} holds snapshot {} of volume {}, not {since} of {}",
                    args.to.display(),
                    held.snapshot,
                    held.volume,
                    args.volume
                )));
            }
            let (chunk_bytes, chunks) =
                changed_chunks(context, &args.volume, since, &args.snapshot).await?;
            let chunk = u64::from(chunk_bytes);
            let mut ranges: Vec<(u64, u64)> = runs(&chunks)
                .into_iter()
                .map(|(first, count)| (first * chunk, count * chunk))
                .collect();
            if info.size_bytes > held.size_bytes {
                ranges.push((held.size_bytes, info.size_bytes - held.size_bytes));
            }
            let image = OpenOptions::new()
                .write(true)
                .open(&args.to)
                .map_err(|e| local(&args.to, e))?;
            (ranges, image)
        }
    };
    image
        .set_len(info.size_bytes)
        .map_err(|e| local(&args.to, e))?;
    let socket = PathBuf::from(&info.nbd_socket);
    // Several connections, each reading every CONNECTIONS-th step: the server reads one
    // request per connection at a time (the export allows several connections).
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let nbd = NbdClient::connect_unix(&socket, &info.export, false)
            .await
            .map_err(|e| CliError::Unreachable(format!("NBD export {}: {e}", info.export)))?;
        if nbd.size() != info.size_bytes {
            return Err(CliError::Refused(format!(
                "export {} has {} bytes, the snapshot {}",
                info.export,
                nbd.size(),
                info.size_bytes
            )));
        }
        clients.push(nbd);
    }
    let steps: Vec<(u64, u64)> = ranges
        .iter()
        .flat_map(|&(start, length)| {
            let end = (start + length).min(info.size_bytes);
            (start..end)
                .step_by(READ_BYTES as usize)
                .map(move |at| (at, (end - at).min(READ_BYTES)))
        })
        .collect();
    let total: u64 = steps.iter().map(|&(_, length)| length).sum();
    let bar = progress(total, "backup");
    let started = Instant::now();
    let image = std::sync::Arc::new(image);
    let sparse = args.since.is_none();
    let mut readers = tokio::task::JoinSet::new();
    for (index, mut nbd) in clients.into_iter().enumerate() {
        let mine: Vec<(u64, u64)> = steps
            .iter()
            .skip(index)
            .step_by(CONNECTIONS)
            .copied()
            .collect();
        let (image, path, bar, export) = (
            image.clone(),
            args.to.clone(),
            bar.clone(),
            info.export.clone(),
        );
        readers.spawn(async move {
            let mut data = Vec::new();
            for (at, length) in mine {
                nbd.read_into(at, length as u32, &mut data)
                    .await
                    .map_err(|e| CliError::Unreachable(format!("reading {export}: {e}")))?;
                write_data(&image, &path, at, &data, sparse)?;
                bar.inc(length);
            }
            let _ = nbd.disconnect().await;
            Ok::<(), CliError>(())
        });
    }
    while let Some(joined) = readers.join_next().await {
        joined.map_err(|e| CliError::Local(format!("backup reader: {e}")))??;
    }
    bar.finish_and_clear();
    image.sync_all().map_err(|e| local(&args.to, e))?;
    write_record(
        &args.to,
        &BackupRecord {
            volume: args.volume.clone(),
            snapshot: args.snapshot.clone(),
            size_bytes: info.size_bytes,
            chunk_bytes: info.chunk_bytes,
            created_unix: info.created_unix,
        },
    )?;
    let seconds = started.elapsed().as_secs_f64().max(1e-6);
    let summary = serde_json::json!({
        "volume": args.volume,
        "snapshot": args.snapshot,
        "image": args.to.display().to_string(),
        "since": args.since,
        "bytes_copied": total,
        "seconds": seconds,
        "bytes_per_second": (total as f64 / seconds) as u64,
    });
    if context.json {
        return context.print_json(&summary);
    }
    println!(
        "{} backup of {}@{} into {}: {} copied in {:.1} s ({}/s)",
        if args.since.is_some() {
            "incremental"
        } else {
            "full"
        },
        args.volume,
        args.snapshot,
        args.to.display(),
        format_size(total),
        seconds,
        format_size((total as f64 / seconds) as u64)
    );
    Ok(())
}

/// Writes `data` at `at`. Into a freshly truncated image (`sparse`), all-zero 64 KiB blocks
/// are skipped: they read as zeros already, and the image stays sparse.
fn write_data(
    image: &File,
    path: &Path,
    at: u64,
    data: &[u8],
    sparse: bool,
) -> Result<(), CliError> {
    const BLOCK: usize = 64 << 10;
    for (index, block) in data.chunks(BLOCK).enumerate() {
        if sparse && block.iter().all(|&b| b == 0) {
            continue;
        }
        image
            .write_all_at(block, at + (index * BLOCK) as u64)
            .map_err(|e| local(path, e))?;
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The image to restore (e.g. made by `sanctl backup`).
    image: PathBuf,
    /// The new volume to create and write (must not exist).
    volume: String,
    /// linear, striped:N or mirror, as for `volume create`.
    #[arg(long, default_value = "linear", value_parser = crate::volume::parse_layout)]
    layout: Layout,
}

pub async fn restore(args: RestoreArgs, context: &mut Context) -> Result<(), CliError> {
    let mut image = File::open(&args.image).map_err(|e| local(&args.image, e))?;
    let image_bytes = image.metadata().map_err(|e| local(&args.image, e))?.len();
    if image_bytes == 0 {
        return Err(CliError::Usage(format!(
            "{} is empty",
            args.image.display()
        )));
    }
    let map: VolumeMap = context
        .call(VolumeCreate {
            name: args.volume.clone(),
            size_bytes: image_bytes.next_multiple_of(BLOCK_SIZE),
            layout: args.layout,
        })
        .await?;
    let detail: VolumeDetail = context
        .call(VolumeShow {
            name: args.volume.clone(),
        })
        .await?;
    let socket = PathBuf::from(&detail.nbd_socket);
    let mut nbd = NbdClient::connect_unix(&socket, &args.volume, false)
        .await
        .map_err(|e| CliError::Unreachable(format!("NBD export {}: {e}", args.volume)))?;
    let bar = progress(map.size_bytes, "restore");
    let started = Instant::now();
    let mut at = 0;
    // Every byte is written, zeros included: the new volume's space held other data before.
    while at < map.size_bytes {
        let step = (map.size_bytes - at).min(READ_BYTES);
        let mut data = vec![0u8; step as usize];
        read_padded(&mut image, &args.image, at, &mut data)?;
        nbd.write(at, &data, false)
            .await
            .map_err(|e| CliError::Unreachable(format!("writing {}: {e}", args.volume)))?;
        at += step;
        bar.inc(step);
    }
    nbd.flush()
        .await
        .map_err(|e| CliError::Unreachable(format!("flushing {}: {e}", args.volume)))?;
    bar.finish_and_clear();
    let _ = nbd.disconnect().await;
    let seconds = started.elapsed().as_secs_f64().max(1e-6);
    if context.json {
        return context.print_json(&serde_json::json!({
            "volume": args.volume,
            "image": args.image.display().to_string(),
            "bytes_written": map.size_bytes,
            "seconds": seconds,
        }));
    }
    println!(
        "restored {} into new volume {} ({} written in {:.1} s, {}/s)",
        args.image.display(),
        args.volume,
        format_size(map.size_bytes),
        seconds,
        format_size((map.size_bytes as f64 / seconds) as u64)
    );
    Ok(())
}

/// Reads `buf.len()` bytes at `at`; past the end of the image, zeros.
fn read_padded(image: &mut File, path: &Path, at: u64, buf: &mut [u8]) -> Result<(), CliError> {
    let mut done = 0;
    while done < buf.len() {
        let read = image
            .read_at(&mut buf[done..], at + done as u64)
            .map_err(|e| local(path, e))?;
        if read == 0 {
            break;
        }
        done += read;
    }
    buf[done..].fill(0);
    Ok(())
}
