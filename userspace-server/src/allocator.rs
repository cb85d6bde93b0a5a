//! Space allocation on the pool's devices. Pure: the free space is derived from the extents of
//! all volumes (the only record of what is used), so there is no separate free list that could
//! drift from the volumes after a crash.

use std::collections::BTreeMap;
use uuid::Uuid;

use crate::map::{Extent, Layout, Replica, BLOCK_SIZE, MIRROR_COPIES};

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
        DeviceSpace { uuid, data_start, data_end: data_start + usable }
    }

    pub fn capacity(&self) -> u64 {
        self.data_end - self.data_start
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("not enough space: {requested} bytes requested for layout {layout}, at most {available} bytes can be allocated")]
    NoSpace { requested: u64, available: u64, layout: String },
    #[error("layout {layout} needs {needed} devices with free space, the pool has {available}")]
    NotEnoughDevices { layout: String, needed: usize, available: usize },
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
        self.ranges.iter().map(|(s, l)| (*s, *l)).max_by_key(|(s, l)| (*l, std::cmp::Reverse(*s)))
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
            let Some((start, range_length)) = self.ranges.iter().next().map(|(s, l)| (*s, *l)) else {
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
        let mut used: BTreeMap<Uuid, Vec<(u64, u64)>> = devices.iter().map(|d| (d.uuid, Vec::new())).collect();
        for extents in volumes {
            for extent in extents {
                for replica in &extent.replicas {
                    let ranges = used.get_mut(&replica.device_uuid).ok_or_else(|| {
                        AllocError::Corrupt(format!("extent on unknown device {}", replica.device_uuid))
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
            free_devices.push(DeviceFree { uuid: device.uuid, ranges: free, total });
        }
        Ok(PoolSpace { devices: free_devices })
    }

    pub fn free_bytes(&self, uuid: Uuid) -> u64 {
        self.devices.iter().find(|d| d.uuid == uuid).map_or(0, |d| d.total)
    }

    pub fn total_free(&self) -> u64 {
        self.devices.iter().map(|d| d.total).sum()
    }

    /// Device indices by decreasing free space (ties by UUID, so results are deterministic).
    fn by_free_space(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.devices.len()).filter(|i| self.devices[*i].total > 0).collect();
        order.sort_by_key(|i| (std::cmp::Reverse(self.devices[*i].total), self.devices[*i].uuid));
        order
    }

    /// Allocates `length` bytes of volume space starting at `volume_offset` in `layout`.
    /// On error nothing is allocated (the pool space is left unchanged).
    pub fn allocate(&mut self, layout: Layout, volume_offset: u64, length: u64) -> Result<Vec<Extent>, AllocError> {
        if length == 0 || length % BLOCK_SIZE != 0 || volume_offset % BLOCK_SIZE != 0 {
            return Err(AllocError::BadSize(format!(
                "sizes must be non-zero multiples of the {BLOCK_SIZE}-byte block size"
            )));
        }
        let snapshot = self.devices.clone();
        let result = match layout {
            Layout::Linear => self.allocate_linear(volume_offset, length),
            Layout::Mirror => self.allocate_mirror(volume_offset, length),
            Layout::Striped { stripe_count, stripe_unit_bytes } => {
                self.allocate_striped(volume_offset, length, stripe_count as usize, stripe_unit_bytes, layout)
            }
        };
        if result.is_err() {
            self.devices = snapshot;
        }
        result
    }

    fn allocate_linear(&mut self, volume_offset: u64, length: u64) -> Result<Vec<Extent>, AllocError> {
        let available = self.total_free();
        if length > available {
            return Err(AllocError::NoSpace { requested: length, available, layout: Layout::Linear.to_string() });
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
                    replicas: vec![Replica { device_uuid: device.uuid, device_offset }],
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

    fn allocate_mirror(&mut self, volume_offset: u64, length: u64) -> Result<Vec<Extent>, AllocError> {
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
            return Err(AllocError::NoSpace { requested: length, available, layout: Layout::Mirror.to_string() });
        }
        let mut extents = Vec::new();
        let mut cursor = volume_offset;
        let mut remaining = length;
        while remaining > 0 {
            let order = self.by_free_space();
            let (Some(&first), Some(&second)) = (order.first(), order.get(1)) else {
                return Err(AllocError::Corrupt("mirror allocation ran out of devices".into()));
            };
            let third_free = order.get(2).map_or(0, |i| self.devices[*i].total);
            let (first_start, first_len) = self.devices[first].largest_range().unwrap_or((0, 0));
            let (second_start, second_len) = self.devices[second].largest_range().unwrap_or((0, 0));
            // Taking more than this from the top two devices would leave the rest
            // concentrated on the third one, which cannot mirror with itself.
            let balance_limit = self.total_free().saturating_sub(third_free).saturating_sub(remaining);
            let chunk = remaining.min(first_len).min(second_len).min(balance_limit.max(BLOCK_SIZE));
            if chunk == 0 {
                return Err(AllocError::Corrupt("mirror allocation made no progress".into()));
            }
            self.devices[first].carve(first_start, chunk);
            self.devices[second].carve(second_start, chunk);
            extents.push(Extent {
                volume_offset: cursor,
                length: chunk,
                replicas: vec![
                    Replica { device_uuid: self.devices[first].uuid, device_offset: first_start },
                    Replica { device_uuid: self.devices[second].uuid, device_offset: second_start },
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
        if stripe_unit == 0 || stripe_unit % BLOCK_SIZE != 0 || stripe_count < 2 {
            return Err(AllocError::BadSize("stripe unit must be a multiple of the block size".into()));
        }
        let order = self.by_free_space();
        if order.len() < stripe_count {
            return Err(AllocError::NotEnoughDevices { layout: layout.to_string(), needed: stripe_count, available: order.len() });
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
                let smallest = members.iter().map(|i| self.devices[*i].total).min().unwrap_or(0);
                let available = smallest / stripe_unit * stripe_unit * stripe_count as u64;
                return Err(AllocError::NoSpace { requested: length, available, layout: layout.to_string() });
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
                    return Err(AllocError::Corrupt("stripe member ran out of carved space".into()));
                };
                let used = piece_length.min(chunk_remaining);
                if piece_length > used {
                    pieces[slot].push_front((start + used, piece_length - used));
                }
                extents.push(Extent {
                    volume_offset: chunk_offset,
                    length: used,
                    replicas: vec![Replica { device_uuid, device_offset: start }],
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
                && previous.replicas.iter().zip(&extent.replicas).all(|(a, b)| {
                    a.device_uuid == b.device_uuid && a.device_offset + previous.length == b.device_offset
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
