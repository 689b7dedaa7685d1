//! Hubble's Observer API over gRPC, so that `hubble observe` and Hubble UI work
//! against microseg: GetFlows (with Hubble's filters, applied here), GetNodes,
//! GetNamespaces, ServerStatus and the standard gRPC health service, on a Unix
//! socket and optionally a loopback TCP port. Flows are converted from the agent's event JSON (`event_view`), the one
//! source of truth for what an event says.

/// Messages and service code generated from ../proto (build.rs).
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod flow {
        tonic::include_proto!("flow");
    }
    pub mod observer {
        tonic::include_proto!("observer");
    }
    pub mod relay {
        tonic::include_proto!("relay");
    }
}

pub mod activity;
pub mod client;
pub mod config;
pub mod convert;
pub mod filter;
pub mod icmp_names;
pub mod server;

use std::{net::SocketAddr, path::Path, sync::Arc, time::SystemTime};

use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use self::{proto::observer::observer_server::ObserverServer, server::HubbleObserver};
use crate::flow_history::EventHub;

/// What the Hubble server serves: the flow history, and what `ServerStatus` says of
/// the node. The agent hands it over; the server knows no daemon.
#[derive(Clone)]
pub struct Served {
    pub history: Arc<EventHub>,
    pub node_name: String,
    /// When the agent started (ServerStatus' uptime).
    pub started: SystemTime,
}

/// The service name Hubble's server reports healthy (Cilium's
/// `ObserverServiceName`), beside the gRPC name `observer.Observer`.
const HUBBLE_HEALTH_SERVICE: &str = "hubble.server.Observer";

async fn router(served: &Served) -> tonic::transport::server::Router {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ObserverServer<HubbleObserver>>().await;
    // The name the `hubble` CLI checks (`hubble status`), as Cilium registers it.
    health
        .set_service_status(HUBBLE_HEALTH_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(ObserverServer::new(HubbleObserver::new(
            served.history.clone(),
            served.started,
            served.node_name.clone(),
        )))
}

/// Serves the Observer API on the Unix socket `path` (created with `mode`, see
/// `crate::socket`) until an error.
pub async fn serve_unix(served: Served, path: &Path, mode: u32) -> anyhow::Result<()> {
    let listener = crate::socket::bind_private(path, mode)?;
    router(&served)
        .await
        .serve_with_incoming(UnixListenerStream::new(listener))
        .await?;
    Ok(())
}

/// Serves the Observer API on a TCP `address` until an error.
pub async fn serve_tcp(served: Served, address: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    router(&served)
        .await
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
