// SPDX-License-Identifier: GPL-2.0

//! Fail-back, kernel half: the volume's server thread probes every SAN device that is marked
//! failed and still in the current map with a one-page asynchronous READ every
//! [`PROBE_INTERVAL_MS`]. A probe that succeeds does not switch the device back: it multicasts
//! EVENT kind PATH_HEALED (at most every [`HEALED_REPEAT_MS`] per device) and userspace asks
//! the server, which refuses while a recovery copies that device's data elsewhere. Only
//! SET_DEVICE_STATE (genl.rs) makes the device healthy again.
//!
//! Probes never wait: they are submitted from the thread and complete in interrupt context,
//! where the completion only records the outcome. Each probe holds an in-flight count of the
//! volume, so teardown (`Volume::remove_disk`) waits for it like for any clone.

use core::ptr::NonNull;
use core::sync::atomic::Ordering;
use kernel::prelude::*;

use crate::abi::{Attr, Command, DeviceState, EventKind};
use crate::device::{Probe, SanDevice};
use crate::ffi::bio::{Bio, BoxedEndIo};
use crate::ffi::consts::{GFP_KERNEL_RAW, REQ_OP_READ};
use crate::ffi::genl::Event;
use crate::ffi::sync::InFlightRef;
use crate::ffi::time::now_ns;
use crate::volume::Volume;

/// Interval between two probes of one failed device.
pub(crate) const PROBE_INTERVAL_MS: i64 = 2_000;
/// Shortest interval between two PATH_HEALED events for one device.
const HEALED_REPEAT_MS: i64 = 10_000;
const NS_PER_MS: i64 = 1_000_000;
/// Bytes one probe reads at the start of the device.
const PROBE_BYTES: u32 = 4096;

/// Multicasts an EVENT of `kind` for `device` of `volume` (process context).
pub(crate) fn multicast_device_event(
    volume: &Volume,
    device: &SanDevice,
    kind: EventKind,
) -> Result {
    let mut event = Event::new(Command::Event as u8, 512)?;
    event.put_u32(Attr::EventKind as u16, kind as u32)?;
    event.put_u64(Attr::VolumeId as u16, volume.id)?;
    event.put_str(Attr::DevicePath as u16, &device.path)?;
    event.send();
    Ok(())
}

/// Starts over for a device that has just been reported failed: an old probe result does not
/// count, and the first probe waits one interval.
pub(crate) fn restart(device: &SanDevice) {
    if device.probe.load(Ordering::Acquire) == Probe::InFlight as u32 {
        // At worst (it completed meanwhile) the next probe's success is ignored once.
        device.probe_stale.store(true, Ordering::Release);
    }
    let _ = device.probe.compare_exchange(
        Probe::Succeeded as u32,
        Probe::Idle as u32,
        Ordering::AcqRel,
        Ordering::Relaxed,
    );
    device.probe_issued_ns.store(now_ns(), Ordering::Relaxed);
}

/// One round: reports probes that succeeded and issues the ones that are due. Called by the
/// volume's server thread (process context, no locks held) unless the volume is closing.
pub(crate) fn tick(volume: &Volume) {
    let map = volume.current_map();
    let now = now_ns();
    for device in map
        .slots
        .iter()
        .filter_map(|slot| volume.devices.get(*slot))
    {
        if device.state() != DeviceState::Failed as u32 {
            continue;
        }
        let probe = device.probe.load(Ordering::Acquire);
        if probe == Probe::InFlight as u32 {
            continue;
        }
        if probe == Probe::Succeeded as u32 {
            let last = device.healed_reported_ns.load(Ordering::Relaxed);
            if last == 0 || now - last >= HEALED_REPEAT_MS * NS_PER_MS {
                device.healed_reported_ns.store(now, Ordering::Relaxed);
                pr_info!(
                    "volume {}: {} answers again; reporting PATH_HEALED\n",
                    volume.id,
                    &*device.path
                );
                if multicast_device_event(volume, device, EventKind::PathHealed).is_err() {
                    pr_warn!(
                        "volume {}: cannot multicast the path healed event\n",
                        volume.id
                    );
                }
            }
            // Keep probing: the event is repeated only while the device keeps answering.
            device.probe.store(Probe::Idle as u32, Ordering::Release);
        }
        if now - device.probe_issued_ns.load(Ordering::Relaxed) >= PROBE_INTERVAL_MS * NS_PER_MS {
            device.probe_issued_ns.store(now, Ordering::Relaxed);
            submit(volume, device);
        }
    }
}

/// What a probe's completion needs: its device, kept alive by the volume's in-flight
/// reference the probe holds.
struct ProbeContext {
    device: NonNull<SanDevice>,
    _inflight: InFlightRef,
}

/// Issues one asynchronous READ of the device's first page.
fn submit(volume: &Volume, device: &SanDevice) {
    if device.size_bytes() < u64::from(PROBE_BYTES) {
        return;
    }
    // Process context: GFP_KERNEL may fail, then there is no probe this round.
    let Ok(context) = KBox::new(
        ProbeContext {
            device: NonNull::from(device),
            _inflight: volume.inflight.get(),
        },
        GFP_KERNEL,
    ) else {
        return;
    };
    // One inline vector of the kernel's general pool is enough for one page.
    let Some(mut bio) = Bio::alloc(device.bdev(), 1, REQ_OP_READ, GFP_KERNEL_RAW, None) else {
        return;
    };
    device
        .probe
        .store(Probe::InFlight as u32, Ordering::Release);
    bio.set_sector(0);
    // The page belongs to the device, which outlives the probe (the context holds an
    // in-flight reference); only one probe per device is in flight (state InFlight), so the
    // page has a single user.
    bio.add_page(&device.probe_page, PROBE_BYTES, 0);
    bio.set_end_io::<ProbeContext, ProbeDone>(context);
    bio.submit();
}

/// Completion of a probe issued by [`submit`].
struct ProbeDone;

impl BoxedEndIo<ProbeContext> for ProbeDone {
    fn end_io(bio: Bio, context: KBox<ProbeContext>) {
        // SAFETY: the context's in-flight reference keeps the volume, and so its devices.
        let device = unsafe { context.device.as_ref() };
        let ok = bio.status() == 0;
        let stale = device.probe_stale.swap(false, Ordering::AcqRel);
        let outcome = if ok && !stale {
            Probe::Succeeded
        } else {
            Probe::Idle
        };
        device.probe.store(outcome as u32, Ordering::Release);
        bio.put();
        drop(context);
    }
}
