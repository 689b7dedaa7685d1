//! The last enforced cluster view, kept in the state directory so that a restarted
//! agent enforces it until the API server answers again.
//!
//! A snapshot (`kubernetes.json`: the objects, and the epoch it starts) and a journal
//! (`kubernetes.journal`: one line per changed object, its new form or `null`, each
//! tagged with its epoch). A change costs one journal line, not a rewrite of the
//! cluster: under churn at 50,000 pods the whole view was written once a second. The
//! snapshot is rewritten, with the next epoch, only when the journal has grown as
//! large as the view, so its cost per change stays constant.
//!
//! Reading: the snapshot, then the journal lines of its epoch, in order. A line of
//! another epoch is from before the snapshot (a crash between writing it and
//! emptying the journal) and is skipped; a torn last line (a crash mid-write) ends
//! the replay. Either way the cache is only what is enforced until the watches have
//! listed everything again.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::super::Agent;
use crate::objects::{ObjectChange, ObjectKey, ObjectMap, StoredObject};

const SNAPSHOT_FILE: &str = "kubernetes.json";
const JOURNAL_FILE: &str = "kubernetes.journal";
/// The journal is folded into a new snapshot once it has this many lines, or as many
/// as the view has objects, whichever is more.
const MIN_JOURNAL_LINES: usize = 4096;
/// Changes are written at most this often (churn must not wait for disks).
const WRITE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Serialize, Deserialize)]
struct Snapshot {
    epoch: u64,
    objects: Vec<(ObjectKey, StoredObject)>,
}

#[derive(Serialize)]
struct JournalLineOut<'a> {
    epoch: u64,
    key: &'a ObjectKey,
    object: Option<&'a StoredObject>,
}

#[derive(Deserialize)]
struct JournalLine {
    epoch: u64,
    key: ObjectKey,
    object: Option<StoredObject>,
}

/// What was read back: the objects, the epoch and how many journal lines were
/// replayed (the writer goes on from there).
pub struct Restored {
    pub objects: ObjectMap,
    epoch: u64,
    journal_lines: usize,
}

/// Reads the cache in `state_dir`; empty if there is none or it cannot be read.
pub fn read(state_dir: &Path) -> Restored {
    let snapshot_path = state_dir.join(SNAPSHOT_FILE);
    let snapshot: Result<Snapshot, String> = std::fs::read(&snapshot_path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| parse_snapshot(&bytes));
    let snapshot = match snapshot {
        Ok(snapshot) => snapshot,
        Err(e) => {
            if snapshot_path.exists() {
                tracing::warn!("ignoring {}: {e}", snapshot_path.display());
            }
            return Restored {
                objects: ObjectMap::new(),
                epoch: 0,
                journal_lines: 0,
            };
        }
    };
    let mut objects: ObjectMap = snapshot.objects.into_iter().collect();
    let mut journal_lines = 0;
    let journal_path = state_dir.join(JOURNAL_FILE);
    if let Ok(file) = File::open(&journal_path) {
        for line in BufReader::new(file).lines() {
            let Ok(line) = line else { break };
            let Ok(entry) = serde_json::from_str::<JournalLine>(&line) else {
                tracing::warn!(
                    "{}: a torn line after {journal_lines} changes; the rest is left to the API server",
                    journal_path.display()
                );
                break;
            };
            if entry.epoch != snapshot.epoch {
                continue;
            }
            journal_lines += 1;
            match entry.object {
                Some(object) => objects.insert(entry.key, object),
                None => objects.remove(&entry.key),
            };
        }
    }
    Restored {
        objects,
        epoch: snapshot.epoch,
        journal_lines,
    }
}

/// A snapshot, or the whole view as earlier versions wrote it (epoch 0, no journal).
fn parse_snapshot(bytes: &[u8]) -> Result<Snapshot, String> {
    serde_json::from_slice::<Snapshot>(bytes).or_else(|e| {
        serde_json::from_slice::<Vec<(ObjectKey, StoredObject)>>(bytes)
            .map(|objects| Snapshot { epoch: 0, objects })
            .map_err(|_| e.to_string())
    })
}

/// Writes the cache: journal lines for changes, a new snapshot now and then.
pub struct CacheWriter {
    dir: PathBuf,
    epoch: u64,
    journal_lines: usize,
    journal: Option<File>,
    /// No snapshot of ours yet, or a write failed (a journal line may be torn):
    /// the next write is a snapshot.
    needs_snapshot: bool,
}

impl CacheWriter {
    /// A writer going on from what `restored` read in `dir`.
    pub fn new(dir: &Path, restored: &Restored) -> Self {
        Self {
            dir: dir.to_owned(),
            epoch: restored.epoch,
            journal_lines: restored.journal_lines,
            journal: None,
            needs_snapshot: restored.epoch == 0,
        }
    }

    /// Appends `changes` (each key's new form, or `None`) to the journal, synced.
    pub fn append(
        &mut self,
        changes: &BTreeMap<ObjectKey, Option<StoredObject>>,
    ) -> anyhow::Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut lines = Vec::new();
        for (key, object) in changes {
            serde_json::to_writer(
                &mut lines,
                &JournalLineOut {
                    epoch: self.epoch,
                    key,
                    object: object.as_ref(),
                },
            )?;
            lines.push(b'\n');
        }
        let path = self.dir.join(JOURNAL_FILE);
        if self.journal.is_none() {
            std::fs::create_dir_all(&self.dir)?;
            self.journal = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening {}", path.display()))?,
            );
        }
        let journal = self.journal.as_mut().expect("opened above");
        journal
            .write_all(&lines)
            .and_then(|()| journal.sync_data())
            .with_context(|| format!("writing {}", path.display()))?;
        self.journal_lines += changes.len();
        Ok(())
    }

    /// Whether the journal is due to be folded into a snapshot of `objects` objects.
    pub fn wants_snapshot(&self, objects: usize) -> bool {
        self.needs_snapshot || self.journal_lines >= objects.max(MIN_JOURNAL_LINES)
    }

    /// Writes `objects` as the snapshot of the next epoch (temporary file, sync,
    /// rename), then empties the journal: lines of the old epoch are skipped on
    /// reading, so a crash between the two loses nothing.
    pub fn snapshot(&mut self, objects: &ObjectMap) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let epoch = self.epoch + 1;
        let path = self.dir.join(SNAPSHOT_FILE);
        let temporary = self.dir.join(format!(".{SNAPSHOT_FILE}.tmp"));
        #[derive(Serialize)]
        struct SnapshotOut<'a> {
            epoch: u64,
            objects: Vec<(&'a ObjectKey, &'a StoredObject)>,
        }
        {
            let mut file = File::create(&temporary)
                .with_context(|| format!("writing {}", temporary.display()))?;
            file.write_all(&serde_json::to_vec(&SnapshotOut {
                epoch,
                objects: objects.iter().collect(),
            })?)?;
            file.sync_all()?;
        }
        std::fs::rename(&temporary, &path)
            .with_context(|| format!("replacing {}", path.display()))?;
        self.epoch = epoch;
        self.journal = None;
        let journal = self.dir.join(JOURNAL_FILE);
        File::create(&journal)
            .and_then(|file| file.sync_all())
            .with_context(|| format!("emptying {}", journal.display()))?;
        self.journal_lines = 0;
        self.needs_snapshot = false;
        Ok(())
    }
}

/// Starts the background writer: it takes the enforced changes sent to it, and at
/// most once a second journals what changed since (each key once, as it is now), or
/// folds the journal into a snapshot of the view copied under the agent's lock.
pub fn start_writer(
    agent: Arc<Agent>,
    mut writer: CacheWriter,
) -> mpsc::UnboundedSender<Vec<ObjectChange>> {
    let (sender, mut receiver) = mpsc::unbounded_channel::<Vec<ObjectChange>>();
    tokio::spawn(async move {
        while let Some(first) = receiver.recv().await {
            let mut pending: BTreeMap<ObjectKey, Option<StoredObject>> = BTreeMap::new();
            pending.extend(first);
            while let Ok(more) = receiver.try_recv() {
                pending.extend(more);
            }
            let objects = {
                let core = agent.core.lock().await;
                // Copied only when a snapshot is due: its cost is spread over as many
                // changes as the view has objects.
                writer
                    .wants_snapshot(core.kube_objects.len() + pending.len())
                    .then(|| core.kube_objects.clone())
            };
            let result = tokio::task::spawn_blocking(move || {
                let result = match objects {
                    // The copy holds every change sent before it was taken; later
                    // ones are journaled against the new epoch.
                    Some(objects) => writer.snapshot(&objects),
                    None => writer.append(&pending),
                };
                (writer, result)
            })
            .await;
            match result {
                Ok((returned, Err(e))) => {
                    tracing::warn!("could not cache the cluster state: {e:#}");
                    writer = returned;
                    writer.needs_snapshot = true;
                }
                Ok((returned, Ok(()))) => writer = returned,
                Err(e) => {
                    tracing::error!("the cluster state cache writer stopped: {e}");
                    return;
                }
            }
            tokio::time::sleep(WRITE_INTERVAL).await;
        }
    });
    sender
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str, version: u32) -> (ObjectKey, StoredObject) {
        let value = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "n", "resourceVersion": version.to_string()},
        });
        (
            ObjectKey::new("Pod", "n", name),
            StoredObject::new("api".to_owned(), version as usize, &value),
        )
    }

    fn names(objects: &ObjectMap) -> Vec<(String, usize)> {
        objects
            .iter()
            .map(|(key, object)| (key.name.clone(), object.document))
            .collect()
    }

    #[test]
    fn changes_are_journaled_and_read_back_over_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = CacheWriter::new(dir.path(), &read(dir.path()));
        let view: ObjectMap = [object("a", 1), object("b", 1)].into_iter().collect();
        assert!(
            writer.wants_snapshot(view.len()),
            "the first write is a snapshot"
        );
        writer.snapshot(&view).unwrap();
        let (key, changed) = object("a", 2);
        let removed = object("b", 1).0;
        writer
            .append(
                &[(key, Some(changed)), (removed, None)]
                    .into_iter()
                    .collect(),
            )
            .unwrap();
        writer
            .append(
                &[object("c", 1)]
                    .into_iter()
                    .map(|(k, o)| (k, Some(o)))
                    .collect(),
            )
            .unwrap();
        assert!(
            !writer.wants_snapshot(2),
            "three lines are no reason to rewrite"
        );
        let restored = read(dir.path());
        assert_eq!(names(&restored.objects), [("a".into(), 2), ("c".into(), 1)]);
        assert_eq!(restored.journal_lines, 3);
    }

    #[test]
    fn lines_of_an_older_epoch_and_a_torn_tail_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = CacheWriter::new(dir.path(), &read(dir.path()));
        writer
            .snapshot(&[object("a", 1)].into_iter().collect())
            .unwrap();
        let stale = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
        writer
            .append(&[(object("a", 1).0, None)].into_iter().collect())
            .unwrap();
        let old_epoch_line = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
        assert!(stale.is_empty());
        // A crash after the next snapshot was written but before the journal was
        // emptied: the old epoch's removal of `a` must not be replayed over it.
        writer
            .snapshot(&[object("a", 3)].into_iter().collect())
            .unwrap();
        let mut journal = old_epoch_line;
        journal.extend_from_slice(b"{\"epoch\": 2, \"key\": ");
        std::fs::write(dir.path().join(JOURNAL_FILE), journal).unwrap();
        let restored = read(dir.path());
        assert_eq!(names(&restored.objects), [("a".into(), 3)]);
        assert_eq!(restored.journal_lines, 0);
    }

    #[test]
    fn a_view_cached_by_an_earlier_version_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let view = vec![object("a", 1)];
        std::fs::write(
            dir.path().join(SNAPSHOT_FILE),
            serde_json::to_vec(&view).unwrap(),
        )
        .unwrap();
        let restored = read(dir.path());
        assert_eq!(names(&restored.objects), [("a".into(), 1)]);
        let writer = CacheWriter::new(dir.path(), &restored);
        assert!(
            writer.wants_snapshot(1),
            "journaled only against a snapshot of ours"
        );
    }
}
