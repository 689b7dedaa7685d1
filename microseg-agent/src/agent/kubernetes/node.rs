//! This node's pods.
//!
//! A pod is local when its `spec.nodeName` is this node's name. Its host-side veth is
//! the veth whose peer holds the pod's IP (`agent::veths`); `agent::interfaces`
//! attaches TC to it (pinned, as the configured interfaces are), binds it to the pod
//! for source validation, and detaches when the pod leaves the node or the API
//! server.

use std::{collections::BTreeMap, net::IpAddr};

use super::watch::pod_addresses;
use crate::objects::{ObjectKey, ObjectMap};

/// Addresses of this node's `pods` as `objects` (the enforced objects) give them,
/// with their `namespace/name`.
pub fn local_pod_addresses<'a>(
    objects: &ObjectMap,
    pods: impl Iterator<Item = &'a ObjectKey>,
) -> BTreeMap<IpAddr, String> {
    let mut addresses = BTreeMap::new();
    for key in pods {
        let Some(object) = objects.get(key) else {
            continue;
        };
        for address in pod_addresses(&object.value.parse()) {
            addresses.insert(address, format!("{}/{}", key.namespace, key.name));
        }
    }
    addresses
}
