//! Hubble's Observer API end to end: the real agent in the lab, real traffic between
//! network namespaces (denied, and allowed with the trace-allowed setting), and a
//! gRPC client generated from the protos in the repository (proto/) reading flows
//! over the agent's Unix socket and its loopback TCP port. The flows must be the
//! ones `microseg events -o json` shows.

use std::{path::PathBuf, time::Duration};

use microseg::hubble::{
    client::connect_unix,
    proto::{
        flow::{
            DropReason, EventTypeFilter, Flow, FlowFilter, HttpHeader, NetworkInterface, Verdict,
            flow_filter::Experimental, layer4::Protocol,
        },
        observer::{
            GetFlowsRequest, GetNamespacesRequest, GetNodesRequest, ServerStatusRequest,
            ServerStatusResponse, get_flows_response::ResponseTypes,
            observer_client::ObserverClient,
        },
        relay::NodeState,
    },
};
use microseg_tests::{
    client_server::{CLIENT, HOSTS, INVENTORY, server_address, server_policy},
    lab::Lab,
    raw::{send_frame, udp_frame},
    topology::{EchoServers, tcp_exchange, udp_exchange},
};
use serde_json::Value;
use tonic::transport::Channel;

/// The client/server lab with the policy allowing TCP 80 applied, and allowed
/// connections traced (FORWARDED events) as well as denied ones.
fn lab_with_traffic(extra_agent_args: &[&str]) -> (Lab, EchoServers) {
    let lab = Lab::new(&HOSTS);
    let servers = EchoServers::start(&lab.host("app/server").ns, &[80, 81, 9999]);
    let mut args = vec!["--trace-allowed", "--flow-history", "4096"];
    args.extend_from_slice(extra_agent_args);
    lab.start_agent(&args);
    let inventory = lab.write("inventory.yaml", INVENTORY);
    let policy = lab.write("policy.yaml", &server_policy(80));
    lab.cli_ok(&[
        "apply",
        "-f",
        &inventory.display().to_string(),
        "-f",
        &policy.display().to_string(),
    ]);
    (lab, servers)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn hubble_socket(lab: &Lab) -> PathBuf {
    // The default: next to the agent's API socket.
    lab.socket().with_file_name("hubble.sock")
}

async fn client(socket: PathBuf) -> ObserverClient<Channel> {
    ObserverClient::new(
        connect_unix(socket)
            .await
            .expect("connecting to hubble.sock"),
    )
}

/// Every flow of a finished GetFlows stream.
async fn flows(client: &mut ObserverClient<Channel>, request: GetFlowsRequest) -> Vec<Flow> {
    let mut stream = client
        .get_flows(request)
        .await
        .expect("GetFlows")
        .into_inner();
    let mut flows = Vec::new();
    while let Some(response) = stream.message().await.expect("a GetFlows response") {
        if let Some(ResponseTypes::Flow(flow)) = response.response_types {
            assert_eq!(response.node_name, flow.node_name);
            assert_eq!(response.time, flow.time);
            flows.push(flow);
        }
    }
    flows
}

fn destination_port(flow: &Flow) -> Option<u32> {
    match flow.l4.as_ref()?.protocol.as_ref()? {
        Protocol::Tcp(tcp) => Some(tcp.destination_port),
        Protocol::Udp(udp) => Some(udp.destination_port),
        _ => None,
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// What must agree between a flow and its event: time, verdict, 5-tuple, policies.
fn flow_key(flow: &Flow) -> String {
    let time = flow.time.expect("time");
    // A packet whose IP header could not be read has no addresses.
    let ip = flow.ip.clone().unwrap_or_default();
    let (protocol, sport, dport) = match flow.l4.as_ref().and_then(|l4| l4.protocol.as_ref()) {
        Some(Protocol::Tcp(p)) => ("TCP", p.source_port, p.destination_port),
        Some(Protocol::Udp(p)) => ("UDP", p.source_port, p.destination_port),
        Some(Protocol::Sctp(p)) => ("SCTP", p.source_port, p.destination_port),
        Some(Protocol::IcmPv4(p)) => ("ICMPv4", p.r#type, p.code),
        Some(Protocol::IcmPv6(p)) => ("ICMPv6", p.r#type, p.code),
        None => ("-", 0, 0),
    };
    let mut policies: Vec<String> = [
        &flow.ingress_denied_by,
        &flow.egress_denied_by,
        &flow.ingress_allowed_by,
        &flow.egress_allowed_by,
    ]
    .iter()
    .flat_map(|list| list.iter())
    .map(|p| format!("{}/{}", p.namespace, p.name))
    .collect();
    policies.sort();
    let verdict = Verdict::try_from(flow.verdict).expect("a verdict");
    format!(
        "{}.{:09} {} {}:{sport} -> {}:{dport} {protocol} by {}",
        time.seconds,
        time.nanos,
        verdict.as_str_name(),
        ip.source,
        ip.destination,
        policies.join(",")
    )
}

fn event_key(event: &Value) -> String {
    let time = chrono::DateTime::parse_from_rfc3339(event["time"].as_str().expect("time"))
        .expect("RFC 3339 time");
    let l4 = &event["l4"];
    let (protocol, sport, dport) = ["TCP", "UDP", "SCTP"]
        .into_iter()
        .find_map(|p| {
            l4.get(p).map(|ports| {
                (
                    p,
                    ports["source_port"].as_u64().unwrap_or(0),
                    ports["destination_port"].as_u64().unwrap_or(0),
                )
            })
        })
        .or_else(|| {
            ["ICMPv4", "ICMPv6"].into_iter().find_map(|p| {
                l4.get(p).map(|icmp| {
                    (
                        p,
                        icmp["type"].as_u64().unwrap_or(0),
                        icmp["code"].as_u64().unwrap_or(0),
                    )
                })
            })
        })
        .unwrap_or(("-", 0, 0));
    let mut policies: Vec<String> = [
        "ingress_denied_by",
        "egress_denied_by",
        "ingress_allowed_by",
        "egress_allowed_by",
    ]
    .iter()
    .filter_map(|field| event[*field].as_array())
    .flatten()
    .map(|p| {
        format!(
            "{}/{}",
            p["namespace"].as_str().unwrap_or(""),
            p["name"].as_str().unwrap_or("")
        )
    })
    .collect();
    policies.sort();
    format!(
        "{}.{:09} {} {}:{sport} -> {}:{dport} {protocol} by {}",
        time.timestamp(),
        time.timestamp_subsec_nanos(),
        event["verdict"].as_str().unwrap_or(""),
        event["IP"]["source"].as_str().unwrap_or(""),
        event["IP"]["destination"].as_str().unwrap_or(""),
        policies.join(",")
    )
}

/// `microseg events -o json` up to `until` (the whole history).
fn events_until(lab: &Lab, until: &prost_types::Timestamp) -> Vec<Value> {
    lab.cli_ok(&["events", "-o", "json", "--last", "100000"])
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("event JSON"))
        .filter(|event| {
            let time = chrono::DateTime::parse_from_rfc3339(event["time"].as_str().unwrap_or(""))
                .expect("RFC 3339 time");
            (time.timestamp(), time.timestamp_subsec_nanos() as i32) <= (until.seconds, until.nanos)
        })
        .collect()
}

fn now() -> prost_types::Timestamp {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time after 1970");
    prost_types::Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}

/// Polls `check` until it holds (events travel from the kernel's ring to the agent
/// asynchronously); panics with `what` after a generous bound.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..100 {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}");
}

#[test]
fn hubble_get_flows_streams_the_flows_microseg_events_shows_with_filters_follow_and_status() {
    if !microseg_tests::kernel_available(
        "hubble_get_flows_streams_the_flows_microseg_events_shows_with_filters_follow_and_status",
    ) {
        return;
    }
    let (lab, _servers) = lab_with_traffic(&[]);
    let client_ns = &lab.host("app/client").ns;
    let server = server_address();
    // Allowed twice (traced: FORWARDED), denied on TCP 81 and on UDP 9999.
    assert!(tcp_exchange(client_ns, server, 80));
    assert!(tcp_exchange(client_ns, server, 80));
    assert!(!tcp_exchange(client_ns, server, 81));
    assert!(!udp_exchange(client_ns, server, 9999));
    let rt = runtime();
    let mut observer = rt.block_on(client(hubble_socket(&lab)));

    // All four connections have arrived as flows.
    eventually("the four connections' flows never arrived", || {
        let all = rt.block_on(flows(&mut observer, GetFlowsRequest::default()));
        let count = |verdict: Verdict, port: u32| {
            all.iter()
                .filter(|f| f.verdict == verdict as i32 && destination_port(f) == Some(port))
                .count()
        };
        count(Verdict::Forwarded, 80) >= 2
            && count(Verdict::Dropped, 81) >= 1
            && count(Verdict::Dropped, 9999) >= 1
    });
    let until = now();

    // The same flows as `microseg events -o json`: count, times, verdicts, 5-tuples
    // and policies.
    let mut hubble_keys = Vec::new();
    let mut event_keys = Vec::new();
    eventually("hubble's flows and `microseg events` never agreed", || {
        let history = rt.block_on(flows(
            &mut observer,
            GetFlowsRequest {
                until: Some(until),
                ..GetFlowsRequest::default()
            },
        ));
        hubble_keys = history.iter().map(flow_key).collect();
        event_keys = events_until(&lab, &until).iter().map(event_key).collect();
        hubble_keys == event_keys
    });
    assert_eq!(hubble_keys, event_keys);
    let all = rt.block_on(flows(
        &mut observer,
        GetFlowsRequest {
            until: Some(until),
            ..GetFlowsRequest::default()
        },
    ));
    let denied_81 = all
        .iter()
        .find(|f| f.verdict == Verdict::Dropped as i32 && destination_port(f) == Some(81))
        .expect("the denied connection to TCP 81");
    // What Hubble's printer reads: a policy verdict (type 5), L3_L4, POLICY_DENIED
    // (133), ingress, the workloads and the policy that selected the server.
    assert_eq!(denied_81.event_type.expect("event type").r#type, 5);
    assert_eq!(denied_81.r#type, 1, "L3_L4");
    assert_eq!(denied_81.drop_reason_desc, 133);
    assert_eq!(denied_81.traffic_direction, 1, "INGRESS");
    assert_eq!(denied_81.is_reply, Some(false));
    let source = denied_81.source.clone().expect("source");
    assert_eq!(
        (source.namespace.as_str(), source.pod_name.as_str()),
        ("app", "client")
    );
    assert!(source.labels.contains(&"k8s:role=client".to_owned()));
    let destination = denied_81.destination.clone().expect("destination");
    assert_eq!(destination.pod_name, "server");
    assert_eq!(denied_81.ip.as_ref().expect("IP").source, CLIENT);
    assert_eq!(
        denied_81
            .ingress_denied_by
            .iter()
            .map(|p| (p.namespace.as_str(), p.name.as_str(), p.kind.as_str()))
            .collect::<Vec<_>>(),
        [("app", "server-ingress", "NetworkPolicy")]
    );
    let allowed = all
        .iter()
        .find(|f| f.verdict == Verdict::Forwarded as i32 && destination_port(f) == Some(80))
        .expect("a traced allowed connection");
    assert_eq!(allowed.drop_reason_desc, 0);

    // number: the last N, as in the full history.
    let last2 = rt.block_on(flows(
        &mut observer,
        GetFlowsRequest {
            number: 2,
            until: Some(until),
            ..GetFlowsRequest::default()
        },
    ));
    assert_eq!(
        last2.iter().map(flow_key).collect::<Vec<_>>(),
        hubble_keys[hubble_keys.len() - 2..]
    );
    let first1 = rt.block_on(flows(
        &mut observer,
        GetFlowsRequest {
            number: 1,
            first: true,
            ..GetFlowsRequest::default()
        },
    ));
    assert_eq!(flow_key(&first1[0]), hubble_keys[0]);

    // Filters, applied by the server: a verdict whitelist...
    let dropped = rt.block_on(flows(
        &mut observer,
        GetFlowsRequest {
            until: Some(until),
            whitelist: vec![FlowFilter {
                verdict: vec![Verdict::Dropped as i32],
                ..FlowFilter::default()
            }],
            ..GetFlowsRequest::default()
        },
    ));
    let dropped_events = events_until(&lab, &until)
        .iter()
        .filter(|e| e["verdict"] == "DROPPED")
        .count();
    assert_eq!(dropped.len(), dropped_events);
    assert!(dropped.iter().all(|f| f.verdict == Verdict::Dropped as i32));
    // ...pod and port in one filter (both must match)...
    let to_81 = rt.block_on(flows(
        &mut observer,
        GetFlowsRequest {
            whitelist: vec![FlowFilter {
                destination_pod: strings(&["app/server"]),
                destination_port: strings(&["81"]),
                ..FlowFilter::default()
            }],
            ..GetFlowsRequest::default()
        },
    ));
    assert!(!to_81.is_empty());
    assert!(to_81.iter().all(|f| destination_port(f) == Some(81)));
    // ...labels, and a blacklist that removes the allowed port.
    let not_80 = rt.block_on(flows(
        &mut observer,
        GetFlowsRequest {
            whitelist: vec![FlowFilter {
                source_label: strings(&["role=client"]),
                ..FlowFilter::default()
            }],
            blacklist: vec![FlowFilter {
                destination_port: strings(&["80"]),
                ..FlowFilter::default()
            }],
            ..GetFlowsRequest::default()
        },
    ));
    assert!(not_80.iter().any(|f| destination_port(f) == Some(81)));
    assert!(not_80.iter().all(|f| destination_port(f) != Some(80)));
    assert!(
        not_80
            .iter()
            .all(|f| f.source.as_ref().expect("source").pod_name == "client")
    );
    // A filter microseg cannot answer is refused, not ignored.
    let refused = rt
        .block_on(observer.get_flows(GetFlowsRequest {
            whitelist: vec![FlowFilter {
                dns_query: strings(&["kube.*"]),
                ..FlowFilter::default()
            }],
            ..GetFlowsRequest::default()
        }))
        .expect_err("dns_query refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("dns_query"),
        "{}",
        refused.message()
    );

    // since/until: from the denied connection on, nothing before it.
    let since = denied_81.time.expect("time");
    let window = rt.block_on(flows(
        &mut observer,
        GetFlowsRequest {
            since: Some(since),
            until: Some(until),
            ..GetFlowsRequest::default()
        },
    ));
    let expected: Vec<String> = all
        .iter()
        .zip(&hubble_keys)
        .filter(|(f, _)| {
            let t = f.time.expect("time");
            (t.seconds, t.nanos) >= (since.seconds, since.nanos)
        })
        .map(|(_, key)| key.clone())
        .collect();
    assert_eq!(window.iter().map(flow_key).collect::<Vec<_>>(), expected);
    assert!(window.iter().any(|f| flow_key(f) == flow_key(denied_81)));
    assert!(
        window.len() < all.len(),
        "the allowed connections came before"
    );

    // follow: a stream opened now carries a connection made after it.
    let mut live = rt
        .block_on(observer.get_flows(GetFlowsRequest {
            follow: true,
            whitelist: vec![FlowFilter {
                destination_port: strings(&["9999"]),
                protocol: strings(&["tcp"]),
                ..FlowFilter::default()
            }],
            ..GetFlowsRequest::default()
        }))
        .expect("GetFlows follow")
        .into_inner();
    assert!(!tcp_exchange(client_ns, server, 9999));
    let followed = rt
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(20), async {
                loop {
                    let response = live.message().await.expect("a response").expect("open");
                    if let Some(ResponseTypes::Flow(flow)) = response.response_types {
                        return flow;
                    }
                }
            })
            .await
        })
        .expect("the new connection streamed while following");
    assert_eq!(destination_port(&followed), Some(9999));
    assert_eq!(followed.verdict, Verdict::Dropped as i32);
    let time = followed.time.expect("time");
    assert!((time.seconds, time.nanos) > (until.seconds, until.nanos));
    drop(live);

    // ServerStatus: the history's size and capacity, flows seen, uptime.
    let history = lab
        .cli_ok(&["events", "-o", "json", "--last", "100000"])
        .lines()
        .count() as u64;
    let status: ServerStatusResponse = rt
        .block_on(observer.server_status(ServerStatusRequest {}))
        .expect("ServerStatus")
        .into_inner();
    assert!(status.num_flows >= history.min(status.max_flows) && status.num_flows > 0);
    assert_eq!(status.max_flows, 4096);
    let agent_status: Value =
        serde_json::from_str(&lab.cli_ok(&["status", "-o", "json"])).expect("status JSON");
    assert!(status.seen_flows >= status.num_flows);
    assert!(status.seen_flows <= agent_status["eventsReceived"].as_u64().expect("count"));
    assert!(status.uptime_ns > 0);
    assert!(status.version.contains("microseg"));

    // The standard health service says the Observer is serving.
    assert_serving(
        &rt,
        rt.block_on(connect_unix(hubble_socket(&lab)))
            .expect("channel"),
    );
}

fn assert_serving(rt: &tokio::runtime::Runtime, channel: Channel) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let mut health = HealthClient::new(channel);
    // `hubble status` asks for Hubble's own service name, not the gRPC one.
    for service in ["", "observer.Observer", "hubble.server.Observer"] {
        let status = rt
            .block_on(health.check(HealthCheckRequest {
                service: service.to_owned(),
            }))
            .expect("Health/Check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

/// Hubble's methods microseg does not serve answer UNIMPLEMENTED.
async fn get_agent_events(channel: Channel) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    // The method is unknown to the server: whatever the message, the path decides.
    let codec = tonic_prost::ProstCodec::<ServerStatusRequest, ServerStatusResponse>::default();
    grpc.unary(
        tonic::Request::new(ServerStatusRequest {}),
        tonic::codegen::http::uri::PathAndQuery::from_static("/observer.Observer/GetAgentEvents"),
        codec,
    )
    .await
    .expect_err("GetAgentEvents is not served")
}

#[test]
fn hubble_serves_a_loopback_tcp_port_and_a_chosen_socket_and_refuses_other_addresses() {
    if !microseg_tests::kernel_available(
        "hubble_serves_a_loopback_tcp_port_and_a_chosen_socket_and_refuses_other_addresses",
    ) {
        return;
    }
    let lab = Lab::new(&HOSTS);
    // A non-loopback address is refused before anything is loaded (paths private to
    // the lab all the same).
    let output = std::process::Command::new(microseg_tests::lab::microseg_binary())
        .arg("agent")
        .arg("--socket")
        .arg(lab.dir.join("refused.sock"))
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .arg("--state-dir")
        .arg(lab.dir.join("state"))
        .args(["--hubble-listen-address", "0.0.0.0:4244"])
        .output()
        .expect("running the agent");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
    assert!(!lab.dir.join("refused.sock").exists());
    let socket = lab.dir.join("observer.sock");
    lab.start_agent(&[
        "--hubble-socket",
        &socket.display().to_string(),
        "--hubble-listen-address",
        "127.0.0.1:4245",
        "--flow-history",
        "4096",
    ]);
    assert!(
        !hubble_socket(&lab).exists(),
        "the chosen socket replaces the default"
    );
    let rt = runtime();
    let mut over_unix = rt.block_on(client(socket.clone()));
    let status = rt
        .block_on(over_unix.server_status(ServerStatusRequest {}))
        .expect("ServerStatus over the chosen socket")
        .into_inner();
    assert_eq!(status.max_flows, 4096);
    // GetNodes: this node, connected (what Hubble UI lists).
    let nodes = rt
        .block_on(over_unix.get_nodes(GetNodesRequest {}))
        .expect("GetNodes")
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 1);
    assert!(!nodes[0].name.is_empty());
    assert_eq!(nodes[0].state, NodeState::NodeConnected as i32);
    assert_eq!(nodes[0].max_flows, 4096);
    let unimplemented = rt.block_on(get_agent_events(
        rt.block_on(connect_unix(socket)).expect("channel"),
    ));
    assert_eq!(unimplemented.code(), tonic::Code::Unimplemented);

    // The TCP port is in the agent's network namespace (the lab's node).
    lab.node.run_in(|| {
        let rt = runtime();
        let channel = rt
            .block_on(tonic::transport::Endpoint::from_static("http://127.0.0.1:4245").connect())
            .expect("connecting to 127.0.0.1:4245");
        let status = rt
            .block_on(ObserverClient::new(channel.clone()).server_status(ServerStatusRequest {}))
            .expect("ServerStatus over TCP")
            .into_inner();
        assert_eq!(status.max_flows, 4096);
        assert_serving(&rt, channel);
    });
}

/// Cilium's monitor message types: a drop, a policy verdict.
const DROP: i32 = 1;
const POLICY_VERDICT: i32 = 5;

/// The node the agent says it is, and that node's labels (a Node object applied).
const NODE: &str = "lab-node";
const NODE_OBJECT: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: lab-node, labels: {topology.kubernetes.io/zone: lab-a}}
status: {addresses: [{type: InternalIP, address: 10.80.0.250}]}
"#;

/// Which flows of the history a filter must admit.
type FlowCheck<'a> = Box<dyn Fn(&Flow) -> bool + 'a>;

fn is_echo_request(flow: &Flow) -> bool {
    matches!(
        flow.l4.as_ref().and_then(|l4| l4.protocol.as_ref()),
        Some(Protocol::IcmPv4(icmp)) if icmp.r#type == 8
    )
}

#[expect(
    deprecated,
    reason = "Summary is deprecated and still what hubble's printer reads"
)]
fn summary(flow: &Flow) -> &str {
    &flow.summary
}

fn event_type(flow: &Flow) -> (i32, i32) {
    let event = flow.event_type.expect("an event type");
    (event.r#type, event.sub_type)
}

/// The flows of a request that must be accepted.
fn flows_of(
    rt: &tokio::runtime::Runtime,
    observer: &mut ObserverClient<Channel>,
    whitelist: Vec<FlowFilter>,
    blacklist: Vec<FlowFilter>,
    until: prost_types::Timestamp,
) -> Vec<Flow> {
    rt.block_on(flows(
        observer,
        GetFlowsRequest {
            until: Some(until),
            whitelist,
            blacklist,
            ..GetFlowsRequest::default()
        },
    ))
}

/// A packet the data path drops before policy, sent by the client from its own
/// interface: a forged source address, and an IPv4 header whose length field says
/// 16 bytes (less than the 20 of any IPv4 header).
fn send_forged_and_malformed(lab: &Lab) {
    let client = lab.host("app/client");
    let (client_mac, server_mac) = (lab.mac_of("app/client"), lab.mac_of("app/server"));
    let forged = udp_frame(
        client_mac,
        server_mac,
        "10.80.0.99".parse().expect("address"),
        server_address(),
        (40000, 9999),
        b"forged",
    );
    send_frame(&client.ns, &client.host_if, &forged);
    let mut malformed = udp_frame(
        client_mac,
        server_mac,
        client.address,
        server_address(),
        (40001, 9999),
        b"malformed",
    );
    // Version 4, IHL 4 (the byte after the 14-byte Ethernet header).
    malformed[14] = 0x44;
    send_frame(&client.ns, &client.host_if, &malformed);
}

#[test]
fn hubble_sends_drops_before_policy_as_drop_events_and_answers_hubble_1_19s_filters() {
    if !microseg_tests::kernel_available(
        "hubble_sends_drops_before_policy_as_drop_events_and_answers_hubble_1_19s_filters",
    ) {
        return;
    }
    let (lab, _servers) = lab_with_traffic(&["--node-name", NODE]);
    let node = lab.write("node.yaml", NODE_OBJECT);
    lab.cli_ok(&["apply", "-f", &node.display().to_string()]);
    let client_ns = &lab.host("app/client").ns;
    let server = server_address();
    assert!(tcp_exchange(client_ns, server, 80));
    assert!(!tcp_exchange(client_ns, server, 81));
    // An echo request the server's policy denies (TCP 80 only).
    let ping = client_ns.try_exec(&["ping", "-c1", "-W1", &server.to_string()]);
    assert!(!ping.status.success(), "the ping is denied");
    send_forged_and_malformed(&lab);
    let rt = runtime();
    let mut observer = rt.block_on(client(hubble_socket(&lab)));
    let reason_of = |flow: &Flow| DropReason::try_from(flow.drop_reason_desc).ok();
    eventually(
        "the forged and the malformed packets' flows never arrived",
        || {
            let all = rt.block_on(flows(&mut observer, GetFlowsRequest::default()));
            [
                DropReason::InvalidSourceIp,
                DropReason::InvalidPacketDropped,
            ]
            .iter()
            .all(|reason| all.iter().any(|f| reason_of(f) == Some(*reason)))
                && all.iter().any(|f| destination_port(f) == Some(81))
                && all.iter().any(is_echo_request)
        },
    );
    let until = now();
    let all = flows_of(&rt, &mut observer, vec![], vec![], until);

    // Drops before policy are drop events (type 1, sub-type the reason) with the
    // reason's name; the policy denial stays a policy verdict.
    let forged = all
        .iter()
        .find(|f| reason_of(f) == Some(DropReason::InvalidSourceIp))
        .expect("the forged packet");
    assert_eq!(event_type(forged), (DROP, 132));
    assert_eq!(forged.verdict, Verdict::Dropped as i32);
    assert_eq!(forged.ip.as_ref().expect("IP").source, "10.80.0.99");
    assert_eq!(forged.policy_match_type, 0);
    let malformed = all
        .iter()
        .find(|f| reason_of(f) == Some(DropReason::InvalidPacketDropped))
        .expect("the malformed packet");
    assert_eq!(event_type(malformed), (DROP, 134));
    assert_eq!(malformed.verdict, Verdict::Dropped as i32);
    // `microseg events` prints them as hubble prints drop events: the reason, then
    // DROPPED; the policy denial as a policy verdict.
    let compact = lab.cli_ok(&["events", "--last", "100"]);
    assert!(
        compact.contains("Invalid source ip DROPPED") && compact.contains("Invalid packet DROPPED"),
        "{compact}"
    );
    assert!(
        compact.lines().any(
            |line| line.contains(":81 ") && line.contains("policy-verdict:none INGRESS DENIED")
        ),
        "{compact}"
    );
    let denied = all
        .iter()
        .find(|f| destination_port(f) == Some(81))
        .expect("the denied connection");
    assert_eq!(event_type(denied), (POLICY_VERDICT, 0));
    assert_eq!(denied.drop_reason_desc, DropReason::PolicyDenied as i32);
    assert_eq!(denied.policy_match_type, 0, "none: denied by default");
    let allowed = all
        .iter()
        .find(|f| destination_port(f) == Some(80))
        .expect("the allowed connection");
    assert_eq!(event_type(allowed), (POLICY_VERDICT, 0));
    assert_eq!(
        allowed.policy_match_type, 2,
        "L3-L4: the rule names the client and TCP 80"
    );
    // Both ends' identities: the client's (the event's peer) and the server's (the
    // local endpoint's, from the agent's tables).
    for flow in [denied, allowed] {
        let (source, destination) = (
            flow.source.as_ref().expect("source"),
            flow.destination.as_ref().expect("destination"),
        );
        assert!(source.identity >= 256, "{source:?}");
        assert!(destination.identity >= 256, "{destination:?}");
        assert_ne!(source.identity, destination.identity);
        assert_eq!(source.cluster_name, "default");
        assert_eq!(
            flow.node_labels,
            ["topology.kubernetes.io/zone=lab-a"],
            "the node's labels"
        );
    }
    // ICMP summaries in Cilium's named form.
    let echo = all.iter().find(|f| is_echo_request(f)).expect("the ping");
    assert_eq!(summary(echo), "ICMPv4 EchoRequest");
    assert_eq!(summary(denied), "TCP Flags: SYN");
    // `--type drop`: only the drops before policy.
    let drop_events = flows_of(
        &rt,
        &mut observer,
        vec![FlowFilter {
            event_type: vec![EventTypeFilter {
                r#type: DROP,
                match_sub_type: false,
                sub_type: 0,
            }],
            ..FlowFilter::default()
        }],
        vec![],
        until,
    );
    assert!(drop_events.len() >= 2);
    assert!(drop_events.iter().all(|f| event_type(f).0 == DROP));

    // Hubble v1.19's newer filters, each allowed and with `--not` (the blacklist):
    // the allowed flows and the flows left with `--not` split the history.
    let interface = denied.interface.clone().expect("an interface");
    assert!(!interface.name.is_empty());
    let cases: Vec<(&str, FlowFilter, FlowCheck<'_>)> = vec![
        (
            "drop_reason_desc",
            FlowFilter {
                drop_reason_desc: vec![DropReason::InvalidSourceIp as i32],
                ..FlowFilter::default()
            },
            Box::new(|f| reason_of(f) == Some(DropReason::InvalidSourceIp)),
        ),
        (
            "interface",
            FlowFilter {
                interface: vec![NetworkInterface {
                    index: 0,
                    name: interface.name.clone(),
                }],
                ..FlowFilter::default()
            },
            Box::new({
                let name = interface.name.clone();
                move |f| f.interface.as_ref().is_some_and(|i| i.name == name)
            }),
        ),
        (
            "node_labels",
            FlowFilter {
                node_labels: strings(&["topology.kubernetes.io/zone in (lab-a, lab-b)"]),
                ..FlowFilter::default()
            },
            Box::new(|_| true),
        ),
        (
            "source_cluster_name",
            FlowFilter {
                source_cluster_name: strings(&["default"]),
                ..FlowFilter::default()
            },
            Box::new(|f| f.source.as_ref().is_some_and(|e| !e.namespace.is_empty())),
        ),
        (
            "destination_cluster_name",
            FlowFilter {
                destination_cluster_name: strings(&["prod"]),
                ..FlowFilter::default()
            },
            Box::new(|_| false),
        ),
        (
            "encrypted",
            FlowFilter {
                encrypted: vec![false],
                ..FlowFilter::default()
            },
            Box::new(|_| true),
        ),
        (
            "source_pod /client (any namespace)",
            FlowFilter {
                source_pod: strings(&["/client"]),
                ..FlowFilter::default()
            },
            Box::new(|f| f.source.as_ref().is_some_and(|e| e.pod_name == "client")),
        ),
    ];
    for (name, filter, expected) in &cases {
        let allowed = flows_of(&rt, &mut observer, vec![filter.clone()], vec![], until);
        let negated = flows_of(&rt, &mut observer, vec![], vec![filter.clone()], until);
        let want: Vec<String> = all.iter().filter(|f| expected(f)).map(flow_key).collect();
        let want_not: Vec<String> = all.iter().filter(|f| !expected(f)).map(flow_key).collect();
        assert_eq!(
            allowed.iter().map(flow_key).collect::<Vec<_>>(),
            want,
            "{name}"
        );
        assert_eq!(
            negated.iter().map(flow_key).collect::<Vec<_>>(),
            want_not,
            "--not {name}"
        );
    }
    assert!(
        flows_of(&rt, &mut observer, vec![cases[0].1.clone()], vec![], until).len() == 1,
        "one forged packet"
    );
    // The newer fields microseg cannot answer are refused, naming the field, in
    // either list.
    for (filter, field) in [
        (
            FlowFilter {
                http_url: strings(&["/api"]),
                ..FlowFilter::default()
            },
            "http_url",
        ),
        (
            FlowFilter {
                http_header: vec![HttpHeader {
                    key: "x-user".into(),
                    value: "a".into(),
                }],
                ..FlowFilter::default()
            },
            "http_header",
        ),
        (
            FlowFilter {
                source_ip_xlated: strings(&["10.80.0.11"]),
                ..FlowFilter::default()
            },
            "source_ip_xlated",
        ),
        (
            FlowFilter {
                ip_trace_id: vec![42],
                ..FlowFilter::default()
            },
            "ip_trace_id",
        ),
        (
            FlowFilter {
                experimental: Some(Experimental {
                    cel_expression: strings(&["_flow.verdict == 2"]),
                }),
                ..FlowFilter::default()
            },
            "cel_expression",
        ),
    ] {
        for (whitelist, blacklist) in [(vec![filter.clone()], vec![]), (vec![], vec![filter])] {
            let refused = rt
                .block_on(observer.get_flows(GetFlowsRequest {
                    whitelist,
                    blacklist,
                    ..GetFlowsRequest::default()
                }))
                .expect_err("refused");
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{field}");
            assert!(refused.message().contains(field), "{}", refused.message());
        }
    }

    // GetNamespaces: the namespaces with flows (microseg's cluster: `default`);
    // ServerStatus' flows rate over the last minute.
    let namespaces = rt
        .block_on(observer.get_namespaces(GetNamespacesRequest {}))
        .expect("GetNamespaces")
        .into_inner()
        .namespaces;
    assert_eq!(
        namespaces
            .iter()
            .map(|n| (n.cluster.as_str(), n.namespace.as_str()))
            .collect::<Vec<_>>(),
        [("default", "app")]
    );
    let status = rt
        .block_on(observer.server_status(ServerStatusRequest {}))
        .expect("ServerStatus")
        .into_inner();
    assert!(
        status.flows_rate > 0.0 && status.flows_rate <= status.num_flows as f64 / 60.0,
        "{status:?}"
    );
}

/// Debian's Python, the one python3-grpcio is installed for (another `python3`
/// may come first on the PATH).
const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// A gRPC health check of `hubble.server.Observer` by Python's grpcio (gRPC
/// C-core) over the Unix socket, with `grpc.default_authority` set to
/// `authority`: `Ok(response bytes in hex)` or `Err(status code and details)`. The
/// messages are written by hand (field 1, the service name; the answer's field 1,
/// the status), so no generated code is needed.
fn python_health_check(socket: &std::path::Path, authority: &str) -> Result<String, String> {
    const SCRIPT: &str = r#"
import sys, grpc
socket, authority = sys.argv[1], sys.argv[2]
channel = grpc.insecure_channel("unix:" + socket, options=[("grpc.default_authority", authority)])
check = channel.unary_unary("/grpc.health.v1.Health/Check")
service = b"hubble.server.Observer"
try:
    print("OK " + check(b"\x0a" + bytes([len(service)]) + service, timeout=10).hex())
except grpc.RpcError as error:
    print("ERROR " + error.code().name + ": " + str(error.details()))
"#;
    let output = std::process::Command::new(DEBIAN_PYTHON)
        .args(["-c", SCRIPT])
        .arg(socket)
        .arg(authority)
        .output()
        .expect("running Debian's python3");
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        output.status.success(),
        "python3: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    match stdout.split_once(' ') {
        Some(("OK", hex)) => Ok(hex.to_owned()),
        _ => Err(stdout),
    }
}

/// gRPC C-core clients (Python, C++, Ruby), Java and .NET send the socket's path
/// as `:authority`; h2 (under tonic) refuses it as malformed (hyperium/h2#487),
/// and no option relaxes that. The README's workaround, setting the authority to
/// `localhost` (`grpc.default_authority`), is what this checks, with the path
/// (older C-core, Java) and its percent-encoded form (C-core 1.57 and later)
/// refused as such clients see it.
#[test]
fn hubble_answers_grpc_core_clients_that_set_the_authority_to_localhost() {
    let test = "hubble_answers_grpc_core_clients_that_set_the_authority_to_localhost";
    if !microseg_tests::kernel_available(test) {
        return;
    }
    let has_grpcio = std::process::Command::new(DEBIAN_PYTHON)
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_grpcio {
        let reason = "Python's grpcio is not installed (Debian package python3-grpcio; `cargo xtask setup` installs it)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: {reason}");
        }
        microseg_tests::skip(test, reason);
        return;
    }
    let lab = Lab::new(&HOSTS);
    lab.start_agent(&[]);
    let socket = hubble_socket(&lab);
    // Serving (status 1).
    assert_eq!(python_health_check(&socket, "localhost"), Ok("0801".into()));
    let path = socket.display().to_string();
    let encoded = path.replace('/', "%2F");
    for authority in [path.as_str(), encoded.as_str()] {
        let refused = python_health_check(&socket, authority).expect_err(authority);
        // The stream reset with PROTOCOL_ERROR (1), as users report it.
        assert!(
            refused.starts_with("ERROR INTERNAL")
                && refused.contains("RST_STREAM with error code 1"),
            "{authority}: {refused}"
        );
    }
}
