//! What the flow history says of the recent past, for ServerStatus' `flows_rate`
//! (flows per second over the last minute) and GetNamespaces (namespaces with
//! flows in the last hour), as Hubble's server answers them.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

/// The window of `flows_rate`.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// The window of GetNamespaces.
const NAMESPACE_WINDOW: Duration = Duration::from_secs(3600);

/// The few fields of an event line these answers read (parsing them only).
#[derive(serde::Deserialize)]
struct Line {
    time: Option<String>,
    #[serde(default)]
    source: Side,
    #[serde(default)]
    destination: Side,
}

#[derive(serde::Deserialize, Default)]
struct Side {
    namespace: Option<String>,
}

/// The lines of `history` (oldest first) no older than `window` before `now`
/// (Unix ns), newest first. The history is in arrival order, which is time order
/// but for a few nanoseconds between CPUs: reading stops at the first older line.
fn newest_within(
    history: &[Arc<str>],
    now_ns: i64,
    window: Duration,
) -> impl Iterator<Item = Line> + '_ {
    let oldest = now_ns.saturating_sub(i64::try_from(window.as_nanos()).unwrap_or(i64::MAX));
    history
        .iter()
        .rev()
        .filter_map(|line| serde_json::from_str::<Line>(line).ok())
        .map(|line| {
            let time = line
                .time
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .and_then(|t| t.timestamp_nanos_opt());
            (time, line)
        })
        .take_while(move |(time, _)| time.is_some_and(|t| t >= oldest))
        .map(|(_, line)| line)
}

/// Flows per second over the last minute.
pub fn flows_rate(history: &[Arc<str>], now_ns: i64) -> f64 {
    let flows = newest_within(history, now_ns, RATE_WINDOW).count();
    flows as f64 / RATE_WINDOW.as_secs_f64()
}

/// The namespaces of either end of the flows of the last hour, sorted.
pub fn namespaces(history: &[Arc<str>], now_ns: i64) -> BTreeSet<String> {
    newest_within(history, now_ns, NAMESPACE_WINDOW)
        .flat_map(|line| [line.source.namespace, line.destination.namespace])
        .flatten()
        .filter(|namespace| !namespace.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-25T10:00:00Z in Unix ns.
    const NOW: i64 = 1_795_600_800 * 1_000_000_000;

    fn line(seconds_ago: i64, source: &str, destination: &str) -> Arc<str> {
        let time = chrono::DateTime::from_timestamp_nanos(NOW - seconds_ago * 1_000_000_000)
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        Arc::from(
            serde_json::json!({
                "time": time,
                "source": {"namespace": source},
                "destination": {"namespace": destination, "pod_name": "x"},
            })
            .to_string(),
        )
    }

    #[test]
    fn the_rate_counts_the_last_minute_and_namespaces_the_last_hour() {
        let history = vec![
            line(7200, "old", "old"),
            line(1800, "app", ""),
            line(90, "db", "app"),
            line(30, "web", "app"),
            line(10, "web", "app"),
            line(0, "web", "app"),
        ];
        assert!((flows_rate(&history, NOW) - 3.0 / 60.0).abs() < 1e-9);
        assert_eq!(
            namespaces(&history, NOW).into_iter().collect::<Vec<_>>(),
            ["app", "db", "web"]
        );
        assert_eq!(flows_rate(&[], NOW), 0.0);
    }
}
