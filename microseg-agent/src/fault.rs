//! Fault injection for tests: with the cargo feature `fault-injection` (the test
//! crate enables it; normal builds do not have it), `MICROSEG_FAULT=point[,point]`
//! makes the agent die at the named points of an update (`abort`, as abrupt as
//! SIGKILL) or fail there, so that tests can show that a crash or an error at any
//! step leaves one whole generation enforced and the last complete state saved.
//!
//! Points: `after-standby-write` (next generation written, not switched),
//! `after-switch` (switched, old slot not rewritten), `standby-rewrite` (fails the
//! rewrite of the old slot instead), `standby-repair` (fails its repair),
//! `before-state-commit` (maps switched, the saved state not yet replaced),
//! `event-reader-panic` (the event reader panics on its first event, once),
//! `binding-write` (fails the switch that writes changed interface bindings).
//!
//! `point@/some/file` injects the fault only while that file exists, so that a
//! test can end it and watch the agent recover.

#[cfg(feature = "fault-injection")]
fn active(point: &str) -> bool {
    std::env::var("MICROSEG_FAULT").is_ok_and(|points| {
        points.split(',').any(|p| match p.split_once('@') {
            Some((name, while_exists)) => {
                name == point && std::path::Path::new(while_exists).exists()
            }
            None => p == point,
        })
    })
}

/// Dies here if `point` is injected.
#[inline(always)]
pub fn crash_at(point: &str) {
    #[cfg(feature = "fault-injection")]
    if active(point) {
        eprintln!("fault injection: dying at {point}");
        std::process::abort();
    }
    let _ = point;
}

/// Whether the step at `point` should fail (injected).
#[inline(always)]
pub fn fails_at(point: &str) -> bool {
    #[cfg(feature = "fault-injection")]
    if active(point) {
        eprintln!("fault injection: failing at {point}");
        return true;
    }
    let _ = point;
    false
}

/// Panics here, once per process, if `point` is injected (a bug in a task).
#[inline(always)]
pub fn panic_once_at(point: &str) {
    #[cfg(feature = "fault-injection")]
    {
        static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if active(point) && !DONE.swap(true, std::sync::atomic::Ordering::SeqCst) {
            panic!("fault injection: panicking at {point}");
        }
    }
    let _ = point;
}
