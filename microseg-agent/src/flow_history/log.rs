//! The event log (`--event-log FILE`): events as JSON lines, rotated by size so that a
//! flood of denied packets cannot fill the disk. When FILE would grow past
//! `max_bytes` it becomes FILE.1 (FILE.1 becomes FILE.2, ...), the oldest beyond
//! `max_files` rotated files is deleted, and a new FILE is started: at most
//! `(max_files + 1) * max_bytes` bytes in all.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

pub struct EventLog {
    path: PathBuf,
    max_bytes: u64,
    max_files: u32,
    writer: BufWriter<File>,
    /// Bytes in the current file.
    size: u64,
    /// Rotations since the agent started.
    pub rotations: u64,
    /// Lines that could not be written (a full disk, an I/O error).
    pub write_errors: u64,
}

impl EventLog {
    /// Opens (appends to) `path`.
    pub fn open(path: &Path, max_bytes: u64, max_files: u32) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            max_bytes: max_bytes.max(1),
            max_files,
            writer: BufWriter::new(file),
            size,
            rotations: 0,
            write_errors: 0,
        })
    }

    /// Appends one line, rotating first if the file would grow past its limit.
    pub fn write_line(&mut self, line: &str) {
        let bytes = line.len() as u64 + 1;
        if self.size > 0
            && self.size + bytes > self.max_bytes
            && let Err(e) = self.rotate()
        {
            self.write_errors += 1;
            tracing::warn!("rotating the event log {}: {e}", self.path.display());
            return;
        }
        match writeln!(self.writer, "{line}") {
            Ok(()) => self.size += bytes,
            Err(_) => self.write_errors += 1,
        }
    }

    pub fn flush(&mut self) {
        if self.writer.flush().is_err() {
            self.write_errors += 1;
        }
    }

    fn rotated(&self, index: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{index}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.writer.flush()?;
        if self.max_files == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(self.rotated(self.max_files));
            for index in (1..self.max_files).rev() {
                let from = self.rotated(index);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(index + 1))?;
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.writer = BufWriter::new(file);
        self.size = 0;
        self.rotations += 1;
        Ok(())
    }
}

/// The newest `max` lines of the log and its rotated files, oldest first: the flow
/// history a restarted agent starts with. Lines that are not JSON objects (a line cut
/// short by a crash) are skipped; unreadable files are skipped.
pub fn read_newest(path: &Path, max_files: u32, max: usize) -> Vec<std::sync::Arc<str>> {
    let mut newest = std::collections::VecDeque::with_capacity(max.min(65_536));
    let mut files: Vec<PathBuf> = (1..=max_files)
        .rev()
        .map(|index| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".{index}"));
            PathBuf::from(name)
        })
        .collect();
    files.push(path.to_owned());
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines() {
            if !line.starts_with('{') || serde_json::from_str::<serde_json::Value>(line).is_err() {
                continue;
            }
            if newest.len() == max {
                newest.pop_front();
            }
            newest.push_back(std::sync::Arc::from(line));
        }
    }
    newest.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_lines_are_read_back_across_rotations() {
        let dir = std::env::temp_dir().join(format!("microseg-event-read-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let mut log = EventLog::open(&path, 4096, 3).unwrap();
        for index in 0..200 {
            log.write_line(&format!("{{\"n\":{index},\"pad\":\"{}\"}}", "x".repeat(40)));
        }
        log.flush();
        std::fs::write(dir.join("events.jsonl.3"), "{\"cut short").unwrap();
        let lines = read_newest(&path, 3, 50);
        assert_eq!(lines.len(), 50);
        let numbers: Vec<u64> = lines
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(numbers, (150..200).collect::<Vec<u64>>());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_log_is_bounded_by_size_and_files() {
        let dir = std::env::temp_dir().join(format!("microseg-event-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let mut log = EventLog::open(&path, 1000, 3).unwrap();
        let line = "x".repeat(99);
        for _ in 0..1000 {
            log.write_line(&line);
        }
        log.flush();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "events.jsonl",
                "events.jsonl.1",
                "events.jsonl.2",
                "events.jsonl.3"
            ]
        );
        for name in &names {
            let size = std::fs::metadata(dir.join(name)).unwrap().len();
            assert!(size <= 1000, "{name} has {size} bytes");
        }
        assert_eq!(log.rotations, 99);
        // Lines are whole: each file holds complete lines.
        let text = std::fs::read_to_string(dir.join("events.jsonl.1")).unwrap();
        assert!(text.lines().all(|l| l.len() == 99));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
