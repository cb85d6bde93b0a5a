//! The `sanblk` generic-netlink family: name, commands, attributes and their policy.
//!
//! The attribute table below is the single source of truth: the kernel module's C shim gets its
//! `nla_policy` from a header generated out of [`ATTRIBUTES`] (see `examples/c_header.rs`), and
//! userspace encodes with the same numbers.

/// Generic-netlink family name (at most 15 bytes, kernel `GENL_NAMSIZ`).
pub const FAMILY_NAME: &str = "sanblk";
/// Family version announced in the genl header; bumped on incompatible changes.
pub const FAMILY_VERSION: u8 = 1;
/// Multicast group on which the module reports events (path failures, lease lapses, ...).
pub const EVENTS_GROUP: &str = "events";
/// Protocol version reported by STATUS in [`Attr::ProtocolVersion`].
pub const PROTOCOL_VERSION: u32 = 2;

/// Commands of the family. Values are part of the ABI: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Command {
    /// Attach a volume: map, device paths, server addresses, session token.
    Create = 1,
    /// Replace the map of an attached volume by a newer epoch. Optional TOKEN and SERVERS
    /// replace the server path's session token and addresses; the current epoch with the
    /// identical map is accepted too when one of them is present, to deliver only those (the
    /// agent reconnected to the server).
    UpdateMap = 2,
    /// Hold new I/O and drain in-flight I/O before a configuration change: [`Attr::Epoch`]
    /// must be the volume's current epoch (`ESTALE` otherwise). New bios are held (never
    /// failed); the reply comes once every bio mapped before it has completed (direct and
    /// server path), or `ETIMEDOUT` after the volume's I/O timeout (the volume stays
    /// quiesced). Repeating it for the same epoch is accepted (an agent retrying).
    Quiesce = 3,
    /// Release I/O held by [`Command::Quiesce`]: [`Attr::Epoch`] must be the volume's current
    /// epoch (the map installed while quiesced, or the same one to roll a change back;
    /// `ESTALE` otherwise), and the volume must be quiesced (`EINVAL` otherwise). Held bios are
    /// mapped with that epoch.
    Resume = 4,
    /// Detach a volume.
    Destroy = 5,
    /// Report the module's state.
    Status = 6,
    /// Start or end a copy-on-write snapshot.
    Snapshot = 7,
    /// Multicast notification from the module.
    Event = 8,
    /// Set the path state of one SAN device of a volume (fail-back after PATH_HEALED).
    SetDeviceState = 9,
    /// The server renewed the lease of the volume's current epoch ([`Attr::Epoch`], `ESTALE`
    /// for another) until [`Attr::LeaseExpiresNs`]. I/O held because the lease lapsed is
    /// released (unless the volume is quiesced).
    Renew = 10,
}

impl Command {
    /// Every command, in numeric order.
    pub const ALL: [Command; 10] = [
        Command::Create,
        Command::UpdateMap,
        Command::Quiesce,
        Command::Resume,
        Command::Destroy,
        Command::Status,
        Command::Snapshot,
        Command::Event,
        Command::SetDeviceState,
        Command::Renew,
    ];

    /// Decodes a command number; `None` for anything the family does not define.
    pub fn from_u8(value: u8) -> Option<Command> {
        Command::ALL.iter().copied().find(|c| *c as u8 == value)
    }

    /// Name used in the generated C header (`SANBLK_CMD_<NAME>`) and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Command::Create => "CREATE",
            Command::UpdateMap => "UPDATE_MAP",
            Command::Quiesce => "QUIESCE",
            Command::Resume => "RESUME",
            Command::Destroy => "DESTROY",
            Command::Status => "STATUS",
            Command::Snapshot => "SNAPSHOT",
            Command::Event => "EVENT",
            Command::SetDeviceState => "SET_DEVICE_STATE",
            Command::Renew => "RENEW",
        }
    }

    /// Whether the sender needs `CAP_NET_ADMIN` (everything but reading status).
    pub fn needs_admin(self) -> bool {
        !matches!(self, Command::Status)
    }

    /// Whether userspace may send this command (EVENT only flows from the kernel).
    pub fn accepted_from_userspace(self) -> bool {
        !matches!(self, Command::Event)
    }

    /// Attributes a request must carry; the module refuses the request with `EINVAL` and an
    /// extack message naming the first one missing.
    pub fn required_attributes(self) -> &'static [Attr] {
        match self {
            Command::Create => &[
                Attr::VolumeId,
                Attr::VolumeName,
                Attr::Epoch,
                Attr::Map,
                Attr::Devices,
                Attr::Token,
                Attr::LeaseExpiresNs,
            ],
            Command::UpdateMap => &[Attr::VolumeId, Attr::Epoch, Attr::Map],
            Command::Quiesce | Command::Resume => &[Attr::VolumeId, Attr::Epoch],
            Command::Destroy => &[Attr::VolumeId],
            Command::Snapshot => &[Attr::VolumeId, Attr::Epoch, Attr::Map],
            Command::SetDeviceState => &[Attr::VolumeId, Attr::DevicePath, Attr::DeviceState],
            Command::Renew => &[Attr::VolumeId, Attr::Epoch, Attr::LeaseExpiresNs],
            Command::Status | Command::Event => &[],
        }
    }
}

/// Attribute payload kinds, mapped onto the kernel's `nla_policy` types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttrKind {
    /// `NLA_U32`: exactly 4 bytes.
    U32,
    /// `NLA_U64`: exactly 8 bytes.
    U64,
    /// `NLA_NUL_STRING` with at most `max` bytes before the terminator.
    String { max: u16 },
    /// `NLA_BINARY` with at most `max` bytes.
    Binary { max: u16 },
    /// `NLA_NESTED`: contains attributes of this same table.
    Nested,
    /// Alignment padding for 64-bit values sent by the kernel; refused from userspace.
    Pad,
}

/// Attributes of the family. Values are part of the ABI: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Attr {
    /// STATUS reply: [`PROTOCOL_VERSION`] of the module.
    ProtocolVersion = 1,
    /// STATUS reply: module version string.
    ModuleVersion = 2,
    /// STATUS reply: block major the module registered.
    BlockMajor = 3,
    /// STATUS reply: number of attached volumes.
    VolumeCount = 4,
    /// Volume identifier assigned by the server.
    VolumeId = 5,
    /// Volume name (also the sysfs-visible name of the block device).
    VolumeName = 6,
    /// Map epoch.
    Epoch = 7,
    /// Encoded volume map.
    Map = 8,
    /// Local path of one SAN device (repeated inside [`Attr::Devices`]).
    DevicePath = 9,
    /// Nested list of [`Attr::DevicePath`].
    Devices = 10,
    /// Server I/O address, `a.b.c.d:port` (repeated inside [`Attr::Servers`]).
    ServerAddr = 11,
    /// Nested list of [`Attr::ServerAddr`].
    Servers = 12,
    /// Session token for the server I/O path (CREATE; optional in UPDATE_MAP, where a new
    /// token makes the server path reconnect with it).
    Token = 13,
    /// Minor index of a sanblk block device (`/dev/sanblkN`).
    DeviceIndex = 14,
    /// Event kind in an EVENT notification.
    EventKind = 15,
    /// Nested description of one attached volume in a STATUS reply.
    Volume = 16,
    /// Padding the kernel may insert before 64-bit attributes.
    Pad = 17,
    /// Volume size in bytes (STATUS).
    SizeBytes = 18,
    /// Flag (u32 0/1): attach read-only.
    ReadOnly = 19,
    /// Completed read bios (STATUS).
    ReadIos = 20,
    /// Completed write bios (STATUS).
    WriteIos = 21,
    /// Bytes read (STATUS).
    ReadBytes = 22,
    /// Bytes written (STATUS).
    WrittenBytes = 23,
    /// Path state of one SAN device ([`DeviceState`]).
    DeviceState = 24,
    /// I/O errors seen (STATUS, per volume or per device).
    ErrorCount = 25,
    /// Nested description of one SAN device in a STATUS reply.
    Device = 26,
    /// State of a volume's server path ([`ServerPathState`], STATUS).
    ServerState = 27,
    /// Pieces of I/O completed over the server path (STATUS).
    RedirectedIos = 28,
    /// CLOCK_MONOTONIC time, in nanoseconds, at which the lease lapses (CREATE, RENEW, and
    /// optional in UPDATE_MAP). The agent sends the time its renewal request was sent plus
    /// the lease, so the client's lease always ends before the server's.
    LeaseExpiresNs = 29,
    /// Bound on held I/O, in milliseconds (CREATE, optional, [`DEFAULT_IO_TIMEOUT_MS`],
    /// [`MIN_IO_TIMEOUT_MS`]..=[`MAX_IO_TIMEOUT_MS`]): a bio held longer fails with an I/O
    /// error, so no I/O waits forever. Also reported by STATUS.
    IoTimeoutMs = 30,
    /// Why new I/O is held ([`hold_reason`] bits, STATUS; 0 when I/O flows).
    HoldReason = 31,
    /// Bios held now (STATUS).
    HeldIos = 32,
    /// Milliseconds until the lease lapses, 0 once it has (STATUS).
    LeaseRemainingMs = 33,
    /// Held bios failed because they waited longer than the I/O timeout (STATUS).
    TimedOutIos = 34,
    /// Chunks the module preserved itself in a snapshot's COW store (STATUS).
    PreservedChunks = 35,
    /// The snapshot a CHUNKS_PRESERVED event is about (the map's COW store section's).
    SnapshotId = 36,
    /// Chunk numbers, little-endian u64 each, at most [`MAX_EVENT_CHUNKS`] (EVENT).
    Chunks = 37,
}

/// Most chunk numbers one CHUNKS_PRESERVED event carries.
pub const MAX_EVENT_CHUNKS: usize = 64;

/// Bits of [`Attr::HoldReason`].
pub mod hold_reason {
    /// A configuration change quiesced the volume.
    pub const QUIESCED: u32 = 1;
    /// The lease lapsed without renewal.
    pub const LEASE_LAPSED: u32 = 2;
}

/// Default bound on held I/O ([`Attr::IoTimeoutMs`]).
pub const DEFAULT_IO_TIMEOUT_MS: u32 = 60_000;
/// Smallest accepted [`Attr::IoTimeoutMs`].
pub const MIN_IO_TIMEOUT_MS: u32 = 1_000;
/// Largest accepted [`Attr::IoTimeoutMs`] (one hour).
pub const MAX_IO_TIMEOUT_MS: u32 = 3_600_000;

/// Kinds of EVENT notifications ([`Attr::EventKind`]) multicast on [`EVENTS_GROUP`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum EventKind {
    /// Direct I/O to a SAN device failed: [`Attr::VolumeId`], [`Attr::DevicePath`]; its
    /// extents now go to the server path.
    PathFailed = 1,
    /// A probe READ to a device marked failed succeeded: [`Attr::VolumeId`],
    /// [`Attr::DevicePath`]. The device stays failed until userspace sets it healthy
    /// ([`Command::SetDeviceState`]) once the server agrees. Repeated at most every
    /// few seconds while the device stays failed and in the map.
    PathHealed = 2,
    /// The lease of [`Attr::VolumeId`] lapsed without renewal: new I/O is held until a
    /// RENEW (or fails after the I/O timeout). Sent once per lapse.
    LeaseLapsed = 3,
    /// The module preserved chunks before their first write since snapshot
    /// [`Attr::SnapshotId`] of [`Attr::VolumeId`]: [`Attr::Chunks`] lists them (one event
    /// per copy batch). Their records in the COW store are durable before this is sent.
    ChunksPreserved = 4,
}

/// Most server I/O addresses one volume accepts in [`Attr::Servers`].
pub const MAX_SERVERS: usize = 4;

/// State of a volume's server path (the kernel TCP client) as the module sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ServerPathState {
    /// No server address was given: failed direct I/O fails upward.
    None = 0,
    /// Not connected (connecting, or waiting to reconnect).
    Disconnected = 1,
    /// Connected and authenticated (HELLO accepted).
    Connected = 2,
    /// The server refused the session token; queued I/O fails.
    Refused = 3,
}

impl ServerPathState {
    /// Decodes a state number.
    pub fn from_u32(value: u32) -> Option<ServerPathState> {
        match value {
            0 => Some(ServerPathState::None),
            1 => Some(ServerPathState::Disconnected),
            2 => Some(ServerPathState::Connected),
            3 => Some(ServerPathState::Refused),
            _ => None,
        }
    }

    /// Lower-case name for tools.
    pub fn name(self) -> &'static str {
        match self {
            ServerPathState::None => "none",
            ServerPathState::Disconnected => "disconnected",
            ServerPathState::Connected => "connected",
            ServerPathState::Refused => "refused",
        }
    }
}

/// Parses a server I/O address `a.b.c.d:port` (decimal, no leading `+`, port 1..=65535) into
/// the IPv4 address bytes in network order and the port.
pub fn parse_server_addr(text: &[u8]) -> Option<([u8; 4], u16)> {
    let colon = text.iter().position(|b| *b == b':')?;
    let (host, port) = (&text[..colon], &text[colon + 1..]);
    let mut ip = [0u8; 4];
    let mut parts = 0;
    for part in host.split(|b| *b == b'.') {
        if parts == 4 {
            return None;
        }
        ip[parts] = u8::try_from(parse_decimal(part, 3)?).ok()?;
        parts += 1;
    }
    if parts != 4 {
        return None;
    }
    let port = u16::try_from(parse_decimal(port, 5)?).ok()?;
    if port == 0 {
        return None;
    }
    Some((ip, port))
}

fn parse_decimal(digits: &[u8], max_len: usize) -> Option<u32> {
    if digits.is_empty() || digits.len() > max_len {
        return None;
    }
    digits.iter().try_fold(0u32, |acc, d| {
        d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
    })
}

/// Path state of a SAN device as the module sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum DeviceState {
    /// Direct I/O goes to the device.
    Healthy = 0,
    /// Direct I/O failed; the device's extents go to the server path.
    Failed = 1,
}

impl DeviceState {
    /// Decodes a state number.
    pub fn from_u32(value: u32) -> Option<DeviceState> {
        match value {
            0 => Some(DeviceState::Healthy),
            1 => Some(DeviceState::Failed),
            _ => None,
        }
    }
}

/// One row of the attribute table.
#[derive(Clone, Copy, Debug)]
pub struct AttrSpec {
    /// Attribute number.
    pub attr: Attr,
    /// Name used in the generated C header (`SANBLK_ATTR_<NAME>`).
    pub name: &'static str,
    /// Payload policy.
    pub kind: AttrKind,
}

/// Largest encoded map the module accepts, in bytes.
pub const MAX_MAP_BYTES: u16 = 32 * 1024;
/// Largest session token, in bytes.
pub const MAX_TOKEN_BYTES: u16 = 64;
/// Longest device path, in bytes.
pub const MAX_PATH_BYTES: u16 = 255;
/// Longest volume name, in bytes.
pub const MAX_VOLUME_NAME_BYTES: u16 = 63;

/// The attribute table: numbers, names and policy.
pub const ATTRIBUTES: [AttrSpec; 37] = [
    AttrSpec {
        attr: Attr::ProtocolVersion,
        name: "PROTOCOL_VERSION",
        kind: AttrKind::U32,
    },
    AttrSpec {
        attr: Attr::ModuleVersion,
        name: "MODULE_VERSION",
        kind: AttrKind::String { max: 31 },
    },
    AttrSpec {
        attr: Attr::BlockMajor,
        name: "BLOCK_MAJOR",
        kind: AttrKind::U32,
    },
    AttrSpec {
        attr: Attr::VolumeCount,
        name: "VOLUME_COUNT",
        kind: AttrKind::U32,
    },
    AttrSpec {
        attr: Attr::VolumeId,
        name: "VOLUME_ID",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::VolumeName,
        name: "VOLUME_NAME",
        kind: AttrKind::String {
            max: MAX_VOLUME_NAME_BYTES,
        },
    },
    AttrSpec {
        attr: Attr::Epoch,
        name: "EPOCH",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::Map,
        name: "MAP",
        kind: AttrKind::Binary { max: MAX_MAP_BYTES },
    },
    AttrSpec {
        attr: Attr::DevicePath,
        name: "DEVICE_PATH",
        kind: AttrKind::String {
            max: MAX_PATH_BYTES,
        },
    },
    AttrSpec {
        attr: Attr::Devices,
        name: "DEVICES",
        kind: AttrKind::Nested,
    },
    AttrSpec {
        attr: Attr::ServerAddr,
        name: "SERVER_ADDR",
        kind: AttrKind::String { max: 63 },
    },
    AttrSpec {
        attr: Attr::Servers,
        name: "SERVERS",
        kind: AttrKind::Nested,
    },
    AttrSpec {
        attr: Attr::Token,
        name: "TOKEN",
        kind: AttrKind::Binary {
            max: MAX_TOKEN_BYTES,
        },
    },
    AttrSpec {
        attr: Attr::DeviceIndex,
        name: "DEVICE_INDEX",
        kind: AttrKind::U32,
    },
    AttrSpec {
        attr: Attr::EventKind,
        name: "EVENT_KIND",
        kind: AttrKind::U32,
    },
    AttrSpec {
        attr: Attr::Volume,
        name: "VOLUME",
        kind: AttrKind::Nested,
    },
    AttrSpec {
        attr: Attr::Pad,
        name: "PAD",
        kind: AttrKind::Pad,
    },
    AttrSpec {
        attr: Attr::SizeBytes,
        name: "SIZE_BYTES",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::ReadOnly,
        name: "READ_ONLY",
        kind: AttrKind::U32,
    },
    AttrSpec {
        attr: Attr::ReadIos,
        name: "READ_IOS",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::WriteIos,
        name: "WRITE_IOS",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::ReadBytes,
        name: "READ_BYTES",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::WrittenBytes,
        name: "WRITTEN_BYTES",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::DeviceState,
        name: "DEVICE_STATE",
        kind: AttrKind::U32,
    },
    AttrSpec {
        attr: Attr::ErrorCount,
        name: "ERROR_COUNT",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::Device,
        name: "DEVICE",
        kind: AttrKind::Nested,
    },
    AttrSpec {
        attr: Attr::ServerState,
        name: "SERVER_STATE",
        kind: AttrKind::U32,
    },
    AttrSpec {
        attr: Attr::RedirectedIos,
        name: "REDIRECTED_IOS",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::LeaseExpiresNs,
        name: "LEASE_EXPIRES_NS",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::IoTimeoutMs,
        name: "IO_TIMEOUT_MS",
        kind: AttrKind::U32,
    },
    AttrSpec {
        attr: Attr::HoldReason,
        name: "HOLD_REASON",
        kind: AttrKind::U32,
    },
    AttrSpec {
        attr: Attr::HeldIos,
        name: "HELD_IOS",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::LeaseRemainingMs,
        name: "LEASE_REMAINING_MS",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::TimedOutIos,
        name: "TIMED_OUT_IOS",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::PreservedChunks,
        name: "PRESERVED_CHUNKS",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::SnapshotId,
        name: "SNAPSHOT_ID",
        kind: AttrKind::U64,
    },
    AttrSpec {
        attr: Attr::Chunks,
        name: "CHUNKS",
        kind: AttrKind::Binary {
            max: (MAX_EVENT_CHUNKS * 8) as u16,
        },
    },
];

/// Highest attribute number (`maxattr` of the family).
pub const ATTR_MAX: u16 = Attr::Chunks as u16;

impl Attr {
    /// Decodes an attribute number; `None` for numbers the family does not define.
    pub fn from_u16(value: u16) -> Option<Attr> {
        ATTRIBUTES
            .iter()
            .map(|s| s.attr)
            .find(|a| *a as u16 == value)
    }

    /// The policy row of this attribute.
    pub fn spec(self) -> &'static AttrSpec {
        // ATTRIBUTES is ordered by number starting at 1 (checked by a unit test).
        &ATTRIBUTES[self as usize - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_table_is_dense_and_ordered() {
        for (index, spec) in ATTRIBUTES.iter().enumerate() {
            assert_eq!(spec.attr as usize, index + 1, "{} out of order", spec.name);
            assert_eq!(spec.attr.spec().name, spec.name);
        }
        assert_eq!(ATTRIBUTES.len(), ATTR_MAX as usize);
    }

    #[test]
    fn attribute_numbers_round_trip_and_unknowns_are_rejected() {
        for spec in ATTRIBUTES.iter() {
            assert_eq!(Attr::from_u16(spec.attr as u16), Some(spec.attr));
        }
        assert_eq!(Attr::from_u16(0), None);
        assert_eq!(Attr::from_u16(ATTR_MAX + 1), None);
    }

    #[test]
    fn commands_round_trip_and_unknowns_are_rejected() {
        for cmd in Command::ALL {
            assert_eq!(Command::from_u8(cmd as u8), Some(cmd));
        }
        assert_eq!(Command::from_u8(0), None);
        assert_eq!(Command::from_u8(200), None);
        assert!(!Command::Status.needs_admin());
        assert!(Command::Create.needs_admin());
        assert!(!Command::Event.accepted_from_userspace());
    }

    #[test]
    fn server_addresses_parse_strictly() {
        assert_eq!(
            parse_server_addr(b"10.0.2.100:7701"),
            Some(([10, 0, 2, 100], 7701))
        );
        for bad in [
            &b""[..],
            b"10.0.2.100",
            b"10.0.2:1",
            b"10.0.2.1.5:1",
            b"256.0.0.1:1",
            b"1.2.3.4:0",
            b"1.2.3.4:65536",
            b"1.2.3.4:",
            b"a.b.c.d:1",
            b"1..3.4:1",
            b"1.2.3.4:12x",
            b"[::1]:80",
        ] {
            assert_eq!(parse_server_addr(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn names_fit_kernel_limits() {
        // GENL_NAMSIZ is 16 including the terminator.
        assert!(FAMILY_NAME.len() < 16);
        assert!(EVENTS_GROUP.len() < 16);
    }
}
