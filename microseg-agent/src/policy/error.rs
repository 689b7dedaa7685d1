//! Load and validation errors. Each error names where it was found (file, document,
//! field path) so that a user can fix every problem of a policy tree in one pass.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where a document came from: the file and the 1-based index of the document inside
/// it (YAML files may hold several documents separated by `---`).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source {
    pub file: PathBuf,
    /// 1-based document index; 0 when the error concerns the whole file.
    pub document: usize,
}

impl Source {
    pub fn new(file: impl Into<PathBuf>, document: usize) -> Self {
        Self {
            file: file.into(),
            document,
        }
    }

    /// A source for objects built in memory (tests, the conformance corpus).
    pub fn memory(label: &str) -> Self {
        Self::new(label, 1)
    }

    pub fn file(&self) -> &Path {
        &self.file
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(f, "{}: document {}", self.file.display(), self.document)
        }
    }
}

/// One problem found while loading or validating policies and inventory.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyError {
    pub source: Source,
    /// Field path inside the document, e.g. `spec.ingress[0].from[1].ipBlock.cidr`;
    /// empty when the error concerns the whole document or file.
    pub path: String,
    pub reason: String,
}

impl PolicyError {
    pub fn new(source: &Source, path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            source: source.clone(),
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.source, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.source, self.path, self.reason)
        }
    }
}

impl std::error::Error for PolicyError {}

/// All problems found in one load: loading never stops at the first error.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadErrors {
    pub errors: Vec<PolicyError>,
}

impl LoadErrors {
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &PolicyError> {
        self.errors.iter()
    }
}

impl From<Vec<PolicyError>> for LoadErrors {
    fn from(errors: Vec<PolicyError>) -> Self {
        Self { errors }
    }
}

impl fmt::Display for LoadErrors {
    /// One error per line, so the output can be read like compiler diagnostics.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.errors.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}
