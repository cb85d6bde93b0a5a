//! The agent's side of the `sanblk` generic-netlink family: CREATE, UPDATE_MAP, RENEW,
//! QUIESCE, RESUME, DESTROY and STATUS requests to the kernel module, with the kernel's
//! extack message on refusal.

use neli::{
    consts::{nl::NlmF, socket::NlFamily},
    err::RouterError,
    genl::{Genlmsghdr, GenlmsghdrBuilder, Nlattr, NoUserHeader},
    nl::{NlPayload, Nlmsghdr},
    router::synchronous::NlRouter,
    types::{Buffer, GenlBuffer},
    utils::Groups,
};
use sanblk_uapi::netlink::{
    hold_reason, Attr, Command, DeviceState, ServerPathState, FAMILY_NAME, FAMILY_VERSION,
};
use serde::Serialize;

type Message = Genlmsghdr<u8, u16>;

/// extack attribute carrying the kernel's human-readable reason.
const NLMSGERR_ATTR_MSG: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "sanblk kernel module not loaded (no generic netlink family '{FAMILY_NAME}'): load it \
         first (`modprobe sanblk`, or `insmod sanblk.ko`)"
    )]
    NotLoaded,
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("kernel refused {command}: {message} ({errno_text})")]
    Refused {
        command: &'static str,
        errno: i32,
        errno_text: String,
        message: String,
    },
}

/// The reason for a refusal that came without an extack message: the generic-netlink core
/// refuses a command flagged admin-only (GENL_ADMIN_PERM) with a bare EPERM before the module
/// sees it, so that errno means a missing privilege.
fn unexplained_refusal(errno: i32) -> String {
    if errno == libc::EPERM || errno == libc::EACCES {
        "the sanblk commands that change the kernel's state need CAP_NET_ADMIN \
         (run sanctl as root)"
            .to_string()
    } else {
        "no reason given".to_string()
    }
}

/// The controller answers ENOENT for a family nobody registered: the module is not loaded.
/// Any other failure is told in one line (neli's own text of an error message dumps it).
fn family_lookup_error<T, P>(error: RouterError<T, P>) -> KernelError
where
    RouterError<T, P>: std::fmt::Display,
{
    match error {
        RouterError::Nlmsgerr(refusal) if *refusal.error() == -libc::ENOENT => {
            KernelError::NotLoaded
        }
        RouterError::Nlmsgerr(refusal) => KernelError::Netlink(format!(
            "cannot look up the generic netlink family '{FAMILY_NAME}': {refusal}"
        )),
        other => KernelError::Netlink(format!(
            "cannot look up the generic netlink family '{FAMILY_NAME}': {other}"
        )),
    }
}

/// What CREATE needs.
pub struct CreateRequest<'a> {
    pub volume_id: u64,
    pub name: &'a str,
    pub epoch: u64,
    pub map: &'a [u8],
    pub device_paths: &'a [String],
    pub token: &'a [u8],
    pub read_only: bool,
    /// Server I/O addresses (`a.b.c.d:port`) for the kernel's server path; may be empty.
    pub servers: &'a [String],
    /// CLOCK_MONOTONIC time (ns) at which the map's lease lapses ([`lease_deadline_ns`]).
    pub lease_expires_ns: u64,
    /// Bound on held I/O; `None` for the module's default.
    pub io_timeout_ms: Option<u32>,
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of the kernel's `ktime_get()`, so a lease
/// deadline computed here means the same instant to the module.
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the valid, local `now`; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}

/// The lease deadline for a grant of `lease_ms` asked for at `sent_ns` (the time the request
/// left, not the time the answer came: the client's lease must end before the server's).
pub fn lease_deadline_ns(sent_ns: u64, lease_ms: u64) -> u64 {
    sent_ns.saturating_add(lease_ms.saturating_mul(1_000_000))
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KernelDevice {
    pub path: String,
    pub state: String,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KernelVolume {
    pub volume_id: u64,
    pub name: String,
    pub epoch: u64,
    pub device: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub read_ios: u64,
    pub write_ios: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub errors: u64,
    pub devices: Vec<KernelDevice>,
    /// State of the kernel's server path: none, disconnected, connected, refused.
    pub server_path: String,
    pub servers: Vec<String>,
    /// Pieces of I/O completed over the server path.
    pub redirected_ios: u64,
    /// Chunks the module preserved itself in a snapshot's COW store.
    pub preserved_chunks: u64,
    /// Why new I/O is held: "quiesced" (a configuration change), "lease-lapsed"; empty when
    /// I/O flows.
    pub hold_reason: Vec<String>,
    /// Bios held now.
    pub held_ios: u64,
    /// Milliseconds until the lease lapses (0: lapsed).
    pub lease_remaining_ms: u64,
    /// Bound on held I/O.
    pub io_timeout_ms: u32,
    /// Held bios failed after waiting longer than the I/O timeout.
    pub timed_out_ios: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KernelStatus {
    pub protocol_version: u32,
    pub module_version: String,
    pub block_major: u32,
    pub volumes: Vec<KernelVolume>,
}

pub struct KernelLink {
    router: NlRouter,
    family: u16,
}

/// NETLINK_CAP_ACK keeps error replies to a large request (a map) small, and NETLINK_EXT_ACK
/// brings the kernel's reason; commands that change state are sent on such a socket and their
/// answer is read directly.
struct CommandSocket {
    fd: std::os::fd::OwnedFd,
}

const NLM_F_ACK_TLVS: u16 = 0x200;

/// Walks netlink attributes in `bytes`: (type without flags, payload).
fn attributes(bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut found = Vec::new();
    let mut at = 0;
    while at + 4 <= bytes.len() {
        let len = u16::from_ne_bytes([bytes[at], bytes[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[at + 2], bytes[at + 3]]) & 0x3fff;
        if len < 4 || at + len > bytes.len() {
            break;
        }
        found.push((kind, &bytes[at + 4..at + len]));
        at += (len + 3) & !3;
    }
    found
}

impl CommandSocket {
    fn open() -> Result<CommandSocket, KernelError> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the result is checked before being owned.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(KernelError::Netlink(format!(
                "socket: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        for option in [libc::NETLINK_CAP_ACK, libc::NETLINK_EXT_ACK] {
            let one: libc::c_int = 1;
            // SAFETY: `one` outlives the call and the length matches its type.
            let rc = unsafe {
                libc::setsockopt(
                    raw,
                    libc::SOL_NETLINK,
                    option,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            if rc < 0 {
                return Err(KernelError::Netlink(format!(
                    "setsockopt: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        Ok(CommandSocket { fd })
    }

    /// Sends a request and returns the attributes of the kernel's reply (empty for a plain
    /// ack), or the kernel's refusal with its reason.
    fn request(
        &self,
        family: u16,
        command: Command,
        attrs: &[(u16, bool, Vec<u8>)],
    ) -> Result<Vec<u8>, KernelError> {
        use std::os::fd::AsRawFd;
        let mut body = vec![command as u8, FAMILY_VERSION, 0, 0];
        for (kind, nested, payload) in attrs {
            let len = 4 + payload.len();
            let kind = if *nested { kind | (1 << 15) } else { *kind };
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(payload);
            body.resize(body.len() + (4 - len % 4) % 4, 0);
        }
        let mut message = Vec::with_capacity(16 + body.len());
        message.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        message.extend_from_slice(&family.to_ne_bytes());
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
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(KernelError::Netlink(format!(
                "sendto: {}",
                std::io::Error::last_os_error()
            )));
        }
        let mut reply_attrs = Vec::new();
        let mut buffer = vec![0u8; 65536];
        loop {
            // SAFETY: `buffer` is writable for its whole length.
            let got = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if got < 0 {
                return Err(KernelError::Netlink(format!(
                    "recv: {}",
                    std::io::Error::last_os_error()
                )));
            }
            let data = &buffer[..got as usize];
            let mut at = 0;
            while at + 16 <= data.len() {
                let len = u32::from_ne_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
                    as usize;
                if len < 16 || at + len > data.len() {
                    return Err(KernelError::Netlink("malformed netlink reply".into()));
                }
                let kind = u16::from_ne_bytes([data[at + 4], data[at + 5]]);
                let flags = u16::from_ne_bytes([data[at + 6], data[at + 7]]);
                let message = &data[at..at + len];
                if kind == libc::NLMSG_ERROR as u16 {
                    if message.len() < 20 {
                        return Err(KernelError::Netlink("short netlink error".into()));
                    }
                    let error =
                        i32::from_ne_bytes([message[16], message[17], message[18], message[19]]);
                    if error == 0 {
                        return Ok(reply_attrs);
                    }
                    let errno = -error;
                    let mut reason = unexplained_refusal(errno);
                    // With NETLINK_CAP_ACK only the request's header is echoed before the TLVs.
                    if flags & NLM_F_ACK_TLVS != 0 && message.len() > 36 {
                        for (kind, payload) in attributes(&message[36..]) {
                            if kind == NLMSGERR_ATTR_MSG {
                                reason = String::from_utf8_lossy(payload)
                                    .trim_end_matches('\0')
                                    .to_string();
                            }
                        }
                    }
                    return Err(KernelError::Refused {
                        command: command.name(),
                        errno,
                        errno_text: errno_text(errno),
                        message: reason,
                    });
                }
                if kind == family && message.len() >= 20 {
                    reply_attrs = message[20..].to_vec();
                }
                at += (len + 3) & !3;
            }
        }
    }
}

fn nul_terminated(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// Encodes a nested list of NUL-terminated strings, each an attribute of `entry_type`.
fn nested_strings(entry_type: u16, entries: &[String]) -> Vec<u8> {
    let mut nested = Vec::new();
    for entry in entries {
        let payload = nul_terminated(entry);
        let len = 4 + payload.len();
        nested.extend_from_slice(&(len as u16).to_ne_bytes());
        nested.extend_from_slice(&entry_type.to_ne_bytes());
        nested.extend_from_slice(&payload);
        nested.resize(nested.len() + (4 - len % 4) % 4, 0);
    }
    nested
}

fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

fn text_of(attr: &Nlattr<u16, Buffer>) -> String {
    String::from_utf8_lossy(attr.nla_payload().as_ref())
        .trim_end_matches('\0')
        .to_string()
}

fn u64_of(attr: &Nlattr<u16, Buffer>) -> u64 {
    let bytes = attr.nla_payload().as_ref();
    if bytes.len() == 8 {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(bytes);
        u64::from_ne_bytes(raw)
    } else {
        0
    }
}

/// The chunk numbers of a CHUNKS attribute (little-endian u64 each; a partial one dropped).
fn chunks_of(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|raw| {
            let mut chunk = [0u8; 8];
            chunk.copy_from_slice(raw);
            u64::from_le_bytes(chunk)
        })
        .collect()
}

fn u32_of(attr: &Nlattr<u16, Buffer>) -> u32 {
    let bytes = attr.nla_payload().as_ref();
    if bytes.len() == 4 {
        u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        0
    }
}

impl KernelLink {
    pub fn open() -> Result<KernelLink, KernelError> {
        let (router, _) =
            NlRouter::connect(NlFamily::Generic, None, Groups::empty()).map_err(|e| {
                KernelError::Netlink(format!("cannot open a generic netlink socket: {e}"))
            })?;
        router
            .enable_ext_ack(true)
            .map_err(|e| KernelError::Netlink(e.to_string()))?;
        let family = router
            .resolve_genl_family(FAMILY_NAME)
            .map_err(family_lookup_error)?;
        Ok(KernelLink { router, family })
    }

    fn request(
        &self,
        command: Command,
        attrs: Vec<Nlattr<u16, Buffer>>,
    ) -> Result<Option<Message>, KernelError> {
        let attrs: GenlBuffer<u16, Buffer> = attrs.into_iter().collect();
        let header = GenlmsghdrBuilder::<u8, u16, NoUserHeader>::default()
            .cmd(command as u8)
            .version(FAMILY_VERSION)
            .attrs(attrs)
            .build()
            .map_err(|e| KernelError::Netlink(e.to_string()))?;
        let replies = self
            .router
            .send::<_, _, u16, Message>(self.family, NlmF::ACK, NlPayload::Payload(header))
            .map_err(|e| KernelError::Netlink(e.to_string()))?;
        let mut answer = None;
        for reply in replies {
            match reply {
                Ok(message) => {
                    let message: Nlmsghdr<u16, Message> = message;
                    if let Some(payload) = message.get_payload() {
                        answer = Some(payload.clone());
                    }
                }
                Err(RouterError::Nlmsgerr(err)) => {
                    let errno = -err.error();
                    let message = err
                        .ext_ack()
                        .iter()
                        .find(|a| u16::from(a.nla_type()) & 0x3fff == NLMSGERR_ATTR_MSG)
                        .map(|a| {
                            String::from_utf8_lossy(a.nla_payload().as_ref())
                                .trim_end_matches('\0')
                                .to_string()
                        })
                        .unwrap_or_else(|| unexplained_refusal(errno));
                    return Err(KernelError::Refused {
                        command: command.name(),
                        errno,
                        errno_text: errno_text(errno),
                        message,
                    });
                }
                Err(other) => return Err(KernelError::Netlink(other.to_string())),
            }
        }
        Ok(answer)
    }

    /// Attaches a volume; returns the minor index N of `/dev/sanblkN`.
    pub fn create(&self, request: &CreateRequest<'_>) -> Result<u32, KernelError> {
        let attrs = vec![
            (
                Attr::VolumeId as u16,
                false,
                request.volume_id.to_ne_bytes().to_vec(),
            ),
            (Attr::VolumeName as u16, false, nul_terminated(request.name)),
            (
                Attr::Epoch as u16,
                false,
                request.epoch.to_ne_bytes().to_vec(),
            ),
            (Attr::Map as u16, false, request.map.to_vec()),
            (
                Attr::Devices as u16,
                true,
                nested_strings(Attr::DevicePath as u16, request.device_paths),
            ),
            (Attr::Token as u16, false, request.token.to_vec()),
            (
                Attr::ReadOnly as u16,
                false,
                (request.read_only as u32).to_ne_bytes().to_vec(),
            ),
            (
                Attr::LeaseExpiresNs as u16,
                false,
                request.lease_expires_ns.to_ne_bytes().to_vec(),
            ),
        ];
        let mut attrs = attrs;
        if let Some(io_timeout_ms) = request.io_timeout_ms {
            attrs.push((
                Attr::IoTimeoutMs as u16,
                false,
                io_timeout_ms.to_ne_bytes().to_vec(),
            ));
        }
        if !request.servers.is_empty() {
            attrs.push((
                Attr::Servers as u16,
                true,
                nested_strings(Attr::ServerAddr as u16, request.servers),
            ));
        }
        let reply = CommandSocket::open()?.request(self.family, Command::Create, &attrs)?;
        attributes(&reply)
            .into_iter()
            .find(|(kind, payload)| *kind == Attr::DeviceIndex as u16 && payload.len() == 4)
            .map(|(_, p)| u32::from_ne_bytes([p[0], p[1], p[2], p[3]]))
            .ok_or_else(|| KernelError::Netlink("CREATE reply lacks the device index".into()))
    }

    /// Installs a newer epoch; `device_paths` covers the new map's whole device table, so the
    /// kernel can open devices the volume did not use before. With `token`, the server path
    /// re-authenticates with it; the current epoch and map may be re-sent to deliver only a
    /// new token and server list. With `lease_expires_ns`, the new map's lease is renewed too.
    #[allow(clippy::too_many_arguments)]
    pub fn update_map(
        &self,
        volume_id: u64,
        epoch: u64,
        map: &[u8],
        device_paths: &[String],
        servers: &[String],
        token: Option<&[u8]>,
        lease_expires_ns: Option<u64>,
    ) -> Result<(), KernelError> {
        let mut attrs = vec![
            (
                Attr::VolumeId as u16,
                false,
                volume_id.to_ne_bytes().to_vec(),
            ),
            (Attr::Epoch as u16, false, epoch.to_ne_bytes().to_vec()),
            (Attr::Map as u16, false, map.to_vec()),
            (
                Attr::Devices as u16,
                true,
                nested_strings(Attr::DevicePath as u16, device_paths),
            ),
        ];
        if !servers.is_empty() {
            attrs.push((
                Attr::Servers as u16,
                true,
                nested_strings(Attr::ServerAddr as u16, servers),
            ));
        }
        if let Some(token) = token {
            attrs.push((Attr::Token as u16, false, token.to_vec()));
        }
        if let Some(expires) = lease_expires_ns {
            attrs.push((
                Attr::LeaseExpiresNs as u16,
                false,
                expires.to_ne_bytes().to_vec(),
            ));
        }
        CommandSocket::open()?
            .request(self.family, Command::UpdateMap, &attrs)
            .map(|_| ())
    }

    /// Extends the lease of `epoch` (the volume's current one) to `lease_expires_ns`;
    /// I/O held because the lease lapsed flows again.
    pub fn renew(
        &self,
        volume_id: u64,
        epoch: u64,
        lease_expires_ns: u64,
    ) -> Result<(), KernelError> {
        let attrs = vec![
            (
                Attr::VolumeId as u16,
                false,
                volume_id.to_ne_bytes().to_vec(),
            ),
            (Attr::Epoch as u16, false, epoch.to_ne_bytes().to_vec()),
            (
                Attr::LeaseExpiresNs as u16,
                false,
                lease_expires_ns.to_ne_bytes().to_vec(),
            ),
        ];
        CommandSocket::open()?
            .request(self.family, Command::Renew, &attrs)
            .map(|_| ())
    }

    /// Holds new I/O of the volume at `epoch` (its current one) and returns once the I/O
    /// already issued has completed (the kernel answers ETIMEDOUT after its I/O timeout).
    pub fn quiesce(&self, volume_id: u64, epoch: u64) -> Result<(), KernelError> {
        self.volume_epoch_command(Command::Quiesce, volume_id, epoch)
    }

    /// Releases I/O held by [`KernelLink::quiesce`]; `epoch` is the volume's current one.
    pub fn resume(&self, volume_id: u64, epoch: u64) -> Result<(), KernelError> {
        self.volume_epoch_command(Command::Resume, volume_id, epoch)
    }

    fn volume_epoch_command(
        &self,
        command: Command,
        volume_id: u64,
        epoch: u64,
    ) -> Result<(), KernelError> {
        let attrs = vec![
            (
                Attr::VolumeId as u16,
                false,
                volume_id.to_ne_bytes().to_vec(),
            ),
            (Attr::Epoch as u16, false, epoch.to_ne_bytes().to_vec()),
        ];
        CommandSocket::open()?
            .request(self.family, command, &attrs)
            .map(|_| ())
    }

    /// Fail-back: marks the SAN device at `device_path` of a volume healthy again, so new I/O
    /// goes direct to it.
    pub fn set_device_healthy(&self, volume_id: u64, device_path: &str) -> Result<(), KernelError> {
        let attrs = vec![
            (
                Attr::VolumeId as u16,
                false,
                volume_id.to_ne_bytes().to_vec(),
            ),
            (Attr::DevicePath as u16, false, nul_terminated(device_path)),
            (
                Attr::DeviceState as u16,
                false,
                (DeviceState::Healthy as u32).to_ne_bytes().to_vec(),
            ),
        ];
        CommandSocket::open()?
            .request(self.family, Command::SetDeviceState, &attrs)
            .map(|_| ())
    }

    pub fn destroy(&self, volume_id: u64) -> Result<(), KernelError> {
        let attrs = vec![(
            Attr::VolumeId as u16,
            false,
            volume_id.to_ne_bytes().to_vec(),
        )];
        CommandSocket::open()?
            .request(self.family, Command::Destroy, &attrs)
            .map(|_| ())
    }

    pub fn status(&self) -> Result<KernelStatus, KernelError> {
        let reply = self
            .request(Command::Status, Vec::new())?
            .ok_or_else(|| KernelError::Netlink("STATUS answered without a reply".into()))?;
        let mut status = KernelStatus {
            protocol_version: 0,
            module_version: String::new(),
            block_major: 0,
            volumes: Vec::new(),
        };
        for top in reply.attrs().iter() {
            match Attr::from_u16(u16::from(top.nla_type()) & 0x3fff) {
                Some(Attr::ProtocolVersion) => status.protocol_version = u32_of(top),
                Some(Attr::ModuleVersion) => status.module_version = text_of(top),
                Some(Attr::BlockMajor) => status.block_major = u32_of(top),
                Some(Attr::Volume) => status.volumes.push(parse_volume(top)?),
                _ => {}
            }
        }
        Ok(status)
    }
}

fn parse_volume(nest: &Nlattr<u16, Buffer>) -> Result<KernelVolume, KernelError> {
    let handle = nest
        .get_attr_handle::<u16>()
        .map_err(|e| KernelError::Netlink(e.to_string()))?;
    let mut volume = KernelVolume {
        volume_id: 0,
        name: String::new(),
        epoch: 0,
        device: String::new(),
        size_bytes: 0,
        read_only: false,
        read_ios: 0,
        write_ios: 0,
        read_bytes: 0,
        written_bytes: 0,
        errors: 0,
        devices: Vec::new(),
        server_path: ServerPathState::None.name().to_string(),
        servers: Vec::new(),
        redirected_ios: 0,
        preserved_chunks: 0,
        hold_reason: Vec::new(),
        held_ios: 0,
        lease_remaining_ms: 0,
        io_timeout_ms: 0,
        timed_out_ios: 0,
    };
    for attr in handle.iter() {
        match Attr::from_u16(u16::from(attr.nla_type()) & 0x3fff) {
            Some(Attr::VolumeId) => volume.volume_id = u64_of(attr),
            Some(Attr::VolumeName) => volume.name = text_of(attr),
            Some(Attr::Epoch) => volume.epoch = u64_of(attr),
            Some(Attr::DeviceIndex) => volume.device = format!("/dev/sanblk{}", u32_of(attr)),
            Some(Attr::SizeBytes) => volume.size_bytes = u64_of(attr),
            Some(Attr::ReadOnly) => volume.read_only = u32_of(attr) != 0,
            Some(Attr::ReadIos) => volume.read_ios = u64_of(attr),
            Some(Attr::WriteIos) => volume.write_ios = u64_of(attr),
            Some(Attr::ReadBytes) => volume.read_bytes = u64_of(attr),
            Some(Attr::WrittenBytes) => volume.written_bytes = u64_of(attr),
            Some(Attr::ErrorCount) => volume.errors = u64_of(attr),
            Some(Attr::ServerState) => {
                volume.server_path = ServerPathState::from_u32(u32_of(attr))
                    .map(|s| s.name())
                    .unwrap_or("unknown")
                    .to_string()
            }
            Some(Attr::RedirectedIos) => volume.redirected_ios = u64_of(attr),
            Some(Attr::PreservedChunks) => volume.preserved_chunks = u64_of(attr),
            Some(Attr::HoldReason) => volume.hold_reason = hold_reasons(u32_of(attr)),
            Some(Attr::HeldIos) => volume.held_ios = u64_of(attr),
            Some(Attr::LeaseRemainingMs) => volume.lease_remaining_ms = u64_of(attr),
            Some(Attr::IoTimeoutMs) => volume.io_timeout_ms = u32_of(attr),
            Some(Attr::TimedOutIos) => volume.timed_out_ios = u64_of(attr),
            Some(Attr::Servers) => {
                let inner = attr
                    .get_attr_handle::<u16>()
                    .map_err(|e| KernelError::Netlink(e.to_string()))?;
                for field in inner.iter() {
                    if u16::from(field.nla_type()) & 0x3fff == Attr::ServerAddr as u16 {
                        volume.servers.push(text_of(field));
                    }
                }
            }
            Some(Attr::Device) => {
                let inner = attr
                    .get_attr_handle::<u16>()
                    .map_err(|e| KernelError::Netlink(e.to_string()))?;
                let mut device = KernelDevice {
                    path: String::new(),
                    state: String::new(),
                    errors: 0,
                };
                for field in inner.iter() {
                    match Attr::from_u16(u16::from(field.nla_type()) & 0x3fff) {
                        Some(Attr::DevicePath) => device.path = text_of(field),
                        Some(Attr::DeviceState) => {
                            device.state = match DeviceState::from_u32(u32_of(field)) {
                                Some(DeviceState::Healthy) => "healthy".into(),
                                Some(DeviceState::Failed) => "failed".into(),
                                None => "unknown".into(),
                            }
                        }
                        Some(Attr::ErrorCount) => device.errors = u64_of(field),
                        _ => {}
                    }
                }
                volume.devices.push(device);
            }
            _ => {}
        }
    }
    Ok(volume)
}

/// The names of the bits of [`Attr::HoldReason`] (unknown bits by number).
fn hold_reasons(bits: u32) -> Vec<String> {
    let mut reasons = Vec::new();
    let mut rest = bits;
    for (bit, name) in [
        (hold_reason::QUIESCED, "quiesced"),
        (hold_reason::LEASE_LAPSED, "lease-lapsed"),
    ] {
        if rest & bit != 0 {
            reasons.push(name.to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        reasons.push(format!("0x{rest:x}"));
    }
    reasons
}

/// A notification the module multicasts on the `events` group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEvent {
    pub kind: u32,
    pub volume_id: u64,
    pub device_path: String,
    /// CHUNKS_PRESERVED: the snapshot and its chunks.
    pub snapshot_id: u64,
    pub chunks: Vec<u64>,
}

/// Joins the module's `events` multicast group and forwards every notification to `sender`
/// from a thread of its own (neli's receiver blocks); the thread ends with the receiver.
pub fn listen_events(
    sender: tokio::sync::mpsc::UnboundedSender<KernelEvent>,
) -> Result<(), KernelError> {
    let (router, mut multicast) = NlRouter::connect(NlFamily::Generic, None, Groups::empty())
        .map_err(|e| KernelError::Netlink(format!("cannot open a generic netlink socket: {e}")))?;
    let group = router
        .resolve_nl_mcast_group(FAMILY_NAME, sanblk_uapi::netlink::EVENTS_GROUP)
        .map_err(family_lookup_error)?;
    router
        .add_mcast_membership(Groups::new_groups(&[group]))
        .map_err(|e| KernelError::Netlink(format!("cannot join the events group: {e}")))?;
    std::thread::spawn(move || {
        // The router must live as long as its multicast receiver.
        let _router = router;
        while let Some(message) = multicast.next_typed::<u16, Message>() {
            let Ok(message) = message else { continue };
            let Some(payload) = message.get_payload() else {
                continue;
            };
            let mut event = KernelEvent {
                kind: 0,
                volume_id: 0,
                device_path: String::new(),
                snapshot_id: 0,
                chunks: Vec::new(),
            };
            for attr in payload.attrs().iter() {
                match Attr::from_u16(u16::from(attr.nla_type()) & 0x3fff) {
                    Some(Attr::EventKind) => event.kind = u32_of(attr),
                    Some(Attr::VolumeId) => event.volume_id = u64_of(attr),
                    Some(Attr::DevicePath) => event.device_path = text_of(attr),
                    Some(Attr::SnapshotId) => event.snapshot_id = u64_of(attr),
                    Some(Attr::Chunks) => event.chunks = chunks_of(attr.nla_payload().as_ref()),
                    _ => {}
                }
            }
            if sender.send(event).is_err() {
                break;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare EPERM from the generic-netlink core (an admin-only command sent without the
    /// privilege) names the privilege instead of "no reason given".
    #[test]
    fn refusals_without_a_reason_name_the_privilege() {
        let refused = KernelError::Refused {
            command: Command::Create.name(),
            errno: libc::EPERM,
            errno_text: errno_text(libc::EPERM),
            message: unexplained_refusal(libc::EPERM),
        }
        .to_string();
        assert!(
            refused.contains("need CAP_NET_ADMIN (run sanctl as root)"),
            "{refused}"
        );
        assert!(!refused.contains("no reason given"), "{refused}");
        assert_eq!(unexplained_refusal(libc::EINVAL), "no reason given");
    }

    #[test]
    fn chunk_lists_are_little_endian_u64s() {
        let mut bytes = Vec::new();
        for chunk in [7u64, 1 << 40] {
            bytes.extend_from_slice(&chunk.to_le_bytes());
        }
        assert_eq!(chunks_of(&bytes), vec![7, 1 << 40]);
        bytes.push(1);
        assert_eq!(chunks_of(&bytes), vec![7, 1 << 40]);
        assert!(chunks_of(&[]).is_empty());
    }

    #[test]
    fn hold_reasons_are_named_and_unknown_bits_kept() {
        assert!(hold_reasons(0).is_empty());
        assert_eq!(hold_reasons(3), vec!["quiesced", "lease-lapsed"]);
        assert_eq!(hold_reasons(2 | 8), vec!["lease-lapsed", "0x8"]);
    }

    #[test]
    fn the_lease_runs_from_the_request_not_the_answer() {
        let sent = monotonic_now_ns();
        assert!(monotonic_now_ns() >= sent);
        assert_eq!(lease_deadline_ns(sent, 6_000), sent + 6_000_000_000);
        assert_eq!(lease_deadline_ns(u64::MAX - 1, 6_000), u64::MAX);
    }
}
