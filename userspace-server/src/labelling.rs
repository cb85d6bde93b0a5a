//! Labelling a SAN device for the pool (`pool add`): the device's size, the check for other
//! owners' signatures (libblkid), and the label write. The label format and reader are in
//! `sanblk_proto::label`, shared with the agents that read labels.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use libblkid_rs::{BlkidErr, BlkidProbe, BlkidProbeRet, BlkidSublks, BlkidSublksFlags};

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

/// Finds every signature of another owner on the device: whatever libblkid knows (filesystems
/// incl. btrfs at 64 KiB, swap, LUKS, RAID members, LVM, partition tables, wherever blkid looks
/// for them, also at the end of the device; superblocks with a bad checksum count too), and
/// the magic numbers of the most common ones in the first 4 KiB even when the rest of their
/// superblock is damaged. Returns one description per signature, e.g.
/// `swap (blkid: TYPE=swap at offset 4086)`; empty when the device is free.
///
/// With `wipe`, erases each magic blkid reports (as `wipefs` does) so that nothing of the old
/// owner is detected on the device once the label is written over the first 4 KiB.
pub fn probe_foreign_signatures(path: &Path, wipe: bool) -> Result<Vec<String>, LabelError> {
    let mut found = blkid_signatures(path, wipe)?;
    if found.is_empty() {
        if let Some(what) = foreign_signature_in(&read_head(path)?) {
            found.push(format!("{what} (magic number in the first 4 KiB)"));
        }
    }
    Ok(found)
}

fn blkid_signatures(path: &Path, wipe: bool) -> Result<Vec<String>, LabelError> {
    let file = OpenOptions::new()
        .read(true)
        .write(wipe)
        .open(path)
        .map_err(|e| LabelError::io(path, e))?;
    let blkid = |e: BlkidErr| {
        LabelError::io(
            path,
            std::io::Error::other(format!("probing with libblkid: {e}")),
        )
    };
    let mut probe = BlkidProbe::new().map_err(blkid)?;
    probe.set_device(file.as_raw_fd(), 0, 0).map_err(blkid)?;
    probe.enable_superblocks(true).map_err(blkid)?;
    probe
        .set_superblock_flags(BlkidSublksFlags::new(vec![
            BlkidSublks::Type,
            BlkidSublks::Usage,
            BlkidSublks::Magic,
            BlkidSublks::Badcsum,
        ]))
        .map_err(blkid)?;
    probe.enable_partitions(true).map_err(blkid)?;
    let mut found = Vec::new();
    // One signature per call, every chain, as wipefs walks them.
    while let BlkidProbeRet::Success = probe.do_probe().map_err(blkid)? {
        let value = |name: &str| probe.lookup_value(name).ok();
        let described = if let Some(kind) = value("TYPE") {
            let offset = value("SBMAGIC_OFFSET");
            Some((kind.clone(), format!("TYPE={kind}"), offset))
        } else {
            value("PTTYPE").map(|table| {
                let offset = value("PTMAGIC_OFFSET");
                (
                    format!("{table} partition table"),
                    format!("PTTYPE={table}"),
                    offset,
                )
            })
        };
        if let Some((what, tag, offset)) = described {
            let at = offset
                .map(|o| format!(" at offset {o}"))
                .unwrap_or_default();
            found.push(format!("{what} (blkid: {tag}{at})"));
        }
        if wipe {
            probe.do_wipe(false).map_err(blkid)?;
        }
    }
    if wipe {
        file.sync_all().map_err(|e| LabelError::io(path, e))?;
    }
    Ok(found)
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
