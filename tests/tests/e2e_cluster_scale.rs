//! The cluster simulation, small: three nodes in network namespaces, one real agent
//! each (Kubernetes mode), real pods talking across nodes, 500 more pods and 50
//! policies as API objects only, churn, and faults during churn (an agent killed,
//! watches broken, 410 Gone, the API server away). The full size runs in
//! `cargo xtask bench --cluster`.

use microseg_tests::{
    cluster::ClusterPlan,
    cluster_run::{phases_by_name, run},
};

#[test]
fn a_cluster_of_agents_enforces_across_nodes_and_converges_through_churn_and_faults() {
    if !microseg_tests::kernel_available("cluster_scale") {
        return;
    }
    let report = run(&ClusterPlan::small(), &|step| println!("cluster: {step}"));
    println!("{}", report.markdown());
    assert!(report.failures.is_empty(), "{}", report.markdown());
    // Cross-node enforcement was exercised both ways, and drops were attributed.
    assert!(report.probes_allowed > 0 && report.probes_denied > 0);
    assert!(report.drops_reported_by_the_dropping_node > 0);
    let phases = phases_by_name(&report);
    assert_eq!(phases.len(), 5, "{}", report.markdown());
    for phase in phases.values() {
        assert!(phase.changes > 0, "{}: no changes", phase.phase);
        assert!(phase.probes > 0, "{}: no probes", phase.phase);
        // Every fault was caught up with (the figure exists only once every node
        // enforced what the API server held when the fault ended).
        assert_eq!(
            phase.recovery_ms.is_some(),
            phase.phase != "steady churn",
            "{}",
            report.markdown()
        );
    }
    // Each node enforces its own pods only: node-1 its frontend (the intruder's
    // namespace has no policy), node-2 and node-3 both of theirs.
    let enforced: Vec<u64> = report.agents.iter().map(|a| a.enforced_workloads).collect();
    assert_eq!(enforced, [1, 2, 2], "{}", report.markdown());
}
