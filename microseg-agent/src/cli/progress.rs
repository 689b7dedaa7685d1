//! Progress for long operations, on stderr and only when it is a terminal (indicatif
//! draws nothing otherwise, so scripts and pipes see clean output).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A spinner while waiting for the agent (an apply of many objects).
pub fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("template"));
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// A bar over `total` steps (flows of a reachability matrix).
pub fn bar(total: u64, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta} left)")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_message(message);
    bar
}
