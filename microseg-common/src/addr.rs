//! Addresses as the maps store them: 16 bytes, IPv4 as IPv4-mapped IPv6
//! (`::ffff:a.b.c.d`), so one key type serves both families.

/// Key of the address-keyed hash maps (`ENDPOINTS`, `PEER_HOSTS`): a generation slot
/// and an address. The slot lets the next policy generation be written beside the live
/// one (see [`crate::config`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    addr: [u8; 16],
    slot: u8,
    _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);

impl AddrKey {
    pub const fn new(slot: u8, addr: [u8; 16]) -> Self {
        Self {
            addr,
            slot,
            _pad: [0; 3],
        }
    }
    pub const fn addr(&self) -> [u8; 16] {
        self.addr
    }
    pub const fn slot(&self) -> u8 {
        self.slot
    }
}

/// The IPv4-mapped IPv6 form of an IPv4 address.
pub const fn ipv4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// Whether a 16-byte address is IPv4-mapped.
pub const fn is_ipv4_mapped(addr: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    addr[10] == 0xff && addr[11] == 0xff
}

/// Address family numbers as carried in events and packet info.
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

crate::impl_pod!(AddrKey);
