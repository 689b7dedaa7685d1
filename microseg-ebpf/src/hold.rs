//! Holding an interface whose binding the agent could not write.
//!
//! An interface that should be bound (a pod's veth, a VM's tap) is enforced by the
//! full decision only once its binding is in the maps: source validation and
//! "awaiting policy" both read it. When the agent cannot write a binding (the
//! generation switch carrying it failed), it attaches these programs instead: they
//! read no map at all and judge every packet as the decision would for an interface
//! awaiting policy. Nothing beyond the interface's link passes, in either
//! direction, and router advertisements and redirects it receives are dropped. The
//! agent swaps the full programs in (one link update) once the binding is written.

use microseg_common::{
    DropReason,
    config::SETTINGS_FLAG_NO_DENY_EVENTS,
    counters::Counter,
    event::{EventVerdict, Hook},
    policy::RULE_ID_DEFAULT_DENY,
};

use crate::{
    config, counters,
    events::{self, EventCause, EventSite},
    interface,
    packet::PacketView,
    parse::{self, LinkLayer, PacketInfo, Parsed},
    verdict::Verdict,
};

/// The verdict for a packet on a held interface at `hook`.
#[inline(always)]
pub fn judge_held(packet: &PacketView, link: LinkLayer, hook: Hook, ifindex: u32) -> Verdict {
    let mut info = PacketInfo::EMPTY;
    let reason = match parse::parse(packet, link, &mut info) {
        Ok(Parsed::NotPolicyTraffic) => {
            counters::count(Counter::NotPolicyTraffic);
            return Verdict::Pass;
        }
        Err(reason) => {
            counters::count(Counter::ParseFailure);
            return drop_held(None, hook, ifindex, reason);
        }
        Ok(Parsed::Ip) => {
            let sent_by_workload = !matches!(hook, Hook::TcEgress);
            match interface::check_awaiting_policy(&info, sent_by_workload) {
                Ok(()) => {
                    counters::count(Counter::NotPolicyTraffic);
                    return Verdict::Pass;
                }
                Err(reason) => reason,
            }
        }
    };
    drop_held(Some(&info), hook, ifindex, reason)
}

#[inline(always)]
fn drop_held(info: Option<&PacketInfo>, hook: Hook, ifindex: u32, reason: DropReason) -> Verdict {
    counters::count(if matches!(hook, Hook::TcEgress) {
        Counter::DeniedEgress
    } else {
        Counter::DeniedIngress
    });
    counters::count_drop(reason);
    if config::settings().flags & SETTINGS_FLAG_NO_DENY_EVENTS != 0 {
        return Verdict::Drop;
    }
    let (src_port, dst_port) = info.map_or((0, 0), |info| (info.src_port, info.dst_port));
    let site = EventSite {
        hook,
        ifindex,
        src_port,
        dst_port,
    };
    let cause = EventCause {
        verdict: EventVerdict::Dropped as u8,
        direction: 0,
        reason: reason.code(),
        endpoint_id: 0,
        peer_identity: 0,
        rule_id: RULE_ID_DEFAULT_DENY,
    };
    events::send(info, &site, &cause);
    Verdict::Drop
}
