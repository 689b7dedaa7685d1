//! The compiler's ids kept across restarts: `ids.json` in the state directory
//! (`policy::SavedIds`: identity, endpoint and rule ids, hit slots).
//!
//! Read at start, so that a restarted agent numbers everything as before and its
//! first apply (a diff with what the pinned maps hold) writes only what changed
//! while no agent ran. Written after applies in the background, at most once a
//! second (churn must not wait for disks; the ids are copied under the agent's lock
//! once per write and written outside it), and at shutdown. The file is only a
//! numbering: missing, out of date (a `kill -9` within a second of a change),
//! unreadable or of another format version, it costs a larger first apply, never a
//! wrong verdict; the agent says so and numbers afresh.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::Context;
use serde::Serialize;

use super::{Agent, AgentCore};
use crate::policy::{Compiler, IdsRevision, SavedIds};

pub const IDS_FILE: &str = "ids.json";

/// How often the writer looks for ids to save.
const WRITE_EVERY: Duration = Duration::from_secs(1);

/// The saved ids, for `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedIdsStatus {
    /// What the start found: `restored`, `absent`, or why they were not used.
    pub at_start: String,
    /// The ids of the compiled state are on disk.
    pub current: bool,
    /// Why the last write failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_error: Option<String>,
}

pub struct IdsFile {
    state_dir: PathBuf,
    at_start: String,
    /// Held through each write: the background writer's and the one at exit.
    writing: Mutex<()>,
    /// What the last write did (held briefly: read under the agent's lock).
    written: Mutex<Written>,
}

#[derive(Default)]
struct Written {
    revision: Option<IdsRevision>,
    error: Option<String>,
}

impl IdsFile {
    /// Reads the saved ids: the compiler to start with (Kubernetes node `node`'s,
    /// if any), numbering as the last agent did, or afresh.
    pub fn load(state_dir: &Path, node: Option<String>) -> (Self, Compiler) {
        let path = state_dir.join(IDS_FILE);
        let afresh = |node: Option<String>| match node {
            Some(node) => Compiler::enforcing_node(node),
            None => Compiler::default(),
        };
        let (at_start, compiler) = match std::fs::read(&path) {
            Ok(bytes) => match SavedIds::from_json(&bytes) {
                Ok(saved) => {
                    let (workload, cidr, endpoints, rules, slots) = saved.counts();
                    tracing::info!(
                        workload_identities = workload,
                        cidr_identities = cidr,
                        endpoints,
                        rules,
                        hit_slots = slots,
                        "numbering as the last agent did ({})",
                        path.display()
                    );
                    ("restored".to_owned(), Compiler::with_saved_ids(node, saved))
                }
                Err(e) => {
                    tracing::warn!(
                        "{}: {e}; numbering afresh (the first apply rewrites the entries whose ids change)",
                        path.display()
                    );
                    (format!("not used: {e}"), afresh(node))
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                ("absent".to_owned(), afresh(node))
            }
            Err(e) => {
                tracing::warn!(
                    "reading {}: {e}; numbering afresh (the first apply rewrites the entries whose ids change)",
                    path.display()
                );
                (format!("not used: {e}"), afresh(node))
            }
        };
        let file = Self {
            state_dir: state_dir.to_owned(),
            at_start,
            writing: Mutex::new(()),
            written: Mutex::new(Written::default()),
        };
        (file, compiler)
    }

    /// The ids to save, if this agent enforces something and they changed since
    /// the last write: copied here, under the agent's lock.
    pub fn to_save(&self, core: &AgentCore) -> Option<(IdsRevision, SavedIds)> {
        // Nothing enforced by this agent yet (none applied at start, or the first
        // apply refused): the file stays as the last agent left it.
        core.enforcer.enforced.as_ref()?;
        let revision = core.enforcer.ids_revision();
        let written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        (written.revision != Some(revision)).then(|| (revision, core.enforcer.saved_ids()))
    }

    /// Writes `ids` (of `revision`) in place of the saved ones, atomically, unless
    /// newer ones were written meanwhile. Blocks on the disk.
    pub fn write(&self, revision: IdsRevision, ids: SavedIds) {
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let newer_written = self
            .written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .revision
            .is_some_and(|written| written >= revision);
        if newer_written {
            return;
        }
        let result = write_atomically(&self.state_dir, &ids.to_json());
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(()) => {
                written.revision = Some(revision);
                if written.error.take().is_some() {
                    tracing::info!("the compiler's ids are saved again");
                }
            }
            Err(e) => {
                let message = format!("{e:#}");
                // Once per failing stretch, not once a second.
                if written.error.as_ref() != Some(&message) {
                    tracing::warn!(
                        "could not save the compiler's ids ({message}); a restart would rewrite the entries whose ids change"
                    );
                }
                written.error = Some(message);
            }
        }
    }

    /// For `status`.
    pub fn status(&self, core: &AgentCore) -> SavedIdsStatus {
        let written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        SavedIdsStatus {
            at_start: self.at_start.clone(),
            current: core.enforcer.enforced.is_none()
                || written.revision == Some(core.enforcer.ids_revision()),
            write_error: written.error.clone(),
        }
    }
}

/// Saves the ids whenever they changed, at most once every `WRITE_EVERY`.
pub async fn run(agent: Arc<Agent>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(WRITE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        save(&agent).await?;
    }
}

/// Saves the ids if they changed since the last write (at exit: the last word).
pub async fn save(agent: &Agent) -> anyhow::Result<()> {
    let to_save = agent.ids_file.to_save(&*agent.core.lock().await);
    if let Some((revision, ids)) = to_save {
        let file = agent.ids_file.clone();
        tokio::task::spawn_blocking(move || file.write(revision, ids)).await?;
    }
    Ok(())
}

/// Temporary file, fsync, rename over the saved file, fsync of the directory: a
/// crash leaves the old file or the new one, never half of one.
fn write_atomically(state_dir: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let path = state_dir.join(IDS_FILE);
    let temporary = state_dir.join(format!(".{IDS_FILE}.tmp"));
    let written = std::fs::File::create(&temporary)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(e).with_context(|| format!("writing {}", temporary.display()));
    }
    std::fs::rename(&temporary, &path).with_context(|| format!("replacing {}", path.display()))?;
    std::fs::File::open(state_dir)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("syncing {}", state_dir.display()))
}
