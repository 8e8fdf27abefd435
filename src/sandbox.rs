//! Sandbox sessions: a store snapshot compiled for the hot path, its sealed tokens, its identity
//! and its CA, plus the registry that finds them in O(1).
//!
//! Invariants:
//! - A token only means something inside the sandbox it was minted for: lookups go through the
//!   sandbox (identified first, never from a request header), never through a global map alone.
//! - A [`Snapshot`] is immutable; rotation swaps in a new `Arc<Snapshot>`, so a request sees one
//!   consistent version from start to end.

mod budget;
pub mod lifecycle;
pub mod registry;
pub mod snapshot;
pub mod tombstones;

pub use budget::{Budget, BudgetSlot};
pub use lifecycle::{CreateSandbox, SandboxError, Sandboxes};
pub use registry::Registry;
pub use snapshot::{HostView, Retired, SecretEntry, Snapshot};
pub use tombstones::Tombstones;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use time::OffsetDateTime;

use crate::ca::SandboxCa;

/// A fresh sandbox id: `sbx_` + 24 lowercase hex digits.
pub fn new_id() -> String {
    format!("sbx_{}", crate::random::random_hex(12))
}

/// `sbx_` + 24 lowercase hex digits, as the daemon names sandboxes. Every id that names a
/// file, a cgroup, a chain or a record line is checked with this first.
pub fn is_sandbox_id(s: &str) -> bool {
    s.strip_prefix("sbx_").is_some_and(|hex| {
        hex.len() == 24 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// One live sandbox.
pub struct Sandbox {
    /// `sbx_` + 24 hex.
    pub id: Arc<str>,
    /// The store it was created from (may since have been deleted).
    pub store_id: String,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When its tokens and CA stop working.
    pub expires_at: OffsetDateTime,
    /// Transparent-mode identity.
    pub source_ip: Option<IpAddr>,
    /// SHA-256 of the proxy password from its proxy URL.
    pub proxy_token_hash: [u8; 32],
    /// Its certificate authority.
    pub ca: Arc<SandboxCa>,
    snapshot: RwLock<Arc<Snapshot>>,
    /// How many times `snapshot` was replaced: written under its write lock, so a reader that
    /// sees a value later than one it read with a snapshot reads a later snapshot too.
    generation: AtomicU64,
    /// Set once it left the registry (deleted, expired, ended): answers still streaming stop.
    ended: AtomicBool,
    /// Wakes [`Sandbox::ended`] waiters when `ended` is set.
    ended_notify: tokio::sync::Notify,
    tunnels: AtomicUsize,
    requests: AtomicUsize,
    /// Its open upstream connections (`[upstream] max_connections_per_sandbox`).
    pub upstream: Budget,
    /// Its responses being decoded from brotli or zstd
    /// (`[upstream] max_window_decoders_per_sandbox`).
    pub decoders: Budget,
    /// Bytes of gRPC messages its responses hold, compressed in flight or decoded and not yet
    /// taken by its clients (`subst::framing::HELD_MESSAGES_PER_SANDBOX`).
    pub grpc_held: Arc<std::sync::atomic::AtomicUsize>,
    /// Bytes of its request bodies held whole past `proxy::forward::BUFFER_BODY_MAX`
    /// (`proxy::whole_bodies::SANDBOX_SHARE`).
    pub bodies_held: Arc<AtomicU64>,
}

impl Sandbox {
    /// Builds a live sandbox around `snapshot`.
    pub fn new(parts: SandboxParts, snapshot: Snapshot) -> Self {
        Sandbox {
            id: parts.id.into(),
            store_id: parts.store_id,
            created_at: parts.created_at,
            expires_at: parts.expires_at,
            source_ip: parts.source_ip,
            proxy_token_hash: parts.proxy_token_hash,
            ca: parts.ca,
            snapshot: RwLock::new(Arc::new(snapshot)),
            generation: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            ended_notify: tokio::sync::Notify::new(),
            tunnels: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            upstream: Default::default(),
            decoders: Default::default(),
            grpc_held: Default::default(),
            bodies_held: Default::default(),
        }
    }

    /// The current snapshot (one consistent version for the caller's whole request).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The current snapshot with its generation ([`Sandbox::generation`]), read together.
    pub fn snapshot_at(&self) -> (u64, Arc<Snapshot>) {
        let snap = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
        (self.generation.load(Ordering::Acquire), snap.clone())
    }

    /// How many times the snapshot was replaced: one atomic load, for answers that outlive
    /// their request and must notice a change (`proxy::response_scrub::Scope`).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Replaces the snapshot (rotation, allowlist change, secret deletion).
    pub fn set_snapshot(&self, snapshot: Snapshot) {
        let mut current = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        *current = Arc::new(snapshot);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// True once it left the registry: one atomic load, for answers that outlive their
    /// request (`proxy::response_scrub::Following`).
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Marks it ended (the registry does, as it removes it).
    pub fn mark_ended(&self) {
        self.ended.store(true, Ordering::Release);
        self.ended_notify.notify_waiters();
    }

    /// Waits until it has ended ([`Sandbox::has_ended`]), for work that outlives a request
    /// and waits on the sandbox's client (an upload's deferred audit line).
    pub async fn ended(&self) {
        let notified = self.ended_notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.has_ended() {
            notified.await;
        }
    }

    /// True once `expires_at` has passed.
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        now >= self.expires_at
    }

    /// Checks a proxy password in constant time.
    pub fn check_proxy_token(&self, presented: &str) -> bool {
        let digest = ring::digest::digest(&ring::digest::SHA256, presented.as_bytes());
        crate::secret::ct_eq(digest.as_ref(), &self.proxy_token_hash)
    }

    /// Claims one tunnel slot, or None when `max` are in use. The slot is released on drop.
    pub fn try_open_tunnel(self: &Arc<Self>, max: usize) -> Option<TunnelGuard> {
        self.try_claim(Slot::Tunnel, max)
    }

    /// Claims one in-flight request slot, or None when `max` are in use. The slot is
    /// released on drop.
    pub fn try_start_request(self: &Arc<Self>, max: usize) -> Option<SlotGuard> {
        self.try_claim(Slot::Request, max)
    }

    /// Open intercepted connections.
    pub fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::Acquire)
    }

    /// Requests in flight upstream.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Acquire)
    }

    fn try_claim(self: &Arc<Self>, slot: Slot, max: usize) -> Option<SlotGuard> {
        let count = self.count(slot);
        if count.fetch_add(1, Ordering::AcqRel) >= max {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(SlotGuard(self.clone(), slot))
    }

    fn count(&self, slot: Slot) -> &AtomicUsize {
        match slot {
            Slot::Tunnel => &self.tunnels,
            Slot::Request => &self.requests,
        }
    }
}

/// The identity-and-lifetime fields of a sandbox, for [`Sandbox::new`].
pub struct SandboxParts {
    /// Sandbox id.
    pub id: String,
    /// Source store id.
    pub store_id: String,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Expiry time.
    pub expires_at: OffsetDateTime,
    /// Transparent identity.
    pub source_ip: Option<IpAddr>,
    /// SHA-256 of the proxy password.
    pub proxy_token_hash: [u8; 32],
    /// The CA.
    pub ca: Arc<SandboxCa>,
}

/// A capped count of a sandbox.
#[derive(Clone, Copy, Debug)]
enum Slot {
    Tunnel,
    Request,
}

/// Releases a slot (a tunnel, an in-flight request) when dropped.
pub struct SlotGuard(Arc<Sandbox>, Slot);

/// The slot an intercepted connection holds.
pub type TunnelGuard = SlotGuard;

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.count(self.1).fetch_sub(1, Ordering::AcqRel);
    }
}
