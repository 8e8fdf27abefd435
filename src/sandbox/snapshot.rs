//! A sandbox's frozen view of its store, compiled for the hot path, and its sealed JSON form.
//!
//! Per destination, the snapshot answers once (then caches) which tokens may be unsealed there
//! and which response scrubber applies: a [`HostView`]. Views are cached per snapshot, so a
//! rotation (new snapshot) can never serve a stale decision.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use bytes::Bytes;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::policy::{self, Dest, HostMatcher, Scheme};
use crate::secret::{Location, Locations, SecretValue};
use crate::store::SecretRecord;
use crate::subst::{echo_forms, Scrubber, SecretRef, TokenLookup};
use crate::token::Token;

/// Views kept per snapshot before the cache is cleared (bounds memory per sandbox).
const MAX_VIEWS: usize = 1024;

/// Retired values kept per sandbox (the oldest go first).
pub const MAX_RETIRED: usize = 64;

/// A value one of the sandbox's secrets had before a rotation or deletion, with the token it
/// was unsealed from. Scrubbed from responses for the rest of the sandbox's life — an old key
/// often stays valid for a while, and an upstream that stored it would otherwise hand it over
/// once it is no longer a current value — and never unsealed.
///
/// Scrubbed where the secret could have been unsealed when it retired: its `allowed_hosts` and
/// the store's `egress_allowlist` as they were then (scrubbing a host costs it `206` answers
/// and compressed transfers, so hosts that never received the value are left alone).
///
/// Memory: the scopes are [`Patterns`] shared by every retired value of the sandbox with the
/// same list ([`share_scopes`]): 64 rotations under a 500-pattern allowlist had made 64
/// copies of it, written and compiled, per sandbox (an outside pass: 100 sandboxes, 2.9 GiB).
#[derive(Clone)]
pub struct Retired {
    /// The token the value was unsealed from (what replaces it).
    pub token: Token,
    /// The old value.
    pub value: SecretValue,
    /// The secret's `allowed_hosts` when the value was retired.
    allowed: Option<Patterns>,
    /// The store's `egress_allowlist` when the value was retired.
    egress: Option<Patterns>,
}

/// Host patterns as written and compiled, shared by reference.
#[derive(Clone)]
struct Patterns {
    written: Arc<[String]>,
    matcher: Arc<HostMatcher>,
}

impl Patterns {
    fn of(written: &Option<Vec<String>>, matcher: &Option<HostMatcher>) -> Option<Patterns> {
        Some(Patterns {
            written: written.as_deref()?.into(),
            matcher: Arc::new(matcher.clone()?),
        })
    }

    /// `written` compiled, or the equal list of `known` (then nothing is compiled); a list
    /// compiled here joins `known`. None: no list.
    fn compile(
        written: Option<Vec<String>>,
        known: &mut Vec<Patterns>,
    ) -> Result<Option<Patterns>, SnapshotError> {
        let Some(list) = written else { return Ok(None) };
        if let Some(k) = known.iter().find(|k| *k.written == *list) {
            return Ok(Some(k.clone()));
        }
        let matcher = compile(Some(&list))?;
        let p = Patterns::of(&Some(list), &matcher);
        known.extend(p.clone());
        Ok(p)
    }

    fn same(a: &Option<Patterns>, b: &Option<Patterns>) -> bool {
        match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(&a.written, &b.written) || a.written == b.written,
            (a, b) => a.is_none() && b.is_none(),
        }
    }
}

/// Makes every retired value whose scope lists equal an earlier one's share that one's
/// [`Patterns`]: one copy per distinct list and sandbox, however many rotations kept it.
/// Lists already shared compare by pointer; the distinct lists of one sandbox are few.
fn share_scopes(retired: &mut [Retired]) {
    let mut seen: Vec<Patterns> = Vec::new();
    let mut share = |slot: &mut Option<Patterns>| {
        let Some(p) = slot else { return };
        if seen.iter().any(|s| Arc::ptr_eq(&s.written, &p.written)) {
            return;
        }
        match seen.iter().find(|s| s.written == p.written) {
            Some(s) => *p = s.clone(),
            None => seen.push(p.clone()),
        }
    };
    for r in retired {
        share(&mut r.allowed);
        share(&mut r.egress);
    }
}

impl Retired {
    /// True if `other` retired the same value with the same scope.
    fn same_as(&self, other: &Retired) -> bool {
        self.value == other.value
            && Patterns::same(&self.allowed, &other.allowed)
            && Patterns::same(&self.egress, &other.egress)
    }

    fn of(snap: &Snapshot, e: &SecretEntry) -> Retired {
        Retired {
            token: e.token,
            value: e.value.clone(),
            allowed: Patterns::of(&e.allowed_hosts, &e.allowed),
            egress: Patterns::of(&snap.egress_allowlist, &snap.egress),
        }
    }

    /// The secret's `allowed_hosts` when the value was retired, as written.
    pub fn allowed_hosts(&self) -> Option<&[String]> {
        self.allowed.as_ref().map(|p| &*p.written)
    }

    /// The store's `egress_allowlist` when the value was retired, as written.
    pub fn egress_allowlist(&self) -> Option<&[String]> {
        self.egress.as_ref().map(|p| &*p.written)
    }

    fn allowed_matcher(&self) -> Option<&HostMatcher> {
        self.allowed.as_ref().map(|p| &*p.matcher)
    }

    fn egress_matcher(&self) -> Option<&HostMatcher> {
        self.egress.as_ref().map(|p| &*p.matcher)
    }
}

/// True if list `new` is `old`, or both are lists and `new` has every pattern of `old` (a
/// widening). `None` to or from a list counts as a change: what `None` allows depends on the
/// other list (a secret's `allowed_hosts` or its store's `egress_allowlist`).
fn holds_every_pattern(new: &Option<Vec<String>>, old: &Option<Vec<String>>) -> bool {
    match (new, old) {
        (Some(new), Some(old)) => old.iter().all(|p| new.contains(p)),
        (new, old) => new == old,
    }
}

/// One secret as a sandbox sees it.
pub struct SecretEntry {
    /// Env-var name.
    pub name: Arc<str>,
    /// Its sealed token in this sandbox.
    pub token: Token,
    /// The real value.
    pub value: SecretValue,
    /// Patterns as written (for persistence and the API).
    pub allowed_hosts: Option<Vec<String>>,
    /// Compiled `allowed_hosts`.
    pub allowed: Option<HostMatcher>,
    /// Where it may be unsealed.
    pub locations: Locations,
}

/// A store snapshot: allowlist + secrets, immutable once built.
pub struct Snapshot {
    /// Store name at snapshot time.
    pub store_name: String,
    /// Allowlist as written (None = any public host).
    pub egress_allowlist: Option<Vec<String>>,
    egress: Option<HostMatcher>,
    secrets: Vec<SecretEntry>,
    /// Values the secrets had before (scrubbed, never unsealed), oldest first.
    retired: Vec<Retired>,
    views: DashMap<Dest, Arc<HostView>>,
    /// The views for plain-HTTP requests ([`Snapshot::plain_view`]).
    plain_views: DashMap<Dest, Arc<HostView>>,
    /// One scrubber for every view: it holds every value of the sandbox whatever the host, so
    /// building it per destination only multiplied memory (one per made-up host name under a
    /// wildcard). Built on first use.
    scrubber: OnceLock<Option<Arc<Scrubber>>>,
    /// A node's locked copy (every secret allowed nowhere): its refusals say why, not that
    /// an empty `allowed_hosts` does not match. Never persisted.
    locked: bool,
    /// A locked copy's scrubbing scope: the real snapshot's values with the scope they had.
    /// Where one of them could be unsealed before the lock, answers are still scrubbed — the
    /// host may hold the value and hand it back (found from outside: a quarantine had turned
    /// scrubbing off there). Empty on every other snapshot.
    locked_scope: Vec<Retired>,
}

/// Errors building a snapshot from stored data.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A stored pattern no longer parses (the API validates, so this means a corrupt row).
    #[error("stored host pattern is invalid: {0}")]
    Pattern(String),
    /// The sealed snapshot JSON is malformed.
    #[error("sandbox snapshot is malformed: {0}")]
    Malformed(String),
}

impl Snapshot {
    /// Compiles a snapshot. `secrets` pairs each record with its token in this sandbox.
    ///
    /// # Errors
    /// A pattern that does not parse.
    pub fn build(
        store_name: String,
        egress_allowlist: Option<Vec<String>>,
        secrets: Vec<(SecretRecord, Token)>,
    ) -> Result<Snapshot, SnapshotError> {
        let egress = compile(egress_allowlist.as_deref())?;
        let mut entries = Vec::with_capacity(secrets.len());
        for (rec, token) in secrets {
            entries.push(SecretEntry {
                name: rec.meta.name.into(),
                token,
                allowed: compile(rec.meta.allowed_hosts.as_deref())?,
                allowed_hosts: rec.meta.allowed_hosts,
                locations: Locations::from_slice(&rec.meta.locations),
                value: rec.value,
            });
        }
        Ok(Snapshot {
            store_name,
            egress_allowlist,
            egress,
            secrets: entries,
            retired: Vec::new(),
            views: DashMap::new(),
            plain_views: DashMap::new(),
            scrubber: OnceLock::new(),
            locked: false,
            locked_scope: Vec::new(),
        })
    }

    /// True for a node's locked copy ([`Snapshot::locked_copy_of`]).
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// This snapshot marked as the locked copy of `real` (see [`Snapshot::denial_rule`]): it
    /// unseals nothing, and scrubs answers wherever `real` could unseal a value.
    pub fn locked_copy_of(mut self, real: &Snapshot) -> Snapshot {
        self.locked = true;
        self.locked_scope = real
            .secrets
            .iter()
            .map(|e| Retired::of(real, e))
            .chain(real.locked_scope.iter().cloned())
            .collect();
        // One copy of the store's allowlist for every secret, not one each (review h38e).
        share_scopes(&mut self.locked_scope);
        self
    }

    /// The secrets, in store order.
    pub fn secrets(&self) -> &[SecretEntry] {
        &self.secrets
    }

    /// This snapshot with `retired` values to scrub (at most [`MAX_RETIRED`], the newest kept).
    pub fn with_retired(mut self, mut retired: Vec<Retired>) -> Snapshot {
        if retired.len() > MAX_RETIRED {
            retired.drain(..retired.len() - MAX_RETIRED);
        }
        share_scopes(&mut retired);
        self.retired = retired;
        self.scrubber = OnceLock::new();
        self
    }

    /// Values the secrets had before a rotation or deletion, oldest first.
    pub fn retired(&self) -> &[Retired] {
        &self.retired
    }

    /// The retired values of a snapshot that `current` replaces: the ones this snapshot had,
    /// then each value of this snapshot that `current` no longer holds under the same name
    /// **with at least the same scope** — the secret's `allowed_hosts` and the store's
    /// `egress_allowlist`, each the same list or a list holding every pattern of the old one.
    /// A value whose scope was narrowed (or changed otherwise) is retired with the scope it
    /// had, so the hosts that could receive it before (the host an operator just stopped
    /// trusting, above all) still have it scrubbed from their answers; a widening retires
    /// nothing, so it does not push rotated values out of the [`MAX_RETIRED`] kept. A value
    /// retired before with the same scope moves to the end, one with another scope stays.
    pub fn retired_by(&self, current: &Snapshot) -> Vec<Retired> {
        let mut out = self.retired.clone();
        for e in &self.secrets {
            let kept = current.secrets.iter().any(|c| {
                c.name == e.name
                    && c.value == e.value
                    && holds_every_pattern(&c.allowed_hosts, &e.allowed_hosts)
                    && holds_every_pattern(&current.egress_allowlist, &self.egress_allowlist)
            });
            if !kept {
                let retired = Retired::of(self, e);
                out.retain(|r| !r.same_as(&retired));
                out.push(retired);
            }
        }
        out
    }

    /// True if the store allowlist lets the sandbox reach `dest` at all.
    pub fn egress_allowed(&self, dest: &Dest, scheme: Scheme) -> bool {
        policy::egress_allowed(self.egress.as_ref(), dest, scheme)
    }

    /// True if retired value `r` could have been unsealed for `dest` (HTTPS) before it retired.
    fn retired_allowed(r: &Retired, dest: &Dest) -> bool {
        policy::secret_allowed(r.egress_matcher(), r.allowed_matcher(), dest, Scheme::Https)
    }

    /// True if `name` may be unsealed for `dest` (HTTPS).
    pub fn secret_allowed(&self, entry: &SecretEntry, dest: &Dest) -> bool {
        policy::secret_allowed(
            self.egress.as_ref(),
            entry.allowed.as_ref(),
            dest,
            Scheme::Https,
        )
    }

    /// True if `dest` over `scheme` matches `entry`'s host rules, leaving plaintext aside
    /// ([`policy::secret_host_matches`]).
    fn secret_host_matches(&self, entry: &SecretEntry, dest: &Dest, scheme: Scheme) -> bool {
        policy::secret_host_matches(self.egress.as_ref(), entry.allowed.as_ref(), dest, scheme)
    }

    /// Why secret `name` may not be unsealed for `dest` over `scheme`, in words naming the
    /// rule, for the audit log ("why was my key not substituted?"). Patterns are policy, not
    /// values.
    pub fn denial_rule(&self, name: &str, dest: &Dest, scheme: Scheme) -> String {
        let Some(e) = self.secrets.iter().find(|e| &*e.name == name) else {
            return format!("secret {name} is no longer in this sandbox's snapshot");
        };
        if self.locked {
            return format!(
                "secret {name} is locked on this node: store {} cannot be read (quarantined), \
                 or the node is cut off from the database past store.max_staleness_secs",
                self.store_name
            );
        }
        let list = |l: &Option<Vec<String>>| l.as_deref().unwrap_or_default().join(", ");
        if self.egress.is_none() && e.allowed.is_none() {
            return format!(
                "secret {name} has no allowed_hosts and store {} has no egress_allowlist: it is never unsealed",
                self.store_name
            );
        }
        if !self.egress_allowed(dest, scheme) {
            return format!(
                "store {} egress_allowlist [{}] does not match {dest}",
                self.store_name,
                list(&self.egress_allowlist)
            );
        }
        if !e.allowed.as_ref().is_none_or(|m| m.matches(dest, scheme)) {
            return format!(
                "secret {name} allowed_hosts [{}] does not match {dest}",
                list(&e.allowed_hosts)
            );
        }
        if scheme == Scheme::Http {
            return format!("secret {name} is never unsealed over plain HTTP (to {dest})");
        }
        format!("secret {name} may be unsealed for {dest}")
    }

    /// The scrubber of every real value of the sandbox (None without secrets), shared by all
    /// views of this snapshot.
    pub fn scrubber(&self) -> Option<Arc<Scrubber>> {
        self.scrubber.get_or_init(|| scrubber_for(self)).clone()
    }

    /// The cached per-destination view for HTTPS requests to `dest`.
    pub fn view(&self, dest: &Dest) -> Arc<HostView> {
        cached(&self.views, dest, || HostView::build(self, dest))
    }

    /// The cached per-destination view for plain-HTTP requests to `dest`: it knows only the
    /// tokens of secrets whose host rules do not match `dest` (refused like any token sent to
    /// a host its secret is not allowed on, or forwarded sealed under `forward_sealed`); the
    /// tokens of secrets that match travel sealed, as ordinary bytes, since nothing is
    /// unsealed over plaintext (DESIGN §3). Answers from such a host are scrubbed all the
    /// same ([`HostView::plain`]).
    pub fn plain_view(&self, dest: &Dest) -> Arc<HostView> {
        cached(&self.plain_views, dest, || HostView::plain(self, dest))
    }

    /// Serialises for sealed persistence. The returned bytes hold real values: seal them at once.
    pub fn to_sealable(&self) -> SecretValue {
        let persisted = PersistedSnapshot {
            store_name: self.store_name.clone(),
            egress_allowlist: self.egress_allowlist.clone(),
            secrets: self
                .secrets
                .iter()
                .map(PersistedSecret::from_entry)
                .collect(),
            retired: self.retired.iter().map(PersistedRetired::from).collect(),
        };
        // Measured first, then written into a buffer of that size: a growing `Vec` would free
        // outgrown copies of every value unwiped (outside review).
        let mut size = Counted(0);
        serde_json::to_writer(&mut size, &persisted).expect("snapshot serialises");
        let mut json = Vec::with_capacity(size.0);
        serde_json::to_writer(&mut json, &persisted).expect("snapshot serialises");
        debug_assert_eq!(json.len(), size.0, "written as measured");
        SecretValue::new(json)
    }

    /// Rebuilds a snapshot from [`Snapshot::to_sealable`] bytes.
    ///
    /// # Errors
    /// Malformed JSON, a bad token, base64 or pattern.
    pub fn from_sealable(bytes: &SecretValue) -> Result<Snapshot, SnapshotError> {
        let p: PersistedSnapshot = serde_json::from_slice(bytes.expose())
            .map_err(|e| SnapshotError::Malformed(e.to_string()))?;
        let mut secrets = Vec::with_capacity(p.secrets.len());
        for s in p.secrets {
            secrets.push(s.into_record()?);
        }
        let mut known = Vec::new();
        let retired = p
            .retired
            .into_iter()
            .map(|r| r.into_retired(&mut known))
            .collect::<Result<_, _>>()?;
        Ok(Snapshot::build(p.store_name, p.egress_allowlist, secrets)?.with_retired(retired))
    }
}

/// `views`' entry for `dest`, built on a miss (at most [`MAX_VIEWS`]: a full map starts over).
fn cached(
    views: &DashMap<Dest, Arc<HostView>>,
    dest: &Dest,
    build: impl FnOnce() -> HostView,
) -> Arc<HostView> {
    if let Some(v) = views.get(dest) {
        return v.clone();
    }
    let view = Arc::new(build());
    if views.len() >= MAX_VIEWS {
        views.clear();
    }
    views.insert(dest.clone(), view.clone());
    view
}

fn compile(patterns: Option<&[String]>) -> Result<Option<HostMatcher>, SnapshotError> {
    patterns
        .map(|p| HostMatcher::compile(p).map_err(|e| SnapshotError::Pattern(e.to_string())))
        .transpose()
}

/// What one destination may receive from one snapshot (plain HTTP never unseals, but its
/// answers may be scrubbed).
pub struct HostView {
    lookup: HashMap<Token, SecretRef>,
    /// Scrubs every real value of the sandbox; None when no secret may be unsealed here.
    pub scrubber: Option<Arc<Scrubber>>,
    /// True if some secret opts into the query string.
    pub any_query: bool,
    /// True if some secret opts into the body.
    pub any_body: bool,
}

impl HostView {
    fn build(snap: &Snapshot, dest: &Dest) -> HostView {
        let lookup: HashMap<Token, SecretRef> = snap
            .secrets
            .iter()
            .map(|e| (e.token, secret_ref(snap, e, dest)))
            .collect();
        let any_unsealable = lookup.values().any(|r| r.allowed)
            || snap
                .retired
                .iter()
                .chain(&snap.locked_scope)
                .any(|r| Snapshot::retired_allowed(r, dest));
        let scrubber = any_unsealable.then(|| snap.scrubber()).flatten();
        HostView {
            any_query: snap
                .secrets
                .iter()
                .any(|e| e.locations.contains(Location::Query)),
            any_body: snap
                .secrets
                .iter()
                .any(|e| e.locations.contains(Location::Body)),
            lookup,
            scrubber,
        }
    }

    /// The plain-HTTP view ([`Snapshot::plain_view`]): only the secrets whose host rules do
    /// not match `dest`, none of them allowed, without their values; answers are scrubbed when
    /// some secret's host rules match `dest` (current, retired or of a locked scope): nothing is
    /// unsealed over plaintext, but a host that stored a value sent to it over HTTPS gives it
    /// back over `http://` under the same name (outside pass: it came back in clear).
    fn plain(snap: &Snapshot, dest: &Dest) -> HostView {
        let (matching, refused): (Vec<&SecretEntry>, Vec<&SecretEntry>) = snap
            .secrets
            .iter()
            .partition(|e| snap.secret_host_matches(e, dest, Scheme::Http));
        let scrubbed = !matching.is_empty()
            || snap.retired.iter().chain(&snap.locked_scope).any(|r| {
                policy::secret_host_matches(
                    r.egress_matcher(),
                    r.allowed_matcher(),
                    dest,
                    Scheme::Http,
                )
            });
        HostView {
            any_query: refused
                .iter()
                .any(|e| e.locations.contains(Location::Query)),
            any_body: refused.iter().any(|e| e.locations.contains(Location::Body)),
            lookup: refused
                .iter()
                .map(|e| {
                    // Never unsealed here, so the view holds no value at all.
                    let r = SecretRef {
                        name: e.name.clone(),
                        value: SecretValue::new(Vec::new()),
                        locations: e.locations,
                        allowed: false,
                    };
                    (e.token, r)
                })
                .collect(),
            scrubber: scrubbed.then(|| snap.scrubber()).flatten(),
        }
    }

    /// True if the view knows no token at all (nothing to scan for).
    pub fn is_empty(&self) -> bool {
        self.lookup.is_empty()
    }
}

fn secret_ref(snap: &Snapshot, e: &SecretEntry, dest: &Dest) -> SecretRef {
    SecretRef {
        name: e.name.clone(),
        value: e.value.clone(),
        locations: e.locations,
        allowed: snap.secret_allowed(e, dest),
    }
}

/// Every current and retired value, each with its transformed forms ([`echo_forms`]); current
/// values first, so a value both current and retired is replaced with its current token.
fn scrubber_for(snap: &Snapshot) -> Option<Arc<Scrubber>> {
    let current = snap.secrets.iter().map(|e| (&e.value, &e.token));
    let retired = snap.retired.iter().map(|r| (&r.value, &r.token));
    let mut pairs = Vec::new();
    for (value, token) in current.chain(retired) {
        pairs.push((value.clone(), Bytes::copy_from_slice(token.as_bytes())));
        pairs.extend(echo_forms(value, token.as_bytes()));
    }
    Scrubber::new(pairs)
}

impl TokenLookup for HostView {
    fn get(&self, token: &Token) -> Option<&SecretRef> {
        self.lookup.get(token)
    }
}

#[derive(Serialize, Deserialize)]
struct PersistedSnapshot {
    store_name: String,
    egress_allowlist: Option<Vec<String>>,
    secrets: Vec<PersistedSecret>,
    /// Absent in snapshots written before retired values were kept.
    #[serde(default)]
    retired: Vec<PersistedRetired>,
}

#[derive(Serialize, Deserialize)]
struct PersistedRetired {
    token: String,
    value_b64: Zeroizing<String>,
    allowed_hosts: Option<Vec<String>>,
    egress_allowlist: Option<Vec<String>>,
}

/// A value as the sealed snapshot JSON holds it.
fn value_b64(value: &SecretValue) -> Zeroizing<String> {
    Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(value.expose()))
}

/// The value back from [`value_b64`]; `None` if it is not base64.
fn value_from_b64(b64: &str) -> Option<SecretValue> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .ok()
        .map(SecretValue::new)
}

impl From<&Retired> for PersistedRetired {
    fn from(r: &Retired) -> Self {
        PersistedRetired {
            token: r.token.to_string(),
            value_b64: value_b64(&r.value),
            allowed_hosts: r.allowed_hosts().map(<[String]>::to_vec),
            egress_allowlist: r.egress_allowlist().map(<[String]>::to_vec),
        }
    }
}

impl PersistedRetired {
    /// The retired value; its lists are compiled once per distinct list (`known`).
    fn into_retired(self, known: &mut Vec<Patterns>) -> Result<Retired, SnapshotError> {
        let bad = || SnapshotError::Malformed("bad retired value".into());
        let token = Token::parse(self.token.as_bytes()).ok_or_else(bad)?;
        let value = value_from_b64(&self.value_b64).ok_or_else(bad)?;
        Ok(Retired {
            token,
            value,
            allowed: Patterns::compile(self.allowed_hosts, known)?,
            egress: Patterns::compile(self.egress_allowlist, known)?,
        })
    }
}

/// A writer that only counts the bytes written to it.
struct Counted(usize);

impl std::io::Write for Counted {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len();
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct PersistedSecret {
    name: String,
    token: String,
    value_b64: Zeroizing<String>,
    allowed_hosts: Option<Vec<String>>,
    locations: Vec<Location>,
}

impl PersistedSecret {
    fn from_entry(e: &SecretEntry) -> Self {
        PersistedSecret {
            name: e.name.to_string(),
            token: e.token.to_string(),
            value_b64: value_b64(&e.value),
            allowed_hosts: e.allowed_hosts.clone(),
            locations: e.locations.to_vec(),
        }
    }

    fn into_record(self) -> Result<(SecretRecord, Token), SnapshotError> {
        let token = Token::parse(self.token.as_bytes()).ok_or_else(|| {
            SnapshotError::Malformed(format!("bad token for secret {}", self.name))
        })?;
        let value = value_from_b64(&self.value_b64).ok_or_else(|| {
            SnapshotError::Malformed(format!("bad value encoding for secret {}", self.name))
        })?;
        let now = time::OffsetDateTime::now_utc();
        let meta = crate::store::SecretMeta {
            name: self.name,
            allowed_hosts: self.allowed_hosts,
            locations: self.locations,
            version: 0,
            created_at: now,
            updated_at: now,
        };
        Ok((SecretRecord { meta, value }, token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Secret `KEY` (`sk-snapshot-test-value`, headers) with these `allowed_hosts`.
    fn record(allowed_hosts: Option<&[&str]>) -> SecretRecord {
        let now = time::OffsetDateTime::now_utc();
        let meta = crate::store::SecretMeta {
            name: "KEY".into(),
            allowed_hosts: allowed_hosts.map(|a| a.iter().map(|h| (*h).to_owned()).collect()),
            locations: vec![Location::Header],
            version: 0,
            created_at: now,
            updated_at: now,
        };
        SecretRecord {
            meta,
            value: SecretValue::new(b"sk-snapshot-test-value".to_vec()),
        }
    }

    fn snapshot(allowed_hosts: &[&str]) -> Snapshot {
        let rec = record(Some(allowed_hosts));
        Snapshot::build("s".into(), None, vec![(rec, Token::generate())]).unwrap()
    }

    /// Under a wildcard a sandbox can name endless hosts: every view shares the one scrubber
    /// instead of building automata over every value per host.
    #[test]
    fn every_view_shares_the_snapshots_one_scrubber() {
        let snap = snapshot(&["*.example.test"]);
        let first = snap.scrubber().expect("a secret: something to scrub");
        for i in 0..200 {
            let dest = policy::parse_authority(&format!("h{i}.example.test:443"), None).unwrap();
            let view = snap.view(&dest);
            let s = view.scrubber.as_ref().expect("unsealable here: scrubbed");
            assert!(Arc::ptr_eq(s, &first), "host {i}");
        }
        let elsewhere = policy::parse_authority("other.test:443", None).unwrap();
        assert!(
            snap.view(&elsewhere).scrubber.is_none(),
            "nothing unsealable there"
        );
    }

    fn scrubs(snap: &Snapshot, host: &str, text: &str) -> bool {
        let dest = policy::parse_authority(&format!("{host}:443"), None).unwrap();
        let view = snap.view(&dest);
        view.scrubber
            .as_ref()
            .is_some_and(|s| s.scrub(text.as_bytes()).is_some())
    }

    /// A snapshot like `old` whose secret now has `value` (`None`: deleted), as a rotation
    /// builds it, with `old`'s retired values carried over.
    fn rotated(old: &Snapshot, value: Option<&[u8]>) -> Snapshot {
        let now = time::OffsetDateTime::now_utc();
        let secrets = value
            .map(|v| {
                let e = &old.secrets()[0];
                let meta = crate::store::SecretMeta {
                    name: e.name.to_string(),
                    allowed_hosts: e.allowed_hosts.clone(),
                    locations: e.locations.to_vec(),
                    version: 1,
                    created_at: now,
                    updated_at: now,
                };
                let value = SecretValue::new(v.to_vec());
                (SecretRecord { meta, value }, e.token)
            })
            .into_iter()
            .collect();
        let new = Snapshot::build("s".into(), None, secrets).unwrap();
        let retired = old.retired_by(&new);
        new.with_retired(retired)
    }

    #[test]
    fn retired_values_stay_scrubbed_where_they_were_allowed_and_survive_persistence() {
        let v1 = "sk-snapshot-test-value";
        let v2 = "sk-snapshot-rotated-002";
        let snap = snapshot(&["api.example.test"]);
        let after = rotated(&snap, Some(v2.as_bytes()));
        assert_eq!(after.retired().len(), 1);
        assert!(scrubs(&after, "api.example.test", v1), "the old value");
        assert!(scrubs(&after, "api.example.test", v2), "the new value");
        assert!(!scrubs(&after, "other.test", v1), "never unsealed there");
        let same = rotated(&after, Some(v2.as_bytes()));
        assert_eq!(
            same.retired().len(),
            1,
            "an unchanged value retires nothing"
        );
        let gone = rotated(&same, None);
        assert_eq!(gone.retired().len(), 2);
        assert!(gone.secrets().is_empty());
        for v in [v1, v2] {
            assert!(scrubs(&gone, "api.example.test", v), "deleted: {v}");
        }
        let back = Snapshot::from_sealable(&gone.to_sealable()).unwrap();
        assert_eq!(back.retired().len(), 2);
        assert!(scrubs(&back, "api.example.test", v1), "after a restart");
        assert!(!scrubs(&back, "other.test", v1));
    }

    #[test]
    fn retired_values_are_bounded_oldest_first() {
        let mut snap = snapshot(&["api.example.test"]);
        for i in 0..MAX_RETIRED + 5 {
            snap = rotated(&snap, Some(format!("sk-rotation-number-{i:04}").as_bytes()));
        }
        assert_eq!(snap.retired().len(), MAX_RETIRED);
        assert!(!scrubs(&snap, "api.example.test", "sk-snapshot-test-value"));
        let newest_retired = format!("sk-rotation-number-{:04}", MAX_RETIRED + 3);
        assert!(scrubs(&snap, "api.example.test", &newest_retired));
    }

    /// 64 rotations under one list keep one copy of it, written and compiled, in memory and
    /// after a restart (there were 64 per sandbox: 2.9 GiB for 100 sandboxes under a
    /// 500-pattern allowlist, outside pass); a narrowed list is a second one.
    #[test]
    fn retired_values_share_one_copy_of_each_scope() {
        let mut snap = snapshot(&["api.example.test", "*.api.example.test"]);
        for i in 0..MAX_RETIRED + 5 {
            snap = rotated(&snap, Some(format!("sk-rotation-number-{i:04}").as_bytes()));
        }
        let distinct = |snap: &Snapshot| {
            let mut lists: Vec<Arc<[String]>> = Vec::new();
            for r in snap.retired() {
                let w = &r.allowed.as_ref().unwrap().written;
                if !lists.iter().any(|l| Arc::ptr_eq(l, w)) {
                    lists.push(w.clone());
                }
            }
            lists.len()
        };
        assert_eq!(distinct(&snap), 1);
        let back = Snapshot::from_sealable(&snap.to_sealable()).unwrap();
        assert_eq!((back.retired().len(), distinct(&back)), (MAX_RETIRED, 1));
        let newest = format!("sk-rotation-number-{:04}", MAX_RETIRED + 3);
        assert!(scrubs(&back, "x.api.example.test", &newest));
        assert_eq!(
            back.retired()[0].allowed_hosts(),
            Some(
                &[
                    "api.example.test".to_owned(),
                    "*.api.example.test".to_owned()
                ][..]
            )
        );
    }

    /// A locked copy (a quarantined store, a stale fleet node) scopes every secret under the
    /// store's one allowlist: one copy of it, not one per secret (review h38e).
    #[test]
    fn a_locked_copy_shares_one_copy_of_each_scope() {
        let allow: Vec<String> = (0..50).map(|i| format!("h{i}.example.test")).collect();
        // As `lifecycle::locked_copy` builds it: the same secrets, allowed nowhere.
        let secrets = |allowed_hosts: Option<&[&str]>| {
            (0..20)
                .map(|i| {
                    let mut rec = record(allowed_hosts);
                    rec.meta.name = format!("KEY_{i}");
                    let value = format!("sk-locked-copy-value-{i:04}");
                    rec.value = SecretValue::new(value.into_bytes());
                    (rec, Token::generate())
                })
                .collect()
        };
        let real = Snapshot::build("s".into(), Some(allow.clone()), secrets(None)).unwrap();
        let locked = Snapshot::build("s".into(), Some(allow), secrets(Some(&[])))
            .unwrap()
            .locked_copy_of(&real);
        let scope = &locked.locked_scope;
        assert_eq!(scope.len(), 20);
        let first = &scope[0].egress.as_ref().unwrap().written;
        assert!(scope
            .iter()
            .all(|r| Arc::ptr_eq(&r.egress.as_ref().unwrap().written, first)));
        assert!(scrubs(
            &locked,
            "h7.example.test",
            "sk-locked-copy-value-0013"
        ));
    }

    #[test]
    fn snapshots_written_before_retired_values_still_load() {
        let snap = snapshot(&["api.example.test"]);
        let mut json: serde_json::Value =
            serde_json::from_slice(snap.to_sealable().expose()).unwrap();
        json.as_object_mut().unwrap().remove("retired");
        let old = SecretValue::new(serde_json::to_vec(&json).unwrap());
        assert!(Snapshot::from_sealable(&old).unwrap().retired().is_empty());
    }

    #[test]
    fn a_retired_value_keeps_the_scope_it_had_when_the_allowlist_changes_later() {
        let rec = record(None);
        let allow = Some(vec!["api.example.test".to_owned()]);
        let snap = Snapshot::build("s".into(), allow, vec![(rec, Token::generate())]).unwrap();
        // Deleted, then the store's allowlist removed: the value went to api.example.test.
        let gone = rotated(&snap, None);
        assert!(scrubs(&gone, "api.example.test", "sk-snapshot-test-value"));
        assert!(!scrubs(&gone, "other.test", "sk-snapshot-test-value"));
    }

    /// A snapshot like `old` whose secret now has `allowed_hosts` (value unchanged) under the
    /// store allowlist `egress`, as an operator's narrowing builds it.
    fn rescoped(old: &Snapshot, allowed_hosts: &[&str], egress: Option<&[&str]>) -> Snapshot {
        let e = &old.secrets()[0];
        let mut rec = record(Some(allowed_hosts));
        rec.meta.name = e.name.to_string();
        let egress = egress.map(|h| h.iter().map(|h| (*h).to_owned()).collect());
        let new = Snapshot::build("s".into(), egress, vec![(rec, e.token)]).unwrap();
        let retired = old.retired_by(&new);
        new.with_retired(retired)
    }

    /// An outside review: narrowing a secret's `allowed_hosts` (the value unchanged) stopped
    /// scrubbing on the host taken out, so a value that host had stored came back in clear —
    /// just when the operator stopped trusting it. Each scope it had is kept, not only the
    /// last; the store's allowlist narrowing counts the same way.
    #[test]
    fn a_value_whose_hosts_are_narrowed_stays_scrubbed_where_it_could_go_before() {
        let v = "sk-snapshot-test-value";
        let snap = snapshot(&["a.example.test", "b.example.test", "c.example.test"]);
        let bc = rescoped(&snap, &["b.example.test", "c.example.test"], None);
        assert!(scrubs(&bc, "a.example.test", v), "the host taken out");
        let c = rescoped(&bc, &["c.example.test"], None);
        for host in ["a.example.test", "b.example.test", "c.example.test"] {
            assert!(scrubs(&c, host, v), "after two narrowings: {host}");
        }
        assert!(!scrubs(&c, "other.test", v), "never allowed there");
        let same = rescoped(&c, &["c.example.test"], None);
        assert_eq!(
            same.retired().len(),
            c.retired().len(),
            "no change, nothing retired"
        );
        let wider = rescoped(&c, &["d.example.test", "c.example.test"], None);
        assert_eq!(
            wider.retired().len(),
            c.retired().len(),
            "a widening retires nothing"
        );
        // The store's allowlist: from none (any public host the secret allows) to one.
        let wide = snapshot(&["*.example.test"]);
        let narrowed = rescoped(&wide, &["*.example.test"], Some(&["c.example.test"]));
        assert!(
            scrubs(&narrowed, "a.example.test", v),
            "the allowlist narrowed"
        );
        let back = Snapshot::from_sealable(&narrowed.to_sealable()).unwrap();
        assert!(scrubs(&back, "a.example.test", v), "after a restart");
    }
}
