//! Interfaces bound to one workload (`INTERFACES`: `InterfaceKey` -> `InterfaceBinding`).
//!
//! A workload's own interface (a pod's host-side veth, a VM's tap) carries only that
//! workload's traffic: what the interface receives was sent by the workload. So such
//! a packet must carry one of the workload's addresses (source validation, as Cilium
//! and Calico do on a pod's veth), and router advertisements and redirects from it
//! are dropped. Bindings belong to the policy generation, like every policy-bearing
//! map, so a binding and the policy that names its workload switch together.

/// Addresses a binding holds: a pod has one or two (dual stack).
pub const MAX_BOUND_ADDRESSES: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InterfaceKey {
    ifindex: u32,
    slot: u8,
    _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<InterfaceKey>() == 8);

impl InterfaceKey {
    pub const fn new(slot: u8, ifindex: u32) -> Self {
        Self {
            ifindex,
            slot,
            _pad: [0; 3],
        }
    }
    pub const fn ifindex(&self) -> u32 {
        self.ifindex
    }
    pub const fn slot(&self) -> u8 {
        self.slot
    }
}

/// The addresses a bound interface's workload may send from (IPv4 as IPv4-mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InterfaceBinding {
    /// How many of `addresses` are used.
    pub address_count: u32,
    /// Reserved for flags; 0.
    pub flags: u32,
    pub addresses: [[u8; 16]; MAX_BOUND_ADDRESSES],
}
const _: () = assert!(core::mem::size_of::<InterfaceBinding>() == 136);

impl InterfaceBinding {
    /// A binding to these addresses; `None` if there are more than
    /// `MAX_BOUND_ADDRESSES`.
    pub fn new(addresses: &[[u8; 16]]) -> Option<Self> {
        if addresses.len() > MAX_BOUND_ADDRESSES {
            return None;
        }
        let mut binding = Self {
            address_count: addresses.len() as u32,
            flags: 0,
            addresses: [[0; 16]; MAX_BOUND_ADDRESSES],
        };
        binding.addresses[..addresses.len()].copy_from_slice(addresses);
        Some(binding)
    }

    /// The addresses in use.
    pub fn addresses(&self) -> &[[u8; 16]] {
        let count = (self.address_count as usize).min(MAX_BOUND_ADDRESSES);
        &self.addresses[..count]
    }
}

crate::impl_pod!(InterfaceKey, InterfaceBinding);
