//! Policy files on disk: which files a path names, and the documents in a file's
//! text. One rule for the agent's watched directories, `microseg apply -f`, and
//! `microseg check`:
//!
//! - a file named explicitly is read, whatever its name;
//! - in a directory tree, entries whose name starts with `.` are skipped (hidden
//!   files, editors' temporaries, and a Kubernetes ConfigMap mount's `..data` and
//!   timestamped directories, whose files are reached once through the mount's
//!   top-level links); directories are walked in name order, symbolic links
//!   followed, each directory once (by device and inode, so a link loop ends);
//! - a file in a tree is read if named `*.yaml`, `*.yml` or `*.json`, except
//!   `expected.*` (the expected verdicts beside an example, see
//!   [`super::load_expected`]);
//! - a file is a stream of documents: JSON values for `*.json`, YAML documents
//!   otherwise; each is numbered from 1, and an error names the file and document.

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::error::{PolicyError, Source};

/// The policy files `paths` name, in order: each explicit file, then each
/// directory's files in name order. Every unreadable path is an error.
pub fn policy_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Vec<PolicyError>> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    let mut visited = BTreeSet::new();
    for path in paths {
        match std::fs::metadata(path) {
            Ok(metadata) if metadata.is_dir() => {
                walk(path, &mut visited, &mut files, &mut errors);
            }
            Ok(_) => files.push(path.clone()),
            Err(error) => errors.push(PolicyError::new(
                &Source::new(path, 0),
                "",
                format!("cannot be read: {error}"),
            )),
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(errors)
    }
}

/// Whether a file met in a directory walk is a policy file.
pub fn is_policy_file(path: &Path) -> bool {
    let expectations = path.file_stem().is_some_and(|stem| stem == "expected");
    !expectations
        && matches!(
            path.extension().and_then(|extension| extension.to_str()),
            Some("yaml" | "yml" | "json")
        )
}

fn walk(
    directory: &Path,
    visited: &mut BTreeSet<(u64, u64)>,
    files: &mut Vec<PathBuf>,
    errors: &mut Vec<PolicyError>,
) {
    let error = |reason: String| PolicyError::new(&Source::new(directory, 0), "", reason);
    match std::fs::metadata(directory) {
        Ok(metadata) => {
            if !visited.insert((metadata.dev(), metadata.ino())) {
                // Met before: a link back up the tree, or two links to one place.
                return;
            }
        }
        Err(e) => {
            errors.push(error(format!("cannot be read: {e}")));
            return;
        }
    }
    let entries = match std::fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(error(format!("cannot read directory: {e}")));
            return;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
        .map(|entry| entry.path())
        .collect();
    paths.sort();
    for path in paths {
        match std::fs::metadata(&path) {
            Ok(metadata) if metadata.is_dir() => walk(&path, visited, files, errors),
            Ok(_) if is_policy_file(&path) => files.push(path),
            Ok(_) => {}
            // A dangling link (a ConfigMap update in progress, a removed file).
            Err(e) if path.is_symlink() => errors.push(PolicyError::new(
                &Source::new(&path, 0),
                "",
                format!("broken symbolic link: {e}"),
            )),
            Err(e) => errors.push(PolicyError::new(
                &Source::new(&path, 0),
                "",
                format!("cannot be read: {e}"),
            )),
        }
    }
}

/// The documents of one file's text, numbered from 1, without empty YAML documents
/// (a trailing `---`). A syntax error ends the file: the parsers cannot resynchronise
/// after one.
pub fn documents(
    file: &Path,
    text: &str,
) -> (Vec<(Source, serde_json::Value)>, Option<PolicyError>) {
    let mut found = Vec::new();
    let is_json = file
        .extension()
        .is_some_and(|extension| extension == "json");
    if is_json {
        let stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
        for (index, document) in stream.enumerate() {
            let source = Source::new(file, index + 1);
            match document {
                Ok(value) => found.push((source, value)),
                Err(error) => {
                    let error = PolicyError::new(&source, "", format!("bad JSON: {error}"));
                    return (found, Some(error));
                }
            }
        }
    } else {
        for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
            let source = Source::new(file, index + 1);
            match serde_json::Value::deserialize(document) {
                Ok(serde_json::Value::Null) => {}
                Ok(value) => found.push((source, value)),
                Err(error) => {
                    let error = PolicyError::new(&source, "", format!("bad YAML: {error}"));
                    return (found, Some(error));
                }
            }
        }
    }
    (found, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("microseg-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_configmap_mount_is_read_once_and_loops_end() {
        // As the kubelet mounts a ConfigMap: a timestamped directory, `..data` linking
        // to it, and a top-level link per key through `..data`.
        let dir = scratch("configmap");
        std::fs::create_dir(dir.join("..2026_11_29_10_00_00.1")).unwrap();
        std::fs::write(dir.join("..2026_11_29_10_00_00.1/policies.yaml"), "").unwrap();
        std::os::unix::fs::symlink("..2026_11_29_10_00_00.1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/policies.yaml", dir.join("policies.yaml")).unwrap();
        // A loop, a hidden file, an expectations file, and a file of another kind.
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::os::unix::fs::symlink("..", dir.join("sub/up")).unwrap();
        std::fs::write(dir.join("sub/a.json"), "").unwrap();
        std::fs::write(dir.join(".hidden.yaml"), "").unwrap();
        std::fs::write(dir.join("expected.yaml"), "").unwrap();
        std::fs::write(dir.join("README.md"), "").unwrap();
        let files = policy_files(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(files, [dir.join("policies.yaml"), dir.join("sub/a.json")]);
        // Named explicitly, any file is read.
        let readme = dir.join("README.md");
        assert_eq!(
            policy_files(std::slice::from_ref(&readme)).unwrap(),
            [readme]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn broken_links_and_missing_paths_are_errors() {
        let dir = scratch("broken");
        std::os::unix::fs::symlink("nowhere.yaml", dir.join("gone.yaml")).unwrap();
        let errors = policy_files(&[dir.clone(), dir.join("missing.yaml")]).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].to_string().contains("broken symbolic link"));
        assert!(
            errors[1]
                .to_string()
                .contains("missing.yaml: cannot be read")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn documents_are_numbered_and_errors_name_them() {
        let (found, error) = documents(Path::new("x.yaml"), "a: 1\n---\n---\nb: 2\n---\n[oops\n");
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].0.document, 3);
        let error = error.unwrap().to_string();
        assert!(error.starts_with("x.yaml: document 4: bad YAML"), "{error}");
        let (found, error) = documents(Path::new("x.json"), "{\"a\": 1} {\"b\": ");
        assert_eq!(found.len(), 1);
        assert!(
            error
                .unwrap()
                .to_string()
                .starts_with("x.json: document 2: bad JSON")
        );
    }
}
