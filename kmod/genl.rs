// SPDX-License-Identifier: GPL-2.0

//! Generic-netlink command handling: validates every request against the uapi table and
//! its own semantics, then acts. Invalid input gets an errno plus an extack message and
//! changes nothing.

use core::sync::atomic::Ordering;
use kernel::prelude::*;
use kernel::str::CString;
use kernel::sync::Arc;
use kernel::{c_str, fmt};

use crate::abi::{
    parse_server_addr, Attr, Command, DeviceState, DEFAULT_IO_TIMEOUT_MS, MAX_IO_TIMEOUT_MS,
    MAX_PATH_BYTES, MAX_SERVERS, MAX_TOKEN_BYTES, MIN_IO_TIMEOUT_MS, PROTOCOL_VERSION,
};
use crate::device::SanDevice;
use crate::ffi::errno::{eopnotsupp, estale, etimedout};
use crate::ffi::genl::{GenlInfo, Reply, Request, SkBuff};
use crate::ffi::time::{msecs_to_jiffies, now_ns};
use crate::hold::Released;
use crate::registry;
use crate::remap::{resubmit, BLOCK_OPS};
use crate::server::path::ServerAddrs;
use crate::server::thread::serve;
use crate::sysfs::GROUPS;
use crate::volume::{MapState, NewVolume, Parts, SessionToken, Volume};

/// Reply room per volume and per device in STATUS.
const STATUS_BYTES_BASE: usize = 512;
const STATUS_BYTES_PER_VOLUME: usize = 768;
/// Farthest a lease deadline may lie ahead: a longer one is absurd input (a server leases
/// for seconds to minutes), refused rather than letting a client write unfenced for long.
const MAX_LEASE_AHEAD_NS: i64 = 3_600 * 1_000_000_000;
const STATUS_BYTES_PER_DEVICE: usize = 320;

/// The doit callback of every command (referenced from the shim's op table).
///
/// # Safety
///
/// Called by the generic-netlink core with a valid `genl_info` for this request.
#[no_mangle]
unsafe extern "C" fn sanblk_nl_doit(_skb: *mut SkBuff, info: *mut GenlInfo) -> core::ffi::c_int {
    // SAFETY: `info` is valid for the whole callback, and `request` does not outlive it.
    let request = unsafe { Request::new(info) };
    match dispatch(&request) {
        Ok(()) => 0,
        Err(err) => err.to_errno(),
    }
}

/// Fails the request with `err` and a formatted extack message.
fn refuse(request: &Request, err: Error, args: core::fmt::Arguments<'_>) -> Error {
    match CString::try_from_fmt(args) {
        Ok(msg) => request.fail(err, &msg),
        Err(_) => request.fail(err, c_str!("invalid request")),
    }
}

fn dispatch(request: &Request) -> Result {
    let command = Command::from_u8(request.command())
        .filter(|c| c.accepted_from_userspace())
        .ok_or_else(|| request.fail(eopnotsupp(), c_str!("unknown sanblk command")))?;
    for attr in command.required_attributes() {
        if request.attr_missing(*attr as u16) {
            return Err(refuse(
                request,
                EINVAL,
                fmt!("{} needs attribute {}", command.name(), attr.spec().name),
            ));
        }
    }
    let registry = crate::registry();
    match command {
        Command::Status => status(request, registry),
        Command::Create => create(request, registry),
        Command::Destroy => destroy(request, registry),
        Command::UpdateMap => update_map(request, registry),
        Command::SetDeviceState => set_device_state(request, registry),
        Command::Quiesce => quiesce(request, registry),
        Command::Resume => resume(request, registry),
        Command::Renew => renew(request, registry),
        _ => Err(request.fail(
            eopnotsupp(),
            c_str!("command not supported by this module version"),
        )),
    }
}

fn required_u64(request: &Request, attr: Attr) -> Result<u64> {
    request.attr(attr as u16).map(|a| a.u64()).ok_or(EINVAL)
}

/// Bytes of a NUL-terminated string attribute without the terminator (the policy guarantees
/// the terminator and the maximum length).
fn string_bytes(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

fn valid_volume_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(*b, b'-' | b'_' | b'.'))
}

/// Parses a nested list whose entries are all NUL-terminated strings of type `entry_type`.
fn nested_strings(request: &Request, bytes: &[u8], entry_type: u16) -> Result<KVec<CString>> {
    let mut list = KVec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(request.fail(EINVAL, c_str!("truncated nested attribute")));
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return Err(request.fail(EINVAL, c_str!("nested attribute length out of bounds")));
        }
        if kind != entry_type {
            return Err(request.fail(EINVAL, c_str!("unexpected attribute in nested list")));
        }
        let payload = &rest[4..len];
        let text = string_bytes(payload);
        if text.len() + 1 != payload.len()
            || text.is_empty()
            || text.len() > MAX_PATH_BYTES as usize
        {
            return Err(request.fail(
                EINVAL,
                c_str!("nested string not NUL-terminated or too long"),
            ));
        }
        let text = core::str::from_utf8(text)
            .map_err(|_| request.fail(EINVAL, c_str!("path is not UTF-8")))?;
        list.push(CString::try_from_fmt(fmt!("{}", text))?, GFP_KERNEL)?;
        rest = &rest[((len + 3) & !3).min(rest.len())..];
    }
    Ok(list)
}

/// The optional SERVERS list: at most MAX_SERVERS `a.b.c.d:port` strings.
fn parse_servers(request: &Request) -> Result<Option<ServerAddrs>> {
    let Some(attr) = request.attr(Attr::Servers as u16) else {
        return Ok(None);
    };
    let list = nested_strings(request, attr.bytes(), Attr::ServerAddr as u16)?;
    if list.len() > MAX_SERVERS {
        return Err(refuse(
            request,
            EINVAL,
            fmt!("at most {} server addresses", MAX_SERVERS),
        ));
    }
    let mut addrs = ServerAddrs::default();
    for (i, text) in list.iter().enumerate() {
        let (ip, port) = parse_server_addr(text.as_bytes()).ok_or_else(|| {
            refuse(
                request,
                EINVAL,
                fmt!("server address {} is not a.b.c.d:port", i),
            )
        })?;
        addrs.push(ip, port);
    }
    Ok(Some(addrs))
}

/// The optional TOKEN: 1..=MAX_TOKEN_BYTES bytes.
fn parse_token(request: &Request) -> Result<Option<SessionToken>> {
    let Some(attr) = request.attr(Attr::Token as u16) else {
        return Ok(None);
    };
    SessionToken::new(attr.bytes()).map(Some).ok_or_else(|| {
        refuse(
            request,
            EINVAL,
            fmt!("session token must have 1 to {} bytes", MAX_TOKEN_BYTES),
        )
    })
}

fn parse_map(request: &Request, volume_id: u64, epoch: u64) -> Result<MapState> {
    let raw = request.attr(Attr::Map as u16).ok_or(EINVAL)?;
    let map =
        MapState::new(raw.bytes()).map_err(|(err, why)| refuse(request, err, fmt!("{}", why)))?;
    let header = *map.view().header();
    if header.volume_id != volume_id {
        return Err(request.fail(EINVAL, c_str!("map is for another volume")));
    }
    if header.epoch != epoch {
        return Err(request.fail(
            EINVAL,
            c_str!("EPOCH attribute differs from the map's epoch"),
        ));
    }
    Ok(map)
}

fn create(request: &Request, registry: &registry::Registry) -> Result {
    let volume_id = required_u64(request, Attr::VolumeId)?;
    let epoch = required_u64(request, Attr::Epoch)?;
    let name_attr = request.attr(Attr::VolumeName as u16).ok_or(EINVAL)?;
    let name = string_bytes(name_attr.bytes());
    if !valid_volume_name(name) {
        return Err(request.fail(EINVAL, c_str!("volume name must be [A-Za-z0-9._-]+")));
    }
    let name = core::str::from_utf8(name).map_err(|_| EINVAL)?;
    let read_only = request
        .attr(Attr::ReadOnly as u16)
        .map(|a| a.u32() != 0)
        .unwrap_or(false);
    let token = parse_token(request)?.ok_or(EINVAL)?;
    let lease_deadline = parse_lease(request)?.ok_or(EINVAL)?;
    let io_timeout_ms = match request.attr(Attr::IoTimeoutMs as u16) {
        None => DEFAULT_IO_TIMEOUT_MS,
        Some(attr) if (MIN_IO_TIMEOUT_MS..=MAX_IO_TIMEOUT_MS).contains(&attr.u32()) => attr.u32(),
        Some(attr) => {
            return Err(refuse(
                request,
                EINVAL,
                fmt!(
                    "IO_TIMEOUT_MS {} is outside {}..={}",
                    attr.u32(),
                    MIN_IO_TIMEOUT_MS,
                    MAX_IO_TIMEOUT_MS
                ),
            ))
        }
    };
    let map = parse_map(request, volume_id, epoch)?;
    let servers = parse_servers(request)?;
    let devices_attr = request.attr(Attr::Devices as u16).ok_or(EINVAL)?;
    let paths = nested_strings(request, devices_attr.bytes(), Attr::DevicePath as u16)?;
    let view = map.view();
    if paths.len() != view.header().device_count as usize {
        return Err(request.fail(
            EINVAL,
            c_str!("number of device paths differs from the map's device table"),
        ));
    }

    let mut volumes = registry.lock();
    if volumes.iter().any(|v| v.id == volume_id) {
        return Err(request.fail(EEXIST, c_str!("volume already attached")));
    }
    if volumes.iter().any(|v| v.name.as_bytes() == name.as_bytes()) {
        return Err(request.fail(
            EEXIST,
            c_str!("a volume with this name is already attached"),
        ));
    }
    let index = registry::free_index(&volumes)
        .ok_or_else(|| request.fail(ENOSPC, c_str!("too many volumes attached")))?;

    let mut devices = KVec::with_capacity(paths.len(), GFP_KERNEL)?;
    for (i, path) in paths.into_iter().enumerate() {
        let expected = view.device(i as u32);
        let device = SanDevice::open(path, expected.uuid, !read_only).map_err(|err| {
            refuse(
                request,
                err,
                fmt!("cannot open SAN device {} (errno {})", i, -err.to_errno()),
            )
        })?;
        if device.size_bytes() < expected.size {
            return Err(refuse(
                request,
                EINVAL,
                fmt!(
                    "SAN device {} has {} bytes, the map needs {}",
                    i,
                    device.size_bytes(),
                    expected.size
                ),
            ));
        }
        devices.push(device, GFP_KERNEL)?;
    }
    let volume = Volume::create(
        NewVolume {
            id: volume_id,
            name: CString::try_from_fmt(fmt!("{}", name))?,
            index,
            read_only,
            map,
            devices,
            token,
            servers,
            lease_deadline,
            io_timeout_ms,
        },
        crate::block_major(),
        &Parts {
            disk_ops: &BLOCK_OPS,
            disk_attributes: &GROUPS,
            serve,
            copy: crate::copier::run,
        },
    )
    .map_err(|err| {
        refuse(
            request,
            err,
            fmt!("cannot create the block device (errno {})", -err.to_errno()),
        )
    })?;
    volumes.push(volume.clone(), GFP_KERNEL)?;
    drop(volumes);
    pr_info!(
        "attached volume {} (id {}, epoch {}) as sanblk{}\n",
        name,
        volume_id,
        epoch,
        index
    );

    let mut reply = request.reply(Command::Create as u8, STATUS_BYTES_BASE)?;
    reply.put_u32(Attr::DeviceIndex as u16, index)?;
    reply.put_u64(Attr::Epoch as u16, epoch)?;
    reply.send()
}

fn find(request: &Request, volumes: &[Arc<Volume>], volume_id: u64) -> Result<usize> {
    volumes
        .iter()
        .position(|v| v.id == volume_id)
        .ok_or_else(|| request.fail(ENOENT, c_str!("no such volume attached")))
}

fn destroy(request: &Request, registry: &registry::Registry) -> Result {
    let volume_id = required_u64(request, Attr::VolumeId)?;
    let mut volumes = registry.lock();
    let position = find(request, &volumes, volume_id)?;
    let volume = volumes[position].clone();
    if volume.is_open() {
        return Err(request.fail(EBUSY, c_str!("volume is open (mounted or in use)")));
    }
    let rest = registry::without(&volumes, position)?;
    *volumes = rest;
    // The registry stays locked until the disk is gone: commands run in parallel (a QUIESCE
    // may wait long), and a CREATE must not reuse the minor of a disk still being removed.
    volume.remove_disk();
    drop(volumes);
    pr_info!(
        "detached volume id {} (sanblk{})\n",
        volume_id,
        volume.index
    );
    Ok(())
}

fn update_map(request: &Request, registry: &registry::Registry) -> Result {
    let volume_id = required_u64(request, Attr::VolumeId)?;
    let epoch = required_u64(request, Attr::Epoch)?;
    let volumes = registry.lock();
    let position = find(request, &volumes, volume_id)?;
    let volume = &volumes[position];
    let map = parse_map(request, volume_id, epoch)?;
    let servers = parse_servers(request)?;
    let token = parse_token(request)?;
    let lease = parse_lease(request)?;
    let current = volume.current_map();
    if epoch == current.epoch && (token.is_some() || servers.is_some()) && map.same_bytes(&current)
    {
        // Re-delivery of the current map after the agent reconnected to the server: only the
        // session token and the server addresses change.
        apply_server_settings(volume, token, servers);
        let released = lease.and_then(|deadline| extend_lease(volume, deadline));
        let volume = volume.clone();
        drop(volumes);
        if let Some(released) = released {
            resubmit(&volume, released);
        }
        pr_info!(
            "volume id {} keeps epoch {}; server path settings updated\n",
            volume_id,
            epoch
        );
        return Ok(());
    }
    if epoch <= current.epoch {
        return Err(refuse(
            request,
            EINVAL,
            fmt!("epoch {} is not newer than {}", epoch, current.epoch),
        ));
    }
    let view = map.view();
    let header = *view.header();
    if header.block_size != current.view().header().block_size {
        return Err(request.fail(EINVAL, c_str!("block size cannot change")));
    }
    // New devices (recovery, moves) come with the paths of the whole device table.
    let paths = match request.attr(Attr::Devices as u16) {
        Some(attr) => Some(nested_strings(
            request,
            attr.bytes(),
            Attr::DevicePath as u16,
        )?),
        None => None,
    };
    if let Some(paths) = &paths {
        if paths.len() != header.device_count as usize {
            return Err(request.fail(
                EINVAL,
                c_str!("number of device paths differs from the map's device table"),
            ));
        }
    }
    let mut slots = KVec::with_capacity(header.device_count as usize, GFP_KERNEL)?;
    for i in 0..header.device_count {
        let wanted = view.device(i);
        let slot = match (volume.devices.find_uuid(&wanted.uuid), &paths) {
            (Some(slot), _) => slot,
            (None, Some(paths)) => {
                let path = CString::try_from_fmt(fmt!("{}", &*paths[i as usize]))?;
                let device =
                    SanDevice::open(path, wanted.uuid, !volume.read_only).map_err(|err| {
                        refuse(
                            request,
                            err,
                            fmt!("cannot open SAN device {} (errno {})", i, -err.to_errno()),
                        )
                    })?;
                if device.size_bytes() < wanted.size {
                    return Err(
                        request.fail(EINVAL, c_str!("map extends beyond the end of a device"))
                    );
                }
                volume.devices.insert(device)?
            }
            (None, None) => {
                return Err(request.fail(
                    EINVAL,
                    c_str!("map references devices not attached to this volume"),
                ));
            }
        };
        let Some(device) = volume.devices.get(slot) else {
            return Err(EINVAL);
        };
        if device.size_bytes() < wanted.size {
            return Err(request.fail(EINVAL, c_str!("map extends beyond the end of a device")));
        }
        slots.push(slot, GFP_KERNEL)?;
    }
    let mut map = map;
    map.slots = slots;
    volume.replace_map(map)?;
    apply_server_settings(volume, token, servers);
    // The new epoch's lease; bios held for a lapsed lease go out with the new map (a
    // quiesced volume keeps holding them until RESUME).
    let released = lease.and_then(|deadline| extend_lease(volume, deadline));
    let volume = volume.clone();
    drop(volumes);
    if let Some(released) = released {
        resubmit(&volume, released);
    }
    pr_info!("volume id {} now at epoch {}\n", volume_id, epoch);
    Ok(())
}

/// The optional LEASE_EXPIRES_NS (ktime ns): at most [`MAX_LEASE_AHEAD_NS`] from now. A
/// deadline already past is taken (a renewal that arrived late) and changes nothing.
fn parse_lease(request: &Request) -> Result<Option<i64>> {
    let Some(attr) = request.attr(Attr::LeaseExpiresNs as u16) else {
        return Ok(None);
    };
    let deadline = attr.u64();
    let limit = now_ns().saturating_add(MAX_LEASE_AHEAD_NS);
    if deadline > limit as u64 {
        return Err(refuse(
            request,
            EINVAL,
            fmt!(
                "LEASE_EXPIRES_NS lies more than {} s ahead",
                MAX_LEASE_AHEAD_NS / 1_000_000_000
            ),
        ));
    }
    Ok(Some(deadline as i64))
}

/// Extends the lease to `deadline`; the bios it held, if the volume is not held any more.
fn extend_lease(volume: &Volume, deadline: i64) -> Option<Released> {
    let now = now_ns();
    volume.hold.renew(deadline, now);
    volume.hold.release(&volume.inflight, now)
}

/// The volume `volume_id` with `epoch` as its current map epoch (`ESTALE` otherwise). The
/// registry lock serialises this check with UPDATE_MAP.
fn find_at_epoch(
    request: &Request,
    volumes: &[Arc<Volume>],
    volume_id: u64,
    epoch: u64,
) -> Result<Arc<Volume>> {
    let volume = volumes[find(request, volumes, volume_id)?].clone();
    let current = volume.current_map().epoch;
    if epoch != current {
        return Err(refuse(
            request,
            estale(),
            fmt!("epoch {} is not the current epoch {}", epoch, current),
        ));
    }
    Ok(volume)
}

/// QUIESCE: hold new bios, then wait (without the registry lock: other volumes' commands go
/// on; the family has parallel_ops, so other families are not held up either) until every
/// bio mapped before has completed, bounded by the volume's I/O timeout.
fn quiesce(request: &Request, registry: &registry::Registry) -> Result {
    let volume_id = required_u64(request, Attr::VolumeId)?;
    let epoch = required_u64(request, Attr::Epoch)?;
    let volume = {
        let volumes = registry.lock();
        let volume = find_at_epoch(request, &volumes, volume_id, epoch)?;
        volume.hold.quiesce();
        volume
    };
    let timeout_ms = volume.hold.io_timeout_ms();
    if !volume
        .inflight
        .wait_idle_timeout(msecs_to_jiffies(timeout_ms))
    {
        return Err(refuse(
            request,
            etimedout(),
            fmt!(
                "I/O still in flight after {} ms; the volume stays quiesced",
                timeout_ms
            ),
        ));
    }
    pr_info!("volume id {} quiesced at epoch {}\n", volume_id, epoch);
    Ok(())
}

/// Runs `act` on the volume of the request at its current epoch under the registry lock,
/// then re-submits the bios it released (without the lock: submitting may wait for memory).
fn release_at_epoch(
    request: &Request,
    registry: &registry::Registry,
    act: impl FnOnce(&Volume) -> Result<Option<Released>>,
) -> Result {
    let volume_id = required_u64(request, Attr::VolumeId)?;
    let epoch = required_u64(request, Attr::Epoch)?;
    let (volume, released) = {
        let volumes = registry.lock();
        let volume = find_at_epoch(request, &volumes, volume_id, epoch)?;
        let released = act(&volume)?;
        (volume, released)
    };
    if let Some(released) = released {
        resubmit(&volume, released);
    }
    Ok(())
}

/// RESUME: ends the quiesce hold and re-submits the held bios with the current map (unless
/// the lease has lapsed: they wait for RENEW).
fn resume(request: &Request, registry: &registry::Registry) -> Result {
    release_at_epoch(request, registry, |volume| {
        if !volume.hold.resume() {
            return Err(request.fail(EINVAL, c_str!("volume is not quiesced")));
        }
        pr_info!("volume id {} resumed\n", volume.id);
        Ok(volume.hold.release(&volume.inflight, now_ns()))
    })
}

/// RENEW: extends the lease of the current epoch and releases what a lapse held.
fn renew(request: &Request, registry: &registry::Registry) -> Result {
    release_at_epoch(request, registry, |volume| {
        let deadline = parse_lease(request)?.ok_or(EINVAL)?;
        Ok(extend_lease(volume, deadline))
    })
}

/// Installs a validated new server address list and session token (either optional).
fn apply_server_settings(
    volume: &Volume,
    token: Option<SessionToken>,
    servers: Option<ServerAddrs>,
) {
    if let Some(servers) = servers {
        volume.server.set_addrs(servers);
    }
    if let Some(token) = token {
        volume.set_token(token);
    }
}

/// SET_DEVICE_STATE: fail-back. Only `healthy` may be set, for a device of the volume's
/// current map; new bios go direct to it again, pieces already on the server path finish there.
fn set_device_state(request: &Request, registry: &registry::Registry) -> Result {
    let volume_id = required_u64(request, Attr::VolumeId)?;
    let path_attr = request.attr(Attr::DevicePath as u16).ok_or(EINVAL)?;
    let path = string_bytes(path_attr.bytes());
    let state = request
        .attr(Attr::DeviceState as u16)
        .map(|a| a.u32())
        .ok_or(EINVAL)?;
    if state != DeviceState::Healthy as u32 {
        return Err(refuse(
            request,
            EINVAL,
            fmt!("device state {} cannot be set (only healthy, 0)", state),
        ));
    }
    let volumes = registry.lock();
    let position = find(request, &volumes, volume_id)?;
    let volume = &volumes[position];
    let map = volume.current_map();
    let device = map
        .slots
        .iter()
        .filter_map(|slot| volume.devices.get(*slot))
        .find(|d| d.path.as_bytes() == path)
        .ok_or_else(|| {
            request.fail(
                ENOENT,
                c_str!("no device with this path in the volume's current map"),
            )
        })?;
    if device.state() != DeviceState::Healthy as u32 {
        device.mark_healthy();
        pr_info!(
            "volume id {}: {} is healthy again; direct I/O resumes\n",
            volume_id,
            &*device.path
        );
    }
    Ok(())
}

fn put_volume(reply: &mut Reply<'_>, volume: &Volume) -> Result {
    let map = volume.current_map();
    let nest = reply.begin_nest(Attr::Volume as u16)?;
    reply.put_u64(Attr::VolumeId as u16, volume.id)?;
    reply.put_str(Attr::VolumeName as u16, &volume.name)?;
    reply.put_u64(Attr::Epoch as u16, map.epoch)?;
    reply.put_u32(Attr::DeviceIndex as u16, volume.index)?;
    reply.put_u64(Attr::SizeBytes as u16, map.size)?;
    reply.put_u32(Attr::ReadOnly as u16, volume.read_only as u32)?;
    let counters = &volume.counters;
    reply.put_u64(
        Attr::ReadIos as u16,
        counters.read_ios.load(Ordering::Relaxed),
    )?;
    reply.put_u64(
        Attr::WriteIos as u16,
        counters.write_ios.load(Ordering::Relaxed),
    )?;
    reply.put_u64(
        Attr::ReadBytes as u16,
        counters.read_bytes.load(Ordering::Relaxed),
    )?;
    reply.put_u64(
        Attr::WrittenBytes as u16,
        counters.written_bytes.load(Ordering::Relaxed),
    )?;
    reply.put_u64(
        Attr::ErrorCount as u16,
        counters.errors.load(Ordering::Relaxed),
    )?;
    reply.put_u32(Attr::ServerState as u16, volume.server.state())?;
    reply.put_u64(Attr::RedirectedIos as u16, volume.server.redirected())?;
    reply.put_u64(Attr::PreservedChunks as u16, volume.copies.preserved())?;
    let now = now_ns();
    let hold = &volume.hold;
    reply.put_u32(Attr::HoldReason as u16, hold.reason(now))?;
    reply.put_u64(Attr::HeldIos as u16, hold.held_ios())?;
    reply.put_u64(Attr::LeaseRemainingMs as u16, hold.lease_remaining_ms(now))?;
    reply.put_u64(Attr::TimedOutIos as u16, hold.timed_out_ios())?;
    reply.put_u32(Attr::IoTimeoutMs as u16, hold.io_timeout_ms())?;
    let addrs = volume.server.addrs();
    if !addrs.is_empty() {
        let servers = reply.begin_nest(Attr::Servers as u16)?;
        for (ip, port) in addrs.iter() {
            let text =
                CString::try_from_fmt(fmt!("{}.{}.{}.{}:{}", ip[0], ip[1], ip[2], ip[3], port))?;
            reply.put_str(Attr::ServerAddr as u16, &text)?;
        }
        reply.end_nest(servers);
    }
    for device in map
        .slots
        .iter()
        .filter_map(|slot| volume.devices.get(*slot))
    {
        let entry = reply.begin_nest(Attr::Device as u16)?;
        reply.put_str(Attr::DevicePath as u16, &device.path)?;
        reply.put_u32(Attr::DeviceState as u16, device.state())?;
        reply.put_u64(Attr::ErrorCount as u16, device.errors())?;
        reply.end_nest(entry);
    }
    reply.end_nest(nest);
    Ok(())
}

fn status(request: &Request, registry: &registry::Registry) -> Result {
    let volumes = registry.lock();
    let devices: usize = volumes.iter().map(|v| v.current_map().slots.len()).sum();
    let room = STATUS_BYTES_BASE
        + volumes.len() * STATUS_BYTES_PER_VOLUME
        + devices * STATUS_BYTES_PER_DEVICE;
    let mut reply = request.reply(Command::Status as u8, room)?;
    reply.put_u32(Attr::ProtocolVersion as u16, PROTOCOL_VERSION)?;
    reply.put_str(Attr::ModuleVersion as u16, crate::MODULE_VERSION)?;
    reply.put_u32(Attr::BlockMajor as u16, crate::block_major())?;
    reply.put_u32(Attr::VolumeCount as u16, volumes.len() as u32)?;
    for volume in volumes.iter() {
        put_volume(&mut reply, volume)?;
    }
    drop(volumes);
    reply.send()
}
