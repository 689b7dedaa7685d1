//! The real eBPF programs as a policy evaluator, so that compiled policy can be checked
//! flow by flow against the reference evaluator (`microseg::policy::evaluate`).
//!
//! One loaded [`Datapath`] is reused for every policy state: each state is applied as
//! a diff from the previous one (the production update path, generation switch
//! included), and each flow is judged by BPF_PROG_TEST_RUN on a probe packet.
//!
//! Conntrack would let a repeated 5-tuple skip policy, so every probe gets a source
//! port of its own from the ephemeral range: no probe repeats an earlier probe of the
//! same generation, and none can be taken for the reply of an earlier one (that would
//! need an earlier probe *to* an ephemeral port, which [`KernelJudge`] refuses).

use microseg::datapath::{
    AttachPoint, Datapath, DatapathState, LoadOptions, ProgramVerdict, XdpAttachMode, probe::Probe,
};
use microseg::policy::{Flow, Protocol};

/// The three programs; the hook must not change a verdict.
pub const PROGRAMS: [AttachPoint; 3] = [
    AttachPoint::Xdp(XdpAttachMode::Default),
    AttachPoint::TcIngress,
    AttachPoint::TcEgress,
];

/// Probe source ports: 32768..=65535, reused round robin. Destination ports must stay
/// below, so a probe is never the reply direction of another probe's flow.
const FIRST_SOURCE_PORT: u16 = 32768;

/// A loaded data path that judges [`Flow`]s under the last applied state.
pub struct KernelJudge {
    datapath: Datapath,
    state: DatapathState,
    first_source_port: u16,
    next_source_port: u16,
    probes: u64,
    applies: u64,
}

impl KernelJudge {
    /// Loads the programs (no pinning: the maps are private to this process).
    pub fn load() -> Self {
        Self::load_with_source_ports_from(FIRST_SOURCE_PORT)
    }

    /// Loads the programs with probe source ports `first..=65535`: flows' destination
    /// ports must stay below `first`.
    pub fn load_with_source_ports_from(first: u16) -> Self {
        let datapath = Datapath::load(&LoadOptions::default()).expect("loading the programs");
        Self {
            datapath,
            state: DatapathState::default(),
            first_source_port: first,
            next_source_port: first,
            probes: 0,
            applies: 0,
        }
    }

    /// Makes `state` the live generation: only the diff from the current state is
    /// written, as the agent does.
    pub fn apply(&mut self, state: &DatapathState) {
        self.datapath
            .apply(&self.state, state)
            .unwrap_or_else(|error| panic!("applying a compiled state: {error}"));
        self.state = state.clone();
        self.applies += 1;
    }

    /// The verdict of the program at `point` on a fresh probe of `flow` (TCP SYN, UDP
    /// or SCTP to the flow's port).
    pub fn verdict(&mut self, point: AttachPoint, flow: &Flow) -> ProgramVerdict {
        assert!(
            flow.port < self.first_source_port,
            "{flow}: destination ports from {} up are the probes' source ports",
            self.first_source_port
        );
        let source_port = self.next_source_port;
        self.next_source_port = self
            .next_source_port
            .checked_add(1)
            .unwrap_or(self.first_source_port);
        self.probes += 1;
        let probe = match flow.protocol {
            Protocol::Tcp => Probe::tcp(flow.src, source_port, flow.dst, flow.port),
            Protocol::Udp => Probe::udp(flow.src, source_port, flow.dst, flow.port),
            Protocol::Sctp => Probe::sctp(flow.src, source_port, flow.dst, flow.port),
        };
        self.datapath
            .test_run(point, &probe.to_frame())
            .unwrap_or_else(|error| panic!("{flow}: test run on {}: {error}", point.name()))
    }

    /// Whether the program at `point` lets `flow` through. Any return code other than
    /// pass or drop is a failure of the program, not a verdict.
    pub fn allowed(&mut self, point: AttachPoint, flow: &Flow) -> bool {
        match self.verdict(point, flow) {
            ProgramVerdict::Pass => true,
            ProgramVerdict::Drop => false,
            ProgramVerdict::Other(code) => {
                panic!(
                    "{flow}: {} returned {code}, neither pass nor drop",
                    point.name()
                )
            }
        }
    }

    /// The verdict of each of the three programs (each on its own probe, so that none
    /// is answered by the conntrack entry another one left).
    pub fn allowed_by_each_program(&mut self, flow: &Flow) -> [bool; 3] {
        PROGRAMS.map(|point| self.allowed(point, flow))
    }

    /// A connection of `flow`: its opening packet (TCP SYN, or the first UDP or SCTP
    /// packet) through the program at `forward`, the reply through the program at
    /// `reply`, then a later packet of the opener (TCP: an ACK) through `forward`
    /// again. Returns whether each passed, and the source port the connection used.
    pub fn connection(
        &mut self,
        forward: AttachPoint,
        reply: AttachPoint,
        flow: &Flow,
    ) -> ([bool; 3], u16) {
        assert!(flow.port < self.first_source_port);
        let source_port = self.next_source_port;
        self.next_source_port = self
            .next_source_port
            .checked_add(1)
            .unwrap_or(self.first_source_port);
        let opening = match flow.protocol {
            Protocol::Tcp => Probe::tcp(flow.src, source_port, flow.dst, flow.port),
            Protocol::Udp => Probe::udp(flow.src, source_port, flow.dst, flow.port),
            Protocol::Sctp => Probe::sctp(flow.src, source_port, flow.dst, flow.port),
        };
        let answer = opening.reply();
        let later = opening.established();
        let mut passed = [false; 3];
        for (index, (point, probe)) in [(forward, opening), (reply, answer), (forward, later)]
            .into_iter()
            .enumerate()
        {
            self.probes += 1;
            passed[index] = match self.datapath.test_run(point, &probe.to_frame()) {
                Ok(ProgramVerdict::Pass) => true,
                Ok(ProgramVerdict::Drop) => false,
                other => panic!("{flow}: {} on {probe:?}: {other:?}", point.name()),
            };
        }
        (passed, source_port)
    }

    /// Probe packets run so far.
    pub fn probes(&self) -> u64 {
        self.probes
    }

    /// States applied so far.
    pub fn applies(&self) -> u64 {
        self.applies
    }
}
