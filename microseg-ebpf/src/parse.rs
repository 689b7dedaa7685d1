//! Packet parsing: Ethernet (+ up to two 802.1Q/802.1ad tags), IPv4 (options via IHL,
//! fragments), IPv6 (bounded extension-header walk, fragments), then TCP, UDP and SCTP
//! ports and ICMP/ICMPv6 type and code.
//!
//! The rule for what cannot be parsed (see README, "Malformed packets"):
//! - not IP (ARP, LLDP, ...): passed without policy;
//! - a frame whose network layer cannot be found (more than two VLAN tags, or a TC
//!   packet the kernel handles as IP whose Ethernet header says otherwise): dropped
//!   (`UnsupportedL3Protocol`);
//! - an IP header that is truncated or invalid: dropped (`MalformedIp`), since the
//!   packet's endpoints cannot be known;
//! - a transport header that cannot be read (truncated, hidden behind too many IPv6
//!   extension headers, or in a later fragment whose first was not seen): the packet
//!   is dropped if either address is an enforced endpoint, passed otherwise.

use microseg_common::{
    DropReason,
    addr::{FAMILY_IPV4, FAMILY_IPV6, ipv4_mapped},
};

use crate::packet::PacketView;

const ETH_HEADER_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const MAX_VLAN_TAGS: usize = 2;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

const IPV6_HEADER_LEN: usize = 40;
/// IPv6 extension headers walked before giving up (`Ipv6HeaderChainTooLong`).
const MAX_IPV6_EXTENSION_HEADERS: usize = 6;

/// What the transport layer of a parsed IP packet is known to be.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Ports (or ICMP type/code) were read, or the protocol has none.
    Known,
    /// A later fragment: its ports must come from the first fragment.
    LaterFragment,
    /// Unreadable: the packet is dropped if it involves an enforced endpoint.
    Unknown(DropReason),
}

/// IP fragmentation state of a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    None,
    /// Offset 0 with more fragments to come: carries the transport header.
    First {
        id: u32,
    },
    Later {
        id: u32,
    },
}

/// The fields the decision needs, read once.
#[derive(Clone, Copy)]
pub struct PacketInfo {
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub protocol: u8,
    /// Transport ports; for an ICMP query both are its identifier (so a request and
    /// its reply share a flow); 0 where the protocol has no ports.
    pub src_port: u16,
    pub dst_port: u16,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// The request type of an ICMP query, request or reply (see `icmp_query_of`); 0
    /// for any other packet.
    pub icmp_query: u8,
    pub tcp_flags: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
    pub transport: Transport,
    pub fragment: Fragment,
    /// Offset of the transport header in the packet (for ICMP errors, whose quoted
    /// packet `related` reads).
    pub l4_offset: u16,
}

impl PacketInfo {
    /// What `parse` starts from: no addresses, no ports, transport known.
    pub const EMPTY: Self = Self {
        family: 0,
        src: [0; 16],
        dst: [0; 16],
        protocol: 0,
        src_port: 0,
        dst_port: 0,
        icmp_type: 0,
        icmp_code: 0,
        icmp_query: 0,
        tcp_flags: 0,
        hop_limit: 0,
        transport: Transport::Known,
        fragment: Fragment::None,
        l4_offset: 0,
    };

    /// The port a policy rule matched when this packet's flow was opened by the other
    /// side: the opener's destination port (`src_port` here), or for an ICMP query's
    /// reply the request's type (code 0).
    #[inline(always)]
    pub fn request_policy_port(&self, src_port: u16) -> u16 {
        if self.is_icmp_query_reply() {
            (self.icmp_query as u16) << 8
        } else {
            src_port
        }
    }

    /// An ICMP query's request (echo, timestamp, ...): like a bare TCP SYN it opens a
    /// flow, and is never taken for a reply.
    #[inline(always)]
    pub fn is_icmp_query_request(&self) -> bool {
        self.icmp_query != 0 && self.icmp_type == self.icmp_query
    }

    /// An ICMP query's reply: it continues the flow its request opened.
    #[inline(always)]
    pub fn is_icmp_query_reply(&self) -> bool {
        self.icmp_query != 0 && self.icmp_type != self.icmp_query
    }

    /// An ICMP or ICMPv6 message other than a query (an error, a redirect, a router
    /// message, an unknown type): not tracked, as nf_conntrack does not track them.
    /// Each is judged by policy; an error is first matched to the flow it quotes
    /// (`related`).
    #[inline(always)]
    pub fn is_untracked_icmp(&self) -> bool {
        self.icmp_query == 0 && self.protocol == icmp_of(self.family)
    }

    /// ICMPv6 neighbour discovery: router solicitation and advertisement, neighbour
    /// solicitation and advertisement, redirect (133-137), as RFC 4861 has it sent:
    /// IPv6, hop limit 255 (it never crossed a router), not fragmented (RFC 6980). It
    /// passes without policy (after `interface` has dropped advertisements and
    /// redirects from workloads); anything else with those types is judged by policy.
    #[inline(always)]
    pub fn is_neighbour_discovery(&self) -> bool {
        self.family == FAMILY_IPV6
            && self.protocol == PROTO_ICMPV6
            && self.transport == Transport::Known
            && matches!(self.fragment, Fragment::None)
            && self.hop_limit == 255
            && (133..=137).contains(&self.icmp_type)
    }

    /// The port a policy rule matches: the destination port, or for ICMP the type and
    /// code (`type << 8 | code`).
    #[inline(always)]
    pub fn policy_port(&self) -> u16 {
        if self.protocol == PROTO_ICMP || self.protocol == PROTO_ICMPV6 {
            ((self.icmp_type as u16) << 8) | self.icmp_code as u16
        } else {
            self.dst_port
        }
    }
}

pub enum Parsed {
    /// Not subject to policy: not IP.
    NotPolicyTraffic,
    /// IP: the caller's `PacketInfo` holds its fields.
    Ip,
}

/// What precedes the IP header.
#[derive(Clone, Copy)]
pub enum LinkLayer {
    /// An Ethernet header (XDP; TC on Ethernet devices). `skb_protocol` is the
    /// kernel's protocol of the packet (TC; in host order), 0 where unknown (XDP).
    Ethernet { skb_protocol: u16 },
    /// Nothing: the IP header comes first (TC on tun, WireGuard, ipip); the kernel's
    /// protocol of the packet says which IP.
    None { skb_protocol: u16 },
}

/// Parses into `info` (which starts as `PacketInfo::EMPTY`): written in place, so the
/// decision's stack frame holds one `PacketInfo` and nothing is copied.
#[inline(always)]
pub fn parse(
    packet: &PacketView,
    link: LinkLayer,
    info: &mut PacketInfo,
) -> Result<Parsed, DropReason> {
    let (ethertype, l3) = match link {
        LinkLayer::Ethernet { skb_protocol } => {
            let kernel_says_ip = skb_protocol == ETHERTYPE_IPV4 || skb_protocol == ETHERTYPE_IPV6;
            match parse_ethernet(packet) {
                // More tags than the parser walks: the network layer is unknown.
                Some((ETHERTYPE_VLAN | ETHERTYPE_QINQ, _)) => {
                    return Err(DropReason::UnsupportedL3Protocol);
                }
                Some((ethertype, l3))
                    if ethertype == ETHERTYPE_IPV4
                        || ethertype == ETHERTYPE_IPV6
                        || !kernel_says_ip =>
                {
                    (ethertype, l3)
                }
                // The kernel handles the packet as IP but its header does not say so:
                // not an Ethernet frame (a device without a link-layer header).
                Some(_) => return Err(DropReason::UnsupportedL3Protocol),
                None if kernel_says_ip => return Err(DropReason::MalformedIp),
                // Shorter than an Ethernet header: not an IP packet we could judge.
                None => return Ok(Parsed::NotPolicyTraffic),
            }
        }
        LinkLayer::None { skb_protocol } => (skb_protocol, 0),
    };
    match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(packet, l3, info)?,
        ETHERTYPE_IPV6 => parse_ipv6(packet, l3, info)?,
        _ => return Ok(Parsed::NotPolicyTraffic),
    }
    Ok(Parsed::Ip)
}

/// Returns the ethertype after any VLAN tags and the offset of the L3 header; the
/// ethertype is still a VLAN type if the frame has more tags than are walked.
#[inline(always)]
fn parse_ethernet(packet: &PacketView) -> Option<(u16, usize)> {
    let mut ethertype = packet.be16_at(12).ok()?;
    let mut offset = ETH_HEADER_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        // A tag is 2 bytes of TCI then the inner ethertype.
        ethertype = packet.be16_at(offset + 2).ok()?;
        offset += 4;
    }
    Some((ethertype, offset))
}

/// Out of line (as is `parse_ipv6`): keeps the scratch of header parsing out of the
/// decision's stack frame, which the BPF stack limit (512 bytes) makes scarce.
#[inline(never)]
fn parse_ipv4(packet: &PacketView, l3: usize, info: &mut PacketInfo) -> Result<(), DropReason> {
    // One read per header: separate reads at variable offsets let LLVM merge their
    // bounds checks and then use a pointer the verifier has not range-checked.
    let header = packet
        .read::<[u8; 20]>(l3)
        .map_err(|_| DropReason::MalformedIp)?;
    let ihl = (header[0] & 0x0f) as usize;
    if header[0] >> 4 != 4 || ihl < 5 {
        return Err(DropReason::MalformedIp);
    }
    let header_len = ihl * 4;
    // The whole header, options included, must be present.
    packet
        .u8_at(l3 + header_len - 1)
        .map_err(|_| DropReason::MalformedIp)?;
    let id = u16::from_be_bytes([header[4], header[5]]);
    let flags_offset = u16::from_be_bytes([header[6], header[7]]);
    let protocol = header[9];
    let ttl = header[8];
    let src = [header[12], header[13], header[14], header[15]];
    let dst = [header[16], header[17], header[18], header[19]];

    const MORE_FRAGMENTS: u16 = 0x2000;
    const OFFSET_MASK: u16 = 0x1fff;
    let fragment = if flags_offset & OFFSET_MASK != 0 {
        Fragment::Later { id: id as u32 }
    } else if flags_offset & MORE_FRAGMENTS != 0 {
        Fragment::First { id: id as u32 }
    } else {
        Fragment::None
    };

    info.family = FAMILY_IPV4;
    info.src = ipv4_mapped(src);
    info.dst = ipv4_mapped(dst);
    info.protocol = protocol;
    info.hop_limit = ttl;
    info.fragment = fragment;
    if let Fragment::Later { .. } = fragment {
        info.transport = Transport::LaterFragment;
    } else {
        parse_transport(packet, l3 + header_len, info);
    }
    Ok(())
}

#[inline(never)]
fn parse_ipv6(packet: &PacketView, l3: usize, info: &mut PacketInfo) -> Result<(), DropReason> {
    let header = packet
        .read::<[u8; IPV6_HEADER_LEN]>(l3)
        .map_err(|_| DropReason::MalformedIp)?;
    if header[0] >> 4 != 6 {
        return Err(DropReason::MalformedIp);
    }
    let mut next_header = header[6];
    info.family = FAMILY_IPV6;
    info.protocol = next_header;
    info.hop_limit = header[7];
    info.src.copy_from_slice(&header[8..24]);
    info.dst.copy_from_slice(&header[24..40]);
    let mut offset = l3 + IPV6_HEADER_LEN;
    let mut walked_all = false;
    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        if !is_extension_header(next_header) {
            walked_all = true;
            break;
        }
        // Every extension header is at least 8 bytes: next header, length, and the
        // fragment header's offset, flags and identification.
        let Ok(ext) = packet.read::<[u8; 8]>(offset) else {
            info.transport = Transport::Unknown(DropReason::MalformedL4);
            return Ok(());
        };
        let header_len = match next_header {
            44 => {
                let offset_flags = u16::from_be_bytes([ext[2], ext[3]]);
                let id = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
                if offset_flags >> 3 != 0 {
                    info.fragment = Fragment::Later { id };
                } else if offset_flags & 1 != 0 {
                    info.fragment = Fragment::First { id };
                }
                8
            }
            // Authentication header: length in 4-octet units after the first 8.
            51 => (ext[1] as usize + 2) * 4,
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6:
            // length in 8-octet units after the first 8.
            _ => (ext[1] as usize + 1) * 8,
        };
        next_header = ext[0];
        offset += header_len;
        if let Fragment::Later { .. } = info.fragment {
            info.protocol = next_header;
            info.transport = Transport::LaterFragment;
            return Ok(());
        }
    }
    info.protocol = next_header;
    if !walked_all && is_extension_header(next_header) {
        info.transport = Transport::Unknown(DropReason::Ipv6HeaderChainTooLong);
        return Ok(());
    }
    parse_transport(packet, offset, info);
    Ok(())
}

#[inline(always)]
fn is_extension_header(next_header: u8) -> bool {
    matches!(next_header, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140)
}

/// Reads ports or ICMP type/code at `l4`; marks the transport unknown if truncated.
/// Each header is read once (see `parse_ipv4`).
#[inline(always)]
fn parse_transport(packet: &PacketView, l4: usize, info: &mut PacketInfo) {
    let truncated = Transport::Unknown(DropReason::MalformedL4);
    info.l4_offset = l4 as u16;
    match info.protocol {
        PROTO_TCP => {
            let Ok(tcp) = packet.read::<[u8; 20]>(l4) else {
                info.transport = truncated;
                return;
            };
            info.src_port = u16::from_be_bytes([tcp[0], tcp[1]]);
            info.dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
            info.tcp_flags = tcp[13];
        }
        PROTO_UDP => {
            let Ok(udp) = packet.read::<[u8; 8]>(l4) else {
                info.transport = truncated;
                return;
            };
            info.src_port = u16::from_be_bytes([udp[0], udp[1]]);
            info.dst_port = u16::from_be_bytes([udp[2], udp[3]]);
        }
        PROTO_SCTP => {
            let Ok(sctp) = packet.read::<[u8; 12]>(l4) else {
                info.transport = truncated;
                return;
            };
            info.src_port = u16::from_be_bytes([sctp[0], sctp[1]]);
            info.dst_port = u16::from_be_bytes([sctp[2], sctp[3]]);
        }
        // ICMP only in IPv4 and ICMPv6 only in IPv6: the other family's number is a
        // protocol without ports here (never taken for neighbour discovery).
        PROTO_ICMP | PROTO_ICMPV6 if info.protocol == icmp_of(info.family) => {
            // Every ICMP and ICMPv6 message has an 8-byte header: type, code,
            // checksum, then 4 bytes (identifier and sequence for echo).
            let Ok(icmp) = packet.read::<[u8; 8]>(l4) else {
                info.transport = truncated;
                return;
            };
            info.icmp_type = icmp[0];
            info.icmp_code = icmp[1];
            let query = icmp_query_of(info.protocol, icmp[0]);
            if query != 0 {
                let identifier = u16::from_be_bytes([icmp[4], icmp[5]]);
                info.src_port = identifier;
                info.dst_port = identifier;
                info.icmp_query = query;
            }
        }
        // Other protocols have no ports to read.
        _ => {}
    }
}

/// The ICMP protocol number of an address family.
#[inline(always)]
fn icmp_of(family: u8) -> u8 {
    if family == FAMILY_IPV4 {
        PROTO_ICMP
    } else {
        PROTO_ICMPV6
    }
}

/// An ICMP error quoting the packet it reports on: destination unreachable (incl.
/// fragmentation needed), time exceeded, parameter problem; ICMPv6 destination
/// unreachable, packet too big, time exceeded, parameter problem.
#[inline(always)]
pub fn is_icmp_error(protocol: u8, icmp_type: u8) -> bool {
    if protocol == PROTO_ICMP {
        matches!(icmp_type, 3 | 11 | 12)
    } else if protocol == PROTO_ICMPV6 {
        matches!(icmp_type, 1..=4)
    } else {
        false
    }
}

/// The request type of an ICMP query message, for its request and its reply alike
/// (nf_conntrack's ICMP and ICMPv6 trackers: the messages with an identifier whose
/// reply answers one request): echo 8/0, timestamp 13/14, information 15/16, address
/// mask 17/18; ICMPv6 echo 128/129, node information 139/140. 0 for any other
/// message (0 is no request type).
#[inline(always)]
pub fn icmp_query_of(protocol: u8, icmp_type: u8) -> u8 {
    if protocol == PROTO_ICMP {
        match icmp_type {
            8 | 0 => 8,
            13 | 14 => 13,
            15 | 16 => 15,
            17 | 18 => 17,
            _ => 0,
        }
    } else if protocol == PROTO_ICMPV6 {
        match icmp_type {
            128 | 129 => 128,
            139 | 140 => 139,
            _ => 0,
        }
    } else {
        0
    }
}
