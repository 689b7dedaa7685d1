//! Agent configuration: a YAML file, overridden by command-line flags.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::datapath::{AttachPoint, XdpAttachMode};
use microseg_common::config::ConntrackLifetimes;

/// How the programs are attached to one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// XDP (native if possible) for arriving packets, TC egress for leaving ones.
    #[default]
    Xdp,
    /// XDP in native (driver) mode only.
    XdpDriver,
    /// XDP in generic (skb) mode.
    XdpGeneric,
    /// TC ingress and TC egress (a pod's host-side veth, or where XDP is unwanted).
    Tc,
}

impl AttachMode {
    /// The hooks this mode attaches to.
    pub fn points(self) -> [AttachPoint; 2] {
        let ingress = match self {
            Self::Xdp => AttachPoint::Xdp(XdpAttachMode::Default),
            Self::XdpDriver => AttachPoint::Xdp(XdpAttachMode::Driver),
            Self::XdpGeneric => AttachPoint::Xdp(XdpAttachMode::Generic),
            Self::Tc => AttachPoint::TcIngress,
        };
        [ingress, AttachPoint::TcEgress]
    }

    fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(match text {
            "xdp" => Self::Xdp,
            "xdp-driver" => Self::XdpDriver,
            "xdp-generic" => Self::XdpGeneric,
            "tc" => Self::Tc,
            other => bail!("unknown attach mode {other:?} (xdp, xdp-driver, xdp-generic or tc)"),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InterfaceConfig {
    pub name: String,
    #[serde(default)]
    pub attach: AttachMode,
}

impl InterfaceConfig {
    /// `NAME` or `NAME:MODE` as given on the command line.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let (name, attach) = match text.split_once(':') {
            Some((name, mode)) => (name, AttachMode::parse(mode)?),
            None => (text, AttachMode::default()),
        };
        if name.is_empty() || name.len() > 15 {
            bail!("invalid interface name {name:?}");
        }
        Ok(Self {
            name: name.to_owned(),
            attach,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Interfaces to enforce on.
    pub interfaces: Vec<InterfaceConfig>,
    /// Directories (or files) of policies and inventory, watched for changes.
    pub policy_dirs: Vec<PathBuf>,
    /// Applied policies and inventory are persisted here.
    pub state_dir: PathBuf,
    /// Maps and links are pinned here.
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    /// Octal permission bits of the API socket.
    pub socket_mode: String,
    /// Prometheus metrics address; empty disables the endpoint.
    pub metrics_address: String,
    /// Every enforced endpoint starts in audit mode (would-be denies pass and are
    /// reported).
    pub audit_mode: bool,
    /// Also write every event as a JSON line to this file.
    pub event_log: Option<PathBuf>,
    /// The event log is rotated when it would pass this size...
    pub event_log_max_bytes: u64,
    /// ...keeping this many rotated files (FILE.1 ... FILE.N).
    pub event_log_files: u32,
    /// Longest API request line accepted, in bytes (an `apply` carries its files).
    pub api_max_request_bytes: usize,
    /// In-kernel event rate limit for the node (all CPUs together), and burst.
    pub events_per_second: u32,
    pub events_burst: u32,
    /// Deny events on (the default) or off (`denyEvents: false`): off, the programs
    /// send no deny event and skip the rate limiter and its clock reads; denied
    /// packets are still counted (metrics `denied_*` and drops by reason) and nothing
    /// is counted as lost. Audit events are not affected. For hosts where the
    /// counters are enough and the event path's cost per denied packet is not wanted.
    pub deny_events: bool,
    /// Also report allowed flows (`FORWARDED`), once per new flow (its first packet,
    /// and again when a policy change makes the agent judge it anew): the flow history
    /// `suggest`, `diff` and `graph` read then holds what ran, not only what was
    /// denied. Costs an event per new flow, within the same rate limit.
    pub trace_allowed: bool,
    /// Flows (events) the agent keeps in memory for `microseg events`, the Hubble API,
    /// `suggest` and `diff`. With `eventLog`, the newest of the log are read back at
    /// start, so the history outlives a restart.
    pub flow_history: usize,
    /// Events each subscriber may fall behind before it loses events.
    pub subscriber_buffer: usize,
    /// Node name reported in events (defaults to the host name).
    pub node_name: Option<String>,
    /// How often the watched directories are checked for changes, in milliseconds.
    pub watch_interval_ms: u64,
    /// How often every enforced interface is checked against the kernel (and, in
    /// Kubernetes mode, pods' veths are looked for), in milliseconds.
    pub interface_scan_ms: u64,
    /// Bind configured interfaces that are veths to the workload whose address their
    /// peer holds (source validation), as Kubernetes mode does for pods.
    pub discover_workload_interfaces: bool,
    /// How long idle connections are remembered.
    pub conntrack: ConntrackConfig,
    /// The peer address map's size.
    pub peers: PeersConfig,
    /// Kubernetes mode: inventory and policies from the API server.
    pub kubernetes: KubernetesConfig,
    /// Hubble's Observer API (gRPC): where it listens.
    pub hubble: crate::hubble::config::HubbleConfig,
}

/// Kubernetes mode (`microseg agent --kubernetes`, see `agent::kubernetes`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Watch Namespaces, Pods and NetworkPolicies and enforce for this node's pods.
    pub enabled: bool,
    /// A kubeconfig file; unset: the in-cluster service account, then `$KUBECONFIG`
    /// or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Names of pod sandbox network namespaces under `/var/run/netns` start with one
    /// of these (containerd: `cni-`). A veth whose peer is in one is a pod's: it is
    /// attached as soon as it is found and drops everything beyond its link until
    /// the API server reports its pod. Empty: only veths of known pods are attached.
    pub pod_sandbox_prefixes: Vec<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            kubeconfig: None,
            pod_sandbox_prefixes: vec!["cni-".to_owned()],
        }
    }
}

/// Connection tracking: the table's size, and idle lifetimes of tracked connections
/// in seconds (see `microseg_common::config::ConntrackLifetimes` for the defaults and
/// their origin).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ConntrackConfig {
    /// Flows the node's table holds (an LRU: when full, the least recently used flow
    /// is forgotten and judged by policy again at its next packet). Unset: sized from
    /// the host's memory, see `conntrack_entries_for_memory`.
    pub max_entries: Option<u32>,
    /// A TCP connection opened (SYN) and not yet answered.
    pub tcp_opening_seconds: u32,
    pub tcp_established_seconds: u32,
    /// One side sent a FIN; the other may still send.
    pub tcp_half_closed_seconds: u32,
    /// Both sides sent a FIN, or a RST was seen.
    pub tcp_closed_seconds: u32,
    pub udp_seconds: u32,
    /// ICMP, SCTP and every other protocol.
    pub other_seconds: u32,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        let d = ConntrackLifetimes::DEFAULT;
        Self {
            max_entries: None,
            tcp_opening_seconds: d.tcp_opening_s,
            tcp_established_seconds: d.tcp_established_s,
            tcp_half_closed_seconds: d.tcp_half_closed_s,
            tcp_closed_seconds: d.tcp_closed_s,
            udp_seconds: d.udp_s,
            other_seconds: d.other_s,
        }
    }
}

/// Share of the host's memory the conntrack table is sized for when
/// `conntrack.maxEntries` is not set: Cilium's `bpf-map-dynamic-size-ratio` default.
pub const CONNTRACK_MEMORY_RATIO: f64 = 0.0025;
/// What one conntrack entry costs the kernel, in bytes: the 40-byte key and 16-byte
/// value of an LRU hash element, its header (hash node, LRU node, hash) and
/// rounding. Measured on Linux 6.18: 59,731,704 bytes (the map's memlock) for
/// 493,675 entries, 121 an entry; rounded up.
pub const CONNTRACK_ENTRY_BYTES: u64 = 128;
/// The table is never sized below this (microseg's former fixed size, Cilium's
/// `LimitTableMin`)...
pub const CONNTRACK_MIN_ENTRIES: u32 = 131_072;
/// ...nor above this (Cilium's `LimitTableMax`, 2 GiB of entries).
pub const CONNTRACK_MAX_ENTRIES: u32 = 16_777_216;
/// The smallest table `conntrack.maxEntries` may ask for.
pub const CONNTRACK_CONFIGURABLE_MIN: u32 = 1024;

/// The conntrack table's default size on a host with `total_memory_bytes` of RAM:
/// `total_memory_bytes * 0.0025 / 128`, kept within 131,072 and 16,777,216 entries
/// (4 GiB of RAM or less: 131,072; 24 GiB: 503,316; 64 GiB: 1,342,177).
pub fn conntrack_entries_for_memory(total_memory_bytes: u64) -> u32 {
    let entries =
        (total_memory_bytes as f64 * CONNTRACK_MEMORY_RATIO) as u64 / CONNTRACK_ENTRY_BYTES;
    entries.clamp(
        u64::from(CONNTRACK_MIN_ENTRIES),
        u64::from(CONNTRACK_MAX_ENTRIES),
    ) as u32
}

/// The host's memory (`MemTotal` of /proc/meminfo), in bytes.
pub fn total_memory_bytes() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    text.lines()
        .find_map(|line| {
            let kib = line.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?;
            kib.trim().parse::<u64>().ok()
        })
        .map(|kib| kib * 1024)
        .context("/proc/meminfo has no MemTotal")
}

/// The peer address map (`PEER_HOSTS`: address -> identity, for every workload and
/// pod of the cluster). An update writes the next generation beside the enforced
/// one, so it holds two entries per address: a cluster of N pods, dual-stack, needs
/// 4 x N. Changing it takes a fresh load of the maps (`microseg detach`, then start
/// the agent): a pinned map of another size is refused, never half-used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PeersConfig {
    /// Entries the map holds; unset: 262,144 (65,536 dual-stack pods).
    pub max_entries: Option<u32>,
}

/// The bounds of `peers.maxEntries`: at least the default's reach for a small
/// host, at most what the kernel's hash maps take without a second thought (each
/// entry is about 100 bytes of kernel memory, preallocated).
const PEERS_MIN_ENTRIES: u32 = 1_024;
const PEERS_MAX_ENTRIES: u32 = 16 * 1_048_576;

impl PeersConfig {
    pub fn capacity(&self) -> u32 {
        self.max_entries
            .unwrap_or(microseg_common::maps::PEER_HOSTS_CAPACITY)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if let Some(entries) = self.max_entries
            && !(PEERS_MIN_ENTRIES..=PEERS_MAX_ENTRIES).contains(&entries)
        {
            bail!(
                "peers.maxEntries must be within {PEERS_MIN_ENTRIES} and {PEERS_MAX_ENTRIES}, not {entries}"
            );
        }
        Ok(())
    }
}

impl ConntrackConfig {
    /// The table's size: `maxEntries`, else sized from the host's memory (the floor
    /// where the memory cannot be read).
    pub fn capacity(&self) -> u32 {
        match self.max_entries {
            Some(entries) => entries,
            None => total_memory_bytes()
                .map(conntrack_entries_for_memory)
                .unwrap_or(CONNTRACK_MIN_ENTRIES),
        }
    }

    pub fn lifetimes(&self) -> ConntrackLifetimes {
        ConntrackLifetimes::new(
            self.tcp_opening_seconds,
            self.tcp_established_seconds,
            self.tcp_half_closed_seconds,
            self.tcp_closed_seconds,
            self.udp_seconds,
            self.other_seconds,
        )
    }

    fn validate(&self) -> anyhow::Result<()> {
        for (name, value) in [
            ("tcpOpeningSeconds", self.tcp_opening_seconds),
            ("tcpEstablishedSeconds", self.tcp_established_seconds),
            ("tcpHalfClosedSeconds", self.tcp_half_closed_seconds),
            ("tcpClosedSeconds", self.tcp_closed_seconds),
            ("udpSeconds", self.udp_seconds),
            ("otherSeconds", self.other_seconds),
        ] {
            if value == 0 {
                bail!("conntrack.{name} must be at least 1 second");
            }
        }
        if let Some(entries) = self.max_entries
            && !(CONNTRACK_CONFIGURABLE_MIN..=CONNTRACK_MAX_ENTRIES).contains(&entries)
        {
            bail!(
                "conntrack.maxEntries must be within {CONNTRACK_CONFIGURABLE_MIN} and {CONNTRACK_MAX_ENTRIES}, not {entries}"
            );
        }
        Ok(())
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            policy_dirs: Vec::new(),
            state_dir: PathBuf::from("/var/lib/microseg"),
            pin_dir: PathBuf::from(microseg_common::maps::PIN_ROOT),
            socket: PathBuf::from(crate::api::DEFAULT_SOCKET),
            socket_mode: "0600".to_owned(),
            metrics_address: "127.0.0.1:9967".to_owned(),
            audit_mode: false,
            event_log: None,
            event_log_max_bytes: 64 * 1024 * 1024,
            event_log_files: 4,
            api_max_request_bytes: 64 * 1024 * 1024,
            events_per_second: microseg_common::config::DEFAULT_EVENTS_PER_SECOND,
            events_burst: microseg_common::config::DEFAULT_EVENTS_BURST,
            deny_events: true,
            trace_allowed: false,
            flow_history: 16_384,
            subscriber_buffer: 4096,
            node_name: None,
            watch_interval_ms: 500,
            interface_scan_ms: 1000,
            discover_workload_interfaces: true,
            conntrack: ConntrackConfig::default(),
            peers: PeersConfig::default(),
            kubernetes: KubernetesConfig::default(),
            hubble: crate::hubble::config::HubbleConfig::default(),
        }
    }
}

impl AgentConfig {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading agent configuration {}", path.display()))?;
        let config: Self = serde_norway::from_str(&text)
            .with_context(|| format!("invalid agent configuration {}", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.socket_mode_bits()?;
        self.metrics_socket_address()?;
        if self.flow_history == 0 {
            bail!("flowHistory must be at least 1");
        }
        if self.subscriber_buffer == 0 {
            bail!("subscriberBuffer must be at least 1");
        }
        if self.event_log_max_bytes < 4096 {
            bail!("eventLogMaxBytes must be at least 4096");
        }
        if self.api_max_request_bytes < 4096 {
            bail!("apiMaxRequestBytes must be at least 4096");
        }
        if self.interface_scan_ms < 100 {
            bail!("interfaceScanMs must be at least 100");
        }
        self.conntrack.validate()?;
        self.peers.validate()?;
        self.hubble.validate()?;
        Ok(())
    }

    pub fn socket_mode_bits(&self) -> anyhow::Result<u32> {
        u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .with_context(|| format!("socketMode {:?} is not an octal mode", self.socket_mode))
    }

    pub fn metrics_socket_address(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.metrics_address.is_empty() {
            return Ok(None);
        }
        self.metrics_address
            .parse()
            .map(Some)
            .with_context(|| format!("metricsAddress {:?} is not ip:port", self.metrics_address))
    }

    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "localhost".to_owned())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_parse_with_their_attach_mode() {
        assert_eq!(
            InterfaceConfig::parse("eth0").unwrap().attach,
            AttachMode::Xdp
        );
        assert_eq!(
            InterfaceConfig::parse("veth1:tc").unwrap().attach,
            AttachMode::Tc
        );
        assert_eq!(
            InterfaceConfig::parse("eth0.100:xdp-generic").unwrap().name,
            "eth0.100"
        );
        assert!(InterfaceConfig::parse("eth0:ebpf").is_err());
        assert!(InterfaceConfig::parse("a-name-longer-than-15").is_err());
    }

    #[test]
    fn invalid_settings_are_refused() {
        let config = AgentConfig {
            socket_mode: "999".into(),
            ..AgentConfig::default()
        };
        assert!(config.validate().is_err());
        let config = AgentConfig {
            metrics_address: "localhost".into(),
            ..AgentConfig::default()
        };
        assert!(config.validate().is_err());
        assert_eq!(AgentConfig::default().socket_mode_bits().unwrap(), 0o600);
        let unknown: Result<AgentConfig, _> = serde_norway::from_str("interfacez: []\n");
        assert!(unknown.is_err(), "unknown keys are errors");
    }

    /// The configurations shipped in `deploy/` are valid, every key known.
    #[test]
    fn the_deployed_configurations_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let systemd = AgentConfig::from_file(&root.join("deploy/systemd/agent.yaml"))
            .expect("deploy/systemd/agent.yaml");
        assert!(!systemd.kubernetes.enabled);
        let configmap: serde_norway::Value = serde_norway::from_str(
            &std::fs::read_to_string(root.join("deploy/kubernetes/configmap.yaml"))
                .expect("configmap"),
        )
        .expect("configmap yaml");
        let text = configmap["data"]["agent.yaml"]
            .as_str()
            .expect("agent.yaml");
        let daemonset: AgentConfig =
            serde_norway::from_str(text).expect("the ConfigMap's agent.yaml");
        daemonset.validate().expect("valid");
        assert!(daemonset.kubernetes.enabled);
        assert_eq!(daemonset.kubernetes.pod_sandbox_prefixes, ["cni-"]);
        assert_eq!(
            AgentConfig::default().kubernetes.pod_sandbox_prefixes,
            ["cni-"]
        );
    }

    #[test]
    fn the_conntrack_table_is_sized_from_memory_within_a_floor_and_a_cap() {
        const GIB: u64 = 1 << 30;
        assert_eq!(conntrack_entries_for_memory(2 * GIB), CONNTRACK_MIN_ENTRIES);
        assert_eq!(conntrack_entries_for_memory(24 * GIB), 503_316);
        assert_eq!(conntrack_entries_for_memory(64 * GIB), 1_342_177);
        assert_eq!(
            conntrack_entries_for_memory(16 * 1024 * GIB),
            CONNTRACK_MAX_ENTRIES
        );
        let configured: AgentConfig =
            serde_norway::from_str("conntrack:\n  maxEntries: 4096\n").unwrap();
        configured.validate().unwrap();
        assert_eq!(configured.conntrack.capacity(), 4096);
        let default = AgentConfig::default().conntrack.capacity();
        assert!((CONNTRACK_MIN_ENTRIES..=CONNTRACK_MAX_ENTRIES).contains(&default));
        let too_small: AgentConfig =
            serde_norway::from_str("conntrack:\n  maxEntries: 10\n").unwrap();
        assert!(too_small.validate().is_err());
    }

    #[test]
    fn the_peer_map_is_sized_by_peers_max_entries() {
        assert_eq!(
            AgentConfig::default().peers.capacity(),
            microseg_common::maps::PEER_HOSTS_CAPACITY
        );
        let large: AgentConfig = serde_norway::from_str("peers:\n  maxEntries: 1048576\n").unwrap();
        large.validate().unwrap();
        assert_eq!(large.peers.capacity(), 1_048_576);
        for wrong in [
            "peers:\n  maxEntries: 10\n",
            "peers:\n  maxEntries: 4000000000\n",
        ] {
            let config: AgentConfig = serde_norway::from_str(wrong).unwrap();
            assert!(config.validate().is_err(), "{wrong}");
        }
    }

    #[test]
    fn deny_events_are_on_unless_turned_off() {
        assert!(AgentConfig::default().deny_events);
        let off: AgentConfig = serde_norway::from_str("denyEvents: false\n").unwrap();
        assert!(!off.deny_events);
    }
}
