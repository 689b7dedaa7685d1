//! End to end: the programs attached to a veth in a network namespace enforce a
//! default-deny policy on real TCP connections and UDP exchanges, in both directions,
//! IPv4 and IPv6; replies of allowed flows pass; the blocked attempts' deny events
//! come out of the ring buffer with the right fields.

use microseg::datapath::{Datapath, LoadOptions, events::drain};
use microseg_common::{
    DropReason,
    event::{EventVerdict, Hook},
    policy::Direction,
};
use microseg_tests::{
    harness::{StateBuilder, ip},
    topology::{
        CLIENT_V4, CLIENT_V6, EchoServers, SERVER_V4, SERVER_V6, TwoHosts, tcp_exchange,
        udp_exchange,
    },
};

const TCP: Option<u8> = Some(6);
const UDP: Option<u8> = Some(17);
const CLIENT_IDENTITY: u32 = 300;

/// The server (endpoint 1) accepts TCP 80 and UDP 53 from the client, and may open
/// TCP 9000 to the client; everything else is denied both ways.
fn server_policy() -> StateBuilder {
    StateBuilder::default()
        .endpoint(SERVER_V4, 1, true, true, false)
        .endpoint(SERVER_V6, 1, true, true, false)
        .host(CLIENT_V4, CLIENT_IDENTITY)
        .host(CLIENT_V6, CLIENT_IDENTITY)
        .allow(
            1,
            CLIENT_IDENTITY,
            Direction::Ingress,
            TCP,
            Some((80, 80)),
            1,
        )
        .allow(
            1,
            CLIENT_IDENTITY,
            Direction::Ingress,
            UDP,
            Some((53, 53)),
            2,
        )
        .allow(
            1,
            CLIENT_IDENTITY,
            Direction::Egress,
            TCP,
            Some((9000, 9000)),
            3,
        )
}

fn enforce_between_namespaces(tc_only: bool) {
    let hosts = TwoHosts::new();
    let _server_side = EchoServers::start(&hosts.server, &[80, 81, 53, 54]);
    let _client_side = EchoServers::start(&hosts.client, &[9000, 9001]);
    let (server, client, server6) = (ip(SERVER_V4), ip(CLIENT_V4), ip(SERVER_V6));

    // Before microseg: everything connects.
    assert!(
        tcp_exchange(&hosts.client, server, 81),
        "sanity: open network"
    );
    assert!(
        tcp_exchange(&hosts.client, server6, 81),
        "sanity: open network, IPv6"
    );

    let mut datapath = Datapath::load(&LoadOptions::default()).expect("load");
    let mut events = datapath.take_events().expect("events");
    datapath
        .apply(&Default::default(), &server_policy().build())
        .expect("apply");
    hosts.attach(&mut datapath, tc_only);
    drain(&mut events);

    // Ingress to the server: allowed ports connect, replies come back.
    assert!(tcp_exchange(&hosts.client, server, 80), "TCP 80 allowed");
    assert!(udp_exchange(&hosts.client, server, 53), "UDP 53 allowed");
    assert!(
        tcp_exchange(&hosts.client, server6, 80),
        "TCP 80 allowed over IPv6"
    );
    assert!(!tcp_exchange(&hosts.client, server, 81), "TCP 81 blocked");
    assert!(!udp_exchange(&hosts.client, server, 54), "UDP 54 blocked");
    assert!(
        !tcp_exchange(&hosts.client, server6, 81),
        "TCP 81 blocked over IPv6"
    );
    // Egress from the server: default deny except TCP 9000 to the client.
    assert!(
        tcp_exchange(&hosts.server, client, 9000),
        "egress TCP 9000 allowed"
    );
    assert!(
        !tcp_exchange(&hosts.server, client, 9001),
        "egress TCP 9001 blocked"
    );

    let seen = drain(&mut events);
    let ingress_hook = if tc_only { Hook::TcIngress } else { Hook::Xdp };
    let blocked_81 = seen
        .iter()
        .find(|e| e.destination_port == 81 && e.protocol == 6 && e.source == Some(client))
        .unwrap_or_else(|| panic!("no deny event for TCP 81 in {seen:?}"));
    assert_eq!(blocked_81.verdict, Some(EventVerdict::Dropped));
    assert_eq!(blocked_81.reason, Some(DropReason::PolicyDenied));
    assert_eq!(blocked_81.direction, Some(Direction::Ingress));
    assert_eq!(blocked_81.hook, Some(ingress_hook));
    assert_eq!(blocked_81.destination, Some(server));
    assert_eq!(blocked_81.tcp_flags & 0x02, 0x02, "the SYN was blocked");
    assert_eq!(blocked_81.endpoint_id, 1);
    assert_eq!(blocked_81.peer_identity, CLIENT_IDENTITY);
    assert!(blocked_81.ifindex > 0);
    assert!(
        seen.iter()
            .any(|e| e.destination_port == 54 && e.protocol == 17),
        "deny event for UDP 54"
    );
    assert!(
        seen.iter()
            .any(|e| e.destination_port == 81 && e.source == Some(ip(CLIENT_V6))),
        "deny event for IPv6 TCP 81"
    );
    let egress = seen
        .iter()
        .find(|e| e.destination_port == 9001)
        .unwrap_or_else(|| panic!("no deny event for egress TCP 9001 in {seen:?}"));
    assert_eq!(egress.direction, Some(Direction::Egress));
    assert_eq!(egress.hook, Some(Hook::TcEgress));
    assert_eq!(egress.source, Some(server));
    // No allowed exchange produced a deny event.
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e.destination_port, 80 | 53 | 9000)),
        "allowed flows were denied somewhere: {seen:?}"
    );
}

#[test]
fn xdp_and_tc_egress_enforce_default_deny_on_real_sockets() {
    if microseg_tests::kernel_available("xdp_and_tc_egress_enforce_default_deny_on_real_sockets") {
        enforce_between_namespaces(false);
    }
}

#[test]
fn tc_ingress_and_egress_enforce_default_deny_on_real_sockets() {
    if microseg_tests::kernel_available(
        "tc_ingress_and_egress_enforce_default_deny_on_real_sockets",
    ) {
        enforce_between_namespaces(true);
    }
}
