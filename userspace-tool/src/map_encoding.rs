//! Turns the server's JSON map into the binary map the kernel module validates (uapi), and
//! finds each device the map names among the host's block devices by its label.
//!
//! Both maps have the same extent kinds (replicated, striped with its unit), so every extent
//! of the server's map becomes one extent of the kernel's. An extent overlapping any of the
//! map's syncing ranges (data the server is copying) is flagged `EXTENT_SYNCING`, whole: the
//! module then sends all writes to it through the server.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sanblk_proto::label::{read_label, LabelError};
use sanblk_proto::map::{CowStoreLocation, ExtentKind as ServerKind, VolumeMap};
use sanblk_uapi::map::{
    self as wire, ExtentKind, MapCowStore, MapHeader, Member, StoreExtent, StoreSection,
    EXTENT_SYNCING, MAX_COW_STORES, MAX_MEMBERS,
};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("SAN device {0} is not attached to this host (no block device carries its label)")]
    MissingDevice(Uuid),
    #[error("the map uses more than {} devices", wire::MAX_DEVICES)]
    TooManyDevices,
    #[error("an extent has {0} replicas; at most {MAX_MEMBERS} are supported")]
    TooManyReplicas(usize),
    #[error("stripe unit of {0} bytes is too large for the kernel map")]
    BadStripeUnit(u64),
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
    scan_paths(&block_devices(dev_dir))
}

/// Every block device of this host under `dev_dir` that may be a SAN device.
fn block_devices(dev_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/class/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().to_string())
        .filter(|name| !name.starts_with("sanblk") && !name.starts_with("ram"))
        .map(|name| dev_dir.join(name))
        .collect()
}

/// The candidate devices (`paths`, or every block device under `dev_dir` when empty) whose
/// label this user may not read (EACCES/EPERM): a device named by the map may be among them.
pub fn unreadable_devices(dev_dir: &Path, paths: &[PathBuf]) -> Vec<PathBuf> {
    let candidates = if paths.is_empty() {
        block_devices(dev_dir)
    } else {
        paths.to_vec()
    };
    candidates
        .into_iter()
        .filter(|path| {
            matches!(
                read_label(path),
                Err(LabelError::Io { ref source, .. })
                    if source.kind() == std::io::ErrorKind::PermissionDenied
            )
        })
        .collect()
}

/// Why a device of the map was not found: not attached to this host, or (when some candidate
/// devices could not be read for lack of permission) possibly among those.
pub fn missing_device_reason(uuid: Uuid, unreadable: &[PathBuf]) -> String {
    if unreadable.is_empty() {
        return EncodeError::MissingDevice(uuid).to_string();
    }
    let shown: Vec<String> = unreadable.iter().map(|p| p.display().to_string()).collect();
    format!(
        "SAN device {uuid} not found: permission denied (EACCES) reading the label of {}; \
         run sanctl attach as root or as a user that may open the SAN devices",
        shown.join(", ")
    )
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

/// The kernel map's COW store section for `store`, adding the store's devices to `order`;
/// `None` (and `order` unchanged) if a store device is not on this host, an extent is not a
/// single replica, the store's chunk size is not one the module takes in a map of
/// `map_chunk_bytes` chunks, or the section or device table would grow too large.
fn store_section(
    store: &CowStoreLocation,
    map_chunk_bytes: u32,
    devices: &HashMap<Uuid, LocalDevice>,
    order: &mut Vec<Uuid>,
) -> Option<(MapCowStore, Vec<StoreExtent>)> {
    if store.extents.is_empty()
        || store.extents.len() > wire::MAX_STORE_EXTENTS as usize
        || !wire::valid_chunk_bytes(store.chunk_bytes)
        || store.chunk_bytes < map_chunk_bytes
    {
        return None;
    }
    let mut grown = order.clone();
    let mut store_extents = Vec::with_capacity(store.extents.len());
    for extent in &store.extents {
        let ([replica], ServerKind::Replicated) = (extent.replicas.as_slice(), extent.kind) else {
            return None;
        };
        if !devices.contains_key(&replica.device_uuid) {
            return None;
        }
        let device = match grown.iter().position(|u| *u == replica.device_uuid) {
            Some(index) => index,
            None => {
                grown.push(replica.device_uuid);
                grown.len() - 1
            }
        };
        store_extents.push(StoreExtent {
            device: u32::try_from(device).ok()?,
            offset: replica.device_offset,
            length: extent.length,
        });
    }
    if grown.len() > wire::MAX_DEVICES as usize {
        return None;
    }
    *order = grown;
    let section = MapCowStore {
        snapshot_id: store.snapshot_id,
        store_bytes: store.store_bytes,
        scan_from_sector: store.scan_from_sector,
        extent_count: store_extents.len() as u32,
        chunk_bytes: store.chunk_bytes,
    };
    Some((section, store_extents))
}

/// The kernel map's COW store sections for `stores` (newest snapshot first, as the server
/// lists them), adding their devices to `order`: all of them or none (and `order`
/// unchanged), so the module either may preserve chunks into every active snapshot's store
/// or sends every first write through the server, which then makes the copies.
fn store_sections(
    stores: &[CowStoreLocation],
    map_chunk_bytes: u32,
    devices: &HashMap<Uuid, LocalDevice>,
    order: &mut Vec<Uuid>,
) -> Vec<(MapCowStore, Vec<StoreExtent>)> {
    if stores.len() > MAX_COW_STORES as usize {
        return Vec::new();
    }
    let mut grown = order.clone();
    let Some(sections) = stores
        .iter()
        .map(|store| store_section(store, map_chunk_bytes, devices, &mut grown))
        .collect::<Option<Vec<_>>>()
    else {
        return Vec::new();
    };
    *order = grown;
    sections
}

/// `sections` as the uapi encoder takes them.
fn stores_of(sections: &[(MapCowStore, Vec<StoreExtent>)]) -> Vec<StoreSection<'_>> {
    sections.iter().map(|(s, e)| (*s, e.as_slice())).collect()
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
        let (kind, stripe_unit) = match extent.kind {
            ServerKind::Replicated => (ExtentKind::Replicated, 0),
            ServerKind::Striped { stripe_unit } => (
                ExtentKind::Striped,
                u32::try_from(stripe_unit).map_err(|_| EncodeError::BadStripeUnit(stripe_unit))?,
            ),
        };
        extents.push(wire::Extent {
            volume_offset: extent.volume_offset,
            length: extent.length,
            kind,
            stripe_unit,
            member_count: extent.replicas.len() as u8,
            flags: if map.is_syncing(extent.volume_offset, extent.length) {
                EXTENT_SYNCING
            } else {
                0
            },
            members,
        });
    }
    if order.len() > wire::MAX_DEVICES as usize {
        return Err(EncodeError::TooManyDevices);
    }
    // The COW store sections are an offer: without them the module sends first writes
    // through the server, so stores this host cannot all reach (or the kernel map cannot
    // describe) are left out, all of them, rather than failing the map.
    let volume_devices = order.len();
    let (stores, map_chunk_bytes) = map
        .copy_on_write
        .as_ref()
        .map_or((&[][..], 0), |c| (c.stores.as_slice(), c.chunk_bytes));
    let mut sections = store_sections(stores, map_chunk_bytes, devices, &mut order);
    let device_table = |order: &[Uuid]| -> Vec<wire::Device> {
        order
            .iter()
            .map(|uuid| wire::Device {
                uuid: *uuid.as_bytes(),
                size: devices[uuid].size,
            })
            .collect()
    };
    let mut len =
        wire::encoded_len_with_stores(order.len(), map.extents.len(), &stores_of(&sections));
    if len > sanblk_uapi::netlink::MAX_MAP_BYTES as usize && !sections.is_empty() {
        // Too large with the stores: the map without them.
        sections.clear();
        order.truncate(volume_devices);
        len = wire::encoded_len(order.len(), map.extents.len());
    }
    if len > sanblk_uapi::netlink::MAX_MAP_BYTES as usize {
        return Err(EncodeError::TooLarge(len));
    }
    let wire_devices = device_table(&order);
    let header = MapHeader {
        volume_id: map.volume_id,
        epoch: map.epoch,
        size: map.size_bytes,
        block_size: map.block_size as u32,
        lease_ms: map.lease_ms.min(u32::MAX as u64) as u32,
        device_count: wire_devices.len() as u32,
        extent_count: extents.len() as u32,
        cow_generation: map.copy_on_write.as_ref().map_or(0, |c| c.generation),
        cow_chunk_bytes: map.copy_on_write.as_ref().map_or(0, |c| c.chunk_bytes),
    };
    let mut bytes = vec![0u8; len];
    wire::encode_with_stores(
        &header,
        &wire_devices,
        &extents,
        &stores_of(&sections),
        &mut bytes,
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use sanblk_proto::map::{ByteRange, Extent, Layout, Replica};

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
            syncing: Vec::new(),
            copy_on_write: None,
        }
    }

    #[test]
    fn striped_extents_are_encoded_one_to_one_with_the_same_mapping() {
        let (uuids, local) = devices(2);
        let member = |i: usize, device_offset: u64| Replica {
            device_uuid: uuids[i],
            device_offset,
        };
        let extents = vec![
            Extent::striped(0, 16 * MIB, MIB, vec![member(0, MIB), member(1, 2 * MIB)]),
            Extent::replicated(16 * MIB, MIB, vec![member(0, 9 * MIB)]),
        ];
        let map = volume(
            extents.clone(),
            17 * MIB,
            Layout::Striped {
                stripe_count: 2,
                stripe_unit_bytes: MIB,
            },
        );
        let encoded = encode(&map, &local).expect("encodes");
        let view = wire::MapView::parse(&encoded.bytes).expect("valid");
        assert_eq!(view.header().extent_count, 2);
        assert_eq!(view.extent(0).kind, ExtentKind::Striped);
        assert_eq!(view.extent(0).stripe_unit, MIB as u32);
        // Every block lands where the server's map says, through the kernel's lookup.
        for at in (0..17 * MIB).step_by(4096) {
            let extent = &extents[(at / (16 * MIB)) as usize];
            let (replicas, _) = extent
                .locate(at - extent.volume_offset)
                .expect("server map covers the volume");
            let piece = view.map(at, 4096).expect("mapped");
            assert_eq!(piece.target_count, 1);
            let target = piece.targets[0];
            assert_eq!(
                encoded.device_paths[target.device as usize],
                local[&replicas[0].device_uuid].path.display().to_string()
            );
            assert_eq!(target.offset, replicas[0].device_offset, "at {at}");
        }
    }

    #[test]
    fn mirrors_keep_both_replicas_and_missing_devices_are_named() {
        let (uuids, mut local) = devices(2);
        let extents = vec![Extent::replicated(
            0,
            8 * MIB,
            vec![
                Replica {
                    device_uuid: uuids[0],
                    device_offset: MIB,
                },
                Replica {
                    device_uuid: uuids[1],
                    device_offset: 2 * MIB,
                },
            ],
        )];
        let map = volume(extents, 8 * MIB, Layout::Mirror);
        let encoded = encode(&map, &local).expect("encodes");
        let view = wire::MapView::parse(&encoded.bytes).expect("valid");
        assert_eq!(view.map(0, 4096).expect("mapped").target_count, 2);
        local.remove(&uuids[1]);
        let err = encode(&map, &local).err().expect("missing device");
        assert!(err.to_string().contains(&uuids[1].to_string()), "{err}");
    }

    /// Every extent touching a syncing range is flagged whole; the others are not.
    #[test]
    fn extents_overlapping_syncing_ranges_are_flagged() {
        let (uuids, local) = devices(1);
        let replica = |device_offset: u64| {
            vec![Replica {
                device_uuid: uuids[0],
                device_offset,
            }]
        };
        let extents = (0..4)
            .map(|i| Extent::replicated(i * 4 * MIB, 4 * MIB, replica(i * 4 * MIB)))
            .collect();
        let mut map = volume(extents, 16 * MIB, Layout::Linear);
        let encoded = encode(&map, &local).expect("encodes");
        let view = wire::MapView::parse(&encoded.bytes).expect("valid");
        assert!((0..4).all(|i| view.extent(i).flags == 0));
        // One block at the end of extent 1, a range from inside extent 2 to the end of 3, and
        // an empty range in extent 0 (which flags nothing).
        map.syncing = vec![
            ByteRange {
                volume_offset: 8 * MIB - 4096,
                length: 4096,
            },
            ByteRange {
                volume_offset: 9 * MIB,
                length: 7 * MIB,
            },
            ByteRange {
                volume_offset: 0,
                length: 0,
            },
        ];
        let encoded = encode(&map, &local).expect("encodes");
        let view = wire::MapView::parse(&encoded.bytes).expect("valid");
        let flags: Vec<u16> = (0..4).map(|i| view.extent(i).flags).collect();
        assert_eq!(flags, [0, EXTENT_SYNCING, EXTENT_SYNCING, EXTENT_SYNCING]);
        assert!(!view.map(4 * MIB - 4096, 4096).expect("mapped").syncing());
        assert!(view.map(4 * MIB, 4096).expect("mapped").syncing());
    }

    /// A device not found while some candidates could not be read for lack of permission is
    /// reported as a permission problem, not as "not attached to this host".
    #[test]
    fn a_missing_device_among_unreadable_ones_names_the_permission() {
        let uuid = Uuid::from_u128(7);
        let unreadable = [PathBuf::from("/dev/vdb"), PathBuf::from("/dev/vdc")];
        let reason = missing_device_reason(uuid, &unreadable);
        assert!(
            reason.contains("permission denied (EACCES) reading the label of /dev/vdb, /dev/vdc"),
            "{reason}"
        );
        assert!(!reason.contains("not attached to this host"), "{reason}");
        let reason = missing_device_reason(uuid, &[]);
        assert!(reason.contains("is not attached to this host"), "{reason}");
        // Readable candidates (root here, or plain files) are not counted as unreadable.
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![0u8; 8192]).expect("image");
        assert!(unreadable_devices(dir.path(), &[image]).is_empty());
    }

    /// Run as `nobody` (this test binary again, under setpriv): a root-only image is reported
    /// as unreadable for lack of permission.
    #[test]
    fn devices_this_user_may_not_read_are_found() {
        const CHILD: &str = "SANCTL_TEST_UNREADABLE_DEVICE";
        if let Ok(device) = std::env::var(CHILD) {
            let device = PathBuf::from(device);
            assert_eq!(
                unreadable_devices(Path::new("/nonexistent"), std::slice::from_ref(&device)),
                vec![device]
            );
            return;
        }
        // SAFETY: geteuid has no preconditions and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to run the check as another user");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![0u8; 8192]).expect("image");
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o600))
            .expect("chmod image");
        let test_binary = std::env::current_exe().expect("current exe");
        let status = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(test_binary)
            .args([
                "--exact",
                "map_encoding::tests::devices_this_user_may_not_read_are_found",
                "--test-threads=1",
            ])
            .env(CHILD, &image)
            .status();
        match status {
            Ok(status) => assert!(status.success(), "the check as nobody failed"),
            Err(error) => eprintln!("skipped: setpriv: {error}"),
        }
    }

    #[test]
    fn the_only_snapshots_store_is_described_when_this_host_sees_its_devices() {
        let (uuids, mut local) = devices(3);
        let replica = |i: usize, device_offset: u64| Replica {
            device_uuid: uuids[i],
            device_offset,
        };
        let mut map = volume(
            vec![Extent::replicated(0, 8 * MIB, vec![replica(0, 0)])],
            8 * MIB,
            Layout::Linear,
        );
        let store = CowStoreLocation {
            snapshot_id: 5,
            store_bytes: 6 * MIB,
            scan_from_sector: 2,
            chunk_bytes: 65536,
            extents: vec![
                Extent::replicated(0, 4 * MIB, vec![replica(2, MIB)]),
                Extent::replicated(4 * MIB, 2 * MIB, vec![replica(0, 8 * MIB)]),
            ],
        };
        map.copy_on_write = Some(sanblk_proto::map::CopyOnWrite {
            generation: 5,
            chunk_bytes: 65536,
            stores: vec![store.clone()],
        });
        let encoded = encode(&map, &local).expect("encodes");
        let view = wire::MapView::parse(&encoded.bytes).expect("valid");
        assert_eq!(view.cow_store_count(), 1);
        let section = view.cow_store(0).expect("store section");
        assert_eq!((section.snapshot_id, section.store_bytes), (5, 6 * MIB));
        assert_eq!(section.scan_from_sector, 2);
        assert_eq!(section.extent_count, 2);
        let first = view.store_extent(0, 0);
        assert_eq!(
            encoded.device_paths[first.device as usize],
            local[&uuids[2]].path.display().to_string()
        );
        assert_eq!((first.offset, first.length), (MIB, 4 * MIB));
        assert_eq!(view.store_extent(0, 1).device, 0);
        // A store device this host does not see leaves the section out, not the map.
        local.remove(&uuids[2]);
        let encoded = encode(&map, &local).expect("encodes");
        let view = wire::MapView::parse(&encoded.bytes).expect("valid");
        assert_eq!(view.cow_store_count(), 0);
        assert_eq!(view.cow_store(0), None);
        assert_eq!(view.header().cow_generation, 5);
        assert_eq!(encoded.device_paths.len(), 1);
    }

    #[test]
    fn every_snapshots_store_is_described_or_none() {
        let (uuids, mut local) = devices(4);
        let replica = |i: usize, device_offset: u64| Replica {
            device_uuid: uuids[i],
            device_offset,
        };
        let base = volume(
            vec![Extent::replicated(0, 8 * MIB, vec![replica(0, 0)])],
            8 * MIB,
            Layout::Linear,
        );
        let newest = CowStoreLocation {
            snapshot_id: 9,
            store_bytes: 4 * MIB,
            scan_from_sector: 1,
            chunk_bytes: 65536,
            extents: vec![Extent::replicated(0, 4 * MIB, vec![replica(2, MIB)])],
        };
        let older = CowStoreLocation {
            snapshot_id: 4,
            store_bytes: 3 * MIB,
            scan_from_sector: 7,
            chunk_bytes: 256 << 10,
            extents: vec![
                Extent::replicated(0, 2 * MIB, vec![replica(3, 0)]),
                Extent::replicated(2 * MIB, MIB, vec![replica(2, 8 * MIB)]),
            ],
        };
        let with_stores = |stores: Vec<CowStoreLocation>| {
            let mut map = base.clone();
            map.copy_on_write = Some(sanblk_proto::map::CopyOnWrite {
                generation: 9,
                chunk_bytes: 65536,
                stores,
            });
            map
        };
        let map = with_stores(vec![newest.clone(), older.clone()]);
        let encoded = encode(&map, &local).expect("encodes");
        let view = wire::MapView::parse(&encoded.bytes).expect("valid");
        assert_eq!(view.cow_store_count(), 2);
        let sections: Vec<(u64, u64, u32, u32, u32)> = (0..2)
            .filter_map(|i| view.cow_store(i))
            .map(|s| {
                (
                    s.snapshot_id,
                    s.store_bytes,
                    s.scan_from_sector,
                    s.extent_count,
                    s.chunk_bytes,
                )
            })
            .collect();
        assert_eq!(
            sections,
            [(9, 4 * MIB, 1, 1, 65536), (4, 3 * MIB, 7, 2, 256 << 10)]
        );
        // Store devices shared between stores get one device table entry.
        assert_eq!(encoded.device_paths.len(), 3);
        let path_of = |extent: StoreExtent| encoded.device_paths[extent.device as usize].clone();
        let path = |i: usize| local[&uuids[i]].path.display().to_string();
        assert_eq!(path_of(view.store_extent(0, 0)), path(2));
        assert_eq!(path_of(view.store_extent(1, 0)), path(3));
        assert_eq!(path_of(view.store_extent(1, 1)), path(2));
        assert_eq!(
            (
                view.store_extent(1, 1).offset,
                view.store_extent(1, 1).length
            ),
            (8 * MIB, MIB)
        );
        // One store the kernel map cannot take leaves every store out: a device this host
        // does not see, a mirrored store extent, too many extents, too many stores, a chunk
        // smaller than the map's or no power of two.
        let mut mirrored = older.clone();
        mirrored.extents[1].replicas.push(replica(1, 0));
        let mut fragmented = older.clone();
        fragmented.extents = (0..=u64::from(wire::MAX_STORE_EXTENTS))
            .map(|i| Extent::replicated(i * (64 << 10), 64 << 10, vec![replica(3, i * MIB)]))
            .collect();
        fragmented.store_bytes = fragmented.extents.len() as u64 * (64 << 10);
        let many = (0..=MAX_COW_STORES as u64)
            .map(|i| CowStoreLocation {
                snapshot_id: 9 - i,
                store_bytes: MIB,
                scan_from_sector: 0,
                chunk_bytes: 65536,
                extents: vec![Extent::replicated(0, MIB, vec![replica(3, i * MIB)])],
            })
            .collect();
        let small_chunk = CowStoreLocation {
            chunk_bytes: 32768,
            ..older.clone()
        };
        let odd_chunk = CowStoreLocation {
            chunk_bytes: 65536 * 3,
            ..older.clone()
        };
        for (what, stores) in [
            ("small chunk", vec![newest.clone(), small_chunk]),
            ("odd chunk", vec![newest.clone(), odd_chunk]),
            ("mirrored", vec![newest.clone(), mirrored]),
            ("fragmented", vec![newest.clone(), fragmented]),
            ("too many", many),
        ] {
            let encoded = encode(&with_stores(stores), &local).expect("encodes");
            let view = wire::MapView::parse(&encoded.bytes).expect("valid");
            assert_eq!(view.cow_store_count(), 0, "{what}");
            assert_eq!(encoded.device_paths.len(), 1, "{what}");
        }
        local.remove(&uuids[3]);
        let encoded = encode(&map, &local).expect("encodes");
        let view = wire::MapView::parse(&encoded.bytes).expect("valid");
        assert_eq!(view.cow_store_count(), 0);
        assert_eq!(view.header().cow_generation, 9);
        assert_eq!(encoded.device_paths.len(), 1);
    }
}
