//! What the CNI specification fixes: the versions this plugin speaks, the error
//! object and its well-known codes.

use serde_json::{Value, json};

/// Spec versions whose configurations and results this plugin reads. 0.3.0 brought
/// chaining (`prevResult`), 0.4.0 CHECK, 1.1.0 STATUS and GC.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest supported version: the one used for output when the configuration
/// names none that can be read.
pub const NEWEST_VERSION: &str = "1.1.0";

/// Well-known error codes (spec, "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const CONTAINER_UNKNOWN: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    /// A transient condition: the runtime should try again later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// microseg's own (100 and up): the agent answered that it cannot enforce on
    /// the pod's veth.
    pub const NOT_ENFORCED: u32 = 100;
    /// microseg's own: the pod's interface is not a veth whose peer is on the host.
    pub const NO_HOST_VETH: u32 = 101;
}

/// A failure, as the spec's error object prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    /// One short sentence.
    pub msg: String,
    /// What the plugin found, for the operator.
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error object for stdout, in `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// `major.minor.patch` as numbers; `None` for anything else.
pub fn parse_version(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.split('.').map(|part| part.parse::<u32>().ok());
    let parsed = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(parsed)
}

/// Whether `version` is at least `minimum` (both supported versions).
pub fn at_least(version: &str, minimum: &str) -> bool {
    match (parse_version(version), parse_version(minimum)) {
        (Some(version), Some(minimum)) => version >= minimum,
        _ => false,
    }
}

pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_numbers() {
        assert!(at_least("1.0.0", "0.4.0"));
        assert!(at_least("0.10.0", "0.4.0"));
        assert!(!at_least("0.3.1", "0.4.0"));
        assert!(at_least("1.1.0", "1.1.0"));
        assert_eq!(parse_version("1.0"), None);
        assert_eq!(parse_version("1.0.0.0"), None);
        assert!(is_supported("0.3.1") && !is_supported("0.2.0") && !is_supported("1.2.0"));
    }

    #[test]
    fn the_error_object_has_the_specs_fields() {
        let error = CniError::new(code::TRY_AGAIN_LATER, "agent unreachable", "no socket");
        assert_eq!(
            error.to_json("1.0.0"),
            json!({"cniVersion": "1.0.0", "code": 11, "msg": "agent unreachable", "details": "no socket"})
        );
    }
}
