//! Conversions between std/ipnet addresses and the maps' 16-byte mapped form.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use microseg_common::addr::{ipv4_mapped, is_ipv4_mapped};

pub fn to_mapped(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn from_mapped(addr: [u8; 16]) -> IpAddr {
    if is_ipv4_mapped(&addr) {
        IpAddr::V4(Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(addr))
    }
}

/// A prefix in mapped form: the address and its prefix length in 128-bit space.
pub fn mapped_prefix(prefix: &IpNet) -> ([u8; 16], u32) {
    let prefix = prefix.trunc();
    match prefix {
        IpNet::V4(v4) => (ipv4_mapped(v4.addr().octets()), 96 + v4.prefix_len() as u32),
        IpNet::V6(v6) => (v6.addr().octets(), v6.prefix_len() as u32),
    }
}

/// The inverse of `mapped_prefix`.
pub fn from_mapped_prefix(addr: [u8; 16], bits: u32) -> Option<IpNet> {
    if is_ipv4_mapped(&addr) && bits >= 96 {
        let v4 = Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15]);
        IpNet::new(IpAddr::V4(v4), (bits - 96) as u8).ok()
    } else {
        IpNet::new(IpAddr::V6(Ipv6Addr::from(addr)), bits as u8).ok()
    }
}
