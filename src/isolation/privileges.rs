//! Whether this daemon may build isolated sandboxes: root, and the capabilities that needs,
//! read from the kernel's own account of the process.
//!
//! Why (outside pass h45a): a daemon run as an ordinary user accepted `"isolation": "netns"`
//! and failed part-way, naming a record file it could not write (`EACCES` under
//! `/run/sealgate`), where the operator needed to hear "run the daemon as root". The SDK
//! creates isolated sandboxes by default, so this is the first error many operators see.

/// What each capability an isolated sandbox needs is for, by its bit in `CapEff`
/// (`linux/capability.h`).
const NEEDED: [(u32, &str); 4] = [
    (21, "CAP_SYS_ADMIN"), // namespaces, mounts, cgroups
    (12, "CAP_NET_ADMIN"), // veth links, addresses, packet-filter rules
    (7, "CAP_SETUID"),     // commands run as the sandbox's user
    (6, "CAP_SETGID"),
];

/// The capabilities an isolated sandbox needs that this process lacks, by name; empty when
/// it holds them all (a root daemon does). A status that cannot be read or parsed counts as
/// lacking every one: the create is refused with this reason rather than failing half-built.
fn missing() -> Vec<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    missing_from(effective(&status).unwrap_or(0))
}

/// The names in [`NEEDED`] whose bits `cap_eff` lacks.
fn missing_from(cap_eff: u64) -> Vec<&'static str> {
    NEEDED
        .iter()
        .filter(|(bit, _)| cap_eff & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

/// The `CapEff:` mask of a `/proc/<pid>/status` text.
fn effective(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// What this daemon lacks for isolated sandboxes, as the start summary and the refusal say
/// it: root (uid 0, in its user namespace: a root-owned `/run/sealgate`, files chowned to
/// each sandbox's user, signals to its commands need more than the four capabilities; review
/// h45d), and each capability of [`NEEDED`] (root in a container may lack some); `None` when
/// it has everything.
pub fn lacking() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!("root (it runs as uid {euid})"));
    }
    let caps = missing();
    (!caps.is_empty()).then(|| format!("{} (in a container, grant them)", caps.join(", ")))
}

/// The sentence an operator reads when an isolated sandbox cannot be built here, or `None`.
pub fn refusal() -> Option<String> {
    lacking().map(|why| {
        format!(
            "isolated sandboxes need the daemon to run as root with CAP_SYS_ADMIN, \
             CAP_NET_ADMIN, CAP_SETUID and CAP_SETGID, and this one lacks {why}: create the \
             sandbox with \"isolation\": \"none\" (proxy-only), or run the daemon so"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_mask_names_what_is_missing() {
        let root = "Name:\tsealgate\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective(root), Some(0x1ff_ffff_ffff));
        assert!(missing_from(0x1ff_ffff_ffff).is_empty());
        let user = "CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n";
        assert_eq!(
            missing_from(effective(user).unwrap()),
            ["CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID"]
        );
        // CAP_NET_ADMIN alone (a networking helper's set): the rest are named.
        assert_eq!(
            missing_from(1 << 12),
            ["CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID"]
        );
        assert_eq!(effective("CapEff:\tzz\n"), None);
        assert_eq!(effective(""), None);
    }

    #[test]
    fn this_process_is_judged_by_its_own_status() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let eff = effective(&status).expect("Linux reports CapEff");
        assert_eq!(missing(), missing_from(eff));
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert_eq!(refusal().is_none(), root && missing().is_empty());
    }
}
