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

/// A truncated netlink message (header length larger than what is sent), written on a raw
/// socket because no library will build one.
fn send_truncated(family: u16) -> Result<i32, String> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_GENERIC) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    let mut message = Vec::new();
    message.extend_from_slice(&64u32.to_ne_bytes()); // claims 64 bytes
    message.extend_from_slice(&family.to_ne_bytes());
    message.extend_from_slice(&(libc::NLM_F_REQUEST as u16 | libc::NLM_F_ACK as u16).to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&[Command::Status as u8, FAMILY_VERSION, 0, 0]);
    // SAFETY: a zeroed sockaddr_nl addressed to the kernel (pid 0).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `message` and `kernel` are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd,
            message.as_ptr().cast(),
            message.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    let result = if sent < 0 {
        Ok(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        // The kernel drops a message whose length exceeds the datagram; an error reply, if
        // any, is not required. Report 0 = "sent, silently ignored".
        Ok(0)
    };
    // SAFETY: `fd` is the socket opened above.
    unsafe { libc::close(fd) };
    result
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
    let mut all_refused = true;
    for (name, command, list) in cases {
        match link.request(command, attrs(list)?)? {
            Outcome::Reply(_) => {
                println!("case={name} accepted");
                all_refused = false;
            }
            Outcome::Error { errno, message } => {
                println!("case={name} errno={errno} msg={message}");
            }
        }
    }
    println!("case=truncated-message sendto_errno={}", send_truncated(link.family)?);
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
