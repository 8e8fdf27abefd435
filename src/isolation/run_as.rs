//! Who commands in isolated sandboxes run as (`[sandbox] run_as`): by default a user of the
//! sandbox's own ([`RunAs::for_slot`]: `uid_base` + its namespace slot, no passwd entry), or
//! one user for all resolved once with `getent`; and the `setpriv` (util-linux) arguments that
//! drop to it inside the sandbox with `no_new_privs`, no capabilities (bounding, inheritable
//! and ambient sets cleared) and only that user's groups.
//!
//! Why a user per sandbox: the kernel counts some things per user, outside every namespace
//! and cgroup — inotify instances (`fs.inotify.max_user_instances`), POSIX message-queue bytes
//! (`RLIMIT_MSGQUEUE`), the user keyring. Sharing one user, a sandbox holding all of them
//! left none to the others (found from outside).

/// The name a sandbox's own user has inside (its `USER`, `whoami`).
pub const SANDBOX_USER: &str = "sandbox";

/// A resolved user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Known to the passwd database (then its supplementary groups are set, else none).
    pub named: bool,
    /// The user's name (the number when it has none).
    pub name: String,
}

/// `run_as` could not be resolved.
#[derive(Clone, Debug, thiserror::Error)]
#[error("sandbox.run_as: {0}")]
pub struct RunAsError(String);

impl RunAs {
    /// Resolves `USER[:GROUP]` (names or numbers) with `getent`.
    ///
    /// # Errors
    /// Unknown user or group names.
    pub fn resolve(spec: &str) -> Result<RunAs, RunAsError> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let entry = getent("passwd", user);
        let field = |i: usize| entry.as_ref().and_then(|e| e.get(i)).cloned();
        // 4294967295 is (uid_t)-1, which setuid-style calls read as "leave unchanged": setpriv
        // would keep root (found from outside: a command read /etc/shadow).
        let num = |s: &str, what: &str| match s.parse::<u32>() {
            Ok(u32::MAX) => Err(RunAsError(format!(
                "{what} {s} is (uid_t)-1, which means \"unchanged\": the command would keep root"
            ))),
            Ok(n) => Ok(n),
            Err(_) => Err(RunAsError(format!("no such {what} '{s}'"))),
        };
        let uid = num(&field(2).unwrap_or_else(|| user.to_owned()), "user")?;
        let gid = match group {
            Some(g) => num(
                &getent("group", g)
                    .and_then(|e| e.get(2).cloned())
                    .unwrap_or_else(|| g.to_owned()),
                "group",
            )?,
            None => field(3).map_or(Ok(uid), |g| num(&g, "group"))?,
        };
        Ok(RunAs {
            uid,
            gid,
            named: entry.is_some(),
            name: field(0).unwrap_or_else(|| uid.to_string()),
        })
    }

    /// Root's uid or group: allowed (tests run clients installed under `/root` so), warned
    /// at start: with it a sandbox reads every root-only host file it sees.
    pub fn is_root(&self) -> bool {
        self.uid == 0 || self.gid == 0
    }

    /// The user of the sandbox in namespace `slot`: uid and gid `base + slot`, which must
    /// belong to no user or group of the host (else the sandbox could reach their files).
    /// Blocking (`getent`).
    ///
    /// # Errors
    /// The id is a host user's or group's.
    pub fn for_slot(base: u32, slot: u16) -> Result<RunAs, RunAsError> {
        let id = base + u32::from(slot);
        for db in ["passwd", "group"] {
            if let Some(entry) = getent(db, &id.to_string()) {
                return Err(RunAsError(format!(
                    "{id} (sandbox.uid_base {base} + slot {slot}) is {db} entry '{}' on this \
                     host; set sandbox.uid_base to a range of 32768 ids that no user or group \
                     uses, or run_as to one user for all sandboxes",
                    entry.first().map_or("?", String::as_str)
                )));
            }
        }
        Ok(RunAs {
            uid: id,
            gid: id,
            named: false,
            name: SANDBOX_USER.into(),
        })
    }

    /// `/etc/passwd` and `/etc/group` as the sandbox sees them when this user has no entry on
    /// the host: an entry of its own first ([`SANDBOX_USER`], home `/home/user`, shell
    /// `/bin/sh`), then the host's files. Without one, tools that look the user up failed
    /// (`ssh-keygen`, `initdb`, Node's `os.userInfo()`, `whoami`, git's author name; found
    /// from outside). None for a user the host knows (`named`), Some for every other, so
    /// `!named` says whether a sandbox has them.
    pub fn identity_files(&self, host_passwd: &str, host_group: &str) -> Option<(String, String)> {
        if self.named {
            return None;
        }
        let passwd = format!(
            "{}:x:{}:{}:sealgate sandbox:{}:/bin/sh\n{host_passwd}",
            self.name,
            self.uid,
            self.gid,
            super::HOME_INSIDE
        );
        let group = format!("{}:x:{}:\n{host_group}", self.name, self.gid);
        Some((passwd, group))
    }

    /// `setpriv` arguments that run the rest of argv as this user (ends with `--`).
    pub fn setpriv_args(&self) -> Vec<String> {
        let groups = if self.named {
            "--init-groups"
        } else {
            "--clear-groups"
        };
        [
            "setpriv",
            "--reuid",
            &self.uid.to_string(),
            "--regid",
            &self.gid.to_string(),
            groups,
            "--no-new-privs",
            "--bounding-set",
            "-all",
            "--inh-caps",
            "-all",
            "--",
        ]
        .map(String::from)
        .to_vec()
    }
}

/// One `getent DB KEY` entry split at `:`, or None.
fn getent(db: &str, key: &str) -> Option<Vec<String>> {
    let out = crate::netns::helper("getent")
        .args([db, key])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.lines().next().filter(|_| out.status.success())?;
    Some(line.split(':').map(str::to_owned).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_groups_resolve() {
        let root = RunAs::resolve("root").unwrap();
        assert_eq!((root.uid, root.gid, root.named), (0, 0, true));
        assert!(root.is_root() && RunAs::resolve("4242:0").unwrap().is_root());
        assert!(!RunAs::resolve("nobody").unwrap().is_root());
        let n = RunAs::resolve("4242:4343").unwrap();
        assert_eq!((n.uid, n.gid, n.named), (4242, 4343, false));
        assert!(n.setpriv_args().contains(&"--clear-groups".to_owned()));
        assert!(RunAs::resolve("no-such-user-sealgate").is_err());
        assert!(RunAs::resolve("root:no-such-group-sealgate").is_err());
        for minus_one in ["4294967295", "65534:4294967295"] {
            let err = RunAs::resolve(minus_one).unwrap_err().to_string();
            assert!(err.contains("would keep root"), "{err}");
        }
    }

    #[test]
    fn a_sandbox_user_is_its_slot_above_the_base_and_never_a_host_user() {
        let u = RunAs::for_slot(0x7000_0000, 5).unwrap();
        assert_eq!((u.uid, u.gid, u.named), (0x7000_0005, 0x7000_0005, false));
        assert_eq!(u.name, "sandbox");
        let (passwd, group) = u
            .identity_files("root:x:0:0::/root:/bin/sh\n", "root:x:0:\n")
            .unwrap();
        assert_eq!(
            passwd,
            "sandbox:x:1879048197:1879048197:sealgate sandbox:/home/user:/bin/sh\nroot:x:0:0::/root:/bin/sh\n"
        );
        assert_eq!(group, "sandbox:x:1879048197:\nroot:x:0:\n");
        assert!(RunAs::resolve("root")
            .unwrap()
            .identity_files("", "")
            .is_none());
        let err = RunAs::for_slot(0, 0).unwrap_err().to_string();
        assert!(
            err.contains("passwd entry 'root'") && err.contains("uid_base"),
            "{err}"
        );
    }

    #[test]
    fn setpriv_argv_drops_everything_and_ends_options() {
        let args = RunAs::resolve("4242").unwrap().setpriv_args();
        assert_eq!(args.first().map(String::as_str), Some("setpriv"));
        assert_eq!(args.last().map(String::as_str), Some("--"));
        for a in ["--no-new-privs", "--bounding-set", "--inh-caps"] {
            assert!(args.contains(&a.to_owned()), "{a}");
        }
    }
}
