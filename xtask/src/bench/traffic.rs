//! Real traffic between two network namespaces over a veth pair, per engine and rule
//! count.
//!
//! Packet source (BENCH-NOTES): trafgen (netsniff-ng) in the sender namespace, pinned
//! to CPU 0 (`taskset -c 0 trafgen --cpus 1 --no-sock-mem --notouch-irq -S 256KiB`), 60-byte
//! IPv4 UDP frames (64 with FCS) addressed to the receiver veth's MAC, to UDP port
//! 5001 of the receiver (no socket listens: a packet that passes the filter ends as
//! "UDP to a closed port"). Source addresses are drawn at random per packet
//! (`drnd`) from the rule set's clients (allowed run) or from as many addresses
//! outside it (denied run). Over veth the receive path runs in softirq on the
//! sender's CPU, inside its send call, so the sender's rate is the receiver's.
//!
//! Counting over a window after a warm-up, from the kernel's own counters:
//! - processed: the sender veth's tx_packets (every frame the veth accepted was
//!   processed by the receiver, in the sender's call);
//! - delivered: UDP datagrams that reached the receiver's transport layer
//!   (/proc/net/snmp Udp InDatagrams + NoPorts + InErrors of its namespace);
//! - dropped: processed - delivered.
//!
//! The engine's own drop counter is compared with processed - delivered in every
//! window (allowed and denied sources): microseg's DeniedIngress + DeniedEgress, the
//! packet count of the iptables DROP rule (`iptables -nvxL INPUT N`, also for
//! iptables-ipset, whose ipset keeps no counter), the nft named counter on the
//! dropping rule (`nft list counter`); `none` filters nothing and has no counter.
//! Reading iptables' or nft's counter runs a program (tens of ms, more with many
//! rules), during which thousands of packets pass, so the comparison is made where
//! both sides stand still: from before trafgen starts to after it has stopped and the
//! receiver's counters have settled (warm-up, measured window and stop). There the
//! two counts should be equal; a difference beyond `COUNTER_TOLERANCE` is flagged
//! (printed, marked in the report and listed in its notes), not hidden. The counter
//! over the measured window alone (read at each end just before the snapshot, so
//! skewed by the read) is reported beside it.
//!
//! Interface counters are read from /proc/net/dev of each namespace: the same
//! `dev_get_stats` figures as /sys/class/net/IF/statistics, which the root
//! namespace's sysfs cannot show for another namespace's interfaces.
//!
//! Engines: microseg XDP (native) and TC, iptables (one rule per client, then DROP),
//! iptables with one ipset hash:ip of the clients, nftables with a set at the input
//! hook (family ip), nftables with a set at the netdev ingress hook of the receiver's
//! interface (the earliest nftables can drop), and no filter. Every engine runs
//! `rounds` times per scale, interleaved: round r installs the engines one after the
//! other (starting at engine r, so no engine always runs first or last after a
//! compile), each measured with allowed then denied sources and removed before the
//! next. Rows report the median over rounds, with min and max; ratios use medians.
//!
//! iptables rules, ipsets and nftables tables are created inside the receiver
//! namespace only; the namespaces, the veth pair and every rule and set go when the
//! guards drop (and with the namespace, should a removal fail).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use microseg::datapath::{AttachPoint, Datapath, DatapathState, LoadOptions, XdpAttachMode};
use microseg_common::counters::Counter;
use serde::Serialize;

use crate::{
    netns::{self, Namespace, ProcFile, Veth},
    progress::Progress,
    scenario::{self, ALLOWED_PORT, Family, SERVER_V4, Scenario},
};

const SENDER_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    MicrosegXdp,
    MicrosegTc,
    Iptables,
    IptablesIpset,
    Nftables,
    NftablesNetdev,
    None,
}

impl Engine {
    pub const ALL: [Engine; 7] = [
        Engine::MicrosegXdp,
        Engine::MicrosegTc,
        Engine::Iptables,
        Engine::IptablesIpset,
        Engine::Nftables,
        Engine::NftablesNetdev,
        Engine::None,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Engine::MicrosegXdp => "microseg-xdp",
            Engine::MicrosegTc => "microseg-tc",
            Engine::Iptables => "iptables",
            Engine::IptablesIpset => "iptables-ipset",
            Engine::Nftables => "nftables",
            Engine::NftablesNetdev => "nftables-netdev",
            Engine::None => "none",
        }
    }
}

/// The ipset of allowed clients (iptables-ipset), in the receiver namespace.
const IPSET_NAME: &str = "msbench-allowed";
/// The nftables table name (family ip for `nftables`, netdev for `nftables-netdev`).
const NFT_TABLE: &str = "msbench";

#[derive(Clone, Debug)]
pub struct TrafficConfig {
    pub scales: Vec<u32>,
    pub window: Duration,
    pub warmup: Duration,
    /// Rounds over every engine per scale (interleaved).
    pub rounds: usize,
}

/// One window of traffic.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunCounts {
    /// "allowed" (sources from the rule set) or "denied" (sources outside it).
    pub sources: &'static str,
    pub window_s: f64,
    pub processed_pps: f64,
    pub delivered_pps: f64,
    pub dropped_pps: f64,
    /// The engine's own drop counter over the window, per second (None: the engine
    /// has none, i.e. `none`).
    pub engine_dropped_pps: Option<f64>,
    /// Measured window totals in packets: processed, delivered, processed -
    /// delivered, and the engine's drop counter (read at each end just before the
    /// snapshot; reading iptables' or nft's counter takes tens of ms, so this one is
    /// skewed by what passes meanwhile: `counter_check` is the exact comparison).
    pub processed_packets: u64,
    pub delivered_packets: u64,
    pub dropped_packets: u64,
    pub engine_dropped_packets: Option<u64>,
    /// The engine's own drop counter beside processed - delivered over the whole
    /// traffic run of this window, both read standing still (None for `none`).
    pub counter_check: Option<CounterCheck>,
    pub receiver_rx_packets_pps: f64,
    pub receiver_rx_dropped_pps: f64,
    /// Whole receive path per packet: 1e9 / processed_pps.
    pub ns_per_packet: f64,
}

/// One round of one engine at one scale: installed, both windows, removed.
#[derive(Clone, Debug, Serialize)]
pub struct TrafficRun {
    /// Round number (0-based) and the engine's position in that round's order.
    pub round: usize,
    pub position: usize,
    pub setup_ms: f64,
    pub allowed: RunCounts,
    pub denied: RunCounts,
}

/// Median, min and max of one figure over the rounds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The median of an even count is the mean of the middle two.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut values: Vec<f64> = values.into_iter().collect();
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            f64::midpoint(values[n / 2 - 1], values[n / 2])
        };
        Self {
            median,
            min: values[0],
            max: values[n - 1],
        }
    }
}

/// One engine at one scale over every round. The headline `pps_*` fields are the
/// medians over the rounds; every ratio the report draws uses them.
#[derive(Clone, Debug, Serialize)]
pub struct TrafficRow {
    pub engine: &'static str,
    pub rules: u32,
    pub rounds: usize,
    /// Delivered packets/s with allowed sources: median over the rounds.
    pub pps_delivered: f64,
    pub pps_delivered_min: f64,
    pub pps_delivered_max: f64,
    /// Dropped packets/s with denied sources: median over the rounds (0 for `none`).
    pub pps_dropped: f64,
    pub pps_dropped_min: f64,
    pub pps_dropped_max: f64,
    /// Packets/s the receiver processed (sender veth tx) in each window: medians.
    pub processed_allowed_pps: Spread,
    pub processed_denied_pps: Spread,
    /// The engine's own drop counter in the denied window, per second (None for
    /// `none`): median over the rounds.
    pub engine_dropped_pps: Option<Spread>,
    /// Whole receive path per packet in the denied window, 1e9 / processed pps.
    pub denied_ns_per_packet: Spread,
    /// Rule set-up, install to ready: median over the rounds.
    pub setup_ms: f64,
    /// Windows (allowed and denied, every round) whose engine drop counter was
    /// compared with processed - delivered, and how many of them disagreed (0 and 0
    /// for `none`, which has no counter).
    pub counter_windows_compared: usize,
    pub counter_windows_disagreeing: usize,
    /// The largest |engine - (processed - delivered)| over those windows, in packets
    /// and as a share of that window's processed packets.
    pub counter_largest_difference_packets: u64,
    pub counter_largest_difference_ratio: f64,
    /// Every round, in the order measured.
    pub runs: Vec<TrafficRun>,
}

impl TrafficRow {
    fn new(engine: Engine, rules: u32, runs: Vec<TrafficRun>) -> Self {
        let delivered = Spread::of(runs.iter().map(|run| run.allowed.delivered_pps));
        let dropped = if engine == Engine::None {
            Spread::default()
        } else {
            Spread::of(runs.iter().map(|run| run.denied.dropped_pps))
        };
        let engine_dropped: Vec<f64> = runs
            .iter()
            .filter_map(|run| run.denied.engine_dropped_pps)
            .collect();
        let checks: Vec<&CounterCheck> = runs
            .iter()
            .flat_map(|run| [&run.allowed, &run.denied])
            .filter_map(|counts| counts.counter_check.as_ref())
            .collect();
        let counter_windows_compared = checks.len();
        let counter_windows_disagreeing = checks.iter().filter(|check| !check.agrees).count();
        let (counter_largest_difference_packets, counter_largest_difference_ratio) = checks
            .iter()
            .map(|check| {
                let difference = check.difference_packets.unsigned_abs();
                (
                    difference,
                    difference as f64 / check.processed_packets.max(1) as f64,
                )
            })
            .max_by_key(|(difference, _)| *difference)
            .unwrap_or((0, 0.0));
        Self {
            engine: engine.name(),
            rules,
            rounds: runs.len(),
            pps_delivered: delivered.median,
            pps_delivered_min: delivered.min,
            pps_delivered_max: delivered.max,
            pps_dropped: dropped.median,
            pps_dropped_min: dropped.min,
            pps_dropped_max: dropped.max,
            processed_allowed_pps: Spread::of(runs.iter().map(|run| run.allowed.processed_pps)),
            processed_denied_pps: Spread::of(runs.iter().map(|run| run.denied.processed_pps)),
            engine_dropped_pps: (!engine_dropped.is_empty()).then(|| Spread::of(engine_dropped)),
            denied_ns_per_packet: Spread::of(runs.iter().map(|run| run.denied.ns_per_packet)),
            setup_ms: Spread::of(runs.iter().map(|run| run.setup_ms)).median,
            counter_windows_compared,
            counter_windows_disagreeing,
            counter_largest_difference_packets,
            counter_largest_difference_ratio,
            runs,
        }
    }

    /// Each window whose engine drop counter disagrees with processed - delivered:
    /// "iptables at 100k rules, round 2, denied sources: ...".
    pub fn counter_disagreements(&self) -> Vec<String> {
        self.runs
            .iter()
            .flat_map(|run| [(run, &run.allowed), (run, &run.denied)])
            .filter_map(|(run, counts)| {
                let check = counts.counter_check.as_ref()?;
                (!check.agrees).then(|| {
                    format!(
                        "{} at {} rules, round {}, {} sources: {}",
                        self.engine,
                        scenario::human(u64::from(self.rules)),
                        run.round + 1,
                        counts.sources,
                        check.describe(),
                    )
                })
            })
            .collect()
    }
}

/// The two namespaces and the veth between them. Fields drop in order: the link,
/// then the namespaces.
struct Testbed {
    veth: Veth,
    receiver_mac: String,
    sender: Namespace,
    receiver: Namespace,
    sender_dev: ProcFile,
    receiver_dev: ProcFile,
    receiver_snmp: ProcFile,
}

impl Testbed {
    fn new() -> anyhow::Result<Self> {
        netns::remove_stale();
        let sender = Namespace::new("tx")?;
        let receiver = Namespace::new("rx")?;
        let veth = Veth::new(&sender, &receiver)?;
        let tx = veth.a_name.clone();
        let rx = veth.b_name.clone();
        sender.ip(&["addr", "add", &format!("{SENDER_V4}/24"), "dev", &tx])?;
        receiver.ip(&["addr", "add", &format!("{SERVER_V4}/24"), "dev", &rx])?;
        sender.ip(&["link", "set", &tx, "up"])?;
        receiver.ip(&["link", "set", &rx, "up"])?;
        // Replies (ICMP port unreachable, rate limited by the kernel) to the test
        // sources go back to the sender without neighbour resolution per source.
        let sender_mac = netns::mac_of(&sender, &tx)?;
        receiver.ip(&[
            "neigh",
            "replace",
            &SENDER_V4.to_string(),
            "lladdr",
            &sender_mac,
            "dev",
            &rx,
            "nud",
            "permanent",
        ])?;
        receiver.ip(&["route", "add", "10.0.0.0/8", "via", &SENDER_V4.to_string()])?;
        let receiver_mac = netns::mac_of(&receiver, &rx)?;
        Ok(Self {
            sender_dev: sender.proc_net("dev")?,
            receiver_dev: receiver.proc_net("dev")?,
            receiver_snmp: receiver.proc_net("snmp")?,
            veth,
            receiver_mac,
            sender,
            receiver,
        })
    }

    fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        let sender = parse_dev(&self.sender_dev.read()?, &self.veth.a_name)?;
        let receiver = parse_dev(&self.receiver_dev.read()?, &self.veth.b_name)?;
        let udp = parse_snmp(&self.receiver_snmp.read()?, "Udp")?;
        let field = |name: &str| udp.get(name).copied().unwrap_or(0);
        Ok(Snapshot {
            at: Instant::now(),
            tx_packets: sender.tx_packets,
            rx_packets: receiver.rx_packets,
            rx_dropped: receiver.rx_dropped,
            udp_delivered: field("InDatagrams") + field("NoPorts") + field("InErrors"),
        })
    }

    /// A snapshot once the receiver has settled after the sender stopped: two
    /// snapshots 10 ms apart that agree (up to 100 tries).
    fn quiet_snapshot(&mut self) -> anyhow::Result<Snapshot> {
        let mut last = self.snapshot()?;
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(10));
            let next = self.snapshot()?;
            if (next.tx_packets, next.udp_delivered) == (last.tx_packets, last.udp_delivered) {
                return Ok(next);
            }
            last = next;
        }
        Ok(last)
    }
}

struct Snapshot {
    at: Instant,
    tx_packets: u64,
    rx_packets: u64,
    rx_dropped: u64,
    udp_delivered: u64,
}

/// How far an engine's drop count may differ from processed - delivered over the
/// same still-standing span: this share of the packets processed, or
/// `COUNTER_TOLERANCE_PACKETS` if that is more.
pub const COUNTER_TOLERANCE: f64 = 0.001;
pub const COUNTER_TOLERANCE_PACKETS: u64 = 16;

/// A window's traffic counted by the engine's own drop counter and by the kernel's
/// interface and UDP counters, from before the sender starts to after it has stopped
/// and the receiver has settled: both sides stand still at both reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CounterCheck {
    pub processed_packets: u64,
    /// processed - delivered.
    pub kernel_dropped_packets: u64,
    pub engine_dropped_packets: u64,
    /// engine - kernel.
    pub difference_packets: i64,
    pub tolerance_packets: u64,
    /// False: the two differ by more than the tolerance. Such a window is flagged,
    /// not hidden.
    pub agrees: bool,
}

impl CounterCheck {
    pub fn new(processed: u64, delivered: u64, engine_dropped: u64) -> Self {
        let kernel_dropped = processed.saturating_sub(delivered);
        let tolerance =
            ((processed as f64 * COUNTER_TOLERANCE).ceil() as u64).max(COUNTER_TOLERANCE_PACKETS);
        let difference = engine_dropped as i64 - kernel_dropped as i64;
        Self {
            processed_packets: processed,
            kernel_dropped_packets: kernel_dropped,
            engine_dropped_packets: engine_dropped,
            difference_packets: difference,
            tolerance_packets: tolerance,
            agrees: difference.unsigned_abs() <= tolerance,
        }
    }

    /// "engine's counter 1234 vs processed - delivered 1230 (+4)", with the flag.
    pub fn describe(&self) -> String {
        format!(
            "engine's counter {} vs processed - delivered {} ({:+}{})",
            self.engine_dropped_packets,
            self.kernel_dropped_packets,
            self.difference_packets,
            if self.agrees {
                String::new()
            } else {
                format!(
                    "; DISAGREE: more than {} apart, of {} processed",
                    self.tolerance_packets, self.processed_packets
                )
            }
        )
    }
}

struct DevStats {
    rx_packets: u64,
    rx_dropped: u64,
    tx_packets: u64,
}

/// One interface's line of /proc/net/dev.
fn parse_dev(text: &str, interface: &str) -> anyhow::Result<DevStats> {
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != interface {
            continue;
        }
        let values: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|value| value.parse().ok())
            .collect();
        if values.len() < 16 {
            bail!("short /proc/net/dev line for {interface}");
        }
        return Ok(DevStats {
            rx_packets: values[1],
            rx_dropped: values[3],
            tx_packets: values[9],
        });
    }
    bail!("{interface} is not in /proc/net/dev")
}

/// The `name:` table of /proc/net/snmp (header line, then values).
fn parse_snmp(text: &str, name: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let prefix = format!("{name}:");
    let mut lines = text.lines().filter(|line| line.starts_with(&prefix));
    let (Some(header), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {name} table in /proc/net/snmp");
    };
    Ok(header
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(key, value)| Some((key.to_owned(), value.parse().ok()?)))
        .collect())
}

/// A running trafgen, stopped (SIGINT, then SIGKILL) when dropped. trafgen forks a
/// worker that sends the packets, so it runs in its own process group and the
/// signals go to the group.
struct Trafgen {
    child: Child,
    config: std::path::PathBuf,
}

impl Trafgen {
    fn start(bed: &Testbed, sources: (u32, u32)) -> anyhow::Result<Self> {
        let config =
            std::env::temp_dir().join(format!("microseg-bench-{}-trafgen.cfg", std::process::id()));
        // 14 (Ethernet) + 20 (IPv4) + 8 (UDP) + 18 bytes of padding = 60 bytes.
        let text = format!(
            "{{\n  eth(da={mac}, type=0x0800),\n  ipv4(saddr={first}, saddr=drnd({min}, {max}), daddr={server}, ttl=64),\n  udp(sport=40000, dport={port}),\n  fill(0x00, 18)\n}}\n",
            mac = bed.receiver_mac,
            first = Ipv4Addr::from(sources.0),
            min = sources.0,
            max = sources.1,
            server = SERVER_V4,
            port = ALLOWED_PORT,
        );
        std::fs::write(&config, text).context("writing the trafgen configuration")?;
        let child = Command::new("ip")
            .args(["netns", "exec", &bed.sender.name])
            .args(["taskset", "-c", "0", "trafgen", "--cpus", "1"])
            .args(["--no-sock-mem", "--notouch-irq", "-o", &bed.veth.a_name])
            // A 256 KiB TX ring (128 frames): with XDP on the receiving veth, frames
            // wait in the veth's ring holding socket memory, and trafgen's default
            // 512 KiB ring outgrows the default send buffer (sendto: EAGAIN).
            .args(["-S", "256KiB"])
            .arg("-i")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .context("starting trafgen (Debian package netsniff-ng)")?;
        Ok(Self { child, config })
    }

    /// Fails with trafgen's error output if it has already exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let mut error = String::new();
            if let Some(mut stderr) = self.child.stderr.take() {
                use std::io::Read;
                let _ = stderr.read_to_string(&mut error);
            }
            return Err(
                TrafgenDied(format!("trafgen exited early ({status}): {}", error.trim())).into(),
            );
        }
        Ok(())
    }
}

impl Drop for Trafgen {
    fn drop(&mut self) {
        let group = self.child.id() as libc::pid_t;
        // SAFETY: kill() only sends a signal, to the process group our own child
        // leads; the child is not reaped yet, so the group id cannot be reused.
        unsafe { libc::kill(-group, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut exited = false;
        while !exited && Instant::now() < deadline {
            exited = matches!(self.child.try_wait(), Ok(Some(_)));
            std::thread::sleep(Duration::from_millis(10));
        }
        if !exited {
            // SAFETY: as above: the leader is still unreaped.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.config);
    }
}

#[derive(Debug)]
struct TrafgenDied(String);

impl std::fmt::Display for TrafgenDied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TrafgenDied {}

/// An engine installed on the receiver, removed when dropped.
enum Installed {
    None,
    /// An INPUT chain in the receiver namespace whose last rule (number `drop_rule`)
    /// is the DROP; with `ipset`, the set it matches is destroyed after the flush.
    Iptables {
        namespace: String,
        drop_rule: u32,
        ipset: bool,
    },
    /// Table `msbench` of `family` ("ip" or "netdev").
    Nftables {
        namespace: String,
        family: &'static str,
    },
    Microseg(Box<MicrosegEngine>),
}

struct MicrosegEngine {
    datapath: Datapath,
    stop: Arc<AtomicBool>,
    drain: Option<std::thread::JoinHandle<()>>,
}

impl Drop for MicrosegEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        match self {
            Installed::None | Installed::Microseg(_) => {}
            Installed::Iptables {
                namespace, ipset, ..
            } => {
                let _ = Command::new("ip")
                    .args(["netns", "exec", namespace, "iptables", "-w", "-F", "INPUT"])
                    .output();
                if *ipset {
                    // The rule referring to the set is gone: the set can go.
                    let _ = Command::new("ip")
                        .args(["netns", "exec", namespace, "ipset", "destroy", IPSET_NAME])
                        .output();
                }
            }
            Installed::Nftables { namespace, family } => {
                let _ = Command::new("ip")
                    .args([
                        "netns", "exec", namespace, "nft", "delete", "table", family, NFT_TABLE,
                    ])
                    .output();
            }
        }
    }
}

impl Installed {
    fn install(
        engine: Engine,
        bed: &Testbed,
        rules: u32,
        state: &DatapathState,
    ) -> anyhow::Result<Self> {
        let clients = || (0..rules).map(|index| Family::V4.client(index));
        match engine {
            Engine::None => Ok(Installed::None),
            Engine::Iptables => {
                let installed = Installed::Iptables {
                    namespace: bed.receiver.name.clone(),
                    drop_rule: rules + 1,
                    ipset: false,
                };
                let mut input = String::from("*filter\n:INPUT ACCEPT [0:0]\n");
                for client in clients() {
                    let _ = writeln!(input, "-A INPUT -s {client}/32 -j ACCEPT");
                }
                input.push_str("-A INPUT -j DROP\nCOMMIT\n");
                bed.receiver
                    .exec_with_input(&["iptables-restore", "-w"], &input)?;
                Ok(installed)
            }
            Engine::IptablesIpset => {
                // The guard first: should iptables-restore fail, the set still goes.
                let installed = Installed::Iptables {
                    namespace: bed.receiver.name.clone(),
                    drop_rule: 2,
                    ipset: true,
                };
                let mut set = format!(
                    "create {IPSET_NAME} hash:ip family inet hashsize {} maxelem {}\n",
                    rules.max(64).next_power_of_two(),
                    rules.max(65_536)
                );
                for client in clients() {
                    let _ = writeln!(set, "add {IPSET_NAME} {client}");
                }
                bed.receiver
                    .exec_with_input(&["ipset", "restore", "-exist"], &set)?;
                let input = format!(
                    "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -m set --match-set {IPSET_NAME} src -j ACCEPT\n-A INPUT -j DROP\nCOMMIT\n"
                );
                bed.receiver
                    .exec_with_input(&["iptables-restore", "-w"], &input)?;
                Ok(installed)
            }
            Engine::Nftables | Engine::NftablesNetdev => {
                let netdev = engine == Engine::NftablesNetdev;
                let family = if netdev { "netdev" } else { "ip" };
                let installed = Installed::Nftables {
                    namespace: bed.receiver.name.clone(),
                    family,
                };
                // The netdev chain sees every frame: only IPv4 from outside the set
                // is dropped (ARP and the rest pass), as the ip family's input hook
                // only ever sees IPv4.
                let chain = if netdev {
                    format!(
                        "  chain ingress {{\n    type filter hook ingress device \"{device}\" priority -500; policy accept;\n    ip saddr @allowed accept\n    meta protocol ip counter name \"dropped\" drop\n  }}\n",
                        device = bed.veth.b_name
                    )
                } else {
                    "  chain input {\n    type filter hook input priority filter; policy drop;\n    ip saddr @allowed accept\n    counter name \"dropped\"\n  }\n".to_owned()
                };
                let mut input = format!(
                    "table {family} {NFT_TABLE} {{\n  set allowed {{ type ipv4_addr; }}\n  counter dropped {{ }}\n{chain}}}\n"
                );
                let all: Vec<String> = clients().map(|client| client.to_string()).collect();
                for chunk in all.chunks(10_000) {
                    let _ = writeln!(
                        input,
                        "add element {family} {NFT_TABLE} allowed {{ {} }}",
                        chunk.join(", ")
                    );
                }
                bed.receiver.exec_with_input(&["nft", "-f", "-"], &input)?;
                Ok(installed)
            }
            Engine::MicrosegXdp | Engine::MicrosegTc => {
                let mut datapath = Datapath::load(&LoadOptions {
                    pin_dir: None,
                    capacities: scenario::capacities(rules),
                })?;
                datapath.apply(&DatapathState::default(), state)?;
                let point = if engine == Engine::MicrosegXdp {
                    AttachPoint::Xdp(XdpAttachMode::Driver)
                } else {
                    AttachPoint::TcIngress
                };
                let interface = bed.veth.b_name.clone();
                bed.receiver.run_in(|| {
                    datapath
                        .attach(&interface, point)
                        .map_err(anyhow::Error::from)
                })?;
                // Drain deny events as the agent would, on the other core.
                let mut ring = datapath.take_events()?;
                let stop = Arc::new(AtomicBool::new(false));
                let drain = {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            while ring.next().is_some() {}
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    })
                };
                Ok(Installed::Microseg(Box::new(MicrosegEngine {
                    datapath,
                    stop,
                    drain: Some(drain),
                })))
            }
        }
    }

    /// The engine's own count of dropped packets so far.
    fn dropped(&mut self) -> anyhow::Result<Option<u64>> {
        match self {
            Installed::None => Ok(None),
            Installed::Microseg(engine) => {
                let counters = engine.datapath.maps()?.counters()?;
                Ok(Some(
                    counters.get(Counter::DeniedIngress) + counters.get(Counter::DeniedEgress),
                ))
            }
            Installed::Iptables {
                namespace,
                drop_rule,
                ..
            } => {
                // The DROP rule is the last one: list it alone.
                let number = drop_rule.to_string();
                let output = netns::run(
                    "ip",
                    &[
                        "netns", "exec", namespace, "iptables", "-w", "-nvxL", "INPUT", &number,
                    ],
                )?;
                let text = String::from_utf8_lossy(&output.stdout);
                let packets = iptables_drop_rule_packets(&text).with_context(|| {
                    format!("reading the iptables DROP rule's counter (rule {number}): {text}")
                })?;
                Ok(Some(packets))
            }
            Installed::Nftables { namespace, family } => {
                let output = netns::run(
                    "ip",
                    &[
                        "netns", "exec", namespace, "nft", "list", "counter", family, NFT_TABLE,
                        "dropped",
                    ],
                )?;
                let text = String::from_utf8_lossy(&output.stdout);
                let packets = nft_counter_packets(&text)
                    .with_context(|| format!("reading the nft counter: {text}"))?;
                Ok(Some(packets))
            }
        }
    }
}

/// The packet count of the rule `iptables -nvxL CHAIN N` lists, which must be a DROP
/// (so a rule number that is off is an error, not another rule's count):
/// "       7        420 DROP       0    --  *      *       0.0.0.0/0    0.0.0.0/0".
fn iptables_drop_rule_packets(listing: &str) -> Option<u64> {
    let mut lines = listing.lines().filter(|line| !line.trim().is_empty());
    let rule = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    let mut fields = rule.split_whitespace();
    let packets = fields.next()?.parse().ok()?;
    let _bytes = fields.next()?;
    (fields.next()? == "DROP").then_some(packets)
}

/// The packet count in `nft list counter FAMILY TABLE NAME`'s output
/// ("counter dropped {\n\t\tpackets 7 bytes 420\n\t}").
fn nft_counter_packets(listing: &str) -> Option<u64> {
    let mut words = listing.split_whitespace();
    words
        .by_ref()
        .skip_while(|word| *word != "packets")
        .nth(1)?
        .parse()
        .ok()
}

/// Attempts at one window before trafgen's death fails the run.
const WINDOW_ATTEMPTS: u32 = 5;

/// One window; if trafgen dies under it (it treats a transient send error, EAGAIN
/// on its TX ring, as fatal; on some hosts that happens every few windows), the
/// window is measured again, up to `WINDOW_ATTEMPTS` times. Each retry is printed.
fn window(
    bed: &mut Testbed,
    installed: &mut Installed,
    sources: (u32, u32),
    label: &'static str,
    config: &TrafficConfig,
) -> anyhow::Result<RunCounts> {
    let mut attempt = 1;
    loop {
        match window_once(bed, installed, sources, label, config) {
            Err(error)
                if attempt < WINDOW_ATTEMPTS && error.downcast_ref::<TrafgenDied>().is_some() =>
            {
                eprintln!("  ({label}: {error:#}; measuring the window again)");
                attempt += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

fn window_once(
    bed: &mut Testbed,
    installed: &mut Installed,
    sources: (u32, u32),
    label: &'static str,
    config: &TrafficConfig,
) -> anyhow::Result<RunCounts> {
    // Both sides standing still before the sender starts (the previous window's
    // sender has stopped and the receiver settled).
    let still_before = bed.snapshot()?;
    let engine_still_before = installed.dropped()?;
    let mut trafgen = Trafgen::start(bed, sources)?;
    std::thread::sleep(config.warmup);
    trafgen.check_running()?;
    // The engine's counter is read just before each interface snapshot, in the same
    // order at both ends, so the time the read takes cancels out of the rates.
    let engine_before = installed.dropped()?;
    let before = bed.snapshot()?;
    std::thread::sleep(config.window);
    let engine_after = installed.dropped()?;
    let after = bed.snapshot()?;
    trafgen.check_running()?;
    drop(trafgen);
    let still_after = bed.quiet_snapshot()?;
    let engine_still_after = installed.dropped()?;
    let seconds = (after.at - before.at).as_secs_f64().max(1e-6);
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
    let delta = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
    let processed_packets = after.tx_packets.saturating_sub(before.tx_packets);
    let delivered_packets = after.udp_delivered.saturating_sub(before.udp_delivered);
    if processed_packets == 0 {
        bail!("no packet left the sender in the {label} window");
    }
    let processed = processed_packets as f64 / seconds;
    let delivered = delivered_packets as f64 / seconds;
    let engine_dropped = delta(engine_before, engine_after);
    Ok(RunCounts {
        sources: label,
        window_s: seconds,
        processed_pps: processed,
        delivered_pps: delivered,
        dropped_pps: (processed - delivered).max(0.0),
        engine_dropped_pps: engine_dropped.map(|packets| packets as f64 / seconds),
        processed_packets,
        delivered_packets,
        dropped_packets: processed_packets.saturating_sub(delivered_packets),
        engine_dropped_packets: engine_dropped,
        counter_check: delta(engine_still_before, engine_still_after).map(|engine| {
            CounterCheck::new(
                still_after
                    .tx_packets
                    .saturating_sub(still_before.tx_packets),
                still_after
                    .udp_delivered
                    .saturating_sub(still_before.udp_delivered),
                engine,
            )
        }),
        receiver_rx_packets_pps: rate(before.rx_packets, after.rx_packets),
        receiver_rx_dropped_pps: rate(before.rx_dropped, after.rx_dropped),
        ns_per_packet: 1e9 / processed,
    })
}

pub fn run(config: &TrafficConfig, progress: &Progress) -> anyhow::Result<Vec<TrafficRow>> {
    progress.step("traffic: creating the namespaces and veth pair");
    let mut bed = Testbed::new().context("setting up the traffic test bed")?;
    let rounds = config.rounds.max(1);
    let mut rows = Vec::new();
    for &rules in &config.scales {
        progress.step(format!(
            "traffic: compiling {} rules",
            scenario::human(u64::from(rules))
        ));
        let scenario = Scenario::build(Family::V4, rules)?;
        let mut runs: Vec<Vec<TrafficRun>> = vec![Vec::new(); Engine::ALL.len()];
        for round in 0..rounds {
            // Round-robin, each round starting one engine further on.
            for position in 0..Engine::ALL.len() {
                let index = (round + position) % Engine::ALL.len();
                let engine = Engine::ALL[index];
                let what = format!(
                    "{} at {} rules, round {}/{rounds}",
                    engine.name(),
                    scenario::human(u64::from(rules)),
                    round + 1
                );
                let run = one_run(&mut bed, engine, rules, &scenario, config, progress, &what)
                    .with_context(|| what.clone())?;
                progress.line(format!(
                    "  {:<15} {:>5} rules, round {}/{rounds}: delivered {:>10.0} pps (of {:>10.0}), dropped {:>10.0} pps (of {:>10.0})",
                    engine.name(),
                    scenario::human(u64::from(rules)),
                    round + 1,
                    run.allowed.delivered_pps,
                    run.allowed.processed_pps,
                    if engine == Engine::None { 0.0 } else { run.denied.dropped_pps },
                    run.denied.processed_pps,
                ));
                for counts in [&run.allowed, &run.denied] {
                    if let Some(check) = &counts.counter_check {
                        progress.line(format!(
                            "  {:<15} {:>5} rules, round {}/{rounds}, {} sources: {}{}",
                            engine.name(),
                            scenario::human(u64::from(rules)),
                            round + 1,
                            counts.sources,
                            check.describe(),
                            if check.agrees { "" } else { "  <- flagged" },
                        ));
                    }
                }
                runs[index].push(TrafficRun {
                    round,
                    position,
                    ..run
                });
            }
        }
        for (engine, runs) in Engine::ALL.into_iter().zip(runs) {
            let row = TrafficRow::new(engine, rules, runs);
            if rounds > 1 {
                progress.line(format!(
                    "  {:<15} {:>5} rules, median of {}: delivered {:>10.0} pps [{:.0}..{:.0}], dropped {:>10.0} pps [{:.0}..{:.0}]",
                    row.engine,
                    scenario::human(u64::from(rules)),
                    row.rounds,
                    row.pps_delivered,
                    row.pps_delivered_min,
                    row.pps_delivered_max,
                    row.pps_dropped,
                    row.pps_dropped_min,
                    row.pps_dropped_max,
                ));
            }
            rows.push(row);
        }
    }
    drop(bed);
    Ok(rows)
}

/// Installs `engine`, measures allowed then denied sources, removes it, and checks
/// its verdicts.
fn one_run(
    bed: &mut Testbed,
    engine: Engine,
    rules: u32,
    scenario: &Scenario,
    config: &TrafficConfig,
    progress: &Progress,
    what: &str,
) -> anyhow::Result<TrafficRun> {
    progress.step(format!("traffic: installing {what}"));
    let start = Instant::now();
    let mut installed =
        Installed::install(engine, bed, rules, &scenario.state).context("installing")?;
    let setup_ms = start.elapsed().as_secs_f64() * 1e3;
    progress.step(format!("traffic: {what}, allowed sources"));
    let allowed = window(
        bed,
        &mut installed,
        scenario::v4_client_range(rules),
        "allowed",
        config,
    )
    .context("allowed sources")?;
    progress.step(format!("traffic: {what}, denied sources"));
    let denied = window(
        bed,
        &mut installed,
        scenario::v4_stranger_range(rules),
        "denied",
        config,
    )
    .context("denied sources")?;
    drop(installed);
    check_engine(engine, &allowed, &denied)?;
    Ok(TrafficRun {
        round: 0,
        position: 0,
        setup_ms,
        allowed,
        denied,
    })
}

/// An engine that lets denied sources through, or drops allowed ones, is broken:
/// fail. (Rates are never asserted.)
fn check_engine(engine: Engine, allowed: &RunCounts, denied: &RunCounts) -> anyhow::Result<()> {
    let filters = engine != Engine::None;
    // Allowed traffic: almost all delivered (a packet or two of the window edges may
    // be counted on one side only).
    if allowed.delivered_pps < allowed.processed_pps * 0.95 {
        bail!(
            "allowed sources: only {:.0} of {:.0} packets/s delivered",
            allowed.delivered_pps,
            allowed.processed_pps
        );
    }
    if filters && denied.delivered_pps > denied.processed_pps * 0.05 {
        bail!(
            "denied sources: {:.0} of {:.0} packets/s delivered",
            denied.delivered_pps,
            denied.processed_pps
        );
    }
    if !filters && denied.delivered_pps < denied.processed_pps * 0.95 {
        bail!("no filter, yet packets were lost");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_iptables_drop_rule_count_is_read_and_any_other_rule_refused() {
        // `iptables -w -nvxL INPUT 2` (iptables-nft 1.8.9) after 7 denied packets.
        let drop = "       7      420 DROP       0    --  *      *       0.0.0.0/0            0.0.0.0/0           \n";
        assert_eq!(iptables_drop_rule_packets(drop), Some(7));
        let accept = "       9      540 ACCEPT     0    --  *      *       10.1.0.1             0.0.0.0/0           \n";
        assert_eq!(iptables_drop_rule_packets(accept), None);
        // The whole chain (no rule number): not one rule.
        let chain = "Chain INPUT (policy ACCEPT 0 packets, 0 bytes)\n    pkts      bytes target     prot opt in     out     source               destination         \n       0        0 DROP       0    --  *      *       0.0.0.0/0            0.0.0.0/0\n";
        assert_eq!(iptables_drop_rule_packets(chain), None);
        assert_eq!(iptables_drop_rule_packets(""), None);
    }

    #[test]
    fn the_nft_counter_is_read() {
        // `nft list counter ip msbench dropped` (nftables 1.0.6).
        let listing =
            "table ip msbench {\n\tcounter dropped {\n\t\tpackets 431532 bytes 25891920\n\t}\n}\n";
        assert_eq!(nft_counter_packets(listing), Some(431_532));
        assert_eq!(nft_counter_packets("table ip msbench {\n}\n"), None);
    }

    #[test]
    fn equal_counts_agree_and_a_few_packets_apart_still_do() {
        let check = CounterCheck::new(900_000, 10, 899_990);
        assert!(check.agrees, "{check:?}");
        assert_eq!(check.difference_packets, 0);
        let check = CounterCheck::new(900_000, 10, 899_500);
        assert_eq!(
            (check.tolerance_packets, check.difference_packets),
            (900, -490)
        );
        assert!(check.agrees, "{check:?}");
    }

    #[test]
    fn counts_apart_by_more_than_the_tolerance_are_flagged() {
        // The engine counted 1% fewer drops than the kernel lost.
        let check = CounterCheck::new(900_000, 0, 891_000);
        assert!(!check.agrees, "{check:?}");
        assert!(
            check.describe().contains("DISAGREE"),
            "{}",
            check.describe()
        );
        // An engine counting drops that never happened (allowed sources, all
        // delivered) is flagged too, beyond the minimum of a few packets.
        let phantom = CounterCheck::new(10_000, 10_000, 40);
        assert!(!phantom.agrees, "{phantom:?}");
        let few = CounterCheck::new(10_000, 10_000, 3);
        assert!(few.agrees, "{few:?}");
    }
}
