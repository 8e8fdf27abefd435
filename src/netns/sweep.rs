//! The start-up sweep: undo what daemons that died on this host left behind — namespaces
//! `sealgate-*`, veths `sg????h`, `SG-*` chains and the hooks that jump to them or name such
//! a veth, sandbox cgroups `…/sealgate/sbx_*` — without touching anything a live daemon (or a
//! `sandbox exec` of an earlier version) still owns.
//!
//! Why this cannot hit a live owner: every owner writes its record before the system object
//! it names exists ([`super::session`]), and the sweep lists the system objects *before* it
//! reads the records. So an object in the listing either has its record by the time the
//! records are read, or its owner already removed it. One gap is left: `ip netns add` of an
//! earlier `sandbox exec` ran before its record was written, so a namespace without a record
//! is only removed once it is older than [`ORPHAN_AGE`].

use std::collections::HashSet;
use std::time::Duration;

use super::plan::Plan;
use super::record::{Record, LEGACY_DIR, STATE_DIR};
use super::rules::chain_name;
use super::{run, run_args, session};

/// A namespace with no record is left alone until it is this old.
pub const ORPHAN_AGE: Duration = Duration::from_secs(30);

/// What a sweep removed.
#[derive(Debug, Default)]
pub struct Swept {
    /// Records of dead owners undone (namespace, veth, rules, files).
    pub records: usize,
    /// Namespaces, veths and chains that no record named.
    pub orphans: usize,
    /// Sandbox ids of the undone records (the daemon ends them if they are its own).
    pub sandbox_ids: Vec<String>,
}

/// Everything on the host that looks like ours, listed before the records are read.
struct Listing {
    netns: Vec<String>,
    links: Vec<String>,
    /// Sandbox cgroups ([`crate::limits::cgroup::listed`]).
    cgroups: Vec<std::path::PathBuf>,
    /// (program, table, `-S` dump).
    tables: Vec<(&'static str, &'static str, String)>,
}

/// The sandboxes named by records whose owner is dead: what [`sweep`] will undo. Read first, so
/// the daemon can record their ends before anything of them is removed.
pub fn dead_record_sandboxes() -> Vec<String> {
    Record::all_in(STATE_DIR)
        .into_iter()
        .chain(Record::all_in(LEGACY_DIR))
        .filter(|rec| !rec.owner_alive())
        .filter_map(|rec| rec.sandbox_id)
        .collect()
}

/// Runs the sweep (blocking; root). Errors of single removals are ignored: each is retried
/// by the next start. `live` are the ids of the sandboxes the starting daemon serves: their
/// `SG-*` chains are kept even without a record — an operator who integrates another sandbox
/// runtime applies `sealgate sandbox rules` output by hand, and a restart swept it away,
/// leaving the sandbox's traffic unredirected (found from outside). `None`: the daemon could
/// not read which sandboxes it serves, so every `SG-*` chain is kept (the operator's rules
/// are not ours to guess away); namespaces, veths, their hooks and cgroups are swept as ever.
/// Every `SG-*` chain is kept as well while another sealgate daemon runs on the host
/// ([`super::daemons`]).
pub fn sweep(live: Option<&[String]>) -> Swept {
    let listing = list();
    let mut out = Swept::default();
    for rec in Record::all_in(STATE_DIR)
        .into_iter()
        .chain(Record::all_in(LEGACY_DIR))
    {
        if rec.owner_alive() {
            continue;
        }
        session::undo(&rec);
        let legacy = std::path::Path::new(LEGACY_DIR);
        let _ = std::fs::remove_file(legacy.join(format!("{}.json", rec.plan.netns)));
        let _ = std::fs::remove_dir_all(legacy.join(&rec.plan.netns));
        out.records += 1;
        out.sandbox_ids.extend(rec.sandbox_id.clone());
    }
    let mut known = Known::read();
    // Not the daemon's own isolated sandboxes of an earlier run (undone just above, ended at
    // start): what their undo left is swept as before.
    match live {
        Some(live) => {
            let kept = live.iter().filter(|id| !out.sandbox_ids.contains(id));
            known
                .chains
                .extend(kept.filter_map(|id| chain_name(id).ok()));
        }
        None => known.every_chain = true,
    }
    // Another live daemon's operator may have applied rules for its sandboxes: no record
    // names them and this daemon cannot tell them from leftovers (module docs of
    // `super::daemons`).
    if !known.every_chain && super::daemons::others_alive() {
        tracing::info!(
            "another sealgate daemon runs on this host: keeping every SG-* chain no record \
             names (hand-applied rules may be its sandboxes')"
        );
        known.every_chain = true;
    }
    out.orphans += sweep_netns(&listing, &known);
    out.orphans += sweep_links(&listing, &known);
    out.orphans += sweep_rules(&listing, &known);
    out.orphans += sweep_cgroups(&listing, &known);
    out
}

/// Sandbox cgroups no record names: a teardown that could not remove one (a process that
/// would not die) logged it and removed the record, so only this sweep retries it.
fn sweep_cgroups(l: &Listing, known: &Known) -> usize {
    let orphans: Vec<std::path::PathBuf> = l
        .cgroups
        .iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !known.sandboxes.contains(n))
        })
        .cloned()
        .collect();
    crate::limits::cgroup::remove(&orphans);
    orphans.len()
}

fn list() -> Listing {
    let dir_names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let tables = [
        ("iptables", "nat"),
        ("iptables", "filter"),
        ("ip6tables", "filter"),
    ]
    .into_iter()
    .filter_map(|(p, t)| Some((p, t, run_args(&[p, "-w", "5", "-t", t, "-S"]).ok()?)))
    .collect();
    Listing {
        cgroups: crate::limits::cgroup::listed(),
        netns: dir_names("/run/netns")
            .into_iter()
            .filter(|n| slot_of(n, "sealgate-", "").is_some())
            .collect(),
        links: dir_names("/sys/class/net")
            .into_iter()
            .filter(|n| slot_of(n, "sg", "h").is_some())
            .collect(),
        tables,
    }
}

/// The slot number in `<prefix><4 hex><suffix>`.
fn slot_of(name: &str, prefix: &str, suffix: &str) -> Option<u16> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    let ok = hex.len() == 4 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| u16::from_str_radix(hex, 16).ok()).flatten()
}

/// Names some record (live owner, ours or legacy) still claims.
struct Known {
    netns: HashSet<String>,
    links: HashSet<String>,
    chains: HashSet<String>,
    sandboxes: HashSet<String>,
    /// Keep every `SG-*` chain (the live sandboxes are unknown).
    every_chain: bool,
}

impl Known {
    fn read() -> Known {
        let mut k = Known {
            netns: HashSet::new(),
            links: HashSet::new(),
            chains: HashSet::new(),
            sandboxes: HashSet::new(),
            every_chain: false,
        };
        for rec in Record::all_in(STATE_DIR)
            .into_iter()
            .chain(Record::all_in(LEGACY_DIR))
        {
            k.netns.insert(rec.plan.netns.clone());
            k.links.insert(rec.plan.host_if.clone());
            if let Some(c) = rec.sandbox_id.as_deref().and_then(|id| chain_name(id).ok()) {
                k.chains.insert(c);
            }
            k.sandboxes.extend(rec.sandbox_id.clone());
        }
        k
    }
}

fn sweep_netns(l: &Listing, known: &Known) -> usize {
    let mut n = 0;
    for name in l.netns.iter().filter(|n| !known.netns.contains(*n)) {
        let path = std::path::Path::new("/run/netns").join(name);
        let age = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_none_or(|a| a < ORPHAN_AGE) {
            continue;
        }
        if let Some(plan) = slot_of(name, "sealgate-", "").and_then(Plan::for_slot) {
            tracing::info!(netns = %name, "removing a leftover sandbox namespace");
            super::link::destroy(&plan);
            n += 1;
        }
    }
    n
}

fn sweep_links(l: &Listing, known: &Known) -> usize {
    let mut n = 0;
    for name in l.links.iter().filter(|n| !known.links.contains(*n)) {
        tracing::info!(interface = %name, "removing a leftover sandbox veth");
        if run_args(&["ip", "link", "del", name]).is_ok() {
            n += 1;
        }
    }
    n
}

/// Leftover rules: `SG-*` chains no record names (with every jump to them), and hooks that
/// name a `sg????h` interface no record names.
fn sweep_rules(l: &Listing, known: &Known) -> usize {
    let mut n = 0;
    for (prog, table, dump) in &l.tables {
        let orphan_chains: Vec<&str> = dump
            .lines()
            .filter_map(|line| line.strip_prefix("-N "))
            .filter(|c| c.starts_with("SG-") && !known.every_chain && !known.chains.contains(*c))
            .collect();
        for line in dump
            .lines()
            .filter(|line| orphan_hook(line, &orphan_chains, &known.links))
        {
            let mut argv: Vec<String> = [*prog, "-w", "5", "-t", *table].map(String::from).to_vec();
            argv.push("-D".into());
            argv.extend(line.split_whitespace().skip(1).map(String::from));
            if run(&argv).is_ok() {
                n += 1;
            }
        }
        for c in &orphan_chains {
            tracing::info!(chain = %c, table = %table, "removing a leftover sandbox chain");
            let _ = run_args(&[*prog, "-w", "5", "-t", *table, "-F", *c]);
            if run_args(&[*prog, "-w", "5", "-t", *table, "-X", *c]).is_ok() {
                n += 1;
            }
        }
    }
    n
}

/// An `-A <built-in> …` line jumping to an orphan chain or naming an unknown sandbox veth.
fn orphan_hook(line: &str, orphan_chains: &[&str], known_links: &HashSet<String>) -> bool {
    let mut words = line.split_whitespace();
    if words.next() != Some("-A") {
        return false;
    }
    let Some(chain) = words.next() else {
        return false;
    };
    if chain.starts_with("SG-") {
        return false; // contents go with their chain
    }
    let rest: Vec<&str> = words.collect();
    let jumps_to_orphan = rest
        .windows(2)
        .any(|w| w[0] == "-j" && orphan_chains.contains(&w[1]));
    let names_orphan_if = rest.windows(2).any(|w| {
        matches!(w[0], "-i" | "-o")
            && slot_of(w[1], "sg", "h").is_some()
            && !known_links.contains(w[1])
    });
    jumps_to_orphan || names_orphan_if
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_recognised_exactly() {
        assert_eq!(slot_of("sealgate-00a5", "sealgate-", ""), Some(0xa5));
        assert_eq!(slot_of("sg00a5h", "sg", "h"), Some(0xa5));
        for other in [
            "sealgate-xyz1",
            "sealgate-00A5",
            "sgtprobe-1",
            "sgt0001h",
            "sg00a5",
        ] {
            assert!(slot_of(other, "sealgate-", "").is_none(), "{other}");
            assert!(slot_of(other, "sg", "h").is_none(), "{other}");
        }
    }

    #[test]
    fn only_hooks_of_orphans_are_picked() {
        let known: HashSet<String> = ["sg0001h".to_owned()].into();
        let orphans = ["SG-dead"];
        let pick = |l: &str| orphan_hook(l, &orphans, &known);
        assert!(pick("-A PREROUTING -s 198.18.0.6/32 -i sg0001h -j SG-dead"));
        assert!(pick("-A FORWARD -i sg0002h -j DROP"));
        assert!(!pick("-A FORWARD -i sg0001h -j DROP"), "a live veth");
        assert!(!pick("-A INPUT -i sgt1234 -j DROP"), "not a sandbox veth");
        assert!(!pick("-A SG-dead -j DROP"), "chain contents");
        assert!(!pick("-N SG-dead"));
        assert!(!pick("-A INPUT -i eth0 -j SG-alive"));
    }
}
