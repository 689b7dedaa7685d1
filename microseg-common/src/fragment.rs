//! IP fragments (`FRAGMENTS`: LRU hash of `FragmentKey` -> `FragmentPorts`).
//!
//! Only a first fragment carries the transport header. Its ports are remembered under
//! the datagram's (addresses, id, protocol), and later fragments of the same datagram
//! are judged with them. A later fragment whose first was never seen has unknown ports
//! and is dropped if it involves an enforced endpoint.

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// IPv4 identification (16 bits) or IPv6 fragment header identification.
    pub id: u32,
    pub protocol: u8,
    _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 40);

impl FragmentKey {
    pub const fn new(src: [u8; 16], dst: [u8; 16], id: u32, protocol: u8) -> Self {
        Self {
            src,
            dst,
            id,
            protocol,
            _pad: [0; 3],
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentPorts {
    pub src_port: u16,
    pub dst_port: u16,
}
const _: () = assert!(core::mem::size_of::<FragmentPorts>() == 4);

crate::impl_pod!(FragmentKey, FragmentPorts);
