// SPDX-License-Identifier: GPL-2.0

//! Writes waiting for the volume's copier thread to preserve the chunks they are the first
//! to touch since the snapshot (see `copier.rs`). submit_bio only queues them and wakes the
//! thread; the queue holds one in-flight reference while it is not empty, so a QUIESCE (or
//! the volume's teardown) waits for them as for any I/O.

use core::sync::atomic::{AtomicU64, Ordering};
use kernel::new_spinlock;
use kernel::prelude::*;
use kernel::sync::{Arc, SpinLock};

use crate::ffi::bio::{Bio, BioList};
use crate::ffi::kthread::Kthread;
use crate::ffi::sync::{InFlight, InFlightRef, LockClass, WaitQueue};

struct Waiting {
    bios: BioList,
    /// Held while `bios` is not empty.
    inflight: Option<InFlightRef>,
}

#[pin_data]
pub(crate) struct CopyQueue {
    #[pin]
    waiting: SpinLock<Waiting>,
    thread: Kthread,
    /// Where the thread sleeps while the queue is empty.
    #[pin]
    pub(crate) wakeup: WaitQueue,
    /// Chunks the thread preserved (STATUS).
    preserved: AtomicU64,
}

static WAKEUP_CLASS: LockClass = LockClass::new();

impl CopyQueue {
    pub(crate) fn new() -> impl PinInit<Self> {
        pin_init!(CopyQueue {
            waiting <- new_spinlock!(
                Waiting {
                    bios: BioList::new(),
                    inflight: None,
                },
                "sanblk_copy_queue"
            ),
            thread: Kthread::new(),
            wakeup <- WaitQueue::new(kernel::c_str!("sanblk_copy_wakeup"), &WAKEUP_CLASS),
            preserved: AtomicU64::new(0),
        })
    }

    /// Starts the volume's copier thread, `run(&data)`, named after the volume's `index`.
    pub(crate) fn start<T: Send + Sync>(&self, data: Arc<T>, run: fn(&T), index: u32) -> Result {
        self.thread.start(data, run, c"sanblk%u-cow", index)
    }

    /// Stops the thread (after the volume's in-flight I/O, the queue included, is done).
    pub(crate) fn stop(&self) {
        self.thread.stop();
    }

    /// Queues a write for the thread (process context, from submit_bio: nothing waits).
    pub(crate) fn push(&self, bio: Bio, inflight: &InFlight) {
        {
            let mut waiting = self.waiting.lock();
            if waiting.inflight.is_none() {
                waiting.inflight = Some(inflight.get());
            }
            waiting.bios.push(bio);
        }
        self.thread.wake();
    }

    /// The oldest queued write, with an in-flight reference the caller holds until it has
    /// passed the write on.
    pub(crate) fn pop(&self, inflight: &InFlight) -> Option<(Bio, InFlightRef)> {
        let mut waiting = self.waiting.lock();
        let bio = waiting.bios.pop()?;
        let held = if waiting.bios.len() == 0 {
            waiting.inflight.take()
        } else {
            None
        };
        Some((bio, held.unwrap_or_else(|| inflight.get())))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.waiting.lock().bios.len() == 0
    }

    pub(crate) fn count_preserved(&self) {
        self.preserved.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn preserved(&self) -> u64 {
        self.preserved.load(Ordering::Relaxed)
    }
}
