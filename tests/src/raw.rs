//! Frames written straight onto a link (AF_PACKET), as a workload with CAP_NET_RAW
//! can: forged source addresses, router advertisements. Built with etherparse, with
//! correct checksums, so the receiver's stack accepts them on their merits.

use std::net::IpAddr;

use etherparse::PacketBuilder;

use crate::netns::NetNs;

/// An Ethernet frame carrying a UDP datagram.
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    ports: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac);
    let mut frame = Vec::new();
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => builder
            .ipv4(src.octets(), dst.octets(), 64)
            .udp(ports.0, ports.1)
            .write(&mut frame, payload),
        (IpAddr::V6(src), IpAddr::V6(dst)) => builder
            .ipv6(src.octets(), dst.octets(), 64)
            .udp(ports.0, ports.1)
            .write(&mut frame, payload),
        _ => panic!("mixed address families"),
    }
    .expect("building a frame");
    frame
}

/// An ICMPv6 router advertisement from `src` (link-local) to all nodes, hop limit
/// 255 as routers send them, announcing itself as the default router for 30 min.
pub fn router_advertisement(src_mac: [u8; 6], src: IpAddr) -> Vec<u8> {
    let IpAddr::V6(src) = src else {
        panic!("router advertisements are IPv6");
    };
    let all_nodes: std::net::Ipv6Addr = "ff02::1".parse().expect("address");
    let all_nodes_mac = [0x33, 0x33, 0, 0, 0, 1];
    // Current hop limit 64, flags 0, router lifetime 1800 s; then reachable time and
    // retransmit timer (0: unspecified).
    let builder = PacketBuilder::ethernet2(src_mac, all_nodes_mac)
        .ipv6(src.octets(), all_nodes.octets(), 255)
        .icmpv6_raw(134, 0, [64, 0, 0x07, 0x08]);
    let mut frame = Vec::new();
    builder
        .write(&mut frame, &[0; 8])
        .expect("building a frame");
    frame
}

/// A neighbour solicitation for `dst` itself, sent to its unicast address: the
/// neighbour unreachability probe of RFC 4861 7.3.3 (hop limit 255).
pub fn neighbour_solicitation(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
) -> Vec<u8> {
    // Reserved word, then the target address.
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(src.octets(), dst.octets(), 255)
        .icmpv6_raw(135, 0, [0; 4]);
    let mut frame = Vec::new();
    builder
        .write(&mut frame, &dst.octets())
        .expect("building a frame");
    frame
}

/// Sends `frame` out of `interface` of namespace `ns` through a packet socket.
pub fn send_frame(ns: &NetNs, interface: &str, frame: &[u8]) {
    let interface = interface.to_owned();
    ns.run_in(move || {
        let index = nix::net::if_::if_nametoindex(interface.as_str()).expect("interface index");
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                (libc::ETH_P_ALL as u16).to_be() as i32,
            )
        };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a new descriptor owned here; OwnedFd closes it.
        let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        use std::os::fd::AsRawFd;
        // SAFETY: sockaddr_ll is plain old data; all zeroes is a valid value.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_ifindex = index as i32;
        address.sll_halen = 6;
        address.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `address` live across the call; the lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            sent,
            frame.len() as isize,
            "sending a frame: {}",
            std::io::Error::last_os_error()
        );
    });
}

/// Receives ICMPv6 router advertisements in a namespace for as long as it lives,
/// counting them.
pub struct AdvertisementListener {
    socket: std::os::fd::OwnedFd,
}

impl AdvertisementListener {
    pub fn start(ns: &NetNs) -> Self {
        let socket = ns.run_in(|| {
            // SAFETY: socket(2) with constant arguments; the result is checked.
            let fd = unsafe {
                libc::socket(
                    libc::AF_INET6,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    libc::IPPROTO_ICMPV6,
                )
            };
            assert!(
                fd >= 0,
                "raw ICMPv6 socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: `fd` is a new descriptor owned here.
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        });
        Self { socket }
    }

    /// Router advertisements received since the last call (waits `wait` first).
    pub fn advertisements(&self, wait: std::time::Duration) -> usize {
        use std::os::fd::AsRawFd;
        std::thread::sleep(wait);
        let mut count = 0;
        let mut buffer = [0u8; 1500];
        loop {
            // SAFETY: `buffer` lives across the call and its length is passed.
            let received = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if received <= 0 {
                return count;
            }
            // A raw ICMPv6 socket delivers the ICMPv6 message: type first.
            if buffer[0] == 134 {
                count += 1;
            }
        }
    }
}

/// A raw ICMP (IPv4) or ICMPv6 socket in a namespace: sends any ICMP message, and
/// sees every ICMP message the namespace receives.
pub struct IcmpSocket {
    socket: socket2::Socket,
    ipv6: bool,
}

impl IcmpSocket {
    pub fn open(ns: &NetNs, ipv6: bool) -> Self {
        let socket = ns.run_in(move || {
            let (domain, protocol) = if ipv6 {
                (socket2::Domain::IPV6, socket2::Protocol::ICMPV6)
            } else {
                (socket2::Domain::IPV4, socket2::Protocol::ICMPV4)
            };
            socket2::Socket::new(domain, socket2::Type::RAW, Some(protocol))
                .expect("raw ICMP socket")
        });
        socket.set_nonblocking(true).expect("non-blocking");
        Self { socket, ipv6 }
    }

    /// Sends an ICMP message of `icmp_type` (code 0) to `to`, with `identifier` and
    /// sequence 1 where queries carry them, and 12 bytes of zeroes (a timestamp
    /// query's three timestamps; an echo's data). The kernel fills in an ICMPv6
    /// checksum; an ICMP one is computed here. An error may be the stack's word that
    /// a program on the way out dropped the packet (ENOBUFS from TC egress).
    pub fn send(&self, to: IpAddr, icmp_type: u8, identifier: u16) -> std::io::Result<()> {
        let mut message = vec![icmp_type, 0, 0, 0];
        message.extend_from_slice(&identifier.to_be_bytes());
        message.extend_from_slice(&1u16.to_be_bytes());
        message.extend_from_slice(&[0; 12]);
        if !self.ipv6 {
            let checksum = internet_checksum(&message);
            message[2..4].copy_from_slice(&checksum.to_be_bytes());
        }
        let address = socket2::SockAddr::from(std::net::SocketAddr::new(to, 0));
        self.socket.send_to(&message, &address).map(|_| ())
    }

    /// What arrived since the last call, after waiting `wait`: (source, type,
    /// identifier) of each message.
    pub fn received(&self, wait: std::time::Duration) -> Vec<(IpAddr, u8, u16)> {
        std::thread::sleep(wait);
        let mut messages = Vec::new();
        let mut buffer = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
        while let Ok((length, from)) = self.socket.recv_from(&mut buffer) {
            // SAFETY: recv_from initialised the first `length` bytes.
            let bytes: Vec<u8> = buffer[..length]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            // A raw IPv4 socket delivers the IP header too; an ICMPv6 one does not.
            let icmp = if self.ipv6 {
                &bytes[..]
            } else {
                let header_len = usize::from(bytes.first().copied().unwrap_or(0) & 0x0f) * 4;
                bytes.get(header_len..).unwrap_or(&[])
            };
            let (Some(source), Some(&icmp_type), Some(identifier)) = (
                from.as_socket().map(|a| a.ip()),
                icmp.first(),
                icmp.get(4..6),
            ) else {
                continue;
            };
            messages.push((
                source,
                icmp_type,
                u16::from_be_bytes([identifier[0], identifier[1]]),
            ));
        }
        messages
    }
}

/// The Internet checksum (RFC 1071) of `bytes`.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
