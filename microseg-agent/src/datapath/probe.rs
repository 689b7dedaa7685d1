//! Probe packets: the Ethernet frames that test runs feed the programs.

use std::net::IpAddr;

use etherparse::{PacketBuilder, TcpHeader};

/// Transport of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeProtocol {
    Tcp {
        flags: TcpFlags,
    },
    Udp,
    Sctp,
    /// ICMP or ICMPv6 (by address family) with type and code.
    Icmp {
        icmp_type: u8,
        code: u8,
    },
}

/// TCP flags of a probe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

impl TcpFlags {
    pub const SYN: Self = Self {
        syn: true,
        ack: false,
        fin: false,
        rst: false,
    };
    pub const ACK: Self = Self {
        syn: false,
        ack: true,
        fin: false,
        rst: false,
    };
    pub const FIN_ACK: Self = Self {
        syn: false,
        ack: true,
        fin: true,
        rst: false,
    };
    pub const RST: Self = Self {
        syn: false,
        ack: false,
        fin: false,
        rst: true,
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Probe {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: ProbeProtocol,
}

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

impl Probe {
    pub fn tcp(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16) -> Self {
        Self {
            src,
            dst,
            src_port,
            dst_port,
            protocol: ProbeProtocol::Tcp {
                flags: TcpFlags::SYN,
            },
        }
    }

    pub fn udp(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16) -> Self {
        Self {
            protocol: ProbeProtocol::Udp,
            ..Self::tcp(src, src_port, dst, dst_port)
        }
    }

    pub fn sctp(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16) -> Self {
        Self {
            protocol: ProbeProtocol::Sctp,
            ..Self::tcp(src, src_port, dst, dst_port)
        }
    }

    /// An ICMP (IPv4) or ICMPv6 (IPv6) message with an echo-layout body carrying
    /// `identifier`.
    pub fn icmp(src: IpAddr, dst: IpAddr, icmp_type: u8, code: u8, identifier: u16) -> Self {
        Self {
            src,
            dst,
            src_port: identifier,
            dst_port: identifier,
            protocol: ProbeProtocol::Icmp { icmp_type, code },
        }
    }

    /// The same probe with other TCP flags (no change for other protocols).
    pub fn with_tcp_flags(mut self, flags: TcpFlags) -> Self {
        if let ProbeProtocol::Tcp { .. } = self.protocol {
            self.protocol = ProbeProtocol::Tcp { flags };
        }
        self
    }

    /// A later segment of the same TCP connection (ACK only).
    pub fn established(self) -> Self {
        self.with_tcp_flags(TcpFlags::ACK)
    }

    /// The same flow seen from the other side (ports and addresses swapped).
    pub fn reply(&self) -> Self {
        let protocol = match self.protocol {
            ProbeProtocol::Tcp { .. } => ProbeProtocol::Tcp {
                flags: TcpFlags {
                    syn: true,
                    ack: true,
                    ..TcpFlags::default()
                },
            },
            other => other,
        };
        Self {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            protocol,
        }
    }

    /// The IP payload: the transport header (and no data).
    fn transport_bytes(&self) -> Vec<u8> {
        match self.protocol {
            ProbeProtocol::Tcp { flags } => {
                let mut tcp = TcpHeader::new(self.src_port, self.dst_port, 1, 64240);
                tcp.syn = flags.syn;
                tcp.ack = flags.ack;
                tcp.fin = flags.fin;
                tcp.rst = flags.rst;
                tcp.to_bytes().to_vec()
            }
            ProbeProtocol::Udp => {
                let mut udp = Vec::with_capacity(8);
                udp.extend_from_slice(&self.src_port.to_be_bytes());
                udp.extend_from_slice(&self.dst_port.to_be_bytes());
                udp.extend_from_slice(&8u16.to_be_bytes());
                udp.extend_from_slice(&[0, 0]);
                udp
            }
            ProbeProtocol::Sctp => {
                let mut sctp = Vec::with_capacity(12);
                sctp.extend_from_slice(&self.src_port.to_be_bytes());
                sctp.extend_from_slice(&self.dst_port.to_be_bytes());
                sctp.extend_from_slice(&[0; 8]);
                sctp
            }
            ProbeProtocol::Icmp { icmp_type, code } => {
                // Type, code, checksum, then identifier and sequence (echo layout).
                let mut icmp = vec![icmp_type, code, 0, 0];
                icmp.extend_from_slice(&self.src_port.to_be_bytes());
                icmp.extend_from_slice(&1u16.to_be_bytes());
                icmp
            }
        }
    }

    pub fn ip_protocol(&self) -> u8 {
        match (self.protocol, self.src) {
            (ProbeProtocol::Tcp { .. }, _) => 6,
            (ProbeProtocol::Udp, _) => 17,
            (ProbeProtocol::Sctp, _) => 132,
            (ProbeProtocol::Icmp { .. }, IpAddr::V4(_)) => 1,
            (ProbeProtocol::Icmp { .. }, IpAddr::V6(_)) => 58,
        }
    }

    /// 255 for neighbour discovery (RFC 4861: it never crosses a router), else 64.
    fn hop_limit(&self) -> u8 {
        match self.protocol {
            ProbeProtocol::Icmp { icmp_type, .. } if (133..=137).contains(&icmp_type) => 255,
            _ => 64,
        }
    }

    /// The probe as an Ethernet frame.
    pub fn to_frame(&self) -> Vec<u8> {
        let payload = self.transport_bytes();
        let builder = PacketBuilder::ethernet2(SRC_MAC, DST_MAC);
        let protocol = etherparse::IpNumber(self.ip_protocol());
        let mut frame = Vec::new();
        let written = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => builder
                .ipv4(src.octets(), dst.octets(), 64)
                .write(&mut frame, protocol, &payload),
            (IpAddr::V6(src), IpAddr::V6(dst)) => builder
                .ipv6(src.octets(), dst.octets(), self.hop_limit())
                .write(&mut frame, protocol, &payload),
            _ => panic!("probe mixes address families: {} -> {}", self.src, self.dst),
        };
        written.expect("writing to a Vec cannot fail");
        frame
    }
}
