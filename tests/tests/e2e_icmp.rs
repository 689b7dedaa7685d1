//! ICMP through real network stacks: the programs on the server's interface (XDP
//! for what arrives, TC egress for what leaves), raw ICMP sockets in two network
//! namespaces. After an allowed echo exchange, the server's own ICMP to the client
//! is judged by policy (denied here), and the echo reply and a timestamp query's
//! reply still come back, IPv4 and IPv6.

use std::time::Duration;

use microseg::datapath::{Datapath, LoadOptions, events::drain};
use microseg_common::{event::EventVerdict, policy::Direction};
use microseg_tests::{
    harness::{StateBuilder, ip},
    raw::IcmpSocket,
    topology::{CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, TwoHosts},
};

const CLIENT_IDENTITY: u32 = 300;
/// How long a message is waited for before it is called dropped.
const WAIT: Duration = Duration::from_millis(500);

#[test]
fn after_an_allowed_echo_exchange_other_icmp_is_judged_by_policy() {
    if !microseg_tests::kernel_available(
        "after_an_allowed_echo_exchange_other_icmp_is_judged_by_policy",
    ) {
        return;
    }
    let hosts = TwoHosts::new();
    // The server accepts any ICMP from the client and may send nothing on its own.
    let policy = StateBuilder::default()
        .endpoint(SERVER_V4, 1, true, true, false)
        .endpoint(SERVER_V6, 1, true, true, false)
        .host(CLIENT_V4, CLIENT_IDENTITY)
        .host(CLIENT_V6, CLIENT_IDENTITY)
        .allow(1, CLIENT_IDENTITY, Direction::Ingress, Some(1), None, 1)
        .allow(1, CLIENT_IDENTITY, Direction::Ingress, Some(58), None, 2);
    let mut datapath = Datapath::load(&LoadOptions::default()).expect("load");
    let mut events = datapath.take_events().expect("events");
    datapath
        .apply(&Default::default(), &policy.build())
        .expect("apply");
    hosts.attach(&mut datapath, false);

    // (server, client, echo request, echo reply, a query the server sends)
    for (server, client, echo, echo_reply, servers_query) in [
        (SERVER_V4, CLIENT_V4, 8, 0, 13),
        (SERVER_V6, CLIENT_V6, 128, 129, 139),
    ] {
        let ipv6 = server.contains(':');
        let at_client = IcmpSocket::open(&hosts.client, ipv6);
        let at_server = IcmpSocket::open(&hosts.server, ipv6);
        drain(&mut events);

        // The client pings the server (identifier 0, as a raw-socket ping may use):
        // allowed, and the reply comes back.
        at_client
            .send(ip(server), echo, 0)
            .expect("sending the echo request");
        let seen = at_client.received(WAIT);
        assert!(
            seen.contains(&(ip(server), echo_reply, 0)),
            "the echo reply reaches the client: {seen:?}"
        );

        // The server then sends a query of its own to the client: its egress is
        // default deny, and the echo exchange does not open the way back.
        // (TC egress dropping it may surface as ENOBUFS from the send: ignored, the
        // client's side is what counts.)
        let _ = at_server.send(ip(client), servers_query, 0);
        let seen = at_client.received(WAIT);
        assert!(
            !seen
                .iter()
                .any(|(from, icmp_type, _)| *from == ip(server) && *icmp_type == servers_query),
            "type {servers_query} from the server reached the client: {seen:?}"
        );
        let denied = drain(&mut events);
        assert!(
            denied
                .iter()
                .any(|e| e.verdict == Some(EventVerdict::Dropped)
                    && e.direction == Some(Direction::Egress)
                    && e.source == Some(ip(server))
                    && e.source_port == u16::from(servers_query)),
            "a deny event for the server's type {servers_query}: {denied:?}"
        );
    }

    // A timestamp query from the client is allowed, and its reply (which the
    // server's kernel sends) passes as that query's reply.
    let at_client = IcmpSocket::open(&hosts.client, false);
    at_client
        .send(ip(SERVER_V4), 13, 0x5151)
        .expect("sending the timestamp request");
    let seen = at_client.received(WAIT);
    assert!(
        seen.contains(&(ip(SERVER_V4), 14, 0x5151)),
        "the timestamp reply reaches the client: {seen:?}"
    );
}
