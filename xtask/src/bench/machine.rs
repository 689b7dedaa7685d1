//! What the figures were measured on: CPU, kernel, cores, memory, load, tool versions.

use std::process::Command;

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_total_kib: u64,
    /// 1-minute load average when the benchmark started and ended: other work on the
    /// machine (builds) shows here and in the figures.
    pub load_average_start: f64,
    pub load_average_end: f64,
    pub build_profile: &'static str,
    pub trafgen: String,
    pub iptables: String,
    pub ipset: String,
    pub nft: String,
}

pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|output| {
            let text = if output.stdout.is_empty() {
                output.stderr
            } else {
                output.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

pub fn describe() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_total_kib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Machine {
        cpu_model,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        memory_total_kib,
        load_average_start: load_average(),
        load_average_end: 0.0,
        build_profile: if cfg!(debug_assertions) {
            "dev (unoptimized userspace; kernel-side figures are unaffected)"
        } else {
            "release"
        },
        trafgen: first_line("trafgen", &["-v"]),
        iptables: first_line("iptables", &["-V"]),
        ipset: first_line("ipset", &["version"]),
        nft: first_line("nft", &["-v"]),
    }
}

/// Fails unless every tool the benchmark runs is installed.
pub fn check_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        "ip",
        "taskset",
        "trafgen",
        "iptables",
        "iptables-restore",
        "ipset",
        "nft",
    ]
    .into_iter()
    .filter(|tool| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |output| !output.status.success())
    })
    .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "missing tools: {} (`cargo xtask setup` installs them)",
            missing.join(", ")
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("the benchmark loads BPF programs and creates namespaces: run it as root");
    }
    Ok(())
}
