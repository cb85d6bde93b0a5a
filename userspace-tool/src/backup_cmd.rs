//! `sanctl backup`: copies a snapshot into an image file over the server's NBD export, in full
//! or only the chunks changed since the snapshot an earlier backup of the same file holds.
//! `sanctl restore`: creates a volume and writes an image into it through its writable NBD
//! export.
//!
//! Next to the image, `IMAGE.sanblk-backup.json` says which snapshot of which volume the image
//! holds; it is written (atomically) only once the image is complete and synced, so a backup
//! that dies midway is simply run again: it reads the snapshot, never changes it.
//!
//! A full backup may also go onto a block device: written from its start, neither truncated
//! nor recorded (its record would land in /dev), so it cannot be the base of `--since`.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

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
    /// The snapshot's volume.
    volume: String,
    /// The snapshot to copy (as `snapshot list` names it).
    snapshot: String,
    /// The image file to write (created if missing; a full backup truncates it), or a block
    /// device not in use, at least the snapshot's size (a full backup only: written from its
    /// start, the rest left as it was, no record kept).
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
    /// The server's id of the snapshot: a snapshot deleted and taken again under the same
    /// name (a weekly `monday`) is another one. Absent in records of older versions.
    #[serde(default)]
    snapshot_id: Option<u64>,
    size_bytes: u64,
    chunk_bytes: u32,
    created_unix: u64,
    /// Set while an incremental backup writes the image: the snapshot it is copying (name,
    /// id). The image is then partly that snapshot; only a backup of it (or of a newer one)
    /// since the same base completes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    incomplete: Option<(String, u64)>,
}

impl BackupRecord {
    /// Whether the image holds `snapshot`, complete.
    fn holds(&self, snapshot: &SnapshotInfo) -> bool {
        self.incomplete.is_none() && self.names(snapshot)
    }

    /// Whether the record's snapshot is `snapshot` (this very one, not an older namesake).
    fn names(&self, snapshot: &SnapshotInfo) -> bool {
        self.volume == snapshot.volume
            && self.snapshot == snapshot.name
            && self
                .snapshot_id
                .map_or(self.created_unix == snapshot.created_unix, |id| {
                    id == snapshot.id
                })
    }
}

fn record_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".sanblk-backup.json");
    PathBuf::from(name)
}

fn local(what: &Path, error: impl std::fmt::Display) -> CliError {
    CliError::Local(format!("{}: {error}", what.display()))
}

/// The backup image `image` cannot be opened for writing: says why, and where the cause is
/// usually not the file itself, what to do.
fn cannot_write(image: &Path, error: std::io::Error) -> CliError {
    let hint = match error.kind() {
        std::io::ErrorKind::NotFound => match image.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => {
                format!(" (create the directory {} first)", parent.display())
            }
            _ => String::new(),
        },
        std::io::ErrorKind::IsADirectory => " (give a file name inside it)".to_string(),
        _ if error.raw_os_error() == Some(libc::EBUSY) => {
            " (the device is in use: mounted, or held by another program)".to_string()
        }
        _ => String::new(),
    };
    CliError::Local(format!(
        "cannot write the backup image {}: {error}{hint}",
        image.display()
    ))
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

/// Whether the backup target `path` is a block device. A missing path is an image file to
/// create; a directory is left to fail when it is opened, which says what to do.
fn is_block_device(path: &Path) -> Result<bool, CliError> {
    let Ok(metadata) = std::fs::metadata(path) else {
        return Ok(false);
    };
    let kind = metadata.file_type();
    if kind.is_block_device() {
        Ok(true)
    } else if kind.is_file() || kind.is_dir() {
        Ok(false)
    } else {
        Err(CliError::Usage(format!(
            "{} is a special file, not an image file or block device",
            path.display()
        )))
    }
}

/// Opens block device `path` to write a snapshot of `needed` bytes onto it. O_EXCL makes
/// Linux refuse a device in use (mounted, held by device mapper or md) with EBUSY.
fn open_device(path: &Path, needed: u64) -> Result<File, CliError> {
    let mut device = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
        .map_err(|e| cannot_write(path, e))?;
    let bytes = device.seek(SeekFrom::End(0)).map_err(|e| local(path, e))?;
    if bytes < needed {
        return Err(CliError::Usage(format!(
            "{} holds {bytes} bytes ({}), the snapshot needs {needed} ({}): give a larger \
             device or an image file",
            path.display(),
            format_size(bytes),
            format_size(needed)
        )));
    }
    Ok(device)
}

/// The volume's snapshots and the active one named `snapshot` among them.
async fn snapshot_info(
    context: &mut Context,
    volume: &str,
    snapshot: &str,
) -> Result<(SnapshotInfo, Vec<SnapshotInfo>), CliError> {
    let infos: Vec<SnapshotInfo> = context
        .call(SnapshotList {
            volume: volume.to_string(),
        })
        .await?;
    let info = infos
        .iter()
        .find(|s| s.name == snapshot)
        .cloned()
        .ok_or_else(|| CliError::Refused(format!("volume {volume} has no snapshot {snapshot}")))?;
    if info.state != "active" {
        return Err(CliError::Refused(format!(
            "snapshot {snapshot} is {}: it cannot be read",
            state_of(&info)
        )));
    }
    Ok((info, infos))
}

fn state_of(info: &SnapshotInfo) -> String {
    format!(
        "{}{}",
        info.state,
        info.reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    )
}

/// Checks that `image`, holding what `held` says, is a base an incremental backup of `info`
/// since snapshot `since` can build on, and says what to do when it is not.
fn check_base(
    image: &Path,
    held: &BackupRecord,
    since: &str,
    info: &SnapshotInfo,
    infos: &[SnapshotInfo],
) -> Result<(), CliError> {
    let full = format!(
        "make a full backup of {}@{} (without --since)",
        info.volume, info.name
    );
    let image = image.display();
    let base = infos.iter().find(|s| s.name == since);
    if held.volume != info.volume {
        return Err(CliError::Usage(format!(
            "{image} holds a backup of volume {}, not of {}: {full}, into another file",
            held.volume, info.volume
        )));
    }
    if held.snapshot != since {
        return Err(CliError::Usage(format!(
            "{image} holds snapshot {} of {}, not {since}: give --since {}, or {full}",
            held.snapshot, info.volume, held.snapshot
        )));
    }
    let Some(base) = base.filter(|base| held.names(base)) else {
        return Err(CliError::Usage(format!(
            "{image} holds snapshot {since} of {} as it was when it was backed up, and that \
             snapshot no longer exists{}: an incremental backup needs it; {full}",
            info.volume,
            if base.is_some() {
                " (a newer one has its name)"
            } else {
                ""
            }
        )));
    };
    if base.state != "active" {
        return Err(CliError::Usage(format!(
            "snapshot {since}, which {image} holds, is {}: it no longer knows what changed \
             since; {full}",
            state_of(base)
        )));
    }
    if base.id >= info.id {
        return Err(CliError::Usage(format!(
            "{image} holds snapshot {since}, taken {} {}: an incremental backup goes from an \
             older snapshot to a newer one; {full}",
            if base.id == info.id { "as" } else { "after" },
            info.name
        )));
    }
    if let Some((partly, partly_id)) = &held.incomplete {
        if info.id < *partly_id {
            return Err(CliError::Usage(format!(
                "{image} is partly snapshot {partly}: an incremental backup of it since {since} \
                 stopped midway; run it again (`sanctl backup {} {partly} --to {image} --since \
                 {since}`), or {full}",
                info.volume
            )));
        }
    }
    Ok(())
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
    let device = is_block_device(&args.to)?;
    if device && args.since.is_some() {
        return Err(CliError::Usage(format!(
            "{} is a block device: it takes full backups only (nothing records which snapshot \
             it holds); give an image file for incremental backups",
            args.to.display()
        )));
    }
    let (info, infos) = snapshot_info(context, &args.volume, &args.snapshot).await?;
    // The byte ranges to copy: everything, or the changed chunks plus what the volume grew by.
    let (ranges, image) = match &args.since {
        None if device => (
            vec![(0, info.size_bytes)],
            open_device(&args.to, info.size_bytes)?,
        ),
        None => {
            forget_record(&args.to)?;
            let image = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&args.to)
                .map_err(|e| cannot_write(&args.to, e))?;
            (vec![(0, info.size_bytes)], image)
        }
        Some(since) => {
            let held = read_record(&args.to)?;
            if held.holds(&info) {
                // Run again after it succeeded: nothing is left to copy.
                return report(&args, context, (0, true), 0.0);
            }
            check_base(&args.to, &held, since, &info, &infos)?;
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
                .map_err(|e| cannot_write(&args.to, e))?;
            // From the first byte written on, the image is no longer `since` alone (a
            // refusal before this point leaves it the complete base it was).
            let writing = BackupRecord {
                incomplete: Some((info.name.clone(), info.id)),
                ..held.clone()
            };
            write_record(&args.to, &writing)?;
            (ranges, image)
        }
    };
    if !device {
        image
            .set_len(info.size_bytes)
            .map_err(|e| local(&args.to, e))?;
    }
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
    // A device held other data: its zeros are written too.
    let sparse = args.since.is_none() && !device;
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
            // Two buffers: the next reply is received while the last one is written out on
            // a blocking thread, so the socket keeps draining and the server keeps reading.
            let mut data = Vec::new();
            let mut writing: Option<JoinHandle<Result<Vec<u8>, CliError>>> = None;
            for (at, length) in mine {
                nbd.read_into(at, length as u32, &mut data)
                    .await
                    .map_err(|e| CliError::Unreachable(format!("reading {export}: {e}")))?;
                let spare = match writing.take() {
                    Some(written) => finished(written).await?,
                    None => Vec::new(),
                };
                let full = std::mem::replace(&mut data, spare);
                let (image, path, bar) = (image.clone(), path.clone(), bar.clone());
                writing = Some(tokio::task::spawn_blocking(move || {
                    write_data(&image, &path, at, &full, sparse)?;
                    bar.inc(length);
                    Ok(full)
                }));
            }
            if let Some(written) = writing {
                finished(written).await?;
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
    if !device {
        write_record(
            &args.to,
            &BackupRecord {
                volume: args.volume.clone(),
                snapshot: args.snapshot.clone(),
                snapshot_id: Some(info.id),
                incomplete: None,
                size_bytes: info.size_bytes,
                chunk_bytes: info.chunk_bytes,
                created_unix: info.created_unix,
            },
        )?;
    }
    report(
        &args,
        context,
        (total, false),
        started.elapsed().as_secs_f64(),
    )
}

/// Prints what a backup copied (`total` bytes in `seconds`); `held_already`: the image held
/// the snapshot before this run.
fn report(
    args: &BackupArgs,
    context: &mut Context,
    (total, held_already): (u64, bool),
    seconds: f64,
) -> Result<(), CliError> {
    let seconds = seconds.max(1e-6);
    if total == 0 && args.since.is_some() && !context.json {
        println!(
            "{} holds {}@{}: nothing to copy ({})",
            args.to.display(),
            args.volume,
            args.snapshot,
            match held_already {
                true => "it did already".to_string(),
                false => format!(
                    "nothing changed since {}",
                    args.since.as_deref().unwrap_or_default()
                ),
            }
        );
        return Ok(());
    }
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

/// The buffer a write into the image hands back once done.
async fn finished(write: JoinHandle<Result<Vec<u8>, CliError>>) -> Result<Vec<u8>, CliError> {
    write
        .await
        .map_err(|e| CliError::Local(format!("backup writer: {e}")))?
}

/// Writes `data` at `at`. Into a freshly truncated image (`sparse`), all-zero 64 KiB blocks
/// are skipped: they read as zeros already, and the image stays sparse. The blocks between
/// are written in one call per run (a 4 MiB read of data is one write, not 64).
fn write_data(
    image: &File,
    path: &Path,
    at: u64,
    data: &[u8],
    sparse: bool,
) -> Result<(), CliError> {
    const BLOCK: usize = 64 << 10;
    let mut run_start: Option<usize> = None;
    for (index, block) in data.chunks(BLOCK).enumerate() {
        let start = index * BLOCK;
        let skipped = sparse && block.iter().all(|&b| b == 0);
        match (skipped, run_start) {
            (true, Some(from)) => {
                write_run(image, path, at + from as u64, &data[from..start])?;
                run_start = None;
            }
            (false, None) => run_start = Some(start),
            _ => {}
        }
    }
    if let Some(from) = run_start {
        write_run(image, path, at + from as u64, &data[from..])?;
    }
    Ok(())
}

fn write_run(image: &File, path: &Path, at: u64, run: &[u8]) -> Result<(), CliError> {
    image.write_all_at(run, at).map_err(|e| local(path, e))
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

/// Opens the image to restore, a file or a block device, and says how many bytes it has.
fn open_image(path: &Path) -> Result<(File, u64), CliError> {
    let mut image = File::open(path).map_err(|e| local(path, e))?;
    let kind = image.metadata().map_err(|e| local(path, e))?.file_type();
    let bytes = if kind.is_file() {
        image.metadata().map_err(|e| local(path, e))?.len()
    } else if kind.is_block_device() {
        image.seek(SeekFrom::End(0)).map_err(|e| local(path, e))?
    } else {
        return Err(CliError::Usage(format!(
            "{} is {}, not an image file or block device",
            path.display(),
            if kind.is_dir() {
                "a directory"
            } else {
                "a special file"
            }
        )));
    };
    if bytes == 0 {
        return Err(CliError::Usage(format!("{} is empty", path.display())));
    }
    Ok((image, bytes))
}

pub async fn restore(args: RestoreArgs, context: &mut Context) -> Result<(), CliError> {
    let (mut image, image_bytes) = open_image(&args.image)?;
    if let Ok(BackupRecord {
        incomplete: Some((partly, _)),
        volume,
        snapshot,
        ..
    }) = read_record(&args.image)
    {
        return Err(CliError::Usage(format!(
            "{image} is half-written: an incremental backup of {volume}@{partly} since \
             {snapshot} stopped midway; run that backup again first",
            image = args.image.display()
        )));
    }
    let exists = context
        .call(VolumeShow {
            name: args.volume.clone(),
        })
        .await
        .is_ok();
    if exists {
        return Err(CliError::Refused(format!(
            "volume {v} already exists: a restore creates a new volume; give another name, or \
             delete {v} first (`sanctl volume delete {v}`) if it is what a failed restore left",
            v = args.volume
        )));
    }
    let map: VolumeMap = context
        .call(VolumeCreate {
            name: args.volume.clone(),
            size_bytes: image_bytes.next_multiple_of(BLOCK_SIZE),
            layout: args.layout,
        })
        .await?;
    write_volume(&args, &map, &mut image, context)
        .await
        .map_err(|error| {
            let left = |cause: &str| {
                format!(
                    "{cause}; volume {v} was created but not completely written: delete it \
                     (`sanctl volume delete {v}`) and run the restore again",
                    v = args.volume
                )
            };
            match error {
                CliError::Unreachable(cause) => CliError::Unreachable(left(&cause)),
                other => CliError::Local(left(&other.to_string())),
            }
        })
}

/// Writes the whole of `image` into the new volume of `map` and reports it.
async fn write_volume(
    args: &RestoreArgs,
    map: &VolumeMap,
    image: &mut File,
    context: &mut Context,
) -> Result<(), CliError> {
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
        read_padded(image, &args.image, at, &mut data)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn data_is_written_in_runs_around_skipped_zero_blocks() {
        const BLOCK: usize = 64 << 10;
        let path = std::env::temp_dir().join(format!("sanctl-write-data-{}", std::process::id()));
        // Blocks: data, data, zero, data, zero, zero, data (the last one short).
        let kinds = [1u8, 2, 0, 3, 0, 0, 4];
        let mut data = Vec::new();
        for (index, &kind) in kinds.iter().enumerate() {
            let length = if index == kinds.len() - 1 {
                1000
            } else {
                BLOCK
            };
            data.extend(std::iter::repeat_n(kind, length));
        }
        let at = 3 * BLOCK as u64;
        for sparse in [true, false] {
            let image = File::create(&path).unwrap_or_else(|e| panic!("{e}"));
            image
                .set_len(at + data.len() as u64)
                .unwrap_or_else(|e| panic!("{e}"));
            write_data(&image, &path, at, &data, sparse).unwrap_or_else(|e| panic!("{e}"));
            let written = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(written[..at as usize].iter().all(|&b| b == 0));
            assert!(written[at as usize..] == data[..], "sparse {sparse}");
            let allocated = std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("{e}"))
                .blocks()
                * 512;
            // Sparse: the four data blocks only (the filesystem may round up a little).
            if sparse {
                assert!(allocated < 5 * BLOCK as u64, "{allocated} bytes allocated");
            } else {
                assert!(allocated >= 6 * BLOCK as u64, "{allocated} bytes allocated");
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}
