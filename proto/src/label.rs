//! On-disk label at byte 0 of every SAN device, so each host finds "device X" by UUID whatever
//! its local name is.
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

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
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

fn io_error(path: &Path, source: std::io::Error) -> LabelError {
    LabelError::Io {
        path: path.display().to_string(),
        source,
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

/// Size of a block device or image file in bytes.
pub fn device_size(path: &Path) -> Result<u64, LabelError> {
    let mut file = File::open(path).map_err(|e| io_error(path, e))?;
    file.seek(SeekFrom::End(0)).map_err(|e| io_error(path, e))
}

/// Reads the first label-sized block (shorter devices yield a zero-padded block).
fn read_head(path: &Path) -> Result<[u8; LABEL_BYTES], LabelError> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    let mut block = [0u8; LABEL_BYTES];
    let mut filled = 0;
    let mut reader = file.take(LABEL_BYTES as u64);
    loop {
        let read = reader
            .read(&mut block[filled..])
            .map_err(|e| io_error(path, e))?;
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

/// Writes `label` at byte 0 and syncs. Overwrites the first 4 KiB, which also removes any
/// foreign signature living there.
pub fn write_label(path: &Path, label: &Label) -> Result<(), LabelError> {
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_error(path, e))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| io_error(path, e))?;
    file.write_all(&label.encode())
        .map_err(|e| io_error(path, e))?;
    file.sync_all().map_err(|e| io_error(path, e))
}

/// Looks for signatures of other owners (filesystems, partition tables, LVM) in the first
/// 4 KiB. Returns a human description of the first one found.
pub fn detect_foreign_signature(path: &Path) -> Result<Option<&'static str>, LabelError> {
    let block = read_head(path)?;
    Ok(foreign_signature_in(&block))
}

fn foreign_signature_in(block: &[u8; LABEL_BYTES]) -> Option<&'static str> {
    const SECTOR: usize = 512;
    if &block[0..4] == b"XFSB" {
        return Some("XFS filesystem");
    }
    if block[1080..1082] == [0x53, 0xEF] {
        return Some("ext2/3/4 filesystem");
    }
    if &block[512..520] == b"EFI PART" {
        return Some("GPT partition table");
    }
    if (0..4).any(|sector| &block[sector * SECTOR..sector * SECTOR + 8] == b"LABELONE") {
        return Some("LVM physical volume");
    }
    if block[510..512] == [0x55, 0xAA] {
        return Some("MBR partition table or boot sector");
    }
    None
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

    #[test]
    fn foreign_signatures_are_recognised() {
        let mut block = [0u8; LABEL_BYTES];
        assert_eq!(foreign_signature_in(&block), None);
        block[1080] = 0x53;
        block[1081] = 0xEF;
        assert_eq!(foreign_signature_in(&block), Some("ext2/3/4 filesystem"));
        let mut block = [0u8; LABEL_BYTES];
        block[512..520].copy_from_slice(b"EFI PART");
        block[510] = 0x55;
        block[511] = 0xAA;
        assert_eq!(foreign_signature_in(&block), Some("GPT partition table"));
        let mut block = [0u8; LABEL_BYTES];
        block[1024..1032].copy_from_slice(b"LABELONE");
        assert_eq!(foreign_signature_in(&block), Some("LVM physical volume"));
        let mut block = [0u8; LABEL_BYTES];
        block[0..4].copy_from_slice(b"XFSB");
        assert_eq!(foreign_signature_in(&block), Some("XFS filesystem"));
    }
}
