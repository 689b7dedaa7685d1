//! Loading the programs, attaching them to interfaces, pinning maps and links under
//! the pin directory, and detaching.
//!
//! Pinned layout: `<pin_dir>/maps/<MAP>` and `<pin_dir>/links/<hook>/<iface>`. A load
//! with a pin directory reuses maps already pinned there, so a restarted agent keeps
//! the enforced state; pinned links keep enforcement in place after the agent exits.

use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
};
use microseg_common::{config::Settings, maps};

use super::{
    DatapathError, bpf_sys,
    grace::GracePeriod,
    links::{self, DeviceKind, PinnedLinkState},
    maps::DatapathMaps,
};

/// The compiled programs, embedded at build time.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/microseg"));

/// The eBPF object this binary loads (empty when built with `AYA_BUILD_SKIP=1`): the
/// tests read its instructions (stack budget) and map definitions.
pub fn program_object() -> &'static [u8] {
    PROGRAMS
}

/// Capacities of the maps that grow with policy and traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub endpoints: u32,
    pub peer_hosts: u32,
    pub peer_prefixes: u32,
    pub policy: u32,
    pub conntrack: u32,
    pub fragments: u32,
}

impl Capacities {
    /// The configured capacity of map `name`, for the maps that have one.
    pub fn of(&self, name: &str) -> Option<u32> {
        Some(match name {
            maps::ENDPOINTS => self.endpoints,
            maps::PEER_HOSTS => self.peer_hosts,
            maps::PEER_PREFIXES => self.peer_prefixes,
            maps::POLICY | maps::POLICY_EXACT => self.policy,
            maps::CONNTRACK => self.conntrack,
            maps::FRAGMENTS => self.fragments,
            _ => return None,
        })
    }
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            endpoints: maps::ENDPOINTS_CAPACITY,
            peer_hosts: maps::PEER_HOSTS_CAPACITY,
            peer_prefixes: maps::PEER_PREFIXES_CAPACITY,
            policy: maps::POLICY_CAPACITY,
            conntrack: maps::CONNTRACK_CAPACITY,
            fragments: maps::FRAGMENTS_CAPACITY,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Pin maps here (and reuse those already pinned); `None` keeps everything private
    /// to this process (tests, `check --datapath`).
    pub pin_dir: Option<PathBuf>,
    pub capacities: Capacities,
}

/// Where a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttachPoint {
    /// XDP on the interface's receive path, in the given mode.
    Xdp(XdpAttachMode),
    TcIngress,
    TcEgress,
}

/// XDP attach mode (aya's `XdpMode`, named for configuration files).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XdpAttachMode {
    /// Native if the driver supports it, else generic.
    Default,
    /// Native (driver) mode only.
    Driver,
    /// Generic (skb) mode.
    Generic,
}

/// Which program an interface's hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProgramRole {
    /// The decision (`verdict::judge`): policy, conntrack, source validation.
    Judge,
    /// The held program (`hold`), for an interface whose binding could not be
    /// written: nothing beyond its link passes, and no map is read. Ethernet only.
    Hold,
}

impl AttachPoint {
    /// Short name used in link pin paths and in status output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Xdp(_) => "xdp",
            Self::TcIngress => "tc-ingress",
            Self::TcEgress => "tc-egress",
        }
    }
}

/// The loaded programs and their maps.
pub struct Datapath {
    pub(super) ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    /// Links not pinned: they detach when the `Datapath` is dropped.
    links: Vec<FdLink>,
    /// Waits out programs still running on the old generation (see `grace`).
    pub(super) grace: std::sync::Arc<GracePeriod>,
    /// The last update switched generations but could not rewrite the old slot.
    pub(super) standby_stale: bool,
    /// Generation switches made by this instance.
    pub(super) switches: u64,
    /// Every switch up to this one has had a grace period pass since.
    pub(super) grace_covers: u64,
    /// The old slot's rewrite after the last switch, with that switch's number,
    /// until it is done (see `apply::StandbyRewrite`).
    pub(super) pending_rewrite: Option<(u64, super::apply::StandbyRewrite)>,
    /// Tags of programs seen on pinned links, by program id (see `ensure_attached`).
    program_tags: std::collections::HashMap<u32, [u8; 8]>,
    /// (policy entries, exact-port entries among them) of the state last applied by
    /// `apply_changes`, so that it need not count them again.
    pub(super) exact_entries: Option<(usize, usize)>,
    /// Pinned caches this load replaced (see `check_pinned_maps`), with why.
    replaced_maps: Vec<String>,
}

impl Datapath {
    /// Loads the programs into the kernel (verifier included) and creates or reuses
    /// the maps. Nothing is attached yet.
    pub fn load(options: &LoadOptions) -> Result<Self, DatapathError> {
        if PROGRAMS.is_empty() {
            return Err(DatapathError::NotBuilt);
        }
        let caps = options.capacities;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(maps::ENDPOINTS, caps.endpoints)
            .map_max_entries(maps::PEER_HOSTS, caps.peer_hosts)
            .map_max_entries(maps::PEER_PREFIXES, caps.peer_prefixes)
            .map_max_entries(maps::POLICY, caps.policy)
            .map_max_entries(maps::POLICY_EXACT, caps.policy)
            .map_max_entries(maps::CONNTRACK, caps.conntrack)
            .map_max_entries(maps::FRAGMENTS, caps.fragments);
        let map_paths: Vec<(&'static str, PathBuf)> = match &options.pin_dir {
            Some(dir) => {
                let maps_dir = dir.join("maps");
                std::fs::create_dir_all(&maps_dir).map_err(|source| DatapathError::Pin {
                    path: maps_dir.clone(),
                    source,
                })?;
                maps::ALL.iter().map(|m| (*m, maps_dir.join(m))).collect()
            }
            None => Vec::new(),
        };
        let replaced_maps = check_pinned_maps(&map_paths, &caps)?;
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(PROGRAMS)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for name in [maps::PROG_XDP, maps::PROG_XDP_HOLD] {
            let program: &mut Xdp = program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|e| DatapathError::program(name, e))?;
        }
        for name in [
            maps::PROG_TC_INGRESS,
            maps::PROG_TC_EGRESS,
            maps::PROG_TC_INGRESS_L3,
            maps::PROG_TC_EGRESS_L3,
            maps::PROG_TC_HOLD_INGRESS,
            maps::PROG_TC_HOLD_EGRESS,
        ] {
            let program: &mut SchedClassifier = program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|e| DatapathError::program(name, e))?;
        }
        let grace = GracePeriod::new().map_err(|source| DatapathError::Kernel {
            what: "creating the map-in-map that provides grace periods".into(),
            source,
        })?;
        let mut datapath = Self {
            ebpf,
            pin_dir: options.pin_dir.clone(),
            links: Vec::new(),
            grace: std::sync::Arc::new(grace),
            standby_stale: false,
            switches: 0,
            grace_covers: 0,
            pending_rewrite: None,
            program_tags: std::collections::HashMap::new(),
            exact_entries: None,
            replaced_maps,
        };
        // A fresh SETTINGS is all zeroes (no rate limit); give it the defaults. Reused
        // pinned settings are kept.
        let mut handles = datapath.maps()?;
        if handles.settings()?.events_burst == 0 {
            handles.set_settings(&Settings::default())?;
        }
        // Revocation floors never written (a first load, or maps pinned by a version
        // without them): flows of earlier generations are not current, as they were
        // not under that version.
        let live = handles.live_generation()?;
        if live != 0 && handles.revocation_floor(0)? == 0 && handles.revocation_floor(1)? == 0 {
            handles.set_revocation_floor(0, live)?;
            handles.set_revocation_floor(1, live)?;
        }
        Ok(datapath)
    }

    /// The pinned maps this load replaced rather than reused, each with why: caches
    /// whose definition changed (see `check_pinned_maps`).
    pub fn replaced_maps(&self) -> &[String] {
        &self.replaced_maps
    }

    /// Typed handles on every map.
    pub fn maps(&mut self) -> Result<DatapathMaps<'_>, DatapathError> {
        DatapathMaps::new(&mut self.ebpf)
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The program that serves `point` on a device of `kind` in `role`; XDP and
    /// the held programs only run on Ethernet devices.
    fn program_for(
        interface: &str,
        point: AttachPoint,
        kind: DeviceKind,
        role: ProgramRole,
    ) -> Result<&'static str, DatapathError> {
        if role == ProgramRole::Hold {
            return match (point, kind) {
                (AttachPoint::Xdp(_), DeviceKind::Ethernet) => Ok(maps::PROG_XDP_HOLD),
                (AttachPoint::TcIngress, DeviceKind::Ethernet) => Ok(maps::PROG_TC_HOLD_INGRESS),
                (AttachPoint::TcEgress, DeviceKind::Ethernet) => Ok(maps::PROG_TC_HOLD_EGRESS),
                (_, DeviceKind::Ip) => Err(DatapathError::Attach {
                    interface: interface.to_owned(),
                    point: point.name(),
                    reason: format!(
                        "{interface} has no link-layer header, and only Ethernet devices can be held while their binding is not written"
                    ),
                }),
            };
        }
        Ok(match (point, kind) {
            (AttachPoint::Xdp(_), DeviceKind::Ethernet) => maps::PROG_XDP,
            (AttachPoint::Xdp(_), DeviceKind::Ip) => {
                return Err(DatapathError::Attach {
                    interface: interface.to_owned(),
                    point: point.name(),
                    reason: format!(
                        "{interface} has no link-layer header (a tun, WireGuard or IP tunnel device) and XDP needs Ethernet: attach it with tc"
                    ),
                });
            }
            (AttachPoint::TcIngress, DeviceKind::Ethernet) => maps::PROG_TC_INGRESS,
            (AttachPoint::TcEgress, DeviceKind::Ethernet) => maps::PROG_TC_EGRESS,
            (AttachPoint::TcIngress, DeviceKind::Ip) => maps::PROG_TC_INGRESS_L3,
            (AttachPoint::TcEgress, DeviceKind::Ip) => maps::PROG_TC_EGRESS_L3,
        })
    }

    /// Makes sure the program for `point` in `role` enforces on `interface`, first
    /// on its hook, and says how: a link pinned by an earlier run is adopted if it
    /// is attached to the live interface of that name and runs this very program;
    /// if it runs another version (or the other role's program), its program is
    /// replaced in place (one link update); if it is stale (the interface was
    /// deleted or recreated meanwhile), a new link replaces it. On a TC hook it must
    /// run before any other program there: one ahead of it could end the chain
    /// (TC_ACT_OK) before microseg judges, so microseg is moved first again (see
    /// [`Datapath::move_first`]). Without a pin directory the program is attached
    /// for this process's lifetime.
    pub fn ensure_attached(
        &mut self,
        interface: &str,
        point: AttachPoint,
        role: ProgramRole,
    ) -> Result<AttachOutcome, DatapathError> {
        let attach_err = |reason: String| DatapathError::Attach {
            interface: interface.to_owned(),
            point: point.name(),
            reason,
        };
        let kind = links::device_kind(interface).map_err(attach_err)?;
        let name = Self::program_for(interface, point, kind, role)?;
        let Some(dir) = self.pin_dir.clone() else {
            let link = self.attach_link(interface, point, name)?;
            self.links.push(link);
            return Ok(AttachOutcome::Attached);
        };
        let path = link_pin_path(&dir, interface, point);
        let stale = match links::pinned_link_state(&path, interface) {
            PinnedLinkState::Live { program_id } => {
                let ours = self.program_id(name)?;
                // A program's tag hashes its instructions, not the maps it uses: where
                // this load replaced a pinned map, the pinned program still uses the
                // old one and must be replaced even though its tag is the same.
                let same = program_id == ours
                    || (self.replaced_maps.is_empty()
                        && match (self.tag_of(program_id), self.tag_of(ours)) {
                            (Some(pinned), Some(loaded)) => pinned == loaded,
                            _ => false,
                        });
                // The program on the hook: the pinned one (an earlier run's load of
                // this very program), or ours once it replaced it.
                let (outcome, on_hook) = if same {
                    (AttachOutcome::Adopted, program_id)
                } else {
                    let fd = self.program_fd(name)?;
                    bpf_sys::replace_link_program(&path, fd.as_fd()).map_err(|e| {
                        attach_err(format!("replacing the pinned link's program: {e}"))
                    })?;
                    (AttachOutcome::Upgraded, ours)
                };
                let ahead = self.programs_ahead(interface, point, on_hook)?;
                if ahead.is_empty() {
                    return Ok(outcome);
                }
                self.move_first(interface, point, kind, name, &path)?;
                return Ok(AttachOutcome::MovedFirst(ahead));
            }
            PinnedLinkState::NotPinned => None,
            PinnedLinkState::Stale(reason) => Some(reason),
        };
        if stale.is_some() {
            // The old link enforces nothing on the live interface: drop it first, so
            // that XDP (one link per device) can attach.
            if let Ok(old) = PinnedLink::from_pin(&path) {
                let _ = old.unpin();
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        let link = self.attach_link(interface, point, name)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| DatapathError::Pin {
                path: parent.to_owned(),
                source,
            })?;
        }
        // A pin left over at the path (one that could not be opened) is replaced.
        let _ = std::fs::remove_file(&path);
        link.pin(&path).map_err(|e| DatapathError::Pin {
            path: path.clone(),
            source: std::io::Error::other(format!("{e:?}")),
        })?;
        Ok(match stale {
            Some(reason) => AttachOutcome::Replaced(reason),
            None => AttachOutcome::Attached,
        })
    }

    /// Attaches the program for `point` to `interface` (see `ensure_attached`).
    pub fn attach(&mut self, interface: &str, point: AttachPoint) -> Result<(), DatapathError> {
        self.ensure_attached(interface, point, ProgramRole::Judge)
            .map(|_| ())
    }

    /// The ids of the programs that run before program `ours` (an id) on `point` of
    /// `interface` (TC hooks; XDP has one program per device). Empty when it is
    /// first, an error when it is not on the hook at all.
    pub fn programs_ahead(
        &self,
        interface: &str,
        point: AttachPoint,
        ours: u32,
    ) -> Result<Vec<u32>, DatapathError> {
        let attach_type = match point {
            AttachPoint::Xdp(_) => return Ok(Vec::new()),
            AttachPoint::TcIngress => TcAttachType::Ingress,
            AttachPoint::TcEgress => TcAttachType::Egress,
        };
        let (_, programs) = SchedClassifier::query_tcx(interface, attach_type).map_err(|e| {
            DatapathError::Attach {
                interface: interface.to_owned(),
                point: point.name(),
                reason: format!("listing the hook's programs: {e}"),
            }
        })?;
        let ids: Vec<u32> = programs.iter().map(|program| program.id()).collect();
        match ids.iter().position(|id| *id == ours) {
            Some(position) => Ok(ids[..position].to_vec()),
            None => Err(DatapathError::Attach {
                interface: interface.to_owned(),
                point: point.name(),
                reason: format!(
                    "the kernel lists programs {ids:?} on the hook, and not microseg's ({ours})"
                ),
            }),
        }
    }

    /// Puts program `name` first on TC `point` of `interface` again, replacing the
    /// pinned link at `path`. A program is on a hook at most once, so the link is
    /// detached and attached anew; meanwhile the held program runs first (on
    /// Ethernet devices), so the switch drops rather than passes what it cannot
    /// judge. A device without a link layer has no held program: it is unguarded
    /// for the few microseconds between the two calls.
    fn move_first(
        &mut self,
        interface: &str,
        point: AttachPoint,
        kind: DeviceKind,
        name: &'static str,
        path: &Path,
    ) -> Result<(), DatapathError> {
        let guard = match Self::program_for(interface, point, kind, ProgramRole::Hold) {
            Ok(hold) if hold != name => Some(self.attach_link(interface, point, hold)?),
            _ => None,
        };
        if let Ok(old) = PinnedLink::from_pin(path) {
            // Unpinning hands back the link; dropping it detaches.
            let _ = old.unpin();
        }
        let _ = std::fs::remove_file(path);
        let link = self.attach_link(interface, point, name)?;
        link.pin(path).map_err(|e| DatapathError::Pin {
            path: path.to_owned(),
            source: std::io::Error::other(format!("{e:?}")),
        })?;
        drop(guard);
        Ok(())
    }

    /// Whether `point` on `interface` is enforced by a live pinned link (always
    /// `NotPinned` without a pin directory).
    pub fn link_state(&self, interface: &str, point: AttachPoint) -> PinnedLinkState {
        match &self.pin_dir {
            Some(dir) => links::pinned_link_state(&link_pin_path(dir, interface, point), interface),
            None => PinnedLinkState::NotPinned,
        }
    }

    /// A loaded program's tag, remembered: interfaces are checked every second.
    fn tag_of(&mut self, program_id: u32) -> Option<[u8; 8]> {
        if let Some(tag) = self.program_tags.get(&program_id) {
            return Some(*tag);
        }
        let tag = bpf_sys::program_tag(program_id).ok()?;
        self.program_tags.insert(program_id, tag);
        Some(tag)
    }

    fn program_id(&self, name: &str) -> Result<u32, DatapathError> {
        let program = self
            .ebpf
            .program(name)
            .ok_or_else(|| DatapathError::MissingProgram(name.to_owned()))?;
        program
            .info()
            .map(|info| info.id())
            .map_err(|e| DatapathError::program(name, e))
    }

    fn program_fd(&self, name: &str) -> Result<&aya::programs::ProgramFd, DatapathError> {
        let program = self
            .ebpf
            .program(name)
            .ok_or_else(|| DatapathError::MissingProgram(name.to_owned()))?;
        program.fd().map_err(|e| DatapathError::program(name, e))
    }

    /// A new link of program `name` at `point` on `interface`.
    fn attach_link(
        &mut self,
        interface: &str,
        point: AttachPoint,
        name: &str,
    ) -> Result<FdLink, DatapathError> {
        let attach_err = |source: &dyn std::fmt::Display| DatapathError::Attach {
            interface: interface.to_owned(),
            point: point.name(),
            reason: source.to_string(),
        };
        match point {
            AttachPoint::Xdp(mode) => {
                let mode = match mode {
                    XdpAttachMode::Default => XdpMode::Default,
                    XdpAttachMode::Driver => XdpMode::Driver,
                    XdpAttachMode::Generic => XdpMode::Skb,
                };
                let program: &mut Xdp = program_mut(&mut self.ebpf, name)?;
                let id = program
                    .attach(interface, mode)
                    .map_err(|e| attach_err(&e))?;
                let link = program.take_link(id).map_err(|e| attach_err(&e))?;
                FdLink::try_from(link).map_err(|e| attach_err(&e))
            }
            AttachPoint::TcIngress | AttachPoint::TcEgress => {
                let attach_type = if point == AttachPoint::TcIngress {
                    TcAttachType::Ingress
                } else {
                    TcAttachType::Egress
                };
                let program: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?;
                // TCX (kernel 6.6+) needs no qdisc, and its links can be pinned and
                // checked; without it there is no link to pin.
                let has_tcx = aya::util::KernelVersion::current()
                    .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
                if !has_tcx {
                    return Err(attach_err(
                        &"TC enforcement needs TCX links (Linux 6.6 or later)",
                    ));
                }
                // First on the hook (BPF_F_BEFORE with no anchor): a program ahead of
                // microseg that returns TC_ACT_OK would end the chain unjudged.
                // Allowed packets return TCX_NEXT, so programs after it still run.
                let id = program
                    .attach_with_options(
                        interface,
                        attach_type,
                        TcAttachOptions::TcxOrder(LinkOrder::first()),
                    )
                    .map_err(|e| attach_err(&e))?;
                let link = program.take_link(id).map_err(|e| attach_err(&e))?;
                FdLink::try_from(link).map_err(|e| attach_err(&e))
            }
        }
    }
}

/// How `Datapath::ensure_attached` made sure a program enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachOutcome {
    /// A new link (nothing was pinned).
    Attached,
    /// The pinned link of an earlier run, live and running this program.
    Adopted,
    /// The pinned link was live but ran another version: its program was replaced.
    Upgraded,
    /// The pinned link was stale (why); a new link replaced it.
    Replaced(String),
    /// Other programs (these ids) had been put ahead of microseg's on the TC hook:
    /// it was attached first again.
    MovedFirst(Vec<u32>),
}

/// Pinned maps that only cache what the programs learn from traffic: connection
/// tracking (losing it re-judges each flow by policy at its next packet) and the
/// event budget. A pin of one whose definition differs from what this load wants
/// (a changed `conntrack.maxEntries`, an older version's layout) is replaced by a
/// fresh map instead of refused.
const REPLACEABLE_MAPS: [&str; 2] = [maps::CONNTRACK, maps::EVENT_RATE];

/// Checks every pinned map against this version's definition of it: type, key and
/// value sizes, and capacity (the object's, or the configured one for maps that
/// grow). A cache that differs is unpinned, so the load creates it anew (returned,
/// each with why, for the log); any other difference is refused: reusing the map
/// would fail in the verifier with an obscure error, or worse, be read with the
/// wrong layout. The error names the map and both definitions, and the way out.
fn check_pinned_maps(
    map_paths: &[(&'static str, PathBuf)],
    capacities: &Capacities,
) -> Result<Vec<String>, DatapathError> {
    let mut replaced = Vec::new();
    if !map_paths.iter().any(|(_, path)| path.exists()) {
        return Ok(replaced);
    }
    let object = aya_obj::Object::parse(PROGRAMS).map_err(|e| {
        DatapathError::InvalidState(format!("parsing the embedded eBPF object: {e}"))
    })?;
    for (name, path) in map_paths.iter().filter(|(_, path)| path.exists()) {
        let expected = object
            .maps
            .get(*name)
            .ok_or_else(|| DatapathError::MissingMap((*name).to_owned()))?;
        let wanted = bpf_sys::MapLayout {
            map_type: expected.map_type(),
            key_size: expected.key_size(),
            value_size: expected.value_size(),
            max_entries: capacities
                .of(name)
                .unwrap_or_else(|| expected.max_entries()),
        };
        let Some(difference) = pinned_map_difference(name, path, &wanted)? else {
            continue;
        };
        if REPLACEABLE_MAPS.contains(name) {
            std::fs::remove_file(path).map_err(|source| DatapathError::Pin {
                path: path.clone(),
                source,
            })?;
            replaced.push(format!(
                "pinned map {name} replaced by a new, empty one ({difference}): flows are judged by policy again at their next packet"
            ));
            continue;
        }
        return Err(DatapathError::IncompatiblePin {
            map: name,
            detail: difference,
        });
    }
    Ok(replaced)
}

/// How the map pinned at `path` differs from `wanted`, if it does.
fn pinned_map_difference(
    name: &'static str,
    path: &Path,
    wanted: &bpf_sys::MapLayout,
) -> Result<Option<String>, DatapathError> {
    let kernel_err = |source| DatapathError::Kernel {
        what: format!("reading pinned map {name} at {}", path.display()),
        source,
    };
    let fd = bpf_sys::open_pinned(path).map_err(kernel_err)?;
    let pinned = bpf_sys::map_layout(fd.as_fd()).map_err(kernel_err)?;
    let mut differences = Vec::new();
    if pinned.map_type != wanted.map_type {
        differences.push(format!(
            "type {} pinned, {} wanted",
            bpf_sys::map_type_name(pinned.map_type),
            bpf_sys::map_type_name(wanted.map_type)
        ));
    }
    if (pinned.key_size, pinned.value_size) != (wanted.key_size, wanted.value_size) {
        differences.push(format!(
            "key and value sizes {:?} pinned, {:?} wanted",
            (pinned.key_size, pinned.value_size),
            (wanted.key_size, wanted.value_size)
        ));
    }
    if pinned.max_entries != wanted.max_entries {
        differences.push(format!(
            "capacity {} pinned, {} wanted",
            pinned.max_entries, wanted.max_entries
        ));
    }
    Ok((!differences.is_empty()).then(|| differences.join("; ")))
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| DatapathError::MissingProgram(name.to_owned()))?;
    program
        .try_into()
        .map_err(|_| DatapathError::MissingProgram(name.to_owned()))
}

/// bpffs refuses names with a dot (reserved by the kernel), and interface names may
/// have one (`eth0.100`) but never a colon: dots are stored as colons.
fn link_pin_path(pin_dir: &Path, interface: &str, point: AttachPoint) -> PathBuf {
    pin_dir
        .join("links")
        .join(point.name())
        .join(interface.replace('.', ":"))
}

/// Detaches every pinned link and removes the pinned maps under `pin_dir`: the
/// programs stop enforcing and all state goes.
pub fn detach_pinned(pin_dir: &Path) -> Result<usize, DatapathError> {
    let mut detached = 0;
    let links_dir = pin_dir.join("links");
    for path in pinned_link_paths(pin_dir) {
        let link = PinnedLink::from_pin(&path).map_err(|e| DatapathError::Pin {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        // Unpinning removes the file; dropping the returned fd detaches.
        drop(link.unpin().map_err(|source| DatapathError::Pin {
            path: path.clone(),
            source,
        })?);
        detached += 1;
    }
    for dir in [links_dir, pin_dir.join("maps")] {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|source| DatapathError::Pin {
                path: dir.clone(),
                source,
            })?;
        }
    }
    let _ = std::fs::remove_dir(pin_dir);
    Ok(detached)
}

/// Detaches the pinned links of one interface (every hook), leaving the maps and the
/// other interfaces alone: a pod that left the node takes its veth's programs with
/// it. Returns how many links were removed.
pub fn detach_interface(pin_dir: &Path, interface: &str) -> Result<usize, DatapathError> {
    let mut detached = 0;
    let file_name = interface.replace('.', ":");
    for path in pinned_link_paths(pin_dir) {
        if path.file_name().and_then(|n| n.to_str()) != Some(file_name.as_str()) {
            continue;
        }
        let link = PinnedLink::from_pin(&path).map_err(|e| DatapathError::Pin {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        // Unpinning removes the file; dropping the returned fd detaches.
        drop(link.unpin().map_err(|source| DatapathError::Pin {
            path: path.clone(),
            source,
        })?);
        detached += 1;
    }
    Ok(detached)
}

fn pinned_link_paths(pin_dir: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for hook in std::fs::read_dir(pin_dir.join("links"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for link in std::fs::read_dir(hook.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            paths.push(link.path());
        }
    }
    paths.sort();
    paths
}

/// Interfaces and hooks with a pinned link under `pin_dir`, as `<iface>.<hook>`.
pub fn pinned_links(pin_dir: &Path) -> Vec<String> {
    pinned_link_paths(pin_dir)
        .iter()
        .filter_map(|path| {
            let interface = path.file_name()?.to_str()?.replace(':', ".");
            let hook = path.parent()?.file_name()?.to_str()?.to_owned();
            Some(format!("{interface}.{hook}"))
        })
        .collect()
}
