//! The pseudo-device: every active snapshot as a read-only NBD export named
//! `VOLUME@SNAPSHOT` (see `nbd`), reading copied chunks from the snapshot's COW store and the
//! rest from the origin, and telling block-status queries which chunks changed since the
//! snapshot before it. And, for restoring a backup, a volume no client has attached and with
//! no snapshot, as a writable export named `VOLUME` (attaches are refused while it is open).

use std::io;
use std::sync::Arc;

use sanblk_proto::nbd::CHANGED_FLAG;

use crate::device::plan;
use crate::nbd::{Export, Exports};
use crate::recovery_gate;
use crate::state::ServerState;
use crate::store::{SnapshotRecord, SnapshotState, VolumeRecord};

/// Most runs one block-status answer describes (the client asks again from where it ends).
const MAX_RUNS: usize = 65_536;

pub struct SnapshotExports {
    pub state: Arc<ServerState>,
}

impl Exports for SnapshotExports {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, String> {
        let Some((volume_name, snapshot_name)) = name.split_once('@') else {
            return self.open_for_restore(name);
        };
        let store = &self.state.store;
        let volume = store
            .volume_by_name(volume_name)
            .map_err(|e| e.to_string())?;
        let snapshot = store
            .snapshot_named(volume.id, snapshot_name)
            .map_err(|e| e.to_string())?;
        match snapshot.state {
            SnapshotState::Active => {}
            SnapshotState::Pending => return Err(format!("snapshot {name} is not taken yet")),
            SnapshotState::Invalid => {
                return Err(format!(
                    "snapshot {name} is invalid: {}",
                    snapshot
                        .invalid_reason
                        .as_deref()
                        .unwrap_or("no reason recorded")
                ))
            }
        }
        let chunk = u64::from(snapshot.chunk_bytes.max(1));
        Ok(Arc::new(SnapshotExport {
            state: self.state.clone(),
            changed: snapshot.changed_since_previous.clone(),
            grown_from: snapshot.previous_bytes.map(|bytes| bytes / chunk),
            snapshot,
        }))
    }

    fn names(&self) -> Vec<String> {
        let store = &self.state.store;
        let (Ok(volumes), Ok(snapshots)) = (store.volumes(), store.snapshots()) else {
            return Vec::new();
        };
        snapshots
            .iter()
            .filter(|s| s.state == SnapshotState::Active)
            .filter_map(|s| {
                let volume = volumes.iter().find(|v| v.id == s.volume_id)?;
                Some(format!("{}@{}", volume.name, s.name))
            })
            .collect()
    }
}

impl SnapshotExports {
    fn open_for_restore(&self, name: &str) -> Result<Arc<dyn Export>, String> {
        let store = &self.state.store;
        let volume = store.volume_by_name(name).map_err(|e| e.to_string())?;
        let snapshots = store.snapshots_of(volume.id).map_err(|e| e.to_string())?;
        if !snapshots.is_empty() {
            return Err(format!(
                "volume {name} has {} snapshot(s): restore onto a new volume",
                snapshots.len()
            ));
        }
        if store
            .recovery(volume.id)
            .map_err(|e| e.to_string())?
            .is_some()
        {
            return Err(format!("volume {name} is being moved or recovered"));
        }
        self.state
            .begin_restore(volume.id)
            .map_err(|e| format!("volume {name}: {}", e.message))?;
        Ok(Arc::new(RestoreExport {
            state: self.state.clone(),
            volume,
        }))
    }
}

/// A volume written through NBD by a restore; the reservation ends when the export is closed.
struct RestoreExport {
    state: Arc<ServerState>,
    volume: VolumeRecord,
}

impl Drop for RestoreExport {
    fn drop(&mut self) {
        self.state.end_restore(self.volume.id);
    }
}

impl RestoreExport {
    fn pieces(&self, offset: u64, length: usize) -> io::Result<Vec<crate::device::Piece>> {
        plan(&self.volume.extents, offset, length as u64)
            .ok_or_else(|| io::Error::other("range not mapped"))
    }
}

impl Export for RestoreExport {
    fn size(&self) -> u64 {
        self.volume.size_bytes
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let pieces = self.pieces(offset, buf.len())?;
        self.state.snapshots.devices().read(&pieces, buf)
    }

    fn changed(&self, offset: u64, length: u64) -> io::Result<Vec<(u64, u32)>> {
        let end = offset.saturating_add(length).min(self.size());
        Ok(if offset < end {
            vec![(end - offset, 0)]
        } else {
            Vec::new()
        })
    }

    fn writable(&self) -> bool {
        true
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let pieces = self.pieces(offset, data.len())?;
        self.state.snapshots.devices().write(&pieces, data, false)
    }

    fn flush(&self) -> io::Result<()> {
        self.state.snapshots.devices().flush(&self.volume.extents)
    }
}

struct SnapshotExport {
    state: Arc<ServerState>,
    snapshot: SnapshotRecord,
    /// Chunks changed since the previous snapshot, ascending; `None`: no previous snapshot,
    /// so every chunk counts as changed (a backup from it is a full one).
    changed: Option<Vec<u64>>,
    /// The first chunk the volume grew into since the previous snapshot: it and every one
    /// after it count as changed.
    grown_from: Option<u64>,
}

impl Export for SnapshotExport {
    fn size(&self) -> u64 {
        self.snapshot.origin_bytes
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let volume_id = self.snapshot.volume_id;
        let volume = self
            .state
            .store
            .volume_by_id(volume_id)
            .map_err(io::Error::other)?;
        let active = self.state.recoveries.gate(volume_id).recovery();
        let devices = self.state.snapshots.devices();
        let origin = |at: u64, target: &mut [u8]| {
            recovery_gate::read_volume(devices, &volume.extents, active.as_deref(), at, target)
        };
        self.state
            .snapshots
            .read(&self.snapshot, volume.epoch, offset, buf, &origin)
    }

    fn changed(&self, offset: u64, length: u64) -> io::Result<Vec<(u64, u32)>> {
        let end = offset.saturating_add(length).min(self.size());
        Ok(changed_runs(
            self.changed.as_deref(),
            self.grown_from,
            u64::from(self.snapshot.chunk_bytes),
            offset,
            end,
        ))
    }
}

/// The runs (length, flags) covering `[offset, end)` given the changed chunks (ascending;
/// `None`: all changed) and the first chunk of the growth (it and all after it changed), at
/// most [`MAX_RUNS`] of them; never empty for a non-empty range.
fn changed_runs(
    changed: Option<&[u64]>,
    grown_from: Option<u64>,
    chunk_bytes: u64,
    offset: u64,
    end: u64,
) -> Vec<(u64, u32)> {
    if offset >= end {
        return Vec::new();
    }
    let Some(changed) = changed else {
        return vec![(end - offset, CHANGED_FLAG)];
    };
    let mut runs: Vec<(u64, u32)> = Vec::new();
    let mut at = offset;
    let mut next = changed.partition_point(|&c| (c + 1) * chunk_bytes <= offset);
    let grown_at = grown_from.map_or(u64::MAX, |chunk| chunk.saturating_mul(chunk_bytes));
    while at < end && runs.len() < MAX_RUNS {
        let (run_end, flags) = match changed.get(next) {
            _ if at >= grown_at => (end, CHANGED_FLAG),
            Some(&chunk) if chunk * chunk_bytes <= at => {
                next += 1;
                ((chunk + 1) * chunk_bytes, CHANGED_FLAG)
            }
            Some(&chunk) => ((chunk * chunk_bytes).min(grown_at), 0),
            None => (grown_at, 0),
        };
        let run_end = run_end.min(end);
        match runs.last_mut() {
            Some((length, last_flags)) if *last_flags == flags => *length += run_end - at,
            _ => runs.push((run_end - at, flags)),
        }
        at = run_end;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 65536;

    #[test]
    fn runs_cover_the_range_and_merge_neighbours() {
        let changed = [1, 2, 5];
        let runs = changed_runs(Some(&changed), None, CHUNK, 0, 8 * CHUNK);
        assert_eq!(
            runs,
            vec![
                (CHUNK, 0),
                (2 * CHUNK, CHANGED_FLAG),
                (2 * CHUNK, 0),
                (CHUNK, CHANGED_FLAG),
                (2 * CHUNK, 0)
            ]
        );
        // From the middle of a changed chunk to the middle of an unchanged one.
        let runs = changed_runs(Some(&changed), None, CHUNK, CHUNK + 100, 3 * CHUNK + 7);
        assert_eq!(runs, vec![(2 * CHUNK - 100, CHANGED_FLAG), (7, 0)]);
        assert_eq!(
            changed_runs(None, None, CHUNK, 10, 20),
            vec![(10, CHANGED_FLAG)]
        );
        assert_eq!(
            changed_runs(Some(&[]), None, CHUNK, 0, CHUNK),
            vec![(CHUNK, 0)]
        );
        assert!(changed_runs(Some(&changed), None, CHUNK, 5, 5).is_empty());
    }

    #[test]
    fn the_growth_is_changed_from_its_first_chunk_on() {
        let runs = changed_runs(Some(&[1]), Some(4), CHUNK, 0, 6 * CHUNK);
        assert_eq!(
            runs,
            vec![
                (CHUNK, 0),
                (CHUNK, CHANGED_FLAG),
                (2 * CHUNK, 0),
                (2 * CHUNK, CHANGED_FLAG)
            ]
        );
        // A written chunk just below the growth joins it; a range inside the growth.
        let runs = changed_runs(Some(&[3]), Some(4), CHUNK, 0, 6 * CHUNK);
        assert_eq!(runs, vec![(3 * CHUNK, 0), (3 * CHUNK, CHANGED_FLAG)]);
        let runs = changed_runs(Some(&[]), Some(4), CHUNK, 5 * CHUNK + 9, 6 * CHUNK);
        assert_eq!(runs, vec![(CHUNK - 9, CHANGED_FLAG)]);
        // Nothing grown: the growth chunk is beyond the range.
        let runs = changed_runs(Some(&[]), Some(8), CHUNK, 0, 6 * CHUNK);
        assert_eq!(runs, vec![(6 * CHUNK, 0)]);
    }
}
