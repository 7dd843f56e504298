//! After a restart: the attachments on disk brought back, companions that kept running
//! re-adopted, the others started again, and what ended meanwhile denied.

use super::*;

impl Agent {
    /// After a restart: brings back the companions (and pod reservations) of containers that
    /// still run, if the current config still gives them the same identity: companions that
    /// kept running are re-adopted (`crate::adopt`), the others started again. Everything else
    /// is dropped: companions of namespaces not restored are stopped, and what the companions
    /// of workloads that ended meanwhile were issued goes on the deny list.
    pub async fn recover(&self) {
        use futures_util::StreamExt;
        let records = self.attachments.load_all();
        let total = records.len();
        let (range, binary) = self.companion_process();
        // Companions running now, whatever the records say.
        let strays = crate::adopt::running(range, &binary);
        // A few at a time: adopting is a connect and one exchange, a start waits for a hello.
        let restored: Vec<(u64, Attachment, Restored)> = futures_util::stream::iter(records)
            .map(|rec| self.restore(rec, &strays))
            .buffer_unordered(16)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        let (mut adopted, mut started) = (0, 0);
        let mut sockets: Vec<(String, i32)> = Vec::new();
        let mut reg = self.registry.lock().await;
        for (inode, attachment, how) in restored {
            match how {
                Restored::Adopted => adopted += 1,
                Restored::Started => started += 1,
                Restored::Reserved => {}
            }
            for (c, p) in &attachment.containers {
                reg.netns_of.insert(c.clone(), inode);
                sockets.push((c.clone(), p.pid));
            }
            reg.by_netns.insert(inode, attachment);
            self.sync(&reg, inode);
        }
        let keep: HashSet<u64> = reg
            .by_netns
            .iter()
            .filter(|(_, a)| a.running.is_some())
            .map(|(i, _)| *i)
            .collect();
        let kept = reg.by_netns.len();
        drop(reg);
        // Every container's Workload API socket bound anew and handed to its companion (a
        // re-adopted one replaces the listener it kept serving meanwhile), its AWS token file
        // rewritten.
        for (c, pid) in sockets {
            self.give_workload_socket(&c, pid).await;
        }
        crate::workload_socket::clear_stale(&self.ctx.config.store.containers_dir);
        // Companions left running for namespaces that are not restored: their containers are
        // gone (or the config changed their identity). Only the recorded process is stopped.
        let mut stopped = 0;
        for inode in self.ctx.companions.inodes() {
            if keep.contains(&inode) {
                continue;
            }
            if let Some(rec) = self.ctx.companions.load(inode) {
                if crate::adopt::stop_recorded(&rec, Duration::from_secs(2)).await {
                    tracing::info!(
                        netns = inode,
                        pid = rec.pid,
                        "stopped a companion whose workload is gone"
                    );
                    stopped += 1;
                }
            }
        }
        self.ctx.companions.clear_except(&keep);
        // Any other companion process (no usable record) is nobody's now. (Scanned before the
        // registry is read: a companion respawned meanwhile is in the registry, not the scan.)
        let found = crate::adopt::running(range, &binary);
        let serving: HashSet<i32> = {
            let reg = self.registry.lock().await;
            reg.by_netns
                .values()
                .filter_map(|a| a.running.as_ref().map(|r| r.companion.pid()))
                .collect()
        };
        let others: Vec<ProcRef> = found
            .into_values()
            .flatten()
            .filter(|p| !serving.contains(&p.pid))
            .collect();
        stopped += others.len();
        crate::adopt::stop_all(others, Duration::from_secs(2)).await;
        if total > 0 || stopped > 0 {
            tracing::info!(
                records = total,
                restored = kept,
                adopted,
                started,
                stopped,
                "attachments recovered"
            );
        }
    }

    /// The uid range and binary (as `/proc/<pid>/exe` names it) companion processes run with.
    fn companion_process(&self) -> (nhi_core::config::UidRange, std::path::PathBuf) {
        let binary = &self.ctx.config.companion.binary;
        let exe = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.clone());
        (self.ctx.uids.range(), exe)
    }

    /// One attachment record after a restart; `None`: dropped. `strays`: companion processes
    /// running before recovery, by network namespace.
    async fn restore(
        &self,
        mut rec: Record,
        strays: &HashMap<u64, Vec<ProcRef>>,
    ) -> Option<(u64, Attachment, Restored)> {
        // Records written before `{node.name}` existed: it is this node's, as at attach.
        rec.workload
            .node
            .get_or_insert_with(|| self.ctx.config.node_name.clone());
        // Records written before the token's path was kept: find it again, so the pod's
        // renewals still show OpenBao its proof.
        if let Some(k) = rec.workload.k8s.as_mut() {
            if k.token_path.is_none() && k.service_account.is_some() {
                k.token_path = find_projected_token(&self.ctx.config.kubernetes.kubelet_root, k);
                if k.token_path.is_none() {
                    tracing::warn!(pod = ?k.pod_uid, "no projected service-account token found for a restored pod: its SVID renewals will be refused until it restarts");
                }
            }
        }
        let inode = rec.netns_inode;
        let alive: BTreeMap<String, ProcRef> = rec
            .containers
            .iter()
            .map(|c| {
                (
                    c.id.clone(),
                    ProcRef {
                        pid: c.pid,
                        start_time: c.start_time,
                    },
                )
            })
            .filter(|(_, p)| p.alive())
            .collect();
        let ns = alive
            .values()
            .find_map(|p| NetNs::of_pid(p.pid).ok().filter(|n| n.inode == inode));
        let (Some(ns), false) = (ns, alive.is_empty()) else {
            self.ended_while_away(&rec).await;
            self.attachments.remove(inode);
            return None;
        };
        let cfg = &self.ctx.config;
        let Some(rule) = select(cfg, &rec.workload).ok().flatten() else {
            tracing::warn!(
                netns = inode,
                "not restoring an attachment the config no longer selects"
            );
            self.attachments.remove(inode);
            return None;
        };
        let mut attachment = Attachment::new(&rule.name, rec.workload.clone());
        attachment.users = rec
            .containers
            .iter()
            .filter(|c| alive.contains_key(&c.id))
            .filter_map(|c| c.user.map(|u| (c.id.clone(), u)))
            .collect();
        attachment.containers = alive;
        let Some(id) = &rec.spiffe_id else {
            attachment.netns = Some(ns);
            return Some((inode, attachment, Restored::Reserved));
        };
        let rendered = rule.spiffe_id.render(&cfg.trust_domain, &rec.workload);
        let Some(spiffe_id) = rendered.ok().filter(|r| r.as_str() == id) else {
            tracing::warn!(netns = inode, spiffe_id = %id, "the config now gives another identity; not restoring its companion");
            self.attachments.remove(inode);
            return None;
        };
        let mut identity = Identity::new(spiffe_id, rule.name.clone(), rec.workload.clone());
        if let Some(l) = rec.issued.clone() {
            identity.issued = crate::revoke::WorkloadLedger::restored(l);
        }
        let identity = Arc::new(identity);
        let pid = attachment.containers.values().next().map(|p| p.pid);
        // The companion that kept serving while nhid was away, if it is still the one recorded
        // and proves itself (keeping its uid); otherwise a new one.
        let mut how = Restored::Started;
        let mut companion = None;
        if let Some(crec) = self.ctx.companions.load(inode) {
            if !self.ctx.uids.adopt(crec.uid) {
                tracing::warn!(netns = inode, uid = crec.uid, "the recorded companion's uid is outside companion.uid_range or taken; starting a new companion");
            } else {
                let aws_token = self.recorded_aws_token(&identity, attachment.containers.keys());
                let adopted = match ns.try_clone() {
                    Ok(ns2) => {
                        supervisor::adopt(self.ctx.clone(), identity.clone(), ns2, &crec, aws_token)
                            .await
                    }
                    Err(e) => Err(format!("network namespace: {e}")),
                };
                match adopted {
                    Ok(c) => {
                        how = Restored::Adopted;
                        companion = Some(c);
                    }
                    Err(e) => {
                        self.ctx.uids.release(crec.uid);
                        tracing::warn!(netns = inode, spiffe_id = %id, pid = crec.pid, "not re-adopting the running companion ({e}); starting a new one")
                    }
                }
            }
        }
        let companion = match companion {
            Some(c) => c,
            None => {
                // Whatever still runs there (a companion without a usable record) holds the
                // ports the new one needs.
                if let Some(p) = strays.get(&inode) {
                    crate::adopt::stop_all(p.iter().copied(), Duration::from_secs(2)).await;
                }
                // Its former uid if nothing uses it any more, else a fresh one.
                let uid = match rec.companion_uid.filter(|u| self.ctx.uids.claim(*u)) {
                    Some(uid) => Ok(uid),
                    None => self.ctx.uids.allocate(),
                };
                let started = match uid {
                    Ok(uid) => supervisor::start(self.ctx.clone(), identity.clone(), ns, uid).await,
                    Err(e) => Err(e),
                };
                match started {
                    Ok(c) => {
                        tracing::info!(netns = inode, spiffe_id = %id, companion_pid = c.pid(), companion_uid = c.uid(), "companion restored after restart");
                        c
                    }
                    Err(e) => {
                        tracing::error!(netns = inode, spiffe_id = %id, "restoring companion: {e}");
                        self.attachments.remove(inode);
                        return None;
                    }
                }
            }
        };
        // Rules as the current policy says (they stayed in place meanwhile).
        let edge = match pid {
            Some(pid) => crate::edge::install(&self.ctx, &identity, pid, None)
                .await
                .unwrap_or_else(|e| {
                    tracing::error!(netns = inode, spiffe_id = %id, "restoring edge policy: {e}");
                    None
                }),
            None => None,
        };
        attachment.running = Some(Running {
            identity,
            companion,
            edge,
        });
        Some((inode, attachment, how))
    }

    /// The AWS container-credential token a re-adopted companion already checks requests
    /// against: the one its containers' `/run/nhi/aws-token` files hold (written by the
    /// previous `nhid`). `None` when the rule names no AWS source or no file holds one (then
    /// the companion gets a fresh token with its re-adoption, and the files are rewritten).
    fn recorded_aws_token<'a>(
        &self,
        identity: &Identity,
        containers: impl Iterator<Item = &'a String>,
    ) -> Option<zeroize::Zeroizing<String>> {
        let rule = self.ctx.config.rule(&identity.rule)?;
        rule.aws_credentials.as_ref()?;
        let dir = &self.ctx.config.store.containers_dir;
        let token = containers
            .filter_map(|c| crate::secrets::container_dir(dir, c))
            .find_map(|d| crate::workload_socket::read_aws_token(&d))
            .unwrap_or_else(crate::workload_socket::new_token);
        Some(token)
    }

    /// A workload whose containers all ended while `nhid` was away: what its companion was
    /// issued (saved at the last shutdown) goes on the deny list.
    async fn ended_while_away(&self, rec: &Record) {
        let (Some(id), Some(issued)) = (&rec.spiffe_id, &rec.issued) else {
            return;
        };
        let Ok(spiffe_id) = nhi_core::SpiffeId::parse(id) else {
            return;
        };
        let mut identity = Identity::new(spiffe_id, rec.rule.clone(), rec.workload.clone());
        identity.issued = crate::revoke::WorkloadLedger::restored(issued.clone());
        let ids: Vec<String> = rec.containers.iter().map(|c| c.id.clone()).collect();
        self.workload_ended(&identity, &ids).await;
    }
}

/// How an attachment came back after a restart.
enum Restored {
    Adopted,
    Started,
    Reserved,
}

/// The kubelet-projected token of pod `k` that names its service account, if one is found
/// beneath `<kubelet_root>/pods/<uid>/volumes/kubernetes.io~projected/*/token`.
fn find_projected_token(
    kubelet_root: &std::path::Path,
    k: &nhi_core::workload::K8s,
) -> Option<std::path::PathBuf> {
    let (uid, ns, sa) = (
        k.pod_uid.as_ref()?,
        k.namespace.as_ref()?,
        k.service_account.as_ref()?,
    );
    // The uid comes from the pod's annotations: one plain path segment, or nothing is looked at.
    if !nhi_core::grant::valid_secret_name(uid) {
        return None;
    }
    let dir = kubelet_root
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~projected");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path().join("token"))
        .find(|p| {
            nhi_core::k8s::read_projected_token(kubelet_root, p, uid)
                .ok()
                .and_then(|t| nhi_core::k8s::service_account(&t, ns, uid).ok())
                .is_some_and(|found| &found == sa)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn token(ns: &str, sa: &str, uid: &str) -> String {
        let claims = serde_json::json!({
            "iss": "k8s", "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa}, "pod": {"name": "p", "uid": uid}},
        });
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            b.encode(r#"{"alg":"RS256"}"#),
            b.encode(claims.to_string())
        )
    }

    #[test]
    fn a_restored_pod_finds_its_projected_token_again() {
        let d = tempfile::tempdir().unwrap();
        let vols = d.path().join("pods/u1/volumes/kubernetes.io~projected");
        for (v, sa) in [("other", "db"), ("kube-api-access-1", "web")] {
            std::fs::create_dir_all(vols.join(v)).unwrap();
            std::fs::write(vols.join(v).join("token"), token("prod", sa, "u1")).unwrap();
        }
        let mut k = nhi_core::workload::K8s {
            namespace: Some("prod".into()),
            pod_uid: Some("u1".into()),
            service_account: Some("web".into()),
            ..Default::default()
        };
        assert_eq!(
            find_projected_token(d.path(), &k),
            Some(vols.join("kube-api-access-1/token"))
        );
        k.service_account = Some("admin".into());
        assert_eq!(find_projected_token(d.path(), &k), None);
        k.pod_uid = Some("u2".into());
        assert_eq!(find_projected_token(d.path(), &k), None);
        // A uid that is not one path segment is not followed out of the kubelet root.
        k.service_account = Some("web".into());
        for evil in ["../../pods/u1", "..", "u1/../u1"] {
            k.pod_uid = Some(evil.into());
            assert_eq!(find_projected_token(d.path(), &k), None, "{evil}");
        }
    }
}
