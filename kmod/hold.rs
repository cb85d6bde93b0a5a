// SPDX-License-Identifier: GPL-2.0

//! The hold queue of a volume: while a configuration change has quiesced the volume, or its
//! lease has lapsed without renewal, new bios are neither mapped nor failed but parked here
//! (as dm parks bios of a suspended device), and re-submitted through the normal path once
//! the hold ends, so they are mapped with the map current then. A bio held longer than the
//! volume's I/O timeout fails with an I/O error, so nothing waits forever.
//!
//! Races: the hold state is checked and a bio parked under one spinlock, and the state is
//! cleared and the parked bios taken under the same lock, so no bio is parked after the
//! last release. QUIESCE needs more: every submission that saw "not held" must have taken
//! its in-flight references before QUIESCE starts waiting for the in-flight count. A
//! submission takes an in-flight reference of its own before it checks the state (see
//! `remap::submit_bio`), and QUIESCE sets the state before it reads the count, each followed
//! by a full barrier: at least one side sees the other, as in the store-buffering pattern.
//!
//! Arrival times: a bio has no field of ours to stamp, and nothing may be allocated for it
//! here without the risk of failing it, so held bios are kept in a small ring of batches,
//! each covering at most a quarter of the I/O timeout and stamped with its latest arrival:
//! a batch fails once its newest bio has waited the timeout, so a bio fails after at least
//! the timeout and at most a quarter more (never early).

use core::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicU64, Ordering};
use kernel::new_spinlock;
use kernel::prelude::*;
use kernel::sync::SpinLock;

use crate::abi::{hold_reason, Attr, Command, EventKind};
use crate::ffi::bio::{Bio, BioList};
use crate::ffi::consts::{BLK_STS_AGAIN, BLK_STS_IOERR, REQ_NOWAIT};
use crate::ffi::genl::Event;
use crate::ffi::sync::{InFlight, InFlightRef};

const NS_PER_MS: i64 = 1_000_000;
/// Batches of held bios at once: with batches of a quarter of the timeout, at most six are
/// alive; if the ring is full anyway (the thread was held up), the newest batch grows.
const BATCHES: usize = 8;
/// Longest the volume's thread sleeps while it watches over the hold (lease lapse reports,
/// timeouts).
const MAX_SLEEP_MS: i64 = 1_000;

/// Held bios that arrived within one stretch of time.
struct Batch {
    bios: BioList,
    /// When the first bio of the batch arrived (ktime ns): the batch takes bios for a
    /// quarter of the timeout from then on.
    first_ns: i64,
    /// When the newest arrived: the batch fails once that is a whole timeout ago.
    last_ns: i64,
}

/// The ring of batches, oldest first.
struct Batches {
    ring: [Batch; BATCHES],
    start: usize,
    count: usize,
}

impl Batches {
    fn new() -> Self {
        Batches {
            ring: core::array::from_fn(|_| Batch {
                bios: BioList::new(),
                first_ns: 0,
                last_ns: 0,
            }),
            start: 0,
            count: 0,
        }
    }

    fn push(&mut self, bio: Bio, now: i64, stretch_ns: i64) {
        let newest = (self.start + self.count + BATCHES - 1) % BATCHES;
        if self.count == 0
            || (now - self.ring[newest].first_ns >= stretch_ns && self.count < BATCHES)
        {
            let slot = (self.start + self.count) % BATCHES;
            self.ring[slot].first_ns = now;
            self.ring[slot].last_ns = now;
            self.ring[slot].bios.push(bio);
            self.count += 1;
        } else {
            self.ring[newest].last_ns = now;
            self.ring[newest].bios.push(bio);
        }
    }

    /// The oldest batch's bios, if it arrived no later than `before`.
    fn pop_older(&mut self, before: i64) -> Option<BioList> {
        if self.count == 0 || self.ring[self.start].last_ns > before {
            return None;
        }
        let bios = core::mem::replace(&mut self.ring[self.start].bios, BioList::new());
        self.start = (self.start + 1) % BATCHES;
        self.count -= 1;
        Some(bios)
    }

    fn take_all(&mut self) -> BioList {
        let mut all = BioList::new();
        while let Some(mut bios) = self.pop_older(i64::MAX) {
            all.append(&mut bios);
        }
        all
    }

    fn oldest_last_ns(&self) -> Option<i64> {
        (self.count > 0).then(|| self.ring[self.start].last_ns)
    }
}

/// What [`Hold::try_hold`] did with a bio.
pub(crate) enum Held {
    /// Parked (or ended: BLK_STS_AGAIN if REQ_NOWAIT, an I/O error on teardown); `true`: the
    /// lease lapse is not reported yet, wake the volume's thread to report it.
    Parked(bool),
    /// The volume is not held: map and issue it.
    Go(Bio),
}

/// Bios released by RESUME or RENEW, with an in-flight reference that keeps the volume's
/// teardown waiting until they are all re-submitted (and so counted themselves).
pub(crate) struct Released {
    pub(crate) bios: BioList,
    _inflight: InFlightRef,
}

#[pin_data]
pub(crate) struct Hold {
    quiesced: AtomicBool,
    /// CLOCK_MONOTONIC ns at which the lease lapses; only ever moved later.
    lease_deadline: AtomicI64,
    io_timeout_ms: u32,
    /// LEASE_LAPSED was multicast for the current lapse.
    lapse_reported: AtomicBool,
    /// A submission found the lease lapsed and unreported: the thread reports it.
    kicked: AtomicBool,
    /// Teardown: nothing is parked (a bio that would be fails) and nothing is released.
    closed: AtomicBool,
    held: AtomicU64,
    timed_out: AtomicU64,
    #[pin]
    batches: SpinLock<Batches>,
}

impl Hold {
    pub(crate) fn new(lease_deadline: i64, io_timeout_ms: u32) -> impl PinInit<Self> {
        pin_init!(Hold {
            quiesced: AtomicBool::new(false),
            lease_deadline: AtomicI64::new(lease_deadline),
            io_timeout_ms,
            lapse_reported: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            held: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            batches <- new_spinlock!(Batches::new(), "sanblk_hold"),
        })
    }

    pub(crate) fn io_timeout_ms(&self) -> u32 {
        self.io_timeout_ms
    }

    fn timeout_ns(&self) -> i64 {
        i64::from(self.io_timeout_ms) * NS_PER_MS
    }

    pub(crate) fn lease_lapsed(&self, now: i64) -> bool {
        now >= self.lease_deadline.load(Ordering::Acquire)
    }

    pub(crate) fn is_quiesced(&self) -> bool {
        self.quiesced.load(Ordering::SeqCst)
    }

    fn held_at(&self, now: i64) -> bool {
        self.is_quiesced() || self.lease_lapsed(now)
    }

    /// [`hold_reason`] bits for STATUS.
    pub(crate) fn reason(&self, now: i64) -> u32 {
        let mut reason = 0;
        if self.is_quiesced() {
            reason |= hold_reason::QUIESCED;
        }
        if self.lease_lapsed(now) {
            reason |= hold_reason::LEASE_LAPSED;
        }
        reason
    }

    pub(crate) fn held_ios(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    pub(crate) fn timed_out_ios(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }

    pub(crate) fn lease_remaining_ms(&self, now: i64) -> u64 {
        let left = self.lease_deadline.load(Ordering::Acquire) - now;
        if left <= 0 {
            0
        } else {
            (left / NS_PER_MS) as u64
        }
    }

    /// Parks `bio` if the volume is held (any context that may submit a bio; never waits).
    /// The caller holds an in-flight reference taken before this call (see the module
    /// documentation).
    pub(crate) fn try_hold(&self, bio: Bio, now: i64) -> Held {
        // Pairs with the barrier in `quiesce`: the caller's in-flight reference is visible
        // to QUIESCE, or QUIESCE's state is visible here.
        fence(Ordering::SeqCst);
        if !self.held_at(now) {
            return Held::Go(bio);
        }
        if bio.has_flags(REQ_NOWAIT) {
            // As dm does for a suspended device: the submitter re-issues it from a context
            // that may wait, and that one is parked.
            bio.end_with(BLK_STS_AGAIN);
            return Held::Parked(false);
        }
        let mut batches = self.batches.lock();
        // Checked again under the lock that releases take: either the release sees this bio
        // on the list, or this sees the hold ended.
        if !self.held_at(now) {
            return Held::Go(bio);
        }
        if self.closed.load(Ordering::Acquire) {
            // Teardown: held I/O fails rather than slipping through a quiesce or a lapse.
            drop(batches);
            bio.end_with(BLK_STS_IOERR);
            return Held::Parked(false);
        }
        batches.push(bio, now, self.timeout_ns() / 4);
        self.held.fetch_add(1, Ordering::Relaxed);
        drop(batches);
        let unreported = self.lease_lapsed(now) && !self.lapse_reported.load(Ordering::Acquire);
        if unreported {
            self.kicked.store(true, Ordering::Release);
        }
        Held::Parked(unreported)
    }

    /// QUIESCE: new bios are held from now on.
    pub(crate) fn quiesce(&self) {
        let batches = self.batches.lock();
        self.quiesced.store(true, Ordering::SeqCst);
        drop(batches);
        // Pairs with the barrier in `try_hold`.
        fence(Ordering::SeqCst);
    }

    /// RESUME: ends the quiesce hold; `false` if the volume was not quiesced.
    pub(crate) fn resume(&self) -> bool {
        let _batches = self.batches.lock();
        self.quiesced.swap(false, Ordering::SeqCst)
    }

    /// RENEW: the lease lasts until `deadline` (ktime ns) if that is later than now.
    pub(crate) fn renew(&self, deadline: i64, now: i64) {
        let _batches = self.batches.lock();
        self.lease_deadline.fetch_max(deadline, Ordering::AcqRel);
        if deadline > now {
            // A later lapse is a new one and is reported again.
            self.lapse_reported.store(false, Ordering::Release);
        }
    }

    /// The held bios if the hold has ended, to re-submit through the normal path (process
    /// context). `None` while held, on teardown, or with nothing held.
    pub(crate) fn release(&self, inflight: &InFlight, now: i64) -> Option<Released> {
        let mut batches = self.batches.lock();
        if self.held_at(now) || self.closed.load(Ordering::Acquire) || batches.count == 0 {
            return None;
        }
        // Taken under the lock that teardown's `close` takes before it waits for in-flight
        // I/O: teardown waits for these bios to be re-submitted and to complete.
        let inflight = inflight.get();
        let bios = batches.take_all();
        self.held.fetch_sub(bios.len() as u64, Ordering::Relaxed);
        Some(Released {
            bios,
            _inflight: inflight,
        })
    }

    /// Teardown: held bios fail, and so does every bio that would be held from now on.
    pub(crate) fn close(&self) {
        let mut bios = {
            let mut batches = self.batches.lock();
            self.closed.store(true, Ordering::Release);
            batches.take_all()
        };
        self.held.fetch_sub(bios.len() as u64, Ordering::Relaxed);
        while let Some(bio) = bios.pop() {
            bio.end_with(BLK_STS_IOERR);
        }
    }

    /// Whether a submission asked the thread to report a lapse.
    pub(crate) fn kicked(&self) -> bool {
        self.kicked.load(Ordering::Acquire)
    }

    /// The volume's thread (process context, no locks): reports a lapse once, fails held
    /// bios older than the I/O timeout, and says how long it may sleep (ms).
    pub(crate) fn tick(&self, volume_id: u64, now: i64) -> i64 {
        self.kicked.store(false, Ordering::Release);
        if self.lease_lapsed(now) && !self.lapse_reported.swap(true, Ordering::AcqRel) {
            pr_warn!(
                "volume {}: lease lapsed without renewal; holding new I/O\n",
                volume_id
            );
            if multicast_lapse(volume_id).is_err() {
                pr_warn!("volume {}: cannot multicast the lease lapse\n", volume_id);
            }
        }
        loop {
            let expired = self.batches.lock().pop_older(now - self.timeout_ns());
            let Some(mut bios) = expired else {
                break;
            };
            let count = bios.len() as u64;
            self.held.fetch_sub(count, Ordering::Relaxed);
            self.timed_out.fetch_add(count, Ordering::Relaxed);
            pr_warn!(
                "volume {}: {} held I/O(s) failed after the I/O timeout of {} ms\n",
                volume_id,
                count,
                self.io_timeout_ms
            );
            while let Some(bio) = bios.pop() {
                bio.end_with(BLK_STS_IOERR);
            }
        }
        let mut sleep = MAX_SLEEP_MS * NS_PER_MS;
        if let Some(last) = self.batches.lock().oldest_last_ns() {
            sleep = sleep.min(last + self.timeout_ns() - now);
        }
        if !self.lapse_reported.load(Ordering::Acquire) {
            sleep = sleep.min(self.lease_deadline.load(Ordering::Acquire) - now);
        }
        // Rounded up, at least 1 ms: no busy loop around a deadline.
        (sleep / NS_PER_MS + 1).max(1)
    }
}

/// Multicasts LEASE_LAPSED for `volume_id` (process context).
fn multicast_lapse(volume_id: u64) -> Result {
    let mut event = Event::new(Command::Event as u8, 256)?;
    event.put_u32(Attr::EventKind as u16, EventKind::LeaseLapsed as u32)?;
    event.put_u64(Attr::VolumeId as u16, volume_id)?;
    event.send();
    Ok(())
}
