//! Space allocation on the pool's devices. Pure: the free space is derived from the extents of
//! all volumes (the only record of what is used), so there is no separate free list that could
//! drift from the volumes after a crash.

use std::collections::BTreeMap;
use uuid::Uuid;

use sanblk_proto::map::{
    Extent, ExtentKind, Layout, Replica, BLOCK_SIZE, MAX_STRIPES, MIRROR_COPIES,
};

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
    #[error("{requested} bytes for layout {layout} would need more than {limit} extents (free space too fragmented for one map)")]
    TooManyExtents {
        requested: u64,
        limit: usize,
        layout: String,
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

    /// Takes `length` bytes first-fit from the lowest addresses; may return several pieces,
    /// at most `max_pieces` (fewer bytes than asked for then).
    fn take(&mut self, length: u64, max_pieces: usize) -> Vec<(u64, u64)> {
        self.take_in_units(length, BLOCK_SIZE, max_pieces)
    }

    /// Bytes of free space usable in pieces that are multiples of `unit`.
    fn total_in_units(&self, unit: u64) -> u64 {
        self.ranges.values().map(|l| l / unit * unit).sum()
    }

    /// Like [`DeviceFree::take`], every piece a multiple of `unit` (`length` must be one):
    /// ranges shorter than `unit` are skipped. At most `max_pieces` pieces.
    fn take_in_units(&mut self, mut length: u64, unit: u64, max_pieces: usize) -> Vec<(u64, u64)> {
        let mut pieces = Vec::new();
        while length > 0 && pieces.len() < max_pieces {
            let Some((start, range_length)) = self
                .ranges
                .iter()
                .find(|(_, l)| **l >= unit)
                .map(|(s, l)| (*s, *l))
            else {
                break;
            };
            let piece = (range_length / unit * unit).min(length);
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
    /// Most extents one `allocate` may build (see [`PoolSpace::limit_extents`]).
    extent_limit: usize,
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
                    ranges.push((replica.device_offset, extent.member_span()));
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
            extent_limit: usize::MAX,
        })
    }

    /// Makes `allocate` refuse (`TooManyExtents`) as soon as it would build more than `limit`
    /// extents, so a request the map could never hold costs at most `limit` extents of memory
    /// however fragmented the free space is.
    pub fn limit_extents(&mut self, limit: usize) {
        self.extent_limit = limit;
    }

    /// Gives nothing more from device `uuid` (a failed device keeps what it holds until that
    /// is moved off, but receives no new allocation).
    pub fn withhold(&mut self, uuid: Uuid) {
        if let Some(device) = self.devices.iter_mut().find(|d| d.uuid == uuid) {
            device.ranges.clear();
            device.total = 0;
        }
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
    /// failed device and the devices of the extent's other replicas, so mirror copies and
    /// stripe members stay on distinct devices). Largest free device first; may return several
    /// (device, offset, length) pieces, each a multiple of `unit` (a striped extent's member
    /// is replaced in whole stripe units, so the extent splits at row boundaries). On error
    /// nothing is allocated.
    pub fn allocate_replacement(
        &mut self,
        length: u64,
        unit: u64,
        excluded: &[Uuid],
    ) -> Result<Vec<(Uuid, u64, u64)>, AllocError> {
        if length == 0
            || unit == 0
            || !unit.is_multiple_of(BLOCK_SIZE)
            || !length.is_multiple_of(unit)
        {
            return Err(AllocError::BadSize(format!(
                "sizes must be non-zero multiples of the {BLOCK_SIZE}-byte block size"
            )));
        }
        let candidates: Vec<usize> = self
            .by_free_space()
            .into_iter()
            .filter(|i| !excluded.contains(&self.devices[*i].uuid))
            .collect();
        let available: u64 = candidates
            .iter()
            .map(|i| self.devices[*i].total_in_units(unit))
            .sum();
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
            let wanted = remaining.min(device.total_in_units(unit));
            for (device_offset, piece) in device.take_in_units(wanted, unit, usize::MAX) {
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
        let limit = self.extent_limit;
        let mut extents = Vec::new();
        let mut cursor = volume_offset;
        let mut remaining = length;
        for index in self.by_free_space() {
            if remaining == 0 {
                break;
            }
            let device = &mut self.devices[index];
            let wanted = remaining.min(device.total);
            // One piece more than the limit allows proves the limit is exceeded.
            let pieces = device.take(wanted, (limit - extents.len()).saturating_add(1));
            let taken: u64 = pieces.iter().map(|(_, l)| l).sum();
            extents.extend(linear_extents(device.uuid, cursor, pieces));
            if extents.len() > limit {
                return Err(self.too_many_extents(length, Layout::Linear));
            }
            cursor += taken;
            remaining -= taken;
        }
        Ok(extents)
    }

    fn too_many_extents(&self, requested: u64, layout: Layout) -> AllocError {
        AllocError::TooManyExtents {
            requested,
            limit: self.extent_limit,
            layout: layout.to_string(),
        }
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
            extents.push(Extent::replicated(
                cursor,
                chunk,
                vec![
                    Replica {
                        device_uuid: self.devices[first].uuid,
                        device_offset: first_start,
                    },
                    Replica {
                        device_uuid: self.devices[second].uuid,
                        device_offset: second_start,
                    },
                ],
            ));
            if extents.len() > self.extent_limit {
                return Err(self.too_many_extents(length, Layout::Mirror));
            }
            cursor += chunk;
            remaining -= chunk;
        }
        Ok(extents)
    }

    /// Stripes `length` bytes over the `stripe_count` devices with the most free space.
    /// Whole rows (one `stripe_unit` on every member) become striped extents, as few as each
    /// member's free ranges allow (a member's share of one extent is contiguous); the rest,
    /// less than a row, becomes linear extents of at most one unit each, chunk `k` on member
    /// `k`, so chunk `k` of the segment is on member `k % stripe_count` throughout.
    fn allocate_striped(
        &mut self,
        volume_offset: u64,
        length: u64,
        stripe_count: usize,
        stripe_unit: u64,
        layout: Layout,
    ) -> Result<Vec<Extent>, AllocError> {
        if stripe_unit == 0
            || !stripe_unit.is_multiple_of(BLOCK_SIZE)
            || stripe_unit > u64::from(u32::MAX)
            || stripe_count < 2
            || stripe_count > MAX_STRIPES as usize
        {
            return Err(AllocError::BadSize(format!(
                "a striped layout needs 2 to {MAX_STRIPES} stripes and a stripe unit that is a \
                 multiple of the block size below 4 GiB"
            )));
        }
        let order = self.by_free_space();
        if order.len() < stripe_count {
            return Err(AllocError::NotEnoughDevices {
                layout: layout.to_string(),
                needed: stripe_count,
                available: order.len(),
            });
        }
        let members: Vec<usize> = order[..stripe_count].to_vec();
        let row = stripe_unit * stripe_count as u64;
        let no_space = |pool: &PoolSpace| {
            let smallest = members
                .iter()
                .map(|i| pool.devices[*i].total_in_units(stripe_unit))
                .min()
                .unwrap_or(0);
            AllocError::NoSpace {
                requested: length,
                available: smallest * stripe_count as u64,
                layout: layout.to_string(),
            }
        };
        // Refused from arithmetic before anything is built: every member must hold its share
        // of the whole rows in stripe units, and that plus its chunk of the tail in blocks.
        let rows_bytes = length / row * stripe_unit;
        let tail_bytes = length % row;
        for (k, &index) in members.iter().enumerate() {
            let device = &self.devices[index];
            let tail_chunk = tail_bytes
                .saturating_sub(k as u64 * stripe_unit)
                .min(stripe_unit);
            if rows_bytes > device.total_in_units(stripe_unit)
                || rows_bytes + tail_chunk > device.total
            {
                return Err(no_space(self));
            }
        }
        let mut extents = Vec::new();
        let mut cursor = volume_offset;
        let mut rows_left = length / row;
        while rows_left > 0 {
            // The lowest free range of at least one unit on every member; the shortest of
            // them bounds this extent. Each round uses up one range, so this ends.
            let mut starts = Vec::with_capacity(stripe_count);
            let mut rows = rows_left;
            for &index in &members {
                let Some((start, range_length)) = self.devices[index]
                    .ranges
                    .iter()
                    .find(|(_, l)| **l >= stripe_unit)
                    .map(|(s, l)| (*s, *l))
                else {
                    return Err(no_space(self));
                };
                rows = rows.min(range_length / stripe_unit);
                starts.push(start);
            }
            let span = rows * stripe_unit;
            let mut replicas = Vec::with_capacity(stripe_count);
            for (&index, &start) in members.iter().zip(&starts) {
                self.devices[index].carve(start, span);
                replicas.push(Replica {
                    device_uuid: self.devices[index].uuid,
                    device_offset: start,
                });
            }
            extents.push(Extent::striped(cursor, rows * row, stripe_unit, replicas));
            if extents.len() > self.extent_limit {
                return Err(self.too_many_extents(length, layout));
            }
            cursor += rows * row;
            rows_left -= rows;
        }
        let mut tail = length % row;
        for &index in &members {
            if tail == 0 {
                break;
            }
            let chunk = tail.min(stripe_unit);
            let device = &mut self.devices[index];
            let pieces = device.take(chunk, usize::MAX);
            if pieces.iter().map(|(_, l)| l).sum::<u64>() != chunk {
                return Err(no_space(self));
            }
            extents.extend(linear_extents(device.uuid, cursor, pieces));
            if extents.len() > self.extent_limit {
                return Err(self.too_many_extents(length, layout));
            }
            cursor += chunk;
            tail -= chunk;
        }
        Ok(extents)
    }
}

/// Single-replica extents from `volume_offset` on, one per (device offset, length) piece.
fn linear_extents(device_uuid: Uuid, volume_offset: u64, pieces: Vec<(u64, u64)>) -> Vec<Extent> {
    let mut cursor = volume_offset;
    pieces
        .into_iter()
        .map(|(device_offset, length)| {
            let extent = Extent::replicated(
                cursor,
                length,
                vec![Replica {
                    device_uuid,
                    device_offset,
                }],
            );
            cursor += length;
            extent
        })
        .collect()
}

/// Merges neighbouring extents of one kind that continue each other on the same devices
/// (keeps maps of repeatedly grown volumes short). Two striped extents with the same unit and
/// members continue each other when every member's share of the second follows its share of
/// the first: chunk `k` of the second is then chunk `k + rows * members` of the merged one.
pub fn merge_adjacent(extents: Vec<Extent>) -> Vec<Extent> {
    let mut merged: Vec<Extent> = Vec::with_capacity(extents.len());
    for extent in extents {
        if let Some(previous) = merged.last_mut() {
            let span = previous.member_span();
            let continues = previous.volume_offset + previous.length == extent.volume_offset
                && previous.kind == extent.kind
                && previous.replicas.len() == extent.replicas.len()
                && previous
                    .replicas
                    .iter()
                    .zip(&extent.replicas)
                    .all(|(a, b)| {
                        a.device_uuid == b.device_uuid && a.device_offset + span == b.device_offset
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

/// Rewrites a striped volume persisted before striped extents existed, when every extent is a
/// single-replica piece of one stripe unit, rotating over distinct devices: whole rows whose
/// members continue each other become striped extents, the rest stays as it was. The mapping
/// of every byte is unchanged (chunk `k` of the old layout lives where the striped extent
/// puts it). Returns `None` when there is nothing to rewrite.
pub fn restripe_legacy(layout: Layout, extents: &[Extent]) -> Option<Vec<Extent>> {
    let Layout::Striped {
        stripe_count,
        stripe_unit_bytes: unit,
    } = layout
    else {
        return None;
    };
    let width = stripe_count as usize;
    if extents.iter().any(|e| e.kind != ExtentKind::Replicated)
        || !(2..=MAX_STRIPES as usize).contains(&width)
    {
        return None;
    }
    // A row: `width` single-replica extents of one unit each, on distinct devices.
    let is_row = |row: &[Extent]| {
        row.len() == width
            && row.iter().enumerate().all(|(i, e)| {
                e.replicas.len() == 1
                    && e.length == unit
                    && row[..i]
                        .iter()
                        .all(|p| p.replicas[0].device_uuid != e.replicas[0].device_uuid)
            })
            && row
                .windows(2)
                .all(|w| w[0].volume_offset + unit == w[1].volume_offset)
    };
    let mut out: Vec<Extent> = Vec::new();
    let mut i = 0;
    while i < extents.len() {
        let row = &extents[i..(i + width).min(extents.len())];
        if is_row(row) {
            let members: Vec<Replica> = row.iter().map(|e| e.replicas[0]).collect();
            out.push(Extent::striped(
                row[0].volume_offset,
                unit * width as u64,
                unit,
                members,
            ));
            i += width;
        } else {
            out.push(extents[i].clone());
            i += 1;
        }
    }
    let out = merge_adjacent(out);
    (out.len() < extents.len()).then_some(out)
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
            .allocate_replacement(32 * BLOCK_SIZE, BLOCK_SIZE, &excluded)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pieces, vec![(devices[2].uuid, MIB, 32 * BLOCK_SIZE)]);
        assert_eq!(pool.free_bytes(devices[2].uuid), 32 * BLOCK_SIZE);
        let too_big = pool.allocate_replacement(64 * BLOCK_SIZE, BLOCK_SIZE, &excluded);
        assert!(matches!(too_big, Err(AllocError::NoSpace { .. })));
        assert_eq!(pool.free_bytes(devices[2].uuid), 32 * BLOCK_SIZE);
        let all = [devices[0].uuid, devices[1].uuid, devices[2].uuid];
        assert!(matches!(
            pool.allocate_replacement(BLOCK_SIZE, BLOCK_SIZE, &all),
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

    /// Where volume byte `at` lives according to `extents` (first replica).
    fn locate_in(extents: &[Extent], at: u64) -> Option<Replica> {
        let extent = extents
            .iter()
            .find(|e| e.volume_offset <= at && at < e.volume_offset + e.length)?;
        let (replicas, _) = extent.locate(at - extent.volume_offset)?;
        replicas.first().copied()
    }

    /// Checks the shape of freshly allocated extents for `[offset, offset + length)`.
    fn check_allocation(
        layout: Layout,
        offset: u64,
        length: u64,
        extents: &[Extent],
    ) -> Result<(), TestCaseError> {
        let mut cursor = offset;
        let mut tail_started = false;
        for extent in extents {
            prop_assert_eq!(extent.volume_offset, cursor, "extents must be contiguous");
            prop_assert!(extent.length > 0 && extent.length % BLOCK_SIZE == 0);
            for replica in &extent.replicas {
                prop_assert_eq!(replica.device_offset % BLOCK_SIZE, 0);
            }
            let mut devices: Vec<Uuid> = extent.replicas.iter().map(|r| r.device_uuid).collect();
            devices.sort();
            devices.dedup();
            prop_assert_eq!(
                devices.len(),
                extent.replicas.len(),
                "replicas share a device"
            );
            cursor += extent.length;
            match (layout, extent.kind) {
                (Layout::Linear, ExtentKind::Replicated) => {
                    prop_assert_eq!(extent.replicas.len(), 1)
                }
                (Layout::Mirror, ExtentKind::Replicated) => {
                    prop_assert_eq!(extent.replicas.len(), 2)
                }
                (
                    Layout::Striped {
                        stripe_count,
                        stripe_unit_bytes,
                    },
                    ExtentKind::Striped { stripe_unit },
                ) => {
                    prop_assert!(!tail_started, "whole rows come before the tail");
                    prop_assert_eq!(stripe_unit, stripe_unit_bytes);
                    prop_assert_eq!(extent.replicas.len(), stripe_count as usize);
                    prop_assert_eq!(extent.length % (stripe_unit * u64::from(stripe_count)), 0);
                }
                (
                    Layout::Striped {
                        stripe_count,
                        stripe_unit_bytes,
                    },
                    ExtentKind::Replicated,
                ) => {
                    // The tail: less than one row, no piece crossing a stripe unit.
                    tail_started = true;
                    prop_assert_eq!(extent.replicas.len(), 1);
                    prop_assert!(
                        offset + length - extent.volume_offset
                            < stripe_unit_bytes * u64::from(stripe_count)
                    );
                    let chunk = (extent.volume_offset - offset) / stripe_unit_bytes;
                    let chunk_end =
                        (extent.volume_offset + extent.length - 1 - offset) / stripe_unit_bytes;
                    prop_assert_eq!(chunk, chunk_end, "a tail extent never crosses a unit");
                }
                (layout, kind) => prop_assert!(false, "{:?} extent in a {} volume", kind, layout),
            }
        }
        prop_assert_eq!(cursor - offset, length, "allocated size must be exact");
        if let Layout::Striped {
            stripe_count,
            stripe_unit_bytes,
        } = layout
        {
            // Chunk k of the segment lives on the device of chunk k mod N (its first and last
            // block), consecutive chunks of one member continue each other inside a striped
            // extent, and the N devices are distinct.
            let mut device_of_slot: Vec<Option<Uuid>> = vec![None; stripe_count as usize];
            for chunk in 0..length.div_ceil(stripe_unit_bytes) {
                let start = offset + chunk * stripe_unit_bytes;
                let last = (start + stripe_unit_bytes).min(offset + length) - BLOCK_SIZE;
                let slot = (chunk % u64::from(stripe_count)) as usize;
                for at in [start, last] {
                    let replica = locate_in(extents, at)
                        .ok_or_else(|| TestCaseError::fail(format!("{at} is not mapped")))?;
                    match device_of_slot[slot] {
                        None => device_of_slot[slot] = Some(replica.device_uuid),
                        Some(expected) => prop_assert_eq!(expected, replica.device_uuid),
                    }
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

    /// Whether a striped allocation must succeed: each of the N devices with the most free
    /// space has room for its share of the whole rows in whole units, plus one unit of tail.
    fn striped_fits(pool: &PoolSpace, layout: Layout, length: u64) -> bool {
        let Layout::Striped {
            stripe_count,
            stripe_unit_bytes: unit,
        } = layout
        else {
            return false;
        };
        let order = pool.by_free_space();
        let row = unit * u64::from(stripe_count);
        let tail = if length.is_multiple_of(row) { 0 } else { unit };
        order.len() >= stripe_count as usize
            && order[..stripe_count as usize]
                .iter()
                .all(|i| pool.devices[*i].total_in_units(unit) >= length / row * unit + tail)
    }

    /// Every 16th block (and the last) of `[0, size)` lives at the same place in `a` and `b`.
    fn same_mapping(a: &[Extent], b: &[Extent], size: u64) -> Result<(), TestCaseError> {
        let last = size - BLOCK_SIZE;
        for at in (0..size).step_by(16 * BLOCK_SIZE as usize).chain([last]) {
            prop_assert_eq!(locate_in(a, at), locate_in(b, at), "block at {} moved", at);
            prop_assert!(locate_in(a, at).is_some(), "block at {} unmapped", at);
        }
        Ok(())
    }

    /// Device space used by `extents` (every replica's share).
    fn used_by(extents: &[Extent]) -> u64 {
        extents
            .iter()
            .map(|e| e.member_span() * e.replicas.len() as u64)
            .sum()
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
                let used: u64 = volumes.iter().map(|v| used_by(&v.2)).sum();
                prop_assert_eq!(pool.total_free() + used, capacity, "free + used must equal capacity");
                let length = blocks * BLOCK_SIZE;
                let free_before = pool.total_free();
                match kind {
                    0 => {
                        let layout = layout_from(layout_choice);
                        let mirror_capacity = pool.mirror_capacity();
                        let striped_fits = striped_fits(&pool, layout, length);
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
                                    Layout::Striped { .. } => prop_assert!(!striped_fits, "striped refused with room: {}", error),
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
                            let merged = merge_adjacent(extents.clone());
                            same_mapping(&extents, &merged, volume.1)?;
                            volume.2 = merged;
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
            let used: u64 = volumes.iter().map(|v| used_by(&v.2)).sum();
            prop_assert_eq!(pool.total_free() + used, capacity);
        }
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_64_gib_stripe_is_one_extent_mapped_to_its_end() {
        let devices: Vec<DeviceSpace> = (1..=2)
            .map(|i| DeviceSpace::for_device(Uuid::from_u128(i), MIB, 40 * GIB))
            .collect();
        let mut pool =
            PoolSpace::new(&devices, std::iter::empty()).unwrap_or_else(|e| panic!("{e}"));
        let layout: Layout = "striped:2".parse().unwrap_or_else(|e| panic!("{e}"));
        let extents = pool
            .allocate(layout, 0, 64 * GIB)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(extents.len(), 1, "{extents:?}");
        let extent = &extents[0];
        assert_eq!(extent.kind, ExtentKind::Striped { stripe_unit: MIB });
        assert_eq!(extent.member_span(), 32 * GIB);
        // The last block: chunk 65535, on member 1, in its last unit.
        let (replicas, run) = extent
            .locate(64 * GIB - BLOCK_SIZE)
            .unwrap_or_else(|| panic!("unmapped"));
        assert_eq!(run, BLOCK_SIZE);
        assert_eq!(
            replicas,
            vec![Replica {
                device_uuid: extent.replicas[1].device_uuid,
                device_offset: extent.replicas[1].device_offset + 32 * GIB - BLOCK_SIZE,
            }]
        );
        // Growing by a row continues both members: still one extent.
        let added = pool
            .allocate(layout, 64 * GIB, 2 * MIB)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut all = extents.clone();
        all.extend(added);
        let merged = merge_adjacent(all);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].length, 64 * GIB + 2 * MIB);
    }

    #[test]
    fn fragmented_members_split_the_stripe_at_rows_and_the_tail_is_linear() {
        let devices = devices_from(&[1024, 1024]);
        // Another volume's 256 KiB, 1 MiB into the second device's data, splits its free
        // space into 4 and 11 units of 256 KiB.
        let other = [Extent::replicated(
            0,
            256 * 1024,
            vec![Replica {
                device_uuid: devices[1].uuid,
                device_offset: 2 * MIB,
            }],
        )];
        let mut pool =
            PoolSpace::new(&devices, [other.as_slice()]).unwrap_or_else(|e| panic!("{e}"));
        let layout = Layout::Striped {
            stripe_count: 2,
            stripe_unit_bytes: 256 * 1024,
        };
        // 6 rows of 512 KiB, then a tail of one unit and 8 KiB.
        let length = 3 * MIB + 256 * 1024 + 8192;
        let extents = pool
            .allocate(layout, 0, length)
            .unwrap_or_else(|e| panic!("{e}"));
        check_allocation(layout, 0, length, &extents).unwrap_or_else(|e| panic!("{e}"));
        let shape: Vec<(ExtentKind, u64)> = extents.iter().map(|e| (e.kind, e.length)).collect();
        let striped = ExtentKind::Striped {
            stripe_unit: 256 * 1024,
        };
        assert_eq!(
            shape,
            vec![
                (striped, 2 * MIB),
                (striped, MIB),
                (ExtentKind::Replicated, 256 * 1024),
                (ExtentKind::Replicated, 8192),
            ]
        );
        // Member 1 (the fragmented device) continues after the other volume's space.
        assert_eq!(extents[1].replicas[1].device_offset, 2 * MIB + 256 * 1024);
    }

    /// The extents the allocator of earlier versions made: one single-replica extent per
    /// stripe unit, chunk k on member k mod N, each member's chunks contiguous.
    fn legacy_stripes(members: &[(u128, u64)], unit: u64, length: u64) -> Vec<Extent> {
        let n = members.len() as u64;
        (0..length.div_ceil(unit))
            .map(|k| {
                let (device, base) = members[(k % n) as usize];
                Extent::replicated(
                    k * unit,
                    unit.min(length - k * unit),
                    vec![Replica {
                        device_uuid: Uuid::from_u128(device),
                        device_offset: base + (k / n) * unit,
                    }],
                )
            })
            .collect()
    }

    #[test]
    fn legacy_stripe_units_are_restriped_in_place() {
        let layout = Layout::Striped {
            stripe_count: 3,
            stripe_unit_bytes: MIB,
        };
        let length = 64 * MIB + 8192;
        let legacy = legacy_stripes(&[(1, MIB), (2, 5 * MIB), (3, MIB)], MIB, length);
        assert_eq!(legacy.len(), 65);
        let upgraded = restripe_legacy(layout, &legacy).unwrap_or_else(|| panic!("no rewrite"));
        // 21 whole rows in one striped extent, then chunks 63 and 64 stay linear.
        assert_eq!(upgraded.len(), 3, "{upgraded:?}");
        assert_eq!(upgraded[0].kind, ExtentKind::Striped { stripe_unit: MIB });
        assert_eq!(upgraded[0].length, 63 * MIB);
        same_mapping(&legacy, &upgraded, length).unwrap_or_else(|e| panic!("{e}"));
        for at in (0..length).step_by(BLOCK_SIZE as usize) {
            assert_eq!(locate_in(&legacy, at), locate_in(&upgraded, at), "{at}");
        }
        // Already striped, or not striped at all: nothing to do.
        assert_eq!(restripe_legacy(layout, &upgraded), None);
        assert_eq!(restripe_legacy(Layout::Linear, &legacy), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn restriping_never_moves_a_block(
            count in 2u32..=4,
            unit_blocks in 1u64..64,
            length_blocks in 1u64..2048,
            gap_blocks in 0u64..4,
        ) {
            let unit = unit_blocks * BLOCK_SIZE;
            let length = length_blocks * BLOCK_SIZE;
            let members: Vec<(u128, u64)> = (0..count)
                .map(|i| (u128::from(i) + 1, MIB + u64::from(i) * gap_blocks * BLOCK_SIZE))
                .collect();
            let legacy = legacy_stripes(&members, unit, length);
            let layout = Layout::Striped { stripe_count: count, stripe_unit_bytes: unit };
            let upgraded = restripe_legacy(layout, &legacy).unwrap_or_else(|| legacy.clone());
            for at in (0..length).step_by(BLOCK_SIZE as usize) {
                prop_assert_eq!(locate_in(&legacy, at), locate_in(&upgraded, at), "block {} moved", at);
            }
            let rows = length / (unit * u64::from(count));
            prop_assert_eq!(upgraded.len() as u64, u64::from(rows > 0) + (legacy.len() as u64 - rows * u64::from(count)));
        }
    }

    #[test]
    fn overlapping_extents_are_detected() {
        let devices = devices_from(&[1024]);
        let extent = |offset| {
            Extent::replicated(
                0,
                8 * BLOCK_SIZE,
                vec![Replica {
                    device_uuid: devices[0].uuid,
                    device_offset: offset,
                }],
            )
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

    /// `count` devices, each with `ranges` free ranges of `piece` bytes separated by one used
    /// block.
    fn fragmented(count: usize, ranges: u64, piece: u64) -> PoolSpace {
        let stride = piece + BLOCK_SIZE;
        let devices = devices_from(&vec![ranges * stride / BLOCK_SIZE; count]);
        let used: Vec<Extent> = devices
            .iter()
            .flat_map(|d| {
                (0..ranges).map(move |i| {
                    Extent::replicated(
                        i * BLOCK_SIZE,
                        BLOCK_SIZE,
                        vec![Replica {
                            device_uuid: d.uuid,
                            device_offset: d.data_start + i * stride + piece,
                        }],
                    )
                })
            })
            .collect();
        PoolSpace::new(&devices, std::iter::once(used.as_slice())).unwrap_or_else(|e| panic!("{e}"))
    }

    /// However fragmented the free space, an allocation the map could not hold is refused as
    /// soon as it passes the extent limit (it never builds more), and takes nothing.
    #[test]
    fn allocations_stop_at_the_extent_limit() {
        let striped: Layout = "striped:2".parse().unwrap_or_else(|e| panic!("{e}"));
        let cases = [
            (
                Layout::Linear,
                fragmented(2, 2000, BLOCK_SIZE),
                1000 * BLOCK_SIZE,
            ),
            (
                Layout::Mirror,
                fragmented(2, 2000, BLOCK_SIZE),
                1000 * BLOCK_SIZE,
            ),
            (striped, fragmented(2, 400, MIB), 2 * 300 * MIB),
        ];
        for (layout, mut pool, length) in cases {
            let free = pool.total_free();
            let mut unlimited = pool.clone();
            let all = unlimited
                .allocate(layout, 0, length)
                .unwrap_or_else(|e| panic!("{layout}: {e}"));
            assert!(all.len() > 100, "{layout}: {} extents", all.len());
            pool.limit_extents(100);
            let error = pool.allocate(layout, 0, length).err();
            assert!(
                matches!(error, Some(AllocError::TooManyExtents { limit: 100, .. })),
                "{layout}: {error:?}"
            );
            assert_eq!(pool.total_free(), free, "{layout}: space taken");
            let fits = pool
                .allocate(
                    layout,
                    0,
                    length / all.len() as u64 * 50 / BLOCK_SIZE * BLOCK_SIZE,
                )
                .unwrap_or_else(|e| panic!("{layout}: {e}"));
            assert!(fits.len() <= 100, "{layout}: {} extents", fits.len());
        }
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
