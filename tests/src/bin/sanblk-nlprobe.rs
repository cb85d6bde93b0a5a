//! Guest-side generic-netlink probe for the sanblk module.
//!
//! `sanblk-nlprobe status` asks the module for STATUS and prints `key=value` lines.
//! `sanblk-nlprobe hostile` sends malformed requests (unknown commands, missing, oversized,
//! mistyped and unknown attributes, a truncated message) and prints one line per case:
//! `case=<name> errno=<n> msg=<extack message>`; it exits 1 if any of them was accepted.
//! The host test checks the printed errnos and that STATUS still works afterwards.

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
use sanblk_uapi::netlink::{Attr, Command, FAMILY_NAME, FAMILY_VERSION};

type Message = Genlmsghdr<u8, u16>;

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
                Ok(Outcome::Error { errno: -err.error(), message })
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

fn status(link: &Link) -> Result<(), String> {
    match link.request(Command::Status as u8, attrs(vec![])?)? {
        Outcome::Reply(reply) => {
            let handle = reply.attrs().get_attr_handle();
            let u32_of = |a: Attr| handle.get_attr_payload_as::<u32>(a as u16).ok();
            let text_of = |a: Attr| {
                handle
                    .get_attribute(a as u16)
                    .map(|n| String::from_utf8_lossy(n.nla_payload().as_ref()).trim_end_matches('\0').to_string())
            };
            let show = |v: Option<String>| v.unwrap_or_else(|| "missing".to_string());
            println!("protocol_version={}", show(u32_of(Attr::ProtocolVersion).map(|v| v.to_string())));
            println!("module_version={}", show(text_of(Attr::ModuleVersion)));
            println!("block_major={}", show(u32_of(Attr::BlockMajor).map(|v| v.to_string())));
            println!("volume_count={}", show(u32_of(Attr::VolumeCount).map(|v| v.to_string())));
            Ok(())
        }
        Outcome::Error { errno, message } => Err(format!("STATUS failed: errno {errno}: {message}")),
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
    fn send(&self, command: u8, attributes: &[(u16, Vec<u8>)], claimed_len: Option<u32>) -> Result<(), String> {
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
        let mut poll = libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, 1000) } <= 0 {
            return Ok(None);
        }
        let mut buffer = vec![0u8; 65536];
        // SAFETY: `buffer` is writable for its whole length.
        let got = unsafe { libc::recv(self.fd, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        if got < 16 {
            return Err(format!("short netlink read: {}", std::io::Error::last_os_error()));
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
                    text = String::from_utf8_lossy(&buffer[at + 4..at + len]).trim_end_matches('\0').to_string();
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

fn hostile(link: &Link) -> Result<bool, String> {
    let long_name = nul_terminated(&"x".repeat(300));
    let cases: Vec<(&str, u8, Vec<(u16, Vec<u8>)>)> = vec![
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
        ("status-unknown-attribute", Command::Status as u8, vec![(200, vec![0u8; 4])]),
        ("status-pad-attribute", Command::Status as u8, vec![(Attr::Pad as u16, vec![0u8; 4])]),
        ("destroy-missing-volume", Command::Destroy as u8, vec![]),
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

fn main() -> ExitCode {
    let mode = std::env::args().nth(1).unwrap_or_default();
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
        _ => Err("usage: sanblk-nlprobe status|hostile".to_string()),
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
