//! Encryption at rest for the issuer's private keys.
//!
//! A 32-byte master key lives in its own root-only file (0400, by default
//! `<state_dir>/master.key`, movable to other storage with `issuer.key_file`). Sealed blobs are
//! XChaCha20-Poly1305 with a random 192-bit nonce and an associated-data label that binds a blob
//! to its purpose, in a small versioned JSON envelope. Writes are atomic (temp file, fsync,
//! rename, fsync of the directory), so a crash never leaves a half-written key.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use nhi_core::atomic_file;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("master key {path} must be exactly 32 bytes (found {len})")]
    BadKeyLength { path: PathBuf, len: u64 },
    #[error(
        "master key {path} is readable by group or others (mode {mode:o}); it must be 0400 or 0600"
    )]
    KeyTooOpen { path: PathBuf, mode: u32 },
    #[error("master key {path} must be owned by uid {expected} (is owned by {found})")]
    KeyOwner {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error("{path}: cannot decrypt: wrong master key or the file was modified")]
    Decrypt { path: PathBuf },
    #[error("{path}: not a sealed nhi file: {message}")]
    Format { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeystoreError + '_ {
    move |source| KeystoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The key that seals everything else. Wiped from memory on drop.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    /// Loads the master key, checking it is private to its owner, which must be us.
    pub fn load(path: &Path) -> Result<Self, KeystoreError> {
        let mut f = File::open(path).map_err(io_err(path))?;
        let meta = f.metadata().map_err(io_err(path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeystoreError::KeyTooOpen {
                path: path.into(),
                mode,
            });
        }
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(KeystoreError::KeyOwner {
                path: path.into(),
                expected: me,
                found: meta.uid(),
            });
        }
        if meta.len() != 32 {
            return Err(KeystoreError::BadKeyLength {
                path: path.into(),
                len: meta.len(),
            });
        }
        let mut k = Zeroizing::new([0u8; 32]);
        f.read_exact(&mut k[..]).map_err(io_err(path))?;
        Ok(MasterKey(k))
    }

    /// Creates a fresh random master key at `path` (mode 0400). Fails if the file exists.
    pub fn create(path: &Path) -> Result<Self, KeystoreError> {
        let mut k = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut k[..]).map_err(|e| KeystoreError::Io {
            path: path.into(),
            source: std::io::Error::other(e),
        })?;
        if let Some(dir) = path.parent() {
            create_private_dir(dir)?;
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(path)
            .map_err(io_err(path))?;
        f.write_all(&k[..]).map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))?;
        atomic_file::sync_parent(path).map_err(io_err(path))?;
        Ok(MasterKey(k))
    }

    pub fn seal(&self, label: &str, plaintext: &[u8]) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new((&*self.0).into());
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).expect("the OS random source failed");
        let ct = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: label.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let env = Envelope {
            version: 1,
            alg: ALG.into(),
            label: label.into(),
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(ct),
        };
        let mut out = serde_json::to_vec_pretty(&env).expect("envelope serializes");
        out.push(b'\n');
        out
    }

    pub fn open(&self, path: &Path, label: &str, sealed: &[u8]) -> Result<Vec<u8>, KeystoreError> {
        let fmt = |message: String| KeystoreError::Format {
            path: path.into(),
            message,
        };
        let env: Envelope = serde_json::from_slice(sealed).map_err(|e| fmt(e.to_string()))?;
        if env.version != 1 || env.alg != ALG {
            return Err(fmt(format!(
                "unsupported version {} / alg {}",
                env.version, env.alg
            )));
        }
        if env.label != label {
            return Err(fmt(format!("holds {:?}, expected {:?}", env.label, label)));
        }
        let nonce = B64.decode(&env.nonce).map_err(|e| fmt(e.to_string()))?;
        if nonce.len() != 24 {
            return Err(fmt("bad nonce length".into()));
        }
        let ct = B64
            .decode(&env.ciphertext)
            .map_err(|e| fmt(e.to_string()))?;
        XChaCha20Poly1305::new((&*self.0).into())
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &ct,
                    aad: label.as_bytes(),
                },
            )
            .map_err(|_| KeystoreError::Decrypt { path: path.into() })
    }
}

const ALG: &str = "XChaCha20-Poly1305";

#[derive(Serialize, Deserialize)]
struct Envelope {
    version: u32,
    alg: String,
    label: String,
    nonce: String,
    ciphertext: String,
}

/// Creates `dir` (and parents) and makes it 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), KeystoreError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
            // The umask may have narrowed it further; never widen an existing directory.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
        }
        Err(e) => Err(io_err(dir)(e)),
        // An existing directory is the operator's: checked, never re-moded (it may be /etc/nhi).
        Ok(m) if !m.is_dir() => Err(io_err(dir)(std::io::Error::other("not a directory"))),
        Ok(m) if m.mode() & 0o022 != 0 || m.uid() != nix::unistd::geteuid().as_raw() => {
            Err(io_err(dir)(std::io::Error::other(format!(
                "must be owned by nhid's user and not writable by group or others (mode {:o}, uid {})",
                m.mode() & 0o7777,
                m.uid()
            ))))
        }
        Ok(_) => Ok(()),
    }
}

/// Replaces `path` with `data` with `mode`, durably (file and directory synced).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), KeystoreError> {
    let opts = atomic_file::Options {
        mode: atomic_file::Mode::Fixed(mode),
        ..atomic_file::Options::PRIVATE_DURABLE
    };
    atomic_file::replace(path, data, &opts).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper_detection() {
        let dir = tempfile::tempdir().unwrap();
        let kp = dir.path().join("k/master.key");
        let k = MasterKey::create(&kp).unwrap();
        assert_eq!(
            fs::metadata(&kp).unwrap().permissions().mode() & 0o777,
            0o400
        );
        assert!(MasterKey::create(&kp).is_err(), "never overwrites a key");
        let sealed = k.seal("nhi/test", b"top secret");
        assert!(!String::from_utf8_lossy(&sealed).contains("top secret"));
        let p = Path::new("x");
        assert_eq!(k.open(p, "nhi/test", &sealed).unwrap(), b"top secret");
        assert!(matches!(
            k.open(p, "nhi/other", &sealed),
            Err(KeystoreError::Format { .. })
        ));

        let mut env: Envelope = serde_json::from_slice(&sealed).unwrap();
        let mut ct = B64.decode(&env.ciphertext).unwrap();
        ct[0] ^= 1;
        env.ciphertext = B64.encode(ct);
        let tampered = serde_json::to_vec(&env).unwrap();
        assert!(matches!(
            k.open(p, "nhi/test", &tampered),
            Err(KeystoreError::Decrypt { .. })
        ));

        let k2 = MasterKey::load(&kp).unwrap();
        assert_eq!(k2.open(p, "nhi/test", &sealed).unwrap(), b"top secret");
        let other = MasterKey::create(&dir.path().join("other.key")).unwrap();
        assert!(matches!(
            other.open(p, "nhi/test", &sealed),
            Err(KeystoreError::Decrypt { .. })
        ));
    }

    #[test]
    fn loose_key_permissions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kp = dir.path().join("master.key");
        MasterKey::create(&kp).unwrap();
        fs::set_permissions(&kp, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            MasterKey::load(&kp),
            Err(KeystoreError::KeyTooOpen { .. })
        ));
        fs::set_permissions(&kp, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&kp, b"short").unwrap();
        assert!(matches!(
            MasterKey::load(&kp),
            Err(KeystoreError::BadKeyLength { .. })
        ));
    }

    #[test]
    fn atomic_write_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
