//! Labelling a SAN device for the pool (`pool add`): the device's size, the check for other
//! owners' signatures, and the label write. The label format and reader are in
//! `sanblk_proto::label`, shared with the agents that read labels.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use sanblk_proto::label::{read_head, Label, LabelError, LABEL_BYTES};

/// Size of a block device or image file in bytes.
pub fn device_size(path: &Path) -> Result<u64, LabelError> {
    let mut file = File::open(path).map_err(|e| LabelError::io(path, e))?;
    file.seek(SeekFrom::End(0))
        .map_err(|e| LabelError::io(path, e))
}

/// Writes `label` at byte 0 and syncs. Overwrites the first 4 KiB, which also removes any
/// foreign signature living there.
pub fn write_label(path: &Path, label: &Label) -> Result<(), LabelError> {
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| LabelError::io(path, e))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| LabelError::io(path, e))?;
    file.write_all(&label.encode())
        .map_err(|e| LabelError::io(path, e))?;
    file.sync_all().map_err(|e| LabelError::io(path, e))
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
