//! The Observer service: GetFlows and ServerStatus over the agent's event history and
//! live events (`EventHub`), with Hubble's request semantics.

use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{
    activity,
    convert::{CLUSTER_NAME, flow_of_line},
    filter::FlowFilters,
    proto::{
        flow::{Flow, LostEvent, LostEventSource},
        observer::{
            GetFlowsRequest, GetFlowsResponse, GetNamespacesRequest, GetNamespacesResponse,
            GetNodesRequest, GetNodesResponse, Namespace, Node, ServerStatusRequest,
            ServerStatusResponse, get_flows_response::ResponseTypes, observer_server::Observer,
        },
        relay::NodeState,
    },
};
use crate::flow_history::EventHub;

/// Responses buffered per GetFlows stream before the sender waits for the client.
const STREAM_BUFFER: usize = 256;

pub struct HubbleObserver {
    hub: Arc<EventHub>,
    /// When the agent started (`uptime_ns`).
    started: SystemTime,
    /// This node's name, as in the flows (GetNodes).
    node_name: String,
}

impl HubbleObserver {
    pub fn new(hub: Arc<EventHub>, started: SystemTime, node_name: String) -> Self {
        Self {
            hub,
            started,
            node_name,
        }
    }

    fn status(&self) -> ServerStatusResponse {
        ServerStatusResponse {
            num_flows: self.hub.history_len() as u64,
            max_flows: self.hub.history_capacity as u64,
            seen_flows: self.hub.received.load(Ordering::Relaxed),
            uptime_ns: u64::try_from(self.started.elapsed().unwrap_or(Duration::ZERO).as_nanos())
                .unwrap_or(u64::MAX),
            // A node's own Hubble server leaves the node counts to Hubble Relay.
            num_connected_nodes: None,
            num_unavailable_nodes: None,
            unavailable_nodes: Vec::new(),
            version: format!("{}+microseg", env!("CARGO_PKG_VERSION")),
            flows_rate: activity::flows_rate(&self.hub.history(), now_ns()),
        }
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .and_then(|since| i64::try_from(since.as_nanos()).ok())
        .unwrap_or(0)
}

type Stream = ReceiverStream<Result<GetFlowsResponse, Status>>;

#[tonic::async_trait]
impl Observer for HubbleObserver {
    type GetFlowsStream = Stream;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Stream>, Status> {
        let query = Query::of(request.get_ref()).map_err(Status::invalid_argument)?;
        let subscription = self.hub.subscribe(usize::MAX);
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            let history = query.history(&subscription.history);
            for flow in history {
                if sender.send(Ok(response(flow))).await.is_err() {
                    return;
                }
            }
            if query.follow {
                follow(&query, subscription, &sender).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn server_status(
        &self,
        _request: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn get_namespaces(
        &self,
        _request: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        Ok(Response::new(namespaces(&self.hub)))
    }

    /// This node, connected: what Hubble UI lists (a node's server knows only itself).
    async fn get_nodes(
        &self,
        _request: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        let status = self.status();
        Ok(Response::new(GetNodesResponse {
            nodes: vec![Node {
                name: self.node_name.clone(),
                version: status.version,
                address: String::new(),
                state: NodeState::NodeConnected as i32,
                tls: None,
                uptime_ns: status.uptime_ns,
                num_flows: status.num_flows,
                max_flows: status.max_flows,
                seen_flows: status.seen_flows,
            }],
        }))
    }
}

/// The namespaces with flows in the last hour, in microseg's one cluster.
fn namespaces(hub: &EventHub) -> GetNamespacesResponse {
    GetNamespacesResponse {
        namespaces: activity::namespaces(&hub.history(), now_ns())
            .into_iter()
            .map(|namespace| Namespace {
                cluster: CLUSTER_NAME.to_owned(),
                namespace,
            })
            .collect(),
    }
}

fn response(flow: Flow) -> GetFlowsResponse {
    GetFlowsResponse {
        node_name: flow.node_name.clone(),
        time: flow.time,
        response_types: Some(ResponseTypes::Flow(flow)),
    }
}

/// A GetFlows request, checked.
pub struct Query {
    pub number: u64,
    pub first: bool,
    pub follow: bool,
    pub since: Option<prost_types::Timestamp>,
    pub until: Option<prost_types::Timestamp>,
    pub filters: FlowFilters,
}

impl Query {
    pub fn of(request: &GetFlowsRequest) -> Result<Self, String> {
        if request.first && request.follow {
            return Err("first is incompatible with follow".to_owned());
        }
        if let (Some(since), Some(until)) = (&request.since, &request.until)
            && key(since) > key(until)
        {
            return Err("since is after until".to_owned());
        }
        Ok(Self {
            number: request.number,
            first: request.first,
            follow: request.follow,
            since: request.since,
            until: request.until,
            filters: FlowFilters::new(&request.whitelist, &request.blacklist)?,
        })
    }

    /// The flow passes the filters and lies within since/until.
    pub fn admits(&self, flow: &Flow) -> bool {
        let time = flow.time.as_ref().map(key);
        let after_since = self
            .since
            .as_ref()
            .is_none_or(|since| time.is_some_and(|t| t >= key(since)));
        after_since && !self.past_until(flow) && self.filters.admits(flow)
    }

    fn past_until(&self, flow: &Flow) -> bool {
        self.until
            .as_ref()
            .is_some_and(|until| flow.time.as_ref().is_none_or(|t| key(t) > key(until)))
    }

    /// The flows of the history this request asks for, oldest first: the last
    /// `number` (the first `number` with `first`); with `number` 0, all of them,
    /// except when following without `since` (then only new flows, as Hubble does).
    pub fn history(&self, lines: &[Arc<str>]) -> Vec<Flow> {
        if self.number == 0 && self.follow && self.since.is_none() {
            return Vec::new();
        }
        let mut flows: Vec<Flow> = lines
            .iter()
            .filter_map(|line| flow_of_line(line))
            .filter(|flow| self.admits(flow))
            .collect();
        let number = usize::try_from(self.number).unwrap_or(usize::MAX);
        if self.number > 0 && flows.len() > number {
            if self.first {
                flows.truncate(number);
            } else {
                flows.drain(..flows.len() - number);
            }
        }
        flows
    }
}

fn key(time: &prost_types::Timestamp) -> (i64, i32) {
    (time.seconds, time.nanos)
}

/// Streams live flows until the client goes away, the agent's hub ends, or `until`
/// passes; events the subscription lost (a slow client) are reported as
/// `lost_events`.
async fn follow(
    query: &Query,
    subscription: crate::flow_history::Subscription,
    sender: &mpsc::Sender<Result<GetFlowsResponse, Status>>,
) {
    let crate::flow_history::Subscription {
        history,
        mut live,
        lost,
    } = subscription;
    // An event published while the subscription was taken can be in both halves:
    // the live half then carries the same line (the same allocation) again. `history`
    // lives until the end, so no new line can reuse one of these addresses.
    let recent: HashSet<usize> = history
        .iter()
        .rev()
        .take(64)
        .map(|line| line.as_ptr() as usize)
        .collect();
    let deadline = query.until.as_ref().map(|until| {
        let until = SystemTime::UNIX_EPOCH
            + Duration::new(
                u64::try_from(until.seconds).unwrap_or(0),
                u32::try_from(until.nanos).unwrap_or(0),
            );
        let wait = until
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::time::Instant::now() + wait
    });
    let mut reported_lost = 0;
    loop {
        let next = match deadline {
            Some(deadline) => tokio::select! {
                line = live.recv() => line,
                () = tokio::time::sleep_until(deadline) => return,
            },
            None => live.recv().await,
        };
        let Some(line) = next else {
            return;
        };
        let lost_now = lost.load(Ordering::Relaxed);
        if lost_now > reported_lost {
            let event = GetFlowsResponse {
                response_types: Some(ResponseTypes::LostEvents(LostEvent {
                    source: LostEventSource::ObserverEventsQueue as i32,
                    num_events_lost: lost_now - reported_lost,
                    cpu: None,
                })),
                ..GetFlowsResponse::default()
            };
            reported_lost = lost_now;
            if sender.send(Ok(event)).await.is_err() {
                return;
            }
        }
        if recent.contains(&(line.as_ptr() as usize)) {
            continue;
        }
        let Some(flow) = flow_of_line(&line) else {
            continue;
        };
        if query.past_until(&flow) {
            return;
        }
        if query.admits(&flow) && sender.send(Ok(response(flow))).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hubble::proto::flow::{FlowFilter, Verdict};

    fn line(second: u32, verdict: &str, port: u16) -> Arc<str> {
        Arc::from(
            serde_json::json!({
                "time": format!("2026-11-25T10:00:{second:02}Z"), "verdict": verdict,
                "node_name": "n", "traffic_direction": "INGRESS",
                "IP": {"source": "10.0.0.1", "destination": "10.0.0.2", "ipVersion": "IPv4"},
                "l4": {"TCP": {"source_port": 40000, "destination_port": port, "flags": {"SYN": true}}},
            })
            .to_string(),
        )
    }

    fn ports(flows: &[Flow]) -> Vec<u32> {
        flows
            .iter()
            .map(
                |f| match f.l4.as_ref().and_then(|l4| l4.protocol.as_ref()) {
                    Some(crate::hubble::proto::flow::layer4::Protocol::Tcp(tcp)) => {
                        tcp.destination_port
                    }
                    _ => 0,
                },
            )
            .collect()
    }

    fn at(second: i64) -> Option<prost_types::Timestamp> {
        // 2026-11-25T10:00:00Z
        Some(prost_types::Timestamp {
            seconds: 1_795_600_800 + second,
            nanos: 0,
        })
    }

    #[test]
    fn number_first_since_and_until_select_from_the_history() {
        let lines: Vec<Arc<str>> = (0..6)
            .map(|i| {
                line(
                    i,
                    if i % 2 == 0 { "DROPPED" } else { "AUDIT" },
                    80 + i as u16,
                )
            })
            .collect();
        let query = |request: GetFlowsRequest| Query::of(&request).expect("valid");
        let last2 = query(GetFlowsRequest {
            number: 2,
            ..GetFlowsRequest::default()
        });
        assert_eq!(ports(&last2.history(&lines)), [84, 85]);
        let first2 = query(GetFlowsRequest {
            number: 2,
            first: true,
            ..GetFlowsRequest::default()
        });
        assert_eq!(ports(&first2.history(&lines)), [80, 81]);
        let dropped = query(GetFlowsRequest {
            number: 2,
            whitelist: vec![FlowFilter {
                verdict: vec![Verdict::Dropped as i32],
                ..FlowFilter::default()
            }],
            ..GetFlowsRequest::default()
        });
        assert_eq!(ports(&dropped.history(&lines)), [82, 84]);
        let window = query(GetFlowsRequest {
            since: at(1),
            until: at(3),
            ..GetFlowsRequest::default()
        });
        assert_eq!(ports(&window.history(&lines)), [81, 82, 83]);
        let all = query(GetFlowsRequest::default());
        assert_eq!(all.history(&lines).len(), 6);
        let only_new = query(GetFlowsRequest {
            follow: true,
            ..GetFlowsRequest::default()
        });
        assert!(only_new.history(&lines).is_empty());
    }

    #[test]
    fn contradictory_requests_are_refused() {
        assert!(
            Query::of(&GetFlowsRequest {
                first: true,
                follow: true,
                ..GetFlowsRequest::default()
            })
            .is_err()
        );
        assert!(
            Query::of(&GetFlowsRequest {
                since: at(5),
                until: at(1),
                ..GetFlowsRequest::default()
            })
            .is_err()
        );
    }

    async fn next_port(stream: &mut Stream) -> Option<u32> {
        use tokio_stream::StreamExt;
        let response = stream.next().await?.expect("a response");
        match response.response_types {
            Some(ResponseTypes::Flow(flow)) => Some(ports(&[flow])[0]),
            _ => None,
        }
    }

    #[tokio::test]
    async fn following_streams_new_flows_after_the_history_until_until() {
        let hub = Arc::new(EventHub::new(16, 1024, None));
        for i in 0..3 {
            hub.publish(line(i, "DROPPED", 80 + i as u16));
        }
        let observer = HubbleObserver::new(hub.clone(), SystemTime::now(), "n".into());
        let get_flows = |request| observer.get_flows(Request::new(request));
        let mut live = get_flows(GetFlowsRequest {
            number: 1,
            follow: true,
            ..GetFlowsRequest::default()
        })
        .await
        .expect("GetFlows")
        .into_inner();
        assert_eq!(next_port(&mut live).await, Some(82), "the history's last");
        hub.publish(line(5, "AUDIT", 90));
        assert_eq!(next_port(&mut live).await, Some(90), "a new flow, live");
        // Following up to a time that has passed: the history, then the end.
        let mut ended = get_flows(GetFlowsRequest {
            follow: true,
            since: at(1),
            until: at(10),
            ..GetFlowsRequest::default()
        })
        .await
        .expect("GetFlows")
        .into_inner();
        for port in [81, 82, 90] {
            assert_eq!(next_port(&mut ended).await, Some(port));
        }
        assert_eq!(next_port(&mut ended).await, None);
    }
}
