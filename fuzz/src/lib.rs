//! The invariants the loader fuzz targets check, one function per target. Each
//! function panics when an invariant fails, which libFuzzer reports as a crash; the
//! regression test (tests/tests/fuzz_regressions.rs) includes this file and replays
//! every saved input through the same functions.
//!
//! An input is one file: its first byte picks the file's name (even: `fuzzed.yaml`,
//! odd: `fuzzed.json`, which selects the YAML or the JSON document stream), the rest
//! is its text (lossy UTF-8).
//!
//! Invariants (both targets): nothing panics; loading fails with at least one error
//! or succeeds; every error names the file and a document of it (1-based, one that
//! exists: there are no whole-file errors for a text), and a field path, except for
//! the kinds of error listed in [`WHOLE_DOCUMENT_REASONS`]; everything loaded comes
//! from the file; what loads compiles, and the compiled maps (read with the data
//! path's lookup, `MapEvaluator`) give the reference evaluator's verdict, direction by
//! direction, on flows between the set's addresses and the edges of its ipBlocks, on
//! the ports its rules name (at most [`MAX_FLOWS`] flows an input).

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use microseg::{
    objects::{build_policy_set, parse_objects},
    policy::{
        Flow, MapEvaluator, Peer, PolicyError, PolicySet, PolicySetBuilder, PortSpec, Protocol,
        compile, documents, evaluate,
    },
};

/// Flows compared between the compiled maps and the reference evaluator per input
/// (bounded to keep executions fast).
pub const MAX_FLOWS: usize = 256;

/// Errors without a field path, by the start of their reason: each concerns the whole
/// document (or, inside a `List`, a whole item, whose path `items[N]` is then set).
pub const WHOLE_DOCUMENT_REASONS: &[&str] = &[
    // Syntax: the parsers stop at the first error (the message has line and column).
    "bad YAML: ",
    "bad JSON: ",
    // A scalar or a sequence where an object is expected.
    "document is not a mapping",
    // An apiVersion/kind pair that is not loaded; the reason names both (a missing
    // kind is reported on the field `kind`).
    "unknown kind ",
    // Two workloads with one address: the reason names the address and both owners.
    "duplicate workload address ",
];

/// The file name and text of a fuzz input (see the module documentation).
pub fn split_input(data: &[u8]) -> (&'static str, String) {
    let (selector, text) = match data.split_first() {
        Some((selector, text)) => (*selector, text),
        None => (0, &[][..]),
    };
    let name = if selector & 1 == 0 {
        "fuzzed.yaml"
    } else {
        "fuzzed.json"
    };
    (name, String::from_utf8_lossy(text).into_owned())
}

/// The input bytes for `text` loaded as `name` (the inverse of [`split_input`]).
pub fn make_input(name: &str, text: &[u8]) -> Vec<u8> {
    let selector = u8::from(name.ends_with(".json"));
    let mut input = Vec::with_capacity(text.len() + 1);
    input.push(selector);
    input.extend_from_slice(text);
    input
}

/// `policy_files`: the text loaded with `PolicySetBuilder::add_text` and `finish`,
/// then compiled.
pub fn check_policy_files(data: &[u8]) {
    let (name, text) = split_input(data);
    let file = Path::new(name);
    let last = last_document(file, &text);
    let mut builder = PolicySetBuilder::new();
    builder.add_text(file, &text);
    match builder.finish() {
        Ok(set) => check_loaded(name, last, &set),
        Err(errors) => {
            assert!(!errors.is_empty(), "{name}: load failed without an error");
            for error in errors.iter() {
                check_error(name, last, error);
            }
        }
    }
}

/// `agent_objects`: the agent's object parser (`parse_objects`), then
/// `build_policy_set` on the objects, then compiled.
pub fn check_agent_objects(data: &[u8]) {
    let (name, text) = split_input(data);
    let last = last_document(Path::new(name), &text);
    let objects = match parse_objects(name, &text) {
        Ok(objects) => objects,
        Err(errors) => {
            assert!(!errors.is_empty(), "{name}: parse failed without an error");
            for error in &errors {
                check_object_error(name, last, error);
            }
            return;
        }
    };
    for (key, object) in &objects {
        assert_eq!(&*object.file, name, "object {key} names another file");
        assert!(
            (1..=last).contains(&object.document),
            "object {key} is in document {} of {last}",
            object.document
        );
        assert!(!key.name.is_empty(), "object {key} has no name");
    }
    match build_policy_set(objects.iter()) {
        Ok(set) => check_loaded(name, last, &set),
        Err(errors) => {
            assert!(!errors.is_empty(), "{name}: build failed without an error");
            for error in errors.iter() {
                check_error(name, last, error);
            }
        }
    }
}

/// The number of the text's last document the loaders can report on: the last one
/// read, or the one with a syntax error (0 if the text has no document).
fn last_document(file: &Path, text: &str) -> usize {
    let (found, error) = documents(file, text);
    let read = found.last().map_or(0, |(source, _)| source.document);
    let failed = error.map_or(0, |error| error.source.document);
    read.max(failed)
}

/// A loaded set: everything in it comes from the file, it compiles, and the maps
/// agree with the reference evaluator.
fn check_loaded(name: &str, last: usize, set: &PolicySet) {
    let sources = set
        .policies
        .iter()
        .map(|policy| &policy.source)
        .chain(set.workloads.iter().map(|workload| &workload.source))
        .chain(
            set.namespaces
                .values()
                .filter_map(|namespace| namespace.source.as_ref()),
        );
    for source in sources {
        assert_eq!(source.file, Path::new(name), "an object from {source}");
        assert!(
            (1..=last).contains(&source.document),
            "an object from {source}, of {last} documents"
        );
    }
    check_compiled(set);
}

/// The addresses and ports a set's verdicts can change at: its workloads' addresses,
/// the first and last address of every ipBlock and except, an address outside them
/// all; the ports its rules and named ports name, and their neighbours.
fn probe_points(set: &PolicySet) -> (Vec<IpAddr>, Vec<u16>) {
    let mut addresses: BTreeSet<IpAddr> = set
        .workloads
        .iter()
        .flat_map(|workload| workload.addresses.iter().copied())
        .take(8)
        .collect();
    let mut ports: BTreeSet<u16> = [1, 65535].into();
    let rules = set
        .policies
        .iter()
        .flat_map(|policy| policy.ingress.iter().chain(policy.egress.iter()))
        .flatten();
    for rule in rules {
        for peer in rule.peers.iter().flatten() {
            if let Peer::IpBlock(block) = peer {
                for net in std::iter::once(&block.cidr).chain(&block.except) {
                    addresses.insert(net.network());
                    addresses.insert(net.broadcast());
                }
            }
        }
        for port in rule.ports.iter().flatten() {
            if let PortSpec::Range { first, last } = port.port {
                ports.extend([first, last, first.saturating_sub(1), last.saturating_add(1)]);
            }
        }
    }
    for workload in &set.workloads {
        ports.extend(workload.ports.iter().map(|port| port.port));
    }
    ports.remove(&0);
    let mut addresses: Vec<IpAddr> = addresses.into_iter().take(14).collect();
    for outside in ["192.0.2.77", "2001:db8::77"] {
        let outside = outside.parse().expect("address");
        if !addresses.contains(&outside) {
            addresses.push(outside);
        }
    }
    (addresses, ports.into_iter().take(8).collect())
}

/// The compiled maps give the reference evaluator's verdict (see the module
/// documentation).
fn check_compiled(set: &PolicySet) {
    let compiled = compile(set);
    let maps = MapEvaluator::new(&compiled.state);
    let (addresses, ports) = probe_points(set);
    let flows = addresses
        .iter()
        .flat_map(|src| addresses.iter().map(move |dst| (*src, *dst)))
        .filter(|(src, dst)| src.is_ipv4() == dst.is_ipv4())
        .flat_map(|(src, dst)| {
            Protocol::ALL.into_iter().flat_map({
                let ports = &ports;
                move |protocol| {
                    ports.iter().map(move |port| Flow {
                        src,
                        dst,
                        protocol,
                        port: *port,
                    })
                }
            })
        })
        .take(MAX_FLOWS);
    for flow in flows {
        let reference = evaluate(set, &flow);
        let map = maps.evaluate(&flow);
        assert_eq!(
            (reference.ingress.allowed, reference.egress.allowed),
            (map.ingress.allowed, map.egress.allowed),
            "{flow}: the reference evaluator (ingress: {}; egress: {}) and the compiled maps (ingress, egress) disagree",
            reference.ingress.explanation,
            reference.egress.explanation
        );
    }
}

/// One `PolicyError`: file, existing document, and a field path or a whole-document
/// reason; the message starts with `<file>: document <N>: `.
fn check_error(name: &str, last: usize, error: &PolicyError) {
    let shown = error.to_string();
    assert_eq!(
        error.source.file,
        Path::new(name),
        "error names another file: {shown}"
    );
    assert!(
        (1..=last).contains(&error.source.document),
        "error names document {} of {last}: {shown}",
        error.source.document
    );
    assert!(!error.reason.is_empty(), "error without a reason: {shown}");
    assert!(
        !error.path.is_empty()
            || WHOLE_DOCUMENT_REASONS
                .iter()
                .any(|prefix| error.reason.starts_with(prefix)),
        "error without a field path: {shown}"
    );
    let prefix = format!("{name}: document {}: ", error.source.document);
    assert!(
        shown.starts_with(&prefix),
        "error does not start with {prefix:?}: {shown}"
    );
}

/// One error of `parse_objects`: `<file>: document <N>: ` then `<field>: <reason>` or
/// a syntax error.
fn check_object_error(name: &str, last: usize, error: &str) {
    let after_file = error
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix(": document "))
        .unwrap_or_else(|| panic!("error does not name {name} and a document: {error}"));
    let digits = after_file
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(after_file.len());
    let document: usize = after_file[..digits]
        .parse()
        .unwrap_or_else(|_| panic!("error without a document number: {error}"));
    assert!(
        (1..=last).contains(&document),
        "error names document {document} of {last}: {error}"
    );
    let message = after_file[digits..]
        .strip_prefix(": ")
        .unwrap_or_else(|| panic!("error without a message: {error}"));
    let syntax = message.starts_with("bad YAML: ") || message.starts_with("bad JSON: ");
    let field = message.split_once(": ").is_some_and(|(field, reason)| {
        !field.is_empty() && !field.contains(char::is_whitespace) && !reason.is_empty()
    });
    assert!(syntax || field, "error without a field: {error}");
}
