//! Attachments on disk, so a restarted `nhid` (upgrade, crash) brings the companions of
//! still-running containers back instead of leaving them without identity.
//!
//! One small JSON file per network namespace under `<state_dir>/attachments/`, holding only
//! what the runtime attested (container ids, init pid + start time, the uid each runs as, the
//! workload metadata, the rule and SPIFFE ID), the companion's uid, and at shutdown the `jti`s
//! and serials its companion was issued (to deny them if the workload ends while `nhid` is
//! away): no keys, no tokens. Written with an atomic rename; not fsynced, because
//! a lost record only means that companion is not restored, and container starts should not
//! wait for the disk.

use std::fs;
use std::path::{Path, PathBuf};

use nhi_core::workload::HostUser;
use nhi_core::Workload;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub pid: i32,
    pub start_time: u64,
    /// Who its process runs as (owner of its `/run/nhi` files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<HostUser>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub netns_inode: u64,
    pub rule: String,
    /// `None` for a pod sandbox whose identity is still pending.
    pub spiffe_id: Option<String>,
    pub workload: Workload,
    pub containers: Vec<ContainerRecord>,
    /// The uid the companion runs as (kept across `nhid` restarts when still clean).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub companion_uid: Option<u32>,
    /// Credentials the companion was issued, saved at `nhid` shutdown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued: Option<crate::revoke::Ledger>,
}

pub struct Attachments {
    dir: PathBuf,
}

/// Writes `value` as JSON to `path`, mode 0600, atomically for readers (the old or the new
/// record, never a partial one); not fsynced (see the module docs).
pub fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let data = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let opts = nhi_core::atomic_file::Options {
        mode: nhi_core::atomic_file::Mode::Fixed(0o600),
        owner: None,
        durability: nhi_core::atomic_file::Durability::Rename,
    };
    nhi_core::atomic_file::replace(path, &data, &opts)
}

impl Attachments {
    pub fn new(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("attachments");
        fs::create_dir_all(&dir)?;
        Ok(Attachments { dir })
    }

    fn path(&self, inode: u64) -> PathBuf {
        self.dir.join(format!("{inode}.json"))
    }

    pub fn save(&self, r: &Record) {
        let path = self.path(r.netns_inode);
        if let Err(e) = write_json(&path, r) {
            tracing::warn!(
                "saving attachment {}: {e} (it will not survive an nhid restart)",
                path.display()
            );
        }
    }

    pub fn remove(&self, inode: u64) {
        let _ = fs::remove_file(self.path(inode));
    }

    /// Every readable record; unreadable ones are reported and removed.
    pub fn load_all(&self) -> Vec<Record> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                let _ = fs::remove_file(&p);
                continue;
            }
            match fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|d| serde_json::from_slice(&d).map_err(|e| e.to_string()))
            {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!("dropping unreadable attachment record {}: {e}", p.display());
                    let _ = fs::remove_file(&p);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_remove() {
        let d = tempfile::tempdir().unwrap();
        let s = Attachments::new(d.path()).unwrap();
        let r = Record {
            netns_inode: 42,
            rule: "r".into(),
            spiffe_id: Some("spiffe://td/x".into()),
            workload: Workload {
                container_id: "c".into(),
                ..Default::default()
            },
            containers: vec![ContainerRecord {
                id: "c".into(),
                pid: 7,
                start_time: 9,
                user: Some(HostUser {
                    uid: 1000,
                    gid: 1000,
                }),
            }],
            companion_uid: Some(1879048192),
            issued: None,
        };
        s.save(&r);
        s.save(&r);
        fs::write(d.path().join("attachments/bad.json"), "{").unwrap();
        assert_eq!(s.load_all(), vec![r]);
        assert!(
            !d.path().join("attachments/bad.json").exists(),
            "unreadable records are dropped"
        );
        s.remove(42);
        assert!(s.load_all().is_empty());
        // Records written before companion uids and container users load.
        fs::write(
            d.path().join("attachments/1.json"),
            r#"{"netns_inode":1,"rule":"r","spiffe_id":null,"workload":{"container_id":"c"},"containers":[{"id":"c","pid":7,"start_time":9}]}"#,
        )
        .unwrap();
        let old = s.load_all();
        assert_eq!(old[0].companion_uid, None);
        assert_eq!(old[0].containers[0].user, None);
    }
}
