//! `make bench` (snapshots, issue 16), on the host with a real `sand`: backup throughput at
//! a size that settles, and the changed-chunk list of a 2 TiB volume with 1 % changed.
//!
//! Backup: volume `vb` of 1 GiB on a filled image file, snapshot `s`, `sanctl backup vb s
//! --to FILE` (over NBD, 4 connections, the image synced at the end; FILE on the same disk,
//! and in /dev/shm) against `dd iflag=direct bs=4M` of the same GiB of the image file into
//! /dev/null (reading it), and against the same `dd` into the same places (a plain copy: what
//! storing the data costs here at all), and `nbdcopy -C 1` of the export (a stock client on one
//! connection); five rounds alternating, the median of each counts.
//!
//! Changed-chunk list (Ceph's fast-diff takes about 11 s for the same case; the goal is under
//! 5 s): a sparse image file of 2 TiB + 26 GiB in the pool, volume `vd` of 2 TiB, snapshot
//! `s1` (64 KiB chunks, 24 GiB COW store). Copying 335 544 chunks through the server (a slot
//! write and two syncs each, 21 GB of slot data) does not fit a bench run here, so the bench
//! stops `sand` and writes into `s1`'s record area, in the on-disk format
//! (`sanblk_uapi::cow`), the records `sand` would have made for those copies, in a scattered
//! order; the slots' data is not written (no list reads it). Then it times:
//! - `load`: `sand` restarted until it answers `snapshot list` with the 335 544 chunks (it
//!   reads the record area of every active store);
//! - `take s2`: `sanctl snapshot create vd s2` (the list of chunks changed since `s1` is
//!   stored with `s2`);
//! - `diff`: `sanctl snapshot diff vd s1 s2`, whose printed ranges must be exactly the
//!   written chunks.
//!
//! Settings: SANBLK_BENCH_DIFF_PERMILLE (changed chunks per thousand, default 10);
//! SANBLK_HOST_BIN_DIR, where `sand` and `sanctl` are taken from (`make bench`: the release
//! builds; without it the debug ones).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use sanblk_proto::protocol::SnapshotInfo;
use sanblk_tests::bench::setting;
use sanblk_tests::{filled_image, scratch_dir, SandServer};
use sanblk_uapi::cow::{
    CowLayout, Record, RecordSector, HEADER_BYTES, RECORDS_PER_SECTOR, SECTOR_BYTES,
};

const GIB: u64 = 1 << 30;
const VOLUME_BYTES: u64 = 2048 * GIB;
const COW_BYTES: u64 = 24 * GIB;
const CHUNK: u64 = 64 << 10;
/// Rounds of each backup timing.
const ROUNDS: usize = 5;

/// The chunks changed: `count` of the volume's chunks, spread evenly with a pseudo-random
/// place inside each stretch, in a scattered order (the order of first writes).
fn changed_chunks(count: u64) -> Vec<u64> {
    let chunks = VOLUME_BYTES / CHUNK;
    let stretch = chunks / count;
    let ascending: Vec<u64> = (0..count)
        .map(|i| i * stretch + (i.wrapping_mul(2_654_435_761) >> 7) % stretch)
        .collect();
    // A step coprime with the count visits every index once.
    let mut step = count / 2 + 1;
    while gcd(step, count) != 1 {
        step += 1;
    }
    (0..count)
        .map(|i| ascending[((i * step) % count) as usize])
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn snapshots(server: &SandServer, volume: &str) -> Result<Vec<SnapshotInfo>, String> {
    serde_json::from_str(&server.sanctl(&["--json", "snapshot", "list", volume]))
        .map_err(|e| format!("snapshot list json: {e}"))
}

/// Writes the records of `order` (record i: chunk `order[i]` copied into slot i) into the
/// record area of `snapshot`'s store on `image`.
fn write_records(image: &File, snapshot: &SnapshotInfo, order: &[u64]) -> Result<(), String> {
    let layout = CowLayout::new(snapshot.cow_bytes, snapshot.chunk_bytes)
        .ok_or("the snapshot's store has no valid layout")?;
    if order.len() as u64 > layout.slots {
        return Err(format!(
            "{} records do not fit {} slots",
            order.len(),
            layout.slots
        ));
    }
    // Store offset -> image offset, through the store's extents (single-device pool).
    let image_offset = |store_offset: u64| -> Result<u64, String> {
        snapshot
            .cow_store
            .iter()
            .find(|e| (e.volume_offset..e.volume_offset + e.length).contains(&store_offset))
            .and_then(|e| e.replicas.first().map(|r| (e, r)))
            .map(|(e, r)| r.device_offset + store_offset - e.volume_offset)
            .ok_or_else(|| format!("store offset {store_offset} outside the store"))
    };
    let mut area = Vec::with_capacity(order.len().div_ceil(RECORDS_PER_SECTOR) * SECTOR_BYTES);
    for (index, records) in order.chunks(RECORDS_PER_SECTOR).enumerate() {
        let first_slot = (index * RECORDS_PER_SECTOR) as u64;
        let mut sector = RecordSector::empty(index as u32);
        for (i, chunk) in records.iter().enumerate() {
            sector.push(Record {
                origin_chunk: *chunk,
                slot: first_slot + i as u64,
            });
        }
        let mut bytes = [0u8; SECTOR_BYTES];
        sector.encode(snapshot.id, &mut bytes);
        area.extend_from_slice(&bytes);
    }
    // The record area lies in the store's first extent (sand allocates it whole when it can).
    let start = image_offset(HEADER_BYTES)?;
    let end = image_offset(HEADER_BYTES + area.len() as u64 - 1)?;
    if end + 1 - start != area.len() as u64 {
        return Err("the record area spans extents".into());
    }
    image
        .write_all_at(&area, start)
        .and_then(|()| image.sync_all())
        .map_err(|e| format!("writing the records: {e}"))
}

/// Chunks named by `snapshot diff`'s printed ranges ("OFFSET LENGTH" per line).
fn printed_chunks(printed: &str) -> Result<BTreeSet<u64>, String> {
    let mut chunks = BTreeSet::new();
    for line in printed.lines() {
        let mut fields = line.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(offset)), Some(Ok(length))) = (fields.next(), fields.next()) else {
            return Err(format!("unexpected diff line {line:?}"));
        };
        chunks.extend(offset / CHUNK..(offset + length).div_ceil(CHUNK));
    }
    Ok(chunks)
}

/// The better of two rounds of `sanctl backup` against `dd iflag=direct` of the image.
fn backup_bench() -> Result<String, String> {
    const BYTES: u64 = GIB;
    let dir = scratch_dir("bench-backup").map_err(|e| e.to_string())?;
    let image = dir.join("san0.img");
    filled_image(&image, BYTES + 256 * (1 << 20))
        .map_err(|e| format!("{}: {e}", image.display()))?;
    let server = SandServer::start(&dir)?;
    server.pool_add(&image);
    server.sanctl(&["volume", "create", "vb", "1G"]);
    server.sanctl(&["snapshot", "create", "vb", "s", "--cow-size", "64M"]);
    let target = dir.join("backup.img");
    // The same backup into memory: the NBD read path alone, without the output file's writes
    // competing with the reads for the one disk.
    let in_memory = std::path::Path::new("/dev/shm")
        .join(format!("sanblk-bench-backup-{}.img", std::process::id()));
    let timed = |run: &mut dyn FnMut() -> Result<(), String>| {
        let started = Instant::now();
        run().map(|()| started.elapsed())
    };
    let backup_to = |image: &std::path::Path| {
        let _ = std::fs::remove_file(image);
        server.sanctl(&["backup", "vb", "s", "--to", &image.display().to_string()]);
        let _ = std::fs::remove_file(image);
        Ok(())
    };
    // `dd` of the image's GiB: into nothing (the baseline: reading the image), and
    // copied into the same places a backup writes (the cost of storing the data at all).
    let null = std::path::Path::new("/dev/null");
    let dd = |to: &std::path::Path, extra: &[&str]| -> Result<(), String> {
        let status = Command::new("dd")
            .arg(format!("if={}", image.display()))
            .arg(format!("of={}", to.display()))
            .args(["bs=4M", "iflag=direct", "status=none"])
            .args(extra)
            .arg(format!("count={}", BYTES / (4 << 20)))
            .status()
            .map_err(|e| format!("dd: {e}"))?;
        if to != null {
            let _ = std::fs::remove_file(to);
        }
        status
            .success()
            .then_some(())
            .ok_or_else(|| format!("dd: {status}"))
    };
    // A stock client on one connection (nbdcopy's default requests, 256 KiB, 64 in flight).
    let snapshot = snapshots(&server, "vb")?
        .into_iter()
        .next()
        .ok_or("no snapshot s")?;
    let uri = format!(
        "nbd+unix:///{}?socket={}",
        snapshot.export, snapshot.nbd_socket
    );
    let nbdcopy = || -> Result<(), String> {
        let status = Command::new("nbdcopy")
            .args(["-C", "1", &uri, "null:"])
            .status()
            .map_err(|e| format!("nbdcopy: {e}"))?;
        status
            .success()
            .then_some(())
            .ok_or_else(|| format!("nbdcopy: {status}"))
    };
    let mut runs: Vec<Box<dyn FnMut() -> Result<(), String> + '_>> = vec![
        Box::new(|| dd(null, &[])),
        Box::new(|| backup_to(&target)),
        Box::new(|| backup_to(&in_memory)),
        Box::new(|| dd(&target, &["conv=fsync"])),
        Box::new(|| dd(&in_memory, &[])),
        Box::new(nbdcopy),
    ];
    // Rounds alternate the six; the median of each counts (this host's disk drifts by
    // half within minutes).
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); runs.len()];
    for _ in 0..ROUNDS {
        for (run, time) in runs.iter_mut().zip(times.iter_mut()) {
            time.push(timed(run.as_mut())?);
        }
    }
    drop(runs);
    drop(server);
    let _ = std::fs::remove_file(&image);
    let median = |mut samples: Vec<Duration>| {
        samples.sort();
        samples[samples.len() / 2].as_secs_f64()
    };
    let [read, backup, backup_memory, copy, copy_memory, one_connection] = times
        .into_iter()
        .map(median)
        .collect::<Vec<f64>>()
        .try_into()
        .map_err(|_| "six timings".to_string())?;
    let rate = |seconds: f64| BYTES as f64 / (1 << 20) as f64 / seconds;
    Ok(format!(
        "| copy (1 GiB, median of {ROUNDS}) | seconds | MiB/s |\n\
         |---|---|---|\n\
         | `dd iflag=direct bs=4M` of the image file into /dev/null (reading it) | {read:.2} | {:.1} |\n\
         | `sanctl backup` over NBD, 4 connections, into a file on the same disk | {backup:.2} | {:.1} |\n\
         | `sanctl backup` into /dev/shm | {backup_memory:.2} | {:.1} |\n\
         | `dd` of the image into a file on the same disk (`conv=fsync`) | {copy:.2} | {:.1} |\n\
         | `dd` of the image into /dev/shm | {copy_memory:.2} | {:.1} |\n\
         | `nbdcopy -C 1` of the snapshot to null: (one connection, stock client) | {one_connection:.2} | {:.1} |\n\n\
         Backup / sequential read: **{:.2}** into a file, **{:.2}** into memory. \
         Backup / plain copy into the same place: **{:.2}** into a file, **{:.2}** into memory\n\n",
        rate(read),
        rate(backup),
        rate(backup_memory),
        rate(copy),
        rate(copy_memory),
        rate(one_connection),
        read / backup,
        read / backup_memory,
        copy / backup,
        copy_memory / backup_memory,
    ))
}

fn diff_bench() -> Result<String, String> {
    let permille = u64::from(setting("SANBLK_BENCH_DIFF_PERMILLE", 10).clamp(1, 1000));
    let dir = scratch_dir("bench-diff").map_err(|e| e.to_string())?;
    let image_path = dir.join("san0.img");
    let image = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&image_path)
        .and_then(|f| f.set_len(VOLUME_BYTES + COW_BYTES + 2 * GIB).map(|()| f))
        .map_err(|e| format!("{}: {e}", image_path.display()))?;
    let mut server = SandServer::start(&dir)?;
    server.pool_add(&image_path);
    server.sanctl(&["volume", "create", "vd", "2T"]);
    server.sanctl(&["snapshot", "create", "vd", "s1", "--cow-size", "24G"]);
    let s1 = snapshots(&server, "vd")?
        .into_iter()
        .find(|s| s.name == "s1")
        .ok_or("no snapshot s1")?;
    let count = VOLUME_BYTES / CHUNK * permille / 1000;
    let order = changed_chunks(count);
    server.kill9();
    write_records(&image, &s1, &order)?;

    let started = Instant::now();
    server.restart()?;
    let listed = snapshots(&server, "vd")?;
    let load = started.elapsed();
    let changed = listed.first().map_or(0, |s| s.changed_chunks);
    if changed != count {
        return Err(format!("sand loaded {changed} changed chunks, not {count}"));
    }
    let started = Instant::now();
    server.sanctl(&["snapshot", "create", "vd", "s2", "--cow-size", "1G"]);
    let take = started.elapsed();
    let started = Instant::now();
    let printed = server.sanctl(&["snapshot", "diff", "vd", "s1", "s2"]);
    let diff = started.elapsed();
    let expected: BTreeSet<u64> = order.iter().copied().collect();
    if printed_chunks(&printed)? != expected {
        return Err("snapshot diff printed other chunks than were changed".into());
    }
    drop(server);
    let _ = std::fs::remove_file(&image_path);
    Ok(format!(
        "| Changed-chunk list, 2 TiB volume, {count} of {} chunks changed ({}.{} %), 64 KiB chunks | seconds |\n\
         |---|---|\n\
         | `sand` restart until `snapshot list` shows them (record area read) | {:.2} |\n\
         | `sanctl snapshot create vd s2` (list stored with s2) | {:.2} |\n\
         | `sanctl snapshot diff vd s1 s2` (exactly the changed chunks, {} lines) | {:.2} |\n",
        VOLUME_BYTES / CHUNK,
        permille / 10,
        permille % 10,
        load.as_secs_f64(),
        take.as_secs_f64(),
        printed.lines().count(),
        diff.as_secs_f64(),
    ))
}

fn main() -> ExitCode {
    match backup_bench().and_then(|backup| Ok(backup + &diff_bench()?)) {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sanblk-bench-backup: {e}");
            ExitCode::FAILURE
        }
    }
}
