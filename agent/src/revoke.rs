//! Revocation: the deny list and the ledger of credentials this node issued.
//!
//! Revoking an identity stops issuance for it, makes its companions drop every cached credential,
//! and puts what was already issued on the deny list: every `jti` / certificate serial this
//! node's ledger holds for it, plus a cut-off time (`revoked_at`) that catches credentials the
//! ledger no longer knows (issued before a restart, or on another node).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use nhi_core::wire::Revocation;

use crate::issuer::now_unix;

/// Most credentials remembered per identity; the oldest go first (the cut-off still covers them).
const LEDGER_PER_IDENTITY: usize = 4096;

#[derive(Clone)]
struct Issued {
    id: String,
    expires_at: u64,
}

#[derive(Default)]
struct Ledger {
    jtis: VecDeque<Issued>,
    serials: VecDeque<Issued>,
}

#[derive(Default)]
pub struct Revocations {
    list: Mutex<BTreeMap<String, Revocation>>,
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

fn live(q: &VecDeque<Issued>) -> Vec<String> {
    let now = now_unix();
    q.iter()
        .filter(|i| i.expires_at > now)
        .map(|i| i.id.clone())
        .collect()
}

impl Revocations {
    pub fn new(list: Vec<Revocation>) -> Self {
        let r = Revocations::default();
        r.replace(list);
        r
    }

    fn list(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Revocation>> {
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
        self.list().contains_key(spiffe_id)
    }

    /// Adds (or refreshes) the revocation of `spiffe_id` and returns it.
    pub fn revoke(&self, spiffe_id: &str) -> Revocation {
        let (jtis, serials) = self
            .ledger()
            .get(spiffe_id)
            .map(|l| (live(&l.jtis), live(&l.serials)))
            .unwrap_or_default();
        let mut list = self.list();
        let r = list
            .entry(spiffe_id.to_string())
            .or_insert_with(|| Revocation {
                spiffe_id: spiffe_id.into(),
                revoked_at: 0,
                jtis: Vec::new(),
                serials: Vec::new(),
            });
        r.revoked_at = now_unix();
        for j in jtis {
            if !r.jtis.contains(&j) {
                r.jtis.push(j);
            }
        }
        for s in serials {
            if !r.serials.contains(&s) {
                r.serials.push(s);
            }
        }
        r.clone()
    }

    /// Lifts the revocation; `false` if there was none.
    pub fn undo(&self, spiffe_id: &str) -> bool {
        self.list().remove(spiffe_id).is_some()
    }

    pub fn snapshot(&self) -> Vec<Revocation> {
        self.list().values().cloned().collect()
    }

    /// Replaces the list (loaded from the store); returns the identities newly revoked and the
    /// ones no longer revoked.
    pub fn replace(&self, new: Vec<Revocation>) -> (Vec<String>, Vec<String>) {
        let mut list = self.list();
        let new: BTreeMap<String, Revocation> =
            new.into_iter().map(|r| (r.spiffe_id.clone(), r)).collect();
        let added = new
            .keys()
            .filter(|k| !list.contains_key(*k))
            .cloned()
            .collect();
        let removed = list
            .keys()
            .filter(|k| !new.contains_key(*k))
            .cloned()
            .collect();
        *list = new;
        (added, removed)
    }

    /// Why a JWT with these claims is refused, if it is.
    pub fn denies_jwt(&self, sub: &str, jti: Option<&str>, iat: Option<u64>) -> Option<String> {
        let list = self.list();
        if let Some(jti) = jti {
            if list.values().any(|r| r.jtis.iter().any(|j| j == jti)) {
                return Some(format!("token {jti} is on the deny list"));
            }
        }
        let r = list.get(sub)?;
        // Issued at or before the revocation (or no iat at all): refused.
        if iat.is_none_or(|iat| iat <= r.revoked_at) {
            return Some(format!("{sub} was revoked at {}", r.revoked_at));
        }
        None
    }

    pub fn denies_serial(&self, serial: &str) -> bool {
        self.list()
            .values()
            .any(|r| r.serials.iter().any(|s| s == serial))
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
    }
}
