//! What one node's agent costs as the cluster grows: a real agent (Kubernetes mode)
//! against the test API server holding N pods and M policies, K of the pods on the
//! agent's own node. Measured per point: the time to sync, resident memory once
//! synced, and one pod change's cost (API change -> enforced, the agent's apply
//! time, CPU). [`fit`] turns the points into the per-node model the README gives.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::{
    cluster::{ClusterPlan, namespace, virtual_pod, virtual_pod_on, virtual_policy},
    fake_apiserver::FakeApiServer,
    lab::Lab,
    proc_stats::{cpu_seconds, rss_mib},
};

/// The node the measured agent plays.
const NODE: &str = "node-1";

#[derive(Clone, Copy, Debug, Serialize)]
pub struct ScalePoint {
    pub pods: usize,
    pub policies: usize,
    /// Pods on the agent's own node (each selected by policies, so enforced).
    pub local_pods: usize,
}

#[derive(Debug, Serialize)]
pub struct ScaleFigures {
    pub point: ScalePoint,
    pub sync_ms: f64,
    pub rss_mib: f64,
    /// One pod added: API change -> enforced (median of the changes).
    pub change_ms: f64,
    /// The agent's own apply time for it (validate, compile, diff, switch).
    pub apply_ms: f64,
    /// CPU seconds per change.
    pub cpu_ms_per_change: f64,
    pub enforced_workloads: u64,
}

/// The default points: cluster size with policies in proportion, policies at a
/// fixed size, and a node with 100 pods of its own.
pub fn default_points() -> Vec<ScalePoint> {
    let point = |pods, policies, local_pods| ScalePoint {
        pods,
        policies,
        local_pods,
    };
    vec![
        point(1_000, 100, 0),
        point(5_000, 500, 0),
        point(20_000, 2_000, 0),
        point(50_000, 5_000, 0),
        point(5_000, 100, 0),
        point(5_000, 2_000, 0),
        point(5_000, 500, 100),
        point(50_000, 5_000, 100),
        point(100_000, 5_000, 0),
    ]
}

/// Smaller points for a quick run (`--small`): the same shape, 1,000 to 4,000 pods.
pub fn quick_points() -> Vec<ScalePoint> {
    let point = |pods, policies, local_pods| ScalePoint {
        pods,
        policies,
        local_pods,
    };
    vec![
        point(1_000, 100, 0),
        point(4_000, 400, 0),
        point(1_000, 400, 0),
        point(1_000, 100, 50),
    ]
}

/// Measures one point with `changes` single pod additions.
pub fn measure(point: ScalePoint, changes: usize) -> ScaleFigures {
    let plan = ClusterPlan {
        virtual_pods: point.pods,
        virtual_policies: point.policies,
        virtual_nodes: 50,
        ..ClusterPlan::small()
    };
    let lab = Lab::new(&[]);
    let api = FakeApiServer::start_in(&lab.node.name);
    let namespaces = crate::cluster::virtual_namespaces(&plan);
    let mut objects: Vec<Value> = (0..namespaces)
        .map(|n| namespace(&format!("vns-{n}")))
        .collect();
    // Local pods spread evenly over the namespaces and apps.
    let stride = point.pods / point.local_pods.max(1);
    objects.extend((0..point.pods).map(|i| {
        if point.local_pods > 0 && i % stride == 0 && i / stride < point.local_pods {
            virtual_pod_on(&plan, i, i / 10 % 10, NODE)
        } else {
            virtual_pod(&plan, i, i / 10 % 10)
        }
    }));
    objects.extend((0..point.policies).map(|i| virtual_policy(&plan, i)));
    api.apply_all(objects);
    let kubeconfig = lab.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    // The peer map holds two generations of every pod's two addresses: beyond the
    // default's 65,536 pods it is sized as a user of such a cluster sizes it.
    let peers = (4 * (point.pods + changes) as u32).next_power_of_two();
    let config = lab.dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!("peers:\n  maxEntries: {}\n", peers.max(262_144)),
    )
    .expect("agent configuration");
    let config = config.display().to_string();
    let started = Instant::now();
    lab.start_kubernetes_agent_with(&kubeconfig, NODE, &["--config", &config]);
    let enforced = |version: u64| {
        let status = status(&lab);
        status
            .pointer("/kubernetes/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|v| v >= version)
    };
    let wait = |version: u64| {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !enforced(version) {
            assert!(
                Instant::now() < deadline,
                "the agent did not sync {point:?}; its log:\n{}",
                lab.agent_log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait(api.resource_version());
    let sync_ms = started.elapsed().as_secs_f64() * 1000.0;
    // Let the allocator settle (the agent returns freed memory after an apply).
    std::thread::sleep(Duration::from_secs(1));
    let pid = lab.agent_pid().expect("agent running");
    let rss_mib = rss_mib(pid);
    let cpu_before = cpu_seconds(pid);
    let mut change_times = Vec::new();
    let mut apply_times = Vec::new();
    for change in 0..changes {
        let index = point.pods + change;
        let sent = api.apply(virtual_pod(&plan, index, index % 10));
        wait(api.resource_version());
        change_times.push(sent.elapsed().as_secs_f64() * 1000.0);
        apply_times.push(status(&lab)["lastApplyMs"].as_f64().unwrap_or(0.0));
    }
    let cpu_ms_per_change = (cpu_seconds(pid) - cpu_before) * 1000.0 / changes.max(1) as f64;
    let enforced_workloads = status(&lab)["enforcedWorkloads"].as_u64().unwrap_or(0);
    ScaleFigures {
        point,
        sync_ms,
        rss_mib,
        change_ms: median(&mut change_times),
        apply_ms: median(&mut apply_times),
        cpu_ms_per_change,
        enforced_workloads,
    }
}

fn status(lab: &Lab) -> Value {
    microseg::api::client::Client::connect(&lab.socket())
        .and_then(|mut client| client.call(&microseg::api::Request::Status))
        .unwrap_or_default()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The per-node model: `value = base + per_pod * pods + per_policy * policies +
/// per_local_pod * local_pods`, fitted by least squares.
#[derive(Debug, Serialize)]
pub struct Model {
    pub base: f64,
    pub per_pod: f64,
    pub per_policy: f64,
    pub per_local_pod: f64,
}

impl Model {
    pub fn predict(&self, pods: f64, policies: f64, local_pods: f64) -> f64 {
        self.base
            + self.per_pod * pods
            + self.per_policy * policies
            + self.per_local_pod * local_pods
    }
}

/// Fits `value` over the points (ordinary least squares, normal equations).
pub fn fit(figures: &[ScaleFigures], value: impl Fn(&ScaleFigures) -> f64) -> Model {
    let rows: Vec<[f64; 4]> = figures
        .iter()
        .map(|f| {
            [
                1.0,
                f.point.pods as f64,
                f.point.policies as f64,
                f.point.local_pods as f64,
            ]
        })
        .collect();
    let mut normal = [[0.0f64; 5]; 4];
    for (row, figure) in rows.iter().zip(figures) {
        let y = value(figure);
        for i in 0..4 {
            for j in 0..4 {
                normal[i][j] += row[i] * row[j];
            }
            normal[i][4] += row[i] * y;
        }
    }
    let solution = solve(normal);
    Model {
        base: solution[0],
        per_pod: solution[1],
        per_policy: solution[2],
        per_local_pod: solution[3],
    }
}

/// Gaussian elimination with partial pivoting on an augmented 4x5 system.
fn solve(mut m: [[f64; 5]; 4]) -> [f64; 4] {
    for column in 0..4 {
        let pivot = (column..4)
            .max_by(|&a, &b| m[a][column].abs().total_cmp(&m[b][column].abs()))
            .unwrap_or(column);
        m.swap(column, pivot);
        if m[column][column].abs() < 1e-12 {
            continue;
        }
        let pivot_row = m[column];
        for (row, values) in m.iter_mut().enumerate() {
            if row != column {
                let factor = values[column] / pivot_row[column];
                for (value, pivot) in values.iter_mut().zip(pivot_row).skip(column) {
                    *value -= factor * pivot;
                }
            }
        }
    }
    let mut x = [0.0; 4];
    for i in 0..4 {
        if m[i][i].abs() >= 1e-12 {
            x[i] = m[i][4] / m[i][i];
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_recovers_a_linear_model() {
        let figure = |pods, policies, local_pods| {
            let point = ScalePoint {
                pods,
                policies,
                local_pods,
            };
            ScaleFigures {
                point,
                sync_ms: 0.0,
                rss_mib: 20.0
                    + 0.01 * pods as f64
                    + 0.05 * policies as f64
                    + 0.2 * local_pods as f64,
                change_ms: 0.0,
                apply_ms: 0.0,
                cpu_ms_per_change: 0.0,
                enforced_workloads: 0,
            }
        };
        let figures: Vec<ScaleFigures> = default_points()
            .into_iter()
            .map(|p| figure(p.pods, p.policies, p.local_pods))
            .collect();
        let model = fit(&figures, |f| f.rss_mib);
        assert!((model.base - 20.0).abs() < 1e-6, "{model:?}");
        assert!((model.per_pod - 0.01).abs() < 1e-9, "{model:?}");
        assert!((model.per_policy - 0.05).abs() < 1e-9, "{model:?}");
        assert!((model.per_local_pod - 0.2).abs() < 1e-9, "{model:?}");
        assert!((model.predict(500_000.0, 0.0, 100.0) - 5040.0).abs() < 1e-3);
    }
}
