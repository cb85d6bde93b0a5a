//! What I/O must know about a running recovery of its volume: the volume's write gate and
//! the plans that send redirected reads and writes to the right replicas while the copy runs.
//!
//! Consistency with redirected writes (the rule the I/O service follows): every volume has a
//! [`VolumeGate`], an async RwLock. Writes hold it shared; copying one chunk (read source +
//! write target) and the completion hold it exclusively, so a write and a chunk copy of the
//! same range never interleave. While a recovery is registered in the gate, a write to a
//! recovering range goes to the extent's replicas *and* the target, whatever the cursor: if the
//! chunk was already copied the target needs the write; if not, the later copy reads the new
//! data anyway. The write to the failed replica is best effort when a surviving mirror exists
//! (the copy does not read it), and required when the failed device is the copy source.
//! Registration is followed by taking the gate exclusively once (a barrier), so a write that
//! started before the recovery was registered finishes before the first chunk is read. The
//! completion raises the gate's minimum epoch under the exclusive lock, so a write that was
//! planned with the old map (without the target) gets -ESTALE instead of missing the target.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::RwLock;
use uuid::Uuid;

use sanblk_proto::map::Extent;

use crate::device::{plan, DeviceTable, Piece};
use crate::store::RecoverySegment;

/// Serialises redirected writes against recovery copying of one volume (module doc).
#[derive(Default)]
pub struct VolumeGate {
    /// Writes hold it shared; a chunk copy and the completion exclusively.
    pub lock: RwLock<()>,
    /// Writes carrying an older epoch are stale (raised at completion, under `lock`).
    min_epoch: AtomicU64,
    recovery: Mutex<Option<Arc<ActiveRecovery>>>,
}

/// What reads and writes must know about a running recovery of their volume.
#[derive(Debug)]
pub struct ActiveRecovery {
    pub failed_device: Uuid,
    /// In volume order.
    pub segments: Vec<RecoverySegment>,
    /// Bytes of the segments (taken in order) already copied to their targets.
    pub copied: AtomicU64,
    /// Set by `--cancel`: the job stops and rolls the relocation back.
    pub cancelled: AtomicBool,
}

impl ActiveRecovery {
    pub fn new(failed_device: Uuid, segments: Vec<RecoverySegment>, copied: u64) -> Self {
        ActiveRecovery {
            failed_device,
            segments,
            copied: AtomicU64::new(copied),
            cancelled: AtomicBool::new(false),
        }
    }
}

impl VolumeGate {
    pub fn min_epoch(&self) -> u64 {
        self.min_epoch.load(Ordering::Acquire)
    }

    pub fn recovery(&self) -> Option<Arc<ActiveRecovery>> {
        self.recovery
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes writes carrying an older epoch stale (at completion, under the exclusive lock).
    pub fn raise_min_epoch(&self, epoch: u64) {
        self.min_epoch.fetch_max(epoch, Ordering::AcqRel);
    }

    /// Registers (or, at completion, removes) the volume's running recovery.
    pub fn set_recovery(&self, recovery: Option<Arc<ActiveRecovery>>) {
        *self.recovery.lock().unwrap_or_else(|p| p.into_inner()) = recovery;
    }
}

/// A part of a piece inside one recovery segment: the segment, and the position of the part's
/// first byte in the copy order (bytes of the segments before it plus the offset inside).
type InSegment<'a> = Option<(&'a RecoverySegment, u64)>;

/// The replica of `piece` that the segments move (its device and offset), if it has one.
fn moving_replica(piece: &Piece, segments: &[RecoverySegment]) -> Option<(Uuid, u64)> {
    piece
        .replicas
        .iter()
        .find(|(uuid, _)| segments.iter().any(|s| s.failed.device_uuid == *uuid))
        .copied()
}

/// The offset of `piece` on `device`, if one of its replicas is there.
fn offset_on(piece: &Piece, device: Uuid) -> Option<u64> {
    piece
        .replicas
        .iter()
        .find(|(uuid, _)| *uuid == device)
        .map(|(_, offset)| *offset)
}

/// Splits `piece` at the boundaries of the recovery segments its replica on the failed
/// device overlaps. Segments are ranges of the failed device (`failed.device_offset`,
/// `length`), so this holds for every extent kind: a striped extent's member on the failed
/// device is one range there, however its stripe units interleave in the volume.
fn split_by_segments<'a>(
    piece: &Piece,
    segments: &'a [RecoverySegment],
) -> Vec<(Piece, InSegment<'a>)> {
    let Some((failed, start)) = moving_replica(piece, segments) else {
        return vec![(piece.clone(), None)];
    };
    let end = start + piece.length as u64;
    let sub_piece = |at: u64, until: u64| Piece {
        buffer_offset: piece.buffer_offset + (at - start) as usize,
        length: (until - at) as usize,
        replicas: piece
            .replicas
            .iter()
            .map(|&(uuid, offset)| (uuid, offset + (at - start)))
            .collect(),
    };
    let mut parts = Vec::new();
    let mut at = start;
    while at < end {
        let mut before = 0;
        let mut next_start = end;
        let mut holding = None;
        for segment in segments {
            if segment.failed.device_uuid != failed {
                before += segment.length;
                continue;
            }
            let first = segment.failed.device_offset;
            if first <= at && at < first + segment.length {
                holding = Some((segment, before + (at - first)));
                break;
            }
            if first > at {
                next_start = next_start.min(first);
            }
            before += segment.length;
        }
        match holding {
            Some((segment, position)) => {
                let until = end.min(segment.failed.device_offset + segment.length);
                parts.push((sub_piece(at, until), Some((segment, position))));
                at = until;
            }
            // Not in a segment (cannot happen for an extent on the failed device).
            None => {
                parts.push((sub_piece(at, next_start), None));
                at = next_start;
            }
        }
    }
    parts
}

/// The target replica of the bytes of `segment` at `offset` of the failed device.
fn target_of(segment: &RecoverySegment, offset: u64) -> (Uuid, u64) {
    (
        segment.target.device_uuid,
        segment.target.device_offset + (offset - segment.failed.device_offset),
    )
}

/// Splits the pieces of a write to a recovering volume and adds the recovery targets:
/// returns (pieces that must all succeed, pieces whose failure is only logged).
pub fn write_plan(pieces: Vec<Piece>, recovery: &ActiveRecovery) -> (Vec<Piece>, Vec<Piece>) {
    let mut required = Vec::with_capacity(pieces.len());
    let mut best_effort = Vec::new();
    for piece in pieces {
        for (mut part, segment) in split_by_segments(&piece, &recovery.segments) {
            let Some((segment, _)) = segment else {
                required.push(part);
                continue;
            };
            let failed = segment.failed.device_uuid;
            let Some(at) = offset_on(&part, failed) else {
                required.push(part);
                continue;
            };
            if segment.moved_copy_is_best_effort() {
                let (failed_copies, others): (Vec<_>, Vec<_>) =
                    part.replicas.into_iter().partition(|(u, _)| *u == failed);
                part.replicas = others;
                best_effort.push(Piece {
                    buffer_offset: part.buffer_offset,
                    length: part.length,
                    replicas: failed_copies,
                });
            }
            part.replicas.push(target_of(segment, at));
            required.push(part);
        }
    }
    (required, best_effort)
}

/// The replicas a read of a recovering volume may use, in order of preference: the
/// extent's other replicas, then the failed device (the client's path to it failed, the
/// server's may not have: for a single-copy extent it is the copy source), then, for the part
/// already copied, the recovery target (same data: writes go to both while the copy runs).
/// A read fails only if none of them can be read.
/// Reads `target.len()` bytes at volume offset `at` of a volume with `extents` through
/// `devices`, following the read plan of its running recovery, if any (blocking).
pub fn read_volume(
    devices: &DeviceTable,
    extents: &[Extent],
    recovery: Option<&ActiveRecovery>,
    at: u64,
    target: &mut [u8],
) -> std::io::Result<()> {
    let pieces = plan(extents, at, target.len() as u64)
        .ok_or_else(|| std::io::Error::other("volume range not mapped"))?;
    let pieces = match recovery {
        Some(active) => read_plan(pieces, active),
        None => pieces,
    };
    devices.read(&pieces, target)
}

pub fn read_plan(pieces: Vec<Piece>, recovery: &ActiveRecovery) -> Vec<Piece> {
    let copied = recovery.copied.load(Ordering::Acquire);
    let mut planned = Vec::with_capacity(pieces.len());
    for piece in pieces {
        for (mut part, segment) in split_by_segments(&piece, &recovery.segments) {
            let Some((segment, position)) = segment else {
                planned.push(part);
                continue;
            };
            let failed = segment.failed.device_uuid;
            part.replicas.sort_by_key(|(uuid, _)| *uuid == failed);
            let Some(at) = offset_on(&part, failed) else {
                planned.push(part);
                continue;
            };
            let done = (copied.saturating_sub(position) as usize).min(part.length);
            if done == 0 {
                planned.push(part);
                continue;
            }
            let mut head = Piece {
                buffer_offset: part.buffer_offset,
                length: done,
                replicas: part.replicas.clone(),
            };
            head.replicas.push(target_of(segment, at));
            planned.push(head);
            if done < part.length {
                let shift = done as u64;
                planned.push(Piece {
                    buffer_offset: part.buffer_offset + done,
                    length: part.length - done,
                    replicas: part
                        .replicas
                        .iter()
                        .map(|&(uuid, offset)| (uuid, offset + shift))
                        .collect(),
                });
            }
        }
    }
    planned
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sanblk_proto::map::Replica;

    fn replica(device: u128, device_offset: u64) -> Replica {
        Replica {
            device_uuid: Uuid::from_u128(device),
            device_offset,
        }
    }

    /// Volume [0, 2 MiB) on device 1 at 10 MiB; replacement in two pieces on devices 3 and 4.
    pub(crate) fn linear_recovery() -> ActiveRecovery {
        let mib = 1 << 20;
        ActiveRecovery::new(
            Uuid::from_u128(1),
            vec![
                RecoverySegment {
                    volume_offset: 0,
                    length: mib,
                    failed: replica(1, 10 * mib),
                    source: replica(1, 10 * mib),
                    target: replica(3, 50 * mib),
                },
                RecoverySegment {
                    volume_offset: mib,
                    length: mib,
                    failed: replica(1, 11 * mib),
                    source: replica(1, 11 * mib),
                    target: replica(4, 70 * mib),
                },
            ],
            0,
        )
    }

    #[test]
    fn reads_of_a_recovering_range_fall_back_to_the_target_where_copied() {
        let mib = 1 << 20;
        let recovery = linear_recovery();
        // Copied: the first segment and 4 KiB of the second.
        recovery.copied.store(mib + 4096, Ordering::Release);
        let read = Piece {
            buffer_offset: 0,
            length: 12288,
            replicas: vec![(Uuid::from_u128(1), 11 * mib - 4096)],
        };
        let failed = |offset: u64| (Uuid::from_u128(1), offset);
        assert_eq!(
            read_plan(vec![read.clone()], &recovery),
            vec![
                Piece {
                    buffer_offset: 0,
                    length: 4096,
                    replicas: vec![
                        failed(11 * mib - 4096),
                        (Uuid::from_u128(3), 51 * mib - 4096)
                    ],
                },
                Piece {
                    buffer_offset: 4096,
                    length: 4096,
                    replicas: vec![failed(11 * mib), (Uuid::from_u128(4), 70 * mib)],
                },
                Piece {
                    buffer_offset: 8192,
                    length: 4096,
                    replicas: vec![failed(11 * mib + 4096)],
                },
            ]
        );
        // Nothing copied yet: the failed device only.
        recovery.copied.store(0, Ordering::Release);
        let plan = read_plan(vec![read], &recovery);
        assert!(plan.iter().all(|p| p.replicas.len() == 1), "{plan:?}");
    }

    #[test]
    fn writes_to_a_recovering_range_also_go_to_the_target() {
        let mib = 1 << 20;
        let write = Piece {
            buffer_offset: 0,
            length: 8192,
            replicas: vec![(Uuid::from_u128(1), 11 * mib - 4096)],
        };
        let (required, best_effort) = write_plan(vec![write], &linear_recovery());
        assert!(best_effort.is_empty());
        assert_eq!(
            required,
            vec![
                Piece {
                    buffer_offset: 0,
                    length: 4096,
                    replicas: vec![
                        (Uuid::from_u128(1), 11 * mib - 4096),
                        (Uuid::from_u128(3), 51 * mib - 4096)
                    ],
                },
                Piece {
                    buffer_offset: 4096,
                    length: 4096,
                    replicas: vec![
                        (Uuid::from_u128(1), 11 * mib),
                        (Uuid::from_u128(4), 70 * mib)
                    ],
                },
            ]
        );
    }

    #[test]
    fn with_a_surviving_mirror_the_failed_copy_is_best_effort() {
        let mib = 1 << 20;
        let recovery = ActiveRecovery::new(
            Uuid::from_u128(1),
            vec![RecoverySegment {
                volume_offset: 0,
                length: mib,
                failed: replica(1, 10 * mib),
                source: replica(2, 20 * mib),
                target: replica(3, 30 * mib),
            }],
            0,
        );
        let write = Piece {
            buffer_offset: 0,
            length: 4096,
            replicas: vec![
                (Uuid::from_u128(1), 10 * mib + 4096),
                (Uuid::from_u128(2), 20 * mib + 4096),
            ],
        };
        let (required, best_effort) = write_plan(vec![write], &recovery);
        assert_eq!(
            required[0].replicas,
            vec![
                (Uuid::from_u128(2), 20 * mib + 4096),
                (Uuid::from_u128(3), 30 * mib + 4096)
            ]
        );
        assert_eq!(
            best_effort[0].replicas,
            vec![(Uuid::from_u128(1), 10 * mib + 4096)]
        );
        let elsewhere = Piece {
            buffer_offset: 0,
            length: 4096,
            replicas: vec![(Uuid::from_u128(5), 0)],
        };
        let (required, best_effort) = write_plan(vec![elsewhere.clone()], &recovery);
        assert_eq!((required, best_effort), (vec![elsewhere], Vec::new()));
    }
}
