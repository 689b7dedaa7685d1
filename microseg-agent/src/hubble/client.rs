//! A client of the Hubble API over its Unix socket (tonic's transport dials TCP by
//! itself; a Unix socket needs a connector), for tests and tools.

use std::path::PathBuf;

use tonic::transport::{Channel, Endpoint, Uri};

/// A channel to the Hubble API at the Unix socket `path`.
pub async fn connect_unix(path: PathBuf) -> Result<Channel, tonic::transport::Error> {
    // The URI is required by the API and unused: the connector decides where to dial.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}
