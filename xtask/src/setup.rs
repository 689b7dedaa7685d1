//! Idempotent machine set-up: each step checks before it installs.

use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// bpf-linker 0.10.0 is the last release that uses the nightly compiler's own LLVM;
/// later ones need system LLVM development libraries Debian 12 lacks.
const BPF_LINKER_VERSION: &str = "0.10.0";

/// Debian packages the demo needs: `ip`, `nsenter`, `sysctl` and `ping` to build and
/// probe its namespaces.
const DEMO_PACKAGES: &[&str] = &["iproute2", "procps", "util-linux", "iputils-ping"];

/// Debian packages the tests and benchmarks use beyond the demo's: packet filters to
/// compare against (iptables, its ipset sets, nftables), `bpftool`, a packet
/// generator, and a C++ compiler for libFuzzer (built from source by
/// libfuzzer-sys).
const TEST_PACKAGES: &[&str] = &[
    "g++",
    "iptables",
    "ipset",
    "nftables",
    "bpftool",
    "netsniff-ng",
    // `microseg graph`'s rendering test: `dot` renders the DOT output, a headless
    // browser (/usr/bin/chromium-headless-shell) screenshots the HTML page.
    "graphviz",
    "chromium-headless-shell",
    // A font, so that both draw text on a minimal system.
    "fonts-dejavu-core",
    // The CNI reference plugins (bridge, host-local under /usr/lib/cni) that
    // e2e_cni chains microseg-cni after, as a runtime would.
    "containernetworking-plugins",
    // A gRPC C-core client (Python's grpcio), as users' scripts talk to Hubble's
    // socket: e2e_hubble checks what such clients send as `:authority`.
    "python3-grpcio",
];

/// What a command needs installed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// `cargo xtask demo`: the build and the demo's tools only.
    Demo,
    /// Tests, benchmarks and fuzzing: everything.
    Everything,
}

pub fn run(needs: Needs) -> anyhow::Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    let mut packages = DEMO_PACKAGES.to_vec();
    if needs == Needs::Everything {
        packages.extend_from_slice(TEST_PACKAGES);
    }
    ensure_debian_packages(&packages)?;
    ensure_bpffs()?;
    Ok(())
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn checked(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup (is rustup installed?)")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!("setup: installing rust-src for the nightly toolchain");
    checked(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
    checked(Command::new("cargo").args([
        "+nightly",
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--force",
    ]))
}

fn ensure_debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    checked(Command::new("apt-get").args(["update", "-qq"]))?;
    checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    if quiet(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])) {
        eprintln!("setup: mounted bpffs at /sys/fs/bpf");
        return Ok(());
    }
    // Without root this fails; the kernel tests then report why (and fail under CI).
    eprintln!("setup: could not mount bpffs at /sys/fs/bpf (not root?)");
    Ok(())
}
