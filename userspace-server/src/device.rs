//! The server's own path to the SAN devices: 4096-aligned buffers, a cache of opened device
//! files (O_DIRECT where possible), and the blocking execution of one request split into
//! per-extent pieces.

use std::alloc::{self, Layout};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{info, warn};
use tokio::sync::mpsc;
use uuid::Uuid;

use sanblk_proto::map::Extent;

use crate::store::Store;

/// Alignment of I/O buffers, offsets and lengths for O_DIRECT (safe for 512e and 4Kn devices).
pub const DIRECT_ALIGN: usize = 4096;

/// A zero-initialised heap buffer aligned to [`DIRECT_ALIGN`], usable for O_DIRECT.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); no interior sharing.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give `&[u8]`, which is Sync.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes (the allocation is rounded up to a multiple of 4096).
    pub fn zeroed(len: usize) -> io::Result<AlignedBuf> {
        let capacity = len
            .max(1)
            .checked_next_multiple_of(DIRECT_ALIGN)
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "buffer too large"))?;
        let layout = Layout::from_size_align(capacity, DIRECT_ALIGN)
            .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e))?;
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw)
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "allocation failed"))?;
        Ok(AlignedBuf { ptr, len, layout })
    }

    /// This buffer resized to `len` bytes if its allocation holds them, else a new zeroed one.
    /// The contents are unspecified (earlier data or zeroes): callers fill all of it.
    pub fn reused_for(mut self, len: usize) -> io::Result<AlignedBuf> {
        if len <= self.layout.size() {
            self.len = len;
            Ok(self)
        } else {
            AlignedBuf::zeroed(len)
        }
    }
}

/// Smallest buffer class of [`BufferPool`]; classes double up to [`POOL_MAX_BUFFER`].
const POOL_MIN_BUFFER: usize = DIRECT_ALIGN;
/// Largest pooled buffer (one frame payload).
pub const POOL_MAX_BUFFER: usize = 1 << 20;
/// Free buffers kept per class.
const POOL_KEEP_PER_CLASS: usize = 64;

/// Reuses I/O buffers: a fresh 1 MiB allocation is an mmap, 256 page faults, zeroing and an
/// munmap, which cost about a fifth of the CPU of a sequential stream.
pub struct BufferPool {
    classes: Vec<Mutex<Vec<AlignedBuf>>>,
}

impl Default for BufferPool {
    fn default() -> Self {
        let mut classes = Vec::new();
        let mut size = POOL_MIN_BUFFER;
        while size <= POOL_MAX_BUFFER {
            classes.push(Mutex::new(Vec::new()));
            size *= 2;
        }
        BufferPool { classes }
    }
}

impl BufferPool {
    fn class(len: usize) -> Option<(usize, usize)> {
        let size = len.max(POOL_MIN_BUFFER).checked_next_power_of_two()?;
        (size <= POOL_MAX_BUFFER)
            .then(|| ((size / POOL_MIN_BUFFER).trailing_zeros() as usize, size))
    }

    /// A buffer of `len` bytes (contents unspecified: previously used data or zeroes; callers
    /// fill it completely before exposing it).
    pub fn get(self: &Arc<Self>, len: usize) -> io::Result<PooledBuf> {
        let Some((class, size)) = BufferPool::class(len) else {
            return Ok(PooledBuf {
                buf: Some(AlignedBuf::zeroed(len)?),
                pool: None,
            });
        };
        let reused = self
            .classes
            .get(class)
            .and_then(|free| free.lock().unwrap_or_else(|p| p.into_inner()).pop());
        let mut buf = match reused {
            Some(buf) => buf,
            None => AlignedBuf::zeroed(size)?,
        };
        buf.len = len;
        Ok(PooledBuf {
            buf: Some(buf),
            pool: Some((self.clone(), class)),
        })
    }
}

/// A buffer from a [`BufferPool`], returned to it when dropped.
pub struct PooledBuf {
    buf: Option<AlignedBuf>,
    pool: Option<(Arc<BufferPool>, usize)>,
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or(&[])
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let (Some(buf), Some((pool, class))) = (self.buf.take(), self.pool.take()) {
            if let Some(free) = pool.classes.get(class) {
                let mut free = free.lock().unwrap_or_else(|p| p.into_inner());
                if free.len() < POOL_KEEP_PER_CLASS {
                    free.push(buf);
                }
            }
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size() >= len` initialised (zeroed) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout, freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// One opened SAN device.
pub struct DeviceFile {
    pub uuid: Uuid,
    pub path: String,
    /// O_DIRECT handle; `None` when the filesystem refuses O_DIRECT (tmpfs).
    direct: Option<File>,
    /// Page-cache handle for I/O that is not 4096-aligned (fsync covers both handles: it is
    /// per inode / per block device).
    buffered: File,
    /// Pool state "online" when opened.
    online: bool,
    /// An I/O on this device failed since it was opened: prefer other replicas for reads.
    failed: AtomicBool,
}

fn aligned(buf: &[u8], offset: u64) -> bool {
    offset.is_multiple_of(DIRECT_ALIGN as u64)
        && buf.len().is_multiple_of(DIRECT_ALIGN)
        && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
}

impl DeviceFile {
    fn open(uuid: Uuid, path: &str, online: bool) -> io::Result<DeviceFile> {
        let buffered = OpenOptions::new().read(true).write(true).open(path)?;
        let direct = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(file) => Some(file),
            Err(error) => {
                warn!("{path}: no O_DIRECT ({error}); using the page cache");
                None
            }
        };
        Ok(DeviceFile {
            uuid,
            path: path.to_string(),
            direct,
            buffered,
            online,
            failed: AtomicBool::new(false),
        })
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = self.direct.as_ref().filter(|_| aligned(buf, offset)) {
            match direct.read_exact_at(buf, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        self.buffered.read_exact_at(buf, offset)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = self.direct.as_ref().filter(|_| aligned(buf, offset)) {
            match direct.write_all_at(buf, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        self.buffered.write_all_at(buf, offset)
    }

    /// Makes completed writes (through either handle) durable.
    pub fn sync(&self) -> io::Result<()> {
        self.buffered.sync_data()
    }

    /// Marks the device failed on an error; returns what failed the first time.
    fn note(&self, result: &io::Result<()>, what: &str, offset: u64) -> Option<String> {
        let Err(error) = result else { return None };
        if self.failed.swap(true, Ordering::Relaxed) {
            return None;
        }
        warn!(
            "device {} ({}): {what} at {offset} failed: {error}",
            self.uuid, self.path
        );
        Some(format!("{what} at byte {offset} failed: {error}"))
    }
}

/// The first I/O error a device table saw on a device (see
/// [`DeviceTable::reporting_failures`]).
#[derive(Debug, Clone)]
pub struct DeviceFailure {
    pub device: Uuid,
    pub error: String,
}

/// Opened device files by UUID, opened on first use from the pool records.
pub struct DeviceTable {
    store: Arc<Store>,
    open: Mutex<HashMap<Uuid, Arc<DeviceFile>>>,
    /// Where the first error on each device is sent, if anywhere.
    failures: Option<mpsc::UnboundedSender<DeviceFailure>>,
}

impl DeviceTable {
    pub fn new(store: Arc<Store>) -> DeviceTable {
        DeviceTable {
            store,
            open: Mutex::new(HashMap::new()),
            failures: None,
        }
    }

    /// A table that sends the first I/O error of each device it opened to `failures` (the
    /// server's own path failing is what declares a device failed).
    pub fn reporting_failures(
        store: Arc<Store>,
        failures: mpsc::UnboundedSender<DeviceFailure>,
    ) -> DeviceTable {
        DeviceTable {
            failures: Some(failures),
            ..DeviceTable::new(store)
        }
    }

    fn note(&self, device: &DeviceFile, result: &io::Result<()>, what: &str, offset: u64) {
        if let (Some(error), Some(failures)) = (device.note(result, what, offset), &self.failures) {
            // The receiver goes away only when the server stops.
            let _ = failures.send(DeviceFailure {
                device: device.uuid,
                error,
            });
        }
    }

    /// Reads one block at each of `offsets` of device `uuid`, opened afresh (so a path that
    /// disappeared fails too) and past the page cache: whether the server can still read the
    /// device where a volume has data (blocking).
    pub fn probe(store: Arc<Store>, uuid: Uuid, offsets: &[u64]) -> io::Result<()> {
        let device = DeviceTable::new(store).get(uuid)?;
        let mut block = AlignedBuf::zeroed(DIRECT_ALIGN)?;
        for &offset in offsets {
            device
                .read_at(&mut block, offset)
                .map_err(|e| io::Error::new(e.kind(), format!("read at byte {offset}: {e}")))?;
        }
        Ok(())
    }

    fn table(&self) -> MutexGuard<'_, HashMap<Uuid, Arc<DeviceFile>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The opened device (blocking: may read the store and open a file).
    pub fn get(&self, uuid: Uuid) -> io::Result<Arc<DeviceFile>> {
        if let Some(file) = self.table().get(&uuid) {
            return Ok(file.clone());
        }
        let devices = self.store.devices().map_err(io::Error::other)?;
        let record = devices
            .into_iter()
            .find(|d| d.uuid == uuid)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("device {uuid} not in pool"),
                )
            })?;
        let file = Arc::new(DeviceFile::open(
            uuid,
            &record.path,
            record.state == "online",
        )?);
        info!("server I/O path opened device {uuid} at {}", record.path);
        Ok(self.table().entry(uuid).or_insert(file).clone())
    }
}

/// One piece of a request: the part inside one extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Offset of the piece in the request buffer.
    pub buffer_offset: usize,
    pub length: usize,
    /// (device, device offset) of every copy.
    pub replicas: Vec<(Uuid, u64)>,
}

/// Splits `[offset, offset + length)` at extent boundaries (and, in striped extents, at
/// stripe-unit boundaries). `None` if the extents do not cover the whole range.
pub fn plan(extents: &[Extent], offset: u64, length: u64) -> Option<Vec<Piece>> {
    let end = offset.checked_add(length)?;
    let mut pieces = Vec::new();
    let mut at = offset;
    let mut index = extents.partition_point(|e| e.volume_offset + e.length <= offset);
    while at < end {
        let extent = extents.get(index)?;
        if extent.volume_offset > at {
            return None;
        }
        let (replicas, run) = extent.locate(at - extent.volume_offset)?;
        let piece_end = end.min(at + run);
        pieces.push(Piece {
            buffer_offset: usize::try_from(at - offset).ok()?,
            length: usize::try_from(piece_end - at).ok()?,
            replicas: replicas
                .iter()
                .map(|r| (r.device_uuid, r.device_offset))
                .collect(),
        });
        at = piece_end;
        if at == extent.volume_offset + extent.length {
            index += 1;
        }
    }
    Some(pieces)
}

impl DeviceTable {
    /// Reads every piece from the first healthy replica, falling back to the others.
    pub fn read(&self, pieces: &[Piece], buf: &mut [u8]) -> io::Result<()> {
        for piece in pieces {
            let target = buf
                .get_mut(piece.buffer_offset..piece.buffer_offset + piece.length)
                .ok_or_else(|| io::Error::other("piece outside the buffer"))?;
            let mut candidates = Vec::with_capacity(piece.replicas.len());
            let mut last_error = None;
            for &(uuid, offset) in &piece.replicas {
                match self.get(uuid) {
                    Ok(device) => candidates.push((device, offset)),
                    Err(error) => {
                        warn!("device {uuid}: {error}");
                        last_error = Some(error);
                    }
                }
            }
            // Healthy first: online in the pool and no failure seen here.
            candidates.sort_by_key(|(d, _)| (d.failed.load(Ordering::Relaxed), !d.online));
            let mut done = false;
            for (device, offset) in candidates {
                let result = device.read_at(target, offset);
                self.note(&device, &result, "read", offset);
                match result {
                    Ok(()) => {
                        done = true;
                        break;
                    }
                    Err(error) => last_error = Some(error),
                }
            }
            if !done {
                return Err(last_error.unwrap_or_else(|| io::Error::other("no replica")));
            }
        }
        Ok(())
    }

    /// Writes every piece to all of its replicas (the copies of a mirrored piece in parallel);
    /// with `fua`, syncs the written devices. Fails if any replica fails (no partial mirror
    /// write is reported as success).
    pub fn write(&self, pieces: &[Piece], buf: &[u8], fua: bool) -> io::Result<()> {
        let mut touched: Vec<Arc<DeviceFile>> = Vec::new();
        for piece in pieces {
            let source = buf
                .get(piece.buffer_offset..piece.buffer_offset + piece.length)
                .ok_or_else(|| io::Error::other("piece outside the buffer"))?;
            let targets = piece
                .replicas
                .iter()
                .map(|&(uuid, offset)| Ok((self.get(uuid)?, offset)))
                .collect::<io::Result<Vec<_>>>()?;
            let write = |(device, offset): &(Arc<DeviceFile>, u64)| {
                let result = device.write_at(source, *offset);
                self.note(device, &result, "write", *offset);
                result
            };
            let results: Vec<io::Result<()>> = match targets.split_first() {
                None => Vec::new(),
                Some((first, [])) => vec![write(first)],
                Some((first, others)) => std::thread::scope(|scope| {
                    let spawned: Vec<_> = others
                        .iter()
                        .map(|target| scope.spawn(move || write(target)))
                        .collect();
                    let mut results = vec![write(first)];
                    results.extend(spawned.into_iter().map(|handle| {
                        handle
                            .join()
                            .unwrap_or_else(|_| Err(io::Error::other("replica writer panicked")))
                    }));
                    results
                }),
            };
            results.into_iter().collect::<io::Result<()>>()?;
            for (device, _) in targets {
                if !touched.iter().any(|d| d.uuid == device.uuid) {
                    touched.push(device);
                }
            }
        }
        if fua {
            for device in touched {
                let result = device.sync();
                self.note(&device, &result, "sync", 0);
                result?;
            }
        }
        Ok(())
    }

    /// Syncs every device holding part of `extents`.
    pub fn flush(&self, extents: &[Extent]) -> io::Result<()> {
        let mut uuids: Vec<Uuid> = extents
            .iter()
            .flat_map(|e| e.replicas.iter().map(|r| r.device_uuid))
            .collect();
        uuids.sort();
        uuids.dedup();
        for uuid in uuids {
            let device = self.get(uuid)?;
            let result = device.sync();
            self.note(&device, &result, "sync", 0);
            result?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sanblk_proto::map::Replica;

    fn replicas(devices: &[(u128, u64)]) -> Vec<Replica> {
        devices
            .iter()
            .map(|&(uuid, device_offset)| Replica {
                device_uuid: Uuid::from_u128(uuid),
                device_offset,
            })
            .collect()
    }

    fn extent(volume_offset: u64, length: u64, devices: &[(u128, u64)]) -> Extent {
        Extent::replicated(volume_offset, length, replicas(devices))
    }

    #[test]
    fn striped_requests_split_at_stripe_units() {
        let unit = 64 << 10;
        let extents = vec![
            Extent::striped(0, 4 * unit, unit, replicas(&[(1, 1 << 20), (2, 2 << 20)])),
            extent(4 * unit, unit, &[(3, 0)]),
        ];
        // From the middle of chunk 1 (member 2, first unit) to the start of the linear tail.
        let pieces = plan(&extents, unit + 4096, 3 * unit).unwrap_or_default();
        let expected = vec![
            (0, unit as usize - 4096, (2, (2 << 20) + 4096)),
            (unit as usize - 4096, unit as usize, (1, (1 << 20) + unit)),
            (
                2 * unit as usize - 4096,
                unit as usize,
                (2, (2 << 20) + unit),
            ),
            (3 * unit as usize - 4096, 4096, (3, 0)),
        ];
        let expected: Vec<Piece> = expected
            .into_iter()
            .map(|(buffer_offset, length, (device, offset))| Piece {
                buffer_offset,
                length,
                replicas: vec![(Uuid::from_u128(device), offset)],
            })
            .collect();
        assert_eq!(pieces, expected);
    }

    #[test]
    fn requests_split_at_extent_boundaries() {
        let extents = vec![
            extent(0, 1 << 20, &[(1, 1 << 20)]),
            extent(1 << 20, 1 << 20, &[(2, 4 << 20), (3, 8 << 20)]),
        ];
        let pieces = plan(&extents, (1 << 20) - 4096, 8192).unwrap_or_default();
        assert_eq!(
            pieces,
            vec![
                Piece {
                    buffer_offset: 0,
                    length: 4096,
                    replicas: vec![(Uuid::from_u128(1), (2 << 20) - 4096)],
                },
                Piece {
                    buffer_offset: 4096,
                    length: 4096,
                    replicas: vec![(Uuid::from_u128(2), 4 << 20), (Uuid::from_u128(3), 8 << 20)],
                },
            ]
        );
        assert_eq!(plan(&extents, 2 << 20, 512), None);
        assert_eq!(plan(&extents, (2 << 20) - 512, 1024), None);
        assert_eq!(plan(&extents, 512, 512).map(|p| p.len()), Some(1));
    }

    #[test]
    fn pooled_buffers_are_reused_by_size_class() {
        let pool = Arc::new(BufferPool::default());
        let first = pool.get(5000).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(first.len(), 5000);
        let address = first.as_ptr();
        drop(first);
        let second = pool.get(8192).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((second.len(), second.as_ptr()), (8192, address));
        let big = pool.get(POOL_MAX_BUFFER).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(big.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(
            pool.get(POOL_MAX_BUFFER + 1).map(|b| b.len()).ok(),
            Some(POOL_MAX_BUFFER + 1)
        );
    }

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        let buf = AlignedBuf::zeroed(5000).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(buf.len(), 5000);
        assert_eq!(buf.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert!(buf.iter().all(|&b| b == 0));
    }
}
