//! What the store's unit tests share: a fresh store, device records, block lookup.

use std::path::PathBuf;

use uuid::Uuid;

use sanblk_proto::map::{Extent, Replica};

use super::{DeviceRecord, Store};

pub(super) const MIB: u64 = 1 << 20;

pub(super) fn test_store(name: &str) -> (PathBuf, Store) {
    let dir = std::env::temp_dir().join(format!("sand-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let store = Store::open(&dir, &dir.join("secrets.redb")).unwrap_or_else(|e| panic!("{e}"));
    (dir, store)
}

pub(super) fn device(n: u128, size: u64) -> DeviceRecord {
    DeviceRecord {
        uuid: Uuid::from_u128(n),
        path: format!("/dev/test-{n}"),
        size_bytes: size,
        data_start: MIB,
        state: "online".into(),
    }
}

/// Where volume byte `at` lives (first replica).
pub(super) fn place(extents: &[Extent], at: u64) -> Option<Replica> {
    let extent = extents
        .iter()
        .find(|e| e.volume_offset <= at && at < e.volume_offset + e.length)?;
    extent
        .locate(at - extent.volume_offset)
        .and_then(|(replicas, _)| replicas.first().copied())
}
