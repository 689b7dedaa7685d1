//! The policy the benchmark enforces at each scale, built the way an operator would
//! write it and compiled by microseg's own compiler:
//! - one server workload (`role=server`) at `SERVER_V4` / `SERVER_V6`;
//! - N client workloads (`role=client`, `app=c<i>`), one address each;
//! - one NetworkPolicy selecting the server: ingress from `role=client` on UDP 5001.
//!
//! Every client has its own labels, so the compiler gives each address its own
//! identity: N entries in PEER_HOSTS and N policy entries (server endpoint, client
//! identity, ingress, UDP, 5001). That is the shape of "N rules over N workload
//! addresses"; a packet from a client to port 5001 is allowed, to any other port it is
//! denied after the full lookup path (identity hit, two policy misses). Addresses
//! outside the inventory (`stranger`) resolve to `world` and are denied as well.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::ensure;
use microseg::{
    datapath::DatapathState,
    policy::{Compiled, Labels, PolicySet, PolicySetBuilder, Source, Workload, compile},
};

pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
/// First client address; clients are consecutive from here (10.64.0.0/12 holds 1M).
const CLIENTS_V4: u32 = u32::from_be_bytes([10, 64, 0, 0]);
const CLIENTS_V6: u128 = 0xfd00_0064_0000_0000_0000_0000_0000_0000;
/// First address outside the inventory used as a denied source (10.128.0.0/12).
const STRANGERS_V4: u32 = u32::from_be_bytes([10, 128, 0, 0]);
const STRANGERS_V6: u128 = 0xfd00_0128_0000_0000_0000_0000_0000_0000;

pub const ALLOWED_PORT: u16 = 5001;
pub const DENIED_PORT: u16 = 5002;
pub const NAMESPACE: &str = "bench";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    pub fn server(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(SERVER_V4),
            Family::V6 => IpAddr::V6(SERVER_V6),
        }
    }

    /// The `index`-th client address.
    pub fn client(self, index: u32) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(CLIENTS_V4 + index)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(CLIENTS_V6 + u128::from(index))),
        }
    }

    /// The `index`-th address outside the inventory.
    pub fn stranger(self, index: u32) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(STRANGERS_V4 + index)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(STRANGERS_V6 + u128::from(index))),
        }
    }
}

/// First and last client (or stranger) IPv4 address of a scale, as integers.
pub fn v4_client_range(rules: u32) -> (u32, u32) {
    (CLIENTS_V4, CLIENTS_V4 + rules.max(1) - 1)
}

pub fn v4_stranger_range(rules: u32) -> (u32, u32) {
    (STRANGERS_V4, STRANGERS_V4 + rules.max(1) - 1)
}

/// A compiled allow-list at one scale.
pub struct Scenario {
    pub state: DatapathState,
    /// What the agent keeps beside the state while it enforces it: the policy set
    /// and the compiler's tables (`state` moved out of them). Held so that the
    /// memory figure counts them.
    #[expect(dead_code, reason = "held only to be counted in the memory figure")]
    pub set: PolicySet,
    #[expect(dead_code, reason = "held only to be counted in the memory figure")]
    pub tables: Compiled,
    /// Building the inventory and policy objects and validating them.
    pub build_ms: f64,
    /// `microseg::policy::compile`.
    pub compile_ms: f64,
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(key, value)| (*key, value.as_str()))
        .collect()
}

pub fn workload(name: String, labels: Labels, address: IpAddr) -> Workload {
    Workload {
        namespace: NAMESPACE.to_owned(),
        name,
        labels,
        addresses: vec![address],
        ports: Vec::new(),
        interface: None,
        node: None,
        source: Source::memory("microseg-bench"),
    }
}

/// The NetworkPolicy: the server accepts UDP `ALLOWED_PORT` from every client.
pub fn server_policy() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": "clients-to-server", "namespace": NAMESPACE },
        "spec": {
            "podSelector": { "matchLabels": { "role": "server" } },
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{ "podSelector": { "matchLabels": { "role": "client" } } }],
                "ports": [{ "protocol": "UDP", "port": ALLOWED_PORT }]
            }]
        }
    })
}

impl Scenario {
    pub fn build(family: Family, rules: u32) -> anyhow::Result<Self> {
        let start = Instant::now();
        let mut builder = PolicySetBuilder::new();
        builder.add_workload(workload(
            "server".to_owned(),
            labels(&[("role", "server".to_owned())]),
            family.server(),
        ));
        for index in 0..rules {
            builder.add_workload(workload(
                format!("c{index}"),
                labels(&[("role", "client".to_owned()), ("app", format!("c{index}"))]),
                family.client(index),
            ));
        }
        builder.add_document(&Source::memory("microseg-bench"), &server_policy());
        let set = builder
            .finish()
            .map_err(|errors| anyhow::anyhow!("the benchmark's policy is invalid: {errors:?}"))?;
        let build_ms = start.elapsed().as_secs_f64() * 1e3;
        let start = Instant::now();
        let mut compiled = compile(&set);
        let compile_ms = start.elapsed().as_secs_f64() * 1e3;
        let state = std::mem::take(&mut compiled.state);
        let counts = state.counts();
        ensure!(
            counts.policy == rules as usize
                && counts.peer_hosts == rules as usize + 1
                && counts.endpoints == 1,
            "the compiler produced {counts:?} for {rules} clients; expected {rules} policy \
             entries, {} peer hosts and 1 endpoint",
            rules + 1
        );
        Ok(Self {
            state,
            set,
            tables: compiled,
            build_ms,
            compile_ms,
        })
    }
}

/// Capacities for a state of `rules` entries: both generation slots, plus slack.
pub fn capacities(rules: u32) -> microseg::datapath::Capacities {
    let defaults = microseg::datapath::Capacities::default();
    let two_slots = rules.saturating_mul(2).saturating_add(64);
    microseg::datapath::Capacities {
        peer_hosts: two_slots.max(defaults.peer_hosts),
        policy: two_slots.max(defaults.policy),
        ..defaults
    }
}

/// A short name for an address family and scale, for progress lines.
pub fn label(family: Family, rules: u32) -> String {
    format!("{} {}", family.name(), human(u64::from(rules)))
}

/// 100, 10k, 1M.
pub fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

pub fn context_for(family: Family, rules: u32) -> String {
    format!("the {} scenario", label(family, rules))
}
