//! Revocation and the end of workloads: the deny list and the ledgers of credentials this node
//! issued.
//!
//! Revoking an identity stops issuance for it, makes its companions drop every cached credential,
//! and puts what was already issued on the deny list: every `jti` / certificate serial this
//! node's ledger holds for it, plus a cut-off time (`revoked_at`) that catches credentials the
//! ledger no longer knows (issued before a restart, or on another node).
//!
//! When a workload's last container is gone, what its companion was issued (its own ledger,
//! [`WorkloadLedger`]) goes on the deny list as an `ended` entry until the last of it expires:
//! a token copied out of a deleted pod is refused by everything that asks `nhid`, while other
//! workloads of the same identity (replicas) keep theirs.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use nhi_core::wire::{EndedWorkload, Revocation};
use serde::{Deserialize, Serialize};

use nhi_core::clock::now_unix;

/// Most credentials remembered per identity or workload; the oldest go first (for an
/// identity, the cut-off still covers them).
const LEDGER_PER_IDENTITY: usize = 4096;

/// One credential issued: its `jti` or serial and when it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    pub id: String,
    pub expires_at: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    #[serde(default)]
    pub jtis: VecDeque<Issued>,
    #[serde(default)]
    pub serials: VecDeque<Issued>,
}

impl Ledger {
    /// Only what has not expired.
    fn live(&self) -> Ledger {
        let now = now_unix();
        let keep =
            |q: &VecDeque<Issued>| q.iter().filter(|i| i.expires_at > now).cloned().collect();
        Ledger {
            jtis: keep(&self.jtis),
            serials: keep(&self.serials),
        }
    }

    fn is_empty(&self) -> bool {
        self.jtis.is_empty() && self.serials.is_empty()
    }
}

/// What one workload (one companion, restarts included) was issued.
#[derive(Debug, Default)]
pub struct WorkloadLedger(Mutex<Ledger>);

impl WorkloadLedger {
    pub fn restored(saved: Ledger) -> Self {
        WorkloadLedger(Mutex::new(saved.live()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record_jwt(&self, jti: &str, expires_at: u64) {
        remember(&mut self.lock().jtis, jti, expires_at);
    }

    pub fn record_x509(&self, serial: &str, expires_at: u64) {
        remember(&mut self.lock().serials, serial, expires_at);
    }

    /// What has not expired yet (saved with the attachment at `nhid` shutdown).
    pub fn live(&self) -> Ledger {
        self.lock().live()
    }
}

#[derive(Default)]
struct List {
    entries: BTreeMap<String, Revocation>,
    /// Every listed `jti` / serial, for a lookup that does not walk the entries.
    jtis: HashSet<String>,
    serials: HashSet<String>,
}

impl List {
    fn index(&mut self, r: &Revocation) {
        self.jtis.extend(r.jtis.iter().cloned());
        self.serials.extend(r.serials.iter().cloned());
    }

    fn reindex(&mut self) {
        self.jtis.clear();
        self.serials.clear();
        let all: Vec<Revocation> = self.entries.values().cloned().collect();
        for r in &all {
            self.index(r);
        }
    }
}

#[derive(Default)]
pub struct Revocations {
    list: Mutex<List>,
    ledger: Mutex<HashMap<String, Ledger>>,
}

fn remember(q: &mut VecDeque<Issued>, id: &str, expires_at: u64) {
    let now = now_unix();
    while q.front().is_some_and(|i| i.expires_at <= now) || q.len() >= LEDGER_PER_IDENTITY {
        q.pop_front();
    }
    q.push_back(Issued {
        id: id.into(),
        expires_at,
    });
}

impl Revocations {
    pub fn new(list: Vec<Revocation>) -> Self {
        let r = Revocations::default();
        r.replace(list);
        r
    }

    fn list(&self) -> std::sync::MutexGuard<'_, List> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, HashMap<String, Ledger>> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record_jwt(&self, spiffe_id: &str, jti: &str, expires_at: u64) {
        let mut l = self.ledger();
        remember(
            &mut l.entry(spiffe_id.into()).or_default().jtis,
            jti,
            expires_at,
        );
    }

    pub fn record_x509(&self, spiffe_id: &str, serial: &str, expires_at: u64) {
        let mut l = self.ledger();
        remember(
            &mut l.entry(spiffe_id.into()).or_default().serials,
            serial,
            expires_at,
        );
    }

    pub fn is_revoked(&self, spiffe_id: &str) -> bool {
        // Ended-workload entries are keyed `ended/...`, never by a SPIFFE ID.
        self.list().entries.contains_key(spiffe_id)
    }

    /// Adds (or refreshes) the revocation of `spiffe_id` and returns it.
    pub fn revoke(&self, spiffe_id: &str) -> Revocation {
        let live = self
            .ledger()
            .get(spiffe_id)
            .map(Ledger::live)
            .unwrap_or_default();
        let mut list = self.list();
        let r = list
            .entries
            .entry(spiffe_id.to_string())
            .or_insert_with(|| Revocation {
                spiffe_id: spiffe_id.into(),
                revoked_at: 0,
                jtis: Vec::new(),
                serials: Vec::new(),
                ended: None,
            });
        r.revoked_at = now_unix();
        for j in live.jtis {
            if !r.jtis.contains(&j.id) {
                r.jtis.push(j.id);
            }
        }
        for s in live.serials {
            if !r.serials.contains(&s.id) {
                r.serials.push(s.id);
            }
        }
        let r = r.clone();
        list.index(&r);
        r
    }

    /// Puts what a workload of `spiffe_id` was issued and has not expired on the deny list
    /// until it expires; `None` when nothing is left to deny. `workload` says which workload.
    pub fn workload_ended(
        &self,
        spiffe_id: &str,
        workload: String,
        ledger: &Ledger,
    ) -> Option<Revocation> {
        let live = ledger.live();
        if live.is_empty() {
            return None;
        }
        let expires_at = live
            .jtis
            .iter()
            .chain(live.serials.iter())
            .map(|i| i.expires_at)
            .max()
            .unwrap_or(0);
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).expect("the OS random source failed");
        let r = Revocation {
            spiffe_id: spiffe_id.into(),
            revoked_at: 0,
            jtis: live.jtis.into_iter().map(|i| i.id).collect(),
            serials: live.serials.into_iter().map(|i| i.id).collect(),
            ended: Some(EndedWorkload {
                id: raw.iter().map(|b| format!("{b:02x}")).collect(),
                workload,
                ended_at: now_unix(),
                expires_at,
            }),
        };
        let mut list = self.list();
        list.entries.insert(r.key(), r.clone());
        list.index(&r);
        Some(r)
    }

    /// Drops ended-workload entries whose credentials have all expired; their keys, for the
    /// store.
    pub fn prune_ended(&self) -> Vec<String> {
        let now = now_unix();
        let mut list = self.list();
        let gone: Vec<String> = list
            .entries
            .iter()
            .filter(|(_, r)| r.ended.as_ref().is_some_and(|e| e.expires_at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        if !gone.is_empty() {
            for k in &gone {
                list.entries.remove(k);
            }
            list.reindex();
        }
        gone
    }

    /// Lifts the revocation; `false` if there was none.
    pub fn undo(&self, spiffe_id: &str) -> bool {
        let mut list = self.list();
        let removed = list.entries.remove(spiffe_id).is_some();
        if removed {
            list.reindex();
        }
        removed
    }

    pub fn snapshot(&self) -> Vec<Revocation> {
        self.list().entries.values().cloned().collect()
    }

    /// Replaces the list (loaded from the store); returns the identities newly revoked and the
    /// ones no longer revoked (ended-workload entries concern no identity and are not named).
    pub fn replace(&self, new: Vec<Revocation>) -> (Vec<String>, Vec<String>) {
        let mut list = self.list();
        let new: BTreeMap<String, Revocation> = new.into_iter().map(|r| (r.key(), r)).collect();
        let identity = |r: &Revocation| r.ended.is_none();
        let added = new
            .iter()
            .filter(|(k, r)| identity(r) && !list.entries.contains_key(*k))
            .map(|(k, _)| k.clone())
            .collect();
        let removed = list
            .entries
            .iter()
            .filter(|(k, r)| identity(r) && !new.contains_key(*k))
            .map(|(k, _)| k.clone())
            .collect();
        list.entries = new;
        list.reindex();
        (added, removed)
    }

    /// Why a JWT with these claims is refused, if it is.
    pub fn denies_jwt(&self, sub: &str, jti: Option<&str>, iat: Option<u64>) -> Option<String> {
        let list = self.list();
        if let Some(jti) = jti {
            if list.jtis.contains(jti) {
                return Some(format!("token {jti} is on the deny list"));
            }
        }
        let r = list.entries.get(sub)?;
        // Issued at or before the revocation (or no iat at all): refused.
        if iat.is_none_or(|iat| iat <= r.revoked_at) {
            return Some(format!("{sub} was revoked at {}", r.revoked_at));
        }
        None
    }

    pub fn denies_serial(&self, serial: &str) -> bool {
        self.list().serials.contains(serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoking_lists_what_was_issued_and_cuts_off_the_rest() {
        let r = Revocations::default();
        let far = now_unix() + 600;
        r.record_jwt("spiffe://td/a", "j1", far);
        r.record_jwt("spiffe://td/a", "old", now_unix() - 1);
        r.record_jwt("spiffe://td/b", "j2", far);
        r.record_x509("spiffe://td/a", "01:02", far);
        assert!(r
            .denies_jwt("spiffe://td/a", Some("j1"), Some(now_unix()))
            .is_none());

        let rev = r.revoke("spiffe://td/a");
        assert_eq!(rev.jtis, vec!["j1"], "expired ones are not listed");
        assert_eq!(rev.serials, vec!["01:02"]);
        assert!(r.is_revoked("spiffe://td/a") && !r.is_revoked("spiffe://td/b"));
        assert!(r.denies_jwt("spiffe://td/a", Some("j1"), Some(1)).is_some());
        // Unknown to the ledger but issued before the revocation: refused by the cut-off.
        assert!(r
            .denies_jwt("spiffe://td/a", Some("zz"), Some(rev.revoked_at))
            .is_some());
        assert!(r.denies_jwt("spiffe://td/a", None, None).is_some());
        assert!(r
            .denies_jwt("spiffe://td/b", Some("j2"), Some(now_unix()))
            .is_none());
        assert!(r.denies_serial("01:02") && !r.denies_serial("03"));

        let (added, removed) = r.replace(vec![]);
        assert!(added.is_empty());
        assert_eq!(removed, vec!["spiffe://td/a"]);
        assert!(r.denies_jwt("spiffe://td/a", Some("j1"), Some(1)).is_none());
        r.replace(vec![rev]);
        assert!(r.undo("spiffe://td/a"));
        assert!(!r.undo("spiffe://td/a"));
        assert!(!r.denies_serial("01:02"), "lifted with the revocation");
    }

    #[test]
    fn an_ended_workload_s_credentials_are_denied_until_they_expire_and_only_those() {
        let r = Revocations::default();
        let now = now_unix();
        let gone = WorkloadLedger::default();
        gone.record_jwt("j-gone", now + 300);
        gone.record_jwt("j-expired", now - 1);
        gone.record_x509("s-gone", now + 3600);
        let replica = WorkloadLedger::default();
        replica.record_jwt("j-replica", now + 300);
        assert!(r
            .workload_ended(
                "spiffe://td/a",
                "c1".into(),
                &WorkloadLedger::default().live()
            )
            .is_none());
        let e = r
            .workload_ended("spiffe://td/a", "container c1".into(), &gone.live())
            .unwrap();
        assert_eq!(e.jtis, vec!["j-gone"]);
        assert_eq!(e.serials, vec!["s-gone"]);
        let ended = e.ended.as_ref().unwrap();
        assert_eq!(ended.expires_at, now + 3600);
        assert!(e.key().starts_with("ended/"));
        assert!(r
            .denies_jwt("spiffe://td/a", Some("j-gone"), Some(now))
            .is_some());
        assert!(r.denies_serial("s-gone"));
        // The identity itself is not revoked: its other workloads go on.
        assert!(!r.is_revoked("spiffe://td/a"));
        assert!(r
            .denies_jwt("spiffe://td/a", Some("j-replica"), Some(now))
            .is_none());
        // Another node learns it through the store; it names no identity to notify.
        let other = Revocations::default();
        let (added, removed) = other.replace(r.snapshot());
        assert!(added.is_empty() && removed.is_empty());
        assert!(other
            .denies_jwt("spiffe://td/a", Some("j-gone"), None)
            .is_some());
        assert!(r.prune_ended().is_empty(), "not expired yet");
        // Saved at shutdown and restored: expired credentials are dropped.
        let saved = gone.live();
        assert_eq!(saved.jtis.len(), 1);
        let restored = WorkloadLedger::restored(saved.clone());
        assert_eq!(restored.live(), saved);
    }

    #[test]
    fn expired_ended_entries_are_pruned() {
        let r = Revocations::default();
        let mut l = Ledger::default();
        l.jtis.push_back(Issued {
            id: "j".into(),
            expires_at: now_unix() + 1,
        });
        let e = r.workload_ended("spiffe://td/a", "c".into(), &l).unwrap();
        let mut list = r.snapshot();
        list[0].ended.as_mut().unwrap().expires_at = now_unix() - 1;
        r.replace(list);
        assert_eq!(r.prune_ended(), vec![e.key()]);
        assert!(r.snapshot().is_empty());
        assert!(r.denies_jwt("spiffe://td/a", Some("j"), None).is_none());
    }
}
