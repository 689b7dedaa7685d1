//! The flow history: the newest flows (verdict events as JSON lines) in a bounded
//! ring (`flowHistory`), written to the flow log (`log`), and fanned out to
//! subscribers (`microseg events -f`, Hubble's GetFlows) through bounded buffers.
//! A slow subscriber loses its own events (counted) and never blocks the writer.
//! The agent's ring-buffer reader publishes into it; the Hubble server and the API
//! read from it; neither knows the other.

pub mod log;

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::mpsc;

use self::log::EventLog;
use crate::flow_filter::FlowFilter;

struct Subscriber {
    sender: mpsc::Sender<Arc<str>>,
    lost: Arc<AtomicU64>,
}

pub struct EventHub {
    subscribers: Mutex<Vec<Subscriber>>,
    history: Mutex<VecDeque<Arc<str>>>,
    /// Flows the history keeps.
    pub history_capacity: usize,
    buffer: usize,
    log: Option<Mutex<EventLog>>,
    /// Events read from the ring buffer.
    pub received: AtomicU64,
    /// Events subscribers lost because they fell behind.
    pub subscriber_lost: AtomicU64,
}

/// A subscription: the buffered history first, then live events.
pub struct Subscription {
    pub history: Vec<Arc<str>>,
    pub live: mpsc::Receiver<Arc<str>>,
    pub lost: Arc<AtomicU64>,
}

impl EventHub {
    pub fn new(buffer: usize, history_capacity: usize, log: Option<EventLog>) -> Self {
        let history_capacity = history_capacity.max(1);
        Self {
            subscribers: Mutex::new(Vec::new()),
            history: Mutex::new(VecDeque::with_capacity(history_capacity.min(65_536))),
            history_capacity,
            buffer,
            log: log.map(Mutex::new),
            received: AtomicU64::new(0),
            subscriber_lost: AtomicU64::new(0),
        }
    }

    pub fn subscribe(&self, last: usize) -> Subscription {
        let (sender, live) = mpsc::channel(self.buffer);
        let lost = Arc::new(AtomicU64::new(0));
        let history = {
            let history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
            let skip = history.len().saturating_sub(last);
            history.iter().skip(skip).cloned().collect()
        };
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Subscriber {
                sender,
                lost: lost.clone(),
            });
        Subscription {
            history,
            live,
            lost,
        }
    }

    /// Puts flows of an earlier run (read back from the event log) in the history,
    /// before any new one. They are not counted as received.
    pub fn preload(&self, lines: Vec<Arc<str>>) {
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        for line in lines {
            if history.len() == self.history_capacity {
                history.pop_front();
            }
            history.push_back(line);
        }
    }

    /// The newest `last` flows of the history that `filter` accepts, oldest first.
    pub fn history_matching(&self, filter: &FlowFilter, last: usize) -> Vec<Arc<str>> {
        let history: Vec<Arc<str>> = self
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        let mut found: Vec<Arc<str>> = history
            .into_iter()
            .rev()
            .filter(|line| {
                filter.is_empty()
                    || serde_json::from_str::<serde_json::Value>(line)
                        .is_ok_and(|flow| filter.matches(&flow))
            })
            .take(last)
            .collect();
        found.reverse();
        found
    }

    /// The history now, oldest first (the lines are shared, not copied).
    pub fn history(&self) -> Vec<Arc<str>> {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Flows in the history now.
    pub fn history_len(&self) -> usize {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn publish(&self, line: Arc<str>) {
        self.received.fetch_add(1, Ordering::Relaxed);
        {
            let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
            if history.len() == self.history_capacity {
                history.pop_front();
            }
            history.push_back(line.clone());
        }
        if let Some(log) = &self.log {
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write_line(&line);
        }
        let mut subscribers = self
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        subscribers.retain(
            |subscriber| match subscriber.sender.try_send(line.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    subscriber.lost.fetch_add(1, Ordering::Relaxed);
                    self.subscriber_lost.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            },
        );
    }

    pub fn flush_log(&self) {
        if let Some(log) = &self.log {
            log.lock().unwrap_or_else(PoisonError::into_inner).flush();
        }
    }

    /// (rotations, lines not written) of the event log.
    pub fn log_stats(&self) -> (u64, u64) {
        self.log.as_ref().map_or((0, 0), |log| {
            let log = log.lock().unwrap_or_else(PoisonError::into_inner);
            (log.rotations, log.write_errors)
        })
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}
