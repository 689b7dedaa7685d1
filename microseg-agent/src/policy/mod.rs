//! The policy control plane: Kubernetes NetworkPolicy (plus an inventory of namespaces
//! and workloads) in, data path map content out.
//!
//! - [`load_paths`] / [`PolicySetBuilder`]: read and validate files into a [`PolicySet`],
//!   reporting every error with file, document and field path;
//! - [`evaluate`]: the reference evaluator, Kubernetes semantics computed directly;
//! - [`compile`]: the map content ([`crate::datapath::DatapathState`]) plus rule and
//!   identity tables;
//! - [`MapEvaluator`]: answers flows from the compiled maps alone, with the data path's
//!   lookup algorithm, so compiler and kernel can both be checked against [`evaluate`];
//! - [`load_expected`] / [`check_expected`]: expected verdicts of the examples.

mod cluster_policy;
mod compile;
mod error;
mod evaluate;
mod expected;
mod fail_closed;
mod files;
mod inventory;
mod labels;
mod load;
mod map_eval;
mod model;
mod store;
mod validate;
mod workloads;

pub use cluster_policy::CLUSTER_NETWORK_POLICY_API_VERSION;
pub use compile::{
    CompileStats, Compiled, CompiledChanges, CompiledEndpoint, Compiler, CompilerCounters,
    HitSlotOwner, HitSlotTable, IdentityInfo, IdentityTable, IdsRevision, Numbering, RuleTable,
    SavedIds, SavedIdsError, SetChanges, Touched, WorkloadIdentityKey, compile,
};
pub use error::{LoadErrors, PolicyError, Source};
pub use evaluate::{
    ClusterRuleInfo, DirectionVerdict, Flow, FlowVerdict, ReachabilityMatrix, RuleRef,
    VerdictReason, evaluate, reachability_matrix,
};
pub use expected::{
    ExpectationFailure, ExpectedFlow, ExpectedVerdict, check_expected, load_expected,
    parse_expected,
};
pub use fail_closed::RefusedPolicy;
pub use files::{documents, is_policy_file, policy_files};
pub use inventory::EndpointRef;
pub use load::{ConvertedDocument, MICROSEG_API_VERSION, PolicySetBuilder, load_paths};
pub use map_eval::{MapDirectionVerdict, MapEvaluator, MapVerdict, evaluate_state};
pub use model::{
    ClusterPolicy, ClusterRule, ClusterSubject, IpBlock, LabelSelector, Labels,
    NAMESPACE_NAME_LABEL, NamedPort, NamespaceInfo, NamespaceScope, NodeInfo, Peer, Policy,
    PolicyDirection, PolicySet, PortRule, PortSpec, Protocol, Rule, RuleAction, SelectorOperator,
    SelectorRequirement, Tier, Workload,
};
pub use store::PolicyStore;
pub use workloads::Workloads;

#[cfg(test)]
mod tests;
