//! Empty library target: lets `microseg-agent` list this crate as a build dependency so
//! cargo rebuilds the agent (and the eBPF object it embeds) when the programs change.
#![no_std]
