//! Volume maps: the immutable description of one volume handed to clients.
//!
//! The same extent kinds as the kernel's map (`sanblk_uapi::map`): a replicated extent's
//! replicas each hold the whole extent (one replica: linear, two: mirror); a striped extent's
//! replicas are its stripe members, taking `stripe_unit` bytes of the volume in turn, each
//! holding `length / members` contiguous bytes on its device. The agent encodes extents one to
//! one; nobody expands or folds stripes.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// Block size of every volume; all offsets and lengths are multiples of it.
pub const BLOCK_SIZE: u64 = 4096;
/// Stripe unit used for striped layouts.
pub const DEFAULT_STRIPE_UNIT_BYTES: u64 = 1024 * 1024;
/// Lease handed out with every map. Short enough that a change with an unreachable client
/// (which waits for that client's lease plus [`IN_FLIGHT_BOUND_MS`]) completes within 10 s;
/// the agent renews every third of it, one small frame per attached volume every 2 s.
pub const DEFAULT_LEASE_MS: u64 = 6_000;
/// Added to a lease on the server before it counts as expired: a client whose lease lapsed
/// issues no new direct I/O, but bios it had already issued straight to the SAN devices are
/// still in flight and may land up to this long after (device queues, multipath retries). The
/// server frees a read-write slot or fences a client only once those cannot land any more.
pub const IN_FLIGHT_BOUND_MS: u64 = 2_000;
/// Number of copies of a mirrored volume.
pub const MIRROR_COPIES: usize = 2;
/// Most stripes of a striped layout (members of one kernel map extent).
pub const MAX_STRIPES: u32 = sanblk_uapi::map::MAX_MEMBERS as u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessMode {
    Ro,
    Rw,
}

impl AccessMode {
    /// Whether a grant of `self` allows an attachment in `wanted` mode.
    pub fn permits(self, wanted: AccessMode) -> bool {
        self == AccessMode::Rw || wanted == AccessMode::Ro
    }
}

impl fmt::Display for AccessMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessMode::Ro => "ro",
            AccessMode::Rw => "rw",
        })
    }
}

impl FromStr for AccessMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ro" => Ok(AccessMode::Ro),
            "rw" => Ok(AccessMode::Rw),
            other => Err(format!("access mode must be ro or rw, not {other:?}")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Layout {
    Linear,
    Striped {
        stripe_count: u32,
        stripe_unit_bytes: u64,
    },
    Mirror,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layout::Linear => f.write_str("linear"),
            Layout::Striped { stripe_count, .. } => write!(f, "striped:{stripe_count}"),
            Layout::Mirror => f.write_str("mirror"),
        }
    }
}

impl FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "linear" => Ok(Layout::Linear),
            "mirror" => Ok(Layout::Mirror),
            _ => {
                let count = s.strip_prefix("striped:").ok_or_else(|| {
                    format!("layout must be linear, striped:N or mirror, not {s:?}")
                })?;
                let stripe_count: u32 = count
                    .parse()
                    .map_err(|_| format!("stripe count {count:?} is not a number"))?;
                if !(2..=MAX_STRIPES).contains(&stripe_count) {
                    return Err(format!(
                        "a striped layout needs 2 to {MAX_STRIPES} stripes, not {stripe_count}"
                    ));
                }
                Ok(Layout::Striped {
                    stripe_count,
                    stripe_unit_bytes: DEFAULT_STRIPE_UNIT_BYTES,
                })
            }
        }
    }
}

/// One copy of an extent's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub device_uuid: Uuid,
    pub device_offset: u64,
}

/// How an extent's replicas hold its data (uapi's `ExtentKind` with the stripe unit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtentKind {
    /// Every replica holds the whole extent. The default: extents persisted before striped
    /// extents existed carry no kind.
    #[default]
    Replicated,
    /// The replicas are stripe members: chunk `k` of `stripe_unit` bytes lives on member
    /// `k % members`, at `(k / members) * stripe_unit` from the member's offset. The length
    /// is a multiple of `stripe_unit * members`.
    Striped { stripe_unit: u64 },
}

/// A contiguous piece of the volume and where its data lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub volume_offset: u64,
    pub length: u64,
    #[serde(default)]
    pub kind: ExtentKind,
    /// Copies (replicated) or stripe members (striped), on distinct devices.
    pub replicas: Vec<Replica>,
}

impl Extent {
    /// An extent every replica holds whole (linear or mirror).
    pub fn replicated(volume_offset: u64, length: u64, replicas: Vec<Replica>) -> Extent {
        Extent {
            volume_offset,
            length,
            kind: ExtentKind::Replicated,
            replicas,
        }
    }

    /// An extent striped over `members` in units of `stripe_unit` bytes.
    pub fn striped(
        volume_offset: u64,
        length: u64,
        stripe_unit: u64,
        members: Vec<Replica>,
    ) -> Extent {
        Extent {
            volume_offset,
            length,
            kind: ExtentKind::Striped { stripe_unit },
            replicas: members,
        }
    }

    /// Bytes each replica occupies on its device.
    pub fn member_span(&self) -> u64 {
        match self.kind {
            ExtentKind::Replicated => self.length,
            ExtentKind::Striped { .. } => self.length / (self.replicas.len().max(1) as u64),
        }
    }

    /// Where byte `within` of the extent lives (`within < length`): every replica holding it,
    /// at that byte's device offset (all replicas of a replicated extent, one member of a
    /// striped one), and how many bytes from there stay on those replicas (to the end of the
    /// extent or of the stripe unit). `None` if `within` is outside the extent or the extent
    /// is malformed (no replicas, zero stripe unit, offsets overflowing).
    pub fn locate(&self, within: u64) -> Option<(Vec<Replica>, u64)> {
        if within >= self.length || self.replicas.is_empty() {
            return None;
        }
        match self.kind {
            ExtentKind::Replicated => {
                let replicas = self
                    .replicas
                    .iter()
                    .map(|r| {
                        Some(Replica {
                            device_uuid: r.device_uuid,
                            device_offset: r.device_offset.checked_add(within)?,
                        })
                    })
                    .collect::<Option<Vec<_>>>()?;
                Some((replicas, self.length - within))
            }
            ExtentKind::Striped { stripe_unit } => {
                if stripe_unit == 0 {
                    return None;
                }
                let count = self.replicas.len() as u64;
                let chunk = within / stripe_unit;
                let member = self.replicas.get((chunk % count) as usize)?;
                let inside = (chunk / count) * stripe_unit + within % stripe_unit;
                let replica = Replica {
                    device_uuid: member.device_uuid,
                    device_offset: member.device_offset.checked_add(inside)?,
                };
                Some((vec![replica], stripe_unit - within % stripe_unit))
            }
        }
    }
}

/// A range of volume bytes, `[volume_offset, volume_offset + length)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    pub volume_offset: u64,
    pub length: u64,
}

impl ByteRange {
    /// Whether this range shares at least one byte with `[offset, offset + length)` (an
    /// empty range shares none).
    pub fn overlaps(&self, offset: u64, length: u64) -> bool {
        length != 0
            && self.length != 0
            && offset < self.volume_offset.saturating_add(self.length)
            && self.volume_offset < offset.saturating_add(length)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMap {
    pub volume_id: u64,
    pub name: String,
    pub epoch: u64,
    pub size_bytes: u64,
    pub block_size: u64,
    pub layout: Layout,
    /// Sorted by `volume_offset`, contiguous, covering `[0, size_bytes)`.
    pub extents: Vec<Extent>,
    pub lease_ms: u64,
    /// Volume byte ranges the server is copying to a new place (volume move, evacuation,
    /// mirror add, recovery): clients still read them from `extents`, but every write to
    /// them must go through the server, which orders it with its copy and writes both the
    /// old place and the new one. The agent flags every kernel map extent overlapping one of
    /// them (`sanblk_uapi::map::EXTENT_SYNCING`), so the module sends those writes over its
    /// server path. Empty (and left out of the JSON) when nothing is being copied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub syncing: Vec<ByteRange>,
    /// Set while the volume has active snapshots: the first write to each chunk goes
    /// through the server, which copies the chunk to every snapshot's store before writing
    /// it (see `sanblk_uapi::map::MapHeader::cow_generation`). Left out of the JSON without
    /// snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_on_write: Option<CopyOnWrite>,
}

/// The copy-on-write tracking a map asks of its clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyOnWrite {
    /// Identifies the set of active snapshots (the newest one's id): what a client learnt
    /// about copied chunks holds while it stays the same.
    pub generation: u64,
    /// The smallest chunk size of the active snapshots.
    pub chunk_bytes: u32,
    /// Where each active snapshot's store lies and its chunk size, the newest snapshot's
    /// (id `generation`) first, then older ones by descending id, so a client may preserve
    /// chunks into each store that lacks them itself (see `sanblk_uapi::map::MapCowStore`).
    /// Empty when the server makes every copy (more stores than a kernel map describes, or
    /// a snapshot's chunk smaller than a block), and then left out of the JSON.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stores: Vec<CowStoreLocation>,
}

/// Where a snapshot's COW store lies (format: `sanblk_uapi::cow`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CowStoreLocation {
    pub snapshot_id: u64,
    /// The sum of the extents' lengths.
    pub store_bytes: u64,
    /// The record sector to start looking for the end of the records at: every one before
    /// it is full.
    pub scan_from_sector: u32,
    /// The snapshot's chunk size (its records count chunks of this size): a power of two,
    /// a multiple of the map's `chunk_bytes`.
    pub chunk_bytes: u32,
    /// In store order (`volume_offset` is the offset in the store), one replica each.
    pub extents: Vec<Extent>,
}

impl VolumeMap {
    /// Finds the extent holding `volume_offset` (what the kernel's remap does).
    pub fn extent_at(&self, volume_offset: u64) -> Option<&Extent> {
        let index = self
            .extents
            .partition_point(|e| e.volume_offset + e.length <= volume_offset);
        self.extents
            .get(index)
            .filter(|e| e.volume_offset <= volume_offset)
    }

    /// Whether any byte of `[offset, offset + length)` lies in a syncing range.
    pub fn is_syncing(&self, offset: u64, length: u64) -> bool {
        self.syncing.iter().any(|r| r.overlaps(offset, length))
    }

    /// Every device the map names: the volume's replicas, then its COW stores', in store
    /// order (a device may come up more than once).
    pub fn device_uuids(&self) -> impl Iterator<Item = Uuid> + '_ {
        let stores = self
            .copy_on_write
            .as_ref()
            .map(|cow| cow.stores.as_slice())
            .unwrap_or_default();
        self.extents
            .iter()
            .chain(stores.iter().flat_map(|store| store.extents.iter()))
            .flat_map(|extent| extent.replicas.iter().map(|replica| replica.device_uuid))
    }
}

/// Parses a size such as `4096`, `64M`, `1G`, `512K`, `2T` (binary units, case-insensitive,
/// optional trailing `B`/`iB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let upper = trimmed.to_ascii_uppercase();
    let without_b = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (digits, multiplier) = match without_b.chars().last() {
        Some('K') => (&without_b[..without_b.len() - 1], 1u64 << 10),
        Some('M') => (&without_b[..without_b.len() - 1], 1 << 20),
        Some('G') => (&without_b[..without_b.len() - 1], 1 << 30),
        Some('T') => (&without_b[..without_b.len() - 1], 1 << 40),
        _ => (without_b, 1),
    };
    let number: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {trimmed:?}"))?;
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {trimmed:?} is too large"))
}

/// Formats bytes with a binary unit for humans.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
    for (suffix, unit) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
        if bytes >= unit {
            return format!("{:.1}{suffix}", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn layouts_parse() {
        assert_eq!("linear".parse(), Ok(Layout::Linear));
        assert_eq!("mirror".parse(), Ok(Layout::Mirror));
        assert_eq!(
            "striped:3".parse(),
            Ok(Layout::Striped {
                stripe_count: 3,
                stripe_unit_bytes: DEFAULT_STRIPE_UNIT_BYTES
            })
        );
        assert!("striped:1".parse::<Layout>().is_err());
        assert!("raid5".parse::<Layout>().is_err());
    }

    #[test]
    fn byte_ranges_overlap_only_when_they_share_a_byte() {
        let range = ByteRange {
            volume_offset: 4096,
            length: 8192,
        };
        assert!(range.overlaps(0, 4097));
        assert!(range.overlaps(12287, 1));
        assert!(range.overlaps(0, u64::MAX));
        assert!(!range.overlaps(0, 4096));
        assert!(!range.overlaps(12288, 4096));
        assert!(!range.overlaps(5000, 0));
        let empty = ByteRange {
            volume_offset: 4096,
            length: 0,
        };
        assert!(!empty.overlaps(0, 1 << 20));
    }

    #[test]
    fn syncing_ranges_are_optional_in_json() {
        let mut map = VolumeMap {
            volume_id: 1,
            name: "v".into(),
            epoch: 1,
            size_bytes: BLOCK_SIZE,
            block_size: BLOCK_SIZE,
            layout: Layout::Linear,
            extents: Vec::new(),
            lease_ms: DEFAULT_LEASE_MS,
            syncing: Vec::new(),
            copy_on_write: None,
        };
        let json = serde_json::to_string(&map).expect("serialises");
        assert!(!json.contains("syncing"), "{json}");
        assert_eq!(
            serde_json::from_str::<VolumeMap>(&json).expect("parses"),
            map
        );
        map.syncing.push(ByteRange {
            volume_offset: 0,
            length: BLOCK_SIZE,
        });
        let json = serde_json::to_string(&map).expect("serialises");
        assert_eq!(
            serde_json::from_str::<VolumeMap>(&json).expect("parses"),
            map
        );
        assert!(map.is_syncing(0, 1) && !map.is_syncing(BLOCK_SIZE, 1));
    }

    #[test]
    fn device_uuids_name_the_replicas_and_the_cow_stores() {
        let replica = |n: u128| Replica {
            device_uuid: Uuid::from_u128(n),
            device_offset: 0,
        };
        let store = |snapshot_id: u64, devices: &[u128]| CowStoreLocation {
            snapshot_id,
            store_bytes: BLOCK_SIZE * devices.len() as u64,
            scan_from_sector: 0,
            chunk_bytes: 65536,
            extents: devices
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    Extent::replicated(i as u64 * BLOCK_SIZE, BLOCK_SIZE, vec![replica(*n)])
                })
                .collect(),
        };
        let map = VolumeMap {
            volume_id: 1,
            name: "v".into(),
            epoch: 1,
            size_bytes: 2 * BLOCK_SIZE,
            block_size: BLOCK_SIZE,
            layout: Layout::Mirror,
            extents: vec![Extent::replicated(
                0,
                2 * BLOCK_SIZE,
                vec![replica(1), replica(2)],
            )],
            lease_ms: DEFAULT_LEASE_MS,
            syncing: Vec::new(),
            copy_on_write: Some(CopyOnWrite {
                generation: 2,
                chunk_bytes: 65536,
                stores: vec![store(2, &[3]), store(1, &[4, 1])],
            }),
        };
        let named: Vec<u128> = map.device_uuids().map(|u| u.as_u128()).collect();
        assert_eq!(named, [1, 2, 3, 4, 1]);
        // Without stores, the field stays out of the JSON and comes back empty.
        let mut plain = map.clone();
        if let Some(cow) = plain.copy_on_write.as_mut() {
            cow.stores.clear();
        }
        let json = serde_json::to_string(&plain).expect("serialises");
        assert!(!json.contains("stores"), "{json}");
        assert_eq!(
            serde_json::from_str::<VolumeMap>(&json).expect("parses"),
            plain
        );
        let json = serde_json::to_string(&map).expect("serialises");
        assert_eq!(
            serde_json::from_str::<VolumeMap>(&json).expect("parses"),
            map
        );
        let named: Vec<u128> = plain.device_uuids().map(|u| u.as_u128()).collect();
        assert_eq!(named, [1, 2]);
    }
}
