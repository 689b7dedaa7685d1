//! Where `microseg diff` and `microseg graph` get their policy and flows: files, or
//! the running agent (its objects through `Request::Export`, its flow history
//! through `Request::Flows`).

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::{
    api::{Request, client::Client},
    objects::{ObjectKey, ObjectMap, StoredObject, read_paths},
    review::flows::{ObservedFlow, parse_event, read_flows_file},
};

/// How many events of the agent's history are asked for: all it keeps.
const HISTORY: usize = 10_000_000;

/// The objects of policy and inventory files or directories (read as `apply -f`
/// reads them); errors name the file and document.
pub fn file_objects(paths: &[PathBuf]) -> anyhow::Result<ObjectMap> {
    read_paths(paths).map_err(|errors| {
        anyhow::anyhow!(
            "the files could not be read ({} error{}):\n  {}",
            errors.len(),
            if errors.len() == 1 { "" } else { "s" },
            errors.join("\n  ")
        )
    })
}

/// Every object the running agent enforces.
pub fn live_objects(socket: &Path) -> anyhow::Result<ObjectMap> {
    let data = Client::connect(socket)?.call(&Request::Export)?;
    let objects: Vec<(ObjectKey, StoredObject)> =
        serde_json::from_value(data["objects"].clone())
            .context("the agent's exported objects could not be read")?;
    Ok(objects.into_iter().collect())
}

/// The flows of the agent's event history.
pub fn agent_flows(socket: &Path) -> anyhow::Result<Vec<ObservedFlow>> {
    let mut flows = Vec::new();
    Client::connect(socket)?.stream(
        &Request::Flows {
            last: HISTORY,
            follow: false,
            filter: crate::flow_filter::FlowFilter::default(),
        },
        |event| {
            flows.extend(parse_event(&event));
            true
        },
    )?;
    Ok(flows)
}

/// Flows from `--flows FILE` if given, else from the agent when `from_agent`.
pub fn observed_flows(
    file: Option<&Path>,
    socket: &Path,
    from_agent: bool,
) -> anyhow::Result<Vec<ObservedFlow>> {
    match file {
        Some(file) => read_flows_file(file),
        None if from_agent => agent_flows(socket),
        None => Ok(Vec::new()),
    }
}
