//! Small filesystem helpers shared by every writer of checkpoints and results.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so readers
/// see either the old file or the whole new one, never a torn write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    tmp.as_file().sync_all().with_context(|| format!("syncing {}", path.display()))?;
    // Temporary files are created private; the result should have ordinary permissions.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("setting permissions of {}", path.display()))?;
    }
    tmp.persist(path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Reads a whole text file, naming it in the error.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// A TOML file parsed into `T`; a parse error names the file and `what` it should have been.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = read_text(path)?;
    toml::from_str(&text).with_context(|| format!("{} is not a valid {what}", path.display()))
}

/// Copies a file through `write_atomic`, so the copy gets ordinary permissions whatever the
/// source's (a read-only source must not make the copy impossible to replace later).
pub fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
    write_atomic(to, &bytes)
}

/// Removes what an interrupted writer leaves in a run directory: `.tmp*` files of `write_atomic`
/// and `.*.partial` / `.*.old` directories of a checkpoint being saved.
pub fn remove_debris(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if name.starts_with(".tmp") && path.is_file() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        } else if name.starts_with('.') && (name.ends_with(".partial") || name.ends_with(".old")) && path.is_dir() {
            std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Cuts a JSON Lines log back to its lines of `step` ≤ `keep` (lines without a step are kept when
/// they follow a kept one), so that a resumed run logs each step once. A missing log is left so.
pub fn truncate_log(path: &Path, keep: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let mut out = String::new();
    for line in text.lines() {
        let step = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["step"].as_u64());
        match step {
            Some(s) if s as usize > keep => break,
            _ if line.trim().is_empty() => {}
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if out.len() != text.len() {
        write_atomic(path, out.as_bytes())?;
    }
    Ok(())
}

/// The names in `dir` that belong to an earlier run: `log.jsonl`, `latest`, `checkpoint-*`, `model`.
pub fn run_files(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n == "log.jsonl" || n == "latest" || n == "model" || n.starts_with("checkpoint-"))
        .collect();
    names.sort();
    names
}

/// Removes an earlier run's files (`run_files`) and debris from `dir`, nothing else.
pub fn clear_run(dir: &Path) -> Result<()> {
    for name in run_files(dir) {
        let p = dir.join(name);
        let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        r.with_context(|| format!("removing {}", p.display()))?;
    }
    remove_debris(dir)
}

/// For tests of interrupted writes: when `DETOX_TEST_KILL_AT` equals `point`, the process aborts
/// here at once, with no cleanup, as `kill -9` would stop it.
pub fn kill_point(point: &str) {
    if test_point("DETOX_TEST_KILL_AT", point) {
        eprintln!("DETOX_TEST_KILL_AT={point}: aborting");
        std::process::abort();
    }
}

/// A command's `--output`, opened before the work starts so that a bad path fails at once with its
/// own name. Rows are written as they come: to standard output for `-`, else to a temporary file
/// beside the path that `commit` renames into place, so a reader never sees a half-written file.
pub struct Output {
    /// The requested path; None for standard output.
    path: Option<std::path::PathBuf>,
    file: Option<std::io::BufWriter<tempfile::NamedTempFile>>,
    /// Rows written.
    pub rows: usize,
}

impl Output {
    pub fn create(target: &str) -> Result<Self> {
        if target == "-" {
            return Ok(Self { path: None, file: None, rows: 0 });
        }
        let path = std::path::PathBuf::from(target);
        anyhow::ensure!(!path.is_dir(), "cannot write --output {target}: it is a directory");
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        anyhow::ensure!(dir.is_dir(), "cannot write --output {target}: directory {} does not exist", dir.display());
        let tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write --output {target}"))?;
        Ok(Self { path: Some(path), file: Some(std::io::BufWriter::new(tmp)), rows: 0 })
    }

    /// Appends `line` and a newline, flushed at once.
    pub fn line(&mut self, line: &str) -> Result<()> {
        let what = || match &self.path {
            Some(p) => format!("writing {}", p.display()),
            None => "writing standard output".into(),
        };
        let r = match self.file.as_mut() {
            Some(f) => writeln!(f, "{line}").and_then(|_| f.flush()),
            None => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}").and_then(|_| out.flush())
            }
        };
        r.with_context(what)?;
        self.rows += 1;
        Ok(())
    }

    /// Appends `text` as it is.
    pub fn text(&mut self, text: &str) -> Result<()> {
        self.line(text.strip_suffix('\n').unwrap_or(text))
    }

    /// Puts the written rows at the requested path.
    pub fn commit(mut self) -> Result<()> {
        let (Some(path), Some(file)) = (self.path.take(), self.file.take()) else { return Ok(()) };
        let tmp =
            file.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", path.display()))?;
        tmp.as_file().sync_all().with_context(|| format!("syncing {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))
                .with_context(|| format!("setting permissions of {}", path.display()))?;
        }
        tmp.persist(&path).map_err(|e| e.error).with_context(|| format!("cannot write --output {}", path.display()))?;
        Ok(())
    }
}

/// Whether the test hook `var` (an environment variable) names `point`.
pub fn test_point(var: &str, point: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| v == point)
}
