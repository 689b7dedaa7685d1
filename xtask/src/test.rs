//! `cargo xtask test`: every test in the workspace (unit, kernel, end-to-end), with a
//! closing count of what ran.
//!
//! The count comes from `cargo test`'s output, both streams: libtest's `test result:`
//! lines on stdout, and on stderr cargo's own word on what failed beyond them: a test
//! binary that crashed before its summary (`error: test failed, to rerun pass ...`
//! with no FAILED summary to match), a build that failed (`error: could not
//! compile ...`). A run that failed while its output names nothing counts as one
//! failure, so the closing line never reads "0 failed" under a failing exit status.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Command, Stdio},
    sync::mpsc,
};

use anyhow::bail;

/// Environment variable through which tests record skips (`microseg_tests::skip`).
const SKIP_LOG_ENV: &str = "MICROSEG_SKIP_LOG";

pub fn run() -> anyhow::Result<()> {
    let skip_log =
        std::env::temp_dir().join(format!("microseg-skipped-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&skip_log);
    let mut child = Command::new("cargo")
        .args([
            "test",
            "--workspace",
            "--exclude",
            "microseg-ebpf",
            "--no-fail-fast",
        ])
        // Passing tests' output too: conformance counts by tag and measured figures.
        .args(["--", "--show-output"])
        // One test binary's tests run in parallel; the kernel and netns tests create
        // uniquely named namespaces and interfaces, so they do not collide.
        .env(SKIP_LOG_ENV, &skip_log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // One reader per stream, lines merged in the order they arrive: each line is
    // echoed to the stream it came from and read for the count.
    let (lines_tx, lines) = mpsc::channel();
    let readers = [
        forward_lines(child.stdout.take(), Stream::Stdout, lines_tx.clone()),
        forward_lines(child.stderr.take(), Stream::Stderr, lines_tx),
    ];
    let mut output = CargoTestOutput::default();
    for (stream, line) in lines {
        match stream {
            Stream::Stdout => println!("{line}"),
            Stream::Stderr => eprintln!("{line}"),
        }
        output.observe(stream, &line);
    }
    for reader in readers {
        let _ = reader.join();
    }
    let status = child.wait()?;
    let mut counts = output.counts(status.success(), &status.to_string());
    // Tests that returned early after recording a skip reported "ok": they are
    // skipped, not passed.
    let skips: Vec<String> = std::fs::read_to_string(&skip_log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    let _ = std::fs::remove_file(&skip_log);
    for skip in &skips {
        println!("skipped: {}", skip.replace('\t', ": "));
    }
    let under_ci = std::env::var("CI").is_ok_and(|value| value == "true");
    counts.record_skips(skips.len() as u64, under_ci);
    for failure in &counts.failures {
        eprintln!("counted as failed: {failure}");
    }
    if under_ci && counts.skipped > 0 {
        eprintln!("CI=true: {} skipped tests are failures", counts.skipped);
    }
    let tests_ok = status.success() && counts.failed == 0;
    let Counts {
        mut passed,
        mut failed,
        skipped,
        ..
    } = counts;
    // The benchmark's smoke run, so it never rots: it fails only when something is
    // broken (a program that does not load, a wrong verdict, a missing tool), never
    // on a timing. It counts as one test.
    if tests_ok {
        println!("\nrunning the benchmark's smoke run: cargo xtask bench --quick");
        match crate::bench_driver::run(true) {
            Ok(()) => passed += 1,
            Err(error) => {
                eprintln!("bench --quick failed: {error:#}");
                failed += 1;
            }
        }
    }
    // The loaders' libFuzzer targets, a few seconds each (the packet fuzzer is a test
    // above): each target counts as one test.
    println!(
        "\nfuzzing the loaders: {} s per libFuzzer target (cargo xtask fuzz for longer)",
        crate::fuzz::SMOKE_SECONDS
    );
    let (fuzz_passed, fuzz_failed) = crate::fuzz::smoke();
    passed += fuzz_passed;
    failed += fuzz_failed;
    println!();
    // Kept last and in this form: CI reads the closing count.
    println!("microseg: {passed} passed, {failed} failed, {skipped} skipped");
    if !tests_ok || failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// Sends each line of `pipe` to `lines` until it closes.
fn forward_lines(
    pipe: Option<impl Read + Send + 'static>,
    stream: Stream,
    lines: mpsc::Sender<(Stream, String)>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if let Some(pipe) = pipe {
            for_each_line(BufReader::new(pipe), |line| {
                lines.send((stream, line)).is_ok()
            });
        }
    })
}

/// Calls `each` with every line of `reader` (line ending removed) until the reader
/// ends or `each` returns false. Bytes that are not UTF-8 (a test may print
/// anything) are replaced rather than ending the run.
fn for_each_line(mut reader: impl BufRead, mut each: impl FnMut(String) -> bool) {
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        match reader.read_until(b'\n', &mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buffer);
                if !each(line.trim_end_matches(['\n', '\r']).to_owned()) {
                    return;
                }
            }
        }
    }
}

/// What `cargo test`'s output says about the run, read line by line.
#[derive(Debug, Default)]
struct CargoTestOutput {
    /// Totals over libtest's `test result:` lines (stdout).
    passed: u64,
    failed: u64,
    ignored: u64,
    /// Test binaries whose `test result:` line said FAILED: each is one failed target
    /// whose failure the totals above already count.
    failed_summaries: u64,
    /// Targets cargo reported failed (`error: test failed, to rerun pass ARGS`, or
    /// `doctest failed`), with cargo's cause when it gave one: it does for a crash or
    /// an unusual exit status, not for libtest's ordinary failure (status 101).
    failed_targets: Vec<FailedTarget>,
    /// cargo's closing `error: N targets failed:` (with --no-fail-fast).
    failed_targets_total: Option<u64>,
    /// `error: could not compile ...` and `error: failed to run custom build command
    /// ...` lines.
    build_failures: Vec<String>,
    /// Whether the last `error:` line on stderr named a failed target, so that a
    /// `process didn't exit successfully` line after it is that target's cause (not a
    /// build script's).
    last_error_was_target: bool,
}

#[derive(Debug, PartialEq, Eq)]
struct FailedTarget {
    /// cargo's rerun arguments, e.g. "-p microseg-tests --test e2e".
    rerun: String,
    cause: Option<String>,
}

/// The run's closing counts, and why each failure beyond libtest's was counted.
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
    skipped: u64,
    failures: Vec<String>,
}

impl CargoTestOutput {
    fn observe(&mut self, stream: Stream, line: &str) {
        let line = strip_ansi(line);
        match stream {
            Stream::Stdout => {
                if let Some(summary) = line.strip_prefix("test result: ") {
                    self.passed += count(summary, " passed");
                    self.failed += count(summary, " failed");
                    self.ignored += count(summary, " ignored");
                    if summary.starts_with("FAILED") {
                        self.failed_summaries += 1;
                    }
                }
            }
            Stream::Stderr => {
                if let Some(error) = line.strip_prefix("error: ") {
                    self.last_error_was_target = false;
                    if let Some((_, rerun)) = error.split_once("failed, to rerun pass ") {
                        self.failed_targets.push(FailedTarget {
                            rerun: rerun.trim().trim_matches('`').to_owned(),
                            cause: None,
                        });
                        self.last_error_was_target = true;
                    } else if error.starts_with("could not compile")
                        || error.starts_with("failed to run custom build command")
                    {
                        self.build_failures.push(error.trim().to_owned());
                    } else if let Some(total) = targets_failed_total(error) {
                        self.failed_targets_total = Some(total);
                    }
                } else if let Some(cause) = line
                    .trim_start()
                    .strip_prefix("process didn't exit successfully: ")
                    && self.last_error_was_target
                    && let Some(target) = self.failed_targets.last_mut()
                    && target.cause.is_none()
                {
                    target.cause = Some(cause.trim().to_owned());
                }
            }
        }
    }

    /// The closing counts: libtest's totals, plus one failure per failed target that
    /// no FAILED summary accounts for (a crash, an abort, an exit before the summary),
    /// one per failed build, and one if the run failed (`exit_ok` false) while
    /// nothing else was counted.
    fn counts(&self, exit_ok: bool, exit_status: &str) -> Counts {
        let mut failures = Vec::new();
        // cargo names each failed target as it ends; its closing total says the same
        // unless output was lost, so the larger is taken.
        let failed_targets =
            (self.failed_targets.len() as u64).max(self.failed_targets_total.unwrap_or(0));
        let unsummarised = failed_targets.saturating_sub(self.failed_summaries);
        if unsummarised > 0 {
            // The targets cargo gave a cause for are the ones that did not end as
            // libtest ends a failing run; name them.
            let crashed: Vec<String> = self
                .failed_targets
                .iter()
                .filter_map(|target| {
                    let cause = target.cause.as_deref()?;
                    Some(format!("`{}`: {cause}", target.rerun))
                })
                .collect();
            failures.push(format!(
                "{unsummarised} test target(s) failed without a libtest summary counting the failure (crashed or exited early){}{}",
                if crashed.is_empty() { "" } else { ": " },
                crashed.join("; ")
            ));
        }
        for build in &self.build_failures {
            failures.push(format!("build failed: {build}"));
        }
        let mut failed = self.failed + unsummarised + self.build_failures.len() as u64;
        if !exit_ok && failed == 0 {
            failures.push(format!(
                "cargo test failed ({exit_status}) but its output names no failed test, target or build"
            ));
            failed = 1;
        }
        Counts {
            passed: self.passed,
            failed,
            skipped: self.ignored,
            failures,
        }
    }
}

impl Counts {
    /// `recorded` tests returned early after recording a skip: libtest counted them
    /// as passed, so they move to skipped. Under CI a skip is a failure too (it stays
    /// in the skipped count, so the closing line still says how many).
    fn record_skips(&mut self, recorded: u64, under_ci: bool) {
        self.passed = self.passed.saturating_sub(recorded);
        self.skipped += recorded;
        if under_ci {
            self.failed += self.skipped;
        }
    }
}

/// N from cargo's `N targets failed:` (`1 target failed:`).
fn targets_failed_total(error: &str) -> Option<u64> {
    let (number, rest) = error.trim().split_once(' ')?;
    if rest.starts_with("target failed:") || rest.starts_with("targets failed:") {
        number.parse().ok()
    } else {
        None
    }
}

/// `line` without ANSI escape sequences (CARGO_TERM_COLOR=always colours cargo's
/// `error:` even into a pipe).
fn strip_ansi(line: &str) -> std::borrow::Cow<'_, str> {
    if !line.contains('\u{1b}') {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ending with a byte in '@'..='~'.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            plain.push(c);
        }
    }
    std::borrow::Cow::Owned(plain)
}

/// The number before `label` in a libtest summary ("ok. 12 passed; 0 failed; ...").
fn count(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find(|part| part.contains(label))
        .and_then(|part| part.split_whitespace().rev().nth(1))
        .and_then(|n| n.trim_start_matches("ok.").trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stdout` then `stderr` (the order between the two streams is not known
    /// to the reader, so the counts must not depend on it) and returns the counts.
    fn counts_of(stdout: &str, stderr: &str, exit_ok: bool) -> Counts {
        let mut output = CargoTestOutput::default();
        for line in stdout.lines() {
            output.observe(Stream::Stdout, line);
        }
        for line in stderr.lines() {
            output.observe(Stream::Stderr, line);
        }
        let in_order = output.counts(exit_ok, "exit status: 101");
        // The other order gives the same counts.
        let mut reversed = CargoTestOutput::default();
        for line in stderr.lines() {
            reversed.observe(Stream::Stderr, line);
        }
        for line in stdout.lines() {
            reversed.observe(Stream::Stdout, line);
        }
        assert_eq!(in_order, reversed.counts(exit_ok, "exit status: 101"));
        in_order
    }

    fn closing((passed, failed, skipped): (u64, u64, u64), counts: &Counts) {
        assert_eq!(
            (counts.passed, counts.failed, counts.skipped),
            (passed, failed, skipped),
            "{counts:?}"
        );
    }

    // Real output of `cargo test --no-fail-fast -- --show-output` (cargo 1.95) over a
    // library with a passing and an ignored test, a test binary with a failing test,
    // one that aborts and one that segfaults.
    const CRASH_STDOUT: &str = "
running 2 tests
test tests::ignored ... ignored
test tests::passes ... ok

successes:

successes:
    tests::passes

test result: ok. 1 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s


running 2 tests

running 2 tests
test ok_one ... ok
test broken ... FAILED

successes:

successes:
    ok_one

failures:

---- broken stdout ----

thread 'broken' (16963) panicked at tests/fails.rs:2:23:
assertion `left == right` failed
  left: 1
 right: 2

failures:
    broken

test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.15s


running 1 test

running 0 tests

successes:

successes:

test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
";
    const CRASH_STDERR: &str = "   Compiling crashy v0.1.0 (/tmp/toy/crashy)
    Finished `test` profile [unoptimized + debuginfo] target(s) in 0.98s
     Running unittests src/lib.rs (/tmp/toy/target/debug/deps/crashy-3a07317488e3f687)
     Running tests/aborts.rs (/tmp/toy/target/debug/deps/aborts-95f88c2b00b86ff9)
error: test failed, to rerun pass `-p crashy --test aborts`

Caused by:
  process didn't exit successfully: `/tmp/toy/target/debug/deps/aborts-95f88c2b00b86ff9 --show-output` (signal: 6, SIGABRT: process abort signal)
     Running tests/fails.rs (/tmp/toy/target/debug/deps/fails-9f10aabd0094889d)
error: test failed, to rerun pass `-p crashy --test fails`
     Running tests/segv.rs (/tmp/toy/target/debug/deps/segv-83454f416678e885)
error: test failed, to rerun pass `-p crashy --test segv`

Caused by:
  process didn't exit successfully: `/tmp/toy/target/debug/deps/segv-83454f416678e885 --show-output` (signal: 11, SIGSEGV: invalid memory reference)
   Doc-tests crashy
error: 3 targets failed:
    `-p crashy --test aborts`
    `-p crashy --test fails`
    `-p crashy --test segv`
";

    #[test]
    fn a_crashed_test_binary_counts_as_failed() {
        let counts = counts_of(CRASH_STDOUT, CRASH_STDERR, false);
        // `broken` from its summary, then the aborted and the segfaulted binary.
        closing((2, 3, 1), &counts);
        let why = counts.failures.join("\n");
        assert!(why.contains("2 test target(s)"), "{why}");
        assert!(why.contains("`-p crashy --test aborts`"), "{why}");
        assert!(why.contains("SIGSEGV"), "{why}");
        assert!(!why.contains("--test fails"), "{why}");
    }

    #[test]
    fn a_crashed_binary_counts_from_the_closing_list_alone() {
        // Only cargo's closing list survived (say the per-target lines were lost):
        // it still counts.
        let stderr = "error: 2 targets failed:\n    `--test aborts`\n    `--test fails`\n";
        closing((2, 2, 1), &counts_of(CRASH_STDOUT, stderr, false));
    }

    #[test]
    fn a_build_error_counts_as_failed() {
        let stderr = "   Compiling crashy v0.1.0 (/tmp/toy/crashy)
error[E0308]: mismatched types
 --> tests/nobuild.rs:1:31
  |
1 | #[test] fn x() { let y: u32 = \"no\"; }
  |                         ---   ^^^^ expected `u32`, found `&str`
  |                         |
  |                         expected due to this

For more information about this error, try `rustc --explain E0308`.
error: could not compile `crashy` (test \"nobuild\") due to 1 previous error
";
        let counts = counts_of("", stderr, false);
        closing((0, 1, 0), &counts);
        assert!(counts.failures[0].contains("could not compile `crashy`"));
    }

    #[test]
    fn a_failed_build_script_counts_as_failed_and_its_cause_is_no_test_target() {
        let stderr = "   Compiling microseg-agent v0.1.0 (/work/microseg-agent)
error: failed to run custom build command for `microseg-agent v0.1.0 (/work/microseg-agent)`

Caused by:
  process didn't exit successfully: `/work/target/debug/build/microseg-agent-4f7e19afcda2d785/build-script-build` (exit status: 1)
  --- stderr
  bpf-linker not found
";
        let counts = counts_of("", stderr, false);
        closing((0, 1, 0), &counts);
        assert_eq!(counts.failures.len(), 1, "{:?}", counts.failures);
    }

    #[test]
    fn a_failing_test_counts_once() {
        // libtest's summary counts it; cargo's target lines for it add nothing.
        let stdout = "
running 2 tests
test ok_one ... ok
test broken ... FAILED

failures:
    broken

test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.18s
";
        let stderr =
            "     Running tests/fails.rs (/tmp/toy/target/debug/deps/fails-9f10aabd0094889d)
error: test failed, to rerun pass `--test fails`
   Doc-tests crashy
error: 1 target failed:
    `--test fails`
";
        let counts = counts_of(stdout, stderr, false);
        closing((1, 1, 0), &counts);
        assert!(counts.failures.is_empty(), "{:?}", counts.failures);
    }

    #[test]
    fn a_failing_doctest_counts_once() {
        let stdout = "
running 1 test
test src/lib.rs - f (line 1) ... FAILED

test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.23s
";
        let stderr = "   Doc-tests crashy
error: doctest failed, to rerun pass `--doc`
error: 1 target failed:
    `--doc`
";
        closing((0, 1, 0), &counts_of(stdout, stderr, false));
    }

    #[test]
    fn a_test_binary_that_exits_early_counts_as_failed() {
        // std::process::exit(3) inside a test: no summary, an unusual exit status.
        let stdout = "\nrunning 1 test\n";
        let stderr = "     Running tests/exits.rs (/tmp/toy/target/debug/deps/exits-7b937d722464d1c1)
error: test failed, to rerun pass `--test exits`

Caused by:
  process didn't exit successfully: `/tmp/toy/target/debug/deps/exits-7b937d722464d1c1 --show-output` (exit status: 3)
note: test exited abnormally; to see the full output pass --no-capture to the harness.
error: 1 target failed:
    `--test exits`
";
        let counts = counts_of(stdout, stderr, false);
        closing((0, 1, 0), &counts);
        assert!(counts.failures[0].contains("(exit status: 3)"));
    }

    #[test]
    fn a_passing_run_counts_no_failure_even_where_a_test_printed_bytes_that_are_not_utf8() {
        // A passing test's shown output with a byte that is not UTF-8 (0xff): read
        // as a replacement character, not an error that ends the run.
        let stdout: &[u8] = b"
running 3 tests
test a ... ok
test b ... ok
test c ... ignored

successes:

---- b stdout ----
frame: \xff\x00\x01

successes:
    a
    b

test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s

running 1 test
test src/lib.rs - f (line 1) ... ok

test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.20s
";
        let stderr = "    Finished `test` profile [unoptimized + debuginfo] target(s) in 0.05s
     Running unittests src/lib.rs (target/debug/deps/crashy-3a07317488e3f687)
   Doc-tests crashy
";
        let mut lines = Vec::new();
        for_each_line(std::io::Cursor::new(stdout), |line| {
            lines.push(line);
            true
        });
        assert!(
            lines.iter().any(|line| line == "frame: \u{fffd}\0\u{1}"),
            "{lines:?}"
        );
        let counts = counts_of(&lines.join("\n"), stderr, true);
        closing((3, 0, 1), &counts);
        assert!(counts.failures.is_empty());
    }

    #[test]
    fn a_failed_run_with_nothing_named_counts_one_failure() {
        // cargo itself failed (a bad manifest, a signal) before any target ran.
        let stderr = "error: failed to load manifest for workspace member `/work/tests`\n";
        let counts = counts_of("", stderr, false);
        closing((0, 1, 0), &counts);
        assert!(counts.failures[0].contains("names no failed test"));
    }

    #[test]
    fn test_output_on_stdout_is_not_read_as_cargo_and_stderr_is_not_read_as_libtest() {
        // A passing test's shown output may say anything; a child process's stderr
        // too: only libtest's stdout and cargo's stderr count.
        let stdout = "error: test failed, to rerun pass `--test elsewhere`
error: could not compile `nothing`
test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s
";
        let stderr = "test result: ok. 7 passed; 0 failed; 0 ignored; 0 measured\n";
        closing((5, 0, 0), &counts_of(stdout, stderr, true));
    }

    #[test]
    fn coloured_cargo_errors_are_read() {
        let stderr = "\u{1b}[1m\u{1b}[91merror\u{1b}[0m\u{1b}[1m: test failed, to rerun pass `--test aborts`\u{1b}[0m
\u{1b}[1m\u{1b}[91merror\u{1b}[0m\u{1b}[1m: 1 target failed:\u{1b}[0m
";
        closing((0, 1, 0), &counts_of("", stderr, false));
    }

    #[test]
    fn recorded_skips_move_from_passed_to_skipped_and_fail_under_ci() {
        let stdout = "test result: ok. 10 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 1.00s\n";
        let mut counts = counts_of(stdout, "", true);
        counts.record_skips(3, false);
        closing((7, 0, 5), &counts);
        let mut under_ci = counts_of(stdout, "", true);
        under_ci.record_skips(3, true);
        // Skipped stays 5 in the closing line, and each is a failure too.
        closing((7, 5, 5), &under_ci);
    }
}
