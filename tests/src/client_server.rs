//! The agent tests' smallest application: a client and a server (app/client and
//! app/server, roles `client` and `server`) on the lab's bridge, and a policy that
//! lets the client reach one TCP port of the server.

use std::net::IpAddr;

pub const CLIENT: &str = "10.80.0.11";
pub const SERVER: &str = "10.80.0.21";

/// The two workloads.
pub const INVENTORY: &str = r#"
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: client, namespace: app, labels: {role: client}}
spec: {addresses: [10.80.0.11]}
---
apiVersion: microseg.dev/v1
kind: Workload
metadata: {name: server, namespace: app, labels: {role: server}}
spec: {addresses: [10.80.0.21]}
"#;

/// NetworkPolicy `app/server-ingress`: the server accepts TCP on `port` from the
/// client, nothing else.
pub fn server_policy(port: u16) -> String {
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: server-ingress, namespace: app}}
spec:
  podSelector: {{matchLabels: {{role: server}}}}
  policyTypes: [Ingress]
  ingress:
    - from: [{{podSelector: {{matchLabels: {{role: client}}}}}}]
      ports: [{{protocol: TCP, port: {port}}}]
"#
    )
}

pub fn server_address() -> IpAddr {
    SERVER.parse().expect("address")
}

/// The lab hosts of this application.
pub const HOSTS: [(&str, &str); 2] = [("app/client", CLIENT), ("app/server", SERVER)];
