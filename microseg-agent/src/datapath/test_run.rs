//! Packet in, verdict out: runs the real programs on a packet with BPF_PROG_TEST_RUN.
//! Used by the kernel tests, `microseg check --datapath` and the benchmark.

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use microseg_common::maps;

use super::{AttachPoint, Datapath, DatapathError};

/// A program's verdict on a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramVerdict {
    Pass,
    Drop,
    /// Any other return code (XDP_ABORTED, TX, ...): never expected from microseg.
    Other(u32),
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;

impl Datapath {
    /// Runs `packet` (an Ethernet frame) through the program for `point`.
    pub fn test_run(
        &self,
        point: AttachPoint,
        packet: &[u8],
    ) -> Result<ProgramVerdict, DatapathError> {
        Ok(self.test_run_repeat(point, packet, 1)?.0)
    }

    /// Runs `packet` `repeat` times in the kernel; returns the verdict and the mean
    /// time per run in nanoseconds as the kernel measured it.
    pub fn test_run_repeat(
        &self,
        point: AttachPoint,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(ProgramVerdict, f64), DatapathError> {
        let mut options = TestRunOptions::new();
        options.data_in = Some(packet);
        options.repeat = repeat.max(1);
        let run_err = |name: &str| {
            let name = name.to_owned();
            move |e| DatapathError::TestRun {
                program: name.clone(),
                source: Box::new(e),
            }
        };
        let (result, is_xdp) = match point {
            AttachPoint::Xdp(_) => {
                let program: &Xdp = self.program(maps::PROG_XDP)?;
                (
                    program.test_run(options).map_err(run_err(maps::PROG_XDP))?,
                    true,
                )
            }
            AttachPoint::TcIngress | AttachPoint::TcEgress => {
                let name = if point == AttachPoint::TcIngress {
                    maps::PROG_TC_INGRESS
                } else {
                    maps::PROG_TC_EGRESS
                };
                let program: &SchedClassifier = self.program(name)?;
                (program.test_run(options).map_err(run_err(name))?, false)
            }
        };
        let verdict = match (is_xdp, result.return_value) {
            (true, XDP_PASS) | (false, TC_ACT_UNSPEC) => ProgramVerdict::Pass,
            (true, XDP_DROP) | (false, TC_ACT_SHOT) => ProgramVerdict::Drop,
            (_, other) => ProgramVerdict::Other(other),
        };
        Ok((verdict, result.duration.as_nanos() as f64))
    }
}
