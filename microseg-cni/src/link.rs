//! Links as the kernel reports them (rtnetlink `RTM_GETLINK`), in this process's
//! network namespace or a pod's, and the pod's veth peer on the host found and
//! verified by index, not by name.

use std::{io, os::fd::AsRawFd, path::Path};

use nix::sys::{
    socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, setsockopt, socket,
        sockopt,
    },
    time::TimeVal,
};

/// One link: its index, name, the index of the link it is tied to (a veth's
/// peer, in the peer's namespace) and its kind (`veth`, `bridge`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub peer_index: Option<u32>,
    pub kind: Option<String>,
}

impl Link {
    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }
}

#[derive(Clone, Copy, Debug)]
pub enum LinkQuery<'a> {
    Name(&'a str),
    Index(u32),
}

const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLM_F_REQUEST: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
/// Attribute type bits that are flags, not the type.
const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);
const HEADER_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// The link `query` names in this thread's network namespace, if it exists.
pub fn get_link(query: LinkQuery<'_>) -> io::Result<Option<Link>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    // The kernel answers at once; a bound wait keeps a wedged kernel from hanging
    // the runtime.
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(5, 0))?;
    const SEQUENCE: u32 = 1;
    send(
        fd.as_raw_fd(),
        &encode_request(query, SEQUENCE),
        MsgFlags::empty(),
    )?;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let received = recv(fd.as_raw_fd(), &mut buffer, MsgFlags::empty())?;
        if let Some(answer) = parse_response(&buffer[..received], SEQUENCE)? {
            return Ok(answer);
        }
    }
}

/// An `RTM_GETLINK` request for one link.
fn encode_request(query: LinkQuery<'_>, sequence: u32) -> Vec<u8> {
    let (index, name) = match query {
        LinkQuery::Name(name) => (0i32, Some(name)),
        LinkQuery::Index(index) => (i32::try_from(index).unwrap_or(-1), None),
    };
    let mut message = Vec::with_capacity(64);
    message.extend_from_slice(&0u32.to_ne_bytes()); // length, filled in below
    message.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    message.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    message.extend_from_slice(&sequence.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    // ifinfomsg: family AF_UNSPEC, padding, type, index, flags, change mask.
    message.extend_from_slice(&[0, 0]);
    message.extend_from_slice(&0u16.to_ne_bytes());
    message.extend_from_slice(&index.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    if let Some(name) = name {
        let payload_len = name.len() + 1;
        let attribute_len = u16::try_from(4 + payload_len).unwrap_or(u16::MAX);
        message.extend_from_slice(&attribute_len.to_ne_bytes());
        message.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        message.extend_from_slice(name.as_bytes());
        message.push(0);
        message.resize(align4(message.len()), 0);
    }
    let length = u32::try_from(message.len()).unwrap_or(u32::MAX);
    message[..4].copy_from_slice(&length.to_ne_bytes());
    message
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Netlink attributes in `bytes`: (type, payload).
fn attributes(bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let length = usize::from(u16_at(bytes, at)?);
        let kind = u16_at(bytes, at + 2)? & NLA_TYPE_MASK;
        if length < 4 {
            return None;
        }
        let payload = bytes.get(at + 4..at + length)?;
        at += align4(length);
        Some((kind, payload))
    })
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The answer to request `sequence` in one datagram: `Some(Some(link))`,
/// `Some(None)` when no such link exists, `None` when the datagram holds no
/// answer to it.
fn parse_response(datagram: &[u8], sequence: u32) -> io::Result<Option<Option<Link>>> {
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink answer");
    let mut at = 0;
    while at + HEADER_LEN <= datagram.len() {
        let length = u32_at(datagram, at).ok_or_else(malformed)? as usize;
        let kind = u16_at(datagram, at + 4).ok_or_else(malformed)?;
        let answered = u32_at(datagram, at + 8).ok_or_else(malformed)?;
        if length < HEADER_LEN {
            return Err(malformed());
        }
        let message = datagram.get(at..at + length).ok_or_else(malformed)?;
        at += align4(length);
        if answered != sequence {
            continue;
        }
        match kind {
            NLMSG_ERROR => {
                let errno = u32_at(message, HEADER_LEN).ok_or_else(malformed)? as i32;
                return match -errno {
                    0 => Ok(None),
                    ENODEV => Ok(Some(None)),
                    errno => Err(io::Error::from_raw_os_error(errno)),
                };
            }
            RTM_NEWLINK => {
                let body = message.get(HEADER_LEN..).ok_or_else(malformed)?;
                let index = u32_at(body, 4).ok_or_else(malformed)?;
                let mut link = Link {
                    index,
                    name: String::new(),
                    peer_index: None,
                    kind: None,
                };
                for (kind, payload) in attributes(body.get(IFINFOMSG_LEN..).unwrap_or_default()) {
                    match kind {
                        IFLA_IFNAME => link.name = c_string(payload),
                        IFLA_LINK => link.peer_index = u32_at(payload, 0),
                        IFLA_LINKINFO => {
                            link.kind = attributes(payload)
                                .find(|(kind, _)| *kind == IFLA_INFO_KIND)
                                .map(|(_, kind)| c_string(kind));
                        }
                        _ => {}
                    }
                }
                return Ok(Some(Some(link)));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// "No such device": what the kernel answers for a link that does not exist.
const ENODEV: i32 = 19;

/// Runs `f` on a thread that has entered the network namespace at `path`: links it
/// asks for are that namespace's. This process's own threads stay where they are.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let namespace = std::fs::File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> io::Result<T> {
                nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(io::Error::other(
                    "the thread in the pod's namespace panicked",
                ))
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&u16::try_from(4 + payload.len()).unwrap().to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(payload);
        bytes.resize(align4(bytes.len()), 0);
        bytes
    }

    fn message(kind: u16, sequence: u32, body: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(
            &u32::try_from(HEADER_LEN + body.len())
                .unwrap()
                .to_ne_bytes(),
        );
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&0u16.to_ne_bytes());
        bytes.extend_from_slice(&sequence.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn a_request_by_name_carries_the_name_attribute() {
        let request = encode_request(LinkQuery::Name("veth1"), 7);
        assert_eq!(request.len(), HEADER_LEN + IFINFOMSG_LEN + 12);
        assert_eq!(u32_at(&request, 0), Some(request.len() as u32));
        assert_eq!(u16_at(&request, 4), Some(RTM_GETLINK));
        assert_eq!(u32_at(&request, 8), Some(7));
        let attributes: Vec<_> = attributes(&request[HEADER_LEN + IFINFOMSG_LEN..]).collect();
        assert_eq!(attributes, [(IFLA_IFNAME, &b"veth1\0"[..])]);
        let by_index = encode_request(LinkQuery::Index(42), 1);
        assert_eq!(u32_at(&by_index, HEADER_LEN + 4), Some(42));
        assert_eq!(by_index.len(), HEADER_LEN + IFINFOMSG_LEN);
    }

    #[test]
    fn a_veth_answer_gives_index_name_peer_and_kind() {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&12u32.to_ne_bytes());
        body.extend(attribute(IFLA_IFNAME, b"veth1\0"));
        body.extend(attribute(IFLA_LINK, &3u32.to_ne_bytes()));
        // Nested, with the nested flag set as the kernel does.
        body.extend(attribute(
            IFLA_LINKINFO | 0x8000,
            &attribute(IFLA_INFO_KIND, b"veth\0"),
        ));
        let mut datagram = message(RTM_NEWLINK, 9, &[0u8; IFINFOMSG_LEN]); // another request's
        datagram.extend(message(RTM_NEWLINK, 1, &body));
        let link = parse_response(&datagram, 1).unwrap().unwrap().unwrap();
        assert_eq!(
            link,
            Link {
                index: 12,
                name: "veth1".into(),
                peer_index: Some(3),
                kind: Some("veth".into())
            }
        );
        assert!(link.is_veth());
    }

    #[test]
    fn no_such_device_is_no_link_and_other_errors_are_errors() {
        let error = |errno: i32| message(NLMSG_ERROR, 1, &(-errno).to_ne_bytes());
        assert_eq!(parse_response(&error(ENODEV), 1).unwrap(), Some(None));
        assert_eq!(
            parse_response(&error(1), 1).unwrap_err().raw_os_error(),
            Some(1)
        );
        assert_eq!(parse_response(&error(ENODEV), 2).unwrap(), None);
    }
}
