//! The agent's long-running tasks, supervised: a task that fails, panics or ends is
//! logged, counted (`microseg_task_restarts_total{task}`) and started again after a
//! pause that doubles from 100 ms up to 5 s. No failure of one task ends the agent:
//! enforcement is in the kernel, and the rest keeps serving.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

/// Restarts per task, for metrics and `status`.
#[derive(Default)]
pub struct TaskRestarts {
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl TaskRestarts {
    fn record(&self, task: &'static str) {
        *self
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(task)
            .or_default() += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(5);
/// A task that ran this long before failing starts again without a long pause.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// Runs the task `start()` makes, and again whenever it ends, for as long as the
/// returned handle is not aborted.
pub fn supervise<F, Fut>(
    task: &'static str,
    restarts: Arc<TaskRestarts>,
    start: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut pause = FIRST_PAUSE;
        loop {
            let started = std::time::Instant::now();
            match tokio::spawn(start()).await {
                Ok(Ok(())) => tracing::error!(task, "task ended; starting it again"),
                Ok(Err(e)) => tracing::error!(task, "task failed: {e:#}; starting it again"),
                Err(e) if e.is_panic() => {
                    tracing::error!(task, "task panicked; starting it again")
                }
                // Cancelled: the agent is stopping.
                Err(_) => return,
            }
            restarts.record(task);
            if started.elapsed() > HEALTHY_RUN {
                pause = FIRST_PAUSE;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    // Paused time: the restart pauses (100 ms, 200 ms) pass as the runtime idles,
    // however loaded the machine is.
    #[tokio::test(start_paused = true)]
    async fn a_failing_or_panicking_task_is_restarted_and_counted() {
        let restarts = Arc::new(TaskRestarts::default());
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        let handle = supervise("flaky", restarts.clone(), move || {
            let run = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                match run {
                    0 => anyhow::bail!("first run fails"),
                    1 => panic!("second run panics"),
                    _ => std::future::pending().await,
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(restarts.snapshot()["flaky"], 2);
        handle.abort();
    }
}
