//! The CNI commands. ADD finds the pod's veth on the host, asks the agent to
//! enforce on it and passes the previous result on unchanged; the runtime starts
//! the pod's containers only once it returns, so the pod's first packet meets the
//! programs. An ADD the agent cannot serve fails, and the pod does not start.

use std::path::Path;

use serde_json::json;

use crate::{
    agent::{self, AgentError, AgentRequest},
    config::{Environment, NetConf},
    link::{self, Link, LinkQuery},
    result::PrevResult,
    spec::{self, CniError, code},
};

/// What the plugin prints and how it exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    /// Lines for stderr, which runtimes log.
    pub stderr: Vec<String>,
    pub exit_code: i32,
}

impl Outcome {
    fn success(stdout: String, stderr: Vec<String>) -> Self {
        Self {
            stdout,
            stderr,
            exit_code: 0,
        }
    }

    fn failure(error: &CniError, cni_version: &str, mut stderr: Vec<String>) -> Self {
        stderr.push(format!("microseg-cni: {}: {}", error.msg, error.details));
        Self {
            stdout: format!("{}\n", error.to_json(cni_version)),
            stderr,
            exit_code: 1,
        }
    }
}

/// Runs the command the environment names on the configuration `stdin`.
pub fn run(environment: &Environment, stdin: &[u8]) -> Outcome {
    if environment.command.as_deref() == Some("VERSION") {
        return Outcome::success(version(stdin), Vec::new());
    }
    let conf = match NetConf::parse(stdin) {
        Ok(conf) => conf,
        Err(error) => return Outcome::failure(&error, spec::NEWEST_VERSION, Vec::new()),
    };
    let output_version = if spec::is_supported(&conf.cni_version) {
        conf.cni_version.as_str()
    } else {
        spec::NEWEST_VERSION
    };
    let mut notes = Vec::new();
    match execute(environment, &conf, &mut notes) {
        Ok(stdout) => Outcome::success(stdout, notes),
        Err(error) => Outcome::failure(&error, output_version, notes),
    }
}

fn version(stdin: &[u8]) -> String {
    let requested = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|conf| conf["cniVersion"].as_str().map(str::to_owned))
        .filter(|version| spec::is_supported(version));
    let output = json!({
        "cniVersion": requested.as_deref().unwrap_or(spec::NEWEST_VERSION),
        "supportedVersions": spec::SUPPORTED_VERSIONS,
    });
    format!("{output}\n")
}

fn execute(
    environment: &Environment,
    conf: &NetConf,
    notes: &mut Vec<String>,
) -> Result<String, CniError> {
    let command = environment.required(&environment.command, "CNI_COMMAND")?;
    if !spec::is_supported(&conf.cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {:?} is not supported", conf.cni_version),
            format!("supported: {}", spec::SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let needs = |minimum: &str| {
        if spec::at_least(&conf.cni_version, minimum) {
            Ok(())
        } else {
            Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "{command} needs CNI version {minimum} or later; the configuration says {}",
                    conf.cni_version
                ),
                String::new(),
            ))
        }
    };
    match command {
        "ADD" => add(environment, conf),
        "DEL" => del(environment, conf, notes),
        "CHECK" => {
            needs("0.4.0")?;
            check(environment, conf)
        }
        "STATUS" => {
            needs("1.1.0")?;
            status(conf)
        }
        "GC" => {
            needs("1.1.0")?;
            gc(conf, notes)
        }
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
            "microseg-cni knows ADD, DEL, CHECK, STATUS, GC and VERSION",
        )),
    }
}

/// The agent's failure as the runtime should see it: not reachable (or no answer)
/// is worth trying again; a refusal is the agent's word on this pod.
fn agent_error(error: AgentError, what: &str) -> CniError {
    let code = match error {
        AgentError::Unreachable(_) | AgentError::NoAnswer(_) => code::TRY_AGAIN_LATER,
        AgentError::Refused { .. } => code::NOT_ENFORCED,
    };
    CniError::new(code, what, error.to_string())
}

fn prev_result(conf: &NetConf) -> Result<(&serde_json::value::RawValue, PrevResult), CniError> {
    let raw = conf.prev_result.as_deref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "microseg-cni is a chained plugin and needs prevResult",
            "put it after the plugin that makes the pod's veth in the network's plugin list",
        )
    })?;
    Ok((raw, PrevResult::parse(raw)?))
}

fn add(environment: &Environment, conf: &NetConf) -> Result<String, CniError> {
    let container_id = environment.required(&environment.container_id, "CNI_CONTAINERID")?;
    let netns = environment.required(&environment.netns, "CNI_NETNS")?;
    let ifname = environment.required(&environment.ifname, "CNI_IFNAME")?;
    let (raw, prev) = prev_result(conf)?;
    let veth = host_veth(netns, ifname, &prev)?;
    let request = AgentRequest::PodNetworkAdded {
        container_id: container_id.to_owned(),
        netns: netns.to_owned(),
        interface: veth.name.clone(),
        addresses: prev.pod_addresses(ifname)?,
        pod: environment.pod(),
    };
    agent::call(&conf.socket(), conf.timeout()?, &request).map_err(|e| {
        agent_error(
            e,
            &format!(
                "the microseg agent does not enforce on the pod's veth {}: the pod must not start",
                veth.name
            ),
        )
    })?;
    // A chained plugin that changes nothing passes the result on as it came.
    Ok(format!("{}\n", raw.get()))
}

/// DEL succeeds whatever is gone: an agent that is not running holds nothing for
/// this container (its reports live in its memory), and one running forgets a
/// veth once the veth is gone.
fn del(
    environment: &Environment,
    conf: &NetConf,
    notes: &mut Vec<String>,
) -> Result<String, CniError> {
    let container_id = environment.required(&environment.container_id, "CNI_CONTAINERID")?;
    let timeout = conf.timeout()?;
    let request = AgentRequest::PodNetworkDeleted {
        container_id: container_id.to_owned(),
    };
    if let Err(error) = agent::call(&conf.socket(), timeout, &request) {
        notes.push(format!(
            "microseg-cni: DEL of {container_id}: {error}; nothing left to undo"
        ));
    }
    Ok(String::new())
}

fn check(environment: &Environment, conf: &NetConf) -> Result<String, CniError> {
    let container_id = environment.required(&environment.container_id, "CNI_CONTAINERID")?;
    let netns = environment.required(&environment.netns, "CNI_NETNS")?;
    let ifname = environment.required(&environment.ifname, "CNI_IFNAME")?;
    let (_, prev) = prev_result(conf)?;
    let veth = host_veth(netns, ifname, &prev)?;
    let request = AgentRequest::PodNetworkCheck {
        container_id: container_id.to_owned(),
        interface: veth.name.clone(),
    };
    agent::call(&conf.socket(), conf.timeout()?, &request).map_err(|e| {
        agent_error(
            e,
            &format!("the pod's veth {} is not enforced by microseg", veth.name),
        )
    })?;
    Ok(String::new())
}

/// Ready for ADD when the agent answers.
fn status(conf: &NetConf) -> Result<String, CniError> {
    agent::call(&conf.socket(), conf.timeout()?, &AgentRequest::Status).map_err(|error| {
        CniError::new(
            code::NOT_AVAILABLE,
            "the microseg agent does not answer: new pods cannot be enforced",
            error.to_string(),
        )
    })?;
    Ok(String::new())
}

fn gc(conf: &NetConf, notes: &mut Vec<String>) -> Result<String, CniError> {
    let attachments = conf
        .valid_attachments
        .as_ref()
        .or(conf.attachments.as_ref())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "GC needs cni.dev/valid-attachments",
                "the runtime passed no list of valid attachments",
            )
        })?;
    let mut valid_container_ids: Vec<String> = attachments
        .iter()
        .map(|attachment| attachment.container_id.clone())
        .collect();
    valid_container_ids.sort();
    valid_container_ids.dedup();
    let request = AgentRequest::PodNetworkGarbageCollect {
        valid_container_ids,
    };
    match agent::call(&conf.socket(), conf.timeout()?, &request) {
        Ok(answer) => {
            if let Some(forgotten) = answer["forgotten"].as_array().filter(|f| !f.is_empty()) {
                notes.push(format!(
                    "microseg-cni: GC: the agent forgot the veths of containers {forgotten:?}"
                ));
            }
            Ok(String::new())
        }
        // Nothing to collect: a restarted agent holds no reports.
        Err(error @ AgentError::Unreachable(_)) => {
            notes.push(format!("microseg-cni: GC: {error}; nothing to collect"));
            Ok(String::new())
        }
        Err(error) => Err(agent_error(error, "the microseg agent could not collect")),
    }
}

/// The host-side end of the pod's veth: the link in this (the host's) network
/// namespace whose index is the peer index of the pod's interface `ifname` and
/// whose own peer index is that interface's, both veths. The previous result's
/// host interfaces are tried first; names alone are never trusted.
fn host_veth(netns: &str, ifname: &str, prev: &PrevResult) -> Result<Link, CniError> {
    let io_failure = |what: &str, error: std::io::Error| {
        CniError::new(code::IO_FAILURE, what.to_owned(), error.to_string())
    };
    let container = link::in_netns(Path::new(netns), || link::get_link(LinkQuery::Name(ifname)))
        .map_err(|e| {
            CniError::new(
                code::CONTAINER_UNKNOWN,
                "cannot enter the pod's network namespace",
                format!("{netns}: {e}"),
            )
        })?
        .map_err(|e| io_failure("cannot read the pod's interface", e))?
        .ok_or_else(|| {
            CniError::new(
                code::NO_HOST_VETH,
                "the pod's interface does not exist",
                format!("{ifname} in {netns}"),
            )
        })?;
    let not_a_veth = |details: String| {
        CniError::new(
            code::NO_HOST_VETH,
            "microseg enforces on the host-side end of a pod's veth, and the pod's interface has none",
            details,
        )
    };
    let (true, Some(peer_index)) = (container.is_veth(), container.peer_index) else {
        return Err(not_a_veth(format!(
            "{ifname} in {netns} is of kind {}",
            container.kind.as_deref().unwrap_or("unknown")
        )));
    };
    let is_peer = |link: &Link| {
        link.is_veth() && link.index == peer_index && link.peer_index == Some(container.index)
    };
    for name in prev.host_interfaces() {
        let found = link::get_link(LinkQuery::Name(name))
            .map_err(|e| io_failure("cannot read a host interface", e))?;
        if let Some(veth) = found.filter(is_peer) {
            return Ok(veth);
        }
    }
    link::get_link(LinkQuery::Index(peer_index))
        .map_err(|e| io_failure("cannot read a host interface", e))?
        .filter(is_peer)
        .ok_or_else(|| {
            not_a_veth(format!(
                "the peer of {ifname} (index {peer_index}) is not a veth of this network namespace paired with it; prevResult's host interfaces: {:?}",
                prev.host_interfaces()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn environment(command: &str) -> Environment {
        Environment {
            command: Some(command.to_owned()),
            container_id: Some("c1".into()),
            netns: Some("/var/run/netns/none".into()),
            ifname: Some("eth0".into()),
            args: None,
        }
    }

    fn absent_socket() -> String {
        std::env::temp_dir()
            .join(format!("microseg-cni-{}-absent.sock", std::process::id()))
            .display()
            .to_string()
    }

    #[test]
    fn version_lists_the_supported_versions() {
        let outcome = run(&environment("VERSION"), br#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(outcome.exit_code, 0);
        let output: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap();
        assert_eq!(output["cniVersion"], "0.4.0");
        assert_eq!(
            output["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        // No configuration at all still answers.
        assert_eq!(run(&environment("VERSION"), b"").exit_code, 0);
    }

    #[test]
    fn errors_are_the_specs_object_on_stdout_with_a_non_zero_exit() {
        let unsupported = run(
            &environment("ADD"),
            br#"{"cniVersion":"0.2.0","name":"n","type":"microseg-cni"}"#,
        );
        assert_eq!(unsupported.exit_code, 1);
        let error: serde_json::Value = serde_json::from_str(&unsupported.stdout).unwrap();
        assert_eq!(error["code"], code::INCOMPATIBLE_VERSION);
        assert_eq!(error["cniVersion"], spec::NEWEST_VERSION);
        assert!(error["msg"].as_str().unwrap().contains("0.2.0"));

        let unchained = run(
            &environment("ADD"),
            br#"{"cniVersion":"1.0.0","name":"n","type":"microseg-cni"}"#,
        );
        let error: serde_json::Value = serde_json::from_str(&unchained.stdout).unwrap();
        assert_eq!(error["code"], code::INVALID_CONFIG);
        assert_eq!(error["cniVersion"], "1.0.0");

        let mut no_container = environment("ADD");
        no_container.container_id = None;
        let outcome = run(&no_container, br#"{"cniVersion":"1.0.0"}"#);
        let error: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap();
        assert_eq!(error["code"], code::INVALID_ENVIRONMENT);

        let old_check = run(&environment("CHECK"), br#"{"cniVersion":"0.3.1"}"#);
        let error: serde_json::Value = serde_json::from_str(&old_check.stdout).unwrap();
        assert_eq!(error["code"], code::INCOMPATIBLE_VERSION);
    }

    #[test]
    fn del_succeeds_without_an_agent_and_status_reports_it_unavailable() {
        let conf = format!(r#"{{"cniVersion":"1.1.0","socket":"{}"}}"#, absent_socket());
        let del = run(&environment("DEL"), conf.as_bytes());
        assert_eq!((del.exit_code, del.stdout.as_str()), (0, ""));
        assert!(
            del.stderr[0].contains("cannot be reached"),
            "{:?}",
            del.stderr
        );

        let status = run(&environment("STATUS"), conf.as_bytes());
        assert_eq!(status.exit_code, 1);
        let error: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        assert_eq!(error["code"], code::NOT_AVAILABLE);

        let gc_conf = format!(
            r#"{{"cniVersion":"1.1.0","socket":"{}","cni.dev/valid-attachments":[{{"containerID":"c1","ifname":"eth0"}}]}}"#,
            absent_socket()
        );
        assert_eq!(run(&environment("GC"), gc_conf.as_bytes()).exit_code, 0);
        let status_1_0 = run(&environment("STATUS"), br#"{"cniVersion":"1.0.0"}"#);
        let error: serde_json::Value = serde_json::from_str(&status_1_0.stdout).unwrap();
        assert_eq!(error["code"], code::INCOMPATIBLE_VERSION);
    }
}
