//! ICMP errors related to tracked flows (iptables' RELATED): a "fragmentation needed",
//! "packet too big", "unreachable", "time exceeded" or "parameter problem" message
//! quotes the packet it reports on. If that packet belongs to a flow allowed under the
//! live generation, and was sent by the error's recipient, the error passes, so a
//! default-deny endpoint keeps path MTU discovery and prompt connection errors.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use microseg_common::{
    addr::ipv4_mapped,
    conntrack::{FLOW_ORIGIN_A, FlowKey},
};

use crate::{
    conntrack,
    packet::PacketView,
    parse::{
        PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PacketInfo, icmp_query_of,
    },
};

/// Bytes of the ICMP header before the quoted packet.
const ICMP_HEADER_LEN: usize = 8;

/// Scratch space for the quoted flow's key: the decision's stack frame leaves too
/// little of the 512-byte BPF stack for another 40-byte key and its copies.
#[map]
static RELATED_SCRATCH: PerCpuArray<FlowKey> = PerCpuArray::with_max_entries(1, 0);

/// Kept out of line, so its locals do not add to the decision's stack frame.
#[inline(never)]
pub fn icmp_error_is_related(
    packet: &PacketView,
    info: &PacketInfo,
    currency: conntrack::Currency,
) -> bool {
    let Some(key) = RELATED_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the program's run and not
    // used by any other running program instance. Every field but the padding is
    // written below before the lookup; the padding stays zero as the map created it.
    let key = unsafe { &mut *key };
    let quoted = info.l4_offset as usize + ICMP_HEADER_LEN;
    let inner_l4 = if info.protocol == PROTO_ICMP {
        let Ok(ip) = packet.read::<[u8; 20]>(quoted) else {
            return false;
        };
        if ip[0] >> 4 != 4 || ip[0] & 0x0f < 5 {
            return false;
        }
        key.protocol = ip[9];
        key.addr_a = ipv4_mapped([ip[12], ip[13], ip[14], ip[15]]);
        key.addr_b = ipv4_mapped([ip[16], ip[17], ip[18], ip[19]]);
        quoted + (ip[0] & 0x0f) as usize * 4
    } else if info.protocol == PROTO_ICMPV6 {
        let Ok(fixed) = packet.read::<[u8; 8]>(quoted) else {
            return false;
        };
        if fixed[0] >> 4 != 6 {
            return false;
        }
        key.protocol = fixed[6];
        if packet.copy_into(quoted + 8, &mut key.addr_a).is_err()
            || packet.copy_into(quoted + 24, &mut key.addr_b).is_err()
        {
            return false;
        }
        // Quoted extension headers are not walked: such errors are judged by policy.
        quoted + 40
    } else {
        return false;
    };
    // The error goes back to the quoted packet's sender.
    if key.addr_a != info.dst {
        return false;
    }
    // Errors quote at least the first 8 bytes of the transport header.
    let Ok(l4) = packet.read::<[u8; 8]>(inner_l4) else {
        return false;
    };
    // Keyed as `parse` keys the quoted packet's own flow.
    let (src_port, dst_port) = match key.protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            key.icmp_query = 0;
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            )
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            // Only ICMP queries are tracked.
            key.icmp_query = icmp_query_of(key.protocol, l4[0]);
            if key.icmp_query == 0 {
                return false;
            }
            let identifier = u16::from_be_bytes([l4[4], l4[5]]);
            (identifier, identifier)
        }
        _ => return false,
    };
    key.port_a = src_port;
    key.port_b = dst_port;
    // Normalise as conntrack does: the (address, port) that sorts lower is side A.
    if conntrack::side_of(&key.addr_a, src_port, &key.addr_b, dst_port) != FLOW_ORIGIN_A {
        core::mem::swap(&mut key.addr_a, &mut key.addr_b);
        key.port_a = dst_port;
        key.port_b = src_port;
    }
    conntrack::key_is_current(key, currency)
}
