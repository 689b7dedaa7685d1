//! Packet fuzzing through the real programs (BPF_PROG_TEST_RUN on XDP, TC ingress and
//! TC egress), for a time budget: `MICROSEG_FUZZ_SECONDS` (default 4; `cargo xtask
//! fuzz --seconds N` passes N), seed `MICROSEG_FUZZ_SEED` (default: from the clock;
//! printed, so a run can be repeated).
//!
//! State: one endpoint E (10.9.0.1 and fd09::1, id 1), ingress and egress enforced,
//! no allow rule. Frames: first every saved regression
//! (tests/data/fuzz-regressions/packets/*.hex), then valid seeds and every truncation
//! of each, then random and mutated frames (`microseg_tests::fuzz`) until the budget
//! is spent. Invariants, for every frame and program:
//! (a) the verdict is pass or drop, never another code (XDP_ABORTED, ...);
//! (b) no program passes a frame the reference classification says must drop: IP
//!     involving E that is not neighbour discovery, 3+ VLAN tags, a malformed IP
//!     header;
//! (c) the three programs agree (nothing in this state depends on the hook);
//! (d) a test run fails only for frames the kernel's test run refuses (see
//!     [`refused`]);
//! (e) every event the programs send decodes (known hook, verdict, drop reason).
//! A frame that breaks one is shrunk and written to
//! target/fuzz/artifacts/packets/<invariant>-<hash>.hex; copied into
//! tests/data/fuzz-regressions/packets/ it is replayed first by every run.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use microseg::datapath::{ProgramVerdict, events::DecodedEvent};
use microseg_common::event::EventVerdict;
use microseg_tests::{
    fuzz::{Class, Frame, FrameRng, classify, from_hex, next_frame, seed_frames, to_hex},
    harness::{ALL_PROGRAMS, Harness, StateBuilder},
};

const PROGRAM_NAMES: [&str; 3] = ["xdp", "tc-ingress", "tc-egress"];
const ETH_LEN: usize = 14;

/// Whether BPF_PROG_TEST_RUN refuses `frame` for program `index` (EINVAL): every
/// program, a frame without an Ethernet header; the skb programs (TC), also an IPv4
/// or IPv6 ethertype without a whole fixed IP header behind it (the kernel checks
/// that before it runs an skb program; real traffic can still bring such a frame to
/// TC ingress, which this test cannot exercise).
fn refused(index: usize, frame: &[u8]) -> bool {
    if frame.len() < ETH_LEN {
        return true;
    }
    let skb = index > 0;
    match [frame[12], frame[13]] {
        [0x08, 0x00] => skb && frame.len() < ETH_LEN + 20,
        [0x86, 0xdd] => skb && frame.len() < ETH_LEN + 40,
        _ => false,
    }
}
/// Distinct failures kept (shrunk and saved); all are counted.
const KEPT_FAILURES: usize = 20;

/// An invariant a frame broke.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Broken {
    /// (a) a return code other than pass or drop.
    Aborted,
    /// (b) a pass for a frame that must drop.
    Passed,
    /// (c) the programs disagree.
    Disagree,
    /// (d) a test run failed for a frame the kernel takes.
    TestRunFailed,
}

impl Broken {
    fn name(&self) -> &'static str {
        match self {
            Broken::Aborted => "aborted",
            Broken::Passed => "passed",
            Broken::Disagree => "disagree",
            Broken::TestRunFailed => "test-run-failed",
        }
    }
}

/// What the programs did with one frame.
struct Judged {
    class: Class,
    verdicts: [Option<ProgramVerdict>; 3],
    errors: Vec<String>,
    broken: Vec<Broken>,
}

impl Judged {
    fn describe(&self) -> String {
        let verdicts: Vec<String> = PROGRAM_NAMES
            .iter()
            .zip(&self.verdicts)
            .map(|(name, verdict)| match verdict {
                Some(verdict) => format!("{name} {verdict:?}"),
                None => format!("{name} (not run)"),
            })
            .collect();
        let mut text = format!("class {:?}; {}", self.class, verdicts.join(", "));
        for error in &self.errors {
            text.push_str(&format!("; {error}"));
        }
        text
    }
}

fn judge(harness: &Harness, frame: &[u8]) -> Judged {
    let class = classify(frame);
    let mut judged = Judged {
        class,
        verdicts: [None; 3],
        errors: Vec::new(),
        broken: Vec::new(),
    };
    for (index, point) in ALL_PROGRAMS.iter().enumerate() {
        match harness.datapath.test_run(*point, frame) {
            Ok(verdict) => judged.verdicts[index] = Some(verdict),
            Err(_) if refused(index, frame) => {}
            Err(error) => {
                judged
                    .errors
                    .push(format!("{}: {error:#}", PROGRAM_NAMES[index]));
                judged.broken.push(Broken::TestRunFailed);
            }
        }
    }
    let ran: Vec<ProgramVerdict> = judged.verdicts.iter().flatten().copied().collect();
    if ran.iter().any(|v| matches!(v, ProgramVerdict::Other(_))) {
        judged.broken.push(Broken::Aborted);
    }
    if class.must_drop() && ran.contains(&ProgramVerdict::Pass) {
        judged.broken.push(Broken::Passed);
    }
    if ran.iter().any(|v| *v != ran[0]) {
        judged.broken.push(Broken::Disagree);
    }
    judged.broken.dedup();
    judged
}

/// Shrinks `frame` while it still breaks `broken` (with the same class): cuts from
/// the end, then removes single bytes from the end backwards.
fn shrink(harness: &Harness, frame: &[u8], broken: &Broken) -> Vec<u8> {
    let class = classify(frame);
    let still = |candidate: &[u8]| {
        let judged = judge(harness, candidate);
        judged.class == class && judged.broken.contains(broken)
    };
    let mut best = frame.to_vec();
    let mut len = best.len();
    while len > 0 && still(&best[..len - 1]) {
        len -= 1;
    }
    best.truncate(len);
    let mut at = best.len();
    let mut attempts = 0;
    while at > 0 && attempts < 2000 {
        at -= 1;
        attempts += 1;
        let mut candidate = best.clone();
        candidate.remove(at);
        if still(&candidate) {
            best = candidate;
        }
    }
    best
}

/// A frame that broke an invariant, as it will be reported and saved.
struct Failure {
    origin: String,
    broken: Broken,
    frame: Vec<u8>,
    description: String,
    /// A saved regression (not saved again).
    regression: bool,
}

#[derive(Default)]
struct Stats {
    frames: u64,
    runs: u64,
    not_applicable: u64,
    /// Per class: frames, and frames some program passed.
    classes: BTreeMap<Class, (u64, u64)>,
    broken: BTreeMap<Broken, u64>,
    events: u64,
    undecodable_events: u64,
    /// Drop events by reason: which of the programs' drop paths the frames reached.
    reasons: BTreeMap<&'static str, u64>,
    failures: Vec<Failure>,
}

impl Stats {
    /// Runs one frame and records what it did. A saved regression that still breaks
    /// an invariant is reported as it is; a new frame is shrunk and kept once per
    /// (invariant, class).
    fn record(&mut self, harness: &Harness, origin: &str, frame: &[u8], regression: bool) {
        let judged = judge(harness, frame);
        self.frames += 1;
        let ran = judged.verdicts.iter().flatten().count() as u64;
        self.runs += ran;
        self.not_applicable += (0..3).filter(|index| refused(*index, frame)).count() as u64;
        let entry = self.classes.entry(judged.class).or_default();
        entry.0 += 1;
        if judged.verdicts.contains(&Some(ProgramVerdict::Pass)) {
            entry.1 += 1;
        }
        for broken in &judged.broken {
            *self.broken.entry(broken.clone()).or_default() += 1;
            let seen = self.failures.iter().any(|f| {
                !f.regression && f.broken == *broken && classify(&f.frame) == judged.class
            });
            let kept = self.failures.iter().filter(|f| !f.regression).count();
            if regression {
                self.failures.push(Failure {
                    origin: origin.to_owned(),
                    broken: broken.clone(),
                    frame: frame.to_vec(),
                    description: judged.describe(),
                    regression,
                });
                continue;
            }
            if seen || kept >= KEPT_FAILURES {
                continue;
            }
            let small = shrink(harness, frame, broken);
            let description = judge(harness, &small).describe();
            self.failures.push(Failure {
                origin: origin.to_owned(),
                broken: broken.clone(),
                frame: small,
                description,
                regression,
            });
        }
    }

    fn drain_events(&mut self, harness: &mut Harness) {
        for event in harness.events() {
            self.events += 1;
            if !event_decodes(&event) {
                self.undecodable_events += 1;
            }
            if let Some(reason) = event.reason {
                *self.reasons.entry(reason.name()).or_default() += 1;
            }
        }
    }
}

/// (e): every field the programs set is a known code.
fn event_decodes(event: &DecodedEvent) -> bool {
    event.hook.is_some()
        && match event.verdict {
            Some(EventVerdict::Dropped) => event.reason.is_some(),
            Some(_) => true,
            None => false,
        }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The saved frames, by file name.
fn regressions() -> Vec<(String, Vec<u8>)> {
    let dir = workspace_root().join("tests/data/fuzz-regressions/packets");
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|entry| entry.expect("directory entry").path())
            .filter(|path| path.extension().is_some_and(|e| e == "hex"))
            .collect(),
        Err(_) => return Vec::new(),
    };
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("reading a saved frame");
            let frame = from_hex(&text)
                .unwrap_or_else(|e| panic!("{}: not a hex frame: {e}", path.display()));
            let name = path.file_name().expect("file name").to_string_lossy();
            (name.into_owned(), frame)
        })
        .collect()
}

fn seconds_budget() -> f64 {
    match std::env::var("MICROSEG_FUZZ_SECONDS") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("MICROSEG_FUZZ_SECONDS={text:?} is not a number")),
        Err(_) => 4.0,
    }
}

fn fuzz_seed() -> u64 {
    match std::env::var("MICROSEG_FUZZ_SEED") {
        Ok(text) => {
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("MICROSEG_FUZZ_SEED={text:?} is not a number"))
        }
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (now.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
        }
    }
}

/// Writes each new failure to target/fuzz/artifacts/packets/; returns the paths
/// (none for saved regressions).
fn save(failures: &[Failure], seed: u64) -> Vec<Option<PathBuf>> {
    let dir = workspace_root().join("target/fuzz/artifacts/packets");
    failures
        .iter()
        .map(|failure| {
            if failure.regression {
                return None;
            }
            std::fs::create_dir_all(&dir).expect("creating the artifacts directory");
            // FNV-1a of the frame: a stable name.
            let hash = failure.frame.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
            });
            let path = dir.join(format!("{}-{hash:016x}.hex", failure.broken.name()));
            let text = format!(
                "# {} ({}, seed {seed:#x}): {}\n{}\n",
                failure.broken.name(),
                failure.origin,
                failure.description,
                to_hex(&failure.frame)
            );
            std::fs::write(&path, text).expect("writing a failing frame");
            Some(path)
        })
        .collect()
}

#[test]
fn fuzzed_frames_are_never_aborted_and_never_pass_when_they_must_be_denied() {
    if !microseg_tests::kernel_available("datapath_fuzz") {
        return;
    }
    let budget = Duration::from_secs_f64(seconds_budget());
    let seed = fuzz_seed();
    let mut harness = Harness::new();
    harness
        .apply(
            StateBuilder::default()
                .endpoint("10.9.0.1", 1, true, true, false)
                .endpoint("fd09::1", 1, true, true, false)
                .build(),
        )
        .expect("applying the state");
    let started = Instant::now();
    let mut stats = Stats::default();

    let saved = regressions();
    for (name, frame) in &saved {
        stats.record(&harness, &format!("regression {name}"), frame, true);
    }
    stats.drain_events(&mut harness);

    let seeds = seed_frames();
    let mut truncations = 0u64;
    for (index, seed_frame) in seeds.iter().enumerate() {
        let origin = format!("seed {index}");
        for len in (0..=seed_frame.bytes.len()).rev() {
            stats.record(&harness, &origin, &seed_frame.bytes[..len], false);
            truncations += 1;
        }
        stats.drain_events(&mut harness);
    }

    let mut rng = FrameRng::new(seed);
    let mut random = 0u64;
    while started.elapsed() < budget {
        for _ in 0..256 {
            let frame: Frame = next_frame(&mut rng, &seeds);
            random += 1;
            stats.record(
                &harness,
                &format!("random frame {random}"),
                &frame.bytes,
                false,
            );
        }
        stats.drain_events(&mut harness);
    }
    let elapsed = started.elapsed().as_secs_f64();

    println!(
        "packet fuzz: seed {seed:#x}, {} saved regressions, {} seeds ({truncations} frames with every truncation), {random} random frames",
        saved.len(),
        seeds.len()
    );
    println!(
        "packet fuzz: {} frames in {elapsed:.1} s ({:.0} frames/s, {} program runs, {} runs refused by the kernel's test run)",
        stats.frames,
        stats.frames as f64 / elapsed,
        stats.runs,
        stats.not_applicable
    );
    for class in Class::ALL {
        let (frames, passed) = stats.classes.get(&class).copied().unwrap_or_default();
        let rule = if class.must_drop() {
            "must drop"
        } else {
            "not asserted"
        };
        println!(
            "packet fuzz:   {:<26} {frames:>9} frames, {passed:>9} passed by some program ({rule})",
            class.name()
        );
    }
    let must_deny = stats.classes.get(&Class::MustDeny).map_or(0, |c| c.0);
    let count = |broken: Broken| stats.broken.get(&broken).copied().unwrap_or(0);
    println!(
        "packet fuzz: invariants: (a) other codes {}; (b) passes that must drop {} ({must_deny} must-deny frames checked); (c) disagreements {}; (d) failed test runs {}; (e) {} events, {} undecodable",
        count(Broken::Aborted),
        count(Broken::Passed),
        count(Broken::Disagree),
        count(Broken::TestRunFailed),
        stats.events,
        stats.undecodable_events
    );

    let reasons: Vec<String> = stats
        .reasons
        .iter()
        .map(|(reason, count)| format!("{reason} {count}"))
        .collect();
    println!("packet fuzz: drop events by reason: {}", reasons.join(", "));

    let paths = save(&stats.failures, seed);
    for (failure, path) in stats.failures.iter().zip(&paths) {
        let saved = match path {
            Some(path) => format!("saved to {}", path.display()),
            None => "a saved regression: still fails".to_owned(),
        };
        println!(
            "packet fuzz: FAILED {} ({}): {}\n  frame {}\n  {saved}",
            failure.broken.name(),
            failure.origin,
            failure.description,
            to_hex(&failure.frame).replace('\n', ""),
        );
    }
    let regressions_failing = stats.failures.iter().filter(|f| f.regression).count();
    assert!(
        stats.failures.is_empty() && stats.undecodable_events == 0,
        "{} frames broke an invariant ({regressions_failing} of {} saved regressions still fail), {} undecodable events; seed {seed:#x}; new frames in target/fuzz/artifacts/packets/ (copy one to tests/data/fuzz-regressions/packets/ to replay it first in every run)",
        stats.broken.values().sum::<u64>(),
        saved.len(),
        stats.undecodable_events
    );
}
