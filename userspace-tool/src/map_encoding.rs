//! Turns the server's JSON map into the binary map the kernel module validates (uapi), and
//! finds each device the map names among the host's block devices by its label.
//!
//! The server describes a striped volume as stripe-unit-sized extents rotating over the
//! devices; runs of those are folded back into striped extents so the encoded map stays small
//! (a 1 GiB volume striped at 1 MiB would otherwise need 1024 extents).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sanblk_proto::label::read_label;
use sanblk_proto::map::VolumeMap;
use sanblk_uapi::map::{self as wire, ExtentKind, MapHeader, Member, MAX_MEMBERS};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("SAN device {0} is not attached to this host (no block device carries its label)")]
    MissingDevice(Uuid),
    #[error("the map uses more than {} devices", wire::MAX_DEVICES)]
    TooManyDevices,
    #[error("an extent has {0} replicas; at most {MAX_MEMBERS} are supported")]
    TooManyReplicas(usize),
    #[error("the encoded map is invalid: {0}")]
    Invalid(&'static str),
    #[error("the map is too large for the kernel ({0} bytes)")]
    TooLarge(usize),
}

/// A SAN device found on this host.
#[derive(Debug, Clone)]
pub struct LocalDevice {
    pub path: PathBuf,
    pub size: u64,
}

/// Reads the label of every block device under /sys/class/block (whole disks and partitions,
/// but not sanblk's own devices) and indexes them by device UUID.
pub fn scan_devices(dev_dir: &Path) -> HashMap<Uuid, LocalDevice> {
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/sys/class/block") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("sanblk") || name.starts_with("ram") {
            continue;
        }
        let path = dev_dir.join(&name);
        if let Ok(Some(label)) = read_label(&path) {
            found.insert(
                label.device_uuid,
                LocalDevice {
                    path,
                    size: label.device_size,
                },
            );
        }
    }
    found
}

/// Like [`scan_devices`], over an explicit list of device paths only.
pub fn scan_paths(paths: &[PathBuf]) -> HashMap<Uuid, LocalDevice> {
    let mut found = HashMap::new();
    for path in paths {
        if let Ok(Some(label)) = read_label(path) {
            found.insert(
                label.device_uuid,
                LocalDevice {
                    path: path.clone(),
                    size: label.device_size,
                },
            );
        }
    }
    found
}

/// The encoded map and the local path of each device in its device table, in order.
pub struct EncodedMap {
    pub bytes: Vec<u8>,
    pub device_paths: Vec<String>,
}

pub fn encode(
    map: &VolumeMap,
    devices: &HashMap<Uuid, LocalDevice>,
) -> Result<EncodedMap, EncodeError> {
    let mut order: Vec<Uuid> = Vec::new();
    let mut index_of = |uuid: Uuid| -> Result<u32, EncodeError> {
        if let Some(i) = order.iter().position(|u| *u == uuid) {
            return Ok(i as u32);
        }
        if !devices.contains_key(&uuid) {
            return Err(EncodeError::MissingDevice(uuid));
        }
        order.push(uuid);
        Ok(order.len() as u32 - 1)
    };
    let mut extents: Vec<wire::Extent> = Vec::new();
    for extent in &map.extents {
        if extent.replicas.len() > MAX_MEMBERS {
            return Err(EncodeError::TooManyReplicas(extent.replicas.len()));
        }
        let mut members = [Member::default(); MAX_MEMBERS];
        for (slot, replica) in members.iter_mut().zip(&extent.replicas) {
            *slot = Member {
                device: index_of(replica.device_uuid)?,
                offset: replica.device_offset,
            };
        }
        extents.push(wire::Extent {
            volume_offset: extent.volume_offset,
            length: extent.length,
            kind: ExtentKind::Replicated,
            stripe_unit: 0,
            member_count: extent.replicas.len() as u8,
            members,
        });
    }
    if order.len() > wire::MAX_DEVICES as usize {
        return Err(EncodeError::TooManyDevices);
    }
    let extents = fold_stripes(extents);
    let wire_devices: Vec<wire::Device> = order
        .iter()
        .map(|uuid| wire::Device {
            uuid: *uuid.as_bytes(),
            size: devices[uuid].size,
        })
        .collect();
    let header = MapHeader {
        volume_id: map.volume_id,
        epoch: map.epoch,
        size: map.size_bytes,
        block_size: map.block_size as u32,
        lease_ms: map.lease_ms.min(u32::MAX as u64) as u32,
        device_count: wire_devices.len() as u32,
        extent_count: extents.len() as u32,
    };
    let len = wire::encoded_len(wire_devices.len(), extents.len());
    if len > sanblk_uapi::netlink::MAX_MAP_BYTES as usize {
        return Err(EncodeError::TooLarge(len));
    }
    let mut bytes = vec![0u8; len];
    wire::encode(&header, &wire_devices, &extents, &mut bytes)
        .map_err(|e| EncodeError::Invalid(e.message()))?;
    wire::MapView::parse(&bytes).map_err(|e| EncodeError::Invalid(e.message()))?;
    let device_paths = order
        .iter()
        .map(|u| devices[u].path.display().to_string())
        .collect();
    Ok(EncodedMap {
        bytes,
        device_paths,
    })
}

/// Folds runs of equal-length single-replica extents that rotate over N distinct devices, each
/// device's pieces contiguous on it, into one striped extent per run.
fn fold_stripes(extents: Vec<wire::Extent>) -> Vec<wire::Extent> {
    let mut out: Vec<wire::Extent> = Vec::new();
    let mut i = 0;
    while i < extents.len() {
        if let Some((folded, used)) = try_fold(&extents[i..]) {
            out.push(folded);
            i += used;
        } else {
            out.push(extents[i]);
            i += 1;
        }
    }
    out
}

fn try_fold(run: &[wire::Extent]) -> Option<(wire::Extent, usize)> {
    let first = run.first()?;
    let unit = first.length;
    if first.member_count != 1 || unit > u32::MAX as u64 {
        return None;
    }
    // Width: number of distinct devices before the first device repeats.
    let mut width = 0;
    while width < run.len() && width < MAX_MEMBERS {
        let e = &run[width];
        if e.member_count != 1 || e.length != unit {
            break;
        }
        if run[..width]
            .iter()
            .any(|p| p.members[0].device == e.members[0].device)
        {
            break;
        }
        width += 1;
    }
    if width < 2 {
        return None;
    }
    // Extend while the rotation and per-device contiguity hold.
    let mut used = width;
    while used < run.len() {
        let e = &run[used];
        let same_slot = &run[used - width];
        if e.member_count != 1
            || e.length != unit
            || e.members[0].device != same_slot.members[0].device
            || e.members[0].offset != same_slot.members[0].offset + unit
        {
            break;
        }
        used += 1;
    }
    used -= used % width;
    if used < 2 * width {
        return None;
    }
    let mut members = [Member::default(); MAX_MEMBERS];
    for (slot, e) in members.iter_mut().zip(&run[..width]) {
        *slot = e.members[0];
    }
    Some((
        wire::Extent {
            volume_offset: first.volume_offset,
            length: unit * used as u64,
            kind: ExtentKind::Striped,
            stripe_unit: unit as u32,
            member_count: width as u8,
            members,
        },
        used,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sanblk_proto::map::{Extent, Layout, Replica};

    const MIB: u64 = 1 << 20;

    fn devices(n: usize) -> (Vec<Uuid>, HashMap<Uuid, LocalDevice>) {
        let uuids: Vec<Uuid> = (0..n)
            .map(|i| Uuid::from_bytes([i as u8 + 1; 16]))
            .collect();
        let map = uuids
            .iter()
            .enumerate()
            .map(|(i, u)| {
                (
                    *u,
                    LocalDevice {
                        path: PathBuf::from(format!("/dev/vd{}", (b'a' + i as u8) as char)),
                        size: 64 * MIB,
                    },
                )
            })
            .collect();
        (uuids, map)
    }

    fn volume(extents: Vec<Extent>, size: u64, layout: Layout) -> VolumeMap {
        VolumeMap {
            volume_id: 4,
            name: "v".into(),
            epoch: 2,
            size_bytes: size,
            block_size: 4096,
            layout,
            extents,
            lease_ms: 30_000,
        }
    }

    #[test]
    fn striped_chunks_fold_into_one_striped_extent_with_the_same_mapping() {
        let (uuids, local) = devices(2);
        let extents: Vec<Extent> = (0..16u64)
            .map(|k| Extent {
                volume_offset: k * MIB,
                length: MIB,
                replicas: vec![Replica {
                    device_uuid: uuids[(k % 2) as usize],
                    device_offset: MIB + (k / 2) * MIB,
                }],
            })
            .collect();
        let map = volume(
            extents.clone(),
            16 * MIB,
            Layout::Striped {
                stripe_count: 2,
                stripe_unit_bytes: MIB,
            },
        );
        let encoded = encode(&map, &local).expect("encodes");
        let view = wire::MapView::parse(&encoded.bytes).expect("valid");
        assert_eq!(view.header().extent_count, 1);
        for extent in &extents {
            let piece = view.map(extent.volume_offset + 4096, 4096).expect("mapped");
            let target = piece.targets[0];
            assert_eq!(
                encoded.device_paths[target.device as usize],
                local[&extent.replicas[0].device_uuid]
                    .path
                    .display()
                    .to_string()
            );
            assert_eq!(target.offset, extent.replicas[0].device_offset + 4096);
        }
    }

    #[test]
    fn mirrors_keep_both_replicas_and_missing_devices_are_named() {
        let (uuids, mut local) = devices(2);
        let extents = vec![Extent {
            volume_offset: 0,
            length: 8 * MIB,
            replicas: vec![
                Replica {
                    device_uuid: uuids[0],
                    device_offset: MIB,
                },
                Replica {
                    device_uuid: uuids[1],
                    device_offset: 2 * MIB,
                },
            ],
        }];
        let map = volume(extents, 8 * MIB, Layout::Mirror);
        let encoded = encode(&map, &local).expect("encodes");
        let view = wire::MapView::parse(&encoded.bytes).expect("valid");
        assert_eq!(view.map(0, 4096).expect("mapped").target_count, 2);
        local.remove(&uuids[1]);
        let err = encode(&map, &local).err().expect("missing device");
        assert!(err.to_string().contains(&uuids[1].to_string()), "{err}");
    }
}
