//! What the runtime hands the plugin: the `CNI_*` environment and the network
//! configuration on stdin (the list's `name` and `cniVersion`, this plugin's object
//! and, chained, the previous plugin's result as `prevResult`).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::spec::{CniError, code};

/// The agent's API socket unless the configuration says otherwise (the agent's
/// default, `microseg::api::DEFAULT_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/microseg/microseg.sock";

/// How long the agent may take to answer unless configured: an ADD waits for the
/// veth's programs and binding, which an apply in progress delays.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// This plugin's configuration object, as the runtime passes it.
#[derive(Debug, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The agent's API socket.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// How long to wait for the agent's answer, in seconds.
    #[serde(rename = "timeoutSeconds", default)]
    pub timeout_seconds: Option<f64>,
    /// The previous plugin's result, kept as its text: ADD passes it on unchanged.
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Box<RawValue>>,
    /// GC (1.1): the attachments the runtime still has. libcni also sends the
    /// same list as `cni.dev/attachments` (a name from an earlier draft).
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
    #[serde(rename = "cni.dev/attachments", default)]
    pub attachments: Option<Vec<Attachment>>,
}

/// One attachment in a GC's list.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(default)]
    pub ifname: String,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "the network configuration on stdin is not valid JSON for microseg-cni",
                e.to_string(),
            )
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    pub fn timeout(&self) -> Result<Duration, CniError> {
        match self.timeout_seconds {
            None => Ok(DEFAULT_TIMEOUT),
            Some(seconds) if seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0 => {
                Ok(Duration::from_secs_f64(seconds))
            }
            Some(seconds) => Err(CniError::new(
                code::INVALID_CONFIG,
                "timeoutSeconds must be a number of seconds above 0 and at most 3600",
                format!("timeoutSeconds: {seconds}"),
            )),
        }
    }
}

/// The `CNI_*` environment variables.
#[derive(Clone, Debug, Default)]
pub struct Environment {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
}

impl Environment {
    /// Read from this process's environment; an empty value counts as absent.
    pub fn from_process() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
        }
    }

    /// A variable the command needs, or the spec's "invalid environment" error.
    pub fn required<'a>(&self, value: &'a Option<String>, name: &str) -> Result<&'a str, CniError> {
        value.as_deref().ok_or_else(|| {
            let command = self.command.as_deref().unwrap_or("?");
            CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("{name} is required for {command}"),
                format!("{name} is not set"),
            )
        })
    }

    /// `namespace/name` of the pod, from `K8S_POD_NAMESPACE` and `K8S_POD_NAME` in
    /// `CNI_ARGS` (`KEY=VALUE;...`), when the runtime gives both.
    pub fn pod(&self) -> Option<String> {
        let args: BTreeMap<&str, &str> = self
            .args
            .as_deref()
            .unwrap_or_default()
            .split(';')
            .filter_map(|pair| pair.split_once('='))
            .collect();
        match (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) {
            (Some(namespace), Some(name)) if !namespace.is_empty() && !name.is_empty() => {
                Some(format!("{namespace}/{name}"))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_comes_from_cni_args() {
        let environment = Environment {
            args: Some(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=app;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc"
                    .into(),
            ),
            ..Environment::default()
        };
        assert_eq!(environment.pod().as_deref(), Some("app/web-0"));
        let only_name = Environment {
            args: Some("K8S_POD_NAME=web-0".into()),
            ..Environment::default()
        };
        assert_eq!(only_name.pod(), None);
        assert_eq!(Environment::default().pod(), None);
    }

    #[test]
    fn a_configuration_keeps_prev_result_verbatim_and_has_defaults() {
        let text = br#"{"cniVersion":"1.0.0","name":"k8s","type":"microseg-cni",
            "prevResult": {"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}], "ips":[]},
            "somethingElse": 1}"#;
        let conf = NetConf::parse(text).expect("parses");
        assert_eq!(conf.cni_version, "1.0.0");
        assert_eq!(
            conf.prev_result.expect("prevResult").get(),
            r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}], "ips":[]}"#
        );
        assert_eq!(conf.socket.map(|s| s.display().to_string()), None);
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0","timeoutSeconds":0}"#).unwrap();
        assert_eq!(conf.timeout().unwrap_err().code, code::INVALID_CONFIG);
        assert_eq!(
            NetConf::parse(b"{not json").unwrap_err().code,
            code::DECODE_FAILURE
        );
    }
}
