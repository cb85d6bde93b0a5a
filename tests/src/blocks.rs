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
