//! `cargo xtask fuzz [--seconds N] [--target NAME]`: the loaders' libFuzzer targets
//! (crate `fuzz/`, its own workspace) and the packet fuzzer (test `datapath_fuzz` of
//! microseg-tests), each for N seconds; and the short run `cargo xtask test` makes of
//! the libFuzzer targets. See fuzz/README.md.
//!
//! No cargo-fuzz: the targets are built with `cargo +nightly build` and the
//! sanitizer-coverage flags cargo-fuzz uses (without AddressSanitizer: the loaders are
//! safe Rust), for the host target explicitly so that build scripts and proc macros
//! are not instrumented.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};

/// The libFuzzer targets (fuzz/fuzz_targets/<name>.rs).
pub const LOADER_TARGETS: [&str; 2] = ["policy_files", "agent_objects"];
/// The packet fuzzer: not a libFuzzer target but a test run for a time budget.
pub const PACKET_TARGET: &str = "packets";
/// Seconds each libFuzzer target runs in `cargo xtask test`.
pub const SMOKE_SECONDS: u64 = 5;

/// cargo-fuzz's flags for `-s none` (sanitizer coverage, `cfg(fuzzing)`, checks on).
const RUSTFLAGS: [&str; 9] = [
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg fuzzing",
    "-Cdebug-assertions",
    "-Coverflow-checks",
    // Frame pointers: libFuzzer's stack traces of a crash.
    "-Cforce-frame-pointers=yes",
];

/// libFuzzer options: inputs up to 16 KiB (policy files), 10 s per input before it is
/// reported as a hang, 2 GiB before it is reported as running out of memory.
const LIBFUZZER_OPTIONS: [&str; 4] = [
    "-max_len=16384",
    "-timeout=10",
    "-rss_limit_mb=2048",
    "-print_final_stats=1",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_owned()
}

fn fuzz_dir() -> PathBuf {
    root().join("target/fuzz")
}

fn host_triple() -> anyhow::Result<String> {
    let output = Command::new("rustc")
        .args(["+nightly", "-vV"])
        .output()
        .context("running rustc +nightly -vV (is the nightly toolchain installed?)")?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV printed no host")
}

/// Builds every libFuzzer target (once; cargo makes a repeat a no-op); returns where
/// the binaries are and how long it took.
pub fn build() -> anyhow::Result<(PathBuf, Duration)> {
    let started = Instant::now();
    let host = host_triple()?;
    let manifest = root().join("fuzz/Cargo.toml");
    let status = Command::new("cargo")
        .args(["+nightly", "build", "--release", "--bins"])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(fuzz_dir())
        .args(["--target", &host])
        // The loaders do not need the eBPF object.
        .env("AYA_BUILD_SKIP", "1")
        .env("RUSTFLAGS", RUSTFLAGS.join(" "))
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .context("running cargo +nightly build for the fuzz targets")?;
    ensure!(
        status.success(),
        "building the fuzz targets failed ({status})"
    );
    Ok((fuzz_dir().join(host).join("release"), started.elapsed()))
}

/// What one fuzz target's run did.
#[derive(Debug, Default)]
pub struct Report {
    pub target: String,
    pub seconds: u64,
    /// Inputs executed (libFuzzer's `stat::number_of_executed_units`), or frames.
    pub executions: u64,
    /// Inputs in the corpus after the run (loader targets).
    pub corpus: usize,
    /// Inputs kept when the corpus was minimised after the run (`cargo xtask fuzz`).
    pub merged: Option<usize>,
    /// libFuzzer's last status (`cov: ... ft: ... corp: ...`), or the packet
    /// fuzzer's summary lines.
    pub details: Vec<String>,
    /// Crash, hang and out-of-memory inputs this run wrote.
    pub crashes: Vec<PathBuf>,
    pub ok: bool,
    pub log: Option<PathBuf>,
}

impl Report {
    fn print(&self) {
        let rate = self.executions as f64 / self.seconds.max(1) as f64;
        let result = if self.ok { "ok" } else { "FAILED" };
        if self.target == PACKET_TARGET {
            println!(
                "fuzz {:<14} {:>10} frames ({rate:.0}/s) in {} s: {result}",
                self.target, self.executions, self.seconds
            );
        } else {
            let merged = self
                .merged
                .map(|kept| format!(" ({kept} after minimising)"))
                .unwrap_or_default();
            println!(
                "fuzz {:<14} {:>10} executions ({rate:.0}/s) in {} s, corpus {} inputs{merged}, {} crashes: {result}",
                self.target,
                self.executions,
                self.seconds,
                self.corpus,
                self.crashes.len()
            );
        }
        for line in &self.details {
            println!("     {line}");
        }
        for crash in &self.crashes {
            println!("     crash input: {}", crash.display());
        }
        if let (false, Some(log)) = (self.ok, &self.log) {
            println!("     log: {}", log.display());
        }
    }
}

/// The input libFuzzer feeds a target for a file: a selector byte (odd: the text is
/// loaded as `fuzzed.json`, even: as `fuzzed.yaml`), then the text.
fn seed_input(path: &Path, text: &[u8]) -> Vec<u8> {
    let json = path.extension().is_some_and(|e| e == "json");
    let mut input = vec![u8::from(json)];
    input.extend_from_slice(text);
    input
}

fn files_under(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            files_under(&path, files);
        } else if path.is_file() {
            files.push(path);
        }
    }
}

/// Seeds `corpus`: the examples' YAML files, tests/data/fuzz-seeds/, and the saved
/// regressions of `target` (already inputs). Returns how many seeds there are.
fn seed_corpus(target: &str, corpus: &Path) -> anyhow::Result<usize> {
    let root = root();
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    let mut texts = Vec::new();
    files_under(&root.join("examples"), &mut texts);
    texts.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files_under(&root.join("tests/data/fuzz-seeds"), &mut texts);
    for path in texts {
        let text = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let relative = path.strip_prefix(&root).unwrap_or(&path);
        seeds.push((
            format!("seed-{}", relative.display()).replace('/', "-"),
            seed_input(&path, &text),
        ));
    }
    let mut regressions = Vec::new();
    files_under(
        &root.join("tests/data/fuzz-regressions").join(target),
        &mut regressions,
    );
    for path in regressions {
        let input = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        seeds.push((format!("regression-{name}"), input));
    }
    fs::create_dir_all(corpus)?;
    for (name, input) in &seeds {
        let path = corpus.join(name);
        if fs::read(&path).ok().as_ref() != Some(input) {
            fs::write(&path, input).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(seeds.len())
}

fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Runs libFuzzer target `target` from `bin_dir` for `seconds`; its output goes to
/// target/fuzz/logs/<target>.log.
pub fn run_loader_target(bin_dir: &Path, target: &str, seconds: u64) -> anyhow::Result<Report> {
    let corpus = fuzz_dir().join("corpus").join(target);
    let artifacts = fuzz_dir().join("artifacts").join(target);
    let logs = fuzz_dir().join("logs");
    fs::create_dir_all(&artifacts)?;
    fs::create_dir_all(&logs)?;
    seed_corpus(target, &corpus)?;
    let before = listing(&artifacts);
    let log_path = logs.join(format!("{target}.log"));
    let log = fs::File::create(&log_path)?;
    let binary = bin_dir.join(target);
    let status = Command::new(&binary)
        .arg(format!("-max_total_time={seconds}"))
        .args(LIBFUZZER_OPTIONS)
        // The trailing slash makes it a directory: crash-<sha1> inside.
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .env("RUST_BACKTRACE", "1")
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("running {}", binary.display()))?;
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let executions = text
        .lines()
        .find_map(|line| line.strip_prefix("stat::number_of_executed_units:"))
        .or_else(|| {
            text.lines()
                .rev()
                .find_map(|line| line.strip_prefix("Done ")?.split_whitespace().next())
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let status_line = text
        .lines()
        .rev()
        .find(|line| line.starts_with('#') && line.contains("cov:"))
        .map(|line| format!("libFuzzer: {line}"));
    // What libFuzzer says it wrote (an input found again has the same name as
    // before), and any new file.
    let written = text
        .lines()
        .filter_map(|line| {
            line.split_once("Test unit written to ")
                .map(|(_, path)| path)
        })
        .map(|path| PathBuf::from(path.trim()));
    let crashes: BTreeSet<PathBuf> = written
        .chain(listing(&artifacts).difference(&before).cloned())
        .filter(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            ["crash-", "timeout-", "oom-", "leak-"]
                .iter()
                .any(|prefix| name.starts_with(prefix))
        })
        .collect();
    let crashes: Vec<PathBuf> = crashes.into_iter().collect();
    let ok = status.success() && crashes.is_empty();
    let mut details: Vec<String> = status_line.into_iter().collect();
    if !ok {
        // The panic message and backtrace, or libFuzzer's own report.
        let lines: Vec<&str> = text.lines().collect();
        let start = lines
            .iter()
            .position(|line| line.contains("panicked at") || line.starts_with("=="))
            .unwrap_or(lines.len().saturating_sub(40));
        details.extend(
            lines[start..]
                .iter()
                .take(60)
                .map(|line| (*line).to_owned()),
        );
        details.push(format!("libFuzzer exited with {status}"));
    }
    Ok(Report {
        target: target.to_owned(),
        seconds,
        executions,
        corpus: listing(&corpus).len(),
        merged: None,
        details,
        crashes,
        ok,
        log: Some(log_path),
    })
}

/// Minimises target `target`'s corpus (libFuzzer's `-merge=1`: the inputs that keep
/// its coverage), so that long runs do not leave a corpus that takes the next short
/// run its whole budget to load. Returns how many inputs were kept.
pub fn minimise_corpus(bin_dir: &Path, target: &str) -> anyhow::Result<usize> {
    let corpus = fuzz_dir().join("corpus").join(target);
    let merged = fuzz_dir().join("corpus").join(format!("{target}.merging"));
    let _ = fs::remove_dir_all(&merged);
    fs::create_dir_all(&merged)?;
    let log = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(fuzz_dir().join("logs").join(format!("{target}.log")))?;
    let status = Command::new(bin_dir.join(target))
        .arg("-merge=1")
        .args(LIBFUZZER_OPTIONS)
        .arg(&merged)
        .arg(&corpus)
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()?;
    ensure!(status.success(), "minimising the corpus failed ({status})");
    let kept = listing(&merged).len();
    ensure!(kept > 0, "minimising the corpus kept nothing");
    fs::remove_dir_all(&corpus)?;
    fs::rename(&merged, &corpus)?;
    Ok(kept)
}

/// Runs the packet fuzzer (needs root, the eBPF build) for `seconds`.
pub fn run_packet_fuzzer(seconds: u64) -> anyhow::Result<Report> {
    let mut child = Command::new("cargo")
        .args([
            "test",
            "--package",
            "microseg-tests",
            "--test",
            "datapath_fuzz",
            "--",
            "--nocapture",
        ])
        .current_dir(root())
        .env("MICROSEG_FUZZ_SECONDS", seconds.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test for the packet fuzzer")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut details = Vec::new();
    let mut executions = 0;
    let mut skipped = false;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("packet fuzz: ") {
            if let Some(frames) = summary.split(" frames in ").next()
                && let Ok(frames) = frames.trim().parse()
            {
                executions = frames;
            }
            if !summary.starts_with(' ') {
                details.push(summary.to_owned());
            }
        }
        skipped |= line.contains("SKIPPED");
    }
    let status = child.wait()?;
    if executions == 0 && status.success() {
        skipped = true;
    }
    if skipped {
        details.push("skipped: needs root and BPF (see the test's output)".to_owned());
    }
    Ok(Report {
        target: PACKET_TARGET.to_owned(),
        seconds,
        executions,
        corpus: 0,
        merged: None,
        details,
        crashes: Vec::new(),
        ok: status.success() && !skipped,
        log: None,
    })
}

/// `cargo xtask fuzz`: every target (or `only`) for `seconds` each.
pub fn run(seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    let known: Vec<&str> = LOADER_TARGETS
        .iter()
        .copied()
        .chain([PACKET_TARGET])
        .collect();
    if let Some(name) = only
        && !known.contains(&name)
    {
        bail!(
            "unknown fuzz target {name:?} (targets: {})",
            known.join(", ")
        );
    }
    let wanted = |name: &str| only.is_none_or(|only| only == name);
    let mut reports = Vec::new();
    if LOADER_TARGETS.iter().any(|t| wanted(t)) {
        let (bin_dir, took) = build()?;
        println!(
            "fuzz: built the libFuzzer targets in {:.1} s",
            took.as_secs_f64()
        );
        for target in LOADER_TARGETS.iter().filter(|t| wanted(t)) {
            println!("fuzz: running {target} for {seconds} s");
            let mut report = run_loader_target(&bin_dir, target, seconds)?;
            if report.ok {
                report.merged = Some(minimise_corpus(&bin_dir, target)?);
            }
            reports.push(report);
        }
    }
    if wanted(PACKET_TARGET) {
        println!("fuzz: running the packet fuzzer for {seconds} s");
        reports.push(run_packet_fuzzer(seconds)?);
    }
    println!();
    for report in &reports {
        report.print();
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.target.as_str())
        .collect();
    if !failed.is_empty() {
        println!(
            "\nA crash input becomes a regression test: copy it to tests/data/fuzz-regressions/<target>/ (see fuzz/README.md)."
        );
        bail!("fuzzing found problems in: {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo xtask test`'s run: builds the libFuzzer targets, runs each for
/// [`SMOKE_SECONDS`]; returns (passed, failed), one per target.
pub fn smoke() -> (u64, u64) {
    let (bin_dir, took) = match build() {
        Ok(built) => built,
        Err(error) => {
            eprintln!("fuzz: {error:#}");
            return (0, LOADER_TARGETS.len() as u64);
        }
    };
    println!(
        "fuzz: built the libFuzzer targets in {:.1} s",
        took.as_secs_f64()
    );
    let (mut passed, mut failed) = (0, 0);
    for target in LOADER_TARGETS {
        match run_loader_target(&bin_dir, target, SMOKE_SECONDS) {
            Ok(report) => {
                report.print();
                if report.ok {
                    passed += 1;
                } else {
                    failed += 1;
                }
            }
            Err(error) => {
                eprintln!("fuzz {target}: {error:#}");
                failed += 1;
            }
        }
    }
    (passed, failed)
}
