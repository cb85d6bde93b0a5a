//! The pseudo-device: every active snapshot as a read-only NBD export named
//! `VOLUME@SNAPSHOT` (see `nbd`), reading copied chunks from the snapshot's COW store and the
//! rest from the origin, and telling block-status queries which chunks changed since the
//! snapshot before it.

use std::io;
use std::sync::Arc;

use sanblk_proto::map::Extent;
use sanblk_proto::nbd::CHANGED_FLAG;

use crate::device::plan;
use crate::nbd::{Export, Exports};
use crate::recovery_gate;
use crate::state::ServerState;
use crate::store::{SnapshotRecord, SnapshotState};

/// Most runs one block-status answer describes (the client asks again from where it ends).
const MAX_RUNS: usize = 65_536;

pub struct SnapshotExports {
    pub state: Arc<ServerState>,
}

impl Exports for SnapshotExports {
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, String> {
        let (volume_name, snapshot_name) = name
            .split_once('@')
            .ok_or_else(|| format!("export names are VOLUME@SNAPSHOT, not {name:?}"))?;
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
        Ok(Arc::new(SnapshotExport {
            state: self.state.clone(),
            changed: snapshot.changed_since_previous.clone(),
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

struct SnapshotExport {
    state: Arc<ServerState>,
    snapshot: SnapshotRecord,
    /// Chunks changed since the previous snapshot, ascending; `None`: no previous snapshot,
    /// so every chunk counts as changed (a backup from it is a full one).
    changed: Option<Vec<u64>>,
}

/// Reads the origin volume through the server's own path (the part a running recovery has
/// copied from its target if the failed device cannot serve it).
fn read_origin(
    state: &ServerState,
    volume_id: u64,
    extents: &[Extent],
    at: u64,
    target: &mut [u8],
) -> io::Result<()> {
    let pieces = plan(extents, at, target.len() as u64)
        .ok_or_else(|| io::Error::other("origin range not mapped"))?;
    let pieces = match state.recoveries.gate(volume_id).recovery() {
        Some(active) => recovery_gate::read_plan(pieces, &active),
        None => pieces,
    };
    state.snapshots.devices().read(&pieces, target)
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
        let origin = |at: u64, target: &mut [u8]| {
            read_origin(&self.state, volume_id, &volume.extents, at, target)
        };
        self.state
            .snapshots
            .read(&self.snapshot, volume.epoch, offset, buf, &origin)
    }

    fn changed(&self, offset: u64, length: u64) -> io::Result<Vec<(u64, u32)>> {
        let end = offset.saturating_add(length).min(self.size());
        Ok(changed_runs(
            self.changed.as_deref(),
            u64::from(self.snapshot.chunk_bytes),
            offset,
            end,
        ))
    }
}

/// The runs (length, flags) covering `[offset, end)` given the changed chunks (ascending;
/// `None`: all changed), at most [`MAX_RUNS`] of them; never empty for a non-empty range.
fn changed_runs(
    changed: Option<&[u64]>,
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
    while at < end && runs.len() < MAX_RUNS {
        let (run_end, flags) = match changed.get(next) {
            Some(&chunk) if chunk * chunk_bytes <= at => {
                next += 1;
                ((chunk + 1) * chunk_bytes, CHANGED_FLAG)
            }
            Some(&chunk) => (chunk * chunk_bytes, 0),
            None => (end, 0),
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
        let runs = changed_runs(Some(&changed), CHUNK, 0, 8 * CHUNK);
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
        let runs = changed_runs(Some(&changed), CHUNK, CHUNK + 100, 3 * CHUNK + 7);
        assert_eq!(runs, vec![(2 * CHUNK - 100, CHANGED_FLAG), (7, 0)]);
        assert_eq!(changed_runs(None, CHUNK, 10, 20), vec![(10, CHANGED_FLAG)]);
        assert_eq!(changed_runs(Some(&[]), CHUNK, 0, CHUNK), vec![(CHUNK, 0)]);
        assert!(changed_runs(Some(&changed), CHUNK, 5, 5).is_empty());
    }
}
