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
//!    ICMP query request) is always judged; a flow allowed under an older generation
//!    is judged again in its first packet's direction; ICMP messages other than
//!    queries are not tracked;
//! 6. endpoints: the source and the destination. A packet involving no endpoint with
//!    an enforced direction passes. Otherwise a packet whose transport cannot be
//!    known drops; ICMP errors quoting a packet of a flow allowed under the live
//!    generation pass (`related`); every allowed packet (but untracked ICMP) is
//!    tracked, even when no enforced direction judges it, so that its replies are
//!    recognised; a packet continuing a flow that has no entry is counted as a lost
//!    flow (or an expired one) and judged as new;
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

//!
//! Stack: the BPF stack is 512 bytes for the deepest call chain, and kernels before
//! 6.9 round each frame up to 32 bytes. The packet's state lives in a per-CPU scratch
//! element (`scratch`); `judge` keeps the established flows' path (up to a conntrack
//! hit) in the programs' own frame, and everything after it runs in `judge_pending`,
//! out of line; events and denials are reported out of line too.
use microseg_common::{
    DropReason,
    config::{SETTINGS_FLAG_NO_DENY_EVENTS, SETTINGS_FLAG_TRACE_ALLOWED, slot_of},
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
    events::{self, EventCause, EventSite},
    fragment, identity, interface,
    packet::PacketView,
    parse::{self, Fragment, LinkLayer, PacketInfo, Parsed, Transport},
    policy, related, rule_hits,
    scratch::{self, DecisionScratch},
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

    /// What the denial's event says.
    #[inline(always)]
    fn cause(&self, verdict: EventVerdict) -> EventCause {
        EventCause {
            verdict: verdict as u8,
            direction: self.direction,
            reason: self.reason.code(),
            endpoint_id: self.endpoint_id,
            peer_identity: self.peer_identity,
            rule_id: self.rule_id,
        }
    }
}

/// The rule that allowed one enforced direction.
#[derive(Clone, Copy)]
struct Allowance {
    rule_id: u32,
    peer_identity: u32,
    hit_slot: u16,
}

/// What one enforced direction's policy said: the rule that allowed it, or why it
/// denied (the other field is left as it was).
#[derive(Clone, Copy)]
pub struct Ruling {
    allowance: Allowance,
    denial: Denial,
}

/// What the enforced directions' policies said of a packet (in the scratch element:
/// `judge_policy` writes it, the outcome's handler reads it).
pub struct Judged {
    /// The destination's ingress; its allowance is `NOT_ENFORCED` where not enforced.
    ingress: Ruling,
    /// The source's egress, likewise.
    egress: Ruling,
    /// The `Direction` code reported in a trace event (egress if enforced, then
    /// ingress, else 0).
    direction: u8,
}

/// The outcome of `judge_policy`; the rulings are in `Judged`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Allowed by every enforced direction.
    Allowed,
    /// A direction denied, and its endpoint is in audit mode: the ruling of `Direction`
    /// (the first that denied) holds the denial.
    Audited(Direction),
    /// A direction denied: its ruling holds the denial.
    Denied(Direction),
}

impl Judged {
    #[inline(always)]
    fn of(&self, direction: Direction) -> &Ruling {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

#[inline(always)]
pub fn judge(packet: &PacketView, link: LinkLayer, hook: Hook, ifindex: u32) -> Verdict {
    // The packet's fields and the pending decision live in this CPU's scratch
    // element, not on the 512-byte BPF stack (see `scratch`).
    let Some(scratch) = scratch::decision() else {
        let site = EventSite {
            hook,
            ifindex,
            src_port: 0,
            dst_port: 0,
        };
        return deny_unparsed(&site, DropReason::ScratchUnavailable);
    };
    let DecisionScratch { info, pending, .. } = scratch;
    pending.site = EventSite {
        hook,
        ifindex,
        src_port: 0,
        dst_port: 0,
    };
    *info = PacketInfo::EMPTY;
    match parse::parse(packet, link, info) {
        Ok(Parsed::Ip) => {}
        Ok(Parsed::NotPolicyTraffic) => {
            counters::count(Counter::NotPolicyTraffic);
            return Verdict::Pass;
        }
        Err(reason) => {
            counters::count(Counter::ParseFailure);
            return deny_unparsed(&pending.site, reason);
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
            interface::check_sent_by_workload(slot, ifindex, info)
                .map_err(|reason| (reason, Direction::Egress))
        } else {
            Ok(())
        }
    } else if config::slot_awaits_policy(slot) {
        interface::check_delivery_to_workload(slot, ifindex, info)
            .map_err(|reason| (reason, Direction::Ingress))
    } else {
        Ok(())
    };
    if let Err((reason, direction)) = interface_check {
        pending.site.src_port = info.src_port;
        pending.site.dst_port = info.dst_port;
        let denial = Denial {
            reason,
            direction: direction as u8,
            ..Denial::NONE
        };
        return finish_denied(Some(info), &pending.site, &denial);
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
    let ports = transport_ports(info);
    let (src_port, dst_port) = match ports {
        Ok(ports) => ports,
        Err(_) => (0, 0),
    };
    pending.site.src_port = src_port;
    pending.site.dst_port = dst_port;
    pending.ports_known = ports.is_ok();
    pending.ports_error = match ports {
        Ok(_) => DropReason::MalformedL4,
        Err(reason) => reason,
    };
    pending.generation = generation;
    pending.floor = config::revocation_floor(slot);
    pending.now = conntrack::now_ns();
    pending.opens = conntrack::opens_tcp(info) || info.is_icmp_query_request();
    // ICMP messages other than queries are never tracked: each is judged by policy
    // (an error first matched to the flow it quotes).
    pending.untracked = info.is_untracked_icmp();
    pending.tracked = Tracked::New;
    conntrack::flow_of(info, src_port, dst_port, &mut pending.flow);
    if pending.ports_known && !pending.untracked {
        pending.tracked = conntrack::lookup(
            &pending.flow,
            info,
            pending.opens,
            conntrack::Currency {
                live: generation,
                floor: pending.floor,
            },
            &config::settings().lifetimes,
            pending.now,
        );
    }
    if let Tracked::Current { hit_slot } = pending.tracked {
        if let Fragment::First { id } = info.fragment {
            fragment::remember(info, id);
        }
        counters::count(Counter::ConntrackHit);
        rule_hits::count_packet(hit_slot);
        count_allowed(hook);
        return Verdict::Pass;
    }
    judge_pending(packet, scratch)
}

/// What `judge` learned of a packet that conntrack did not pass, for
/// `judge_pending` (in the scratch element: a BPF function takes at most five
/// arguments, and the stack is scarce).
pub struct Pending {
    /// The hook, interface and ports every event about the packet carries.
    site: EventSite,
    flow: conntrack::Flow,
    tracked: Tracked,
    /// The packet's ports are known; if not, `ports_error` says why.
    ports_known: bool,
    ports_error: DropReason,
    /// The live generation, read once for the packet.
    generation: u32,
    /// The oldest generation whose flows are current (see `conntrack::Currency`).
    floor: u32,
    /// Conntrack's clock.
    now: u64,
    /// The packet opens a flow (a bare TCP SYN, an ICMP query request).
    opens: bool,
    /// An ICMP message other than a query: not tracked.
    untracked: bool,
}

/// Steps 6 to 8 for a packet conntrack did not pass: endpoints, policy, verdict.
/// Out of line, so that the established flows' path (`judge` up to its conntrack
/// hit) keeps a small stack frame and this one starts where that path ends: the
/// BPF stack (512 bytes) holds both frames plus the deepest callee's.
#[inline(never)]
fn judge_pending(packet: &PacketView, scratch: &mut DecisionScratch) -> Verdict {
    let DecisionScratch {
        info,
        pending,
        judged,
    } = scratch;
    let (info, pending) = (&*info, &*pending);
    let site = &pending.site;
    let hook = site.hook;
    let (generation, tracked) = (pending.generation, pending.tracked);
    let slot = slot_of(generation);
    let src_endpoint = endpoint::lookup(slot, &info.src);
    let dst_endpoint = endpoint::lookup(slot, &info.dst);
    if !src_endpoint.any_enforced() && !dst_endpoint.any_enforced() {
        counters::count(Counter::NotEnforced);
        return Verdict::Pass;
    }

    if !pending.ports_known {
        counters::count(Counter::ParseFailure);
        let endpoint_id = if dst_endpoint.any_enforced() {
            dst_endpoint.endpoint_id
        } else {
            src_endpoint.endpoint_id
        };
        let denial = Denial {
            reason: pending.ports_error,
            endpoint_id,
            ..Denial::NONE
        };
        return finish_denied(Some(info), site, &denial);
    }
    if let Fragment::First { id } = info.fragment {
        fragment::remember(info, id);
    }
    match tracked {
        Tracked::Lost => counters::count(Counter::ConntrackFlowLost),
        Tracked::Expired => counters::count(Counter::ConntrackFlowExpired),
        Tracked::Stale { .. } => counters::count(Counter::ConntrackRejudged),
        _ => {}
    }
    let currency = conntrack::Currency {
        live: generation,
        floor: pending.floor,
    };

    // An ICMP error about a flow allowed under the live generation is part of it.
    if pending.untracked
        && parse::is_icmp_error(info.protocol, info.icmp_type)
        && related::icmp_error_is_related(packet, info, currency)
    {
        counters::count(Counter::ConntrackHit);
        count_allowed(hook);
        return Verdict::Pass;
    }
    let outcome = match tracked {
        // Passed in `judge`, before the endpoints.
        Tracked::Current { .. } => return Verdict::Pass,
        // A reply of a flow allowed under an older generation: judge the flow as its
        // first packet went, from this packet's destination to its source.
        Tracked::Stale { is_reply: true, .. } => judge_policy(
            PolicyQuery {
                slot,
                protocol: info.protocol,
                port: info.request_policy_port(site.src_port),
            },
            &dst_endpoint,
            &src_endpoint,
            &info.dst,
            &info.src,
            judged,
        ),
        Tracked::New
        | Tracked::Lost
        | Tracked::Expired
        | Tracked::Stale {
            is_reply: false, ..
        } => judge_policy(
            PolicyQuery {
                slot,
                protocol: info.protocol,
                port: info.policy_port(),
            },
            &src_endpoint,
            &dst_endpoint,
            &info.src,
            &info.dst,
            judged,
        ),
    };

    match outcome {
        Outcome::Allowed => finish_allowed(scratch),
        Outcome::Audited(direction) => finish_audited(scratch, direction),
        Outcome::Denied(direction) => finish_denied(
            Some(&scratch.info),
            &scratch.pending.site,
            &scratch.judged.of(direction).denial,
        ),
    }
}

/// An allowed packet: counted on its rules, its flow recorded, traced if asked.
/// Out of line, as are the other outcomes: each keeps its locals out of
/// `judge_pending`'s frame.
#[inline(never)]
fn finish_allowed(scratch: &DecisionScratch) -> Verdict {
    let DecisionScratch {
        info,
        pending,
        judged,
    } = scratch;
    let (ingress, egress, direction) = (
        &judged.ingress.allowance,
        &judged.egress.allowance,
        judged.direction,
    );
    let (site, flow, generation, now) = (
        &pending.site,
        &pending.flow,
        pending.generation,
        pending.now,
    );
    let settings = config::settings();
    // The flow's later packets count on one rule: the ingress rule's if any.
    let hit_slot = if ingress.hit_slot != 0 {
        ingress.hit_slot
    } else {
        egress.hit_slot
    };
    let repeated = pending.opens
        && conntrack::opening_already_allowed(flow, generation, &settings.lifetimes, now);
    if repeated {
        rule_hits::count_packet(hit_slot);
    } else {
        rule_hits::count_flow(ingress.hit_slot);
        rule_hits::count_flow(egress.hit_slot);
    }
    if !pending.untracked {
        conntrack::record_allowed(flow, info, &pending.tracked, generation, hit_slot, now);
    }
    count_allowed(site.hook);
    if !repeated && settings.flags & SETTINGS_FLAG_TRACE_ALLOWED != 0 {
        let reported = if direction == Direction::Egress as u8 {
            egress
        } else {
            ingress
        };
        let cause = EventCause {
            verdict: EventVerdict::Forwarded as u8,
            direction,
            reason: 0,
            endpoint_id: 0,
            peer_identity: reported.peer_identity,
            rule_id: reported.rule_id,
        };
        events::send(Some(info), site, &cause);
    }
    Verdict::Pass
}

/// A would-be denial of an endpoint in audit mode: passed, recorded as allowed,
/// counted as the deny it would have been (the flow itself on no rule), reported.
#[inline(never)]
fn finish_audited(scratch: &DecisionScratch, direction: Direction) -> Verdict {
    let DecisionScratch {
        info,
        pending,
        judged,
    } = scratch;
    let denial = &judged.of(direction).denial;
    let (site, flow, generation, now) = (
        &pending.site,
        &pending.flow,
        pending.generation,
        pending.now,
    );
    rule_hits::count_packet(denial.hit_slot);
    let repeated = pending.opens
        && conntrack::opening_already_allowed(flow, generation, &config::settings().lifetimes, now);
    if !pending.untracked {
        conntrack::record_allowed(flow, info, &pending.tracked, generation, 0, now);
    }
    counters::count(if is_ingress_hook(site.hook) {
        Counter::AuditedIngress
    } else {
        Counter::AuditedEgress
    });
    if !repeated {
        report(Some(info), site, denial, EventVerdict::Audit);
    }
    Verdict::Pass
}

/// Judges the flow `src -> dst` against the destination's ingress policy (if
/// `dst_endpoint` enforces ingress) and the source's egress policy (if `src_endpoint`
/// enforces egress), writing each direction's ruling into `judged`.
#[inline(always)]
fn judge_policy(
    query: PolicyQuery,
    src_endpoint: &EndpointInfo,
    dst_endpoint: &EndpointInfo,
    src: &[u8; 16],
    dst: &[u8; 16],
    judged: &mut Judged,
) -> Outcome {
    const NOT_ENFORCED: Allowance = Allowance {
        rule_id: RULE_ID_DEFAULT_DENY,
        peer_identity: IDENTITY_WORLD,
        hit_slot: 0,
    };
    judged.ingress.allowance = NOT_ENFORCED;
    judged.egress.allowance = NOT_ENFORCED;
    judged.direction = 0;
    // Plain values, not Option: see endpoint::lookup.
    let mut audited = false;
    let mut audited_direction = Direction::Ingress;
    if dst_endpoint.ingress_enforced() {
        if check_direction(
            query,
            dst_endpoint,
            Direction::Ingress,
            src,
            &mut judged.ingress,
        ) {
            judged.direction = Direction::Ingress as u8;
        } else if dst_endpoint.audit() {
            audited = true;
        } else {
            return Outcome::Denied(Direction::Ingress);
        }
    }
    if src_endpoint.egress_enforced() {
        if check_direction(
            query,
            src_endpoint,
            Direction::Egress,
            dst,
            &mut judged.egress,
        ) {
            judged.direction = Direction::Egress as u8;
        } else if src_endpoint.audit() {
            if !audited {
                audited = true;
                audited_direction = Direction::Egress;
            }
        } else {
            return Outcome::Denied(Direction::Egress);
        }
    }
    if audited {
        Outcome::Audited(audited_direction)
    } else {
        Outcome::Allowed
    }
}

/// What a policy lookup asks besides the endpoint, direction and peer.
#[derive(Clone, Copy)]
struct PolicyQuery {
    slot: u8,
    protocol: u8,
    /// The port a rule matches (`PacketInfo::policy_port`).
    port: u16,
}

/// One enforced direction: true if allowed, with the allowing rule in
/// `ruling.allowance`; false with the denial in `ruling.denial`. Out of line (called
/// once per enforced direction): the peer's identity and the policy keys stay out of
/// `judge_pending`'s frame.
#[inline(never)]
fn check_direction(
    query: PolicyQuery,
    endpoint: &EndpointInfo,
    direction: Direction,
    peer_addr: &[u8; 16],
    ruling: &mut Ruling,
) -> bool {
    let peer_identity = identity::resolve(query.slot, peer_addr);
    let key = PolicyKeyData::new(
        query.slot,
        endpoint.endpoint_id,
        peer_identity,
        direction,
        query.protocol,
        query.port,
    );
    let entry = policy::lookup(
        &key,
        endpoint.has_prefix_rules(),
        endpoint.has_any_peer_rules(),
    );
    let ingress = matches!(direction, Direction::Ingress);
    let denial = match entry {
        // No entry: no tier decided. Denied by default where a NetworkPolicy selects
        // the endpoint, allowed where only ClusterNetworkPolicies do.
        entry if entry.is_none() => {
            if endpoint.default_allows(ingress) {
                ruling.allowance = Allowance {
                    rule_id: RULE_ID_DEFAULT_DENY,
                    peer_identity,
                    hit_slot: 0,
                };
                return true;
            }
            Denial {
                reason: DropReason::PolicyDenied,
                direction: direction as u8,
                endpoint_id: endpoint.endpoint_id,
                peer_identity,
                rule_id: RULE_ID_DEFAULT_DENY,
                hit_slot: endpoint.default_deny_hit_slot(ingress),
            }
        }
        entry if !entry.is_deny() => {
            ruling.allowance = Allowance {
                rule_id: entry.rule_id,
                peer_identity,
                hit_slot: entry.hit_slot,
            };
            return true;
        }
        // A resolved default deny (rule 0) is reported as the default deny it is (the
        // compiler gave its entries the endpoint's default deny slot).
        entry if entry.rule_id == RULE_ID_DEFAULT_DENY => Denial {
            reason: DropReason::PolicyDenied,
            direction: direction as u8,
            endpoint_id: endpoint.endpoint_id,
            peer_identity,
            rule_id: RULE_ID_DEFAULT_DENY,
            hit_slot: entry.hit_slot,
        },
        entry => Denial {
            reason: DropReason::PolicyDeny,
            direction: direction as u8,
            endpoint_id: endpoint.endpoint_id,
            peer_identity,
            rule_id: entry.rule_id,
            hit_slot: entry.hit_slot,
        },
    };
    ruling.denial = denial;
    false
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

/// Counts a denied packet and reports it (unless deny events are off). Out of line,
/// as the event's fields are: denials are off the allow path.
#[inline(never)]
fn finish_denied(info: Option<&PacketInfo>, site: &EventSite, denial: &Denial) -> Verdict {
    let hook = site.hook;
    count_denied(hook, denial.reason);
    rule_hits::count_packet(denial.hit_slot);
    // The switch is read here, before any clock read: with deny events off a denial
    // costs one settings load.
    if config::settings().flags & SETTINGS_FLAG_NO_DENY_EVENTS == 0 {
        report(info, site, denial, EventVerdict::Dropped);
    }
    Verdict::Drop
}

/// A packet whose IP header is unreadable: dropped, with an event without addresses.
#[inline(always)]
fn deny_unparsed(site: &EventSite, reason: DropReason) -> Verdict {
    let denial = Denial {
        reason,
        ..Denial::NONE
    };
    finish_denied(None, site, &denial)
}

/// Sends the event of a denial (dropped, or passed in audit mode).
#[inline(always)]
fn report(info: Option<&PacketInfo>, site: &EventSite, denial: &Denial, verdict: EventVerdict) {
    events::send(info, site, &denial.cause(verdict));
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
