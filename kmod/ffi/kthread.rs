// SPDX-License-Identifier: GPL-2.0

//! A kernel thread that shares an `Arc` of its data with its owner, is woken from any
//! context, and is stopped (and waited for) by its owner.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicPtr, Ordering};
use kernel::bindings;
use kernel::prelude::*;
use kernel::sync::Arc;

use super::sync::{synchronize_rcu, RcuReadGuard};

/// The thread slot of an owner: empty, or a started thread until [`Kthread::stop`].
pub(crate) struct Kthread {
    task: AtomicPtr<bindings::task_struct>,
}

/// What the thread runs (normally until [`should_stop`]) and the data it runs with.
struct Start<T> {
    data: Arc<T>,
    run: fn(&T),
}

/// # Safety
///
/// Run by a thread `Kthread::start` created, with the `Start` it boxed as `arg`.
unsafe extern "C" fn thread_main<T: Send + Sync>(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Start` boxed by `Kthread::start` and handed over to this thread.
    let start = unsafe { KBox::from_raw(arg.cast::<Start<T>>()) };
    // The owner's task reference (see `start`) lets `stop` find the thread even if `run`
    // returned before it was asked to stop.
    (start.run)(&start.data);
    0
}

impl Kthread {
    pub(crate) const fn new() -> Self {
        Kthread {
            task: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// Starts `run(&data)` in a new thread named `name` (a format taking one number, `arg`).
    /// The thread keeps `data` alive until it returns.
    pub(crate) fn start<T: Send + Sync>(
        &self,
        data: Arc<T>,
        run: fn(&T),
        name: &'static core::ffi::CStr,
        arg: u32,
    ) -> Result {
        let start = KBox::into_raw(KBox::new(Start { data, run }, GFP_KERNEL)?);
        // SAFETY: the thread function matches the kthread signature and takes `start`; the
        // format takes one unsigned int.
        let task = kernel::error::from_err_ptr(unsafe {
            bindings::kthread_create_on_node(
                Some(thread_main::<T>),
                start.cast(),
                bindings::NUMA_NO_NODE,
                name.as_ptr().cast(),
                arg as core::ffi::c_uint,
            )
        });
        let task = match task {
            Ok(task) => task,
            Err(err) => {
                // SAFETY: the thread was not created, so `start` is still ours.
                drop(unsafe { KBox::from_raw(start) });
                return Err(err);
            }
        };
        // SAFETY: a fresh task: hold a reference for `stop` (kthread_stop_put drops it), then
        // let it run.
        unsafe {
            bindings::get_task_struct(task);
            bindings::wake_up_process(task);
        }
        self.task.store(task, Ordering::Release);
        Ok(())
    }

    /// Wakes the thread if it sleeps; callable from any context (hard-IRQ included).
    pub(crate) fn wake(&self) {
        let _rcu = RcuReadGuard::new();
        let task = self.task.load(Ordering::Acquire);
        if !task.is_null() {
            // SAFETY: `stop` clears the slot and waits for read sections like this one before
            // it drops its task reference, so `task` is live here.
            unsafe { bindings::wake_up_process(task) };
        }
    }

    pub(crate) fn is_running(&self) -> bool {
        !self.task.load(Ordering::Acquire).is_null()
    }

    /// Asks the thread to stop and waits until it has (process context).
    pub(crate) fn stop(&self) {
        let task = self.task.swap(core::ptr::null_mut(), Ordering::AcqRel);
        if task.is_null() {
            return;
        }
        synchronize_rcu();
        // SAFETY: the reference taken in `start` keeps the task; dropped here, once.
        unsafe { bindings::kthread_stop_put(task) };
    }
}

impl Drop for Kthread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether the current kernel thread is asked to stop.
pub(crate) fn should_stop() -> bool {
    // SAFETY: called from threads started by `Kthread::start`.
    unsafe { bindings::kthread_should_stop() }
}

/// From now on, memory the calling kernel thread allocates is reclaimed without starting I/O
/// (`memalloc_noio_save`, for its whole life): a thread on a volume's write path must not
/// wait for writeback that may need it.
pub(crate) fn forbid_io_in_reclaim() {
    // SAFETY: sets a flag of the current task; the saved state is not needed (never restored).
    let _ = unsafe { super::helpers::rust_helper_memalloc_noio_save() };
}
