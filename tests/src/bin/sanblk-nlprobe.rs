//! Guest-side generic-netlink probe for the sanblk module.
//!
//! `sanblk-nlprobe status` asks the module for STATUS and prints `key=value` lines.
//! `sanblk-nlprobe hostile` sends malformed requests (unknown commands, missing, oversized,
//! mistyped and unknown attributes, a truncated message) and prints one line per case:
//! `case=<name> errno=<n> msg=<extack message>`; it exits 1 if any of them was accepted.
//! The host test checks the printed errnos and that STATUS still works afterwards.
//! `sanblk-nlprobe create NAME ID EPOCH LAYOUT SIZE_MIB DEV...` attaches a volume built from a
//! fixed recipe (see [`recipe`]) on the given block devices, without a server: the host test
//! knows the same recipe and checks where each block landed in the image files. A LAYOUT
//! ending in `+sync` (`linear+sync`) flags every extent syncing (writes via the server); one
//! ending in `+cow` (`linear+cow`, after any `+sync`) sets copy-on-write tracking of 64 KiB
//! chunks (first writes to a chunk via the server).
//! `sanblk-nlprobe update ...` (same arguments) sends UPDATE_MAP; `destroy ID` detaches.
//! `sanblk-nlprobe hostile-maps DEV DEV` sends CREATE/UPDATE_MAP requests with hostile maps.
//! CREATE carries a lease of `SANBLK_LEASE_MS` (default 30 minutes) from now and, if set,
//! `SANBLK_IO_TIMEOUT_MS`. `quiesce|resume ID EPOCH` and `renew ID EPOCH MS` (a lease of MS
//! milliseconds from now, negative for one already past) send those commands; `volumes`
//! prints one `volume key=value ...` line per attached volume; `hostile-lease DEV...` sends
//! hostile QUIESCE, RESUME, RENEW and CREATE requests against a volume it attaches.

use std::process::ExitCode;

use neli::{
    consts::{nl::NlmF, socket::NlFamily},
    err::RouterError,
    genl::{AttrTypeBuilder, Genlmsghdr, GenlmsghdrBuilder, Nlattr, NlattrBuilder, NoUserHeader},
    nl::{NlPayload, Nlmsghdr},
    router::synchronous::NlRouter,
    types::{Buffer, GenlBuffer},
    utils::Groups,
};
use sanblk_uapi::map::{self, Device, Extent, ExtentKind, MapHeader, Member, MAX_MEMBERS};
use sanblk_uapi::netlink::{Attr, Command, EVENTS_GROUP, FAMILY_NAME, FAMILY_VERSION};

const MIB: u64 = 1 << 20;
/// Copy-on-write chunk size of a `+cow` map.
const COW_CHUNK_BYTES: u32 = 64 << 10;
/// Default lease of the volumes this probe attaches.
const DEFAULT_LEASE_MS: i64 = 30 * 60 * 1000;
const NLA_F_NESTED: u16 = 1 << 15;

type Message = Genlmsghdr<u8, u16>;
/// Attributes of a hand-built request: (type, payload).
type RawAttrs = Vec<(u16, Vec<u8>)>;

/// Outcome of one request: the kernel's reply or its errno and extack message.
enum Outcome {
    Reply(Box<Message>),
    Error { errno: i32, message: String },
}

struct Link {
    router: NlRouter,
    family: u16,
}

impl Link {
    fn open() -> Result<Link, String> {
        let (router, _) = NlRouter::connect(NlFamily::Generic, None, Groups::empty())
            .map_err(|e| format!("cannot open a generic netlink socket: {e}"))?;
        router
            .enable_ext_ack(true)
            .map_err(|e| format!("cannot enable extended acks: {e}"))?;
        let family = router
            .resolve_genl_family(FAMILY_NAME)
            .map_err(|e| format!("family {FAMILY_NAME} not found (is sanblk.ko loaded?): {e}"))?;
        Ok(Link { router, family })
    }

    fn request(&self, command: u8, attrs: GenlBuffer<u16, Buffer>) -> Result<Outcome, String> {
        let header = GenlmsghdrBuilder::<u8, u16, NoUserHeader>::default()
            .cmd(command)
            .version(FAMILY_VERSION)
            .attrs(attrs)
            .build()
            .map_err(|e| format!("cannot build request: {e}"))?;
        let mut replies = self
            .router
            .send::<_, _, u16, Message>(self.family, NlmF::ACK, NlPayload::Payload(header))
            .map_err(|e| format!("send failed: {e}"))?;
        match replies.next() {
            Some(Ok(message)) => {
                let message: Nlmsghdr<u16, Message> = message;
                match message.get_payload() {
                    Some(payload) => Ok(Outcome::Reply(Box::new(payload.clone()))),
                    None => Err("reply without payload".to_string()),
                }
            }
            Some(Err(RouterError::Nlmsgerr(err))) => {
                let message = err
                    .ext_ack()
                    .iter()
                    .find(|a| u16::from(a.nla_type()) == 1)
                    .map(|a| {
                        String::from_utf8_lossy(a.nla_payload().as_ref())
                            .trim_end_matches('\0')
                            .to_string()
                    })
                    .unwrap_or_default();
                Ok(Outcome::Error {
                    errno: -err.error(),
                    message,
                })
            }
            Some(Err(other)) => Err(format!("netlink error: {other}")),
            None => Err("no answer from the kernel".to_string()),
        }
    }
}

fn attr(attr_type: u16, payload: Vec<u8>) -> Result<Nlattr<u16, Buffer>, String> {
    NlattrBuilder::default()
        .nla_type(
            AttrTypeBuilder::default()
                .nla_type(attr_type)
                .build()
                .map_err(|e| e.to_string())?,
        )
        .nla_payload(payload)
        .build()
        .map_err(|e| e.to_string())
}

fn attrs(list: Vec<(u16, Vec<u8>)>) -> Result<GenlBuffer<u16, Buffer>, String> {
    list.into_iter().map(|(t, p)| attr(t, p)).collect()
}

fn nul_terminated(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// Prints the first `count` notifications of the `events` group, one line each.
fn events(count: usize) -> Result<bool, String> {
    use std::io::Write;
    let (router, mut multicast) = NlRouter::connect(NlFamily::Generic, None, Groups::empty())
        .map_err(|e| format!("cannot open a generic netlink socket: {e}"))?;
    let group = router
        .resolve_nl_mcast_group(FAMILY_NAME, EVENTS_GROUP)
        .map_err(|e| format!("cannot resolve the events group: {e}"))?;
    router
        .add_mcast_membership(Groups::new_groups(&[group]))
        .map_err(|e| format!("cannot join the events group: {e}"))?;
    println!("listening");
    let _ = std::io::stdout().flush();
    let mut seen = 0;
    while seen < count {
        let Some(message) = multicast.next_typed::<u16, Message>() else {
            break;
        };
        let message = message.map_err(|e| format!("receiving an event: {e}"))?;
        let Some(payload) = message.get_payload() else {
            continue;
        };
        let handle = payload.attrs().get_attr_handle();
        let kind = handle
            .get_attr_payload_as::<u32>(Attr::EventKind as u16)
            .unwrap_or(0);
        let volume = handle
            .get_attr_payload_as::<u64>(Attr::VolumeId as u16)
            .unwrap_or(0);
        let device = handle
            .get_attribute(Attr::DevicePath as u16)
            .map(|n| {
                String::from_utf8_lossy(n.nla_payload().as_ref())
                    .trim_end_matches('\0')
                    .to_string()
            })
            .unwrap_or_default();
        println!(
            "event cmd={} kind={kind} volume_id={volume} device={device}",
            payload.cmd()
        );
        let _ = std::io::stdout().flush();
        seen += 1;
    }
    Ok(seen == count)
}

fn status(link: &Link) -> Result<(), String> {
    match link.request(Command::Status as u8, attrs(vec![])?)? {
        Outcome::Reply(reply) => {
            let handle = reply.attrs().get_attr_handle();
            let u32_of = |a: Attr| handle.get_attr_payload_as::<u32>(a as u16).ok();
            let text_of = |a: Attr| {
                handle.get_attribute(a as u16).map(|n| {
                    String::from_utf8_lossy(n.nla_payload().as_ref())
                        .trim_end_matches('\0')
                        .to_string()
                })
            };
            let show = |v: Option<String>| v.unwrap_or_else(|| "missing".to_string());
            println!(
                "protocol_version={}",
                show(u32_of(Attr::ProtocolVersion).map(|v| v.to_string()))
            );
            println!("module_version={}", show(text_of(Attr::ModuleVersion)));
            println!(
                "block_major={}",
                show(u32_of(Attr::BlockMajor).map(|v| v.to_string()))
            );
            println!(
                "volume_count={}",
                show(u32_of(Attr::VolumeCount).map(|v| v.to_string()))
            );
            Ok(())
        }
        Outcome::Error { errno, message } => {
            Err(format!("STATUS failed: errno {errno}: {message}"))
        }
    }
}

/// A raw generic-netlink socket for hostile requests: sizes and layouts no library would
/// build, errors read straight from `nlmsgerr` (with `NETLINK_CAP_ACK`, so a huge request is not
/// echoed back, and `NETLINK_EXT_ACK` for the kernel's message).
struct RawLink {
    fd: i32,
    family: u16,
}

const NLMSGERR_ATTR_MSG: u16 = 1;
const NLM_F_ACK_TLVS: u16 = 0x200;

impl RawLink {
    fn open(family: u16) -> Result<RawLink, String> {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_GENERIC) };
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let link = RawLink { fd, family };
        for option in [libc::NETLINK_CAP_ACK, libc::NETLINK_EXT_ACK] {
            let one: libc::c_int = 1;
            // SAFETY: `one` outlives the call and the length matches its type.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_NETLINK,
                    option,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            if rc < 0 {
                return Err(format!("setsockopt: {}", std::io::Error::last_os_error()));
            }
        }
        Ok(link)
    }

    /// Sends one message whose header claims `claimed_len` (normally the real length).
    fn send(
        &self,
        command: u8,
        attributes: &[(u16, Vec<u8>)],
        claimed_len: Option<u32>,
    ) -> Result<(), String> {
        let mut body = vec![command, FAMILY_VERSION, 0, 0];
        for (attr_type, payload) in attributes {
            let len = 4 + payload.len();
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&attr_type.to_ne_bytes());
            body.extend_from_slice(payload);
            body.resize(body.len() + (4 - len % 4) % 4, 0);
        }
        let total = 16 + body.len();
        let mut message = Vec::with_capacity(total);
        message.extend_from_slice(&claimed_len.unwrap_or(total as u32).to_ne_bytes());
        message.extend_from_slice(&self.family.to_ne_bytes());
        message.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
        message.extend_from_slice(&1u32.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(&body);
        // SAFETY: a zeroed sockaddr_nl addressed to the kernel (pid 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `message` and `kernel` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd,
                message.as_ptr().cast(),
                message.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(format!("sendto: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Waits up to a second for the kernel's answer: `Some((errno, message))` for an error,
    /// `Some((0, ""))` for a reply or ack, `None` if the kernel stayed silent.
    fn receive(&self) -> Result<Option<(i32, String)>, String> {
        self.receive_within(1000)
    }

    /// [`RawLink::receive`], waiting up to `wait_ms` (QUIESCE answers once I/O drained).
    fn receive_within(&self, wait_ms: i32) -> Result<Option<(i32, String)>, String> {
        let mut poll = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, wait_ms) } <= 0 {
            return Ok(None);
        }
        let mut buffer = vec![0u8; 65536];
        // SAFETY: `buffer` is writable for its whole length.
        let got = unsafe { libc::recv(self.fd, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        if got < 16 {
            return Err(format!(
                "short netlink read: {}",
                std::io::Error::last_os_error()
            ));
        }
        let got = got as usize;
        let message_type = u16::from_ne_bytes([buffer[4], buffer[5]]);
        let flags = u16::from_ne_bytes([buffer[6], buffer[7]]);
        if message_type != libc::NLMSG_ERROR as u16 {
            return Ok(Some((0, String::new())));
        }
        let error = i32::from_ne_bytes([buffer[16], buffer[17], buffer[18], buffer[19]]);
        let mut text = String::new();
        if flags & NLM_F_ACK_TLVS != 0 {
            // nlmsghdr, error code, then the echoed request header only (NETLINK_CAP_ACK).
            let mut at = 16 + 4 + 16;
            while at + 4 <= got {
                let len = u16::from_ne_bytes([buffer[at], buffer[at + 1]]) as usize;
                let attr_type = u16::from_ne_bytes([buffer[at + 2], buffer[at + 3]]) & 0x3fff;
                if len < 4 || at + len > got {
                    break;
                }
                if attr_type == NLMSGERR_ATTR_MSG {
                    text = String::from_utf8_lossy(&buffer[at + 4..at + len])
                        .trim_end_matches('\0')
                        .to_string();
                }
                at += (len + 3) & !3;
            }
        }
        Ok(Some((-error, text)))
    }
}

impl Drop for RawLink {
    fn drop(&mut self) {
        // SAFETY: `fd` is the socket this value owns.
        unsafe { libc::close(self.fd) };
    }
}

/// Attributes of SET_DEVICE_STATE.
fn set_state_attrs(volume_id: u64, path: &str, state: u32) -> RawAttrs {
    vec![
        (Attr::VolumeId as u16, volume_id.to_ne_bytes().to_vec()),
        (Attr::DevicePath as u16, nul_terminated(path)),
        (Attr::DeviceState as u16, state.to_ne_bytes().to_vec()),
    ]
}

fn hostile(link: &Link) -> Result<bool, String> {
    let long_name = nul_terminated(&"x".repeat(300));
    let cases: Vec<(&str, u8, RawAttrs)> = vec![
        ("unknown-command", 99, vec![]),
        ("zero-command", 0, vec![]),
        ("event-from-userspace", Command::Event as u8, vec![]),
        ("create-missing-attributes", Command::Create as u8, vec![]),
        (
            "create-oversized-name",
            Command::Create as u8,
            vec![(Attr::VolumeName as u16, long_name)],
        ),
        (
            "create-mistyped-volume-id",
            Command::Create as u8,
            vec![(Attr::VolumeId as u16, vec![1, 2, 3])],
        ),
        (
            "create-unterminated-name",
            Command::Create as u8,
            vec![(Attr::VolumeName as u16, b"abc".to_vec())],
        ),
        (
            "create-oversized-map",
            Command::Create as u8,
            vec![(Attr::Map as u16, vec![0u8; 40_000])],
        ),
        (
            "status-unknown-attribute",
            Command::Status as u8,
            vec![(200, vec![0u8; 4])],
        ),
        (
            "status-pad-attribute",
            Command::Status as u8,
            vec![(Attr::Pad as u16, vec![0u8; 4])],
        ),
        ("destroy-missing-volume", Command::Destroy as u8, vec![]),
        (
            "set-state-missing-attributes",
            Command::SetDeviceState as u8,
            vec![],
        ),
        (
            "set-state-no-such-volume",
            Command::SetDeviceState as u8,
            set_state_attrs(4242, "/dev/vda", 0),
        ),
    ];
    let raw = RawLink::open(link.family)?;
    let mut all_refused = true;
    for (name, command, list) in cases {
        raw.send(command, &list, None)?;
        match raw.receive()? {
            Some((0, _)) => {
                println!("case={name} accepted");
                all_refused = false;
            }
            Some((errno, message)) => println!("case={name} errno={errno} msg={message}"),
            None => {
                println!("case={name} no-answer");
                all_refused = false;
            }
        }
    }
    // A header claiming more bytes than the datagram holds: the kernel drops it silently.
    raw.send(Command::Status as u8, &[], Some(4096))?;
    match raw.receive()? {
        None => println!("case=truncated-message ignored"),
        Some((errno, message)) => println!("case=truncated-message errno={errno} msg={message}"),
    }
    Ok(all_refused)
}

/// Size in bytes of a block device, from sysfs.
fn device_bytes(path: &str) -> Result<u64, String> {
    use std::os::unix::fs::MetadataExt;
    // By device number: a device-mapper node (/dev/mapper/NAME) is not named after its
    // sysfs entry.
    let rdev = std::fs::metadata(path)
        .map_err(|e| format!("{path}: {e}"))?
        .rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let text = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/size"))
        .map_err(|e| format!("size of {path}: {e}"))?;
    text.trim()
        .parse::<u64>()
        .map(|s| s * 512)
        .map_err(|e| format!("size of {path}: {e}"))
}

fn member(device: u32, offset: u64) -> Member {
    Member { device, offset }
}

fn extent(
    volume_offset: u64,
    length: u64,
    kind: ExtentKind,
    unit: u32,
    members: &[Member],
) -> Extent {
    let mut all = [Member::default(); MAX_MEMBERS];
    all[..members.len()].copy_from_slice(members);
    Extent {
        volume_offset,
        length,
        kind,
        stripe_unit: unit,
        member_count: members.len() as u8,
        flags: 0,
        members: all,
    }
}

/// The fixed layouts the host tests verify independently:
/// - `linear`: first half of the volume on device 0 at 1 MiB, second half on the last device
///   at 3 MiB (one device: all of it on device 0 at 1 MiB);
/// - `mirror`: replicas on device 0 at 1 MiB and device 1 at 2 MiB;
/// - `striped`: 64 KiB units alternating between device 0 at 1 MiB and device 1 at 1 MiB.
fn recipe(layout: &str, size: u64, devices: usize) -> Result<Vec<Extent>, String> {
    let replicated = ExtentKind::Replicated;
    Ok(match (layout, devices) {
        ("linear", 1) => vec![extent(0, size, replicated, 0, &[member(0, MIB)])],
        ("linear", n) if n >= 2 => vec![
            extent(0, size / 2, replicated, 0, &[member(0, MIB)]),
            extent(
                size / 2,
                size / 2,
                replicated,
                0,
                &[member(n as u32 - 1, 3 * MIB)],
            ),
        ],
        ("mirror", 2) => vec![extent(
            0,
            size,
            replicated,
            0,
            &[member(0, MIB), member(1, 2 * MIB)],
        )],
        ("striped", 2) => vec![extent(
            0,
            size,
            ExtentKind::Striped,
            65536,
            &[member(0, MIB), member(1, MIB)],
        )],
        _ => {
            return Err(format!(
                "no recipe for layout {layout} on {devices} devices"
            ))
        }
    })
}

fn encode_map(
    header: &MapHeader,
    devices: &[Device],
    extents: &[Extent],
) -> Result<Vec<u8>, String> {
    let mut bytes = vec![0u8; map::encoded_len(devices.len(), extents.len())];
    map::encode(header, devices, extents, &mut bytes).map_err(|e| e.message().to_string())?;
    Ok(bytes)
}

struct MapRequest {
    name: String,
    id: u64,
    epoch: u64,
    map: Vec<u8>,
    paths: Vec<String>,
}

impl MapRequest {
    fn from_args(args: &[String]) -> Result<MapRequest, String> {
        let usage = "arguments: NAME ID EPOCH LAYOUT SIZE_MIB DEV...";
        if args.len() < 6 {
            return Err(usage.to_string());
        }
        let number = |s: &str| s.parse::<u64>().map_err(|e| format!("{s}: {e} ({usage})"));
        let (id, epoch, size) = (
            number(&args[1])?,
            number(&args[2])?,
            number(&args[4])? * MIB,
        );
        let paths: Vec<String> = args[5..].to_vec();
        let mut devices = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            devices.push(Device {
                uuid: [i as u8 + 1; 16],
                size: device_bytes(path)?,
            });
        }
        let (layout, cow_chunk_bytes) = match args[3].strip_suffix("+cow") {
            Some(layout) => (layout, COW_CHUNK_BYTES),
            None => (args[3].as_str(), 0),
        };
        let (layout, flags) = match layout.strip_suffix("+sync") {
            Some(layout) => (layout, map::EXTENT_SYNCING),
            None => (layout, 0),
        };
        let mut extents = recipe(layout, size, paths.len())?;
        for extent in &mut extents {
            extent.flags = flags;
        }
        let header = MapHeader {
            volume_id: id,
            epoch,
            size,
            block_size: 4096,
            lease_ms: 30_000,
            device_count: devices.len() as u32,
            extent_count: extents.len() as u32,
            cow_generation: u64::from(cow_chunk_bytes != 0),
            cow_chunk_bytes,
        };
        Ok(MapRequest {
            name: args[0].clone(),
            id,
            epoch,
            map: encode_map(&header, &devices, &extents)?,
            paths,
        })
    }

    fn devices_attr(&self) -> Vec<u8> {
        let mut nested = Vec::new();
        for path in &self.paths {
            let payload = nul_terminated(path);
            let len = 4 + payload.len();
            nested.extend_from_slice(&(len as u16).to_ne_bytes());
            nested.extend_from_slice(&(Attr::DevicePath as u16).to_ne_bytes());
            nested.extend_from_slice(&payload);
            nested.resize(nested.len() + (4 - len % 4) % 4, 0);
        }
        nested
    }

    /// CREATE without LEASE_EXPIRES_NS (and IO_TIMEOUT_MS).
    fn create_attrs_without_lease(&self) -> Vec<(u16, Vec<u8>)> {
        vec![
            (Attr::VolumeId as u16, self.id.to_ne_bytes().to_vec()),
            (Attr::VolumeName as u16, nul_terminated(&self.name)),
            (Attr::Epoch as u16, self.epoch.to_ne_bytes().to_vec()),
            (Attr::Map as u16, self.map.clone()),
            (Attr::Devices as u16 | NLA_F_NESTED, self.devices_attr()),
            (Attr::Token as u16, b"test-token".to_vec()),
        ]
    }

    /// CREATE with a lease of `SANBLK_LEASE_MS` and, if set, `SANBLK_IO_TIMEOUT_MS`.
    fn create_attrs(&self) -> Vec<(u16, Vec<u8>)> {
        let lease_ms = env_number("SANBLK_LEASE_MS").unwrap_or(DEFAULT_LEASE_MS);
        let mut attrs = self.create_attrs_without_lease();
        attrs.push(lease_attr(lease_ms));
        if let Some(timeout) = env_number("SANBLK_IO_TIMEOUT_MS") {
            attrs.push((
                Attr::IoTimeoutMs as u16,
                (timeout as u32).to_ne_bytes().to_vec(),
            ));
        }
        attrs
    }

    /// UPDATE_MAP with the paths of the whole device table (devices new to the volume are
    /// opened from them).
    fn update_attrs(&self) -> Vec<(u16, Vec<u8>)> {
        vec![
            (Attr::VolumeId as u16, self.id.to_ne_bytes().to_vec()),
            (Attr::Epoch as u16, self.epoch.to_ne_bytes().to_vec()),
            (Attr::Map as u16, self.map.clone()),
            (Attr::Devices as u16 | NLA_F_NESTED, self.devices_attr()),
        ]
    }
}

/// An integer from the environment, if set.
fn env_number(name: &str) -> Option<i64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// CLOCK_MONOTONIC in nanoseconds: the kernel's `ktime_get()` clock.
fn monotonic_ns() -> i64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec * 1_000_000_000 + now.tv_nsec
}

/// LEASE_EXPIRES_NS for a lease of `ms` milliseconds from now (negative: already past).
fn lease_attr(ms: i64) -> (u16, Vec<u8>) {
    let deadline = (monotonic_ns() + ms * 1_000_000).max(0) as u64;
    (Attr::LeaseExpiresNs as u16, deadline.to_ne_bytes().to_vec())
}

/// VOLUME_ID and EPOCH, what QUIESCE, RESUME and RENEW start with.
fn volume_epoch(id: u64, epoch: u64) -> RawAttrs {
    vec![
        (Attr::VolumeId as u16, id.to_ne_bytes().to_vec()),
        (Attr::Epoch as u16, epoch.to_ne_bytes().to_vec()),
    ]
}

/// Sends each case and prints `case=<name> errno=<n> msg=<extack>` (or `accepted`); whether
/// all were refused.
fn refused_cases(link: &Link, cases: Vec<(&str, Command, RawAttrs)>) -> Result<bool, String> {
    let mut all_refused = true;
    for (name, command, attrs) in cases {
        match raw_request(link.family, command, &attrs)? {
            Ok(()) => {
                println!("case={name} accepted");
                all_refused = false;
            }
            Err((errno, message)) => println!("case={name} errno={errno} msg={message}"),
        }
    }
    Ok(all_refused)
}

/// Sends one request on a raw socket; `Ok(())` on success, the errno and message otherwise.
fn raw_request(
    family: u16,
    command: Command,
    attrs: &[(u16, Vec<u8>)],
) -> Result<Result<(), (i32, String)>, String> {
    let raw = RawLink::open(family)?;
    raw.send(command as u8, attrs, None)?;
    // QUIESCE answers once in-flight I/O drained, bounded by the I/O timeout (one hour at
    // most; the tests use short ones).
    let wait_ms = if command == Command::Quiesce {
        120_000
    } else {
        1000
    };
    match raw.receive_within(wait_ms)? {
        Some((0, _)) => Ok(Ok(())),
        Some((errno, message)) => Ok(Err((errno, message))),
        None => Err("no answer from the kernel".to_string()),
    }
}

fn report(result: Result<(), (i32, String)>) -> Result<bool, String> {
    match result {
        Ok(()) => Ok(true),
        Err((errno, message)) => Err(format!("refused: errno {errno}: {message}")),
    }
}

/// CREATE/UPDATE_MAP requests with hostile maps against real devices; prints one line per
/// case like `hostile`.
/// A SERVERS attribute payload: nested SERVER_ADDR strings.
fn servers_attr(servers: &[&str]) -> Vec<u8> {
    let mut nested = Vec::new();
    for server in servers {
        let payload = nul_terminated(server);
        let len = 4 + payload.len();
        nested.extend_from_slice(&(len as u16).to_ne_bytes());
        nested.extend_from_slice(&(Attr::ServerAddr as u16).to_ne_bytes());
        nested.extend_from_slice(&payload);
        nested.resize(nested.len() + (4 - len % 4) % 4, 0);
    }
    nested
}

fn hostile_maps(link: &Link, paths: &[String]) -> Result<bool, String> {
    let base_args: Vec<String> = ["victim", "77", "5", "linear", "8"]
        .iter()
        .map(|s| s.to_string())
        .chain(paths.iter().cloned())
        .collect();
    let good = MapRequest::from_args(&base_args)?;
    let size_of = |p: &String| device_bytes(p);
    let devices: Vec<Device> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            size_of(p).map(|size| Device {
                uuid: [i as u8 + 1; 16],
                size,
            })
        })
        .collect::<Result<_, _>>()?;
    let header = |size: u64, extents: usize| MapHeader {
        volume_id: 77,
        epoch: 5,
        size,
        block_size: 4096,
        lease_ms: 30_000,
        device_count: devices.len() as u32,
        extent_count: extents as u32,
        cow_generation: 0,
        cow_chunk_bytes: 0,
    };
    let r = ExtentKind::Replicated;
    let mut cases: Vec<(&str, Command, RawAttrs)> = Vec::new();
    // The map of one 8 MiB extent on device 0 with one COW store section per
    // (snapshot id, device, offset, length) of its single store extent.
    let one_extent = vec![extent(0, 8 * MIB, r, 0, &[member(0, MIB)])];
    let encode_with_stores = |h: &MapHeader, stores: &[(u64, u32, u64, u64)]| {
        let extents: Vec<[map::StoreExtent; 1]> = stores
            .iter()
            .map(|&(_, device, offset, length)| {
                [map::StoreExtent {
                    device,
                    offset,
                    length,
                }]
            })
            .collect();
        let sections: Vec<map::StoreSection> = stores
            .iter()
            .zip(&extents)
            .map(|(&(snapshot_id, _, _, length), extents)| {
                let section = map::MapCowStore {
                    snapshot_id,
                    store_bytes: length,
                    scan_from_sector: 0,
                    extent_count: 1,
                    chunk_bytes: h.cow_chunk_bytes,
                };
                (section, &extents[..])
            })
            .collect();
        let mut bytes =
            vec![0u8; map::encoded_len_with_stores(devices.len(), one_extent.len(), &sections)];
        map::encode_with_stores(h, &devices, &one_extent, &sections, &mut bytes)
            .map_err(|e| e.message().to_string())?;
        Ok::<_, String>(bytes)
    };
    let with_map = |map: Vec<u8>| {
        let mut attrs = good.create_attrs();
        attrs[3].1 = map;
        attrs
    };
    let overlapping = vec![
        extent(0, 8 * MIB, r, 0, &[member(0, MIB)]),
        extent(4 * MIB, 4 * MIB, r, 0, &[member(1, MIB)]),
    ];
    cases.push((
        "overlapping-extents",
        Command::Create,
        with_map(encode_map(&header(8 * MIB, 2), &devices, &overlapping)?),
    ));
    let shared_space = vec![
        extent(0, 4 * MIB, r, 0, &[member(0, MIB)]),
        extent(4 * MIB, 4 * MIB, r, 0, &[member(0, 2 * MIB)]),
    ];
    cases.push((
        "extents-share-device-space",
        Command::Create,
        with_map(encode_map(&header(8 * MIB, 2), &devices, &shared_space)?),
    ));
    let overflow = vec![extent(0, 8 * MIB, r, 0, &[member(0, u64::MAX - 4095)])];
    cases.push((
        "offset-overflow",
        Command::Create,
        with_map(encode_map(&header(8 * MIB, 1), &devices, &overflow)?),
    ));
    let beyond = vec![extent(
        0,
        8 * MIB,
        r,
        0,
        &[member(0, devices[0].size - 4 * MIB)],
    )];
    cases.push((
        "beyond-device-end",
        Command::Create,
        with_map(encode_map(&header(8 * MIB, 1), &devices, &beyond)?),
    ));
    // Extent flag bits the module does not know, the lowest and the highest.
    for (name, flags) in [
        ("unknown-extent-flag", map::EXTENT_SYNCING << 1),
        ("unknown-extent-flag-high", 1 << 15),
    ] {
        let mut flagged = extent(0, 8 * MIB, r, 0, &[member(0, MIB)]);
        flagged.flags = flags | map::EXTENT_SYNCING;
        cases.push((
            name,
            Command::Create,
            with_map(encode_map(&header(8 * MIB, 1), &devices, &[flagged])?),
        ));
    }
    // Copy-on-write tracking: a chunk size that is no power of two, one smaller than a
    // block, one beyond the largest, and a chunk size without a generation.
    for (name, generation, chunk) in [
        ("cow-chunk-not-power-of-two", 3, 3 * 4096),
        ("cow-chunk-below-block", 3, 2048),
        ("cow-chunk-absurd", 3, u32::MAX),
        ("cow-chunk-without-generation", 0, 65536),
        ("cow-generation-without-chunk", 3, 0),
    ] {
        let mut cow = header(8 * MIB, 1);
        cow.cow_generation = generation;
        cow.cow_chunk_bytes = chunk;
        cases.push((
            name,
            Command::Create,
            with_map(encode_map(&cow, &devices, &one_extent)?),
        ));
    }
    // A COW store section that would have the module write over the volume's own data,
    // beyond a device, for another snapshot, or without copy-on-write at all.
    let mut cow = header(8 * MIB, 1);
    cow.cow_generation = 3;
    cow.cow_chunk_bytes = 65536;
    for (name, generation, snapshot_id, store_extent) in [
        ("cow-store-over-volume-data", 3, 3, (0, 2 * MIB, 4 * MIB)),
        (
            "cow-store-beyond-device",
            3,
            3,
            (0, devices[0].size - MIB, 4 * MIB),
        ),
        ("cow-store-other-snapshot", 3, 4, (0, 16 * MIB, 4 * MIB)),
        ("cow-store-without-cow", 0, 3, (0, 16 * MIB, 4 * MIB)),
        ("cow-store-misaligned", 3, 3, (0, 16 * MIB + 512, 4 * MIB)),
    ] {
        let mut h = cow;
        if generation == 0 {
            h.cow_generation = 0;
            h.cow_chunk_bytes = 0;
        }
        let (device, offset, length) = store_extent;
        let bytes = encode_with_stores(&h, &[(snapshot_id, device, offset, length)])?;
        cases.push((name, Command::Create, with_map(bytes)));
    }
    // Two COW store sections: a second one for the snapshot of the first (the module would
    // copy twice into one store), and one for an older snapshot whose store overlaps the
    // newest one's (a copy into one store would overwrite the other's records or slots).
    for (name, second) in [
        ("cow-store-same-snapshot-twice", (3, 0, 20 * MIB, 4 * MIB)),
        ("cow-store-overlapping-another", (2, 0, 18 * MIB, 4 * MIB)),
    ] {
        let bytes = encode_with_stores(&cow, &[(3, 0, 16 * MIB, 4 * MIB), second])?;
        cases.push((name, Command::Create, with_map(bytes)));
    }
    // A store's own chunk size (a u32 at byte 24 of its section) below the map's, no power
    // of two or absurd (the module would lay slots out wrongly), and the reserved u32 after
    // it set.
    let section_at = map::encoded_len(devices.len(), one_extent.len());
    for (name, at, value) in [
        ("cow-store-chunk-below-map", 24, 32768u32),
        ("cow-store-chunk-not-power-of-two", 24, 3 * 65536),
        ("cow-store-chunk-absurd", 24, u32::MAX),
        ("cow-store-reserved-set", 28, 1),
    ] {
        let mut bytes = encode_with_stores(&cow, &[(3, 0, 16 * MIB, 4 * MIB)])?;
        bytes[section_at + at..section_at + at + 4].copy_from_slice(&value.to_le_bytes());
        cases.push((name, Command::Create, with_map(bytes)));
    }
    let unknown = vec![extent(0, 8 * MIB, r, 0, &[member(9, MIB)])];
    cases.push((
        "unknown-device-index",
        Command::Create,
        with_map(encode_map(&header(8 * MIB, 1), &devices, &unknown)?),
    ));
    // The map claims a device larger than the real one: the kernel checks the real size.
    let mut lying = devices.clone();
    lying[0].size = devices[0].size * 4;
    let far = vec![extent(
        0,
        8 * MIB,
        r,
        0,
        &[member(0, devices[0].size + MIB)],
    )];
    cases.push((
        "device-smaller-than-map",
        Command::Create,
        with_map(encode_map(&header(8 * MIB, 1), &lying, &far)?),
    ));
    let mut truncated = good.map.clone();
    truncated.truncate(truncated.len() - 8);
    cases.push(("truncated-map", Command::Create, with_map(truncated)));
    let mut other_volume = good.create_attrs();
    other_volume[0].1 = 78u64.to_ne_bytes().to_vec();
    cases.push(("map-for-another-volume", Command::Create, other_volume));
    let mut wrong_epoch = good.create_attrs();
    wrong_epoch[2].1 = 6u64.to_ne_bytes().to_vec();
    cases.push(("epoch-attribute-mismatch", Command::Create, wrong_epoch));
    let mut missing_path = good.create_attrs();
    missing_path[4].1 = MapRequest {
        paths: vec!["/dev/does-not-exist".into(); paths.len()],
        ..MapRequest::from_args(&base_args)?
    }
    .devices_attr();
    cases.push(("nonexistent-device-path", Command::Create, missing_path));
    let mut too_few = good.create_attrs();
    too_few[4].1 = MapRequest {
        paths: vec![paths[0].clone()],
        ..MapRequest::from_args(&base_args)?
    }
    .devices_attr();
    cases.push(("too-few-device-paths", Command::Create, too_few));
    let mut not_nested = good.create_attrs();
    not_nested[4].0 = Attr::Devices as u16;
    cases.push(("devices-without-nested-flag", Command::Create, not_nested));
    let mut bad_name = good.create_attrs();
    bad_name[1].1 = nul_terminated("../etc");
    cases.push(("bad-volume-name", Command::Create, bad_name));
    let with_servers = |servers: &[&str]| {
        let mut attrs = good.create_attrs();
        attrs.push((Attr::Servers as u16 | NLA_F_NESTED, servers_attr(servers)));
        attrs
    };
    cases.push((
        "bad-server-address",
        Command::Create,
        with_servers(&["10.0.2.100:7701", "server.example:7701"]),
    ));
    cases.push((
        "server-port-zero",
        Command::Create,
        with_servers(&["10.0.2.100:0"]),
    ));
    cases.push((
        "too-many-servers",
        Command::Create,
        with_servers(&[
            "10.0.0.1:1",
            "10.0.0.2:1",
            "10.0.0.3:1",
            "10.0.0.4:1",
            "10.0.0.5:1",
        ]),
    ));

    let mut all_refused = refused_cases(link, cases)?;
    // A real volume, then maps that must not replace its map.
    report(raw_request(
        link.family,
        Command::Create,
        &good.create_attrs(),
    )?)?;
    let duplicate = raw_request(link.family, Command::Create, &good.create_attrs())?;
    match duplicate {
        Ok(()) => {
            println!("case=duplicate-create accepted");
            all_refused = false;
        }
        Err((errno, message)) => println!("case=duplicate-create errno={errno} msg={message}"),
    }
    let victim_at = |epoch: &str| {
        MapRequest::from_args(
            &["victim", "77", epoch, "linear", "8"]
                .iter()
                .map(|s| s.to_string())
                .chain(paths.iter().cloned())
                .collect::<Vec<_>>(),
        )
    };
    let stale = victim_at("4")?;
    let same = MapRequest::from_args(&base_args)?;
    // A valid next epoch but for an unknown flag bit on its first extent.
    let mut flagged = victim_at("6")?;
    let device_count = u32::from_le_bytes([
        flagged.map[40],
        flagged.map[41],
        flagged.map[42],
        flagged.map[43],
    ]) as usize;
    let flags_at = map::HEADER_LEN + device_count * map::DEVICE_LEN + 18;
    flagged.map[flags_at..flags_at + 2].copy_from_slice(&(1u16 << 3).to_le_bytes());
    // A valid next epoch but for a copy-on-write chunk size of 3 blocks.
    let mut bad_cow = victim_at("6")?;
    bad_cow.map[48..56].copy_from_slice(&9u64.to_le_bytes());
    bad_cow.map[56..60].copy_from_slice(&(3u32 * 4096).to_le_bytes());
    let with_token = |token: Vec<u8>| {
        let mut attrs = good.update_attrs();
        attrs.push((Attr::Token as u16, token));
        attrs
    };
    let mut later = [
        ("epoch-regression", stale.update_attrs()),
        ("epoch-repeat", same.update_attrs()),
        ("update-unknown-extent-flag", flagged.update_attrs()),
        ("update-bad-cow-chunk", bad_cow.update_attrs()),
    ]
    .to_vec();
    later.extend([
        ("update-empty-token", with_token(Vec::new())),
        ("update-oversized-token", with_token(vec![7u8; 65])),
        (
            "set-state-unknown-device",
            set_state_attrs(77, "/dev/does-not-exist", 0),
        ),
        ("set-state-wrong-volume", set_state_attrs(78, &paths[0], 0)),
        ("set-state-failed", set_state_attrs(77, &paths[0], 1)),
        ("set-state-bad-state", set_state_attrs(77, &paths[0], 9)),
    ]);
    for (name, attrs) in later {
        let command = if name.starts_with("set-state") {
            Command::SetDeviceState
        } else {
            Command::UpdateMap
        };
        match raw_request(link.family, command, &attrs)? {
            Ok(()) => {
                println!("case={name} accepted");
                all_refused = false;
            }
            Err((errno, message)) => println!("case={name} errno={errno} msg={message}"),
        }
    }
    // Valid requests of the same kinds are taken: a new token for the current epoch (what the
    // agent sends after reconnecting), and healthy for a healthy device (no change).
    report(raw_request(
        link.family,
        Command::UpdateMap,
        &with_token(b"fresh-token".to_vec()),
    )?)?;
    report(raw_request(
        link.family,
        Command::SetDeviceState,
        &set_state_attrs(77, &paths[0], 0),
    )?)?;
    println!("case=valid-token-and-state accepted-as-expected");
    Ok(all_refused)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let link = match Link::open() {
        Ok(link) => link,
        Err(e) => {
            eprintln!("sanblk-nlprobe: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match mode.as_str() {
        "status" => status(&link).map(|()| true),
        "hostile" => hostile(&link),
        "hostile-maps" => hostile_maps(&link, &args[2..]),
        "events" => events(args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1)),
        "create" => MapRequest::from_args(&args[2..])
            .and_then(|r| raw_request(link.family, Command::Create, &r.create_attrs()))
            .and_then(report),
        "update" => MapRequest::from_args(&args[2..])
            .and_then(|r| raw_request(link.family, Command::UpdateMap, &r.update_attrs()))
            .and_then(report),
        "quiesce" | "resume" | "renew" => lease_command(&link, &mode, &args[2..]),
        "volumes" => volumes(&link).map(|()| true),
        "hostile-lease" => hostile_lease(&link, &args[2..]),
        "destroy" => args
            .get(2)
            .and_then(|id| id.parse::<u64>().ok())
            .ok_or_else(|| "usage: destroy ID".to_string())
            .and_then(|id| raw_request(link.family, Command::Destroy, &[(Attr::VolumeId as u16, id.to_ne_bytes().to_vec())]))
            .and_then(report),
        _ => Err("usage: sanblk-nlprobe status|hostile|hostile-maps DEV...|create ...|update ...|destroy ID".to_string()),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sanblk-nlprobe: {e}");
            ExitCode::from(2)
        }
    }
}

/// `quiesce|resume ID EPOCH`, `renew ID EPOCH MS`; prints `ok` or `errno=N msg=...` and
/// fails on a refusal.
fn lease_command(link: &Link, mode: &str, args: &[String]) -> Result<bool, String> {
    let number = |i: usize| -> Result<i64, String> {
        args.get(i).and_then(|a| a.parse().ok()).ok_or_else(|| {
            format!(
                "usage: {mode} ID EPOCH{}",
                if mode == "renew" { " MS" } else { "" }
            )
        })
    };
    let mut attrs = volume_epoch(number(0)? as u64, number(1)? as u64);
    let command = match mode {
        "quiesce" => Command::Quiesce,
        "resume" => Command::Resume,
        _ => {
            attrs.push(lease_attr(number(2)?));
            Command::Renew
        }
    };
    match raw_request(link.family, command, &attrs)? {
        Ok(()) => {
            println!("ok");
            Ok(true)
        }
        Err((errno, message)) => {
            println!("errno={errno} msg={message}");
            Ok(false)
        }
    }
}

/// One line per attached volume: `volume id=.. epoch=.. hold_reason=.. held_ios=..
/// lease_remaining_ms=.. timed_out_ios=.. io_timeout_ms=.. write_ios=.. read_ios=..`.
fn volumes(link: &Link) -> Result<(), String> {
    let reply = match link.request(Command::Status as u8, attrs(vec![])?)? {
        Outcome::Reply(reply) => reply,
        Outcome::Error { errno, message } => {
            return Err(format!("STATUS failed: errno {errno}: {message}"))
        }
    };
    let fields = [
        ("id", Attr::VolumeId),
        ("epoch", Attr::Epoch),
        ("hold_reason", Attr::HoldReason),
        ("held_ios", Attr::HeldIos),
        ("lease_remaining_ms", Attr::LeaseRemainingMs),
        ("timed_out_ios", Attr::TimedOutIos),
        ("io_timeout_ms", Attr::IoTimeoutMs),
        ("write_ios", Attr::WriteIos),
        ("read_ios", Attr::ReadIos),
    ];
    for top in reply.attrs().iter() {
        if u16::from(top.nla_type()) & 0x3fff != Attr::Volume as u16 {
            continue;
        }
        let handle = top.get_attr_handle::<u16>().map_err(|e| e.to_string())?;
        let mut line = String::from("volume");
        for (name, attr) in fields {
            let value = handle
                .get_attribute(attr as u16)
                .map(|a| {
                    let bytes = a.nla_payload().as_ref();
                    match bytes.len() {
                        4 => u32::from_ne_bytes(bytes.try_into().unwrap_or_default()).to_string(),
                        8 => u64::from_ne_bytes(bytes.try_into().unwrap_or_default()).to_string(),
                        _ => "invalid".to_string(),
                    }
                })
                .unwrap_or_else(|| "missing".to_string());
            line.push_str(&format!(" {name}={value}"));
        }
        println!("{line}");
    }
    Ok(())
}

/// Hostile QUIESCE, RESUME, RENEW, CREATE and UPDATE_MAP requests around a volume attached
/// on `paths` (id 90, epoch 3); prints `case=<name> errno=<n> msg=...` per case, then
/// `valid=<name> ok|errno=..` for the valid sequence that follows.
fn hostile_lease(link: &Link, paths: &[String]) -> Result<bool, String> {
    let args = |id: &str, name: &str, epoch: &str| -> Vec<String> {
        [name, id, epoch, "linear", "8"]
            .iter()
            .map(|s| s.to_string())
            .chain(paths.iter().cloned())
            .collect()
    };
    let volume = MapRequest::from_args(&args("90", "leased", "3"))?;
    report(raw_request(
        link.family,
        Command::Create,
        &volume.create_attrs(),
    )?)?;
    let other = MapRequest::from_args(&args("91", "other", "1"))?;
    let with_timeout = |ms: u32| {
        let mut attrs = other.create_attrs_without_lease();
        attrs.push(lease_attr(60_000));
        attrs.push((Attr::IoTimeoutMs as u16, ms.to_ne_bytes().to_vec()));
        attrs
    };
    let mut absurd_create = other.create_attrs_without_lease();
    absurd_create.push(lease_attr(2 * 3600 * 1000));
    let newer = MapRequest::from_args(&args("90", "leased", "4"))?;
    let mut absurd_update = newer.update_attrs();
    absurd_update.push(lease_attr(2 * 3600 * 1000));
    let renew = |id: u64, epoch: u64, ms: i64| {
        let mut attrs = volume_epoch(id, epoch);
        attrs.push(lease_attr(ms));
        attrs
    };
    let cases: Vec<(&str, Command, RawAttrs)> = vec![
        (
            "quiesce-unknown-volume",
            Command::Quiesce,
            volume_epoch(4242, 3),
        ),
        ("quiesce-stale-epoch", Command::Quiesce, volume_epoch(90, 2)),
        (
            "quiesce-future-epoch",
            Command::Quiesce,
            volume_epoch(90, 4),
        ),
        (
            "quiesce-missing-epoch",
            Command::Quiesce,
            vec![(Attr::VolumeId as u16, 90u64.to_ne_bytes().to_vec())],
        ),
        ("resume-not-quiesced", Command::Resume, volume_epoch(90, 3)),
        ("resume-stale-epoch", Command::Resume, volume_epoch(90, 2)),
        (
            "resume-unknown-volume",
            Command::Resume,
            volume_epoch(4242, 3),
        ),
        (
            "renew-unknown-volume",
            Command::Renew,
            renew(4242, 3, 60_000),
        ),
        ("renew-stale-epoch", Command::Renew, renew(90, 2, 60_000)),
        (
            "renew-absurd-deadline",
            Command::Renew,
            renew(90, 3, 2 * 3600 * 1000),
        ),
        (
            "renew-missing-deadline",
            Command::Renew,
            volume_epoch(90, 3),
        ),
        (
            "create-without-lease",
            Command::Create,
            other.create_attrs_without_lease(),
        ),
        (
            "create-io-timeout-too-small",
            Command::Create,
            with_timeout(999),
        ),
        (
            "create-io-timeout-too-large",
            Command::Create,
            with_timeout(3_600_001),
        ),
        ("create-absurd-lease", Command::Create, absurd_create),
        ("update-map-absurd-lease", Command::UpdateMap, absurd_update),
    ];
    let all_refused = refused_cases(link, cases)?;
    volumes(link)?;
    // The valid sequence: QUIESCE twice (an agent retrying), RESUME, RESUME again (refused),
    // RENEW with a deadline already past (taken, changes nothing).
    let valid: Vec<(&str, Command, RawAttrs)> = vec![
        ("quiesce", Command::Quiesce, volume_epoch(90, 3)),
        ("quiesce-repeat", Command::Quiesce, volume_epoch(90, 3)),
        ("resume", Command::Resume, volume_epoch(90, 3)),
        ("resume-again", Command::Resume, volume_epoch(90, 3)),
        ("renew-past", Command::Renew, renew(90, 3, -1000)),
    ];
    for (name, command, attrs) in valid {
        match raw_request(link.family, command, &attrs)? {
            Ok(()) => println!("valid={name} ok"),
            Err((errno, message)) => println!("valid={name} errno={errno} msg={message}"),
        }
    }
    Ok(all_refused)
}
