//! Interfaces bound to one workload (`INTERFACES`: `InterfaceKey` -> `InterfaceBinding`).
//!
//! A workload's own interface (a pod's host-side veth, a VM's tap) carries only that
//! workload's traffic: what the interface receives was sent by the workload. So such
//! a packet must carry one of the workload's addresses (source validation, as Cilium
//! and Calico do on a pod's veth), and router advertisements and redirects from it
//! are dropped.
//!
//! A pod's interface whose pod is not known yet (its sandbox exists; the API server
//! has not reported the pod) has no policy to judge it: it is bound with
//! `BINDING_FLAG_NO_POLICY_YET` and no address, and everything it sends or is sent,
//! except traffic that stays on the link, is dropped until the pod is known.
//!
//! Bindings belong to the policy generation, like every policy-bearing
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

/// `InterfaceBinding::flags`: the interface's workload is not known yet; drop what
/// it sends and what it is sent.
pub const BINDING_FLAG_NO_POLICY_YET: u32 = 1;

/// The addresses a bound interface's workload may send from (IPv4 as IPv4-mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InterfaceBinding {
    /// How many of `addresses` are used.
    pub address_count: u32,
    /// `BINDING_FLAG_*` bits.
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

    /// A binding for an interface whose workload is not known yet.
    pub const fn awaiting_policy() -> Self {
        Self {
            address_count: 0,
            flags: BINDING_FLAG_NO_POLICY_YET,
            addresses: [[0; 16]; MAX_BOUND_ADDRESSES],
        }
    }

    pub const fn awaits_policy(&self) -> bool {
        self.flags & BINDING_FLAG_NO_POLICY_YET != 0
    }

    /// The addresses in use.
    pub fn addresses(&self) -> &[[u8; 16]] {
        let count = (self.address_count as usize).min(MAX_BOUND_ADDRESSES);
        &self.addresses[..count]
    }
}

crate::impl_pod!(InterfaceKey, InterfaceBinding);
