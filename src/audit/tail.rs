//! `sealgate audit tail`: prints the audit file and, when following, every line appended to it,
//! across rotations.
//!
//! Invariants: only whole lines are printed, each once, in the order written. A rotation by
//! rename (logrotate's `create`, then a reload that reopens) loses nothing: the renamed file is
//! read until the daemon has written to the new one, which it does only after it has stopped
//! writing to the old (renamed twice before it reopens, the file it still writes to stays
//! followed). A truncation (`copytruncate`) starts over at the file's beginning, also
//! when the file has grown past the old position by the next look: the end of the last line
//! printed must still be where it was, or the file was rewritten.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a follower looks for new lines.
const POLL: Duration = Duration::from_millis(250);
/// How much of the last printed text is kept to tell a rewritten file from a grown one.
const MARK: usize = 256;
/// How much is read at once (a large log is printed in pieces, never held whole).
const CHUNK: usize = 1 << 20;
/// A "line" longer than this is not an audit line (those are cut to a few KiB).
const MAX_LINE: usize = 16 << 20;

/// Prints the audit file and, with `follow`, keeps printing lines as they are appended.
///
/// # Errors
/// The file cannot be opened or read, or stdout cannot be written (a reader gone exits 141,
/// quietly, as the CLI's answers do).
pub async fn tail(path: &Path, follow: bool) -> anyhow::Result<()> {
    let mut f = Follower::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    loop {
        let mut out = std::io::stdout().lock();
        if let Err(e) = f.poll(&mut out).and_then(|()| out.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(141);
            }
            anyhow::bail!("audit tail of {}: {e}", path.display());
        }
        drop(out);
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One file being read: its handle, identity, where the next line starts and the end of the
/// last line printed from it.
struct Reader {
    file: File,
    id: (u64, u64),
    pos: u64,
    mark: Vec<u8>,
}

impl Reader {
    fn open(path: &Path) -> std::io::Result<Reader> {
        let file = File::open(path)?;
        let m = file.metadata()?;
        Ok(Reader {
            file,
            id: (m.dev(), m.ino()),
            pos: 0,
            mark: Vec::new(),
        })
    }

    /// Writes the whole lines past `pos` to `out`, a [`CHUNK`] at a time; returns whether
    /// there were any.
    fn drain(&mut self, out: &mut impl Write) -> std::io::Result<bool> {
        let mut buf = vec![0; CHUNK];
        let mut any = false;
        loop {
            let n = self.read_at(&mut buf)?;
            let complete = buf[..n]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            if complete == 0 && n == buf.len() {
                if buf.len() >= MAX_LINE {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "a line longer than {} MiB: not an audit log",
                            MAX_LINE >> 20
                        ),
                    ));
                }
                buf.resize(buf.len() * 2, 0); // one line longer than the buffer
                continue;
            }
            if complete > 0 {
                out.write_all(&buf[..complete])?;
                self.pos += complete as u64;
                self.mark = buf[complete.saturating_sub(MARK)..complete].to_vec();
                any = true;
            }
            if n < buf.len() {
                return Ok(any);
            }
        }
    }

    /// Fills `buf` from `pos` as far as the file goes; returns how much it read.
    fn read_at(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.file.read_at(&mut buf[n..], self.pos + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Whether the file was cut or rewritten under the reader: shorter than `pos`, or no
    /// longer holding the last printed text where it was.
    fn rewritten(&self, len: u64) -> bool {
        if len < self.pos {
            return true;
        }
        let mut now = vec![0; self.mark.len()];
        let at = self.pos - self.mark.len() as u64;
        self.file.read_exact_at(&mut now, at).is_err() || now != self.mark
    }
}

/// The follower: the file under `path`, and the one rotated away from it while the daemon may
/// still be writing there.
struct Follower {
    path: PathBuf,
    current: Reader,
    rotated: Option<Reader>,
}

impl Follower {
    fn open(path: &Path) -> std::io::Result<Follower> {
        Ok(Follower {
            path: path.to_owned(),
            current: Reader::open(path)?,
            rotated: None,
        })
    }

    /// Prints what is new: the rotated file's last lines first, then the current file's.
    fn poll(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        self.look_at_path()?;
        if let Some(old) = &mut self.rotated {
            // Written to before the new file got its first line: once that line is there, the
            // daemon has reopened, and this drain is the rotated file's last.
            let reopened = self.current.file.metadata()?.len() > 0;
            old.drain(out)?;
            if reopened {
                self.rotated = None;
            }
        }
        self.current.drain(out)?;
        Ok(())
    }

    /// Follows a rename to the new file under `path`, and a truncation to the beginning. A path
    /// with no file yet (renamed, not created again) leaves the reader on the file it has.
    fn look_at_path(&mut self) -> std::io::Result<()> {
        let m = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if (m.dev(), m.ino()) != self.current.id {
            let new = Reader::open(&self.path)?;
            let old = std::mem::replace(&mut self.current, new);
            // Renamed again before the daemon reopened: it still writes to the first rotated
            // file, so that one stays followed and the never-written file between goes.
            let unwritten = old.pos == 0 && old.file.metadata()?.len() == 0;
            if !(unwritten && self.rotated.is_some()) {
                self.rotated = Some(old);
            }
        } else if self.current.rewritten(m.len()) {
            self.current.pos = 0;
            self.current.mark.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(path: &Path, lines: &[String]) {
        let mut f = File::options()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        for l in lines {
            writeln!(f, "{l}").unwrap();
        }
    }

    fn lines(from: usize, to: usize, pad: &str) -> Vec<String> {
        (from..to)
            .map(|n| format!("{{\"n\":{n},\"pad\":\"{pad}\"}}"))
            .collect()
    }

    fn printed(out: &[u8]) -> Vec<String> {
        String::from_utf8(out.to_vec())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_rename_rotation_loses_no_line_written_before_the_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let rotated = dir.path().join("audit.log.1");
        append(&path, &lines(0, 3, "a"));
        let mut f = Follower::open(&path).unwrap();
        let mut out = Vec::new();
        f.poll(&mut out).unwrap();
        // Renamed; the daemon goes on writing there until the reload reopens.
        std::fs::rename(&path, &rotated).unwrap();
        append(&rotated, &lines(3, 5, "a"));
        f.poll(&mut out).unwrap();
        File::create(&path).unwrap(); // logrotate's `create`
        append(&rotated, &lines(5, 7, "a"));
        f.poll(&mut out).unwrap();
        append(&rotated, &lines(7, 8, "a"));
        append(&path, &lines(8, 10, "b")); // reopened
        f.poll(&mut out).unwrap();
        append(&path, &lines(10, 11, "b"));
        f.poll(&mut out).unwrap();
        let mut want = lines(0, 8, "a");
        want.extend(lines(8, 11, "b"));
        assert_eq!(printed(&out), want);
    }

    #[test]
    fn two_renames_before_the_reopen_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        append(&path, &lines(0, 2, "a"));
        let mut f = Follower::open(&path).unwrap();
        let mut out = Vec::new();
        f.poll(&mut out).unwrap();
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        File::create(&path).unwrap();
        f.poll(&mut out).unwrap();
        // Rotated again (logrotate ran twice, no reload between): the daemon still writes
        // to the first rotated file.
        std::fs::rename(
            dir.path().join("audit.log.1"),
            dir.path().join("audit.log.2"),
        )
        .unwrap();
        std::fs::rename(&path, dir.path().join("audit.log.1")).unwrap();
        File::create(&path).unwrap();
        append(&dir.path().join("audit.log.2"), &lines(2, 4, "a"));
        f.poll(&mut out).unwrap();
        append(&dir.path().join("audit.log.2"), &lines(4, 5, "a"));
        append(&path, &lines(5, 6, "b")); // reopened
        f.poll(&mut out).unwrap();
        let mut want = lines(0, 5, "a");
        want.extend(lines(5, 6, "b"));
        assert_eq!(printed(&out), want);
    }

    #[test]
    fn a_log_larger_than_a_chunk_is_printed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let pad = "p".repeat(1000);
        append(&path, &lines(0, 3000, &pad)); // about 3 MiB
        let mut f = Follower::open(&path).unwrap();
        let mut out = Vec::new();
        f.poll(&mut out).unwrap();
        assert_eq!(printed(&out), lines(0, 3000, &pad));
    }

    #[test]
    fn a_truncated_file_that_grew_past_the_old_end_is_read_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        append(&path, &lines(1, 3, &"a".repeat(40)));
        let mut f = Follower::open(&path).unwrap();
        let mut out = Vec::new();
        f.poll(&mut out).unwrap();
        // copytruncate, then more bytes than there were before the next look.
        File::create(&path).unwrap();
        append(&path, &lines(3, 8, &"b".repeat(40)));
        f.poll(&mut out).unwrap();
        // And a plain shorter truncation.
        File::create(&path).unwrap();
        append(&path, &lines(8, 9, "c"));
        f.poll(&mut out).unwrap();
        let mut want = lines(1, 3, &"a".repeat(40));
        want.extend(lines(3, 8, &"b".repeat(40)));
        want.extend(lines(8, 9, "c"));
        assert_eq!(printed(&out), want);
    }

    #[test]
    fn a_line_still_being_written_waits_for_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, "{\"n\":1}\n{\"n\":").unwrap();
        let mut f = Follower::open(&path).unwrap();
        let mut out = Vec::new();
        f.poll(&mut out).unwrap();
        assert_eq!(printed(&out), ["{\"n\":1}"]);
        append(&path, &["2}".to_owned()]);
        f.poll(&mut out).unwrap();
        assert_eq!(printed(&out), ["{\"n\":1}", "{\"n\":2}"]);
    }
}
