//! Connections, not single packets: the real programs (BPF_PROG_TEST_RUN) see a
//! connection's packets in both directions, and its replies pass whichever end
//! enforces what; TCP is followed through its stages; packets a workload's own
//! interface receives must carry the workload's addresses; and workloads may not act
//! as routers.
//!
//! Test runs of every program happen on the loopback device (ifindex 1), so binding
//! ifindex 1 to a workload makes XDP and TC ingress see "packets the workload sent".

use microseg::datapath::{
    AttachPoint, ProgramVerdict, XdpAttachMode,
    probe::{Probe, TcpFlags},
};
use microseg_common::{
    DropReason,
    config::{ConntrackLifetimes, Settings},
    conntrack::{FLOW_SEEN_REPLY, FLOW_SEEN_RST},
    counters::Counter,
    event::EventVerdict,
    policy::Direction,
};
use microseg_tests::harness::{ALL_PROGRAMS, Harness, StateBuilder, ip};

const PASS: ProgramVerdict = ProgramVerdict::Pass;
const DROP: ProgramVerdict = ProgramVerdict::Drop;
const TCP: Option<u8> = Some(6);
const UDP: Option<u8> = Some(17);
const ICMP: Option<u8> = Some(1);

const XDP: AttachPoint = AttachPoint::Xdp(XdpAttachMode::Default);
const TC_INGRESS: AttachPoint = AttachPoint::TcIngress;
const TC_EGRESS: AttachPoint = AttachPoint::TcEgress;

/// The interface every test run happens on.
const TEST_RUN_IFINDEX: u32 = 1;

const WORKLOAD: &str = "10.3.0.10";
const WORKLOAD6: &str = "fd00:3::10";
const OTHER_WORKLOAD: &str = "10.3.0.20";
const OTHER_WORKLOAD6: &str = "fd00:3::20";
const SERVER: &str = "10.3.0.99";
const SERVER6: &str = "fd00:3::99";

fn harness(test: &str, builder: StateBuilder) -> Option<Harness> {
    if !microseg_tests::kernel_available(test) {
        return None;
    }
    let mut harness = Harness::new();
    harness.apply(builder.build()).expect("apply");
    Some(harness)
}

/// The programs, in pairs (forward hook, reply hook): a connection's packets may be
/// judged by different hooks (XDP on the way in, TC egress on the way out).
fn hook_pairs() -> Vec<(AttachPoint, AttachPoint)> {
    let mut pairs = Vec::new();
    for forward in ALL_PROGRAMS {
        for reply in ALL_PROGRAMS {
            pairs.push((forward, reply));
        }
    }
    pairs
}

#[test]
fn a_workload_enforced_only_on_ingress_can_open_connections() {
    // The guide's "default deny ingress": selected for ingress, no rule.
    let builder = StateBuilder::default()
        .endpoint(WORKLOAD, 1, true, false, false)
        .endpoint(WORKLOAD6, 1, true, false, false);
    let Some(h) = harness(
        "a_workload_enforced_only_on_ingress_can_open_connections",
        builder,
    ) else {
        return;
    };
    let mut port = 40000;
    for (client, server) in [(WORKLOAD, SERVER), (WORKLOAD6, SERVER6)] {
        for (forward_hook, reply_hook) in hook_pairs() {
            port += 1;
            let syn = Probe::tcp(ip(client), port, ip(server), 443);
            assert_eq!(h.verdict_at(forward_hook, &syn), PASS, "{syn:?}");
            assert_eq!(
                h.verdict_at(reply_hook, &syn.reply()),
                PASS,
                "the SYN-ACK of {syn:?}"
            );
            assert_eq!(h.verdict_at(forward_hook, &syn.established()), PASS);
            let query = Probe::udp(ip(client), port, ip(server), 53);
            assert_eq!(h.verdict_at(forward_hook, &query), PASS);
            assert_eq!(
                h.verdict_at(reply_hook, &query.reply()),
                PASS,
                "the DNS answer to {query:?}"
            );
        }
        // Nobody may open a connection to it.
        let unsolicited = Probe::tcp(ip(server), 5555, ip(client), 22);
        assert_eq!(h.verdict(&unsolicited), DROP);
        let unsolicited = Probe::udp(ip(server), 53, ip(client), 33333);
        assert_eq!(
            h.verdict(&unsolicited),
            DROP,
            "a DNS answer nobody asked for"
        );
    }
}

#[test]
fn a_workload_enforced_only_on_egress_can_serve() {
    let builder = StateBuilder::default()
        .endpoint(WORKLOAD, 1, false, true, false)
        .endpoint(WORKLOAD6, 1, false, true, false);
    let Some(h) = harness("a_workload_enforced_only_on_egress_can_serve", builder) else {
        return;
    };
    let mut port = 41000;
    for (server, client) in [(WORKLOAD, SERVER), (WORKLOAD6, SERVER6)] {
        for (forward_hook, reply_hook) in hook_pairs() {
            port += 1;
            let syn = Probe::tcp(ip(client), port, ip(server), 8080);
            assert_eq!(h.verdict_at(forward_hook, &syn), PASS);
            assert_eq!(
                h.verdict_at(reply_hook, &syn.reply()),
                PASS,
                "the workload's SYN-ACK"
            );
            assert_eq!(
                h.verdict_at(reply_hook, &syn.reply().established()),
                PASS,
                "the workload's data"
            );
            let query = Probe::udp(ip(client), port, ip(server), 5353);
            assert_eq!(h.verdict_at(forward_hook, &query), PASS);
            assert_eq!(h.verdict_at(reply_hook, &query.reply()), PASS);
        }
        // It may not open anything itself.
        assert_eq!(
            h.verdict(&Probe::tcp(ip(server), 5000, ip(client), 80)),
            DROP
        );
        assert_eq!(
            h.verdict(&Probe::udp(ip(server), 5000, ip(client), 53)),
            DROP
        );
    }
}

#[test]
fn a_closed_connection_cannot_be_reused_by_the_denied_direction() {
    // The workload may connect to the server on TCP 80; the server may open nothing
    // to the workload.
    let builder = StateBuilder::default()
        .endpoint(WORKLOAD, 1, true, true, false)
        .host(SERVER, 300)
        .allow(1, 300, Direction::Egress, TCP, Some((80, 80)), 1);
    let Some(h) = harness(
        "a_closed_connection_cannot_be_reused_by_the_denied_direction",
        builder,
    ) else {
        return;
    };
    let syn = Probe::tcp(ip(WORKLOAD), 42001, ip(SERVER), 80);
    assert_eq!(h.verdict(&syn), PASS);
    assert_eq!(h.verdict(&syn.reply()), PASS);
    assert_eq!(h.verdict(&syn.established()), PASS);
    // Both sides close.
    assert_eq!(h.verdict(&syn.with_tcp_flags(TcpFlags::FIN_ACK)), PASS);
    assert_eq!(
        h.verdict(&syn.reply().with_tcp_flags(TcpFlags::FIN_ACK)),
        PASS
    );
    assert_eq!(h.verdict(&syn.established()), PASS, "the last ACK");
    // The server opens a connection on the same 5-tuple: a bare SYN from the side
    // that did not open the flow is a new connection, judged by policy.
    let reversed = syn.reply().with_tcp_flags(TcpFlags::SYN);
    assert_eq!(h.verdict(&reversed), DROP);
    // The workload may reopen it.
    assert_eq!(h.verdict(&syn), PASS);
    assert_eq!(h.verdict(&syn.reply()), PASS);
    // A reset closes it as well.
    assert_eq!(h.verdict(&syn.reply().with_tcp_flags(TcpFlags::RST)), PASS);
    assert_eq!(h.verdict(&reversed), DROP);
}

/// Sets `last_seen_ns` of every tracked flow with `port` on either side to `age_ns`
/// before now, so that lifetimes can be tested without waiting for them.
fn age_flows(h: &mut Harness, port: u16, age_ns: u64, expected_seen: u8) {
    let mut maps = h.datapath.maps().expect("maps");
    let entries: Vec<_> = maps
        .conntrack
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, _)| key.port_a == port || key.port_b == port)
        .collect();
    assert!(!entries.is_empty(), "no tracked flow on port {port}");
    let now = monotonic_ns();
    for (key, mut state) in entries {
        assert_eq!(
            state.seen, expected_seen,
            "stage of the flow on port {port}"
        );
        state.last_seen_ns = now - age_ns;
        maps.conntrack.insert(key, state, 0).expect("rewrite flow");
    }
}

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

const SECOND: u64 = 1_000_000_000;

/// Lifetimes scaled down so that ages stay within the machine's uptime (the
/// monotonic clock starts at boot); their order is the defaults' order.
const TEST_LIFETIMES: ConntrackLifetimes = ConntrackLifetimes::new(5, 20, 8, 2, 10, 5);

#[test]
fn tcp_stages_have_their_own_lifetimes() {
    let builder = StateBuilder::default()
        .endpoint(WORKLOAD, 1, true, true, false)
        .host(SERVER, 300)
        .allow(1, 300, Direction::Egress, TCP, Some((80, 80)), 1);
    let Some(mut h) = harness("tcp_stages_have_their_own_lifetimes", builder) else {
        return;
    };
    h.datapath
        .maps()
        .unwrap()
        .set_settings(&Settings::default().with_lifetimes(TEST_LIFETIMES))
        .unwrap();
    // An established connection idle for longer than UDP flows and unanswered
    // connections live: the server speaks first, and it arrives.
    let established = Probe::tcp(ip(WORKLOAD), 43001, ip(SERVER), 80);
    assert_eq!(h.verdict(&established), PASS);
    assert_eq!(h.verdict(&established.reply()), PASS);
    age_flows(&mut h, 43001, 15 * SECOND, FLOW_SEEN_REPLY);
    assert_eq!(
        h.verdict(&established.reply().established()),
        PASS,
        "server push after an idle time past the UDP lifetime"
    );
    // Past its own lifetime it is forgotten: the server's packet is then a new flow
    // the policy denies.
    age_flows(&mut h, 43001, 21 * SECOND, FLOW_SEEN_REPLY);
    assert_eq!(h.verdict(&established.reply().established()), DROP);

    // A connection never answered lives its opening lifetime.
    let opening = Probe::tcp(ip(WORKLOAD), 43002, ip(SERVER), 80);
    assert_eq!(h.verdict(&opening), PASS);
    age_flows(&mut h, 43002, 4 * SECOND, 0);
    assert_eq!(h.verdict(&opening.reply()), PASS, "a late SYN-ACK");
    let opening = Probe::tcp(ip(WORKLOAD), 43003, ip(SERVER), 80);
    assert_eq!(h.verdict(&opening), PASS);
    age_flows(&mut h, 43003, 6 * SECOND, 0);
    assert_eq!(h.verdict(&opening.reply()), DROP, "a SYN-ACK too late");

    // A reset connection lives its closed lifetime; stray segments do not extend it.
    let reset = Probe::tcp(ip(WORKLOAD), 43004, ip(SERVER), 80);
    assert_eq!(h.verdict(&reset), PASS);
    assert_eq!(h.verdict(&reset.reply()), PASS);
    assert_eq!(h.verdict(&reset.with_tcp_flags(TcpFlags::RST)), PASS);
    age_flows(
        &mut h,
        43004,
        SECOND + SECOND / 2,
        FLOW_SEEN_REPLY | FLOW_SEEN_RST,
    );
    assert_eq!(h.verdict(&reset.reply().established()), PASS);
    age_flows(&mut h, 43004, 3 * SECOND, FLOW_SEEN_REPLY | FLOW_SEEN_RST);
    assert_eq!(h.verdict(&reset.reply().established()), DROP);

    // UDP lives its own lifetime.
    let udp_allowed = StateBuilder::default()
        .endpoint(WORKLOAD, 1, true, true, false)
        .host(SERVER, 300)
        .allow(1, 300, Direction::Egress, UDP, Some((80, 80)), 1);
    h.apply(udp_allowed.build()).expect("apply");
    let query = Probe::udp(ip(WORKLOAD), 43005, ip(SERVER), 80);
    assert_eq!(h.verdict(&query), PASS);
    age_flows(&mut h, 43005, 9 * SECOND, 0);
    assert_eq!(h.verdict(&query.reply()), PASS);
    age_flows(&mut h, 43005, 11 * SECOND, FLOW_SEEN_REPLY);
    assert_eq!(h.verdict(&query.reply()), DROP);
}

/// `last_seen_ns` of the one tracked flow with `port` on either side.
fn last_seen(h: &mut Harness, port: u16) -> u64 {
    let maps = h.datapath.maps().expect("maps");
    let seen: Vec<u64> = maps
        .conntrack
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, _)| key.port_a == port || key.port_b == port)
        .map(|(_, state)| state.last_seen_ns)
        .collect();
    assert_eq!(seen.len(), 1, "tracked flows on port {port}");
    seen[0]
}

/// Conntrack's clock is the kernel's coarse monotonic clock (one timer tick, at most
/// 10 ms at HZ=100, behind the precise one): lifetimes still hold to within a tick,
/// and an idle flow's packet still refreshes its entry to "now".
#[test]
fn lifetimes_and_refreshes_hold_to_the_coarse_clocks_tick() {
    const TICK_MARGIN: u64 = 20_000_000;
    let builder = StateBuilder::default()
        .endpoint(WORKLOAD, 1, true, true, false)
        .host(SERVER, 300)
        .allow(1, 300, Direction::Egress, TCP, Some((80, 80)), 1);
    let Some(mut h) = harness(
        "lifetimes_and_refreshes_hold_to_the_coarse_clocks_tick",
        builder,
    ) else {
        return;
    };
    h.datapath
        .maps()
        .unwrap()
        .set_settings(&Settings::default().with_lifetimes(TEST_LIFETIMES))
        .unwrap();
    let established = Probe::tcp(ip(WORKLOAD), 44001, ip(SERVER), 80);
    assert_eq!(h.verdict(&established), PASS);
    assert_eq!(h.verdict(&established.reply()), PASS);
    let recorded = last_seen(&mut h, 44001);
    let now = monotonic_ns();
    assert!(
        recorded <= now && recorded + TICK_MARGIN >= now,
        "recorded at {recorded}, now {now}"
    );

    // Idle for most of its 20 s lifetime: the packet passes and refreshes the entry.
    age_flows(&mut h, 44001, 15 * SECOND, FLOW_SEEN_REPLY);
    let before = monotonic_ns();
    assert_eq!(h.verdict(&established.established()), PASS);
    let after = monotonic_ns();
    let refreshed = last_seen(&mut h, 44001);
    assert!(
        refreshed + TICK_MARGIN >= before && refreshed <= after,
        "refreshed to {refreshed}, packet sent between {before} and {after}"
    );
    // Refreshed, it lives another lifetime: just short of it, it passes...
    age_flows(&mut h, 44001, 20 * SECOND - SECOND / 10, FLOW_SEEN_REPLY);
    assert_eq!(h.verdict(&established.reply().established()), PASS);
    // ...and just past it (by more than a tick), it is forgotten: the server's
    // packet is a new flow the policy denies.
    age_flows(
        &mut h,
        44001,
        20 * SECOND + 2 * TICK_MARGIN,
        FLOW_SEEN_REPLY,
    );
    assert_eq!(h.verdict(&established.reply().established()), DROP);
}

#[test]
fn echo_requests_open_flows_and_stale_echo_replies_are_judged_as_requests() {
    // The workload may send echo requests (ICMP type 8, any code) to the server, and
    // receive nothing unsolicited.
    let echo_request = (8u16 << 8, (8u16 << 8) | 0xff);
    let builder = || {
        StateBuilder::default()
            .endpoint(WORKLOAD, 1, true, true, false)
            .host(SERVER, 300)
            .allow(1, 300, Direction::Egress, ICMP, Some(echo_request), 1)
    };
    let Some(mut h) = harness(
        "echo_requests_open_flows_and_stale_echo_replies_are_judged_as_requests",
        builder(),
    ) else {
        return;
    };
    let ping = Probe::icmp(ip(WORKLOAD), ip(SERVER), 8, 0, 777);
    let pong = Probe::icmp(ip(SERVER), ip(WORKLOAD), 0, 0, 777);
    assert_eq!(h.verdict(&ping), PASS);
    assert_eq!(h.verdict(&pong), PASS);
    // A new generation with the same rule: the reply is judged again as its request
    // went (type 8), not with the identifier as a port.
    h.apply(builder().host(OTHER_WORKLOAD, 301).build())
        .expect("apply");
    assert_eq!(h.verdict(&pong), PASS, "a stale echo reply, re-judged");
    // The server may not ping the workload, even with the workload's identifier: an
    // echo request is never a reply.
    let reverse_ping = Probe::icmp(ip(SERVER), ip(WORKLOAD), 8, 0, 777);
    assert_eq!(h.verdict(&reverse_ping), DROP);
    // Revoked: the stale reply is denied.
    h.apply(
        StateBuilder::default()
            .endpoint(WORKLOAD, 1, true, true, false)
            .host(SERVER, 300)
            .build(),
    )
    .expect("apply");
    assert_eq!(h.verdict(&pong), DROP);
}

/// Packets skip the binding lookup where the live generation binds no interface (a
/// mark per generation slot): a binding an update adds is enforced at once, in
/// whichever slot, and one an update removes is no longer.
#[test]
fn interface_bindings_added_and_removed_by_updates_are_honoured() {
    let builder = || {
        StateBuilder::default()
            .endpoint(WORKLOAD, 1, false, true, false)
            .host(SERVER, 300)
            .allow(1, 300, Direction::Egress, UDP, Some((53, 53)), 1)
    };
    let Some(mut h) = harness(
        "interface_bindings_added_and_removed_by_updates_are_honoured",
        builder(),
    ) else {
        return;
    };
    // Another address than the workload's, to the server: nothing enforced.
    let spoofed = Probe::udp(ip(OTHER_WORKLOAD), 45001, ip(SERVER), 80);
    assert_eq!(h.verdict_at(XDP, &spoofed), PASS);
    assert_eq!(h.verdict_at(TC_INGRESS, &spoofed), PASS);
    for round in 0..2 {
        // Bound (in one slot, then in the other).
        h.apply(builder().binding(TEST_RUN_IFINDEX, &[WORKLOAD]).build())
            .expect("apply");
        assert_eq!(h.verdict_at(XDP, &spoofed), DROP, "round {round}");
        assert_eq!(h.verdict_at(TC_INGRESS, &spoofed), DROP, "round {round}");
        // Still bound in a new generation.
        h.apply(
            builder()
                .host(OTHER_WORKLOAD, 301)
                .binding(TEST_RUN_IFINDEX, &[WORKLOAD])
                .build(),
        )
        .expect("apply");
        assert_eq!(h.verdict_at(XDP, &spoofed), DROP, "round {round}");
        // Unbound.
        h.apply(builder().build()).expect("apply");
        assert_eq!(h.verdict_at(XDP, &spoofed), PASS, "round {round}");
        assert_eq!(h.verdict_at(TC_INGRESS, &spoofed), PASS, "round {round}");
    }
}

#[test]
fn a_workload_interface_only_carries_the_workloads_own_addresses() {
    // The workload is behind the test-run interface; its egress is default deny
    // except UDP 53 to the server.
    let builder = StateBuilder::default()
        .endpoint(WORKLOAD, 1, false, true, false)
        .endpoint(WORKLOAD6, 1, false, true, false)
        .host(SERVER, 300)
        .host(SERVER6, 300)
        .host(OTHER_WORKLOAD, 301)
        .host(OTHER_WORKLOAD6, 301)
        .allow(1, 300, Direction::Egress, UDP, Some((53, 53)), 1)
        .binding(TEST_RUN_IFINDEX, &[WORKLOAD, WORKLOAD6]);
    let Some(mut h) = harness(
        "a_workload_interface_only_carries_the_workloads_own_addresses",
        builder,
    ) else {
        return;
    };
    h.events();
    for (own, other, unknown, server) in [
        (WORKLOAD, OTHER_WORKLOAD, "10.3.0.77", SERVER),
        (WORKLOAD6, OTHER_WORKLOAD6, "fd00:3::77", SERVER6),
    ] {
        for hook in [XDP, TC_INGRESS] {
            let own_query = Probe::udp(ip(own), 44000, ip(server), 53);
            assert_eq!(h.verdict_at(hook, &own_query), PASS, "{own} on {hook:?}");
            let denied = Probe::udp(ip(own), 44000, ip(server), 54);
            assert_eq!(h.verdict_at(hook, &denied), DROP, "policy still applies");
            for forged in [other, unknown] {
                let forged = Probe::udp(ip(forged), 44000, ip(server), 54);
                assert_eq!(
                    h.verdict_at(hook, &forged),
                    DROP,
                    "forged source {forged:?} on {hook:?}"
                );
            }
        }
        // What the interface sends towards the workload is not the workload's: TC
        // egress does not validate sources.
        let towards = Probe::udp(ip(server), 53, ip(own), 44000);
        assert_eq!(h.verdict_at(TC_EGRESS, &towards), PASS, "the DNS answer");
    }
    let counters = h.datapath.maps().unwrap().counters().unwrap();
    assert_eq!(counters.drops(DropReason::InvalidSourceIp), 8);
    let events = h.events();
    let forged = events
        .iter()
        .filter(|e| e.reason == Some(DropReason::InvalidSourceIp))
        .count();
    assert_eq!(forged, 8, "one event per forged packet: {events:?}");
    assert!(
        events
            .iter()
            .filter(|e| e.reason == Some(DropReason::InvalidSourceIp))
            .all(|e| e.verdict == Some(EventVerdict::Dropped) && e.destination_port == 54)
    );

    // Link-local traffic that stays on the link keeps working: neighbour discovery,
    // DAD, DHCP, mDNS.
    let staying = [
        Probe::udp(ip("fe80::10"), 5353, ip("ff02::fb"), 5353),
        Probe::icmp(ip("fe80::10"), ip("ff02::1:ff00:10"), 135, 0, 0),
        Probe::icmp(ip("::"), ip("ff02::1:ff00:10"), 135, 0, 0),
        Probe::icmp(ip("fe80::10"), ip("ff02::2"), 133, 0, 0),
        Probe::udp(ip("0.0.0.0"), 68, ip("255.255.255.255"), 67),
        Probe::udp(ip("169.254.1.1"), 5353, ip("224.0.0.251"), 5353),
    ];
    for probe in staying {
        for hook in [XDP, TC_INGRESS] {
            assert_eq!(h.verdict_at(hook, &probe), PASS, "{probe:?}");
        }
    }
    // A link-local source may not reach beyond the link.
    let leaving = Probe::udp(ip("fe80::10"), 5353, ip(SERVER6), 53);
    assert_eq!(h.verdict_at(XDP, &leaving), DROP);
}

#[test]
fn workloads_may_not_advertise_routes_but_the_network_may() {
    let advertisement = Probe::icmp(ip("fe80::10"), ip("ff02::1"), 134, 0, 0);
    let redirect = Probe::icmp(ip("fe80::10"), ip("fe80::20"), 137, 0, 0);
    let solicitation = Probe::icmp(ip("fe80::10"), ip("ff02::2"), 133, 0, 0);
    let neighbour = Probe::icmp(ip(WORKLOAD6), ip("ff02::1:ff00:99"), 135, 0, 0);
    let advert = Probe::icmp(ip(WORKLOAD6), ip("fe80::99"), 136, 0, 0);
    let bound = StateBuilder::default()
        .endpoint(WORKLOAD6, 1, true, true, false)
        .binding(TEST_RUN_IFINDEX, &[WORKLOAD6]);
    let Some(mut h) = harness(
        "workloads_may_not_advertise_routes_but_the_network_may",
        bound,
    ) else {
        return;
    };
    for hook in [XDP, TC_INGRESS] {
        assert_eq!(h.verdict_at(hook, &advertisement), DROP, "RA on {hook:?}");
        assert_eq!(h.verdict_at(hook, &redirect), DROP, "redirect on {hook:?}");
        assert_eq!(h.verdict_at(hook, &solicitation), PASS);
        assert_eq!(h.verdict_at(hook, &neighbour), PASS);
        assert_eq!(h.verdict_at(hook, &advert), PASS);
    }
    // Towards the workload (TC egress) an RA is the network's: unchanged.
    assert_eq!(h.verdict_at(TC_EGRESS, &advertisement), PASS);
    let counters = h.datapath.maps().unwrap().counters().unwrap();
    assert_eq!(counters.drops(DropReason::ForbiddenIcmpv6), 4);
    // An interface bound to no workload (a host NIC) receives routers' RAs as before.
    h.apply(
        StateBuilder::default()
            .endpoint(WORKLOAD6, 1, true, true, false)
            .build(),
    )
    .expect("apply");
    assert_eq!(h.verdict(&advertisement), PASS);
    assert_eq!(h.verdict(&redirect), PASS);
    assert!(
        h.datapath
            .maps()
            .unwrap()
            .counters()
            .unwrap()
            .get(Counter::NotPolicyTraffic)
            > 0
    );
}

/// ICMP is tracked as nf_conntrack tracks it: a query (echo, timestamp, information,
/// address mask; ICMPv6 echo, node information) by its request type and identifier,
/// so only that exchange's reply passes, and any other ICMP message is judged by
/// policy. Before, every ICMP message without an echo identifier shared one entry
/// per address pair (as did an echo with identifier 0): once one was allowed, the
/// other side could send any ICMP type back.
#[test]
fn icmp_queries_are_tracked_per_type_and_identifier_and_other_icmp_is_judged() {
    // The workload may send any ICMP to the server; it accepts nothing unsolicited.
    let builder = StateBuilder::default()
        .endpoint(WORKLOAD, 1, true, true, false)
        .endpoint(WORKLOAD6, 1, true, true, false)
        .host(SERVER, 300)
        .host(SERVER6, 300)
        .allow(1, 300, Direction::Egress, ICMP, None, 1)
        .allow(1, 300, Direction::Egress, Some(58), None, 2);
    let Some(mut h) = harness(
        "icmp_queries_are_tracked_per_type_and_identifier_and_other_icmp_is_judged",
        builder,
    ) else {
        return;
    };
    let lost = |h: &mut Harness| {
        h.datapath
            .maps()
            .unwrap()
            .counters()
            .unwrap()
            .get(Counter::ConntrackFlowLost)
    };
    // (workload, server, echo request, echo reply, other query request and reply,
    // a message that is no query)
    for (workload, server, echo, echo_reply, query, query_reply, other) in [
        (WORKLOAD, SERVER, 8, 0, 13, 14, 5),
        (WORKLOAD6, SERVER6, 128, 129, 139, 140, 200),
    ] {
        let icmp = |src: &str, dst: &str, icmp_type: u8, identifier: u16| {
            Probe::icmp(ip(src), ip(dst), icmp_type, 0, identifier)
        };
        // An echo exchange (identifier 0, as a raw-socket ping may use): the reply
        // passes.
        assert_eq!(h.verdict(&icmp(workload, server, echo, 0)), PASS);
        assert_eq!(
            h.verdict(&icmp(server, workload, echo_reply, 0)),
            PASS,
            "the echo reply"
        );
        // Nothing else comes back on it: another query, its reply, another type.
        for (icmp_type, what) in [
            (query, "another query's request"),
            (query_reply, "another query's reply"),
            (other, "a message that is no query"),
            (echo, "an echo request"),
        ] {
            assert_eq!(
                h.verdict(&icmp(server, workload, icmp_type, 0)),
                DROP,
                "{what} (type {icmp_type}) from the server after an allowed echo exchange"
            );
        }
        // The other query, asked by the workload: its reply passes, for its
        // identifier only, and as that query's reply only.
        assert_eq!(h.verdict(&icmp(workload, server, query, 7)), PASS);
        assert_eq!(
            h.verdict(&icmp(server, workload, query_reply, 7)),
            PASS,
            "the reply to the workload's query (type {query})"
        );
        let lost_before = lost(&mut h);
        assert_eq!(
            h.verdict(&icmp(server, workload, query_reply, 8)),
            DROP,
            "a reply with another identifier"
        );
        assert_eq!(
            h.verdict(&icmp(server, workload, echo_reply, 7)),
            DROP,
            "an echo reply with the query's identifier"
        );
        // A reply that finds no entry is counted as a lost flow, at each of the
        // three programs the probes run through.
        assert_eq!(lost(&mut h) - lost_before, 6, "replies without an entry");
        // A message that is no query is judged by policy each time, both ways.
        assert_eq!(h.verdict(&icmp(workload, server, other, 0)), PASS);
        assert_eq!(
            h.verdict(&icmp(server, workload, other, 0)),
            DROP,
            "type {other} back, after the workload sent one"
        );
    }
}
