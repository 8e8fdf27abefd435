//! Stamps the build with the commit it was made from: `sealgate --version` and the start-up
//! summary say `0.1.0 (git 1a2b3c4)`, so the nodes of a rolling upgrade can be told apart (every
//! build had said `0.1.0`; an outside upgrade pass). A build whose sources (`src/`, the
//! manifest, the lock file, this script) differ from that commit says so,
//! `(git 1a2b3c4+dirty)`: such a binary named a commit whose code it did not run (outside pass
//! h50b). Outside a git checkout (a source tarball) the version is the crate's alone.
//!
//! Invariant: the script changes nothing in the repository. Its `git status` takes no optional
//! lock (a status that refreshed `.git/index`, which is watched, made every next build stale:
//! review h50c), and the paths it watches come from git itself, so a worktree or a submodule,
//! whose `.git` is a file, is followed too.

use std::process::Command;

/// What the binary is built from, besides the repository's own state.
const SOURCES: [&str; 4] = ["src", "Cargo.toml", "Cargo.lock", "build.rs"];

fn main() {
    let version = env!("CARGO_PKG_VERSION");
    let commit = git(&["rev-parse", "--short=12", "HEAD"])
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()));
    let full = match commit {
        Some(c) if dirty() => format!("{version} (git {c}+dirty)"),
        Some(c) => format!("{version} (git {c})"),
        None => version.to_owned(),
    };
    println!("cargo:rustc-env=SEALGATE_VERSION={full}");
    for path in watched() {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

/// `git ARGS`'s trimmed output, without optional locks; None when git fails or is missing.
fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .arg("--no-optional-locks")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
}

/// Whether a tracked file among [`SOURCES`] differs from HEAD (other files, such as the docs
/// the test suite rewrites, and untracked ones do not count).
fn dirty() -> bool {
    let mut args = vec!["status", "--porcelain", "--untracked-files=no", "--"];
    args.extend(SOURCES);
    git(&args).is_some_and(|s| !s.is_empty())
}

/// A new commit moves HEAD or the branch it names; an edit changes the index or a source.
fn watched() -> Vec<String> {
    let mut paths: Vec<String> = ["HEAD", "index", "packed-refs"]
        .iter()
        .filter_map(|p| git(&["rev-parse", "--git-path", p]))
        .collect();
    let branch = paths
        .first()
        .and_then(|head| std::fs::read_to_string(head).ok())
        .and_then(|h| h.trim().strip_prefix("ref: ").map(str::to_owned));
    if let Some(reference) = branch.and_then(|b| git(&["rev-parse", "--git-path", &b])) {
        paths.push(reference);
    }
    paths.extend(SOURCES.iter().map(|s| (*s).to_owned()));
    paths
}
