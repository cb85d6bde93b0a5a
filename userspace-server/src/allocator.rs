//! Space allocation on the pool's devices. Pure: the free space is derived from the extents of
//! all volumes (the only record of what is used), so there is no separate free list that could
//! drift from the volumes after a crash.

use std::collections::BTreeMap;
use uuid::Uuid;

use sanblk_proto::map::{Extent, Layout, Replica, BLOCK_SIZE, MIRROR_COPIES};

/// The allocatable region of one device: `[data_start, data_end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSpace {
    pub uuid: Uuid,
    pub data_start: u64,
    pub data_end: u64,
}

impl DeviceSpace {
    /// Region of a device of `size` bytes whose data starts at `data_start`, trimmed to blocks.
    pub fn for_device(uuid: Uuid, data_start: u64, size: u64) -> DeviceSpace {
        let usable = size.saturating_sub(data_start) / BLOCK_SIZE * BLOCK_SIZE;
        DeviceSpace {
            uuid,
            data_start,
            data_end: data_start + usable,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.data_end - self.data_start
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("not enough space: {requested} bytes requested for layout {layout}, at most {available} bytes can be allocated")]
    NoSpace {
        requested: u64,
        available: u64,
        layout: String,
    },
    #[error("layout {layout} needs {needed} devices with free space, the pool has {available}")]
    NotEnoughDevices {
        layout: String,
        needed: usize,
        available: usize,
    },
    #[error("invalid size: {0}")]
    BadSize(String),
    #[error("inconsistent metadata: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone)]
struct DeviceFree {
    uuid: Uuid,
    /// Free ranges, start -> length, non-adjacent and non-overlapping.
    ranges: BTreeMap<u64, u64>,
    total: u64,
}

impl DeviceFree {
    fn largest_range(&self) -> Option<(u64, u64)> {
        self.ranges
            .iter()
            .map(|(s, l)| (*s, *l))
            .max_by_key(|(s, l)| (*l, std::cmp::Reverse(*s)))
    }

    /// Removes `length` bytes from the start of the range at `start`.
    fn carve(&mut self, start: u64, length: u64) {
        if let Some(range_length) = self.ranges.remove(&start) {
            if range_length > length {
                self.ranges.insert(start + length, range_length - length);
            }
            self.total -= length.min(range_length);
        }
    }

    /// Takes `length` bytes first-fit from the lowest addresses; may return several pieces.
    fn take(&mut self, mut length: u64) -> Vec<(u64, u64)> {
        let mut pieces = Vec::new();
        while length > 0 {
            let Some((start, range_length)) = self.ranges.iter().next().map(|(s, l)| (*s, *l))
            else {
                break;
            };
            let piece = range_length.min(length);
            self.carve(start, piece);
            pieces.push((start, piece));
            length -= piece;
        }
        pieces
    }
}

/// Free space of the whole pool.
#[derive(Debug, Clone)]
pub struct PoolSpace {
    devices: Vec<DeviceFree>,
}

impl PoolSpace {
    /// Builds the free space from the devices and every volume's extents. Fails if an extent
    /// lies outside its device or two extents overlap (that would be a metadata bug).
    pub fn new<'a>(
        devices: &[DeviceSpace],
        volumes: impl IntoIterator<Item = &'a [Extent]>,
    ) -> Result<PoolSpace, AllocError> {
        let mut used: BTreeMap<Uuid, Vec<(u64, u64)>> =
            devices.iter().map(|d| (d.uuid, Vec::new())).collect();
        for extents in volumes {
            for extent in extents {
                for replica in &extent.replicas {
                    let ranges = used.get_mut(&replica.device_uuid).ok_or_else(|| {
                        AllocError::Corrupt(format!(
                            "extent on unknown device {}",
                            replica.device_uuid
                        ))
                    })?;
                    ranges.push((replica.device_offset, extent.length));
                }
            }
        }
        let mut free_devices = Vec::with_capacity(devices.len());
        for device in devices {
            let mut ranges = used.remove(&device.uuid).unwrap_or_default();
            ranges.sort_unstable();
            let mut free = BTreeMap::new();
            let mut cursor = device.data_start;
            for (start, length) in ranges {
                if start < cursor || start + length > device.data_end {
                    return Err(AllocError::Corrupt(format!(
                        "extent [{start}, {}) on device {} overlaps another or lies outside [{}, {})",
                        start + length,
                        device.uuid,
                        device.data_start,
                        device.data_end
                    )));
                }
                if start > cursor {
                    free.insert(cursor, start - cursor);
                }
                cursor = start + length;
            }
            if device.data_end > cursor {
                free.insert(cursor, device.data_end - cursor);
            }
            let total = free.values().sum();
            free_devices.push(DeviceFree {
                uuid: device.uuid,
                ranges: free,
                total,
            });
        }
        Ok(PoolSpace {
            devices: free_devices,
        })
    }

    pub fn free_bytes(&self, uuid: Uuid) -> u64 {
        self.devices
            .iter()
            .find(|d| d.uuid == uuid)
            .map_or(0, |d| d.total)
    }

    pub fn total_free(&self) -> u64 {
        self.devices.iter().map(|d| d.total).sum()
    }

    /// Device indices by decreasing free space (ties by UUID, so results are deterministic).
    fn by_free_space(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.devices.len())
            .filter(|i| self.devices[*i].total > 0)
            .collect();
        order.sort_by_key(|i| {
            (
                std::cmp::Reverse(self.devices[*i].total),
                self.devices[*i].uuid,
            )
        });
        order
    }

    /// Allocates `length` bytes of volume space starting at `volume_offset` in `layout`.
    /// On error nothing is allocated (the pool space is left unchanged).
    pub fn allocate(
        &mut self,
        layout: Layout,
        volume_offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, AllocError> {
        if length == 0
            || !length.is_multiple_of(BLOCK_SIZE)
            || !volume_offset.is_multiple_of(BLOCK_SIZE)
        {
            return Err(AllocError::BadSize(format!(
                "sizes must be non-zero multiples of the {BLOCK_SIZE}-byte block size"
            )));
        }
        let snapshot = self.devices.clone();
        let result = match layout {
            Layout::Linear => self.allocate_linear(volume_offset, length),
            Layout::Mirror => self.allocate_mirror(volume_offset, length),
            Layout::Striped {
                stripe_count,
                stripe_unit_bytes,
            } => self.allocate_striped(
                volume_offset,
                length,
                stripe_count as usize,
                stripe_unit_bytes,
                layout,
            ),
        };
        if result.is_err() {
            self.devices = snapshot;
        }
        result
    }

    /// Allocates `length` bytes for a replacement replica on devices not in `excluded` (the
    /// failed device and the devices of the extent's other replicas, so mirror copies stay on
    /// distinct devices). Largest free device first; may return several (device, offset,
    /// length) pieces. On error nothing is allocated.
    pub fn allocate_replacement(
        &mut self,
        length: u64,
        excluded: &[Uuid],
    ) -> Result<Vec<(Uuid, u64, u64)>, AllocError> {
        if length == 0 || !length.is_multiple_of(BLOCK_SIZE) {
            return Err(AllocError::BadSize(format!(
                "sizes must be non-zero multiples of the {BLOCK_SIZE}-byte block size"
            )));
        }
        let candidates: Vec<usize> = self
            .by_free_space()
            .into_iter()
            .filter(|i| !excluded.contains(&self.devices[*i].uuid))
            .collect();
        let available: u64 = candidates.iter().map(|i| self.devices[*i].total).sum();
        if candidates.is_empty() {
            return Err(AllocError::NotEnoughDevices {
                layout: "replacement".into(),
                needed: 1,
                available: 0,
            });
        }
        if length > available {
            return Err(AllocError::NoSpace {
                requested: length,
                available,
                layout: "replacement".into(),
            });
        }
        let mut pieces = Vec::new();
        let mut remaining = length;
        for index in candidates {
            if remaining == 0 {
                break;
            }
            let device = &mut self.devices[index];
            let wanted = remaining.min(device.total);
            for (device_offset, piece) in device.take(wanted) {
                pieces.push((device.uuid, device_offset, piece));
                remaining -= piece;
            }
        }
        Ok(pieces)
    }

    fn allocate_linear(
        &mut self,
        volume_offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, AllocError> {
        let available = self.total_free();
        if length > available {
            return Err(AllocError::NoSpace {
                requested: length,
                available,
                layout: Layout::Linear.to_string(),
            });
        }
        let mut extents = Vec::new();
        let mut cursor = volume_offset;
        let mut remaining = length;
        for index in self.by_free_space() {
            if remaining == 0 {
                break;
            }
            let device = &mut self.devices[index];
            let wanted = remaining.min(device.total);
            for (device_offset, piece) in device.take(wanted) {
                extents.push(Extent {
                    volume_offset: cursor,
                    length: piece,
                    replicas: vec![Replica {
                        device_uuid: device.uuid,
                        device_offset,
                    }],
                });
                cursor += piece;
                remaining -= piece;
            }
        }
        Ok(extents)
    }

    /// Largest size a 2-way mirror can still get: every byte needs two devices.
    fn mirror_capacity(&self) -> u64 {
        let total = self.total_free();
        let largest = self.devices.iter().map(|d| d.total).max().unwrap_or(0);
        (total / 2).min(total - largest) / BLOCK_SIZE * BLOCK_SIZE
    }

    fn allocate_mirror(
        &mut self,
        volume_offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, AllocError> {
        let with_space = self.by_free_space().len();
        if with_space < MIRROR_COPIES {
            return Err(AllocError::NotEnoughDevices {
                layout: Layout::Mirror.to_string(),
                needed: MIRROR_COPIES,
                available: with_space,
            });
        }
        let available = self.mirror_capacity();
        if length > available {
            return Err(AllocError::NoSpace {
                requested: length,
                available,
                layout: Layout::Mirror.to_string(),
            });
        }
        let mut extents = Vec::new();
        let mut cursor = volume_offset;
        let mut remaining = length;
        while remaining > 0 {
            let order = self.by_free_space();
            let (Some(&first), Some(&second)) = (order.first(), order.get(1)) else {
                return Err(AllocError::Corrupt(
                    "mirror allocation ran out of devices".into(),
                ));
            };
            let third_free = order.get(2).map_or(0, |i| self.devices[*i].total);
            let (first_start, first_len) = self.devices[first].largest_range().unwrap_or((0, 0));
            let (second_start, second_len) = self.devices[second].largest_range().unwrap_or((0, 0));
            // Taking more than this from the top two devices would leave the rest
            // concentrated on the third one, which cannot mirror with itself.
            let balance_limit = self
                .total_free()
                .saturating_sub(third_free)
                .saturating_sub(remaining);
            let chunk = remaining
                .min(first_len)
                .min(second_len)
                .min(balance_limit.max(BLOCK_SIZE));
            if chunk == 0 {
                return Err(AllocError::Corrupt(
                    "mirror allocation made no progress".into(),
                ));
            }
            self.devices[first].carve(first_start, chunk);
            self.devices[second].carve(second_start, chunk);
            extents.push(Extent {
                volume_offset: cursor,
                length: chunk,
                replicas: vec![
                    Replica {
                        device_uuid: self.devices[first].uuid,
                        device_offset: first_start,
                    },
                    Replica {
                        device_uuid: self.devices[second].uuid,
                        device_offset: second_start,
                    },
                ],
            });
            cursor += chunk;
            remaining -= chunk;
        }
        Ok(extents)
    }

    fn allocate_striped(
        &mut self,
        volume_offset: u64,
        length: u64,
        stripe_count: usize,
        stripe_unit: u64,
        layout: Layout,
    ) -> Result<Vec<Extent>, AllocError> {
        if stripe_unit == 0 || !stripe_unit.is_multiple_of(BLOCK_SIZE) || stripe_count < 2 {
            return Err(AllocError::BadSize(
                "stripe unit must be a multiple of the block size".into(),
            ));
        }
        let order = self.by_free_space();
        if order.len() < stripe_count {
            return Err(AllocError::NotEnoughDevices {
                layout: layout.to_string(),
                needed: stripe_count,
                available: order.len(),
            });
        }
        let members = &order[..stripe_count];
        // Chunk k of this segment goes to member k % stripe_count.
        let chunk_count = length.div_ceil(stripe_unit);
        let chunk_length = |k: u64| stripe_unit.min(length - k * stripe_unit);
        let mut needed = vec![0u64; stripe_count];
        for k in 0..chunk_count {
            needed[(k % stripe_count as u64) as usize] += chunk_length(k);
        }
        // Each member must hold its share; the smallest member bounds the whole stripe.
        for (slot, &index) in members.iter().enumerate() {
            if needed[slot] > self.devices[index].total {
                let smallest = members
                    .iter()
                    .map(|i| self.devices[*i].total)
                    .min()
                    .unwrap_or(0);
                let available = smallest / stripe_unit * stripe_unit * stripe_count as u64;
                return Err(AllocError::NoSpace {
                    requested: length,
                    available,
                    layout: layout.to_string(),
                });
            }
        }
        let mut pieces: Vec<std::collections::VecDeque<(u64, u64)>> = members
            .iter()
            .enumerate()
            .map(|(slot, &index)| self.devices[index].take(needed[slot]).into())
            .collect();
        let mut extents = Vec::new();
        for k in 0..chunk_count {
            let slot = (k % stripe_count as u64) as usize;
            let device_uuid = self.devices[members[slot]].uuid;
            let mut chunk_offset = volume_offset + k * stripe_unit;
            let mut chunk_remaining = chunk_length(k);
            while chunk_remaining > 0 {
                let Some((start, piece_length)) = pieces[slot].pop_front() else {
                    return Err(AllocError::Corrupt(
                        "stripe member ran out of carved space".into(),
                    ));
                };
                let used = piece_length.min(chunk_remaining);
                if piece_length > used {
                    pieces[slot].push_front((start + used, piece_length - used));
                }
                extents.push(Extent {
                    volume_offset: chunk_offset,
                    length: used,
                    replicas: vec![Replica {
                        device_uuid,
                        device_offset: start,
                    }],
                });
                chunk_offset += used;
                chunk_remaining -= used;
            }
        }
        Ok(extents)
    }
}

/// Merges neighbouring extents that continue each other on the same devices (keeps maps of
/// repeatedly grown linear volumes short).
pub fn merge_adjacent(extents: Vec<Extent>) -> Vec<Extent> {
    let mut merged: Vec<Extent> = Vec::with_capacity(extents.len());
    for extent in extents {
        if let Some(previous) = merged.last_mut() {
            let continues = previous.volume_offset + previous.length == extent.volume_offset
                && previous.replicas.len() == extent.replicas.len()
                && previous
                    .replicas
                    .iter()
                    .zip(&extent.replicas)
                    .all(|(a, b)| {
                        a.device_uuid == b.device_uuid
                            && a.device_offset + previous.length == b.device_offset
                    });
            if continues {
                previous.length += extent.length;
                continue;
            }
        }
        merged.push(extent);
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sanblk_proto::map::DEFAULT_STRIPE_UNIT_BYTES;

    const MIB: u64 = 1 << 20;

    #[test]
    fn replacements_avoid_excluded_devices() {
        let devices = devices_from(&[256, 256, 64]);
        let mut pool =
            PoolSpace::new(&devices, std::iter::empty()).unwrap_or_else(|e| panic!("{e}"));
        let excluded = [devices[0].uuid, devices[1].uuid];
        let pieces = pool
            .allocate_replacement(32 * BLOCK_SIZE, &excluded)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pieces, vec![(devices[2].uuid, MIB, 32 * BLOCK_SIZE)]);
        assert_eq!(pool.free_bytes(devices[2].uuid), 32 * BLOCK_SIZE);
        let too_big = pool.allocate_replacement(64 * BLOCK_SIZE, &excluded);
        assert!(matches!(too_big, Err(AllocError::NoSpace { .. })));
        assert_eq!(pool.free_bytes(devices[2].uuid), 32 * BLOCK_SIZE);
        let all = [devices[0].uuid, devices[1].uuid, devices[2].uuid];
        assert!(matches!(
            pool.allocate_replacement(BLOCK_SIZE, &all),
            Err(AllocError::NotEnoughDevices { .. })
        ));
    }

    fn devices_from(blocks: &[u64]) -> Vec<DeviceSpace> {
        blocks
            .iter()
            .enumerate()
            .map(|(i, b)| DeviceSpace {
                uuid: Uuid::from_u128(i as u128 + 1),
                data_start: MIB,
                data_end: MIB + b * BLOCK_SIZE,
            })
            .collect()
    }

    fn layout_from(choice: u8) -> Layout {
        match choice % 4 {
            0 => Layout::Linear,
            1 => Layout::Mirror,
            2 => Layout::Striped {
                stripe_count: 2,
                stripe_unit_bytes: DEFAULT_STRIPE_UNIT_BYTES,
            },
            _ => Layout::Striped {
                stripe_count: 3,
                stripe_unit_bytes: 64 * 1024,
            },
        }
    }

    /// Checks the shape of freshly allocated extents for `[offset, offset + length)`.
    fn check_allocation(
        layout: Layout,
        offset: u64,
        length: u64,
        extents: &[Extent],
    ) -> Result<(), TestCaseError> {
        let mut cursor = offset;
        for extent in extents {
            prop_assert_eq!(extent.volume_offset, cursor, "extents must be contiguous");
            prop_assert!(extent.length > 0 && extent.length % BLOCK_SIZE == 0);
            for replica in &extent.replicas {
                prop_assert_eq!(replica.device_offset % BLOCK_SIZE, 0);
            }
            cursor += extent.length;
            match layout {
                Layout::Linear => prop_assert_eq!(extent.replicas.len(), 1),
                Layout::Mirror => {
                    prop_assert_eq!(extent.replicas.len(), 2);
                    prop_assert_ne!(
                        extent.replicas[0].device_uuid,
                        extent.replicas[1].device_uuid
                    );
                }
                Layout::Striped {
                    stripe_count,
                    stripe_unit_bytes,
                } => {
                    prop_assert_eq!(extent.replicas.len(), 1);
                    let chunk = (extent.volume_offset - offset) / stripe_unit_bytes;
                    let chunk_end =
                        (extent.volume_offset + extent.length - 1 - offset) / stripe_unit_bytes;
                    prop_assert_eq!(chunk, chunk_end, "an extent never crosses a stripe unit");
                    let _ = stripe_count;
                }
            }
        }
        prop_assert_eq!(cursor - offset, length, "allocated size must be exact");
        if let Layout::Striped {
            stripe_count,
            stripe_unit_bytes,
        } = layout
        {
            // Chunk k lives on the device of chunk k mod N, and the N devices are distinct.
            let mut device_of_slot: Vec<Option<Uuid>> = vec![None; stripe_count as usize];
            for extent in extents {
                let chunk = (extent.volume_offset - offset) / stripe_unit_bytes;
                let slot = (chunk % u64::from(stripe_count)) as usize;
                let device = extent.replicas[0].device_uuid;
                match device_of_slot[slot] {
                    None => device_of_slot[slot] = Some(device),
                    Some(expected) => prop_assert_eq!(expected, device),
                }
            }
            let used: Vec<Uuid> = device_of_slot.iter().flatten().copied().collect();
            let mut distinct = used.clone();
            distinct.sort();
            distinct.dedup();
            prop_assert_eq!(
                distinct.len(),
                used.len(),
                "stripe members must be distinct devices"
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn allocations_never_overlap_and_are_exact(
            device_blocks in prop::collection::vec(16u64..4096, 1..5),
            operations in prop::collection::vec((0u8..3, any::<u8>(), 1u64..1500, any::<prop::sample::Index>()), 1..40),
        ) {
            let devices = devices_from(&device_blocks);
            let capacity: u64 = devices.iter().map(DeviceSpace::capacity).sum();
            let mut volumes: Vec<(Layout, u64, Vec<Extent>)> = Vec::new();
            for (kind, layout_choice, blocks, pick) in operations {
                let mut pool = PoolSpace::new(&devices, volumes.iter().map(|v| v.2.as_slice()))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let used: u64 = volumes.iter().flat_map(|v| &v.2).map(|e| e.length * e.replicas.len() as u64).sum();
                prop_assert_eq!(pool.total_free() + used, capacity, "free + used must equal capacity");
                let length = blocks * BLOCK_SIZE;
                let free_before = pool.total_free();
                match kind {
                    0 => {
                        let layout = layout_from(layout_choice);
                        let mirror_capacity = pool.mirror_capacity();
                        match pool.allocate(layout, 0, length) {
                            Ok(extents) => {
                                check_allocation(layout, 0, length, &extents)?;
                                volumes.push((layout, length, extents));
                            }
                            Err(error) => {
                                prop_assert_eq!(pool.total_free(), free_before, "a failed allocation takes nothing");
                                match layout {
                                    Layout::Linear => prop_assert!(length > free_before, "linear refused with room: {}", error),
                                    Layout::Mirror => prop_assert!(length > mirror_capacity, "mirror refused with room: {}", error),
                                    Layout::Striped { .. } => {}
                                }
                            }
                        }
                    }
                    1 if !volumes.is_empty() => {
                        let index = pick.index(volumes.len());
                        let (layout, size, _) = volumes[index].clone();
                        if let Ok(added) = pool.allocate(layout, size, length) {
                            check_allocation(layout, size, length, &added)?;
                            let volume = &mut volumes[index];
                            volume.1 += length;
                            let mut extents = std::mem::take(&mut volume.2);
                            extents.extend(added);
                            volume.2 = merge_adjacent(extents);
                            let total: u64 = volume.2.iter().map(|e| e.length).sum();
                            prop_assert_eq!(total, volume.1);
                        } else {
                            prop_assert_eq!(pool.total_free(), free_before);
                        }
                    }
                    _ if !volumes.is_empty() => {
                        volumes.remove(pick.index(volumes.len()));
                    }
                    _ => {}
                }
            }
            // Final consistency: rebuilding the free space from all volumes finds no overlap.
            let pool = PoolSpace::new(&devices, volumes.iter().map(|v| v.2.as_slice()))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let used: u64 = volumes.iter().flat_map(|v| &v.2).map(|e| e.length * e.replicas.len() as u64).sum();
            prop_assert_eq!(pool.total_free() + used, capacity);
        }
    }

    #[test]
    fn overlapping_extents_are_detected() {
        let devices = devices_from(&[1024]);
        let extent = |offset| Extent {
            volume_offset: 0,
            length: 8 * BLOCK_SIZE,
            replicas: vec![Replica {
                device_uuid: devices[0].uuid,
                device_offset: offset,
            }],
        };
        let volumes = [vec![extent(MIB)], vec![extent(MIB + 4 * BLOCK_SIZE)]];
        assert!(matches!(
            PoolSpace::new(&devices, volumes.iter().map(Vec::as_slice)),
            Err(AllocError::Corrupt(_))
        ));
    }

    #[test]
    fn mirror_uses_three_devices_fully() {
        // 3 equal devices hold a mirror of 1.5 devices' worth only if the pairs rotate.
        let devices = devices_from(&[2560, 2560, 2560]);
        let mut pool =
            PoolSpace::new(&devices, std::iter::empty()).unwrap_or_else(|e| panic!("{e}"));
        let length = 3840 * BLOCK_SIZE;
        let extents = pool
            .allocate(Layout::Mirror, 0, length)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), length);
        assert_eq!(pool.total_free(), 0);
    }

    #[test]
    fn not_enough_space_is_reported() {
        let devices = devices_from(&[256]);
        let mut pool =
            PoolSpace::new(&devices, std::iter::empty()).unwrap_or_else(|e| panic!("{e}"));
        let error = pool.allocate(Layout::Linear, 0, 512 * BLOCK_SIZE).err();
        assert!(
            matches!(error, Some(AllocError::NoSpace { .. })),
            "{error:?}"
        );
        assert!(matches!(
            pool.allocate(Layout::Mirror, 0, BLOCK_SIZE),
            Err(AllocError::NotEnoughDevices { .. })
        ));
    }
}
