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
}
