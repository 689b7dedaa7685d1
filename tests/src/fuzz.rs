//! Structure-aware packet fuzzing of the real programs (see tests/tests/datapath_fuzz.rs
//! and fuzz/README.md): valid seed frames, random frames built from parts, and
//! mutations of both; and a reference classification, written independently of the
//! programs, of what a frame must get when one endpoint E (10.9.0.1 and fd09::1,
//! ingress and egress enforced, no allow rule) is loaded.
//!
//! libFuzzer's coverage cannot see inside BPF programs, so the generator is a seeded
//! random one (proptest's `TestRng`, ChaCha): the same seed gives the same frames.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use microseg::datapath::probe::Probe;
use proptest::{
    prelude::RngExt,
    test_runner::{RngAlgorithm, TestRng},
};

/// E's addresses: the one endpoint of the fuzzed state.
pub const ENDPOINT_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
pub const ENDPOINT_V6: Ipv6Addr = Ipv6Addr::new(0xfd09, 0, 0, 0, 0, 0, 0, 1);
/// A peer that is not an endpoint.
pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
pub const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd09, 0, 0, 0, 0, 0, 0, 2);

/// Frames are kept below what BPF_PROG_TEST_RUN takes in one page (about 3.5 KB).
pub const MAX_FRAME_LEN: usize = 1600;

const ETH_LEN: usize = 14;
const TPID_8021Q: u16 = 0x8100;
const TPID_8021AD: u16 = 0x88a8;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_ARP: u16 = 0x0806;
/// IPv6 extension headers the programs walk (and the reference walks).
const IPV6_EXTENSION_HEADERS: [u8; 8] = [0, 43, 44, 51, 60, 135, 139, 140];
const ICMPV6: u8 = 58;
/// ICMPv6 neighbour discovery: router solicitation and advertisement, neighbour
/// solicitation and advertisement, redirect.
const NEIGHBOUR_DISCOVERY: std::ops::RangeInclusive<u8> = 133..=137;

// ---------------------------------------------------------------------------------
// The reference classification.

/// What a frame must get from every program, by the reference classification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Not IP: shorter than an Ethernet header, a VLAN tag cut short, or another
    /// ethertype (ARP, ...). May pass.
    NotIp,
    /// Three or more VLAN tags (TPIDs 0x8100/0x88a8): the network layer cannot be
    /// found. Must drop.
    TooManyVlanTags,
    /// An IP ethertype (after at most two tags) with a truncated or invalid IP header
    /// (the README's malformed-packet rule). Must drop.
    MalformedIpHeader,
    /// IP, and E is neither source nor destination. Not judged: may pass or drop.
    NotInvolved,
    /// IPv6 involving E, ICMPv6 neighbour discovery with its 8-byte header (passes
    /// without policy). May pass. (An IPv4 packet with protocol 58 is not.)
    NeighbourDiscovery,
    /// IP involving E, an ICMPv6 neighbour discovery type whose header is cut short:
    /// whether it is neighbour discovery cannot be said. Not asserted.
    Unsure,
    /// IP involving E, anything else: judged, and denied (no rule allows anything).
    /// Must drop.
    MustDeny,
}

impl Class {
    pub const ALL: [Class; 7] = [
        Class::NotIp,
        Class::TooManyVlanTags,
        Class::MalformedIpHeader,
        Class::NotInvolved,
        Class::NeighbourDiscovery,
        Class::Unsure,
        Class::MustDeny,
    ];

    /// Whether no program may pass a frame of this class.
    pub fn must_drop(self) -> bool {
        matches!(
            self,
            Class::TooManyVlanTags | Class::MalformedIpHeader | Class::MustDeny
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::NotIp => "not IP",
            Class::TooManyVlanTags => "3+ VLAN tags",
            Class::MalformedIpHeader => "malformed IP header",
            Class::NotInvolved => "IP not involving E",
            Class::NeighbourDiscovery => "neighbour discovery",
            Class::Unsure => "unsure (cut ND header)",
            Class::MustDeny => "must deny (involves E)",
        }
    }
}

fn be16(frame: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_be_bytes([
        *frame.get(offset)?,
        *frame.get(offset + 1)?,
    ]))
}

/// Classifies an Ethernet frame (see [`Class`]). Written from the protocols, not from
/// the programs: the IPv6 extension header chain is walked to its end, however long
/// (the programs give up after six headers and drop).
pub fn classify(frame: &[u8]) -> Class {
    let Some(mut ethertype) = be16(frame, 12) else {
        return Class::NotIp;
    };
    let mut l3 = ETH_LEN;
    let mut tags = 0;
    while ethertype == TPID_8021Q || ethertype == TPID_8021AD {
        if tags == 2 {
            return Class::TooManyVlanTags;
        }
        // A tag: 2 bytes of TCI, then the inner ethertype.
        let Some(inner) = be16(frame, l3 + 2) else {
            return Class::NotIp;
        };
        ethertype = inner;
        l3 += 4;
        tags += 1;
    }
    match ethertype {
        ETHERTYPE_IPV4 => classify_ipv4(frame, l3),
        ETHERTYPE_IPV6 => classify_ipv6(frame, l3),
        _ => Class::NotIp,
    }
}

/// IPv4 has no neighbour discovery (protocol 58 over IPv4 is not ICMPv6's): every
/// packet involving E is judged.
fn classify_ipv4(frame: &[u8], l3: usize) -> Class {
    let Some(header) = frame.get(l3..l3 + 20) else {
        return Class::MalformedIpHeader;
    };
    let ihl = usize::from(header[0] & 0x0f);
    if header[0] >> 4 != 4 || ihl < 5 || frame.len() < l3 + ihl * 4 {
        return Class::MalformedIpHeader;
    }
    let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    if src == ENDPOINT_V4 || dst == ENDPOINT_V4 {
        Class::MustDeny
    } else {
        Class::NotInvolved
    }
}

fn classify_ipv6(frame: &[u8], l3: usize) -> Class {
    let Some(header) = frame.get(l3..l3 + 40) else {
        return Class::MalformedIpHeader;
    };
    if header[0] >> 4 != 6 {
        return Class::MalformedIpHeader;
    }
    let address = |at: usize| {
        let octets: [u8; 16] = header[at..at + 16].try_into().expect("16 bytes");
        Ipv6Addr::from(octets)
    };
    if address(8) != ENDPOINT_V6 && address(24) != ENDPOINT_V6 {
        return Class::NotInvolved;
    }
    // Involves E: denied unless it is neighbour discovery. Walk the whole chain.
    let mut next_header = header[6];
    let mut offset = l3 + 40;
    while IPV6_EXTENSION_HEADERS.contains(&next_header) {
        // A chain cut short holds no ICMPv6 message: not neighbour discovery.
        let Some(extension) = frame.get(offset..offset + 8) else {
            return Class::MustDeny;
        };
        let length = match next_header {
            44 => {
                // A later fragment carries no ICMPv6 header (and neighbour discovery
                // is never fragmented, RFC 6980).
                if u16::from_be_bytes([extension[2], extension[3]]) >> 3 != 0 {
                    return Class::MustDeny;
                }
                8
            }
            51 => (usize::from(extension[1]) + 2) * 4,
            _ => (usize::from(extension[1]) + 1) * 8,
        };
        next_header = extension[0];
        offset += length;
    }
    if next_header != ICMPV6 {
        return Class::MustDeny;
    }
    match frame.get(offset) {
        Some(icmp_type) if NEIGHBOUR_DISCOVERY.contains(icmp_type) => {
            if frame.len() >= offset + 8 {
                Class::NeighbourDiscovery
            } else {
                Class::Unsure
            }
        }
        // No type, or another one: not neighbour discovery.
        _ => Class::MustDeny,
    }
}

// ---------------------------------------------------------------------------------
// Frame generation.

/// A seeded random source (proptest's ChaCha `TestRng`).
pub struct FrameRng {
    rng: TestRng,
}

impl FrameRng {
    pub fn new(seed: u64) -> Self {
        let mut bytes = [0u8; 32];
        for (index, chunk) in bytes.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&(seed ^ (index as u64).wrapping_mul(0x9e37_79b9)).to_le_bytes());
        }
        Self {
            rng: TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
        }
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }

    /// True `percent` times in a hundred.
    pub fn percent(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn byte(&mut self) -> u8 {
        self.rng.random()
    }

    pub fn u16(&mut self) -> u16 {
        self.rng.random()
    }

    pub fn u32(&mut self) -> u32 {
        self.rng.random()
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// A frame and, when it was built here, where its layers start (for field
/// mutations).
#[derive(Clone, Debug, Default)]
pub struct Frame {
    pub bytes: Vec<u8>,
    /// Offset of the ethertype that names the network layer (after the tags).
    pub ethertype_at: Option<usize>,
    pub l3: Option<usize>,
    pub l4: Option<usize>,
    /// IPv6 extension headers: offset of each.
    pub extensions: Vec<usize>,
}

impl Frame {
    fn raw(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            ..Self::default()
        }
    }
}

/// Which end of a frame E is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Source,
    Destination,
    Both,
    Neither,
}

const ROLES: [Role; 4] = [Role::Source, Role::Destination, Role::Both, Role::Neither];

fn addresses(role: Role, v6: bool) -> (IpAddr, IpAddr) {
    let (endpoint, peer): (IpAddr, IpAddr) = if v6 {
        (ENDPOINT_V6.into(), PEER_V6.into())
    } else {
        (ENDPOINT_V4.into(), PEER_V4.into())
    };
    match role {
        Role::Source => (endpoint, peer),
        Role::Destination => (peer, endpoint),
        Role::Both => (endpoint, endpoint),
        Role::Neither => (peer, peer),
    }
}

/// Ethernet header with `tags` (TPIDs) and the final ethertype; returns the bytes and
/// the offset of that ethertype.
fn ethernet(tags: &[u16], ethertype: u16) -> (Vec<u8>, usize) {
    let mut bytes = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    for (index, tpid) in tags.iter().enumerate() {
        bytes.extend_from_slice(&tpid.to_be_bytes());
        // TCI: priority 0, VLAN 100 + index.
        bytes.extend_from_slice(&(100 + index as u16).to_be_bytes());
    }
    let at = bytes.len();
    bytes.extend_from_slice(&ethertype.to_be_bytes());
    (bytes, at)
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 fragment field: none, first (MF, offset 0), later (offset > 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragmentation {
    None,
    First,
    Later,
}

const FRAGMENTATIONS: [Fragmentation; 3] = [
    Fragmentation::None,
    Fragmentation::First,
    Fragmentation::Later,
];

fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    options: &[u8],
    payload_len: usize,
    fragmentation: Fragmentation,
) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40);
    let header_len = 20 + options.len();
    let total = (header_len + payload_len) as u16;
    let flags_offset: u16 = match fragmentation {
        Fragmentation::None => 0x4000, // DF
        Fragmentation::First => 0x2000,
        Fragmentation::Later => 0x2000 | 23,
    };
    let mut header = vec![0x40 | (header_len / 4) as u8, 0];
    header.extend_from_slice(&total.to_be_bytes());
    header.extend_from_slice(&0x1234u16.to_be_bytes());
    header.extend_from_slice(&flags_offset.to_be_bytes());
    header.extend_from_slice(&[64, protocol, 0, 0]);
    header.extend_from_slice(&src.octets());
    header.extend_from_slice(&dst.octets());
    header.extend_from_slice(options);
    let sum = checksum(&header);
    header[10..12].copy_from_slice(&sum.to_be_bytes());
    header
}

fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload_len: usize) -> Vec<u8> {
    let mut header = vec![0x60, 0, 0, 0];
    header.extend_from_slice(&(payload_len as u16).to_be_bytes());
    header.extend_from_slice(&[next_header, 64]);
    header.extend_from_slice(&src.octets());
    header.extend_from_slice(&dst.octets());
    header
}

/// IPv4 options of `words` 4-byte words: NOPs, a timestamp-like option, end.
fn ipv4_options(rng: &mut FrameRng, words: usize) -> Vec<u8> {
    let mut options = Vec::with_capacity(words * 4);
    while options.len() < words * 4 {
        match rng.below(4) {
            0 => options.push(1), // NOP
            1 => options.push(0), // end of list
            2 if words * 4 - options.len() >= 4 => {
                // Router alert (RFC 2113).
                options.extend_from_slice(&[0x94, 4, 0, 0]);
            }
            _ => options.push(rng.byte()),
        }
    }
    options.truncate(words * 4);
    options
}

/// The transport layer of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
    Sctp,
    /// ICMP or ICMPv6 by family, with this type.
    Icmp(u8),
    /// An ICMP error quoting a packet between the frame's addresses (reversed).
    IcmpError,
    /// The other family's ICMP with this type: IPv4 carrying protocol 58 (ICMPv6),
    /// IPv6 carrying next header 1 (ICMP). Neither is neighbour discovery.
    CrossIcmp(u8),
    /// Another protocol number and random bytes.
    Other(u8),
}

fn transport_bytes(
    rng: &mut FrameRng,
    transport: Transport,
    v6: bool,
    quoted: &[u8],
) -> (u8, Vec<u8>) {
    let ports = |rng: &mut FrameRng| {
        let mut bytes = rng
            .pick(&[80u16, 443, 53, 1024, 0, 65535])
            .to_be_bytes()
            .to_vec();
        bytes.extend_from_slice(&rng.pick(&[80u16, 443, 53, 8080, 0, 65535]).to_be_bytes());
        bytes
    };
    match transport {
        Transport::Tcp => {
            let mut tcp = ports(rng);
            tcp.extend_from_slice(&rng.u32().to_be_bytes());
            tcp.extend_from_slice(&rng.u32().to_be_bytes());
            // Data offset 5 words; flags SYN, ACK, SYN|ACK, FIN|ACK, RST or random.
            tcp.push(0x50);
            let random = rng.byte();
            tcp.push(rng.pick(&[0x02, 0x10, 0x12, 0x11, 0x04, random]));
            tcp.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]);
            (6, tcp)
        }
        Transport::Udp => {
            let mut udp = ports(rng);
            udp.extend_from_slice(&[0, 8, 0, 0]);
            (17, udp)
        }
        Transport::Sctp => {
            let mut sctp = ports(rng);
            sctp.extend_from_slice(&rng.bytes(8));
            (132, sctp)
        }
        Transport::Icmp(icmp_type) => {
            let mut icmp = vec![icmp_type, 0, 0, 0];
            icmp.extend_from_slice(&rng.u16().to_be_bytes());
            icmp.extend_from_slice(&[0, 1]);
            // Neighbour discovery bodies: a target address (NS/NA/redirect) or
            // router advertisement fields; random otherwise.
            let body = rng.below(3) * 8;
            icmp.extend(rng.bytes(body));
            (if v6 { ICMPV6 } else { 1 }, icmp)
        }
        Transport::CrossIcmp(icmp_type) => {
            let mut icmp = vec![icmp_type, 0, 0, 0, 0, 0, 0, 1];
            let body = rng.below(3) * 8;
            icmp.extend(rng.bytes(body));
            (if v6 { 1 } else { ICMPV6 }, icmp)
        }
        Transport::IcmpError => {
            // Destination unreachable (type 3 / ICMPv6 1), quoting `quoted`.
            let mut icmp = vec![
                if v6 { 1 } else { 3 },
                rng.pick(&[0, 1, 3, 4]),
                0,
                0,
                0,
                0,
                0,
                0,
            ];
            icmp.extend_from_slice(quoted);
            (if v6 { ICMPV6 } else { 1 }, icmp)
        }
        Transport::Other(protocol) => {
            let len = rng.below(24);
            (protocol, rng.bytes(len))
        }
    }
}

/// An IP packet quoted by an ICMP error: `src` to `dst`, IP header + 8 bytes.
fn quoted_packet(rng: &mut FrameRng, src: IpAddr, dst: IpAddr) -> Vec<u8> {
    let protocol = rng.pick(&[6u8, 17, 132, 1, 58]);
    let mut l4 = rng.pick(&[80u16, 443, 53]).to_be_bytes().to_vec();
    l4.extend_from_slice(&rng.pick(&[1024u16, 40000]).to_be_bytes());
    l4.extend_from_slice(&rng.u32().to_be_bytes());
    let mut packet = match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            ipv4_header(src, dst, protocol, &[], l4.len(), Fragmentation::None)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => ipv6_header(src, dst, protocol, l4.len()),
        _ => unreachable!("one family"),
    };
    packet.extend_from_slice(&l4);
    packet
}

/// One IPv6 extension header of `kind` followed by `next`.
fn extension_header(
    rng: &mut FrameRng,
    kind: u8,
    next: u8,
    fragmentation: Fragmentation,
) -> Vec<u8> {
    match kind {
        44 => {
            let offset_flags: u16 = match fragmentation {
                Fragmentation::None => 0,
                Fragmentation::First => 1,
                Fragmentation::Later => (185 << 3) | rng.pick(&[0u16, 1]),
            };
            let mut header = vec![next, 0];
            header.extend_from_slice(&offset_flags.to_be_bytes());
            header.extend_from_slice(&rng.u32().to_be_bytes());
            header
        }
        51 => {
            // Authentication header: (len + 2) 4-byte words; 1 gives 12 bytes (legal
            // for IPv4 only), 4 the usual 24.
            let len = rng.pick(&[1u8, 2, 4]);
            let mut header = vec![next, len, 0, 0];
            header.extend(rng.bytes((usize::from(len) + 2) * 4 - 4));
            header
        }
        _ => {
            let len = rng.pick(&[0u8, 0, 1, 2]);
            let mut header = vec![next, len];
            // PadN filling the rest.
            let rest = (usize::from(len) + 1) * 8 - 2;
            header.push(1);
            header.push((rest - 2) as u8);
            header.extend(std::iter::repeat_n(0, rest - 2));
            header
        }
    }
}

/// The parts of a built frame.
#[derive(Clone, Debug)]
pub struct Recipe {
    pub tags: Vec<u16>,
    pub v6: bool,
    pub role: Role,
    pub transport: Transport,
    pub ipv4_option_words: usize,
    pub extensions: Vec<u8>,
    pub fragmentation: Fragmentation,
    /// Replace E or the peer by an unusual address (multicast, IPv4-mapped E, ...).
    pub odd_address: bool,
    pub payload: usize,
}

impl Recipe {
    pub fn new(v6: bool, role: Role, transport: Transport) -> Self {
        Self {
            tags: Vec::new(),
            v6,
            role,
            transport,
            ipv4_option_words: 0,
            extensions: Vec::new(),
            fragmentation: Fragmentation::None,
            odd_address: false,
            payload: 0,
        }
    }

    /// A random recipe, biased towards frames that involve E.
    pub fn random(rng: &mut FrameRng) -> Self {
        let v6 = rng.percent(50);
        let role = rng.pick(&[
            Role::Source,
            Role::Destination,
            Role::Source,
            Role::Destination,
            Role::Both,
            Role::Neither,
        ]);
        let transport = match rng.below(9) {
            0 => Transport::Tcp,
            1 => Transport::Udp,
            2 => Transport::Sctp,
            3 | 4 if v6 => {
                Transport::Icmp(rng.pick(&[133, 134, 135, 136, 137, 128, 129, 1, 2, 143]))
            }
            3 | 4 => Transport::Icmp(rng.pick(&[8, 0, 3, 11, 5, 13])),
            5 if rng.percent(30) => {
                Transport::CrossIcmp(rng.pick(&[133, 134, 135, 136, 137, 128, 8, 0, 1]))
            }
            5 => Transport::IcmpError,
            6 => Transport::Other(rng.pick(&[0, 4, 41, 47, 50, 59, 89, 255, 44, 43, 60, 51])),
            _ => Transport::Other(rng.byte()),
        };
        let tags: Vec<u16> = (0..rng.pick(&[0usize, 0, 0, 1, 2, 3, 4]))
            .map(|_| rng.pick(&[TPID_8021Q, TPID_8021AD]))
            .collect();
        let extensions = if v6 {
            let count = rng.pick(&[0usize, 0, 1, 2, 3, 6, 7, 9]);
            (0..count)
                .map(|_| rng.pick(&IPV6_EXTENSION_HEADERS))
                .collect()
        } else {
            Vec::new()
        };
        Self {
            tags,
            v6,
            role,
            transport,
            ipv4_option_words: if !v6 && rng.percent(30) {
                1 + rng.below(10)
            } else {
                0
            },
            extensions,
            fragmentation: rng.pick(&FRAGMENTATIONS),
            odd_address: rng.percent(10),
            payload: rng.pick(&[0, 0, 0, 8, 64, 700]),
        }
    }

    pub fn build(&self, rng: &mut FrameRng) -> Frame {
        let (mut src, mut dst) = addresses(self.role, self.v6);
        if self.odd_address {
            let odd: IpAddr = if self.v6 {
                rng.pick(&[
                    "::ffff:10.9.0.1",
                    "ff02::1",
                    "fe80::1",
                    "::",
                    "::1",
                    "fd09::1:0:0:1",
                ])
                .parse()
                .expect("address")
            } else {
                rng.pick(&[
                    "255.255.255.255",
                    "224.0.0.1",
                    "0.0.0.0",
                    "127.0.0.1",
                    "10.9.0.255",
                ])
                .parse()
                .expect("address")
            };
            if rng.percent(50) {
                src = odd;
            } else {
                dst = odd;
            }
        }
        let quoted = quoted_packet(rng, dst, src);
        let (protocol, mut l4) = transport_bytes(rng, self.transport, self.v6, &quoted);
        l4.extend(rng.bytes(self.payload));
        let ethertype = if self.v6 {
            ETHERTYPE_IPV6
        } else {
            ETHERTYPE_IPV4
        };
        let (mut bytes, ethertype_at) = ethernet(&self.tags, ethertype);
        let l3 = bytes.len();
        let mut extensions = Vec::new();
        match (src, dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let options = ipv4_options(rng, self.ipv4_option_words);
                bytes.extend(ipv4_header(
                    src,
                    dst,
                    protocol,
                    &options,
                    l4.len(),
                    self.fragmentation,
                ));
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut chain = Vec::new();
                let kinds = &self.extensions;
                for (index, kind) in kinds.iter().enumerate() {
                    let next = kinds.get(index + 1).copied().unwrap_or(protocol);
                    let at = chain.len();
                    chain.extend(extension_header(rng, *kind, next, self.fragmentation));
                    extensions.push(l3 + 40 + at);
                }
                let first = kinds.first().copied().unwrap_or(protocol);
                bytes.extend(ipv6_header(src, dst, first, chain.len() + l4.len()));
                bytes.extend(chain);
            }
            _ => unreachable!("one family"),
        }
        let l4_at = bytes.len();
        bytes.extend(l4);
        bytes.truncate(MAX_FRAME_LEN);
        Frame {
            bytes,
            ethertype_at: Some(ethertype_at),
            l3: Some(l3),
            l4: Some(l4_at),
            extensions,
        }
    }
}

/// An ARP request (not IP: passes without policy).
fn arp(tags: &[u16], sender: Ipv4Addr, target: Ipv4Addr) -> Frame {
    let (mut bytes, at) = ethernet(tags, ETHERTYPE_ARP);
    let l3 = bytes.len();
    bytes.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    bytes.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    bytes.extend_from_slice(&sender.octets());
    bytes.extend_from_slice(&[0; 6]);
    bytes.extend_from_slice(&target.octets());
    Frame {
        bytes,
        ethertype_at: Some(at),
        l3: Some(l3),
        l4: None,
        extensions: Vec::new(),
    }
}

/// The valid frames mutations start from: probes (TCP, UDP, SCTP, ICMP) built by
/// `Probe`, and hand-built VLAN-tagged frames, IPv4 with options, IPv6 with each
/// extension header, fragments, ARP and ICMPv6 neighbour discovery; with E as
/// source, destination, both or neither.
pub fn seed_frames() -> Vec<Frame> {
    let mut rng = FrameRng::new(0x5eed);
    let mut seeds = Vec::new();
    for role in ROLES {
        for v6 in [false, true] {
            let (src, dst) = addresses(role, v6);
            let icmp_echo = if v6 { 128 } else { 8 };
            for probe in [
                Probe::tcp(src, 40000, dst, 80),
                Probe::udp(src, 40000, dst, 53),
                Probe::sctp(src, 40000, dst, 9),
                Probe::icmp(src, dst, icmp_echo, 0, 7),
                Probe::tcp(src, 443, dst, 40000).established(),
            ] {
                seeds.push(Frame::raw(probe.to_frame()));
            }
            let plain = [
                Transport::Tcp,
                Transport::Udp,
                Transport::IcmpError,
                Transport::Other(47),
                // Neighbour discovery's types in the other family's ICMP.
                Transport::CrossIcmp(135),
                Transport::CrossIcmp(134),
            ];
            for transport in plain {
                seeds.push(Recipe::new(v6, role, transport).build(&mut rng));
            }
            // VLAN: 1, 2 and 3 tags, each TPID.
            for tags in [
                vec![TPID_8021Q],
                vec![TPID_8021AD],
                vec![TPID_8021AD, TPID_8021Q],
                vec![TPID_8021Q, TPID_8021Q],
                vec![TPID_8021AD, TPID_8021Q, TPID_8021Q],
                vec![TPID_8021Q, TPID_8021AD, TPID_8021Q],
            ] {
                let mut recipe = Recipe::new(v6, role, Transport::Tcp);
                recipe.tags = tags;
                seeds.push(recipe.build(&mut rng));
            }
            for fragmentation in [Fragmentation::First, Fragmentation::Later] {
                let mut recipe = Recipe::new(v6, role, Transport::Udp);
                recipe.fragmentation = fragmentation;
                if v6 {
                    recipe.extensions = vec![44];
                }
                recipe.payload = 64;
                seeds.push(recipe.build(&mut rng));
            }
            if v6 {
                for kind in IPV6_EXTENSION_HEADERS {
                    let mut recipe = Recipe::new(true, role, Transport::Tcp);
                    recipe.extensions = vec![kind];
                    seeds.push(recipe.build(&mut rng));
                }
                for chain in [vec![0, 43, 60, 51, 60], vec![0, 60, 60, 60, 60, 60, 60]] {
                    let mut recipe = Recipe::new(true, role, Transport::Udp);
                    recipe.extensions = chain;
                    seeds.push(recipe.build(&mut rng));
                }
                for nd in NEIGHBOUR_DISCOVERY {
                    seeds.push(Recipe::new(true, role, Transport::Icmp(nd)).build(&mut rng));
                    let mut recipe = Recipe::new(true, role, Transport::Icmp(nd));
                    recipe.extensions = vec![0];
                    seeds.push(recipe.build(&mut rng));
                }
            } else {
                for words in [1, 3, 10] {
                    let mut recipe = Recipe::new(false, role, Transport::Tcp);
                    recipe.ipv4_option_words = words;
                    seeds.push(recipe.build(&mut rng));
                }
            }
        }
    }
    seeds.push(arp(&[], PEER_V4, ENDPOINT_V4));
    seeds.push(arp(&[TPID_8021Q], ENDPOINT_V4, PEER_V4));
    seeds
}

/// Bytes worth trying in a field.
const INTERESTING_BYTES: [u8; 16] = [
    0, 1, 0x7f, 0x80, 0xff, 5, 6, 17, 58, 132, 0x45, 0x4f, 0x60, 0x81, 0x88, 135,
];

/// Values worth trying in a 16-bit field.
const INTERESTING_U16: [u16; 10] = [
    0, 1, 0xffff, 0x0800, 0x86dd, 0x8100, 0x88a8, 0x0806, 0x05dc, 0x2000,
];

/// A field change that keeps the rest of the frame: ethertype, IPv4 version/IHL,
/// lengths, fragment field, protocol; IPv6 version, payload length, next header;
/// extension header next-header and length; ICMP type.
fn mutate_field(rng: &mut FrameRng, frame: &mut Frame) -> bool {
    let bytes = &mut frame.bytes;
    let set16 = |bytes: &mut Vec<u8>, at: usize, value: u16| {
        if let Some(field) = bytes.get_mut(at..at + 2) {
            field.copy_from_slice(&value.to_be_bytes());
        }
    };
    let set8 = |bytes: &mut Vec<u8>, at: usize, value: u8| {
        if let Some(field) = bytes.get_mut(at) {
            *field = value;
        }
    };
    match rng.below(6) {
        0 => {
            let Some(at) = frame.ethertype_at else {
                return false;
            };
            let value = rng.pick(&INTERESTING_U16);
            set16(bytes, at, value);
        }
        1 => {
            let Some(l3) = frame.l3 else { return false };
            let v6 = bytes.get(l3).is_some_and(|b| b >> 4 == 6);
            if v6 {
                match rng.below(3) {
                    0 => set8(bytes, l3, (rng.byte() & 0xf0) | (bytes[l3] & 0x0f)),
                    1 => set16(bytes, l3 + 4, rng.pick(&INTERESTING_U16)),
                    _ => {
                        let random = rng.byte();
                        let next =
                            rng.pick(&[0, 43, 44, 51, 60, 135, 139, 140, 58, 6, 17, 59, random]);
                        set8(bytes, l3 + 6, next);
                    }
                }
            } else {
                match rng.below(4) {
                    // Version and IHL.
                    0 => set8(bytes, l3, (rng.below(16) as u8) << 4 | rng.below(16) as u8),
                    1 => set16(bytes, l3 + 2, rng.pick(&INTERESTING_U16)),
                    2 => {
                        let random = rng.u16();
                        let value = rng.pick(&[0, 0x2000, 0x4000, 0x0001, 0x1fff, 0x3fff, random]);
                        set16(bytes, l3 + 6, value);
                    }
                    _ => set8(bytes, l3 + 9, rng.pick(&INTERESTING_BYTES)),
                }
            }
        }
        2 => {
            if frame.extensions.is_empty() {
                return false;
            }
            let at = rng.pick(&frame.extensions);
            let (random, random16) = (rng.byte(), rng.u16());
            match rng.below(3) {
                0 => set8(bytes, at, rng.pick(&[0, 43, 44, 51, 60, 58, 6, 59, random])),
                1 => set8(bytes, at + 1, rng.pick(&[0, 1, 2, 255, random])),
                // Fragment offset and flags (only a fragment header has them here).
                _ => set16(bytes, at + 2, rng.pick(&[0, 1, 8, 9, 0xfff8, random16])),
            }
        }
        3 => {
            let Some(l4) = frame.l4 else { return false };
            // ICMP type, TCP flags or data offset, ports.
            let random = rng.byte();
            match rng.below(3) {
                0 => set8(
                    bytes,
                    l4,
                    rng.pick(&[133, 134, 135, 136, 137, 128, 129, 0, 8, 3, 1, random]),
                ),
                1 => set8(bytes, l4 + 13, rng.byte()),
                _ => set16(bytes, l4 + rng.pick(&[0, 2]), rng.u16()),
            }
        }
        4 => {
            // Cut the frame inside a header.
            let ends: Vec<usize> = [frame.l3, frame.l4]
                .into_iter()
                .flatten()
                .chain(frame.extensions.iter().copied())
                .collect();
            if ends.is_empty() {
                return false;
            }
            let at = rng.pick(&ends) + rng.below(41);
            bytes.truncate(at);
        }
        _ => {
            // Add or remove a VLAN tag before the ethertype.
            let Some(at) = frame.ethertype_at.filter(|at| *at <= bytes.len()) else {
                return false;
            };
            if at > 12 && rng.percent(50) {
                bytes.drain(at - 4..at);
                shift(frame, at, -4);
            } else {
                let tpid = rng.pick(&[TPID_8021Q, TPID_8021AD]);
                let mut tag = tpid.to_be_bytes().to_vec();
                tag.extend_from_slice(&[0, 7]);
                bytes.splice(at..at, tag);
                shift(frame, at, 4);
            }
        }
    }
    true
}

/// Moves the recorded offsets at or after `at` by `delta` bytes.
fn shift(frame: &mut Frame, at: usize, delta: isize) {
    let moved = |offset: usize| {
        if offset >= at {
            offset.checked_add_signed(delta)
        } else {
            Some(offset)
        }
    };
    frame.ethertype_at = frame.ethertype_at.and_then(moved);
    frame.l3 = frame.l3.and_then(moved);
    frame.l4 = frame.l4.and_then(moved);
    frame.extensions = frame.extensions.iter().filter_map(|o| moved(*o)).collect();
}

/// One random change: a field change, a bit flip, an interesting byte, truncation,
/// inserted or deleted bytes, a copied block, or a splice with another frame.
pub fn mutate(rng: &mut FrameRng, frame: &mut Frame, others: &[Frame]) {
    if frame.bytes.is_empty() {
        let len = 1 + rng.below(64);
        frame.bytes = rng.bytes(len);
        return;
    }
    let len = frame.bytes.len();
    match rng.below(9) {
        0 | 1 => {
            if !mutate_field(rng, frame) {
                let at = rng.below(len);
                frame.bytes[at] ^= 1 << rng.below(8);
            }
        }
        2 => {
            let at = rng.below(len);
            frame.bytes[at] ^= 1 << rng.below(8);
        }
        3 => {
            let at = rng.below(len);
            frame.bytes[at] = rng.pick(&INTERESTING_BYTES);
        }
        4 => frame.bytes.truncate(rng.below(len)),
        5 => {
            let at = rng.below(len + 1);
            let count = 1 + rng.below(16);
            let inserted = rng.bytes(count);
            frame.bytes.splice(at..at, inserted);
            shift(frame, at, count as isize);
        }
        6 => {
            let at = rng.below(len);
            let end = (at + 1 + rng.below(16)).min(len);
            frame.bytes.drain(at..end);
            shift(frame, end, at as isize - end as isize);
        }
        7 => {
            // Copy a block over another place of the same frame.
            let from = rng.below(len);
            let to = rng.below(len);
            let count = (1 + rng.below(8)).min(len - from).min(len - to);
            let block = frame.bytes[from..from + count].to_vec();
            frame.bytes[to..to + count].copy_from_slice(&block);
        }
        _ => {
            // Splice: this frame's head, another's tail.
            if let Some(other) = others.get(rng.below(others.len().max(1))) {
                let at = rng.below(len + 1).min(other.bytes.len());
                let mut bytes = frame.bytes[..at].to_vec();
                bytes.extend_from_slice(&other.bytes[at..]);
                frame.bytes = bytes;
            }
        }
    }
    frame.bytes.truncate(MAX_FRAME_LEN);
}

/// The next fuzzed frame: a mutated seed (most), a fresh random frame (mutated or
/// not), or random bytes.
pub fn next_frame(rng: &mut FrameRng, seeds: &[Frame]) -> Frame {
    let mut frame = match rng.below(20) {
        0 => {
            let lengths = [rng.below(14), rng.below(64), rng.below(MAX_FRAME_LEN)];
            let len = rng.pick(&lengths);
            return Frame::raw(rng.bytes(len));
        }
        1 => {
            // Random bytes behind a valid Ethernet (and maybe IP) start.
            let mut frame = Recipe::random(rng).build(rng);
            let keep = frame.l3.unwrap_or(ETH_LEN) + rng.below(20);
            frame.bytes.truncate(keep);
            let len = rng.below(200);
            frame.bytes.extend(rng.bytes(len));
            return frame;
        }
        2..=7 => Recipe::random(rng).build(rng),
        _ => seeds[rng.below(seeds.len())].clone(),
    };
    let mutations = rng.pick(&[0, 1, 1, 1, 2, 2, 3, 4, 8]);
    for _ in 0..mutations {
        mutate(rng, &mut frame, seeds);
    }
    frame
}

// ---------------------------------------------------------------------------------
// Saved frames.

/// Hex text of a frame, 32 bytes a line.
pub fn to_hex(frame: &[u8]) -> String {
    frame
        .chunks(32)
        .map(|chunk| chunk.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A frame from hex text: `#` starts a comment; whitespace is ignored.
pub fn from_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text
        .lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .flat_map(|line| line.bytes().filter(|b| !b.is_ascii_whitespace()))
        .collect();
    if !digits.len().is_multiple_of(2) {
        return Err("an odd number of hex digits".to_owned());
    }
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
            u8::from_str_radix(pair, 16).map_err(|_| format!("{pair:?} is not hex"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(recipe: Recipe) -> Vec<u8> {
        recipe.build(&mut FrameRng::new(1)).bytes
    }

    #[test]
    fn the_reference_classification() {
        use Role::*;
        use Transport::*;
        assert_eq!(
            classify(&frame(Recipe::new(false, Source, Tcp))),
            Class::MustDeny
        );
        assert_eq!(
            classify(&frame(Recipe::new(true, Destination, Udp))),
            Class::MustDeny
        );
        assert_eq!(
            classify(&frame(Recipe::new(false, Neither, Tcp))),
            Class::NotInvolved
        );
        assert_eq!(
            classify(&frame(Recipe::new(true, Source, Icmp(135)))),
            Class::NeighbourDiscovery
        );
        assert_eq!(
            classify(&frame(Recipe::new(true, Source, Icmp(128)))),
            Class::MustDeny
        );
        // ICMPv6's neighbour discovery types carried by IPv4 (protocol 58) are not
        // neighbour discovery.
        assert_eq!(
            classify(&frame(Recipe::new(false, Destination, CrossIcmp(135)))),
            Class::MustDeny
        );
        // Neighbour discovery behind seven extension headers is still neighbour
        // discovery (the programs drop it: allowed either way); TCP there is not.
        let mut deep = Recipe::new(true, Source, Icmp(135));
        deep.extensions = vec![60; 7];
        assert_eq!(classify(&frame(deep.clone())), Class::NeighbourDiscovery);
        deep.transport = Tcp;
        assert_eq!(classify(&frame(deep)), Class::MustDeny);
        // A cut ND header is unsure; cut before its type it is not ND.
        let nd = frame(Recipe::new(true, Destination, Icmp(136)));
        let icmp_at = ETH_LEN + 40;
        assert_eq!(classify(&nd[..icmp_at + 4]), Class::Unsure);
        assert_eq!(classify(&nd[..icmp_at]), Class::MustDeny);
        // A later IPv6 fragment is never ND.
        let mut later = Recipe::new(true, Source, Icmp(135));
        later.extensions = vec![44];
        later.fragmentation = Fragmentation::Later;
        assert_eq!(classify(&frame(later)), Class::MustDeny);
        // VLAN tags.
        let mut tagged = Recipe::new(false, Neither, Tcp);
        tagged.tags = vec![TPID_8021AD, TPID_8021Q];
        assert_eq!(classify(&frame(tagged.clone())), Class::NotInvolved);
        tagged.tags.push(TPID_8021Q);
        assert_eq!(classify(&frame(tagged)), Class::TooManyVlanTags);
        // Malformed headers, short frames, ARP.
        let mut v4 = frame(Recipe::new(false, Neither, Tcp));
        v4[ETH_LEN] = 0x44;
        assert_eq!(classify(&v4), Class::MalformedIpHeader);
        assert_eq!(classify(&v4[..ETH_LEN + 19]), Class::MalformedIpHeader);
        assert_eq!(classify(&v4[..13]), Class::NotIp);
        assert_eq!(
            classify(&arp(&[], PEER_V4, ENDPOINT_V4).bytes),
            Class::NotIp
        );
        // IPv4 options: the whole header must be present.
        let mut options = Recipe::new(false, Source, Tcp);
        options.ipv4_option_words = 10;
        let with_options = frame(options);
        assert_eq!(classify(&with_options), Class::MustDeny);
        assert_eq!(
            classify(&with_options[..ETH_LEN + 59]),
            Class::MalformedIpHeader
        );
    }

    #[test]
    fn seeds_cover_every_class_that_a_valid_frame_can_have() {
        let classes: std::collections::BTreeSet<Class> =
            seed_frames().iter().map(|f| classify(&f.bytes)).collect();
        for class in [
            Class::NotIp,
            Class::TooManyVlanTags,
            Class::NotInvolved,
            Class::NeighbourDiscovery,
            Class::MustDeny,
        ] {
            assert!(classes.contains(&class), "no seed of class {class:?}");
        }
    }

    #[test]
    fn generation_is_deterministic_and_bounded() {
        let seeds = seed_frames();
        let run = |seed| {
            let mut rng = FrameRng::new(seed);
            (0..2000)
                .map(|_| next_frame(&mut rng, &seeds).bytes)
                .collect::<Vec<_>>()
        };
        let frames = run(7);
        assert_eq!(frames, run(7));
        assert!(frames.iter().all(|f| f.len() <= MAX_FRAME_LEN));
        let must_deny = frames
            .iter()
            .filter(|f| classify(f) == Class::MustDeny)
            .count();
        assert!(must_deny > 400, "{must_deny} of 2000 frames must be denied");
    }

    #[test]
    fn hex_round_trips() {
        let frame: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&frame)).unwrap(), frame);
        assert_eq!(from_hex("# comment\n0a 0B # x\n").unwrap(), [10, 11]);
        assert!(from_hex("abc").is_err());
    }
}
