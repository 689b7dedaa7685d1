//! The decision, in this order (one shared path for XDP, TC ingress and TC egress):
//! 1. parse (see `parse`): not IP passes; a broken IP header or an unknown network
//!    layer drops;
//! 2. read the live generation once; every lookup below uses its slot;
//! 3. a packet a workload's own interface received (XDP, TC ingress) must come from
//!    one of the workload's addresses and may not be a router advertisement or
//!    redirect (`interface`); an interface whose workload is not known yet sends and
//!    is sent (TC egress) nothing beyond its link; neighbour discovery then passes
//!    without policy;
//! 4. transport: ports of later fragments from their first fragment;
//! 5. conntrack, before the endpoints: a flow allowed under the live generation
//!    passes, replies included, on this one lookup (its entry proves that an
//!    enforced endpoint is involved); a packet that opens a connection (bare TCP SYN,
//!    ICMP echo request) is always judged; a flow allowed under an older generation
//!    is judged again in its first packet's direction;
//! 6. endpoints: the source and the destination. A packet involving no endpoint with
//!    an enforced direction passes. Otherwise a packet whose transport cannot be
//!    known drops; ICMP errors quoting a packet of a flow allowed under the live
//!    generation pass (`related`); every allowed packet is tracked, even when no
//!    enforced direction judges it, so that its replies are recognised;
//! 7. policy, for the destination's ingress if enforced and the source's egress if
//!    enforced: peer identity, then (endpoint, identity, direction, protocol, port)
//!    in the exact-port hash and the prefix trie, then the same for (endpoint, any,
//!    ...). The entry found is the verdict the compiler resolved from every tier
//!    (ClusterNetworkPolicy Admin, NetworkPolicy, Baseline: `policy::compile::tiers`
//!    in the agent); no entry is the endpoint's default (deny, or allow where only
//!    ClusterNetworkPolicies enforce the direction). Allowed only if every enforced
//!    direction allows (none enforced: allowed);
//! 8. a deny from an endpoint in audit mode passes with an audit event; any other
//!    deny drops with a deny event. Allowed flows are recorded in conntrack.
//!
//! Every decision is counted on the rule that made it (`rule_hits`): a judged flow on
//! each rule that allowed it, an established flow's packets on the rule conntrack
//! remembers, a denied packet on its deny rule or its endpoint's default deny. A
//! packet is counted at each enforcing hook it passes; a flow once, and an opening
//! packet seen again at a second hook sends no second trace or audit event.

use microseg_common::{
    DropReason,
    config::{SETTINGS_FLAG_TRACE_ALLOWED, slot_of},
    counters::Counter,
    endpoint::EndpointInfo,
    event::{EventVerdict, Hook},
    identity::IDENTITY_WORLD,
    policy::{Direction, PolicyKeyData, RULE_ID_DEFAULT_DENY},
};

use crate::{
    config, conntrack,
    conntrack::Tracked,
    counters, endpoint,
    events::{self, EventFields},
    fragment, identity, interface,
    packet::PacketView,
    parse::{self, Fragment, LinkLayer, PacketInfo, Parsed, Transport},
    policy, related, rule_hits,
};

pub enum Verdict {
    Pass,
    Drop,
}

/// Why a packet was denied, and by whom, for the event.
#[derive(Clone, Copy)]
struct Denial {
    reason: DropReason,
    direction: u8,
    endpoint_id: u32,
    peer_identity: u32,
    rule_id: u32,
    /// Where the denial is counted: the deny rule's slot or the default deny's.
    hit_slot: u16,
}

impl Denial {
    const NONE: Self = Self {
        reason: DropReason::PolicyDenied,
        direction: 0,
        endpoint_id: 0,
        peer_identity: 0,
        rule_id: RULE_ID_DEFAULT_DENY,
        hit_slot: 0,
    };
}

/// The rule that allowed one enforced direction.
#[derive(Clone, Copy)]
struct Allowance {
    rule_id: u32,
    peer_identity: u32,
    hit_slot: u16,
}

/// Outcome of judging a packet against the enforced directions' policies.
enum Judgement {
    /// Allowed by every enforced direction: what allowed ingress (the destination's)
    /// and egress (the source's); `rule_id` 0 and slot 0 where not enforced.
    Allowed {
        ingress: Allowance,
        egress: Allowance,
        /// The `Direction` code reported in a trace event (egress if enforced, then
        /// ingress, else 0).
        direction: u8,
    },
    Audited(Denial),
    Denied(Denial),
}

#[inline(always)]
pub fn judge(packet: &PacketView, link: LinkLayer, hook: Hook, ifindex: u32) -> Verdict {
    let mut info = PacketInfo::EMPTY;
    match parse::parse(packet, link, &mut info) {
        Ok(Parsed::Ip) => {}
        Ok(Parsed::NotPolicyTraffic) => {
            counters::count(Counter::NotPolicyTraffic);
            return Verdict::Pass;
        }
        Err(reason) => {
            counters::count(Counter::ParseFailure);
            return deny_unparsed(hook, ifindex, reason);
        }
    }

    let generation = config::live_generation();
    let slot = slot_of(generation);
    // A workload's own interface: what it receives was sent by the workload, and
    // one whose workload is not known yet is delivered nothing (TC egress). The
    // lookups are skipped where the live slot has no such binding (hosts enforced on
    // their own NICs; delivery where no interface awaits policy).
    let interface_check = if is_ingress_hook(hook) {
        if config::slot_binds_interfaces(slot) {
            interface::check_sent_by_workload(slot, ifindex, &info)
                .map_err(|reason| (reason, Direction::Egress))
        } else {
            Ok(())
        }
    } else if config::slot_awaits_policy(slot) {
        interface::check_delivery_to_workload(slot, ifindex, &info)
            .map_err(|reason| (reason, Direction::Ingress))
    } else {
        Ok(())
    };
    if let Err((reason, direction)) = interface_check {
        let denial = Denial {
            reason,
            direction: direction as u8,
            ..Denial::NONE
        };
        return finish_denied(&info, hook, ifindex, denial, info.src_port, info.dst_port);
    }
    if info.is_neighbour_discovery() {
        counters::count(Counter::NotPolicyTraffic);
        return Verdict::Pass;
    }

    // Conntrack first: an established flow's packet passes on this one lookup. An
    // entry of the live generation was recorded by a packet with the same two
    // addresses that involved an enforced endpoint, and the live generation's slot is
    // never written (see `microseg_common::config`), so the endpoint lookups below
    // could only agree. ICMP errors are matched to the flow they quote first
    // (`related`), and a packet whose ports are unknown is not looked up.
    let ports = transport_ports(&info);
    let (src_port, dst_port) = match ports {
        Ok(ports) => ports,
        Err(_) => (0, 0),
    };
    let settings = config::settings();
    let now = conntrack::now_ns();
    let flow = conntrack::flow_of(&info, src_port, dst_port);
    let opens =
        conntrack::opens_tcp(&info) || parse::is_echo_request(info.protocol, info.icmp_type);
    let is_icmp_error = parse::is_icmp_error(info.protocol, info.icmp_type);
    let mut tracked = if ports.is_err() || is_icmp_error {
        Tracked::New
    } else {
        conntrack::lookup(&flow, &info, opens, generation, &settings.lifetimes, now)
    };
    if let Tracked::Current { hit_slot } = tracked {
        if let Fragment::First { id } = info.fragment {
            fragment::remember(&info, id);
        }
        counters::count(Counter::ConntrackHit);
        rule_hits::count_packet(hit_slot);
        count_allowed(hook);
        return Verdict::Pass;
    }

    let src_endpoint = endpoint::lookup(slot, &info.src);
    let dst_endpoint = endpoint::lookup(slot, &info.dst);
    if !src_endpoint.any_enforced() && !dst_endpoint.any_enforced() {
        counters::count(Counter::NotEnforced);
        return Verdict::Pass;
    }

    if let Err(reason) = ports {
        counters::count(Counter::ParseFailure);
        let endpoint_id = if dst_endpoint.any_enforced() {
            dst_endpoint.endpoint_id
        } else {
            src_endpoint.endpoint_id
        };
        let denial = Denial {
            reason,
            endpoint_id,
            ..Denial::NONE
        };
        return finish_denied(&info, hook, ifindex, denial, 0, 0);
    }
    if let Fragment::First { id } = info.fragment {
        fragment::remember(&info, id);
    }

    if is_icmp_error {
        // An ICMP error about a flow allowed under the live generation is part of it.
        if related::icmp_error_is_related(packet, &info, generation) {
            counters::count(Counter::ConntrackHit);
            count_allowed(hook);
            return Verdict::Pass;
        }
        tracked = conntrack::lookup(&flow, &info, opens, generation, &settings.lifetimes, now);
    }
    let judgement = match tracked {
        Tracked::Current { hit_slot } => {
            counters::count(Counter::ConntrackHit);
            rule_hits::count_packet(hit_slot);
            count_allowed(hook);
            return Verdict::Pass;
        }
        // A reply of a flow allowed under an older generation: judge the flow as its
        // first packet went, from this packet's destination to its source.
        Tracked::Stale { is_reply: true, .. } => judge_policy(
            slot,
            &dst_endpoint,
            &src_endpoint,
            &info.dst,
            &info.src,
            info.protocol,
            info.request_policy_port(src_port),
        ),
        Tracked::New
        | Tracked::Stale {
            is_reply: false, ..
        } => judge_policy(
            slot,
            &src_endpoint,
            &dst_endpoint,
            &info.src,
            &info.dst,
            info.protocol,
            info.policy_port(),
        ),
    };

    match judgement {
        Judgement::Allowed {
            ingress,
            egress,
            direction,
        } => {
            // The flow's later packets count on one rule: the ingress rule's if any.
            let hit_slot = if ingress.hit_slot != 0 {
                ingress.hit_slot
            } else {
                egress.hit_slot
            };
            let repeated = opens
                && conntrack::opening_already_allowed(&flow, generation, &settings.lifetimes, now);
            if repeated {
                rule_hits::count_packet(hit_slot);
            } else {
                rule_hits::count_flow(ingress.hit_slot);
                rule_hits::count_flow(egress.hit_slot);
            }
            conntrack::record_allowed(&flow, &info, &tracked, generation, hit_slot, now);
            count_allowed(hook);
            if !repeated && settings.flags & SETTINGS_FLAG_TRACE_ALLOWED != 0 {
                let reported = if direction == Direction::Egress as u8 {
                    egress
                } else {
                    ingress
                };
                let fields = EventFields {
                    hook: hook as u8,
                    verdict: EventVerdict::Forwarded as u8,
                    direction,
                    reason: 0,
                    ifindex,
                    endpoint_id: 0,
                    peer_identity: reported.peer_identity,
                    rule_id: reported.rule_id,
                    src_port,
                    dst_port,
                };
                events::send(Some(&info), &fields);
            }
            Verdict::Pass
        }
        Judgement::Audited(denial) => {
            // Counted as the deny it would have been; the flow itself on no rule.
            rule_hits::count_packet(denial.hit_slot);
            let repeated = opens
                && conntrack::opening_already_allowed(&flow, generation, &settings.lifetimes, now);
            conntrack::record_allowed(&flow, &info, &tracked, generation, 0, now);
            counters::count(if is_ingress_hook(hook) {
                Counter::AuditedIngress
            } else {
                Counter::AuditedEgress
            });
            if repeated {
                return Verdict::Pass;
            }
            let fields = denial_fields(
                hook,
                ifindex,
                EventVerdict::Audit,
                &denial,
                src_port,
                dst_port,
            );
            events::send(Some(&info), &fields);
            Verdict::Pass
        }
        Judgement::Denied(denial) => {
            finish_denied(&info, hook, ifindex, denial, src_port, dst_port)
        }
    }
}

/// Judges the flow `src -> dst` against the destination's ingress policy (if
/// `dst_endpoint` enforces ingress) and the source's egress policy (if `src_endpoint`
/// enforces egress).
#[inline(always)]
fn judge_policy(
    slot: u8,
    src_endpoint: &EndpointInfo,
    dst_endpoint: &EndpointInfo,
    src: &[u8; 16],
    dst: &[u8; 16],
    protocol: u8,
    port: u16,
) -> Judgement {
    const NOT_ENFORCED: Allowance = Allowance {
        rule_id: RULE_ID_DEFAULT_DENY,
        peer_identity: IDENTITY_WORLD,
        hit_slot: 0,
    };
    let mut ingress = NOT_ENFORCED;
    let mut egress = NOT_ENFORCED;
    let mut direction = 0;
    // Plain values, not Option: see endpoint::lookup.
    let mut audited = false;
    let mut audit_denial = Denial::NONE;
    if dst_endpoint.ingress_enforced() {
        match check_direction(slot, dst_endpoint, Direction::Ingress, src, protocol, port) {
            Ok(allowed) => {
                ingress = allowed;
                direction = Direction::Ingress as u8;
            }
            Err(denial) if dst_endpoint.audit() => {
                audited = true;
                audit_denial = denial;
            }
            Err(denial) => return Judgement::Denied(denial),
        }
    }
    if src_endpoint.egress_enforced() {
        match check_direction(slot, src_endpoint, Direction::Egress, dst, protocol, port) {
            Ok(allowed) => {
                egress = allowed;
                direction = Direction::Egress as u8;
            }
            Err(denial) if src_endpoint.audit() => {
                if !audited {
                    audited = true;
                    audit_denial = denial;
                }
            }
            Err(denial) => return Judgement::Denied(denial),
        }
    }
    if audited {
        Judgement::Audited(audit_denial)
    } else {
        Judgement::Allowed {
            ingress,
            egress,
            direction,
        }
    }
}

/// One enforced direction: what allowed it, else the denial.
#[inline(always)]
fn check_direction(
    slot: u8,
    endpoint: &EndpointInfo,
    direction: Direction,
    peer_addr: &[u8; 16],
    protocol: u8,
    port: u16,
) -> Result<Allowance, Denial> {
    let peer_identity = identity::resolve(slot, peer_addr);
    let key = PolicyKeyData::new(
        slot,
        endpoint.endpoint_id,
        peer_identity,
        direction,
        protocol,
        port,
    );
    let entry = policy::lookup(
        &key,
        endpoint.has_prefix_rules(),
        endpoint.has_any_peer_rules(),
    );
    let ingress = matches!(direction, Direction::Ingress);
    match entry {
        // No entry: no tier decided. Denied by default where a NetworkPolicy selects
        // the endpoint, allowed where only ClusterNetworkPolicies do.
        entry if entry.is_none() => {
            if endpoint.default_allows(ingress) {
                return Ok(Allowance {
                    rule_id: RULE_ID_DEFAULT_DENY,
                    peer_identity,
                    hit_slot: 0,
                });
            }
            Err(Denial {
                reason: DropReason::PolicyDenied,
                direction: direction as u8,
                endpoint_id: endpoint.endpoint_id,
                peer_identity,
                rule_id: RULE_ID_DEFAULT_DENY,
                hit_slot: endpoint.default_deny_hit_slot(ingress),
            })
        }
        entry if !entry.is_deny() => Ok(Allowance {
            rule_id: entry.rule_id,
            peer_identity,
            hit_slot: entry.hit_slot,
        }),
        // A resolved default deny (rule 0) is reported as the default deny it is (the
        // compiler gave its entries the endpoint's default deny slot).
        entry if entry.rule_id == RULE_ID_DEFAULT_DENY => Err(Denial {
            reason: DropReason::PolicyDenied,
            direction: direction as u8,
            endpoint_id: endpoint.endpoint_id,
            peer_identity,
            rule_id: RULE_ID_DEFAULT_DENY,
            hit_slot: entry.hit_slot,
        }),
        entry => Err(Denial {
            reason: DropReason::PolicyDeny,
            direction: direction as u8,
            endpoint_id: endpoint.endpoint_id,
            peer_identity,
            rule_id: entry.rule_id,
            hit_slot: entry.hit_slot,
        }),
    }
}

/// The packet's ports: its own, or for a later fragment its first fragment's.
#[inline(always)]
fn transport_ports(info: &PacketInfo) -> Result<(u16, u16), DropReason> {
    match info.transport {
        Transport::Known => Ok((info.src_port, info.dst_port)),
        Transport::Unknown(reason) => Err(reason),
        Transport::LaterFragment => {
            let Fragment::Later { id } = info.fragment else {
                return Err(DropReason::FragmentWithoutHead);
            };
            match fragment::ports_of(info, id) {
                Some(ports) => Ok((ports.src_port, ports.dst_port)),
                None => Err(DropReason::FragmentWithoutHead),
            }
        }
    }
}

#[inline(always)]
fn finish_denied(
    info: &PacketInfo,
    hook: Hook,
    ifindex: u32,
    denial: Denial,
    src_port: u16,
    dst_port: u16,
) -> Verdict {
    count_denied(hook, denial.reason);
    rule_hits::count_packet(denial.hit_slot);
    let fields = denial_fields(
        hook,
        ifindex,
        EventVerdict::Dropped,
        &denial,
        src_port,
        dst_port,
    );
    events::send_denial(Some(info), &fields);
    Verdict::Drop
}

/// A packet whose IP header is unreadable: dropped, with an event without addresses.
#[inline(always)]
fn deny_unparsed(hook: Hook, ifindex: u32, reason: DropReason) -> Verdict {
    count_denied(hook, reason);
    let denial = Denial {
        reason,
        direction: 0,
        endpoint_id: 0,
        peer_identity: 0,
        rule_id: RULE_ID_DEFAULT_DENY,
        hit_slot: 0,
    };
    let fields = denial_fields(hook, ifindex, EventVerdict::Dropped, &denial, 0, 0);
    events::send_denial(None, &fields);
    Verdict::Drop
}

#[inline(always)]
fn denial_fields(
    hook: Hook,
    ifindex: u32,
    verdict: EventVerdict,
    denial: &Denial,
    src_port: u16,
    dst_port: u16,
) -> EventFields {
    EventFields {
        hook: hook as u8,
        verdict: verdict as u8,
        direction: denial.direction,
        reason: denial.reason.code(),
        ifindex,
        endpoint_id: denial.endpoint_id,
        peer_identity: denial.peer_identity,
        rule_id: denial.rule_id,
        src_port,
        dst_port,
    }
}

#[inline(always)]
fn is_ingress_hook(hook: Hook) -> bool {
    !matches!(hook, Hook::TcEgress)
}

#[inline(always)]
fn count_allowed(hook: Hook) {
    counters::count(if is_ingress_hook(hook) {
        Counter::AllowedIngress
    } else {
        Counter::AllowedEgress
    });
}

#[inline(always)]
fn count_denied(hook: Hook, reason: DropReason) {
    counters::count(if is_ingress_hook(hook) {
        Counter::DeniedIngress
    } else {
        Counter::DeniedEgress
    });
    counters::count_drop(reason);
}
