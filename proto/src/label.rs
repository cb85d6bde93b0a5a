//! On-disk label at byte 0 of every SAN device, so each host finds "device X" by UUID whatever
//! its local name is: the format (encode, decode) and the reader. Writing labels onto devices
//! is the server's job (`pool add`) and lives in sand.
//!
//! Layout (4096 bytes, integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `SANBLKL1` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | reserved, zero |
//! | 16 | 16 | device UUID |
//! | 32 | 16 | pool UUID |
//! | 48 | 8 | device size in bytes when labelled |
//! | 56 | 8 | data start offset (allocations begin here) |
//! | 64 | 4028 | zero |
//! | 4092 | 4 | CRC32 (IEEE) of bytes 0..4092 |

use std::fs::File;
use std::io::Read;
use std::path::Path;
use uuid::Uuid;

pub const LABEL_MAGIC: &[u8; 8] = b"SANBLKL1";
pub const LABEL_FORMAT_VERSION: u32 = 1;
pub const LABEL_BYTES: usize = 4096;
/// The first MiB is reserved for the label (room for future metadata); volumes start after it.
pub const DATA_START_OFFSET: u64 = 1024 * 1024;
const CHECKSUM_OFFSET: usize = LABEL_BYTES - 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label {
    pub device_uuid: Uuid,
    pub pool_uuid: Uuid,
    pub device_size: u64,
    pub data_start: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: sanblk label checksum mismatch (corrupt label)")]
    BadChecksum { path: String },
    #[error("{path}: sanblk label format version {version} is not supported")]
    UnsupportedVersion { path: String, version: u32 },
    #[error("{path}: device is too small ({size} bytes)")]
    TooSmall { path: String, size: u64 },
}

impl LabelError {
    /// An I/O error on the device at `path`.
    pub fn io(path: &Path, source: std::io::Error) -> LabelError {
        LabelError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

fn le_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut field = [0u8; 8];
    field.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(field)
}

fn le_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut field = [0u8; 4];
    field.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(field)
}

fn uuid_at(bytes: &[u8], offset: usize) -> Uuid {
    let mut field = [0u8; 16];
    field.copy_from_slice(&bytes[offset..offset + 16]);
    Uuid::from_bytes(field)
}

impl Label {
    pub fn encode(&self) -> [u8; LABEL_BYTES] {
        let mut block = [0u8; LABEL_BYTES];
        block[0..8].copy_from_slice(LABEL_MAGIC);
        block[8..12].copy_from_slice(&LABEL_FORMAT_VERSION.to_le_bytes());
        block[16..32].copy_from_slice(self.device_uuid.as_bytes());
        block[32..48].copy_from_slice(self.pool_uuid.as_bytes());
        block[48..56].copy_from_slice(&self.device_size.to_le_bytes());
        block[56..64].copy_from_slice(&self.data_start.to_le_bytes());
        let checksum = crc32fast::hash(&block[..CHECKSUM_OFFSET]);
        block[CHECKSUM_OFFSET..].copy_from_slice(&checksum.to_le_bytes());
        block
    }

    /// Decodes a label block. `Ok(None)` means "no sanblk label here".
    pub fn decode(block: &[u8], path: &Path) -> Result<Option<Label>, LabelError> {
        if block.len() < LABEL_BYTES || &block[0..8] != LABEL_MAGIC {
            return Ok(None);
        }
        let stored = le_u32(block, CHECKSUM_OFFSET);
        if crc32fast::hash(&block[..CHECKSUM_OFFSET]) != stored {
            return Err(LabelError::BadChecksum {
                path: path.display().to_string(),
            });
        }
        let version = le_u32(block, 8);
        if version != LABEL_FORMAT_VERSION {
            return Err(LabelError::UnsupportedVersion {
                path: path.display().to_string(),
                version,
            });
        }
        Ok(Some(Label {
            device_uuid: uuid_at(block, 16),
            pool_uuid: uuid_at(block, 32),
            device_size: le_u64(block, 48),
            data_start: le_u64(block, 56),
        }))
    }
}

/// Reads the first label-sized block (shorter devices yield a zero-padded block).
pub fn read_head(path: &Path) -> Result<[u8; LABEL_BYTES], LabelError> {
    let file = File::open(path).map_err(|e| LabelError::io(path, e))?;
    let mut block = [0u8; LABEL_BYTES];
    let mut filled = 0;
    let mut reader = file.take(LABEL_BYTES as u64);
    loop {
        let read = reader
            .read(&mut block[filled..])
            .map_err(|e| LabelError::io(path, e))?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    Ok(block)
}

/// Reads the sanblk label of a device: `Ok(None)` if it has none. This is what an agent uses to
/// map device UUIDs in a volume map to local block devices.
pub fn read_label(path: &Path) -> Result<Option<Label>, LabelError> {
    let block = read_head(path)?;
    Label::decode(&block, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_round_trips_and_detects_corruption() {
        let label = Label {
            device_uuid: Uuid::new_v4(),
            pool_uuid: Uuid::new_v4(),
            device_size: 64 << 20,
            data_start: DATA_START_OFFSET,
        };
        let mut block = label.encode();
        let path = Path::new("test");
        assert_eq!(Label::decode(&block, path).ok().flatten(), Some(label));
        block[50] ^= 1;
        assert!(matches!(
            Label::decode(&block, path),
            Err(LabelError::BadChecksum { .. })
        ));
        assert!(matches!(Label::decode(&[0u8; LABEL_BYTES], path), Ok(None)));
    }
}
