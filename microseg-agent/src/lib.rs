//! microseg userspace: loading and driving the data path, the policy model and
//! compiler, the agent daemon and the CLI.

pub mod agent;
pub mod api;
pub mod cli;
pub mod datapath;
pub mod event_view;
pub mod fault;
pub mod flow_filter;
pub mod flow_history;
pub mod hubble;
pub mod objects;
pub mod policy;
pub mod policy_match;
pub mod review;
pub mod socket;
pub mod sorted_set;
pub mod suggest;
