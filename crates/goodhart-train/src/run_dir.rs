//! Run directories: `runs/<name>/<id>/` holding `config.toml`, `metrics.jsonl`,
//! `summary.json`, `report.html` and `checkpoints/` (DESIGN.md).
//!
//! Files are written atomically: to a temporary file in the same directory, fsynced,
//! renamed over the target, then the directory is fsynced. A reader (or a resumed run)
//! sees either the old file or the new one, never a torn one.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

/// Errors of the run directory: the path and what failed.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    /// An I/O operation failed.
    #[error("{action} `{path}`: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The run name cannot be a directory name.
    #[error(
        "invalid run name `{0}`: use letters, digits, `-`, `_` and `.` (not starting with `.`)"
    )]
    InvalidName(String),
}

type Result<T> = std::result::Result<T, RunDirError>;

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError {
    let path = path.to_path_buf();
    move |source| RunDirError::Io {
        action,
        path,
        source,
    }
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync of the
/// directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    {
        let mut f = fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(bytes).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
    }
    fs::rename(&tmp, path).map_err(io("renaming into place", path))?;
    // Make the rename itself durable.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// One run's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates `<root>/<name>/<id>/` (and `checkpoints/`); `id` is `s<seed>` plus a
    /// numeric suffix when that directory already exists, so runs never overwrite
    /// each other.
    pub fn create(root: &Path, name: &str, seed: u64) -> Result<Self> {
        let valid = !name.is_empty()
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid {
            return Err(RunDirError::InvalidName(name.into()));
        }
        let parent = root.join(name);
        fs::create_dir_all(&parent).map_err(io("creating", &parent))?;
        let base = format!("s{seed}");
        let mut k = 0usize;
        loop {
            let id = if k == 0 {
                base.clone()
            } else {
                format!("{base}-{k}")
            };
            let path = parent.join(id);
            match fs::create_dir(&path) {
                Ok(()) => {
                    let run = Self { path };
                    fs::create_dir_all(run.checkpoints())
                        .map_err(io("creating", &run.checkpoints()))?;
                    return Ok(run);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => k += 1,
                Err(e) => return Err(io("creating", &path)(e)),
            }
        }
    }

    /// Opens an existing run directory (for `--resume` and `report`).
    pub fn open(path: &Path) -> Result<Self> {
        let meta = fs::metadata(path).map_err(io("opening run directory", path))?;
        if !meta.is_dir() {
            return Err(io("opening run directory", path)(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `config.toml`: the resolved configuration.
    pub fn config(&self) -> PathBuf {
        self.path.join("config.toml")
    }

    /// `metrics.jsonl`: one JSON object per step.
    pub fn metrics(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }

    /// `samples.jsonl`: one JSON object per sampled response of an RL step.
    pub fn samples(&self) -> PathBuf {
        self.path.join("samples.jsonl")
    }

    /// `summary.json`: the run's final figures.
    pub fn summary(&self) -> PathBuf {
        self.path.join("summary.json")
    }

    /// `report.html`: the self-contained report.
    pub fn report(&self) -> PathBuf {
        self.path.join("report.html")
    }

    /// `checkpoints/`.
    pub fn checkpoints(&self) -> PathBuf {
        self.path.join("checkpoints")
    }

    /// Writes `name` inside the run directory atomically.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<PathBuf> {
        let p = self.path.join(name);
        write_atomic(&p, bytes)?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("goodhart-rundir-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn runs_never_overwrite_each_other() {
        let root = scratch("ids");
        let a = RunDir::create(&root, "tomato", 3).unwrap();
        let b = RunDir::create(&root, "tomato", 3).unwrap();
        assert_eq!(a.path(), root.join("tomato/s3"));
        assert_eq!(b.path(), root.join("tomato/s3-1"));
        assert!(a.checkpoints().is_dir());
        a.write("summary.json", b"{\"x\":1}").unwrap();
        a.write("summary.json", b"{\"x\":2}").unwrap();
        assert_eq!(fs::read_to_string(a.summary()).unwrap(), "{\"x\":2}");
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(a.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}"); // checkpoints/ and summary.json
        assert_eq!(RunDir::open(a.path()).unwrap(), a);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bad_names_and_paths_are_errors() {
        let root = scratch("bad");
        for name in ["", ".hidden", "a/b", "sp ace"] {
            assert!(
                matches!(
                    RunDir::create(&root, name, 0),
                    Err(RunDirError::InvalidName(_))
                ),
                "{name}"
            );
        }
        let err = RunDir::open(&root.join("missing")).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
        let _ = fs::remove_dir_all(&root);
    }
}
