//! microseg userspace: loading and driving the data path, the policy model and
//! compiler, the agent daemon and the CLI.

pub mod datapath;
pub mod policy;
