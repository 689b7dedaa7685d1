//! Loading the programs, attaching them to interfaces, pinning maps and links under
//! the pin directory, and detaching.
//!
//! Pinned layout: `<pin_dir>/maps/<MAP>` and `<pin_dir>/links/<hook>/<iface>`. A load
//! with a pin directory reuses maps already pinned there, so a restarted agent keeps
//! the enforced state; pinned links keep enforcement in place after the agent exits.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use microseg_common::{config::Settings, maps};

use super::{DatapathError, maps::DatapathMaps};

/// The compiled programs, embedded at build time.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/microseg"));

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
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    /// Links not pinned: they detach when the `Datapath` is dropped.
    links: Vec<FdLink>,
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
        let map_paths: Vec<(&str, PathBuf)> = match &options.pin_dir {
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
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(PROGRAMS)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        {
            let name = maps::PROG_XDP;
            let program: &mut Xdp = program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|e| DatapathError::program(name, e))?;
        }
        for name in [maps::PROG_TC_INGRESS, maps::PROG_TC_EGRESS] {
            let program: &mut SchedClassifier = program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|e| DatapathError::program(name, e))?;
        }
        let mut datapath = Self {
            ebpf,
            pin_dir: options.pin_dir.clone(),
            links: Vec::new(),
        };
        // A fresh SETTINGS is all zeroes (no rate limit); give it the defaults. Reused
        // pinned settings are kept.
        let mut handles = datapath.maps()?;
        if handles.settings()?.events_burst == 0 {
            handles.set_settings(&Settings::default())?;
        }
        Ok(datapath)
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

    /// Attaches the program for `point` to `interface`. With a pin directory the link
    /// is pinned (replacing an older pin of the same interface and hook), so it stays
    /// after this process exits.
    pub fn attach(&mut self, interface: &str, point: AttachPoint) -> Result<(), DatapathError> {
        let attach_err = |source: &dyn std::fmt::Display| DatapathError::Attach {
            interface: interface.to_owned(),
            point: point.name(),
            reason: source.to_string(),
        };
        let link: FdLink = match point {
            AttachPoint::Xdp(mode) => {
                let mode = match mode {
                    XdpAttachMode::Default => XdpMode::Default,
                    XdpAttachMode::Driver => XdpMode::Driver,
                    XdpAttachMode::Generic => XdpMode::Skb,
                };
                let program: &mut Xdp = program_mut(&mut self.ebpf, maps::PROG_XDP)?;
                let id = program
                    .attach(interface, mode)
                    .map_err(|e| attach_err(&e))?;
                let link = program.take_link(id).map_err(|e| attach_err(&e))?;
                FdLink::try_from(link).map_err(|e| attach_err(&e))?
            }
            AttachPoint::TcIngress | AttachPoint::TcEgress => {
                let (name, attach_type) = if point == AttachPoint::TcIngress {
                    (maps::PROG_TC_INGRESS, TcAttachType::Ingress)
                } else {
                    (maps::PROG_TC_EGRESS, TcAttachType::Egress)
                };
                let program: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?;
                // TCX (kernel 6.6+) needs no qdisc; aya falls back to clsact otherwise.
                let has_tcx = aya::util::KernelVersion::current()
                    .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
                if !has_tcx {
                    let _ = aya::programs::tc::qdisc_add_clsact(interface);
                }
                let id = program
                    .attach(interface, attach_type)
                    .map_err(|e| attach_err(&e))?;
                let link = program.take_link(id).map_err(|e| attach_err(&e))?;
                FdLink::try_from(link).map_err(|e| attach_err(&e))?
            }
        };
        match &self.pin_dir {
            Some(dir) => {
                let path = link_pin_path(dir, interface, point);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(|source| DatapathError::Pin {
                        path: parent.to_owned(),
                        source,
                    })?;
                }
                // An older pin for the same interface and hook is replaced: unpinning
                // it detaches the old program once the new one is in place.
                if path.exists()
                    && let Ok(old) = PinnedLink::from_pin(&path)
                {
                    let _ = old.unpin();
                }
                link.pin(&path).map_err(|e| DatapathError::Pin {
                    path: path.clone(),
                    source: std::io::Error::other(format!("{e:?}")),
                })?;
            }
            // Unpinned: the link lives as long as this process holds it.
            None => self.links.push(link),
        }
        Ok(())
    }
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
