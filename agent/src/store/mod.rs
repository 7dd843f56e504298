//! The central store behind one interface: secrets (versioned values) and the revocation list.
//! `embedded` keeps both sealed in the state dir; `openbao` keeps them in OpenBao/Vault KV v2 so
//! every node shares them.

pub mod embedded;
pub mod openbao;
pub mod sealed_cache;

use nhi_core::wire::{Revocation, SecretInfo};
use zeroize::Zeroizing;

pub use embedded::EmbeddedStore;
pub use openbao::BaoStore;

/// A secret's current version.
#[derive(Clone)]
pub struct Stored {
    pub version: u64,
    pub updated_at: u64,
    pub value: Zeroizing<Vec<u8>>,
    /// When this value was read from the store of record (unix): now, or earlier for a copy
    /// from the sealed cache. Whoever serves it may do so until `fetched_at + secret_ttl`.
    pub fetched_at: u64,
    /// Served from the sealed cache because OpenBao was unreachable.
    pub from_cache: bool,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("version", &self.version)
            .field("updated_at", &self.updated_at)
            .field("value", &"<redacted>")
            .field("fetched_at", &self.fetched_at)
            .field("from_cache", &self.from_cache)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no secret named {0:?}")]
    NotFound(String),
    #[error(
        "{0:?} is not a valid secret name (ASCII letters, digits, '.', '-', '_'; at most 128)"
    )]
    BadName(String),
    #[error("secret store: {0}")]
    Io(String),
    #[error("secret store unavailable: {0}")]
    Unavailable(String),
}

pub enum Store {
    Embedded(EmbeddedStore),
    OpenBao(BaoStore),
}

impl Store {
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::OpenBao(_) => "openbao",
        }
    }

    /// The current version, from the store of record (`nhictl secret get`).
    pub async fn get(&self, name: &str) -> Result<Option<Stored>, StoreError> {
        check_name(name)?;
        match self {
            Store::Embedded(s) => s.get(name),
            Store::OpenBao(s) => s.get(name).await,
        }
    }

    /// [`get`](Self::get) for a workload: while OpenBao is unreachable, the copy in the sealed
    /// cache if it was fetched less than `secret_ttl` ago (`Stored::from_cache`).
    pub async fn get_for_workload(&self, name: &str) -> Result<Option<Stored>, StoreError> {
        check_name(name)?;
        match self {
            Store::Embedded(s) => s.get(name),
            Store::OpenBao(s) => s.get_or_cached(name).await,
        }
    }

    /// [`list`](Self::list) for delivering secret files: while OpenBao is unreachable, what
    /// the sealed cache can still serve.
    pub async fn list_for_workload(&self) -> Result<Vec<SecretInfo>, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.list()),
            Store::OpenBao(s) => {
                match s.list().await {
                    Err(StoreError::Unavailable(e)) => {
                        tracing::warn!("secret store unavailable ({e}); delivering secrets from the sealed cache");
                        Ok(s.cache().secrets())
                    }
                    other => other,
                }
            }
        }
    }

    /// Stores a new version; `must_exist` refuses to create (rotate).
    pub async fn put(
        &self,
        name: &str,
        value: Zeroizing<Vec<u8>>,
        must_exist: bool,
    ) -> Result<u64, StoreError> {
        check_name(name)?;
        match self {
            Store::Embedded(s) => s.put(name, value, must_exist),
            Store::OpenBao(s) => s.put(name, value, must_exist).await,
        }
    }

    /// Names and versions, never values.
    pub async fn list(&self) -> Result<Vec<SecretInfo>, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.list()),
            Store::OpenBao(s) => s.list().await,
        }
    }

    pub async fn remove(&self, name: &str) -> Result<(), StoreError> {
        check_name(name)?;
        match self {
            Store::Embedded(s) => s.remove(name),
            Store::OpenBao(s) => s.remove(name).await,
        }
    }

    pub async fn load_revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        match self {
            Store::Embedded(s) => s.load_revocations(),
            Store::OpenBao(s) => s.load_revocations().await,
        }
    }

    /// Adds or replaces the deny-list entry `r.key()`.
    pub async fn put_revocation(&self, r: &Revocation) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => {
                let mut list = s.load_revocations()?;
                let key = r.key();
                list.retain(|x| x.key() != key);
                list.push(r.clone());
                s.save_revocations(&list)
            }
            Store::OpenBao(s) => s.put_revocation(r).await,
        }
    }

    /// Removes the deny-list entry `key` (see `Revocation::key`).
    pub async fn remove_revocation(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => {
                let mut list = s.load_revocations()?;
                list.retain(|x| x.key() != key);
                s.save_revocations(&list)
            }
            Store::OpenBao(s) => s.remove_revocation(key).await,
        }
    }
}

fn check_name(name: &str) -> Result<(), StoreError> {
    if nhi_core::grant::valid_secret_name(name) {
        Ok(())
    } else {
        Err(StoreError::BadName(name.into()))
    }
}
