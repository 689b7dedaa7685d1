//! A loaded data path with a hand-built policy state, for verdict tables: each probe
//! runs through all three programs (XDP, TC ingress, TC egress), which must agree.

use std::net::IpAddr;

use microseg::datapath::{
    AttachPoint, Capacities, Datapath, DatapathError, DatapathState, LoadOptions, PolicyMatch,
    ProgramVerdict, XdpAttachMode,
    events::{DecodedEvent, drain},
    probe::Probe,
};
use microseg_common::{
    endpoint::{
        ENDPOINT_FLAG_AUDIT, ENDPOINT_FLAG_EGRESS_ENFORCED, ENDPOINT_FLAG_INGRESS_ENFORCED,
        EndpointInfo,
    },
    interface::InterfaceBinding,
    policy::{Direction, PolicyEntry, port_range_blocks},
};

pub const ALL_PROGRAMS: [AttachPoint; 3] = [
    AttachPoint::Xdp(XdpAttachMode::Default),
    AttachPoint::TcIngress,
    AttachPoint::TcEgress,
];

pub struct Harness {
    pub datapath: Datapath,
    pub state: DatapathState,
    events: aya::maps::RingBuf<aya::maps::MapData>,
}

impl Harness {
    pub fn new() -> Self {
        Self::with_capacities(Capacities::default())
    }

    pub fn with_capacities(capacities: Capacities) -> Self {
        let mut datapath = Datapath::load(&LoadOptions {
            pin_dir: None,
            capacities,
        })
        .expect("loading the programs");
        let events = datapath.take_events().expect("event ring buffer");
        Self {
            datapath,
            state: DatapathState::default(),
            events,
        }
    }

    /// Applies `state` as the next generation.
    pub fn apply(&mut self, state: DatapathState) -> Result<(), DatapathError> {
        self.datapath.apply(&self.state, &state)?;
        self.state = state;
        Ok(())
    }

    /// The verdict of every program on a frame; panics if they disagree.
    pub fn verdict_of_frame(&self, frame: &[u8]) -> ProgramVerdict {
        let verdicts: Vec<ProgramVerdict> = ALL_PROGRAMS
            .iter()
            .map(|p| self.datapath.test_run(*p, frame).expect("test run"))
            .collect();
        assert!(
            verdicts.iter().all(|v| *v == verdicts[0]),
            "programs disagree: {verdicts:?}"
        );
        verdicts[0]
    }

    /// The XDP program's verdict alone (for frames the kernel's skb test run refuses).
    pub fn xdp_verdict_of_frame(&self, frame: &[u8]) -> ProgramVerdict {
        self.datapath
            .test_run(ALL_PROGRAMS[0], frame)
            .expect("test run")
    }

    /// The verdict of one program (hooks differ where the packet's side matters:
    /// source validation runs on what an interface receives).
    pub fn verdict_at(&self, point: AttachPoint, probe: &Probe) -> ProgramVerdict {
        self.datapath
            .test_run(point, &probe.to_frame())
            .expect("test run")
    }

    pub fn verdict(&self, probe: &Probe) -> ProgramVerdict {
        self.verdict_of_frame(&probe.to_frame())
    }

    pub fn events(&mut self) -> Vec<DecodedEvent> {
        drain(&mut self.events)
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

/// Builder of hand-written data path states.
#[derive(Default)]
pub struct StateBuilder {
    pub state: DatapathState,
}

impl StateBuilder {
    pub fn endpoint(
        mut self,
        addr: &str,
        id: u32,
        ingress: bool,
        egress: bool,
        audit: bool,
    ) -> Self {
        let mut flags = 0;
        if ingress {
            flags |= ENDPOINT_FLAG_INGRESS_ENFORCED;
        }
        if egress {
            flags |= ENDPOINT_FLAG_EGRESS_ENFORCED;
        }
        if audit {
            flags |= ENDPOINT_FLAG_AUDIT;
        }
        self.state
            .endpoints
            .insert(ip(addr), EndpointInfo::new(id, flags));
        self
    }

    pub fn host(mut self, addr: &str, identity: u32) -> Self {
        self.state.peer_hosts.insert(ip(addr), identity);
        self
    }

    pub fn prefix(mut self, cidr: &str, identity: u32) -> Self {
        self.state
            .peer_prefixes
            .insert(cidr.parse().expect("cidr"), identity);
        self
    }

    /// Allows (endpoint, identity, direction, protocol, ports first..=last).
    pub fn allow(
        mut self,
        endpoint_id: u32,
        identity: u32,
        direction: Direction,
        protocol: Option<u8>,
        ports: Option<(u16, u16)>,
        rule_id: u32,
    ) -> Self {
        let mut blocks = Vec::new();
        match ports {
            Some((first, last)) => port_range_blocks(first, last, |p, bits| {
                blocks.push(Some((p, bits)));
            }),
            None => blocks.push(None),
        }
        for port_block in blocks {
            self.state.policy.insert(
                PolicyMatch {
                    endpoint_id,
                    identity,
                    direction,
                    protocol,
                    port_block,
                },
                PolicyEntry::allow(rule_id),
            );
        }
        self
    }

    /// Binds interface `ifindex` to a workload with these addresses: what it receives
    /// must come from one of them.
    pub fn binding(mut self, ifindex: u32, addresses: &[&str]) -> Self {
        let addresses: Vec<[u8; 16]> = addresses
            .iter()
            .map(|a| microseg::datapath::addr::to_mapped(ip(a)))
            .collect();
        self.state.interfaces.insert(
            ifindex,
            InterfaceBinding::new(&addresses).expect("at most 8 addresses"),
        );
        self
    }

    pub fn build(self) -> DatapathState {
        self.state
    }
}
