//! The agent's API as this plugin uses it: one JSON request line on the agent's
//! Unix socket, one JSON response line back. The requests mirror
//! `microseg::api::Request`'s CNI variants (and `Status`) field for field; a test
//! in tests/tests/e2e_cni.rs parses these with the agent's own types, so the two
//! cannot drift apart unnoticed.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AgentRequest {
    PodNetworkAdded {
        container_id: String,
        netns: String,
        /// The veth's host-side end.
        interface: String,
        addresses: Vec<IpAddr>,
        /// `namespace/name`.
        pod: Option<String>,
    },
    PodNetworkDeleted {
        container_id: String,
    },
    PodNetworkCheck {
        container_id: String,
        interface: String,
    },
    PodNetworkGarbageCollect {
        valid_container_ids: Vec<String>,
    },
    Status,
}

#[derive(Debug, Deserialize)]
struct AgentResponse {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    details: Vec<String>,
    #[serde(default)]
    data: Value,
}

/// Why a call brought no answer, or what the agent refused.
#[derive(Debug)]
pub enum AgentError {
    /// Nothing listens on the socket (no agent, or it is restarting).
    Unreachable(io::Error),
    /// Connected, but no complete answer in time (or the connection broke).
    NoAnswer(io::Error),
    /// The agent answered with an error.
    Refused { error: String, details: Vec<String> },
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(e) => write!(f, "the microseg agent cannot be reached: {e}"),
            Self::NoAnswer(e) => write!(f, "the microseg agent did not answer: {e}"),
            Self::Refused { error, details } => {
                write!(f, "{error}")?;
                for detail in details {
                    write!(f, "; {detail}")?;
                }
                Ok(())
            }
        }
    }
}

/// Sends `request` to the agent at `socket` and waits up to `timeout` for the
/// answer (for each of writing and reading).
pub fn call(socket: &Path, timeout: Duration, request: &AgentRequest) -> Result<Value, AgentError> {
    let stream = UnixStream::connect(socket).map_err(AgentError::Unreachable)?;
    let no_answer = AgentError::NoAnswer;
    stream.set_read_timeout(Some(timeout)).map_err(no_answer)?;
    stream.set_write_timeout(Some(timeout)).map_err(no_answer)?;
    let mut line = serde_json::to_vec(request).map_err(|e| no_answer(io::Error::other(e)))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(no_answer)?;
    let mut answer = String::new();
    let read = BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(no_answer)?;
    if read == 0 || !answer.ends_with('\n') {
        return Err(no_answer(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the connection closed before the answer ended",
        )));
    }
    let response: AgentResponse = serde_json::from_str(&answer)
        .map_err(|e| no_answer(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    if response.ok {
        Ok(response.data)
    } else {
        Err(AgentError::Refused {
            error: response
                .error
                .unwrap_or_else(|| "the agent refused the request".to_owned()),
            details: response.details,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_as_the_agent_reads_them() {
        let request = AgentRequest::PodNetworkAdded {
            container_id: "c1".into(),
            netns: "/var/run/netns/cni-1".into(),
            interface: "veth1".into(),
            addresses: vec!["10.0.0.2".parse().unwrap()],
            pod: Some("app/web".into()),
        };
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            serde_json::json!({"op": "pod_network_added", "container_id": "c1",
                "netns": "/var/run/netns/cni-1", "interface": "veth1",
                "addresses": ["10.0.0.2"], "pod": "app/web"})
        );
        assert_eq!(
            serde_json::to_value(AgentRequest::Status).unwrap(),
            serde_json::json!({"op": "status"})
        );
    }

    #[test]
    fn no_agent_is_unreachable() {
        let socket = std::env::temp_dir().join(format!(
            "microseg-cni-test-{}-absent.sock",
            std::process::id()
        ));
        let error = call(&socket, Duration::from_secs(1), &AgentRequest::Status).unwrap_err();
        assert!(matches!(error, AgentError::Unreachable(_)), "{error}");
    }

    #[test]
    fn an_agent_that_says_no_is_refused_with_its_details() {
        let dir = std::env::temp_dir().join(format!("microseg-cni-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("refusing.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut request = String::new();
            BufReader::new(&stream).read_line(&mut request).unwrap();
            (&stream)
                .write_all(b"{\"ok\":false,\"error\":\"interface veth1 does not enforce\",\"details\":[\"tc-ingress: refused\"]}\n")
                .unwrap();
            request
        });
        let error = call(
            &socket,
            Duration::from_secs(5),
            &AgentRequest::PodNetworkDeleted {
                container_id: "c1".into(),
            },
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "interface veth1 does not enforce; tc-ingress: refused"
        );
        let request = server.join().unwrap();
        assert_eq!(
            request,
            "{\"op\":\"pod_network_deleted\",\"container_id\":\"c1\"}\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
