//! Host-side veths and the addresses of their peers, found by one rule: **a veth in
//! the agent's network namespace whose peer, in a network namespace named under
//! `/var/run/netns`, holds an address**. containerd and CRI-O pin every pod sandbox's
//! namespace there (`cni-<uuid>`), so the rule holds for any CNI plugin that gives
//! pods a veth (bridge, ptp, Calico, ...) without trusting interface names or
//! routes; `ip netns add` namespaces are found the same way. It is read with
//! iproute2, in the agent's namespace:
//!
//! 1. `ip -j link show type veth`: each veth's peer ifindex (`link_index`) and the
//!    id of the peer's namespace (`link_netnsid`);
//! 2. `ip -j netns list`: namespace names and their ids as seen from here;
//! 3. `ip -n <ns> -j addr show`: the addresses of the peer (only for veths not seen
//!    before: the answer is cached by veth name, ifindex and namespace).
//!
//! A veth whose peer's namespace is named like a pod sandbox (`cni-` for containerd)
//! is a pod's even before it has an address or its pod is known: it is enforced
//! from the moment it is found, denying until its pod is known.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    process::Command,
};

use anyhow::{Context, bail};
use serde::Deserialize;

#[derive(Deserialize)]
struct Link {
    ifindex: u32,
    ifname: String,
    link_index: Option<u32>,
    link_netnsid: Option<i64>,
}

#[derive(Deserialize)]
struct NetnsEntry {
    name: String,
    id: Option<i64>,
}

#[derive(Deserialize)]
struct AddressedLink {
    ifindex: u32,
    #[serde(default)]
    addr_info: Vec<AddressInfo>,
}

#[derive(Deserialize)]
struct AddressInfo {
    local: Option<IpAddr>,
}

/// Host-side veths and the addresses of their peers, cached between scans.
#[derive(Default)]
pub struct VethScanner {
    /// (veth name, ifindex, peer namespace) -> the peer's addresses.
    peers: HashMap<(String, u32, String), Vec<IpAddr>>,
}

/// What one scan found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Veths {
    /// Address -> host-side veth, for every veth whose peer is in a named namespace.
    pub by_address: BTreeMap<IpAddr, String>,
    /// Host-side veths whose peer is in a pod sandbox's namespace (its name starts
    /// with one of the sandbox prefixes), with or without an address yet.
    pub sandboxes: BTreeSet<String>,
    /// Host-side veths whose peer's addresses could not be read this time (its
    /// namespace may be going away, or `ip` failed there): not known to be gone, so
    /// one already enforced stays enforced.
    pub unreadable: BTreeSet<String>,
}

impl VethScanner {
    /// Every veth whose peer is in a named namespace; those whose namespace's name
    /// starts with one of `sandbox_prefixes` are pod sandboxes.
    pub fn scan(&mut self, sandbox_prefixes: &[String]) -> anyhow::Result<Veths> {
        let links: Vec<Link> = ip_json(&["-j", "link", "show", "type", "veth"])?;
        let namespaces: Vec<NetnsEntry> = ip_json(&["-j", "netns", "list"])?;
        let by_id: HashMap<i64, String> = namespaces
            .into_iter()
            .filter_map(|ns| Some((ns.id?, ns.name)))
            .collect();
        let mut found = Veths::default();
        let mut seen = BTreeSet::new();
        for link in links {
            let (Some(peer_index), Some(nsid)) = (link.link_index, link.link_netnsid) else {
                continue;
            };
            let Some(namespace) = by_id.get(&nsid) else {
                continue;
            };
            if sandbox_prefixes
                .iter()
                .any(|prefix| namespace.starts_with(prefix.as_str()))
            {
                found.sandboxes.insert(link.ifname.clone());
            }
            let key = (link.ifname.clone(), link.ifindex, namespace.clone());
            seen.insert(key.clone());
            let addresses = match self.peers.get(&key) {
                Some(addresses) => addresses.clone(),
                None => {
                    let Ok(peers) =
                        ip_json::<Vec<AddressedLink>>(&["-n", namespace, "-j", "addr", "show"])
                    else {
                        // The pod (and its namespace) may be going away right now,
                        // or `ip` failed there: the veth is not known to be gone.
                        found.unreadable.insert(link.ifname.clone());
                        continue;
                    };
                    let addresses: Vec<IpAddr> = peers
                        .into_iter()
                        .filter(|peer| peer.ifindex == peer_index)
                        .flat_map(|peer| peer.addr_info)
                        .filter_map(|info| info.local)
                        .collect();
                    // A pod's address may be added just after its veth: cache only
                    // an answer that has one.
                    if !addresses.is_empty() {
                        self.peers.insert(key, addresses.clone());
                    }
                    addresses
                }
            };
            for address in addresses {
                found.by_address.insert(address, link.ifname.clone());
            }
        }
        self.peers.retain(|key, _| seen.contains(key));
        Ok(found)
    }
}

fn ip_json<T: serde::de::DeserializeOwned>(args: &[&str]) -> anyhow::Result<T> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        // `ip -j netns list` prints nothing at all when there is no namespace.
        return serde_json::from_str("[]").context("empty list");
    }
    serde_json::from_slice(&output.stdout).with_context(|| format!("ip {}", args.join(" ")))
}
