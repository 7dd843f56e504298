//! The central store behind one interface: secrets (versioned values) and the revocation list.
//! `embedded` keeps both sealed in the state dir; `openbao` keeps them in OpenBao/Vault KV v2 so
//! every node shares them.

pub mod embedded;
pub mod openbao;

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
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("version", &self.version)
            .field("updated_at", &self.updated_at)
            .field("value", &"<redacted>")
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

    pub async fn get(&self, name: &str) -> Result<Option<Stored>, StoreError> {
        check_name(name)?;
        match self {
            Store::Embedded(s) => s.get(name),
            Store::OpenBao(s) => s.get(name).await,
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
