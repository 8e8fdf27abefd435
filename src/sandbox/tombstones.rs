//! Sandboxes ended while the database was unreachable, remembered on disk until their rows are
//! deleted: without this record a node restarted before the database returned loaded the rows
//! again and served the deleted sandboxes (tokens, proxy password and CA) until they expired.
//!
//! Invariants:
//! - The file (`data_dir/pending-deletions`, 0600, one sandbox id per line, sorted) lists every
//!   pending deletion, or is absent when there is none. It is replaced whole (written beside,
//!   fsynced, renamed, directory fsynced), so a crash leaves the old list or the new one.
//! - A file that cannot be read, or holds a line that is not a sandbox id, stops the start: a
//!   node that cannot tell which sandboxes were deleted must not serve any.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::is_sandbox_id;
use super::SandboxError;

/// File name under `data_dir`.
pub const FILE_NAME: &str = "pending-deletions";

/// File name under `data_dir` of the isolated sandboxes that live (written before each one's
/// row exists, removed once it has ended): a start ends every stored sandbox listed there,
/// whatever a crash or a dropped runtime left of its namespace, record and directory — they
/// had been restored as proxy-only sandboxes, credentials working.
pub const ISOLATED_FILE_NAME: &str = "isolated-sandboxes";

/// Where the pending deletions are kept; `None` keeps them in memory only (unit tests).
#[derive(Clone, Debug, Default)]
pub struct Tombstones {
    path: Option<PathBuf>,
}

impl Tombstones {
    /// Kept in `data_dir/pending-deletions`.
    pub fn in_dir(data_dir: &Path) -> Self {
        Self::named(data_dir, FILE_NAME)
    }

    /// A list of sandbox ids in `data_dir/<name>` (same format and guarantees).
    pub fn named(data_dir: &Path, name: &str) -> Self {
        Tombstones {
            path: Some(data_dir.join(name)),
        }
    }

    /// The file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The ids recorded by an earlier run (none when there is no file).
    ///
    /// # Errors
    /// The file exists but cannot be read, or a line is not a sandbox id.
    pub fn load(&self) -> Result<HashSet<String>, SandboxError> {
        let Some(path) = &self.path else {
            return Ok(HashSet::new());
        };
        // Not followed or waited on: a link, a FIFO (its read blocked the start) or a
        // device in its place is refused (review).
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(HashSet::new()),
            Err(e) => return Err(refused(path, &format!("cannot be read ({e})"))),
            Ok(m) if !m.file_type().is_file() => {
                return Err(refused(path, "is not a regular file"));
            }
            Ok(_) => {}
        }
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(HashSet::new()),
            Err(e) => return Err(refused(path, &format!("cannot be read ({e})"))),
        };
        let mut ids = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let id = line.trim();
            if id.is_empty() {
                continue;
            }
            if !is_sandbox_id(id) {
                return Err(refused(
                    path,
                    &format!("line {} is not a sandbox id", n + 1),
                ));
            }
            ids.insert(id.to_owned());
        }
        Ok(ids)
    }

    /// Adds `ids` to the recorded list; returns the whole list.
    ///
    /// # Errors
    /// The list cannot be read or written.
    pub fn add(
        &self,
        ids: impl IntoIterator<Item = String>,
    ) -> Result<HashSet<String>, SandboxError> {
        self.change(|all| {
            let before = all.len();
            all.extend(ids);
            all.len() != before
        })
    }

    /// Removes `id` from the recorded list.
    ///
    /// # Errors
    /// The list cannot be read or written.
    pub fn remove(&self, id: &str) -> Result<(), SandboxError> {
        self.change(|all| all.remove(id)).map(drop)
    }

    /// Loads the list, applies `f`, and writes it back if `f` says it changed.
    fn change(
        &self,
        f: impl FnOnce(&mut HashSet<String>) -> bool,
    ) -> Result<HashSet<String>, SandboxError> {
        let mut all = self.load()?;
        if f(&mut all) {
            self.save(&all).map_err(|e| {
                let file = self.path.as_deref().unwrap_or(Path::new("")).display();
                SandboxError::PendingDeletions(format!("{file} cannot be written ({e})"))
            })?;
        }
        Ok(all)
    }

    /// Records `ids` as the whole list (an empty list removes the file).
    ///
    /// # Errors
    /// The file cannot be written or removed; the caller logs it (the sandboxes have ended
    /// either way, only a restart before the database returns would bring them back).
    pub fn save(&self, ids: &HashSet<String>) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if ids.is_empty() {
            return match std::fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
                _ => crate::fsutil::sync_parent(path),
            };
        }
        let mut sorted: Vec<&str> = ids.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        let mut text = sorted.join("\n");
        text.push('\n');
        crate::fsutil::replace_private_file_synced(path, text.as_bytes())
    }
}

fn refused(path: &Path, why: &str) -> SandboxError {
    SandboxError::PendingDeletions(format!(
        "{} {why}: it lists sandboxes that have ended (deleted while the store refused \
         writes, or isolated), and without it they would be served again; fix or restore it \
         (one sandbox id per line)",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sbx_0123456789abcdef01234567";
    const B: &str = "sbx_fedcba9876543210fedcba98";

    fn set(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_saved_list_loads_back_and_an_empty_one_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tombstones::in_dir(dir.path());
        assert!(t.load().unwrap().is_empty(), "no file, nothing pending");
        t.save(&set(&[B, A])).unwrap();
        let text = std::fs::read_to_string(t.path().unwrap()).unwrap();
        assert_eq!(text, format!("{A}\n{B}\n"));
        assert_eq!(t.load().unwrap(), set(&[A, B]));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(t.path().unwrap()).unwrap().permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);
        t.save(&HashSet::new()).unwrap();
        assert!(!t.path().unwrap().exists());
        t.save(&HashSet::new()).unwrap();
    }

    #[test]
    fn a_damaged_list_stops_the_start_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tombstones::in_dir(dir.path());
        std::fs::write(t.path().unwrap(), format!("{A}\nnot-an-id\n")).unwrap();
        let e = t.load().unwrap_err().to_string();
        assert!(e.contains(FILE_NAME) && e.contains("line 2"), "{e}");
        std::fs::remove_file(t.path().unwrap()).unwrap();
        std::fs::create_dir(t.path().unwrap()).unwrap();
        let e = t.load().unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir(t.path().unwrap()).unwrap();
        let fifo =
            std::ffi::CString::new(t.path().unwrap().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let e = t.load().unwrap_err().to_string();
        assert!(
            e.contains("not a regular file"),
            "a FIFO blocked the start: {e}"
        );
        std::fs::remove_file(t.path().unwrap()).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", t.path().unwrap()).unwrap();
        let e = t.load().unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn without_a_directory_nothing_is_written() {
        let t = Tombstones::default();
        t.save(&set(&[A])).unwrap();
        assert!(t.load().unwrap().is_empty());
    }
}
