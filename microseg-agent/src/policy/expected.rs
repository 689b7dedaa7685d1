//! Expected verdicts (`expected.yaml` beside an example): a list of
//! `{from, to, port, protocol, verdict}` that any evaluator (reference, map-level,
//! kernel) can be checked against.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;

use super::error::{LoadErrors, PolicyError, Source};
use super::evaluate::Flow;
use super::inventory::EndpointRef;
use super::model::{PolicySet, Protocol};

/// `allow` or `deny`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpectedVerdict {
    Allow,
    Deny,
}

impl ExpectedVerdict {
    pub fn allowed(self) -> bool {
        self == ExpectedVerdict::Allow
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedDocument {
    from: String,
    to: String,
    port: u16,
    #[serde(default)]
    protocol: Option<String>,
    verdict: ExpectedVerdict,
    #[serde(default)]
    note: Option<String>,
}

/// One expectation: `from`/`to` are `ns/name` or an IP address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedFlow {
    pub from: EndpointRef,
    pub to: EndpointRef,
    pub port: u16,
    pub protocol: Protocol,
    pub verdict: ExpectedVerdict,
    /// Free text saying why (optional).
    pub note: Option<String>,
    /// Position in the file, for messages.
    pub index: usize,
}

impl ExpectedFlow {
    /// The concrete flow in `set` (addresses of the same family on both ends).
    pub fn flow(&self, set: &PolicySet) -> Result<Flow, String> {
        Flow::between(set, &self.from, &self.to, self.protocol, self.port)
    }
}

impl fmt::Display for ExpectedFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {}/{} expected {}",
            self.from,
            self.to,
            self.protocol,
            self.port,
            if self.verdict.allowed() {
                "allow"
            } else {
                "deny"
            }
        )
    }
}

/// Parses an expected-verdict list from YAML (or JSON) text.
pub fn parse_expected(file: &Path, text: &str) -> Result<Vec<ExpectedFlow>, LoadErrors> {
    let source = Source::new(file, 1);
    let documents: Vec<ExpectedDocument> = serde_norway::from_str(text).map_err(|error| {
        LoadErrors::from(vec![PolicyError::new(
            &source,
            "",
            format!("bad expectations: {error}"),
        )])
    })?;
    let mut errors = Vec::new();
    let mut flows = Vec::with_capacity(documents.len());
    for (index, document) in documents.into_iter().enumerate() {
        let mut endpoint = |field: &str, text: &str| match EndpointRef::from_str(text) {
            Ok(endpoint) => Some(endpoint),
            Err(reason) => {
                errors.push(PolicyError::new(
                    &source,
                    format!("[{index}].{field}"),
                    reason,
                ));
                None
            }
        };
        let from = endpoint("from", &document.from);
        let to = endpoint("to", &document.to);
        let protocol = match document.protocol.as_deref().map(Protocol::from_str) {
            None => Some(Protocol::Tcp),
            Some(Ok(protocol)) => Some(protocol),
            Some(Err(reason)) => {
                errors.push(PolicyError::new(
                    &source,
                    format!("[{index}].protocol"),
                    reason,
                ));
                None
            }
        };
        if let (Some(from), Some(to), Some(protocol)) = (from, to, protocol) {
            flows.push(ExpectedFlow {
                from,
                to,
                port: document.port,
                protocol,
                verdict: document.verdict,
                note: document.note,
                index,
            });
        }
    }
    if errors.is_empty() {
        Ok(flows)
    } else {
        Err(LoadErrors::from(errors))
    }
}

/// Reads and parses an `expected.yaml`.
pub fn load_expected(path: &Path) -> Result<Vec<ExpectedFlow>, LoadErrors> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        LoadErrors::from(vec![PolicyError::new(
            &Source::new(path, 0),
            "",
            format!("cannot read file: {error}"),
        )])
    })?;
    parse_expected(path, &text)
}

/// An expectation an evaluator did not meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectationFailure {
    pub expected: ExpectedFlow,
    /// What went wrong: the verdict differs, or the flow could not be built.
    pub problem: String,
}

impl fmt::Display for ExpectationFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} {}: {}",
            self.expected.index, self.expected, self.problem
        )
    }
}

/// Checks every expectation with `allowed` (any evaluator: reference, map-level or the
/// kernel); returns the failures.
pub fn check_expected(
    set: &PolicySet,
    expected: &[ExpectedFlow],
    mut allowed: impl FnMut(&Flow) -> bool,
) -> Vec<ExpectationFailure> {
    expected
        .iter()
        .filter_map(|expectation| match expectation.flow(set) {
            Err(problem) => Some(ExpectationFailure {
                expected: expectation.clone(),
                problem,
            }),
            Ok(flow) => {
                let verdict = allowed(&flow);
                (verdict != expectation.verdict.allowed()).then(|| ExpectationFailure {
                    expected: expectation.clone(),
                    problem: format!("got {} for {flow}", if verdict { "allow" } else { "deny" }),
                })
            }
        })
        .collect()
}
