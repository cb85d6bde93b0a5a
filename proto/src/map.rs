//! Volume maps: the immutable description of one volume handed to clients.
//!
//! Striped volumes are expressed as ordinary extents chunked at stripe-unit granularity (one
//! replica each, consecutive chunks on distinct devices), so a client needs only one remapping
//! rule: find the extent containing the volume offset, add the offset inside it to the replica's
//! device offset. Mirrored extents carry two replicas on distinct devices.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// Block size of every volume; all offsets and lengths are multiples of it.
pub const BLOCK_SIZE: u64 = 4096;
/// Stripe unit used for striped layouts.
pub const DEFAULT_STRIPE_UNIT_BYTES: u64 = 1024 * 1024;
/// Lease handed out with every map.
pub const DEFAULT_LEASE_MS: u64 = 30_000;
/// Number of copies of a mirrored volume.
pub const MIRROR_COPIES: usize = 2;

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
                if stripe_count < 2 {
                    return Err("a striped layout needs at least 2 stripes".into());
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

/// A contiguous piece of the volume and where its copies live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub volume_offset: u64,
    pub length: u64,
    pub replicas: Vec<Replica>,
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
}
