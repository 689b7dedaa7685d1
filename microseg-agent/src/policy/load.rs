//! Reading policy and inventory files: files and directories of multi-document YAML or
//! JSON, dispatched by `apiVersion`/`kind`. Everything goes through
//! [`PolicySetBuilder`], which also runs the cross-document checks (duplicate names and
//! addresses) when it builds the [`PolicySet`].

use std::collections::{BTreeMap, btree_map::Entry};
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::cluster_policy::{
    CLUSTER_NETWORK_POLICY_API_VERSION, ClusterNetworkPolicyDocument,
    convert_cluster_network_policy, convert_node,
};
use super::error::{LoadErrors, PolicyError, Source};
use super::fail_closed::{self, RefusedPolicy, Substitute};
use super::files::{documents, policy_files};
use super::model::{ClusterPolicy, Labels, NamespaceInfo, NodeInfo, Policy, PolicySet, Workload};
use super::validate::{
    Checker, convert_namespace, convert_network_policy, convert_pod, convert_workload_document,
    namespace_labels,
};
use super::workloads::Workloads;

/// Reports each object of `sorted` (sorted by `key`) whose key its predecessor has:
/// "duplicate KIND key (first defined at ...)".
fn report_duplicates<T>(
    sorted: &[T],
    kind: &str,
    key: impl Fn(&T) -> String,
    source: impl Fn(&T) -> &Source,
    errors: &mut Vec<PolicyError>,
) {
    for pair in sorted.windows(2) {
        let (first, second) = (key(&pair[0]), key(&pair[1]));
        if first == second {
            errors.push(PolicyError::new(
                source(&pair[1]),
                "metadata.name",
                format!(
                    "duplicate {kind} {second} (first defined at {})",
                    source(&pair[0])
                ),
            ));
        }
    }
}

/// `apiVersion` of microseg's own documents.
pub const MICROSEG_API_VERSION: &str = "microseg.dev/v1";

/// Loads every policy and inventory document under `paths` (files, or directory
/// trees: see `files` for the rule).
pub fn load_paths(paths: &[PathBuf]) -> Result<PolicySet, LoadErrors> {
    let mut builder = PolicySetBuilder::new();
    for path in paths {
        builder.add_path(path);
    }
    builder.finish()
}

/// What one document converts to on its own (see
/// [`PolicySetBuilder::convert_document`]).
///
/// Boxed slices, not vectors: the agent holds one per object of the cluster, and
/// seven capacities were 56 bytes per pod of nothing.
#[derive(Clone, Debug, Default)]
pub struct ConvertedDocument {
    pub(crate) namespaces: Box<[NamespaceInfo]>,
    pub(crate) workloads: Box<[Arc<Workload>]>,
    pub(crate) policies: Box<[Arc<Policy>]>,
    pub(crate) cluster_policies: Box<[Arc<ClusterPolicy>]>,
    pub(crate) nodes: Box<[NodeInfo]>,
    pub(crate) refused: Box<[RefusedPolicy]>,
    pub(crate) errors: Box<[PolicyError]>,
}

/// Accumulates documents and errors; [`PolicySetBuilder::finish`] validates the whole.
#[derive(Debug, Default)]
pub struct PolicySetBuilder {
    namespaces: Vec<NamespaceInfo>,
    workloads: Vec<Workload>,
    policies: Vec<Policy>,
    cluster_policies: Vec<ClusterPolicy>,
    nodes: Vec<NodeInfo>,
    /// Policies refused and enforced as their substitutes (`fail_closed`).
    refused: Vec<RefusedPolicy>,
    errors: Vec<PolicyError>,
    /// The document being added comes from the Kubernetes API server (see
    /// [`PolicySetBuilder::add_api_server_document`]).
    from_api_server: bool,
    /// A policy the loader refuses is enforced as its fail-closed substitute and
    /// reported, rather than failing the set (`fail_closed`): for documents whose
    /// author cannot be told at once (the API server's, a watched directory's).
    fail_closed: bool,
}

/// What to do with fields a document has and its kind does not.
#[derive(Clone, Copy)]
enum UnknownFields {
    Refused,
    /// Refused under `metadata` (labels and names matter), ignored elsewhere: an
    /// inventory exported from a newer cluster has spec and status fields this
    /// version does not know, and microseg reads none of them.
    RefusedInMetadata,
    /// Refused under `spec` (a policy field this version does not know may narrow
    /// what the policy allows), ignored elsewhere (the API server's metadata and
    /// status fields).
    RefusedInSpec,
    Ignored,
}

/// Deserializes `value` as a `kind`, naming the field of a type error, and refusing
/// unknown fields as `unknown` says; `None` after recording the errors.
fn read_object<T: serde::de::DeserializeOwned>(
    checker: &mut Checker<'_>,
    kind: &str,
    value: &serde_json::Value,
    unknown: UnknownFields,
) -> Option<T> {
    let mut track = serde_path_to_error::Track::new();
    let mut ignored = Vec::new();
    let deserializer = serde_path_to_error::Deserializer::new(value, &mut track);
    let result: Result<T, _> =
        serde_ignored::deserialize(deserializer, |path| ignored.push(field_path(&path)));
    let object = match result {
        Ok(object) => object,
        Err(error) => {
            let (field, reason) = serde_error_location(&track.path(), &error.to_string());
            checker.error(&field, format!("cannot read {kind}: {reason}"));
            return None;
        }
    };
    let refused: Vec<String> = ignored
        .into_iter()
        .filter(|path| match unknown {
            UnknownFields::Refused => true,
            UnknownFields::RefusedInMetadata => path.starts_with("metadata."),
            UnknownFields::RefusedInSpec => {
                path.starts_with("spec.") && !is_cluster_policy_peer_field(kind, path)
            }
            UnknownFields::Ignored => false,
        })
        .collect();
    for path in &refused {
        checker.error(path, format!("unknown field of a {kind} (misspelt?)"));
    }
    refused.is_empty().then_some(object)
}

/// A field of a ClusterNetworkPolicy rule peer (`spec.ingress[0].from[1].x`): a
/// peer type this version does not know is read as a peer it cannot read, which
/// fails closed by itself (`cluster_policy::convert_rule`), so that the rest of the
/// policy is enforced as written.
fn is_cluster_policy_peer_field(kind: &str, path: &str) -> bool {
    if kind != "ClusterNetworkPolicy" {
        return false;
    }
    let Some(rest) = path
        .strip_prefix("spec.ingress[")
        .or_else(|| path.strip_prefix("spec.egress["))
    else {
        return false;
    };
    let Some((_, rest)) = rest.split_once("].") else {
        return false;
    };
    rest.starts_with("from[") || rest.starts_with("to[")
}

/// Where a deserialization error is: serde_path_to_error's path, and for a missing
/// field the field itself (serde reports it on the object that lacks it).
pub(crate) fn serde_error_location(
    path: &serde_path_to_error::Path,
    message: &str,
) -> (String, String) {
    let parent = match path.to_string() {
        root if root == "." => String::new(),
        other => other,
    };
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| field);
    match missing {
        Some(field) if parent.is_empty() => (field.to_owned(), "is required".to_owned()),
        Some(field) => (format!("{parent}.{field}"), "is required".to_owned()),
        // An empty key (YAML allows one) shows as nothing in a path: name it.
        None if parent.is_empty() || parent.ends_with('.') => {
            (format!("{parent}\"\""), message.to_owned())
        }
        None => (parent, message.to_owned()),
    }
}

/// A field path in the loader's style (`spec.ingress[0].from`) from serde_ignored's.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    match path {
        serde_ignored::Path::Root => String::new(),
        serde_ignored::Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        serde_ignored::Path::Map { parent, key } => {
            let parent = field_path(parent);
            // An empty key (YAML allows one) is still a field someone wrote.
            let key = if key.is_empty() { "\"\"" } else { key.as_str() };
            if parent.is_empty() {
                key.to_owned()
            } else {
                format!("{parent}.{key}")
            }
        }
        serde_ignored::Path::Some { parent }
        | serde_ignored::Path::NewtypeStruct { parent }
        | serde_ignored::Path::NewtypeVariant { parent } => field_path(parent),
    }
}

impl PolicySetBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a file (whatever its name) or a directory tree (see `files` for which
    /// of its files are read).
    pub fn add_path(&mut self, path: &Path) {
        match policy_files(&[path.to_owned()]) {
            Ok(files) => {
                for file in files {
                    self.add_file(&file);
                }
            }
            Err(mut errors) => self.errors.append(&mut errors),
        }
    }

    fn add_file(&mut self, path: &Path) {
        match fs::read_to_string(path) {
            Ok(text) => self.add_text(path, &text),
            Err(error) => self.errors.push(PolicyError::new(
                &Source::new(path, 0),
                "",
                format!("cannot read file: {error}"),
            )),
        }
    }

    /// Adds the documents of one file's text (see [`documents`]).
    pub fn add_text(&mut self, file: &Path, text: &str) {
        let (found, error) = documents(file, text);
        for (source, value) in found {
            self.add_document(&source, &value);
        }
        self.errors.extend(error);
    }

    /// Adds one parsed document, dispatching on `apiVersion` and `kind`.
    pub fn add_document(&mut self, source: &Source, value: &serde_json::Value) {
        self.add_object(source, String::new(), value);
    }

    /// Adds an object the Kubernetes API server sent: it validated the object, and
    /// fields newer than this version's Kubernetes types are ignored, not refused.
    pub fn add_api_server_document(&mut self, source: &Source, value: &serde_json::Value) {
        self.from_api_server = true;
        self.add_object(source, String::new(), value);
        self.from_api_server = false;
    }

    fn inventory_unknown_fields(&self) -> UnknownFields {
        if self.from_api_server {
            UnknownFields::Ignored
        } else {
            UnknownFields::RefusedInMetadata
        }
    }

    fn add_object(&mut self, source: &Source, prefix: String, value: &serde_json::Value) {
        if value.is_null() {
            return; // An empty YAML document (e.g. a trailing `---`).
        }
        let unknown = self.inventory_unknown_fields();
        let mut checker = Checker {
            source,
            prefix,
            errors: &mut self.errors,
        };
        let Some(object) = value.as_object() else {
            checker.error("", "document is not a mapping");
            return;
        };
        let api_version = object
            .get("apiVersion")
            .and_then(|value| value.as_str())
            .unwrap_or("");
        let kind = object
            .get("kind")
            .and_then(|value| value.as_str())
            .unwrap_or("");
        match (api_version, kind) {
            ("networking.k8s.io/v1", "NetworkPolicy") => {
                // Every field of a policy counts: a misspelt one (`exept`) would
                // silently change what it allows. From the API server, which checked
                // the spelling, a spec field this version does not know still counts.
                let unknown = match unknown {
                    UnknownFields::Ignored => UnknownFields::RefusedInSpec,
                    _ => UnknownFields::Refused,
                };
                let errors_before = checker.errors.len();
                if let Some(policy) =
                    read_object::<NetworkPolicy>(&mut checker, "NetworkPolicy", value, unknown)
                    && let Some(policy) = convert_network_policy(&mut checker, &policy)
                {
                    self.policies.push(policy);
                }
                self.substitute_if_refused(source, kind, value, errors_before);
            }
            (CLUSTER_NETWORK_POLICY_API_VERSION, "ClusterNetworkPolicy") => {
                // As for NetworkPolicy, every field counts.
                let unknown = match unknown {
                    UnknownFields::Ignored => UnknownFields::RefusedInSpec,
                    _ => UnknownFields::Refused,
                };
                let errors_before = checker.errors.len();
                if let Some(document) = read_object::<ClusterNetworkPolicyDocument>(
                    &mut checker,
                    "ClusterNetworkPolicy",
                    value,
                    unknown,
                ) && let Some(policy) =
                    convert_cluster_network_policy(&mut checker, &document, self.from_api_server)
                {
                    self.cluster_policies.push(policy);
                }
                self.substitute_if_refused(source, kind, value, errors_before);
            }
            ("v1", "Node") => {
                if let Some(node) = read_object::<Node>(&mut checker, "Node", value, unknown)
                    && let Some(node) = convert_node(&mut checker, &node)
                {
                    self.nodes.push(node);
                }
            }
            ("v1", "Namespace") => {
                if let Some(namespace) =
                    read_object::<K8sNamespace>(&mut checker, "Namespace", value, unknown)
                    && let Some(namespace) = convert_namespace(&mut checker, &namespace)
                {
                    self.namespaces.push(namespace);
                }
            }
            ("v1", "Pod") => {
                if let Some(pod) = read_object::<Pod>(&mut checker, "Pod", value, unknown)
                    && let Some(workload) = convert_pod(&mut checker, &pod)
                {
                    self.workloads.push(workload);
                }
            }
            (MICROSEG_API_VERSION, "Workload") => {
                if let Some(workload) = convert_workload_document(&mut checker, value) {
                    self.workloads.push(workload);
                }
            }
            ("v1", "List")
            | ("networking.k8s.io/v1", "NetworkPolicyList")
            | ("v1", "PodList" | "NamespaceList" | "NodeList")
            | (CLUSTER_NETWORK_POLICY_API_VERSION, "ClusterNetworkPolicyList")
            | (MICROSEG_API_VERSION, "List" | "WorkloadList") => {
                let prefix = checker.prefix.clone();
                match object.get("items") {
                    Some(serde_json::Value::Array(items)) => {
                        for (index, item) in items.iter().enumerate() {
                            let item_prefix = if prefix.is_empty() {
                                format!("items[{index}]")
                            } else {
                                format!("{prefix}.items[{index}]")
                            };
                            self.add_object(source, item_prefix, item);
                        }
                    }
                    None | Some(serde_json::Value::Null) => {}
                    Some(_) => checker.error("items", "must be a list"),
                }
            }
            _ => {
                let field = if kind.is_empty() { "kind" } else { "" };
                checker.error(
                    field,
                    format!(
                        "unknown kind {kind:?} of apiVersion {api_version:?} (expected networking.k8s.io/v1 NetworkPolicy, {CLUSTER_NETWORK_POLICY_API_VERSION} ClusterNetworkPolicy, v1 Namespace, v1 Pod, v1 Node, {MICROSEG_API_VERSION} Workload, or a List of them)"
                    ),
                );
            }
        }
    }

    /// With fail-closed substitution on, a policy document the loader refuses is
    /// enforced as its substitute and reported instead of being an error
    /// ([`super::fail_closed`]).
    pub fn fail_closed(mut self, on: bool) -> Self {
        self.fail_closed = on;
        self
    }

    /// If the policy document just read (errors from `errors_before` on) was
    /// refused and substitution is on, puts its substitute in its place.
    fn substitute_if_refused(
        &mut self,
        source: &Source,
        kind: &str,
        value: &serde_json::Value,
        errors_before: usize,
    ) {
        if !self.fail_closed || self.errors.len() == errors_before {
            return;
        }
        let errors = self.errors.split_off(errors_before);
        match fail_closed::substitute(source, kind, value, &errors) {
            Some((substitute, report)) => {
                match substitute {
                    Substitute::Policy(policy) => self.policies.push(policy),
                    Substitute::ClusterPolicy(policy) => self.cluster_policies.push(policy),
                }
                self.refused.push(report);
            }
            None => self.errors.extend(errors),
        }
    }

    /// Converts one document on its own, as `add_document` (or, with
    /// `from_api_server`, `add_api_server_document`) would: a document's conversion
    /// depends on nothing else, so the agent keeps it per object and adds it again
    /// with [`PolicySetBuilder::add_converted`] while the object is unchanged.
    pub fn convert_document(
        source: &Source,
        value: &serde_json::Value,
        from_api_server: bool,
    ) -> ConvertedDocument {
        Self::convert_document_with(source, value, from_api_server, false)
    }

    /// As [`PolicySetBuilder::convert_document`], with fail-closed substitution
    /// on or off ([`PolicySetBuilder::fail_closed`]).
    pub fn convert_document_with(
        source: &Source,
        value: &serde_json::Value,
        from_api_server: bool,
        fail_closed: bool,
    ) -> ConvertedDocument {
        let mut builder = PolicySetBuilder::new().fail_closed(fail_closed);
        builder.from_api_server = from_api_server;
        builder.add_object(source, String::new(), value);
        // Held per object of the cluster: a vector grown by one push has room for
        // four (four workloads' worth, about 800 bytes, for one pod).
        fn exact<T>(items: Vec<T>) -> Box<[T]> {
            items.into_boxed_slice()
        }
        ConvertedDocument {
            namespaces: exact(builder.namespaces),
            // Collected in place: the shared workloads would keep the buffer sized
            // for the workloads themselves.
            workloads: exact(builder.workloads.into_iter().map(Arc::new).collect()),
            policies: exact(builder.policies.into_iter().map(Arc::new).collect()),
            cluster_policies: exact(builder.cluster_policies.into_iter().map(Arc::new).collect()),
            nodes: exact(builder.nodes),
            refused: exact(builder.refused),
            errors: exact(builder.errors),
        }
    }

    /// Adds what [`PolicySetBuilder::convert_document`] made of a document.
    pub fn add_converted(&mut self, converted: &ConvertedDocument) {
        self.namespaces.extend(converted.namespaces.iter().cloned());
        self.workloads
            .extend(converted.workloads.iter().map(|w| Workload::clone(w)));
        self.policies
            .extend(converted.policies.iter().map(|p| Policy::clone(p)));
        self.cluster_policies.extend(
            converted
                .cluster_policies
                .iter()
                .map(|p| ClusterPolicy::clone(p)),
        );
        self.nodes.extend(converted.nodes.iter().cloned());
        self.refused.extend(converted.refused.iter().cloned());
        self.errors.extend(converted.errors.iter().cloned());
    }

    /// Adds an already deserialized NetworkPolicy (validated like a file's).
    pub fn add_network_policy(&mut self, source: &Source, policy: &NetworkPolicy) {
        let mut checker = Checker {
            source,
            prefix: String::new(),
            errors: &mut self.errors,
        };
        if let Some(policy) = convert_network_policy(&mut checker, policy) {
            self.policies.push(policy);
        }
    }

    /// Adds a namespace by name and labels (the metadata.name label is implied).
    pub fn add_namespace(
        &mut self,
        source: &Source,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) {
        self.namespaces.push(NamespaceInfo {
            name: name.to_string(),
            labels: namespace_labels(name, labels.into()),
            source: Some(source.clone()),
        });
    }

    /// Adds a workload built in memory. Cross-workload checks still apply in `finish`.
    pub fn add_workload(&mut self, workload: Workload) {
        self.workloads.push(workload);
    }

    /// Errors recorded so far.
    pub fn errors(&self) -> &[PolicyError] {
        &self.errors
    }

    /// Runs the cross-document checks and indexes the result.
    pub fn finish(self) -> Result<PolicySet, LoadErrors> {
        let PolicySetBuilder {
            namespaces: namespace_list,
            mut workloads,
            mut policies,
            mut cluster_policies,
            mut nodes,
            mut refused,
            mut errors,
            from_api_server: _,
            fail_closed: _,
        } = self;

        let mut namespaces: BTreeMap<String, NamespaceInfo> = BTreeMap::new();
        for namespace in namespace_list {
            match namespaces.entry(namespace.name.clone()) {
                Entry::Vacant(slot) => {
                    slot.insert(namespace);
                }
                Entry::Occupied(first) => {
                    let source = namespace.source.clone().unwrap_or_default();
                    errors.push(PolicyError::new(
                        &source,
                        "metadata.name",
                        format!(
                            "duplicate namespace {} (first defined at {})",
                            namespace.name,
                            first.get().source.clone().unwrap_or_default()
                        ),
                    ));
                }
            }
        }

        // Duplicate names, addresses and interfaces, by index into `workloads`: nothing
        // is copied unless it is reported. The first definition wins.
        let mut keep = vec![true; workloads.len()];
        {
            let mut seen_workloads: HashMap<(&str, &str), usize> =
                HashMap::with_capacity(workloads.len());
            let mut address_owner: HashMap<IpAddr, usize> = HashMap::with_capacity(workloads.len());
            let mut interface_owner: HashMap<&str, usize> = HashMap::new();
            for (index, workload) in workloads.iter().enumerate() {
                let key = (workload.namespace.as_str(), workload.name.as_str());
                if let Some(&first) = seen_workloads.get(&key) {
                    errors.push(PolicyError::new(
                        &workload.source,
                        "metadata.name",
                        format!(
                            "duplicate workload name {} (first defined at {})",
                            workload.key(),
                            workloads[first].source
                        ),
                    ));
                    keep[index] = false;
                    continue;
                }
                seen_workloads.insert(key, index);
                let mut clash = false;
                for address in &workload.addresses {
                    if let Some(&owner) = address_owner.get(address) {
                        errors.push(PolicyError::new(
                            &workload.source,
                            "",
                            format!(
                                "duplicate workload address {address}: {} has it and so does {} ({})",
                                workload.key(),
                                workloads[owner].key(),
                                workloads[owner].source
                            ),
                        ));
                        clash = true;
                    }
                }
                if let Some(interface) = &workload.interface {
                    if let Some(&owner) = interface_owner.get(interface.as_str()) {
                        errors.push(PolicyError::new(
                            &workload.source,
                            "spec.interface",
                            format!(
                                "interface {interface} is already the interface of {} ({}): an interface belongs to one workload",
                                workloads[owner].key(),
                                workloads[owner].source
                            ),
                        ));
                        clash = true;
                    } else {
                        interface_owner.insert(interface, index);
                    }
                }
                if clash {
                    keep[index] = false;
                    continue;
                }
                for address in &workload.addresses {
                    address_owner.insert(*address, index);
                }
            }
        }
        let mut index = 0;
        workloads.retain(|_| {
            index += 1;
            keep[index - 1]
        });

        // Workloads in namespaces nobody described get a namespace with only the name
        // label, so that namespaceSelectors on kubernetes.io/metadata.name still work.
        for workload in &workloads {
            if !namespaces.contains_key(&workload.namespace) {
                namespaces.insert(
                    workload.namespace.clone(),
                    NamespaceInfo {
                        name: workload.namespace.clone(),
                        labels: namespace_labels(&workload.namespace, Labels::new()),
                        source: None,
                    },
                );
            }
        }

        policies.sort_by(|left, right| {
            (&left.namespace, &left.name).cmp(&(&right.namespace, &right.name))
        });
        report_duplicates(
            &policies,
            "NetworkPolicy",
            Policy::key,
            |p| &p.source,
            &mut errors,
        );
        cluster_policies.sort_by(|left, right| left.name.cmp(&right.name));
        report_duplicates(
            &cluster_policies,
            "ClusterNetworkPolicy",
            |p| p.name.clone(),
            |p| &p.source,
            &mut errors,
        );
        cluster_policies.sort_by(|left, right| left.precedence().cmp(&right.precedence()));
        nodes.sort_by(|left, right| left.name.cmp(&right.name));
        report_duplicates(
            &nodes,
            "Node",
            |n| n.name.clone(),
            |n| &n.source,
            &mut errors,
        );

        if !errors.is_empty() {
            errors.sort_by(|left, right| left.source.cmp(&right.source));
            return Err(LoadErrors::from(errors));
        }

        // Slots in (namespace, name) order, as a fresh set's positions.
        workloads.sort_by(|left, right| {
            (&left.namespace, &left.name).cmp(&(&right.namespace, &right.name))
        });
        let workloads: Workloads = workloads.into_iter().collect();
        let address_index = workloads
            .iter_slots()
            .flat_map(|(slot, workload)| {
                workload
                    .addresses
                    .iter()
                    .map(move |address| (*address, slot))
            })
            .collect();
        refused.sort_by_key(RefusedPolicy::key);
        Ok(PolicySet {
            namespaces,
            workloads,
            policies: policies.into_iter().map(Arc::new).collect(),
            cluster_policies: cluster_policies.into_iter().map(Arc::new).collect(),
            nodes,
            refused_policies: refused,
            address_index,
        })
    }
}
