//! Stamps the build with the commit it was made from: `sealgate --version` and the start-up
//! summary say `0.1.0 (git 1a2b3c4)`, so the nodes of a rolling upgrade can be told apart (every
//! build had said `0.1.0`; an outside upgrade pass). A build from a tree whose tracked files
//! differ from that commit says so, `(git 1a2b3c4+dirty)`: such a binary named a commit whose
//! code it did not run (outside pass h50b). Outside a git checkout (a source tarball) the
//! version is the crate's alone.

use std::process::Command;

fn main() {
    let version = env!("CARGO_PKG_VERSION");
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()));
    let full = match commit {
        Some(c) if dirty() => format!("{version} (git {c}+dirty)"),
        Some(c) => format!("{version} (git {c})"),
        None => version.to_owned(),
    };
    println!("cargo:rustc-env=SEALGATE_VERSION={full}");
    // A new commit moves HEAD or the branch it names; an edit changes the index or the tree.
    let mut watched = vec![
        ".git/HEAD".to_owned(),
        ".git/packed-refs".to_owned(),
        ".git/index".to_owned(),
        "src".to_owned(),
        "Cargo.toml".to_owned(),
        "Cargo.lock".to_owned(),
        "build.rs".to_owned(),
    ];
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        if let Some(branch) = head.trim().strip_prefix("ref: ") {
            watched.push(format!(".git/{branch}"));
        }
    }
    for path in watched {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

/// Whether a tracked file differs from HEAD (untracked files do not count).
fn dirty() -> bool {
    Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| !o.stdout.is_empty())
}
