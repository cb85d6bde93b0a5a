//! Block patterns for placement checks: each 4 KiB block names its seed and number, so a
//! misplaced, stale or missing block is told apart from the right one when the host reads the
//! image files back.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

/// Block size of the patterns (and of sanblk volumes).
pub const BLOCK: u64 = 4096;

/// `size` bytes of pattern: block `k` repeats "`label` seed S block K".
pub fn pattern(label: &str, seed: u8, size: u64) -> Vec<u8> {
    let mut data = Vec::with_capacity(size as usize);
    for block in 0..size / BLOCK {
        let tag = format!("{label} seed {seed:3} block {block:08}\n");
        while data.len() < ((block + 1) * BLOCK) as usize {
            data.extend_from_slice(tag.as_bytes());
        }
        data.truncate(((block + 1) * BLOCK) as usize);
    }
    data
}

/// `len` bytes of `image` at `offset`.
pub fn read_at(image: &Path, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut file = File::open(image)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len as usize];
    file.read_exact(&mut buf)?;
    Ok(buf)
}

/// `len` bytes of the volume at volume offset `at`, read block by block from the first
/// replica the server's `map` gives for each (the image files by device UUID).
pub fn read_volume(
    map: &sanblk_proto::map::VolumeMap,
    images: &std::collections::HashMap<uuid::Uuid, std::path::PathBuf>,
    at: u64,
    len: u64,
) -> Vec<u8> {
    let mut data = Vec::with_capacity(len as usize);
    for block in 0..len / BLOCK {
        let volume_offset = at + block * BLOCK;
        let replica = map
            .extent_at(volume_offset)
            .and_then(|e| e.locate(volume_offset - e.volume_offset))
            .and_then(|(replicas, _)| replicas.first().cloned())
            .unwrap_or_else(|| panic!("{}: volume offset {volume_offset} not mapped", map.name));
        let image = &images[&replica.device_uuid];
        data.extend(
            read_at(image, replica.device_offset, BLOCK)
                .unwrap_or_else(|e| panic!("read {}: {e}", image.display())),
        );
    }
    data
}

/// Checks every block of `expected` at every replica the server's `map` gives for it
/// (a striped extent's member holding it), reading the image files (`images`, by device
/// UUID) directly. Returns the number of blocks checked.
pub fn verify_against_map(
    map: &sanblk_proto::map::VolumeMap,
    images: &std::collections::HashMap<uuid::Uuid, std::path::PathBuf>,
    expected: &[u8],
) -> usize {
    verify_range(map, images, 0, expected)
}

/// Like [`verify_against_map`] for `expected` written at volume offset `at`.
pub fn verify_range(
    map: &sanblk_proto::map::VolumeMap,
    images: &std::collections::HashMap<uuid::Uuid, std::path::PathBuf>,
    at: u64,
    expected: &[u8],
) -> usize {
    let mut checked = 0;
    for (index, want) in expected.chunks_exact(BLOCK as usize).enumerate() {
        let volume_offset = at + index as u64 * BLOCK;
        let replicas = map
            .extent_at(volume_offset)
            .and_then(|e| e.locate(volume_offset - e.volume_offset))
            .map(|(replicas, _)| replicas)
            .unwrap_or_else(|| panic!("{}: volume offset {volume_offset} not mapped", map.name));
        for replica in replicas {
            let image = &images[&replica.device_uuid];
            let got = read_at(image, replica.device_offset, BLOCK)
                .unwrap_or_else(|e| panic!("read {}: {e}", image.display()));
            assert!(
                got == want,
                "{}: volume offset {volume_offset} not at {} offset {}: found {:?}",
                map.name,
                image.display(),
                replica.device_offset,
                String::from_utf8_lossy(&got[..32])
            );
            checked += 1;
        }
    }
    checked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_differ_by_number_and_seed() {
        let a = pattern("t", 1, 2 * BLOCK);
        assert_eq!(a.len() as u64, 2 * BLOCK);
        assert_ne!(a[..BLOCK as usize], a[BLOCK as usize..]);
        assert_ne!(a, pattern("t", 2, 2 * BLOCK));
    }
}
