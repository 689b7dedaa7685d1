//! Unix sockets only root can reach: the agent's API and Hubble's Observer API are
//! bound the same way.

use std::os::unix::fs::PermissionsExt;

use tokio::net::UnixListener;

/// Binds the API socket so that no moment exists where another user could connect:
/// the socket is created inside a fresh directory only root can enter, given its
/// mode there, and then renamed into place. A missing parent directory is created
/// with mode 0700.
pub fn bind_private(path: &std::path::Path, mode: u32) -> anyhow::Result<UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::DirBuilderExt;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // Named after the socket too: the agent binds several sockets at once (API, Hubble).
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let staging = parent.join(format!(".microseg-socket-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .with_context(|| format!("creating {}", staging.display()))?;
    let staged = staging.join("socket");
    let bound = (|| -> anyhow::Result<UnixListener> {
        let listener =
            UnixListener::bind(&staged).with_context(|| format!("binding {}", staged.display()))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        // A stale socket from a killed agent is replaced by the rename.
        std::fs::rename(&staged, path)
            .with_context(|| format!("moving the socket to {}", path.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    bound
}
