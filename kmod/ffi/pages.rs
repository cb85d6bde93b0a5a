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

    /// Calls `f(page, offset in the page, bytes done before, bytes)` for each page piece of
    /// the `len` bytes at `at`; EINVAL beyond the buffer.
    fn for_each_piece(
        &self,
        at: usize,
        len: usize,
        mut f: impl FnMut(&Page, usize, usize, usize) -> Result,
    ) -> Result {
        let mut done = 0;
        while done < len {
            let page = self.pages.get((at + done) / PAGE_SIZE).ok_or(EINVAL)?;
            let offset = (at + done) % PAGE_SIZE;
            let step = (PAGE_SIZE - offset).min(len - done);
            f(page, offset, done, step)?;
            done += step;
        }
        Ok(())
    }

    /// Copies `src` into the buffer at `at`.
    pub(crate) fn write(&self, at: usize, src: &[u8]) -> Result {
        self.for_each_piece(at, src.len(), |page, offset, done, len| {
            // SAFETY: `src[done..done + len]` is valid for reads; `offset + len` stays within
            // the page, which nothing else touches while it is not under I/O (the owner's
            // contract: no copy while a bio of it is in flight).
            unsafe { page.write_raw(src[done..].as_ptr(), offset, len) }
        })
    }

    /// Copies bytes from the buffer at `at` into `dst`.
    pub(crate) fn read(&self, at: usize, dst: &mut [u8]) -> Result {
        let len = dst.len();
        self.for_each_piece(at, len, |page, offset, done, len| {
            // SAFETY: `dst[done..done + len]` is valid for writes; the page range as in `write`.
            unsafe { page.read_raw(dst[done..].as_mut_ptr(), offset, len) }
        })
    }

    /// Zeroes `len` bytes at `at`.
    pub(crate) fn zero(&self, at: usize, len: usize) -> Result {
        self.for_each_piece(at, len, |page, offset, _, len| {
            // SAFETY: the page range as in `write`.
            unsafe { page.fill_zero_raw(offset, len) }
        })
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
        self.for_each_piece(at, len, |page, offset, _, step| {
            bio.add_page(page, step as u32, offset as u32);
            Ok(())
        })
    }
}
