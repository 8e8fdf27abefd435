//! The one home for owner-only file and directory creation (secrets, tokens, keys, state).
//!
//! Invariant: a file made through [`private_file`] is created with mode 0600 and a directory made
//! by [`create_private_dir`] with 0700, both set atomically at creation (never created wider and
//! narrowed afterwards). Existing files and directories keep their mode.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Mode of files holding secrets, tokens, keys or private state.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of directories holding such files.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Open options whose newly created file gets mode 0600; the caller picks
/// `write`/`append`/`create`/`create_new`/`truncate`.
pub fn private_file() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(PRIVATE_FILE_MODE);
    o
}

/// Creates `dir` and missing parents with mode 0700; an existing directory is left as it is.
///
/// # Errors
/// The directory cannot be created.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_owner_only_files_and_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        super::create_private_dir(&dir).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let file = dir.join("f");
        super::private_file()
            .write(true)
            .create_new(true)
            .open(&file)
            .unwrap();
        assert_eq!(mode(&file), 0o600);
    }
}
