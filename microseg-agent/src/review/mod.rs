//! Reviewing policy: what a policy set allows between workloads (`reach`), the
//! flows the agent observed (`flows`), `microseg diff` (`diff`: what a change
//! would deny or allow) and `microseg graph` (`graph`, rendered by `dot` and `svg`).

pub mod diff;
pub mod dot;
pub mod flows;
pub mod graph;
pub mod reach;
pub mod svg;

#[cfg(test)]
mod tests;
