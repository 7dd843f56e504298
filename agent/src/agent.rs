//! The daemon's answers to the agent API (attach / detach / status) and what carries them out:
//! the registry's transitions are decided by `crate::registry` (pure, unit-tested); this module
//! holds it under a lock, starts and stops companions, persists attachment records
//! (`crate::persist`) and brings them back after a restart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use nhi_core::select::select;
use nhi_core::wire::{AgentRequest, AgentResponse, Status, WorkloadStatus};
use nhi_core::workload::HostUser;
use nhi_core::Workload;
use tokio::sync::Mutex;

use crate::netns::{NetNs, ProcRef};
use crate::persist::{ContainerRecord, Record, Store};
use crate::registry::{Arrival, Left, Serving, Step};
use crate::supervisor::{self, CompanionHandle, Ctx, Identity};

pub(crate) struct Running {
    pub(crate) identity: Arc<Identity>,
    pub(crate) companion: CompanionHandle,
    /// Our edge-policy rules in the namespace, when the identity has a policy.
    pub(crate) edge: Option<crate::edge::Installed>,
}

pub(crate) type Attachment = crate::registry::Attachment<NetNs, ProcRef, Running>;
pub(crate) type Registry = crate::registry::Registry<NetNs, ProcRef, Running>;

impl Serving for Running {
    fn spiffe_id(&self) -> &nhi_core::SpiffeId {
        &self.identity.spiffe_id
    }

    fn companion_pid(&self) -> i32 {
        self.companion.pid()
    }
}

impl Attachment {
    /// The owner of container `cid`'s `/run/nhi` files.
    pub(crate) fn owner_of(&self, cid: &str, pid: i32) -> std::io::Result<HostUser> {
        crate::secrets::owner(self.users.get(cid).copied(), pid)
    }
}

pub struct Agent {
    pub(crate) ctx: Arc<Ctx>,
    host_netns: u64,
    /// Held only for short edits, never across a companion start.
    pub(crate) registry: Mutex<Registry>,
    /// One start at a time per network namespace (keeps "one companion per namespace" true)
    /// without making other containers' starts and stops wait for it.
    starting: std::sync::Mutex<HashMap<u64, Arc<Mutex<()>>>>,
    /// Attachments on disk, restored by [`Agent::recover`] after a restart.
    store: Store,
    /// What is degraded (central store unreachable, ...), for `nhictl status`.
    pub(crate) degraded: std::sync::Mutex<Vec<String>>,
    /// Serializes revocation changes with the store poll, so a poll that read the list just
    /// before a local revocation was saved never lifts it.
    pub(crate) revocation_sync: Mutex<()>,
}

impl Agent {
    pub fn new(ctx: Arc<Ctx>) -> std::io::Result<Self> {
        let store = Store::new(&ctx.config.state_dir)?;
        Ok(Agent {
            store,
            ctx,
            host_netns: NetNs::own()?.inode,
            registry: Mutex::new(Registry::default()),
            starting: std::sync::Mutex::new(HashMap::new()),
            degraded: std::sync::Mutex::new(Vec::new()),
            revocation_sync: Mutex::new(()),
        })
    }

    pub async fn handle(&self, req: AgentRequest) -> AgentResponse {
        let res = match req {
            AgentRequest::Attach {
                workload,
                pid,
                rule,
            } => {
                let cid = workload.container_id.clone();
                let res = self.attach(*workload, pid, &rule).await;
                if let Ok(AgentResponse::Attached { .. }) = &res {
                    // Secret files and the socket are in place before the workload's process
                    // starts.
                    self.deliver_files(&cid, pid).await;
                    self.give_workload_socket(&cid, pid).await;
                }
                res
            }
            AgentRequest::Detach { container_id } => {
                let res = self.detach(&container_id).await;
                crate::secrets::remove_container_dir(
                    &self.ctx.config.store.containers_dir,
                    &container_id,
                );
                Ok(res)
            }
            AgentRequest::Status => Ok(self.status().await),
            AgentRequest::SecretPut {
                name,
                value_b64,
                must_exist,
            } => self.secret_put(&name, value_b64, must_exist).await,
            AgentRequest::SecretGet { name } => self.secret_get(&name).await,
            AgentRequest::SecretList => self.secret_list().await,
            AgentRequest::SecretRm { name } => self.secret_rm(&name).await,
            AgentRequest::Revoke { target, undo } => self.revoke(target, undo).await,
            AgentRequest::Validate { token, audience } => self
                .ctx
                .validate(&token, &audience)
                .map(AgentResponse::Validated),
        };
        res.unwrap_or_else(|message| AgentResponse::Error { message })
    }

    async fn attach(
        &self,
        workload: Workload,
        pid: i32,
        hook_rule: &str,
    ) -> Result<AgentResponse, String> {
        let cfg = &self.ctx.config;
        let cid = workload.container_id.clone();
        let Some(rule) = select(cfg, &workload).map_err(|e| format!("container {cid}: {e}"))?
        else {
            if !hook_rule.is_empty() {
                tracing::warn!(container = %cid, hook_rule, "hook selected a rule but nhid's config selects none; is the hook reading another config?");
            }
            return Ok(AgentResponse::NotSelected);
        };
        let range = cfg.companion.uid_range;
        if let Some(u) = workload
            .user
            .filter(|u| range.contains(u.uid) || range.contains(u.gid))
        {
            return Err(format!(
                "container {cid} runs as uid {} gid {} (its process.user), inside companion.uid_range {range}: a workload never shares an id with a companion",
                u.uid, u.gid
            ));
        }
        if rule.name != hook_rule {
            tracing::warn!(container = %cid, hook_rule, rule = %rule.name, "hook and nhid picked different rules; using nhid's");
        }
        let sandbox = workload.is_k8s_sandbox();
        let spiffe_id = if sandbox {
            None
        } else {
            Some(
                rule.spiffe_id
                    .render(&cfg.trust_domain, &workload)
                    .map_err(|e| format!("container {cid}: {e}"))?,
            )
        };
        if pid <= 0 {
            return Err(format!("container {cid}: the runtime state has no pid"));
        }
        let proc_ref =
            ProcRef::of(pid).map_err(|e| format!("container {cid}: process {pid}: {e}"))?;
        let netns = NetNs::of_pid(pid)
            .map_err(|e| format!("container {cid}: network namespace of pid {pid}: {e}"))?;
        let inode = netns.inode;
        if inode == self.host_netns {
            return Err(format!(
                "container {cid} shares the host network namespace; nhi never attaches a companion there (give it its own network namespace)"
            ));
        }

        self.in_slot(
            inode,
            self.attach_locked(cid, workload, rule, spiffe_id, proc_ref, netns, pid),
        )
        .await
    }

    /// Runs `f` holding namespace `inode`'s slot: starts and stops of one namespace's companion
    /// never overlap (a new companion never races the old one for the port), while other
    /// namespaces' go on.
    async fn in_slot<T>(&self, inode: u64, f: impl std::future::Future<Output = T>) -> T {
        let slot = self
            .starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(inode)
            .or_default()
            .clone();
        let result = {
            let _one_at_a_time = slot.lock().await;
            f.await
        };
        let mut starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&slot) == 2 {
            starting.remove(&inode);
        }
        result
    }

    /// The attach proper, with this namespace's start slot held.
    #[allow(clippy::too_many_arguments)]
    async fn attach_locked(
        &self,
        cid: String,
        workload: Workload,
        rule: &nhi_core::Rule,
        spiffe_id: Option<nhi_core::SpiffeId>,
        proc_ref: ProcRef,
        netns: NetNs,
        pid: i32,
    ) -> Result<AgentResponse, String> {
        let inode = netns.inode;
        let user = workload.user;
        let arrival = |netns| Arrival {
            inode,
            container_id: &cid,
            process: proc_ref,
            netns,
            user,
            rule: &rule.name,
            workload: &workload,
            spiffe_id: spiffe_id.as_ref(),
        };
        let mut reg = self.registry.lock().await;
        let ns = match reg.attach(arrival(netns)) {
            Step::Reserved => {
                self.sync(&reg, inode);
                tracing::info!(container = %cid, netns = inode, "pod sandbox reserved; identity follows with its first app container");
                return Ok(AgentResponse::Reserved { netns_inode: inode });
            }
            Step::Joined { companion_pid } => {
                self.sync(&reg, inode);
                return Ok(AgentResponse::Attached {
                    spiffe_id: spiffe_id.map(|s| s.to_string()).unwrap_or_default(),
                    companion_pid,
                    netns_inode: inode,
                    joined: true,
                });
            }
            Step::Conflict { serving } => {
                let id = spiffe_id.map(|s| s.to_string()).unwrap_or_default();
                return Err(format!(
                    "container {cid} would be {id}, but its network namespace already serves {serving}; one network namespace has one identity"
                ));
            }
            Step::Start { netns } => netns,
        };
        let spiffe_id = spiffe_id.expect("only an identity starts a companion");
        let identity = Arc::new(Identity::new(
            spiffe_id.clone(),
            rule.name.clone(),
            workload.clone(),
        ));
        let uid = match self.ctx.uids.allocate() {
            Ok(uid) => uid,
            Err(e) => {
                reg.start_failed(inode, || Some(ns));
                self.sync(&reg, inode);
                return Err(format!("container {cid}: {e}"));
            }
        };
        // Start the companion without holding the registry: other containers keep starting
        // and stopping meanwhile.
        drop(reg);
        let started = match supervisor::start(self.ctx.clone(), identity.clone(), ns, uid).await {
            // Rules only once the companion listens: intercepted traffic never meets a closed port.
            Ok(c) => match crate::edge::install(&self.ctx, &identity, pid, None).await {
                Ok(edge) => Ok((c, edge)),
                Err(e) => {
                    c.stop().await;
                    Err(e)
                }
            },
            Err(e) => Err(e),
        };
        let mut reg = self.registry.lock().await;
        let (companion, edge) = match started {
            Ok(c) => c,
            Err(e) => {
                // Keep a reservation usable for the next app container.
                reg.start_failed(inode, || NetNs::of_pid(pid).ok());
                self.sync(&reg, inode);
                return Err(format!("container {cid}: {e}"));
            }
        };
        let companion_pid = companion.pid();
        tracing::info!(container = %cid, %spiffe_id, rule = %rule.name, netns = inode, companion_pid, "attached");
        reg.started(
            Arrival {
                inode,
                container_id: &cid,
                process: proc_ref,
                netns: (),
                user,
                rule: &rule.name,
                workload: &workload,
                spiffe_id: Some(&spiffe_id),
            },
            Running {
                identity,
                companion,
                edge,
            },
        );
        self.sync(&reg, inode);
        Ok(AgentResponse::Attached {
            spiffe_id: spiffe_id.to_string(),
            companion_pid,
            netns_inode: inode,
            joined: false,
        })
    }

    /// Gives the container its own Workload API socket (`/run/nhi/workload.sock`, owned by
    /// who its process runs as) and its AWS token file, if the injection path made it a
    /// `/run/nhi` directory, and hands the socket to its companion.
    async fn give_workload_socket(&self, container_id: &str, pid: i32) {
        let containers_dir = &self.ctx.config.store.containers_dir;
        let Some(dir) = crate::secrets::container_dir(containers_dir, container_id) else {
            return;
        };
        let reg = self.registry.lock().await;
        let Some(a) = reg
            .netns_of
            .get(container_id)
            .and_then(|i| reg.by_netns.get(i))
        else {
            return;
        };
        let Some(r) = &a.running else { return };
        let res = a.owner_of(container_id, pid).and_then(|owner| {
            crate::workload_socket::write_aws_token(&dir, r.companion.aws_token(), owner);
            crate::workload_socket::ContainerSocket::bind(&dir, owner)
        });
        match res {
            Ok(socket) => r.companion.add_socket(container_id, socket),
            Err(e) => {
                tracing::error!(container = %container_id, "workload API socket (TCP only): {e}")
            }
        }
    }

    /// The on-disk record of attachment `a` of namespace `inode`; with `ledger`, what its
    /// companion was issued (saved at shutdown).
    fn record(inode: u64, a: &Attachment, ledger: bool) -> Record {
        Record {
            netns_inode: inode,
            rule: a.rule.clone(),
            spiffe_id: a.running.as_ref().map(|r| r.identity.spiffe_id.to_string()),
            workload: a
                .running
                .as_ref()
                .map(|r| r.identity.workload.clone())
                .unwrap_or_else(|| a.first.clone()),
            containers: a
                .containers
                .iter()
                .map(|(id, p)| ContainerRecord {
                    id: id.clone(),
                    pid: p.pid,
                    start_time: p.start_time,
                    user: a.users.get(id).copied(),
                })
                .collect(),
            companion_uid: a.running.as_ref().map(|r| r.companion.uid()),
            issued: a
                .running
                .as_ref()
                .filter(|_| ledger)
                .map(|r| r.identity.issued.live()),
        }
    }

    /// Writes (or removes) the on-disk record of namespace `inode` from the registry.
    fn sync(&self, reg: &Registry, inode: u64) {
        match reg.by_netns.get(&inode) {
            Some(a) if !a.containers.is_empty() => self.store.save(&Self::record(inode, a, false)),
            _ => self.store.remove(inode),
        }
    }

    /// After a restart: brings back the companions (and pod reservations) of containers that
    /// still run, if the current config still gives them the same identity: companions that
    /// kept running are re-adopted (`crate::adopt`), the others started again. Everything else
    /// is dropped: companions of namespaces not restored are stopped, and what the companions
    /// of workloads that ended meanwhile were issued goes on the deny list.
    pub async fn recover(&self) {
        use futures_util::StreamExt;
        let records = self.store.load_all();
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
        rec: Record,
        strays: &HashMap<u64, Vec<ProcRef>>,
    ) -> Option<(u64, Attachment, Restored)> {
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
            self.store.remove(inode);
            return None;
        };
        let cfg = &self.ctx.config;
        let Some(rule) = select(cfg, &rec.workload).ok().flatten() else {
            tracing::warn!(
                netns = inode,
                "not restoring an attachment the config no longer selects"
            );
            self.store.remove(inode);
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
            self.store.remove(inode);
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
                        self.store.remove(inode);
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

    /// The last container of `identity`'s workload (`containers`) is gone: what its companion
    /// was issued and has not expired goes on the deny list (here, in the store for the other
    /// nodes, and for `nhid` restarts) until it expires. Audited.
    pub(crate) async fn workload_ended(&self, identity: &Identity, containers: &[String]) {
        use nhi_core::audit::Decision;
        let id = identity.spiffe_id.as_str();
        let what = describe(&identity.workload, containers);
        let _sync = self.revocation_sync.lock().await;
        let Some(entry) =
            self.ctx
                .revocations
                .workload_ended(id, what.clone(), &identity.issued.live())
        else {
            crate::audit::workload_ended(
                &self.ctx,
                identity,
                Decision::Allow,
                format!("{what} ended; none of its credentials is still valid"),
            );
            return;
        };
        let stored = self.ctx.store.put_revocation(&entry).await;
        drop(_sync);
        let until = entry.ended.as_ref().map_or(0, |e| e.expires_at);
        let mut detail = format!(
            "{what} ended; {} JWT-SVIDs and {} X.509-SVIDs it was issued are denied until {until}",
            entry.jtis.len(),
            entry.serials.len()
        );
        let decision = match stored {
            Ok(()) => Decision::Deny,
            Err(e) => {
                tracing::error!(spiffe_id = %id, "denying an ended workload's credentials: in effect on this node, not saved: {e}");
                detail.push_str(&format!(" (on this node only: the store failed: {e})"));
                Decision::Error
            }
        };
        tracing::info!(spiffe_id = %id, jtis = entry.jtis.len(), serials = entry.serials.len(), until, "workload ended; its credentials are denied");
        crate::audit::workload_ended(&self.ctx, identity, decision, detail);
    }

    /// Ended-workload entries whose credentials have all expired leave the deny list.
    pub async fn prune_deny_list(&self) {
        let _sync = self.revocation_sync.lock().await;
        for key in self.ctx.revocations.prune_ended() {
            if let Err(e) = self.ctx.store.remove_revocation(&key).await {
                tracing::warn!(entry = %key, "removing an expired deny-list entry: {e}");
            }
        }
    }

    async fn detach(&self, container_id: &str) -> AgentResponse {
        let Some(inode) = self
            .registry
            .lock()
            .await
            .netns_of
            .get(container_id)
            .copied()
        else {
            return AgentResponse::Detached { stopped: false };
        };
        self.in_slot(inode, async {
            let ended = {
                let mut reg = self.registry.lock().await;
                let ended = take_container_in(&mut reg, inode, container_id);
                self.sync(&reg, inode);
                ended
            };
            let stopped = matches!(ended, Some(Some(_)));
            if let Some(Some(r)) = ended {
                let spiffe_id = r.identity.spiffe_id.to_string();
                self.end(r, &[container_id.to_string()]).await;
                tracing::info!(container = %container_id, %spiffe_id, "detached; companion stopped");
            }
            AgentResponse::Detached { stopped }
        })
        .await
    }

    async fn status(&self) -> AgentResponse {
        let reg = self.registry.lock().await;
        let mut workloads: Vec<WorkloadStatus> = reg
            .by_netns
            .iter()
            .map(|(inode, a)| WorkloadStatus {
                spiffe_id: a.running.as_ref().map(|r| r.identity.spiffe_id.to_string()),
                rule: a.rule.clone(),
                netns_inode: *inode,
                companion_pid: a.running.as_ref().map(|r| r.companion.pid()).unwrap_or(0),
                containers: a.containers.keys().cloned().collect(),
                workload: a
                    .running
                    .as_ref()
                    .map(|r| r.identity.workload.clone())
                    .unwrap_or_else(|| a.first.clone()),
            })
            .collect();
        workloads.sort_by(|a, b| (&a.spiffe_id, a.netns_inode).cmp(&(&b.spiffe_id, b.netns_inode)));
        AgentResponse::Status(Status {
            trust_domain: self.ctx.issuer.trust_domain().to_string(),
            issuer: self.ctx.issuer.kind().to_string(),
            bundle_pem: self.ctx.issuer.bundle_pem(),
            bundle_spiffe: self.ctx.issuer.spiffe_bundle(),
            workloads,
            store: self.store_status().await,
            revocations: self.ctx.revocations.snapshot(),
        })
    }

    /// Stops the companion of a workload whose last container (`containers`) is gone, removes
    /// its edge rules, and denies what it was issued.
    async fn end(&self, r: Running, containers: &[String]) {
        // Stopped first, so its ledger is complete (no issuance after its channel closed).
        r.companion.stop().await;
        self.workload_ended(&r.identity, containers).await;
        if let Some(installed) = r.edge {
            crate::edge::remove(&self.ctx, &r.identity, installed).await;
        }
    }

    /// Detaches containers whose process is gone without a poststop (runtime crash, `kill -9`
    /// of the runtime, a missed hook), so companions and issuance never outlive their workload;
    /// returns uids of ended companions to the pool once they have no process left and drops
    /// expired deny-list entries of ended workloads.
    pub async fn collect_garbage(&self) {
        self.collect_containers().await;
        if self.ctx.uids.draining() {
            let uids = self.ctx.uids.clone();
            let _ = tokio::task::spawn_blocking(move || {
                uids.reap(&crate::uids::live_uids(uids.range()))
            })
            .await;
        }
        self.prune_deny_list().await;
    }

    async fn collect_containers(&self) {
        let stale: Vec<(Running, String)> = {
            let mut reg = self.registry.lock().await;
            let dead: Vec<(u64, String)> = reg
                .by_netns
                .iter()
                .flat_map(|(inode, a)| a.containers.iter().map(move |(c, p)| (*inode, c, p)))
                .filter(|(_, _, p)| !p.alive())
                .map(|(inode, c, _)| (inode, c.clone()))
                .collect();
            let mut stale = Vec::new();
            for (inode, c) in &dead {
                tracing::info!(container = %c, "container process is gone without poststop; detaching");
                crate::secrets::remove_container_dir(&self.ctx.config.store.containers_dir, c);
                stale.extend(
                    take_container_in(&mut reg, *inode, c)
                        .flatten()
                        .map(|r| (r, c.clone())),
                );
                self.sync(&reg, *inode);
            }
            stale
        };
        // Concurrently: one slow companion does not hold up the others.
        futures_util::future::join_all(
            stale
                .into_iter()
                .map(|(r, c)| async move { self.end(r, &[c]).await }),
        )
        .await;
    }

    /// Daemon shutdown for good (SIGUSR2: decommission, package removal): stops every
    /// companion. Records stay: a later start restores the companions of containers that
    /// still run.
    pub async fn stop_companions(&self) {
        stop_all(self.drain().await).await;
    }

    /// Empties the registry (shutdown); the companions that ran.
    async fn drain(&self) -> Vec<Running> {
        let mut reg = self.registry.lock().await;
        // Records stay on disk with what each companion was issued: the next start restores
        // (or re-adopts) the companions of containers that still run and denies what the
        // others were issued.
        for (inode, a) in &reg.by_netns {
            if !a.containers.is_empty() {
                self.store.save(&Self::record(*inode, a, true));
            }
        }
        reg.netns_of.clear();
        reg.by_netns
            .drain()
            .filter_map(|(_, a)| a.running)
            .collect()
    }

    /// Daemon shutdown (upgrade, restart): lets go of every companion without stopping it.
    /// Each keeps serving what it has cached (up to `companion.orphan_timeout`); records stay on
    /// disk and the next start re-adopts the companions of containers that still run.
    pub async fn shutdown(&self) {
        let mut set = tokio::task::JoinSet::new();
        for r in self.drain().await {
            set.spawn(r.companion.release());
        }
        while set.join_next().await.is_some() {}
    }
}

/// How an attachment came back after a restart.
enum Restored {
    Adopted,
    Started,
    Reserved,
}

/// Which workload ended, for its deny-list entry and audit record: its containers, and its pod
/// or Nomad allocation.
fn describe(w: &Workload, containers: &[String]) -> String {
    let mut s = format!("container {}", containers.join(","));
    if let Some(k) = &w.k8s {
        s.push_str(&format!(
            " of pod {}/{}",
            k.namespace.as_deref().unwrap_or("?"),
            k.pod.as_deref().unwrap_or("?")
        ));
    }
    if let Some(n) = w.nomad.as_ref().and_then(|n| n.alloc_id.as_deref()) {
        s.push_str(&format!(" of Nomad allocation {n}"));
    }
    s
}

/// Stops companions concurrently: one slow companion does not hold up the others.
async fn stop_all(runs: Vec<Running>) {
    let mut set = tokio::task::JoinSet::new();
    for r in runs {
        set.spawn(async move {
            r.companion.stop().await;
            tracing::info!(spiffe_id = %r.identity.spiffe_id, "companion stopped");
        });
    }
    while set.join_next().await.is_some() {}
}

/// Removes container `container_id` of namespace `inode` (its Workload API socket first).
/// `None`: it was not attached there; `Some(None)`: others remain (or nothing ran);
/// `Some(Some(r))`: it was the last of its namespace and `r` must be stopped.
fn take_container_in(
    reg: &mut Registry,
    inode: u64,
    container_id: &str,
) -> Option<Option<Running>> {
    if let Some(a) = reg.by_netns.get(&inode) {
        if let (Some(r), true) = (&a.running, a.containers.contains_key(container_id)) {
            r.companion.remove_socket(container_id);
        }
    }
    match reg.detach(inode, container_id) {
        Left::NotAttached => None,
        Left::Remaining => Some(None),
        Left::Last(r) => Some(r),
    }
}

impl crate::metrics::Refresh for Agent {
    /// The attached-workloads gauge, counted off the registry.
    async fn refresh(&self, metrics: &crate::metrics::Metrics) {
        let reg = self.registry.lock().await;
        metrics.attached.set(reg.running() as i64);
    }
}
