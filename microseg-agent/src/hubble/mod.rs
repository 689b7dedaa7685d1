//! Hubble's Observer API over gRPC, so that `hubble observe` and Hubble UI work
//! against microseg: GetFlows (with Hubble's filters, applied here), ServerStatus and
//! the standard gRPC health service, on a Unix socket and optionally a loopback TCP
//! port. Flows are converted from the agent's event JSON (`event_view`), the one
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

pub mod client;
pub mod config;
pub mod convert;
pub mod filter;
pub mod server;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use self::{proto::observer::observer_server::ObserverServer, server::HubbleObserver};
use crate::agent::{Agent, config::AgentConfig, tasks};

/// Starts the Hubble API's listeners as supervised tasks (`hubble` on the Unix
/// socket, `hubble-tcp` on the loopback port when one is set).
pub fn start(
    agent: &Arc<Agent>,
    config: &AgentConfig,
    restarts: &Arc<tasks::TaskRestarts>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut handles = Vec::new();
    if let Some(path) = config.hubble.socket_path(&config.socket) {
        let (agent, mode) = (agent.clone(), config.socket_mode_bits()?);
        tracing::info!(socket = %path.display(), "serving Hubble's Observer API");
        handles.push(tasks::supervise("hubble", restarts.clone(), move || {
            serve_unix(agent.clone(), path.clone(), mode)
        }));
    }
    if let Some(address) = config.hubble.listen_socket_address()? {
        let agent = agent.clone();
        tracing::info!(%address, "serving Hubble's Observer API");
        handles.push(tasks::supervise(
            "hubble-tcp",
            restarts.clone(),
            move || serve_tcp(agent.clone(), address),
        ));
    }
    Ok(handles)
}

/// Removes the Unix socket when the agent stops.
pub fn remove_socket(config: &AgentConfig) {
    if let Some(path) = config.hubble.socket_path(&config.socket) {
        let _ = std::fs::remove_file(path);
    }
}

async fn router(agent: &Agent) -> tonic::transport::server::Router {
    let (started, node_name) = {
        let core = agent.core.lock().await;
        (core.started, core.config.node_name())
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ObserverServer<HubbleObserver>>().await;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(ObserverServer::new(HubbleObserver::new(
            agent.hub.clone(),
            started,
            node_name,
        )))
}

async fn serve_unix(agent: Arc<Agent>, path: PathBuf, mode: u32) -> anyhow::Result<()> {
    let listener = crate::agent::server::bind_private(&path, mode)?;
    router(&agent)
        .await
        .serve_with_incoming(UnixListenerStream::new(listener))
        .await?;
    Ok(())
}

async fn serve_tcp(agent: Arc<Agent>, address: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    router(&agent)
        .await
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
