//! Where the Hubble API listens (`hubble:` in the agent's configuration).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The Unix socket's file name when it goes next to the agent's API socket (the
/// default: `/run/microseg/hubble.sock`).
pub const DEFAULT_SOCKET_NAME: &str = "hubble.sock";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HubbleConfig {
    /// The Unix socket (`hubble observe --server unix://PATH`); unset: `hubble.sock`
    /// next to the API socket; an empty path turns it off. Same mode as the API
    /// socket (`socketMode`).
    pub socket: Option<PathBuf>,
    /// A loopback `ip:port` to serve on as well (`hubble observe --server
    /// 127.0.0.1:4245`); empty (the default): no TCP port. Only loopback: the API has
    /// no TLS and no authentication, and flows name every workload and address.
    pub listen_address: String,
}

impl HubbleConfig {
    /// The Unix socket path, if the socket is on.
    pub fn socket_path(&self, api_socket: &Path) -> Option<PathBuf> {
        match &self.socket {
            Some(path) if path.as_os_str().is_empty() => None,
            Some(path) => Some(path.clone()),
            None => Some(
                api_socket
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(DEFAULT_SOCKET_NAME),
            ),
        }
    }

    /// The TCP address, if one is set; refused unless it is loopback.
    pub fn listen_socket_address(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.listen_address.is_empty() {
            return Ok(None);
        }
        let address: SocketAddr = self.listen_address.parse().with_context(|| {
            format!(
                "hubble.listenAddress {:?} is not ip:port",
                self.listen_address
            )
        })?;
        if !address.ip().is_loopback() {
            bail!(
                "hubble.listenAddress {address} is not a loopback address: the Hubble API has no TLS and no authentication, so it serves only this host (use the Unix socket, or a TLS proxy in front of a loopback port)"
            );
        }
        Ok(Some(address))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.listen_socket_address().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_goes_next_to_the_api_socket_unless_set_or_turned_off() {
        let api = Path::new("/run/microseg/microseg.sock");
        let default = HubbleConfig::default();
        assert_eq!(
            default.socket_path(api),
            Some(PathBuf::from("/run/microseg/hubble.sock"))
        );
        let off = HubbleConfig {
            socket: Some(PathBuf::new()),
            ..HubbleConfig::default()
        };
        assert_eq!(off.socket_path(api), None);
        let set = HubbleConfig {
            socket: Some("/tmp/h.sock".into()),
            ..HubbleConfig::default()
        };
        assert_eq!(set.socket_path(api), Some(PathBuf::from("/tmp/h.sock")));
    }

    #[test]
    fn only_a_loopback_tcp_address_is_accepted() {
        let with = |address: &str| HubbleConfig {
            listen_address: address.to_owned(),
            ..HubbleConfig::default()
        };
        assert_eq!(with("").listen_socket_address().unwrap(), None);
        assert!(with("127.0.0.1:4245").validate().is_ok());
        assert!(with("[::1]:4245").validate().is_ok());
        let error = with("0.0.0.0:4244").validate().unwrap_err().to_string();
        assert!(error.contains("not a loopback address"), "{error}");
        assert!(with("localhost:4245").validate().is_err());
    }
}
