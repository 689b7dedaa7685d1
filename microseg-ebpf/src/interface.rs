//! Workload interfaces: what a bound interface receives was sent by its workload, so
//! it must come from one of the workload's addresses, and it may not act as a router;
//! an interface whose workload is not known yet neither sends nor is sent anything
//! beyond its link (see `microseg_common::interface`).

use aya_ebpf::{macros::map, maps::HashMap};
use microseg_common::{
    DropReason,
    addr::{FAMILY_IPV6, is_ipv4_mapped},
    interface::{InterfaceBinding, InterfaceKey, MAX_BOUND_ADDRESSES},
    maps::INTERFACES_CAPACITY,
};

use crate::parse::{PROTO_ICMPV6, PacketInfo, Transport};

/// BPF_F_NO_PREALLOC: memory only for the interfaces that are bound.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map]
static INTERFACES: HashMap<InterfaceKey, InterfaceBinding> =
    HashMap::with_max_entries(INTERFACES_CAPACITY, BPF_F_NO_PREALLOC);

/// ICMPv6 router advertisement and redirect: only routers send them.
const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;
const ICMPV6_REDIRECT: u8 = 137;

/// Checks a packet that `ifindex` received: if the interface is bound to a workload,
/// the packet must come from one of its addresses (or be link-local traffic that
/// stays on the link) and must not be a router advertisement or redirect.
/// Kept out of line: the binding's address loop stays out of the decision's frame.
#[inline(never)]
pub fn check_sent_by_workload(slot: u8, ifindex: u32, info: &PacketInfo) -> Result<(), DropReason> {
    // SAFETY: the value is only read while the program runs (RCU keeps it alive); a
    // concurrent update replaces it whole with another binding of the same type.
    let Some(binding) = (unsafe { INTERFACES.get(&InterfaceKey::new(slot, ifindex)) }) else {
        return Ok(());
    };
    if info.family == FAMILY_IPV6
        && info.protocol == PROTO_ICMPV6
        && info.transport == Transport::Known
        && (info.icmp_type == ICMPV6_ROUTER_ADVERTISEMENT || info.icmp_type == ICMPV6_REDIRECT)
    {
        return Err(DropReason::ForbiddenIcmpv6);
    }
    let count = binding.address_count as usize;
    for index in 0..MAX_BOUND_ADDRESSES {
        if index >= count {
            break;
        }
        if binding.addresses[index] == info.src {
            return Ok(());
        }
    }
    if stays_on_link(info) {
        return Ok(());
    }
    if binding.awaits_policy() {
        return Err(DropReason::NoPolicyYet);
    }
    Err(DropReason::InvalidSourceIp)
}

/// Checks a packet about to be sent out of `ifindex` (TC egress): an interface whose
/// workload is not known yet is sent nothing beyond link-local traffic.
#[inline(never)]
pub fn check_delivery_to_workload(
    slot: u8,
    ifindex: u32,
    info: &PacketInfo,
) -> Result<(), DropReason> {
    // SAFETY: as in `check_sent_by_workload`: read-only while the program runs.
    let Some(binding) = (unsafe { INTERFACES.get(&InterfaceKey::new(slot, ifindex)) }) else {
        return Ok(());
    };
    if binding.awaits_policy() && !stays_on_link(info) {
        return Err(DropReason::NoPolicyYet);
    }
    Ok(())
}

/// What an interface awaiting its workload's policy lets through (`hold` judges
/// every packet of a held interface by it): traffic that stays on the link, and
/// from the workload (`sent_by_workload`) no router advertisement or redirect.
#[inline(always)]
pub fn check_awaiting_policy(info: &PacketInfo, sent_by_workload: bool) -> Result<(), DropReason> {
    if sent_by_workload
        && info.family == FAMILY_IPV6
        && info.protocol == PROTO_ICMPV6
        && info.transport == Transport::Known
        && (info.icmp_type == ICMPV6_ROUTER_ADVERTISEMENT || info.icmp_type == ICMPV6_REDIRECT)
    {
        return Err(DropReason::ForbiddenIcmpv6);
    }
    if stays_on_link(info) {
        Ok(())
    } else {
        Err(DropReason::NoPolicyYet)
    }
}

/// Traffic a workload may send from an address that is not its own: from a link-local
/// or unspecified source (neighbour discovery, DHCP, MLD) to a link-local, multicast
/// or broadcast destination, or neighbour discovery from a link-local source to any
/// destination (a neighbour unreachability probe goes to the neighbour's unicast
/// address, RFC 4861 7.3.3; its hop limit of 255 keeps it on the link). Routers do
/// not forward it off the link.
#[inline(always)]
fn stays_on_link(info: &PacketInfo) -> bool {
    let (src, dst) = (&info.src, &info.dst);
    if info.is_neighbour_discovery() && src[0] == 0xfe && src[1] & 0xc0 == 0x80 {
        return true;
    }
    if is_ipv4_mapped(src) {
        let src_ok = (src[12] == 169 && src[13] == 254) || src[12..16] == [0, 0, 0, 0];
        let dst_ok = (dst[12] == 169 && dst[13] == 254)
            || dst[12] & 0xf0 == 224
            || dst[12..16] == [255, 255, 255, 255];
        src_ok && dst_ok && is_ipv4_mapped(dst)
    } else {
        let src_ok = (src[0] == 0xfe && src[1] & 0xc0 == 0x80) || *src == [0; 16];
        let dst_ok = (dst[0] == 0xfe && dst[1] & 0xc0 == 0x80) || dst[0] == 0xff;
        src_ok && dst_ok && !is_ipv4_mapped(dst)
    }
}
