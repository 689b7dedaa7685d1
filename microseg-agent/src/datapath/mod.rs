//! The kernel data path seen from userspace: loading, attaching and pinning
//! (`loader`), typed map handles (`maps`), atomic generation updates (`apply`),
//! packet-in/verdict-out runs (`test_run`) and event decoding (`events`).

pub mod addr;
pub mod apply;
mod bpf_sys;
pub mod events;
pub mod grace;
pub mod janitor;
pub mod links;
pub mod loader;
pub mod maps;
pub mod probe;
pub mod rule_hits;
pub mod state;
pub mod test_run;

use std::path::PathBuf;

pub use apply::{ApplyReport, StateDiff};
pub use loader::{
    AttachPoint, Capacities, Datapath, LoadOptions, ProgramRole, XdpAttachMode, detach_pinned,
    pinned_links, program_object,
};
pub use state::{DatapathState, PolicyMatch, StateCounts};
pub use test_run::ProgramVerdict;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "the eBPF programs were not built into this binary (built with AYA_BUILD_SKIP=1); rebuild without it"
    )]
    NotBuilt,
    #[error("loading the eBPF programs failed: {0}")]
    Load(Box<aya::EbpfError>),
    #[error("loading program {program} failed: {source}")]
    Program {
        program: String,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("the eBPF object has no program {0}")]
    MissingProgram(String),
    #[error("the eBPF object has no map {0}")]
    MissingMap(String),
    #[error("attaching {point} to interface {interface} failed: {reason}")]
    Attach {
        interface: String,
        point: &'static str,
        reason: String,
    },
    #[error("pinning at {path} failed: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error(
        "map {map} is full: the update needs {needed} entries (old and new generation side by side) but its capacity is {capacity}; nothing was changed"
    )]
    MapFull {
        map: &'static str,
        needed: usize,
        capacity: usize,
    },
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "pinned map {map} differs from what this version needs ({detail}): it was created by another version of microseg or with other capacities; run `microseg detach` (it removes enforcement and the pinned maps) and start the agent again, which re-applies its saved state"
    )]
    IncompatiblePin { map: &'static str, detail: String },
    #[error("invalid data path state: {0}")]
    InvalidState(String),
    #[error("test run of {program} failed: {source}")]
    TestRun {
        program: String,
        source: Box<aya::programs::ProgramError>,
    },
}

impl DatapathError {
    fn program(name: &str, source: aya::programs::ProgramError) -> Self {
        Self::Program {
            program: name.to_owned(),
            source: Box::new(source),
        }
    }
}

impl Datapath {
    /// Applies `new` over `current` as the next generation (see `apply`), the old
    /// slot rewritten before it returns. If an earlier update left the standby slot
    /// behind, it is brought up first; if that fails, nothing is changed.
    pub fn apply(
        &mut self,
        current: &DatapathState,
        new: &DatapathState,
    ) -> Result<ApplyReport, DatapathError> {
        self.bring_up_standby()?;
        let mut maps = maps::DatapathMaps::new(&mut self.ebpf)?;
        let report = apply::apply_state(&mut maps, &self.grace, current, new)?;
        self.switches += 1;
        self.grace_covers = self.switches;
        self.standby_stale = report.standby_error.is_some();
        Ok(report)
    }

    /// Applies `changes` over `current` as the next generation, at the cost of the
    /// change (see `apply::apply_changes`); `current` is updated once switched.
    /// Flows allowed so far stay current unless the change takes something away
    /// (found in the entries, or `revokes`: the compiler's word for peers changing
    /// identity). Returns at the switch: the old slot's rewrite waits for
    /// [`Datapath::finish_standby`] (or the next update, which does it first). If
    /// an earlier update left the standby slot behind, it is brought up first; if
    /// that fails, nothing is changed.
    pub fn apply_changes(
        &mut self,
        current: &mut DatapathState,
        changes: &StateDiff,
        revokes: bool,
    ) -> Result<ApplyReport, DatapathError> {
        self.bring_up_standby()?;
        // Exact-port entries, counted once and then kept from the changes.
        let exact = match self.exact_entries {
            Some((policy, exact)) if policy == current.policy.len() => exact,
            _ => current.counts().policy_exact,
        };
        let mut exact_after = exact;
        let mut maps = maps::DatapathMaps::new(&mut self.ebpf)?;
        let result = apply::apply_changes(&mut maps, current, &mut exact_after, changes, revokes);
        self.exact_entries = Some((current.policy.len(), exact_after));
        let (report, rewrite) = result?;
        if let Some(rewrite) = rewrite {
            self.switches += 1;
            self.pending_rewrite = Some((self.switches, rewrite));
        }
        Ok(report)
    }

    /// Whether the last switch's rewrite of the old slot is still to be done, and
    /// if so, the grace period to wait out and the switch it must follow: a caller
    /// may wait without holding the data path, then tell it with
    /// [`Datapath::grace_passed`].
    pub fn pending_grace(&self) -> Option<(std::sync::Arc<grace::GracePeriod>, u64)> {
        self.pending_rewrite
            .as_ref()
            .filter(|(switch, _)| *switch > self.grace_covers)
            .map(|(switch, _)| (self.grace.clone(), *switch))
    }

    /// A grace period begun after switch number `switch` has passed.
    pub fn grace_passed(&mut self, switch: u64) {
        self.grace_covers = self.grace_covers.max(switch);
    }

    /// Rewrites the old slot after the last switch, once a grace period has passed
    /// (waited here unless [`Datapath::grace_passed`] said so). On failure the
    /// standby slot is known to lag: the next update repairs it first.
    pub fn finish_standby(&mut self) -> Result<(), DatapathError> {
        let Some((switch, rewrite)) = self.pending_rewrite.take() else {
            return Ok(());
        };
        if switch > self.grace_covers {
            if let Err(source) = self.grace.wait() {
                self.standby_stale = true;
                return Err(DatapathError::Kernel {
                    what: "waiting for programs still running on the old generation".into(),
                    source,
                });
            }
            self.grace_covers = self.switches;
        }
        let mut maps = maps::DatapathMaps::new(&mut self.ebpf)?;
        let written = rewrite.write(&mut maps);
        self.standby_stale = written.is_err();
        written
    }

    /// Whether an update's old slot has yet to be rewritten.
    pub fn standby_pending(&self) -> bool {
        self.pending_rewrite.is_some()
    }

    /// Before an update writes into the standby slot: the last switch's rewrite
    /// done, or, where it failed, the slot repaired from the live one.
    fn bring_up_standby(&mut self) -> Result<(), DatapathError> {
        if let Err(e) = self.finish_standby() {
            tracing::warn!("{e}; repairing the standby generation slot from the live one");
        }
        if self.standby_stale {
            self.repair_standby()?;
        }
        Ok(())
    }

    /// Makes the standby slot equal to the live one (after an update whose rewrite
    /// of the old slot failed).
    pub fn repair_standby(&mut self) -> Result<(), DatapathError> {
        if crate::fault::fails_at("standby-repair") {
            return Err(DatapathError::InvalidState(
                "repairing the standby generation slot: injected failure".into(),
            ));
        }
        // The repair writes into the old slot too: after a grace period.
        if let Some((switch, _)) = &self.pending_rewrite
            && *switch > self.grace_covers
        {
            self.grace.wait().map_err(|source| DatapathError::Kernel {
                what: "waiting for programs still running on the old generation".into(),
                source,
            })?;
            self.grace_covers = self.switches;
        }
        let mut maps = self.maps()?;
        apply::resync_standby(&mut maps)?;
        self.pending_rewrite = None;
        self.standby_stale = false;
        Ok(())
    }

    /// Zeroes the rule hit counters of `slots` (a compile's fresh hit slots), before
    /// the entries that count in them are applied.
    pub fn reset_rule_hits(&mut self, slots: &[u16]) -> Result<(), DatapathError> {
        let mut maps = self.maps()?;
        rule_hits::reset(&mut maps.rule_hits, slots)
    }

    /// Whether the standby slot is known to lag the live one.
    pub fn standby_stale(&self) -> bool {
        self.standby_stale
    }

    /// The live generation's state, read back from the maps, after repairing the
    /// standby slot.
    pub fn adopt_state(&mut self) -> Result<DatapathState, DatapathError> {
        let mut maps = self.maps()?;
        apply::resync_standby(&mut maps)
    }

    fn program<'a, T>(&'a self, name: &str) -> Result<&'a T, DatapathError>
    where
        &'a T: TryFrom<&'a aya::programs::Program>,
    {
        let program = self
            .ebpf()
            .program(name)
            .ok_or_else(|| DatapathError::MissingProgram(name.to_owned()))?;
        program
            .try_into()
            .map_err(|_| DatapathError::MissingProgram(name.to_owned()))
    }
}
