//! The parts of the previous plugin's result this plugin reads: the interfaces
//! (which is the container's, which are on the host) and the pod's addresses. The
//! 0.3.x to 1.x results agree on these fields.

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::spec::{CniError, code};

#[derive(Debug, Default, Deserialize)]
pub struct PrevResult {
    #[serde(default)]
    pub interfaces: Vec<ResultInterface>,
    #[serde(default)]
    pub ips: Vec<ResultIp>,
}

#[derive(Debug, Deserialize)]
pub struct ResultInterface {
    pub name: String,
    /// The container's namespace for a container interface; empty or absent for a
    /// host interface.
    #[serde(default)]
    pub sandbox: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ResultIp {
    /// `address/prefix`.
    pub address: String,
    /// Index into `interfaces`.
    #[serde(default)]
    pub interface: Option<usize>,
}

impl ResultInterface {
    fn in_sandbox(&self) -> bool {
        self.sandbox.as_deref().is_some_and(|s| !s.is_empty())
    }
}

impl PrevResult {
    pub fn parse(raw: &RawValue) -> Result<Self, CniError> {
        serde_json::from_str(raw.get()).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "prevResult is not a CNI result microseg-cni can read",
                e.to_string(),
            )
        })
    }

    /// The interfaces the result lists on the host (no sandbox): where the main
    /// plugin says the container's veth peer is.
    pub fn host_interfaces(&self) -> Vec<&str> {
        self.interfaces
            .iter()
            .filter(|interface| !interface.in_sandbox())
            .map(|interface| interface.name.as_str())
            .collect()
    }

    /// The pod's addresses: those of the container interface `ifname`, and those
    /// the result gives no interface for.
    pub fn pod_addresses(&self, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
        let mut addresses = Vec::new();
        for ip in &self.ips {
            let pods = match ip.interface {
                None => true,
                Some(index) => self
                    .interfaces
                    .get(index)
                    .is_some_and(|interface| interface.in_sandbox() && interface.name == ifname),
            };
            if !pods {
                continue;
            }
            let address = ip.address.split('/').next().unwrap_or_default();
            let address: IpAddr = address.parse().map_err(|_| {
                CniError::new(
                    code::DECODE_FAILURE,
                    "prevResult has an address that is not an IP address",
                    format!("ips: {:?}", ip.address),
                )
            })?;
            if !addresses.contains(&address) {
                addresses.push(address);
            }
        }
        Ok(addresses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the reference bridge plugin (with host-local, dual stack) returns.
    const BRIDGE_RESULT: &str = r#"{
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
            {"name": "veth1234abcd", "mac": "aa:bb:cc:dd:ee:02"},
            {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/var/run/netns/cni-1"}
        ],
        "ips": [
            {"interface": 2, "address": "10.22.0.5/24", "gateway": "10.22.0.1"},
            {"interface": 2, "address": "fd22::5/64", "gateway": "fd22::1"},
            {"interface": 0, "address": "10.22.0.1/24"}
        ],
        "dns": {}
    }"#;

    fn parse(text: &str) -> PrevResult {
        let raw: Box<RawValue> = serde_json::from_str(text).expect("json");
        PrevResult::parse(&raw).expect("result")
    }

    #[test]
    fn the_host_interfaces_and_the_pods_addresses_are_read() {
        let result = parse(BRIDGE_RESULT);
        assert_eq!(result.host_interfaces(), ["cni0", "veth1234abcd"]);
        let addresses: Vec<String> = result
            .pod_addresses("eth0")
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        // Not the bridge's own address.
        assert_eq!(addresses, ["10.22.0.5", "fd22::5"]);
    }

    #[test]
    fn a_0_3_result_without_interface_indexes_gives_all_its_addresses() {
        let result = parse(
            r#"{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.0.7/16"}],"interfaces":[]}"#,
        );
        assert!(result.host_interfaces().is_empty());
        assert_eq!(
            result.pod_addresses("eth0").unwrap(),
            ["10.1.0.7".parse::<IpAddr>().unwrap()]
        );
        let bad = parse(r#"{"ips":[{"address":"nonsense/8"}]}"#);
        assert_eq!(
            bad.pod_addresses("eth0").unwrap_err().code,
            code::DECODE_FAILURE
        );
    }
}
