//! `cargo xtask demo`: a host firewall from the seed guide, enforced by microseg's
//! programs between two network namespaces. A client probes the server's ports with
//! real connections; the demo prints what passed and what was blocked next to what
//! the policy says, then the deny events the kernel reported.

use std::net::IpAddr;

use microseg::datapath::{Datapath, LoadOptions, events::drain};
use microseg_common::policy::Direction;
use microseg_tests::{
    harness::{StateBuilder, ip},
    topology::{
        CLIENT_V4, EchoServers, SERVER_V4, SERVER_V6, TwoHosts, tcp_exchange, udp_exchange,
    },
};

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        microseg_tests::kernel_available("microseg-demo"),
        "the demo needs root (BPF and network namespaces)"
    );
    println!("microseg demo: a database host's firewall, enforced in the kernel\n");
    println!("  client {CLIENT_V4}  --veth--  db-server {SERVER_V4} / {SERVER_V6}");
    println!("  policy on db-server: ingress default deny; allow from the client");
    println!("    TCP 22 (SSH), TCP 5432 (PostgreSQL), UDP 53 (DNS)\n");

    let hosts = TwoHosts::new();
    let _servers = EchoServers::start(&hosts.server, &[22, 80, 5432, 6379, 53, 123]);
    let mut datapath = Datapath::load(&LoadOptions::default())?;
    let mut events = datapath.take_events()?;
    let client_identity = 300;
    let mut policy = StateBuilder::default()
        .endpoint(SERVER_V4, 1, true, false, false)
        .endpoint(SERVER_V6, 1, true, false, false)
        .host(CLIENT_V4, client_identity)
        .host(microseg_tests::topology::CLIENT_V6, client_identity);
    for (protocol, port) in [(6u8, 22u16), (6, 5432), (17, 53)] {
        policy = policy.allow(
            1,
            client_identity,
            Direction::Ingress,
            Some(protocol),
            Some((port, port)),
            port as u32,
        );
    }
    datapath.apply(&Default::default(), &policy.build())?;
    hosts.attach(&mut datapath, false);
    drain(&mut events);

    let probes: [(&str, u16, bool, IpAddr); 8] = [
        ("tcp", 22, true, ip(SERVER_V4)),
        ("tcp", 5432, true, ip(SERVER_V4)),
        ("udp", 53, true, ip(SERVER_V4)),
        ("tcp", 80, false, ip(SERVER_V4)),
        ("tcp", 6379, false, ip(SERVER_V4)),
        ("udp", 123, false, ip(SERVER_V4)),
        ("tcp", 5432, true, ip(SERVER_V6)),
        ("tcp", 6379, false, ip(SERVER_V6)),
    ];
    println!(
        "{:<28} {:<10} {:<10} {}",
        "PROBE", "EXPECTED", "OBSERVED", ""
    );
    let mut mismatches = 0;
    for (protocol, port, expected, addr) in probes {
        let observed = if protocol == "tcp" {
            tcp_exchange(&hosts.client, addr, port)
        } else {
            udp_exchange(&hosts.client, addr, port)
        };
        let word = |allowed: bool| if allowed { "allow" } else { "deny" };
        let mark = if observed == expected {
            "ok"
        } else {
            "MISMATCH"
        };
        mismatches += usize::from(observed != expected);
        let target = match addr {
            IpAddr::V4(_) => format!("{addr}:{port}"),
            IpAddr::V6(_) => format!("[{addr}]:{port}"),
        };
        println!(
            "{:<28} {:<10} {:<10} {mark}",
            format!("{protocol} -> {target}"),
            word(expected),
            word(observed)
        );
    }

    println!("\ndeny events from the kernel ring buffer:");
    for event in drain(&mut events) {
        let (Some(src), Some(dst)) = (event.source, event.destination) else {
            continue;
        };
        let protocol = match event.protocol {
            6 => "TCP",
            17 => "UDP",
            _ => "IP",
        };
        println!(
            "  {src}:{} -> {dst}:{} {protocol} {} {} {}",
            event.source_port,
            event.destination_port,
            event.direction.map_or("-", |d| d.name()),
            event.verdict.map_or("-", |v| v.name()),
            event.reason.map_or("-", |r| r.name()),
        );
    }
    anyhow::ensure!(
        mismatches == 0,
        "{mismatches} probes did not match the policy"
    );
    println!("\nall probes matched the policy; namespaces removed.");
    Ok(())
}
