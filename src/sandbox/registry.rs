//! The in-memory registry of live sandboxes: id → sandbox and source IP → sandbox, both O(1)
//! and lock-free on the read path (sharded `DashMap`s). Tokens are looked up in the sandbox's
//! own snapshot (a token only means something inside the sandbox it was minted for), so there
//! is no global token index.
//!
//! # Memory usage
//! One `Arc<Sandbox>` per sandbox plus one map entry per id and per source IP; the sandbox
//! itself holds its snapshot (secrets + compiled matchers) and its CA.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;
use time::OffsetDateTime;

use super::Sandbox;

/// Live sandboxes.
#[derive(Default)]
pub struct Registry {
    by_id: DashMap<Arc<str>, Arc<Sandbox>>,
    by_ip: DashMap<IpAddr, Arc<Sandbox>>,
}

/// Registration failures.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Another live sandbox already has this source IP.
    #[error("source_ip {0} is already used by sandbox {1}")]
    SourceIpTaken(IpAddr, String),
}

impl Registry {
    /// Adds a sandbox.
    ///
    /// # Errors
    /// [`RegistryError::SourceIpTaken`] if its source IP is in use by a live sandbox.
    pub fn insert(&self, sb: Arc<Sandbox>) -> Result<(), RegistryError> {
        if let Some(ip) = sb.source_ip {
            match self.by_ip.entry(ip) {
                dashmap::Entry::Occupied(o) => {
                    return Err(RegistryError::SourceIpTaken(ip, o.get().id.to_string()))
                }
                dashmap::Entry::Vacant(v) => {
                    v.insert(sb.clone());
                }
            }
        }
        self.by_id.insert(sb.id.clone(), sb);
        Ok(())
    }

    /// Swaps in a new snapshot for `sb` (a deleted secret's token stops resolving at once).
    pub fn replace_snapshot(&self, sb: &Arc<Sandbox>, snapshot: super::Snapshot) {
        sb.set_snapshot(snapshot);
    }

    /// Removes a sandbox and its indexes; returns it if it was live.
    pub fn remove(&self, id: &str) -> Option<Arc<Sandbox>> {
        let (_, sb) = self.by_id.remove(id)?;
        sb.mark_ended();
        if let Some(ip) = sb.source_ip {
            self.by_ip.remove_if(&ip, |_, v| Arc::ptr_eq(v, &sb));
        }
        Some(sb)
    }

    /// The live, unexpired sandbox with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Sandbox>> {
        let sb = self.by_id.get(id)?.clone();
        (!sb.is_expired(OffsetDateTime::now_utc())).then_some(sb)
    }

    /// The live, unexpired sandbox registered for this source IP (transparent mode).
    pub fn by_source_ip(&self, ip: IpAddr) -> Option<Arc<Sandbox>> {
        let sb = self.by_ip.get(&ip)?.clone();
        (!sb.is_expired(OffsetDateTime::now_utc())).then_some(sb)
    }

    /// All live sandboxes (expired ones included until the sweeper runs).
    pub fn all(&self) -> Vec<Arc<Sandbox>> {
        self.by_id.iter().map(|e| e.value().clone()).collect()
    }

    /// Live sandboxes created from `store_id`.
    pub fn of_store(&self, store_id: &str) -> Vec<Arc<Sandbox>> {
        self.by_id
            .iter()
            .filter(|e| e.value().store_id == store_id)
            .map(|e| e.value().clone())
            .collect()
    }

    /// Ids of sandboxes whose time is up.
    pub fn expired(&self, now: OffsetDateTime) -> Vec<Arc<str>> {
        self.by_id
            .iter()
            .filter(|e| e.value().is_expired(now))
            .map(|e| e.key().clone())
            .collect()
    }

    /// Number of registered sandboxes.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}
