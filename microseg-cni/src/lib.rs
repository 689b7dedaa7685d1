//! microseg's chained CNI plugin.
//!
//! The runtime runs it after the main plugin (bridge, ptp, Calico, ...) made the
//! pod's veth, and starts the pod's containers only when it returns. On ADD it
//! finds the veth's host-side end (verified by peer index), asks the agent to
//! enforce on it (bound to the pod, or dropping everything beyond its link until
//! the API server reports the pod) and passes the main plugin's result on; if the
//! agent cannot, the ADD fails and the pod does not start. DEL, CHECK, STATUS, GC
//! and VERSION follow the CNI specification (0.3.0 to 1.1.0).

pub mod agent;
pub mod config;
pub mod install;
pub mod link;
pub mod plugin;
pub mod result;
pub mod spec;
