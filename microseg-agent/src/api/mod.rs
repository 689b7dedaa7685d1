//! The agent's API: JSON lines over a Unix socket (root-owned, mode 0600 by default).
//! A client sends one `Request` line and reads one `Response` line, or, for `Events`,
//! a stream of event lines.

pub mod client;
pub mod protocol;

pub use protocol::{ObjectKind, Request, Response, SourceText};

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/microseg/microseg.sock";
