//! The iptables rule set that confines one sandbox interface: generated as data (argv vectors,
//! never shell strings), applied in order, removed idempotently.
//!
//! For a sandbox `sbx_<24 hex>` behind host interface IF with source address SIP, transparent
//! port T and DNS port D (see ARCHITECTURE.md "Transparent mode rule set" for the rendered
//! form), the set is:
//!
//! - `nat` chain `SG-<hex>`, hooked first in `PREROUTING` for `-i IF -s SIP`: UDP and TCP to
//!   port 53 → `REDIRECT --to-ports D` (the namespace's DNS responder), every other TCP →
//!   `REDIRECT --to-ports T` (the transparent listener). REDIRECT rewrites the destination to
//!   IF's own address, on the host side of the veth, which is where `SO_ORIGINAL_DST` can see
//!   the original destination (DESIGN §7).
//! - `filter` chain `SG-<hex>`, hooked first in `INPUT` for `-i IF`: drop any source but SIP
//!   (no spoofing another sandbox's identity), accept TCP to T and UDP/TCP to D, drop the rest
//!   (UDP — so QUIC falls back to TCP —, ICMP, the admin port, every other local service).
//! - `filter FORWARD`: drop everything in from and out to IF (the host never routes for it).
//! - `ip6tables filter`: drop everything in from IF on `INPUT` and `FORWARD` (the namespace
//!   has no IPv6 address; this closes link-local IPv6 to host services).
//!
//! Hooks are inserted only after their chain is complete, so there is never a moment where
//! the interface's traffic meets a half-built chain.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::NetnsError;

/// `iptables` or `ip6tables`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    /// IPv4 (`iptables`).
    V4,
    /// IPv6 (`ip6tables`).
    V6,
}

impl Family {
    /// The program that edits this family's tables.
    pub fn program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

/// What a rule does to its chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `-N chain`: create a sandbox chain.
    NewChain,
    /// `-A chain …`: append to a sandbox chain (removed with the chain).
    Append,
    /// `-I chain 1 …`: hook into a built-in chain, ahead of the host's own rules (removed with
    /// `-D chain …`).
    Insert,
}

/// One iptables command, as data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Address family.
    pub family: Family,
    /// `nat` or `filter`.
    pub table: &'static str,
    /// What to do.
    pub action: Action,
    /// The chain acted on.
    pub chain: String,
    /// Match and target arguments (empty for [`Action::NewChain`]).
    pub spec: Vec<String>,
}

/// Waits up to this many seconds for the xtables lock (concurrent `sandbox exec` runs).
const LOCK_WAIT_SECS: &str = "5";

impl Rule {
    fn base(&self) -> Vec<String> {
        [
            self.family.program(),
            "-w",
            LOCK_WAIT_SECS,
            "-t",
            self.table,
        ]
        .map(String::from)
        .to_vec()
    }

    /// The argv that applies the rule.
    pub fn apply_argv(&self) -> Vec<String> {
        let mut v = self.base();
        match self.action {
            Action::NewChain => v.extend(["-N".into(), self.chain.clone()]),
            Action::Append => v.extend(["-A".into(), self.chain.clone()]),
            Action::Insert => v.extend(["-I".into(), self.chain.clone(), "1".into()]),
        }
        v.extend(self.spec.iter().cloned());
        v
    }

    /// The argv that deletes a hook (None for chain contents, which go with their chain).
    pub fn delete_argv(&self) -> Option<Vec<String>> {
        (self.action == Action::Insert).then(|| {
            let mut v = self.base();
            v.extend(["-D".into(), self.chain.clone()]);
            v.extend(self.spec.iter().cloned());
            v
        })
    }
}

/// What a sandbox's rule set is generated from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleParams {
    /// The sandbox id (`sbx_` + 24 hex); names the chains.
    pub sandbox_id: String,
    /// Host-side interface the sandbox's traffic arrives on.
    pub host_if: String,
    /// The sandbox's source address (its transparent-mode identity).
    pub sandbox_ip: Ipv4Addr,
    /// The host-side address, when known: narrows the `INPUT` accepts to it.
    pub host_ip: Option<Ipv4Addr>,
    /// The daemon's transparent listener port.
    pub transparent_port: u16,
    /// The DNS responder's port (UDP and TCP); None drops DNS like any other traffic.
    pub dns_port: Option<u16>,
    /// Also install the `ip6tables` drops.
    pub ipv6: bool,
    /// Drop new flows past these bounds (None: no bound; records of earlier versions).
    #[serde(default)]
    pub flows: Option<crate::limits::Flows>,
}

/// A complete rule set, in apply order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSet {
    /// The rules.
    pub rules: Vec<Rule>,
}

/// `SG-` + the sandbox id's hex (27 bytes; iptables allows 28).
///
/// # Errors
/// An id that is not `sbx_` + 24 lowercase hex.
pub fn chain_name(sandbox_id: &str) -> Result<String, NetnsError> {
    if !crate::sandbox::is_sandbox_id(sandbox_id) {
        return Err(NetnsError::Invalid(format!("sandbox id {sandbox_id:?}")));
    }
    Ok(format!("SG-{}", &sandbox_id[4..]))
}

/// Interface names go into argv as values: keep them to what `ip link` accepts, and never let
/// one look like an option.
fn check_ifname(name: &str) -> Result<(), NetnsError> {
    let ok = (1..=15).contains(&name.len())
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NetnsError::Invalid(format!("interface name {name:?}")))
    }
}

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

impl RuleSet {
    /// Generates the rule set (pure).
    ///
    /// # Errors
    /// A malformed sandbox id or interface name.
    pub fn generate(p: &RuleParams) -> Result<RuleSet, NetnsError> {
        let chain = chain_name(&p.sandbox_id)?;
        check_ifname(&p.host_if)?;
        let mut rules = nat_rules(p, &chain);
        rules.extend(filter_rules(p, &chain));
        if p.ipv6 {
            rules.extend(v6_rules(p));
        }
        Ok(RuleSet { rules })
    }

    /// Every argv that applies the set, in order.
    pub fn apply_argvs(&self) -> Vec<Vec<String>> {
        self.rules.iter().map(Rule::apply_argv).collect()
    }

    /// Every argv that removes the set: hooks first (reverse order), then flush and delete
    /// each chain. Each may fail harmlessly when already gone.
    pub fn remove_argvs(&self) -> Vec<Vec<String>> {
        let mut out: Vec<Vec<String>> = self
            .rules
            .iter()
            .rev()
            .filter_map(Rule::delete_argv)
            .collect();
        for r in self.rules.iter().filter(|r| r.action == Action::NewChain) {
            for op in ["-F", "-X"] {
                let mut v = r.base();
                v.extend([op.into(), r.chain.clone()]);
                out.push(v);
            }
        }
        out
    }

    /// `iptables-restore --noflush` input that applies the `family` part of the set (None when
    /// the set has none): one transaction per table, so the interface never meets a half-built
    /// chain and setup costs one commit rather than one per rule. Every argument is a plain
    /// token (checked names, addresses, ports), so no quoting is needed.
    pub fn restore_apply(&self, family: Family) -> Option<String> {
        self.restore(family, |r| {
            let line = match r.action {
                Action::NewChain => return vec![format!(":{} - [0:0]", r.chain)],
                Action::Append => format!("-A {}", r.chain),
                Action::Insert => format!("-I {} 1", r.chain),
            };
            vec![join_spec(line, &r.spec)]
        })
    }

    /// `iptables-restore --noflush` input that removes the `family` part of the set: hooks
    /// first, then each chain flushed and deleted. It fails as a whole if any piece is already
    /// gone; [`super::remove_rules`] then falls back to idempotent single commands.
    pub fn restore_remove(&self, family: Family) -> Option<String> {
        let reversed = RuleSet {
            rules: self.rules.iter().rev().cloned().collect(),
        };
        let hooks = reversed.restore(family, |r| match r.action {
            Action::Insert => vec![join_spec(format!("-D {}", r.chain), &r.spec)],
            _ => Vec::new(),
        })?;
        let chains = self.restore(family, |r| match r.action {
            Action::NewChain => vec![format!("-F {}", r.chain), format!("-X {}", r.chain)],
            _ => Vec::new(),
        });
        Some(match chains {
            Some(c) => format!("{hooks}{c}"),
            None => hooks,
        })
    }

    /// Renders `*table … COMMIT` sections (tables in order of first use) from `lines`.
    fn restore(&self, family: Family, lines: impl Fn(&Rule) -> Vec<String>) -> Option<String> {
        let mut tables: Vec<&str> = Vec::new();
        for r in self.rules.iter().filter(|r| r.family == family) {
            if !tables.contains(&r.table) {
                tables.push(r.table);
            }
        }
        let mut out = String::new();
        for t in tables {
            let body: Vec<String> = self
                .rules
                .iter()
                .filter(|r| r.family == family && r.table == t)
                .flat_map(&lines)
                .collect();
            if body.is_empty() {
                continue;
            }
            out.push_str(&format!("*{t}\n{}\nCOMMIT\n", body.join("\n")));
        }
        (!out.is_empty()).then_some(out)
    }
}

fn join_spec(mut line: String, spec: &[String]) -> String {
    for a in spec {
        line.push(' ');
        line.push_str(a);
    }
    line
}

fn rule(family: Family, table: &'static str, action: Action, chain: &str, spec: &[&str]) -> Rule {
    Rule {
        family,
        table,
        action,
        chain: chain.to_owned(),
        spec: args(spec),
    }
}

fn nat_rules(p: &RuleParams, chain: &str) -> Vec<Rule> {
    let (v4, nat) = (Family::V4, "nat");
    let t = p.transparent_port.to_string();
    let sip = p.sandbox_ip.to_string();
    let mut v = vec![rule(v4, nat, Action::NewChain, chain, &[])];
    if let Some(d) = p.dns_port {
        let d = d.to_string();
        for proto in ["udp", "tcp"] {
            let spec = [
                "-p",
                proto,
                "--dport",
                "53",
                "-j",
                "REDIRECT",
                "--to-ports",
                &d,
            ];
            v.push(rule(v4, nat, Action::Append, chain, &spec));
        }
    }
    let spec = ["-p", "tcp", "-j", "REDIRECT", "--to-ports", &t];
    v.push(rule(v4, nat, Action::Append, chain, &spec));
    let hook = ["-i", &p.host_if, "-s", &sip, "-j", chain];
    v.push(rule(v4, nat, Action::Insert, "PREROUTING", &hook));
    v
}

fn filter_rules(p: &RuleParams, chain: &str) -> Vec<Rule> {
    let (v4, filter) = (Family::V4, "filter");
    let sip = p.sandbox_ip.to_string();
    let dst: Vec<String> = p
        .host_ip
        .map(|ip| vec!["-d".to_owned(), ip.to_string()])
        .unwrap_or_default();
    let accept = |proto: &str, port: u16| {
        let mut spec = args(&["-p", proto]);
        spec.extend(dst.iter().cloned());
        spec.extend(args(&["--dport", &port.to_string(), "-j", "ACCEPT"]));
        Rule {
            family: v4,
            table: filter,
            action: Action::Append,
            chain: chain.to_owned(),
            spec,
        }
    };
    let mut v = vec![
        rule(v4, filter, Action::NewChain, chain, &[]),
        rule(
            v4,
            filter,
            Action::Append,
            chain,
            &["!", "-s", &sip, "-j", "DROP"],
        ),
    ];
    if let Some(f) = p.flows {
        v.extend(flow_drops(chain, &f));
    }
    v.push(accept("tcp", p.transparent_port));
    if let Some(d) = p.dns_port {
        v.push(accept("udp", d));
        v.push(accept("tcp", d));
    }
    v.push(rule(v4, filter, Action::Append, chain, &["-j", "DROP"]));
    let hook = ["-i", &p.host_if, "-j", chain];
    v.push(rule(v4, filter, Action::Insert, "INPUT", &hook));
    v.extend(forward_drops(v4, &p.host_if));
    v
}

/// New flows past the sandbox's bounds are dropped in `INPUT`, before conntrack confirms
/// (keeps) their entry: `connlimit` on open TCP connections, `hashlimit` on the rate of new
/// flows of every kind (one table per sandbox, `sg` + 12 hex of its id: hashlimit names are at
/// most 15 bytes). Not connlimit on DNS: a finished lookup keeps its UDP entry for 30 s and
/// connlimit counts it, so about 35 lookups a second stalled (found from outside); the rate
/// bounds those entries instead (rate × 30 s).
fn flow_drops(chain: &str, f: &crate::limits::Flows) -> Vec<Rule> {
    let new = ["-m", "conntrack", "--ctstate", "NEW"];
    let mut matches: Vec<Vec<String>> = Vec::new();
    if let Some(max) = f.max {
        matches.push(args(&[
            "-p",
            "tcp",
            "-m",
            "connlimit",
            "--connlimit-above",
            &max.to_string(),
            "--connlimit-mask",
            "32",
            "--connlimit-saddr",
        ]));
    }
    if let Some(rate) = f.new_per_sec {
        matches.push(args(&[
            "-m",
            "hashlimit",
            "--hashlimit-above",
            &format!("{rate}/sec"),
            "--hashlimit-burst",
            &crate::limits::Flows::burst(rate).to_string(),
            "--hashlimit-mode",
            "srcip",
            "--hashlimit-name",
            &format!("sg{}", &chain[3..15]),
        ]));
    }
    matches
        .into_iter()
        .map(|m| {
            let mut spec = args(&new);
            spec.extend(m);
            spec.extend(args(&["-j", "DROP"]));
            Rule {
                family: Family::V4,
                table: "filter",
                action: Action::Append,
                chain: chain.to_owned(),
                spec,
            }
        })
        .collect()
}

fn forward_drops(family: Family, ifname: &str) -> Vec<Rule> {
    ["-i", "-o"]
        .map(|dir| {
            rule(
                family,
                "filter",
                Action::Insert,
                "FORWARD",
                &[dir, ifname, "-j", "DROP"],
            )
        })
        .to_vec()
}

fn v6_rules(p: &RuleParams) -> Vec<Rule> {
    let hook = ["-i", &p.host_if, "-j", "DROP"];
    let mut v = vec![rule(Family::V6, "filter", Action::Insert, "INPUT", &hook)];
    v.extend(forward_drops(Family::V6, &p.host_if));
    v
}

/// One argv as a shell-safe line (for printing; nothing here is ever run through a shell).
pub fn shell_line(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@".contains(&b));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl fmt::Display for RuleSet {
    /// The apply commands, one shell-safe line each.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for argv in self.apply_argvs() {
            writeln!(f, "{}", shell_line(&argv))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> RuleParams {
        RuleParams {
            sandbox_id: "sbx_0123456789abcdef01234567".into(),
            host_if: "sg0005h".into(),
            sandbox_ip: Ipv4Addr::new(198, 18, 0, 22),
            host_ip: Some(Ipv4Addr::new(198, 18, 0, 21)),
            transparent_port: 3129,
            dns_port: Some(40053),
            ipv6: true,
            flows: None,
        }
    }

    #[test]
    fn rendered_rule_set_is_exactly_the_documented_one() {
        let text = RuleSet::generate(&params()).unwrap().to_string();
        let expected = "\
iptables -w 5 -t nat -N SG-0123456789abcdef01234567
iptables -w 5 -t nat -A SG-0123456789abcdef01234567 -p udp --dport 53 -j REDIRECT --to-ports 40053
iptables -w 5 -t nat -A SG-0123456789abcdef01234567 -p tcp --dport 53 -j REDIRECT --to-ports 40053
iptables -w 5 -t nat -A SG-0123456789abcdef01234567 -p tcp -j REDIRECT --to-ports 3129
iptables -w 5 -t nat -I PREROUTING 1 -i sg0005h -s 198.18.0.22 -j SG-0123456789abcdef01234567
iptables -w 5 -t filter -N SG-0123456789abcdef01234567
iptables -w 5 -t filter -A SG-0123456789abcdef01234567 '!' -s 198.18.0.22 -j DROP
iptables -w 5 -t filter -A SG-0123456789abcdef01234567 -p tcp -d 198.18.0.21 --dport 3129 -j ACCEPT
iptables -w 5 -t filter -A SG-0123456789abcdef01234567 -p udp -d 198.18.0.21 --dport 40053 -j ACCEPT
iptables -w 5 -t filter -A SG-0123456789abcdef01234567 -p tcp -d 198.18.0.21 --dport 40053 -j ACCEPT
iptables -w 5 -t filter -A SG-0123456789abcdef01234567 -j DROP
iptables -w 5 -t filter -I INPUT 1 -i sg0005h -j SG-0123456789abcdef01234567
iptables -w 5 -t filter -I FORWARD 1 -i sg0005h -j DROP
iptables -w 5 -t filter -I FORWARD 1 -o sg0005h -j DROP
ip6tables -w 5 -t filter -I INPUT 1 -i sg0005h -j DROP
ip6tables -w 5 -t filter -I FORWARD 1 -i sg0005h -j DROP
ip6tables -w 5 -t filter -I FORWARD 1 -o sg0005h -j DROP
";
        assert_eq!(text, expected);
    }

    #[test]
    fn flow_bounds_drop_new_flows_after_the_spoofing_check_and_before_any_accept() {
        let p = RuleParams {
            flows: Some(crate::limits::Flows {
                max: Some(1024),
                new_per_sec: Some(200),
            }),
            ..params()
        };
        let text = RuleSet::generate(&p).unwrap().to_string();
        let chain = "iptables -w 5 -t filter -A SG-0123456789abcdef01234567";
        let expected = format!(
            "{chain} '!' -s 198.18.0.22 -j DROP
{chain} -m conntrack --ctstate NEW -p tcp -m connlimit --connlimit-above 1024 --connlimit-mask 32 --connlimit-saddr -j DROP
{chain} -m conntrack --ctstate NEW -m hashlimit --hashlimit-above 200/sec --hashlimit-burst 1000 --hashlimit-mode srcip --hashlimit-name sg0123456789ab -j DROP
{chain} -p tcp -d 198.18.0.21 --dport 3129 -j ACCEPT
"
        );
        assert!(text.contains(&expected), "{text}");
        let only_rate = RuleParams {
            flows: Some(crate::limits::Flows {
                max: None,
                new_per_sec: Some(5000),
            }),
            ..params()
        };
        let text = RuleSet::generate(&only_rate).unwrap().to_string();
        assert!(!text.contains("connlimit") && text.contains("--hashlimit-burst 10000"));
    }

    #[test]
    fn hooks_come_after_their_chain_is_complete() {
        let set = RuleSet::generate(&params()).unwrap();
        for (i, r) in set.rules.iter().enumerate() {
            if r.action == Action::Insert && r.spec.last().is_some_and(|t| t.starts_with("SG-")) {
                let last_append = set
                    .rules
                    .iter()
                    .rposition(|x| x.chain == *r.spec.last().unwrap() && x.table == r.table)
                    .unwrap();
                assert!(last_append < i, "hook {i} precedes its chain's last rule");
            }
        }
    }

    #[test]
    fn removal_deletes_every_hook_then_every_chain() {
        let set = RuleSet::generate(&params()).unwrap();
        let rm: Vec<String> = set.remove_argvs().iter().map(|a| shell_line(a)).collect();
        let hooks = set
            .rules
            .iter()
            .filter(|r| r.action == Action::Insert)
            .count();
        assert_eq!(rm.iter().filter(|l| l.contains(" -D ")).count(), hooks);
        assert!(rm
            .iter()
            .any(|l| l.ends_with("-t nat -X SG-0123456789abcdef01234567")));
        assert!(rm
            .iter()
            .any(|l| l.ends_with("-t filter -X SG-0123456789abcdef01234567")));
        let first_chain_op = rm.iter().position(|l| l.contains(" -F ")).unwrap();
        assert!(rm[..first_chain_op].iter().all(|l| l.contains(" -D ")));
    }

    #[test]
    fn without_dns_port_dns_is_not_redirected() {
        let mut p = params();
        p.dns_port = None;
        p.host_ip = None;
        p.ipv6 = false;
        let text = RuleSet::generate(&p).unwrap().to_string();
        assert!(!text.contains("--dport 53") && !text.contains("ip6tables"));
        assert!(text.contains("-p tcp --dport 3129 -j ACCEPT"));
    }

    #[test]
    fn untrusted_names_are_refused_not_quoted() {
        let mut p = params();
        p.host_if = "-j ACCEPT".into();
        assert!(RuleSet::generate(&p).is_err());
        p.host_if = "eth0; rm -rf /".into();
        assert!(RuleSet::generate(&p).is_err());
        let mut p = params();
        p.sandbox_id = "sbx_../../x".into();
        assert!(RuleSet::generate(&p).is_err());
    }

    #[test]
    fn restore_batches_mirror_the_single_commands() {
        let set = RuleSet::generate(&params()).unwrap();
        let v4 = set.restore_apply(Family::V4).unwrap();
        assert!(
            v4.starts_with("*nat\n:SG-0123456789abcdef01234567 - [0:0]\n"),
            "{v4}"
        );
        assert!(v4.contains("-I PREROUTING 1 -i sg0005h -s 198.18.0.22 -j SG-0123456789abcdef01234567\nCOMMIT\n*filter\n"));
        assert!(
            v4.ends_with("-I FORWARD 1 -o sg0005h -j DROP\nCOMMIT\n"),
            "{v4}"
        );
        assert_eq!(v4.lines().filter(|l| l.starts_with(['-', ':'])).count(), 14);
        let rm = set.restore_remove(Family::V4).unwrap();
        // Hooks in reverse apply order (filter's last-inserted first), then the chains.
        assert!(
            rm.starts_with("*filter\n-D FORWARD -o sg0005h -j DROP\n"),
            "{rm}"
        );
        let nat_hook = "*nat\n-D PREROUTING -i sg0005h -s 198.18.0.22 -j SG-0123456789abcdef01234567\nCOMMIT\n";
        assert!(rm.find(nat_hook) < rm.find("-F SG-"), "{rm}");
        assert!(
            rm.ends_with(
                "*filter\n-F SG-0123456789abcdef01234567\n-X SG-0123456789abcdef01234567\nCOMMIT\n"
            ),
            "{rm}"
        );
        let v6 = set.restore_remove(Family::V6).unwrap();
        assert_eq!(v6.lines().filter(|l| l.starts_with("-D")).count(), 3);
        let no_v6 = RuleSet::generate(&RuleParams {
            ipv6: false,
            ..params()
        })
        .unwrap();
        assert!(no_v6.restore_apply(Family::V6).is_none());
    }
}
