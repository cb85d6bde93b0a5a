// SPDX-License-Identifier: GPL-2.0

//! RCU read sections and an RCU-published `Arc`, wait queues, a count of in-flight I/O that
//! teardown waits on, set-once slots, and a lock-free list for handing work to a thread from
//! any context.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use kernel::bindings;
use kernel::ffi::c_long;
use kernel::prelude::*;
use kernel::str::CStr;
use kernel::sync::{Arc, ArcBorrow};
use kernel::types::Opaque;

use super::helpers::{
    rust_helper_rcu_read_lock, rust_helper_rcu_read_unlock, rust_helper_wq_has_sleeper,
};

/// A lockdep class; each kind of lock (a wait queue of one role, a disk) has its own static.
pub(crate) struct LockClass(Opaque<bindings::lock_class_key>);

// SAFETY: lockdep keys are designed for concurrent use and synchronise internally.
unsafe impl Sync for LockClass {}

impl LockClass {
    pub(crate) const fn new() -> Self {
        LockClass(Opaque::uninit())
    }

    pub(crate) fn as_ptr(&'static self) -> *mut bindings::lock_class_key {
        self.0.get()
    }
}

/// An RCU read-side critical section, closed on drop; no sleeping inside.
pub(crate) struct RcuReadGuard(());

impl RcuReadGuard {
    pub(crate) fn new() -> Self {
        // SAFETY: opens a read section, closed by drop; callable from any context.
        unsafe { rust_helper_rcu_read_lock() };
        RcuReadGuard(())
    }
}

impl Drop for RcuReadGuard {
    fn drop(&mut self) {
        // SAFETY: closes the section opened in `new`.
        unsafe { rust_helper_rcu_read_unlock() };
    }
}

/// Waits for every RCU read section in progress to end (process context).
pub(crate) fn synchronize_rcu() {
    // SAFETY: callers are in process context and hold no spinlock (may sleep).
    unsafe { bindings::synchronize_rcu() };
}

/// Task states for [`WaitQueue::wait_until`].
pub(crate) const TASK_INTERRUPTIBLE: u32 = bindings::TASK_INTERRUPTIBLE;
/// Uninterruptible without counting as load or as a hung task (teardown waits bounded by the
/// server path's I/O timeout, which may be longer than the hung-task period).
pub(crate) const TASK_IDLE: u32 = bindings::TASK_IDLE;

/// A borrowed `wait_queue_head` (one of ours, or a socket's).
#[repr(transparent)]
pub(crate) struct WaitHead(Opaque<bindings::wait_queue_head>);

impl WaitHead {
    /// # Safety
    ///
    /// `ptr` is an initialised wait queue head that outlives `'a`.
    pub(crate) unsafe fn from_raw<'a>(ptr: *mut bindings::wait_queue_head) -> &'a WaitHead {
        // SAFETY: transparent wrapper; liveness is the caller's contract.
        unsafe { &*ptr.cast::<WaitHead>() }
    }

    fn as_ptr(&self) -> *mut bindings::wait_queue_head {
        self.0.get()
    }

    /// Wakes every waiter; callable from any context (hard-IRQ included).
    pub(crate) fn wake_all(&self) {
        // SAFETY: an initialised head (type invariant); __wake_up takes its lock irqsave.
        unsafe {
            bindings::__wake_up(
                self.as_ptr(),
                bindings::TASK_NORMAL,
                0,
                core::ptr::null_mut(),
            )
        };
    }

    /// [`WaitHead::wake_all`] only if someone waits: a full barrier orders the caller's
    /// earlier store (the condition) before the check, pairing with the waiter's queueing
    /// before it tests the condition, so the lock of an empty queue is not taken.
    pub(crate) fn wake_all_if_waiting(&self) {
        // SAFETY: an initialised head (type invariant); wq_has_sleeper only reads it.
        if unsafe { rust_helper_wq_has_sleeper(self.as_ptr()) } {
            self.wake_all();
        }
    }
}

/// Sleeps in `state` until `cond()` holds, or for at most `timeout` jiffies (`None`: no
/// limit), on every head of `heads` at once (as poll(2) waits on several queues), so a
/// wake-up on any of them, or `wake_up_process` of this task, re-checks `cond`. Returns the
/// last `cond()`. The state is set before each check, so a wake-up in between is not lost.
/// `heads` holds one or two heads (the task state is set by queueing on them).
pub(crate) fn wait_until(
    heads: &[&WaitHead],
    state: u32,
    timeout: Option<c_long>,
    mut cond: impl FnMut() -> bool,
) -> bool {
    const MAX_HEADS: usize = 2;
    let heads = &heads[..heads.len().min(MAX_HEADS)];
    // SAFETY: all-zero entries are what init_wait starts from.
    let mut entries: [bindings::wait_queue_entry; MAX_HEADS] = unsafe { core::mem::zeroed() };
    for entry in entries.iter_mut() {
        // SAFETY: the entry is ours and stays in place (not moved) until `finish_wait` below.
        unsafe { bindings::init_wait(entry) };
    }
    let mut left = timeout.unwrap_or(c_long::MAX);
    let result = loop {
        for (head, entry) in heads.iter().zip(entries.iter_mut()) {
            // SAFETY: a live head; the entry is removed by finish_wait before it goes away.
            unsafe { bindings::prepare_to_wait(head.as_ptr(), entry, state as i32) };
        }
        if cond() {
            break true;
        }
        if left <= 0 {
            break false;
        }
        // SAFETY: process context, no spinlock held (callers' contract for waiting).
        left = unsafe { bindings::schedule_timeout(left) };
    };
    for (head, entry) in heads.iter().zip(entries.iter_mut()) {
        // SAFETY: undoes prepare_to_wait: the task runs, the entry is off the queue.
        unsafe { bindings::finish_wait(head.as_ptr(), entry) };
    }
    result
}

/// A wait queue of our own.
#[pin_data]
pub(crate) struct WaitQueue {
    #[pin]
    head: Opaque<bindings::wait_queue_head>,
}

// SAFETY: a wait queue head is designed for concurrent use from any context (its own lock).
unsafe impl Send for WaitQueue {}
// SAFETY: see `Send`.
unsafe impl Sync for WaitQueue {}

impl WaitQueue {
    pub(crate) fn new(name: &'static CStr, class: &'static LockClass) -> impl PinInit<Self> {
        pin_init!(WaitQueue {
            // SAFETY: initialises the head in place; it is pinned and never moved.
            head <- Opaque::ffi_init(|slot| unsafe {
                bindings::__init_waitqueue_head(slot, name.as_char_ptr(), class.as_ptr())
            }),
        })
    }
}

impl core::ops::Deref for WaitQueue {
    type Target = WaitHead;

    fn deref(&self) -> &WaitHead {
        // SAFETY: initialised in `new`, lives as long as `self`.
        unsafe { WaitHead::from_raw(self.head.get()) }
    }
}

/// I/O in flight, counted by [`InFlightRef`]s, which wake [`InFlight::wait_idle`] when the
/// last goes.
#[pin_data(PinnedDrop)]
pub(crate) struct InFlight {
    count: AtomicU64,
    #[pin]
    idle: WaitQueue,
}

static INFLIGHT_CLASS: LockClass = LockClass::new();

impl InFlight {
    pub(crate) fn new() -> impl PinInit<Self> {
        pin_init!(InFlight {
            count: AtomicU64::new(0),
            idle <- WaitQueue::new(kernel::c_str!("sanblk_inflight"), &INFLIGHT_CLASS),
        })
    }

    /// One more I/O in flight, until the result is dropped.
    pub(crate) fn get(&self) -> InFlightRef {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlightRef(NonNull::from(self))
    }

    /// Waits up to `timeout` jiffies until nothing is in flight (process context, no locks
    /// held; the caller keeps the owner alive); returns whether it got there.
    pub(crate) fn wait_idle_timeout(&self, timeout: c_long) -> bool {
        wait_until(&[&self.idle], TASK_IDLE, Some(timeout), || {
            self.count.load(Ordering::SeqCst) == 0
        })
    }

    /// Waits until nothing is in flight (process context, no locks held).
    pub(crate) fn wait_idle(&self) {
        wait_until(&[&self.idle], TASK_IDLE, None, || {
            self.count.load(Ordering::Acquire) == 0
        });
        // The last reference wakes us from an RCU read section: once that section is over,
        // nothing touches `self` any more and its owner may free it.
        synchronize_rcu();
    }
}

#[pinned_drop]
impl PinnedDrop for InFlight {
    fn drop(self: Pin<&mut Self>) {
        // References point here: none may outlive the count (normally drained already).
        if self.count.load(Ordering::Acquire) != 0 {
            self.wait_idle();
        }
    }
}

/// One I/O in flight of an [`InFlight`]; dropped when the I/O is done (any context).
pub(crate) struct InFlightRef(NonNull<InFlight>);

// SAFETY: the count is atomic and the wake-up callable from any context.
unsafe impl Send for InFlightRef {}
// SAFETY: see `Send`.
unsafe impl Sync for InFlightRef {}

impl Drop for InFlightRef {
    fn drop(&mut self) {
        let _rcu = RcuReadGuard::new();
        // SAFETY: the count outlives its references: its drop waits for them, as does its
        // owner's teardown (`wait_idle`, which also waits for this read section).
        let inflight = unsafe { self.0.as_ref() };
        if inflight.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Every submission takes and drops a reference (see `remap::submit_unless_held`):
            // an idle volume must not take the wait queue's lock for each.
            inflight.idle.wake_all_if_waiting();
        }
    }
}

/// A node of an [`AtomicList`]; embedded first in the element it links.
#[repr(C)]
pub(crate) struct ListNode {
    /// The next node (owned lists, such as a FIFO, link through it too).
    pub(crate) next: *mut ListNode,
}

impl ListNode {
    pub(crate) const fn new() -> Self {
        ListNode {
            next: core::ptr::null_mut(),
        }
    }
}

/// A lock-free list of nodes (the kernel's llist): pushed from any context, taken whole by
/// one consumer.
pub(crate) struct AtomicList {
    first: AtomicPtr<ListNode>,
}

impl AtomicList {
    pub(crate) const fn new() -> Self {
        AtomicList {
            first: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// Pushes `node`; returns whether the list was empty.
    ///
    /// # Safety
    ///
    /// `node` is live, on no list, and stays live until the consumer takes it.
    pub(crate) unsafe fn push(&self, node: *mut ListNode) -> bool {
        let mut first = self.first.load(Ordering::Relaxed);
        loop {
            // SAFETY: `node` is ours until it is published by the exchange below.
            unsafe { (*node).next = first };
            match self.first.compare_exchange_weak(
                first,
                node,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return first.is_null(),
                Err(current) => first = current,
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.first.load(Ordering::Acquire).is_null()
    }

    /// Takes every node, oldest first (they were pushed newest first).
    pub(crate) fn take_all(&self) -> TakenNodes {
        let mut node = self.first.swap(core::ptr::null_mut(), Ordering::Acquire);
        let mut reversed: *mut ListNode = core::ptr::null_mut();
        while !node.is_null() {
            // SAFETY: detached nodes are the consumer's (push's contract keeps them live).
            unsafe {
                let next = (*node).next;
                (*node).next = reversed;
                reversed = node;
                node = next;
            }
        }
        TakenNodes(reversed)
    }
}

/// Nodes taken off an [`AtomicList`], in push order.
pub(crate) struct TakenNodes(*mut ListNode);

impl Iterator for TakenNodes {
    type Item = *mut ListNode;

    fn next(&mut self) -> Option<*mut ListNode> {
        let node = self.0;
        if node.is_null() {
            return None;
        }
        // SAFETY: a taken node is live and ours (see `take_all`); read before it is handed out.
        self.0 = unsafe { (*node).next };
        Some(node)
    }
}

/// An `Arc<T>` published for RCU readers: read inside a read section without touching a
/// reference count (the hot path), replaced at any time, the old value handed back once no
/// reader can see it any more.
pub(crate) struct RcuArc<T> {
    ptr: AtomicPtr<T>,
}

// SAFETY: it is an `Arc<T>` shared between threads.
unsafe impl<T: Send + Sync> Send for RcuArc<T> {}
// SAFETY: see `Send`.
unsafe impl<T: Send + Sync> Sync for RcuArc<T> {}

impl<T> RcuArc<T> {
    pub(crate) fn new(value: Arc<T>) -> Self {
        RcuArc {
            ptr: AtomicPtr::new(Arc::into_raw(value).cast_mut()),
        }
    }

    /// Runs `f` on the current value inside an RCU read section: `f` must not sleep.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        let _rcu = RcuReadGuard::new();
        // SAFETY: the pointer always holds an `Arc` reference; a replaced value is released
        // only after a grace period (`replace`), so it outlives this read section.
        f(unsafe { &*self.ptr.load(Ordering::Acquire) })
    }

    /// The current value, as a reference the caller may keep.
    pub(crate) fn get(&self) -> Arc<T> {
        // SAFETY: a value read in the section is live (see `read`); the reference taken here
        // is a new one, the published one stays owned by the pointer.
        self.read(|value| unsafe { ArcBorrow::from_raw(core::ptr::from_ref(value)) }.into())
    }

    /// Publishes `value` and returns the value it replaces, once every read section that
    /// could see it has ended (process context: waits for a grace period).
    pub(crate) fn replace(&self, value: Arc<T>) -> Arc<T> {
        let old = self
            .ptr
            .swap(Arc::into_raw(value).cast_mut(), Ordering::AcqRel);
        synchronize_rcu();
        // SAFETY: `old` held the pointer's reference, and no reader can reach it any more.
        unsafe { Arc::from_raw(old) }
    }
}

impl<T> Drop for RcuArc<T> {
    fn drop(&mut self) {
        // SAFETY: the published reference; no reader is left (`&mut self`).
        drop(unsafe { Arc::from_raw(self.ptr.load(Ordering::Acquire)) });
    }
}

/// `N` slots, each filled at most once and read without locks until the whole goes away
/// (a value stays valid for as long as `&self` is).
pub(crate) struct OnceSlots<T, const N: usize> {
    slots: [AtomicPtr<T>; N],
}

// SAFETY: the values are shared between threads and dropped with the whole.
unsafe impl<T: Send + Sync, const N: usize> Send for OnceSlots<T, N> {}
// SAFETY: see `Send`.
unsafe impl<T: Send + Sync, const N: usize> Sync for OnceSlots<T, N> {}

impl<T, const N: usize> OnceSlots<T, N> {
    pub(crate) fn new() -> Self {
        OnceSlots {
            slots: [const { AtomicPtr::new(core::ptr::null_mut()) }; N],
        }
    }

    pub(crate) fn get(&self, slot: usize) -> Option<&T> {
        let ptr = self.slots.get(slot)?.load(Ordering::Acquire);
        // SAFETY: a non-null slot points to a value boxed by `insert`, freed only in drop.
        unsafe { ptr.as_ref() }
    }

    /// Puts `value` in the first free slot and returns its index (`ENOSPC`: all taken).
    pub(crate) fn insert(&self, value: T) -> Result<usize> {
        let boxed = KBox::into_raw(KBox::new(value, GFP_KERNEL)?);
        for (i, slot) in self.slots.iter().enumerate() {
            let claimed = slot.compare_exchange(
                core::ptr::null_mut(),
                boxed,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            if claimed.is_ok() {
                return Ok(i);
            }
        }
        // SAFETY: boxed above and published nowhere.
        drop(unsafe { KBox::from_raw(boxed) });
        Err(ENOSPC)
    }
}

impl<T, const N: usize> Drop for OnceSlots<T, N> {
    fn drop(&mut self) {
        for slot in self.slots.iter() {
            let ptr = slot.swap(core::ptr::null_mut(), Ordering::AcqRel);
            if !ptr.is_null() {
                // SAFETY: boxed by `insert`; nothing borrows the slots any more (`&mut self`).
                drop(unsafe { KBox::from_raw(ptr) });
            }
        }
    }
}
