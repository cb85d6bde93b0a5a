// SPDX-License-Identifier: GPL-2.0

//! A buffer of whole pages for I/O the module issues itself (a chunk it preserves for a
//! snapshot): bytes are copied in and out through safe calls, and any range of it can be
//! added to a bio.

use kernel::page::{Page, PAGE_SIZE};
use kernel::prelude::*;

use super::bio::Bio;

pub(crate) struct PageBuf {
    pages: KVec<Page>,
}

impl PageBuf {
    pub(crate) const fn new() -> Self {
        PageBuf { pages: KVec::new() }
    }

    /// Bytes the buffer holds.
    pub(crate) fn len(&self) -> usize {
        self.pages.len() * PAGE_SIZE
    }

    /// Grows the buffer to at least `bytes` (process context; a thread on the I/O path
    /// calls this after `kthread::forbid_io_in_reclaim`).
    pub(crate) fn reserve(&mut self, bytes: usize) -> Result {
        while self.len() < bytes {
            let page = Page::alloc_page(GFP_KERNEL)?;
            self.pages.push(page, GFP_KERNEL)?;
        }
        Ok(())
    }

    /// The page holding byte `at` and the offset in it; EINVAL beyond the buffer.
    fn page_at(&self, at: usize) -> Result<(&Page, usize)> {
        let page = self.pages.get(at / PAGE_SIZE).ok_or(EINVAL)?;
        Ok((page, at % PAGE_SIZE))
    }

    /// Copies `src` into the buffer at `at`.
    pub(crate) fn write(&self, at: usize, src: &[u8]) -> Result {
        let mut done = 0;
        while done < src.len() {
            let (page, offset) = self.page_at(at + done)?;
            let len = (PAGE_SIZE - offset).min(src.len() - done);
            // SAFETY: `src[done..done + len]` is valid for reads; `offset + len` stays within
            // the page, which nothing else touches while it is not under I/O (the owner's
            // contract: no copy while a bio of it is in flight).
            unsafe { page.write_raw(src[done..].as_ptr(), offset, len)? };
            done += len;
        }
        Ok(())
    }

    /// Copies bytes from the buffer at `at` into `dst`.
    pub(crate) fn read(&self, at: usize, dst: &mut [u8]) -> Result {
        let mut done = 0;
        while done < dst.len() {
            let (page, offset) = self.page_at(at + done)?;
            let len = (PAGE_SIZE - offset).min(dst.len() - done);
            // SAFETY: `dst[done..done + len]` is valid for writes; the page range as in `write`.
            unsafe { page.read_raw(dst[done..].as_mut_ptr(), offset, len)? };
            done += len;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `at`.
    pub(crate) fn zero(&self, at: usize, len: usize) -> Result {
        let mut done = 0;
        while done < len {
            let (page, offset) = self.page_at(at + done)?;
            let step = (PAGE_SIZE - offset).min(len - done);
            // SAFETY: the page range as in `write`.
            unsafe { page.fill_zero_raw(offset, step)? };
            done += step;
        }
        Ok(())
    }

    /// Pages spanned by `len` bytes at `at` (the bio vectors [`PageBuf::add_to`] uses).
    pub(crate) fn vecs(at: usize, len: usize) -> usize {
        if len == 0 {
            return 0;
        }
        (at + len).div_ceil(PAGE_SIZE) - at / PAGE_SIZE
    }

    /// Adds `len` bytes at `at` of the buffer to `bio`, which was allocated with room for
    /// [`PageBuf::vecs`] of them. The buffer must outlive the bio's I/O.
    pub(crate) fn add_to(&self, bio: &mut Bio, at: usize, len: usize) -> Result {
        let mut done = 0;
        while done < len {
            let (page, offset) = self.page_at(at + done)?;
            let step = (PAGE_SIZE - offset).min(len - done);
            bio.add_page(page, step as u32, offset as u32);
            done += step;
        }
        Ok(())
    }
}
