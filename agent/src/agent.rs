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
use crate::persist::{Attachments, ContainerRecord, Record};
use crate::registry::{Arrival, Left, Member, Serving, Step};
use crate::supervisor::{self, CompanionHandle, Ctx, Identity};

mod recover;

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
    attachments: Attachments,
    /// What is degraded (central store unreachable, ...), for `nhictl status`.
    pub(crate) degraded: std::sync::Mutex<Vec<String>>,
    /// Serializes revocation changes with the store poll, so a poll that read the list just
    /// before a local revocation was saved never lifts it.
    pub(crate) revocation_sync: Mutex<()>,
}

impl Agent {
    pub fn new(ctx: Arc<Ctx>) -> std::io::Result<Self> {
        let attachments = Attachments::new(&ctx.config.state_dir)?;
        Ok(Agent {
            attachments,
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
            AgentRequest::CaRotate {
                activate_after_secs,
            } => self.ca_rotate(activate_after_secs).await,
            AgentRequest::NodeRevoke {
                node,
                undo,
                operator_token,
            } => self.node_revoke(&node, undo, operator_token).await,
            AgentRequest::Validate { token, audience } => self
                .ctx
                .validate(&token, &audience)
                .map(AgentResponse::Validated),
        };
        res.unwrap_or_else(|message| AgentResponse::Error { message })
    }

    /// With service-account discovery on, the pod's token (re-read beneath the kubelet root
    /// where the hook found it) must be signed by one of the cluster's current keys.
    async fn check_service_account(&self, workload: &Workload) -> Result<(), String> {
        let Some(keys) = &self.ctx.sa_keys else {
            return Ok(());
        };
        let k = workload.k8s.as_ref().ok_or("not a Kubernetes container")?;
        let (Some(path), Some(uid)) = (&k.token_path, &k.pod_uid) else {
            return Err("no service-account token was read for this container".into());
        };
        let token = zeroize::Zeroizing::new(nhi_core::k8s::read_projected_token(
            &self.ctx.config.kubernetes.kubelet_root,
            path,
            uid,
        )?);
        keys.verify(&token).await?;
        // The verified token must still say what the hook read from it.
        let sa = nhi_core::k8s::service_account(
            &token,
            k.namespace.as_deref().unwrap_or_default(),
            uid,
        )?;
        if k.service_account.as_deref() != Some(sa.as_str()) {
            return Err(format!(
                "the service-account token now names {sa:?}, not {:?}",
                k.service_account
            ));
        }
        Ok(())
    }

    async fn attach(
        &self,
        mut workload: Workload,
        pid: i32,
        hook_rule: &str,
    ) -> Result<AgentResponse, String> {
        let cfg = &self.ctx.config;
        // `{node.name}` is nhid's to say, whatever the request carried.
        workload.node = Some(cfg.node_name.clone());
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
        if !sandbox && rule.spiffe_id.vars().any(|v| v == "k8s.service_account") {
            self.check_service_account(&workload)
                .await
                .map_err(|e| format!("container {cid}: {e}"))?;
        }
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
            member: Member {
                container_id: &cid,
                process: proc_ref,
                user,
            },
            netns,
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
                    spiffe_id: spiffe_id.expect("joined by identity").to_string(),
                    companion_pid,
                    netns_inode: inode,
                    joined: true,
                });
            }
            Step::Conflict { serving } => {
                let id = spiffe_id.expect("refused by identity");
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
        let member = Member {
            container_id: &cid,
            process: proc_ref,
            user,
        };
        let running = Running {
            identity,
            companion,
            edge,
        };
        reg.started(inode, member, &rule.name, &workload, running);
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
        let Some(a) = reg.attachment_of(container_id) else {
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
            Some(a) if !a.containers.is_empty() => {
                self.attachments.save(&Self::record(inode, a, false))
            }
            _ => self.attachments.remove(inode),
        }
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
                &self.ctx.audit,
                &self.ctx.metrics,
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
        crate::audit::workload_ended(
            &self.ctx.audit,
            &self.ctx.metrics,
            identity,
            decision,
            detail,
        );
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
            revoked_nodes: self.ctx.issuer.revoked_nodes().into_iter().collect(),
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
                self.attachments.save(&Self::record(*inode, a, true));
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

impl Agent {
    /// SIGHUP: re-reads `[[policy]]` from the config file. A config that no longer loads keeps
    /// the current policies. Running companions get their new policy (for new connections) and
    /// namespaces their new rules; workloads are never restarted.
    pub async fn reload_policies(&self) {
        let cfg = match nhi_core::Config::load(&self.ctx.config.path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("reload: keeping the current policies: {e}");
                return;
            }
        };
        if cfg.egress != self.ctx.config.egress {
            tracing::warn!("reload: [egress] ports only change with an nhid restart");
        }
        *self.ctx.policies.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg.policies);
        let mut reg = self.registry.lock().await;
        let reg = &mut *reg;
        for a in reg.by_netns.values_mut() {
            let pid = a.containers.values().find(|p| p.alive()).map(|p| p.pid);
            let Some(r) = a.running.as_mut() else {
                continue;
            };
            let policy = self.ctx.policy_for(&r.identity);
            r.companion.notify(nhi_core::wire::Event::Policy {
                policy: policy.clone().map(Box::new),
            });
            let previous = r.edge.take();
            match (policy.is_some(), pid, previous) {
                (true, Some(pid), previous) => {
                    match crate::edge::install(&self.ctx, &r.identity, pid, previous).await {
                        Ok(installed) => r.edge = installed,
                        Err(e) => tracing::error!(spiffe_id = %r.identity.spiffe_id, "reload: {e}"),
                    }
                }
                (true, None, previous) => {
                    r.edge = previous;
                    tracing::warn!(spiffe_id = %r.identity.spiffe_id, "reload: no live container to enter")
                }
                (false, _, Some(prev)) => crate::edge::remove(&self.ctx, &r.identity, prev).await,
                (false, _, None) => {}
            }
        }
        tracing::info!("edge policies reloaded");
    }
}
