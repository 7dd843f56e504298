//! The daemon's state and its answers to the agent API: which network namespaces have a
//! companion, which containers use each, and attach / detach / status.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use nhi_core::select::select;
use nhi_core::wire::{AgentRequest, AgentResponse, Status, WorkloadStatus};
use nhi_core::Workload;
use tokio::sync::Mutex;

use crate::netns::{NetNs, ProcRef};
use crate::supervisor::{self, CompanionHandle, Ctx, Identity};

struct Attachment {
    identity: Arc<Identity>,
    /// Container id → its init process when attached.
    containers: BTreeMap<String, ProcRef>,
    companion: CompanionHandle,
}

#[derive(Default)]
struct Registry {
    by_netns: HashMap<u64, Attachment>,
    netns_of: HashMap<String, u64>,
}

pub struct Agent {
    ctx: Arc<Ctx>,
    host_netns: u64,
    // One lock for attach/detach: attaches are rare and short, and serializing them makes
    // "one companion per network namespace" trivially true.
    registry: Mutex<Registry>,
}

impl Agent {
    pub fn new(ctx: Arc<Ctx>) -> std::io::Result<Self> {
        Ok(Agent {
            ctx,
            host_netns: NetNs::own()?.inode,
            registry: Mutex::new(Registry::default()),
        })
    }

    pub async fn handle(&self, req: AgentRequest) -> AgentResponse {
        let res = match req {
            AgentRequest::Attach {
                workload,
                pid,
                rule,
            } => self.attach(*workload, pid, &rule).await,
            AgentRequest::Detach { container_id } => Ok(self.detach(&container_id).await),
            AgentRequest::Status => Ok(self.status().await),
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
        let Some(rule) = select(cfg, &workload) else {
            if !hook_rule.is_empty() {
                tracing::warn!(container = %cid, hook_rule, "hook selected a rule but nhid's config selects none; is the hook reading another config?");
            }
            return Ok(AgentResponse::NotSelected);
        };
        if rule.name != hook_rule {
            tracing::warn!(container = %cid, hook_rule, rule = %rule.name, "hook and nhid picked different rules; using nhid's");
        }
        let spiffe_id = rule
            .spiffe_id
            .render(&cfg.trust_domain, &workload)
            .map_err(|e| format!("container {cid}: {e}"))?;
        if pid <= 0 {
            return Err(format!("container {cid}: the runtime state has no pid"));
        }
        let proc_ref =
            ProcRef::of(pid).map_err(|e| format!("container {cid}: process {pid}: {e}"))?;
        let netns = NetNs::of_pid(pid)
            .map_err(|e| format!("container {cid}: network namespace of pid {pid}: {e}"))?;
        if netns.inode == self.host_netns {
            return Err(format!(
                "container {cid} shares the host network namespace; nhi never attaches a companion there (give it its own network namespace)"
            ));
        }

        let mut reg = self.registry.lock().await;
        if let Some(a) = reg.by_netns.get_mut(&netns.inode) {
            if a.identity.spiffe_id != spiffe_id {
                return Err(format!(
                    "container {cid} would be {spiffe_id}, but its network namespace already serves {}; one network namespace has one identity",
                    a.identity.spiffe_id
                ));
            }
            a.containers.insert(cid.clone(), proc_ref);
            let (companion_pid, inode) = (a.companion.pid(), netns.inode);
            reg.netns_of.insert(cid, inode);
            return Ok(AgentResponse::Attached {
                spiffe_id: spiffe_id.to_string(),
                companion_pid,
                netns_inode: inode,
                joined: true,
            });
        }
        let inode = netns.inode;
        let identity = Arc::new(Identity {
            spiffe_id: spiffe_id.clone(),
            rule: rule.name.clone(),
            workload,
        });
        let companion = supervisor::start(self.ctx.clone(), identity.clone(), netns)
            .await
            .map_err(|e| format!("container {cid}: {e}"))?;
        let companion_pid = companion.pid();
        tracing::info!(container = %cid, %spiffe_id, rule = %rule.name, netns = inode, companion_pid, "attached");
        reg.by_netns.insert(
            inode,
            Attachment {
                identity,
                containers: BTreeMap::from([(cid.clone(), proc_ref)]),
                companion,
            },
        );
        reg.netns_of.insert(cid, inode);
        Ok(AgentResponse::Attached {
            spiffe_id: spiffe_id.to_string(),
            companion_pid,
            netns_inode: inode,
            joined: false,
        })
    }

    async fn detach(&self, container_id: &str) -> AgentResponse {
        let handle = {
            let mut reg = self.registry.lock().await;
            take_container(&mut reg, container_id)
        };
        let stopped = handle.is_some();
        if let Some((handle, id)) = handle {
            handle.stop().await;
            tracing::info!(container = %container_id, spiffe_id = %id, "detached; companion stopped");
        }
        AgentResponse::Detached { stopped }
    }

    async fn status(&self) -> AgentResponse {
        let reg = self.registry.lock().await;
        let mut workloads: Vec<WorkloadStatus> = reg
            .by_netns
            .iter()
            .map(|(inode, a)| WorkloadStatus {
                spiffe_id: a.identity.spiffe_id.to_string(),
                rule: a.identity.rule.clone(),
                netns_inode: *inode,
                companion_pid: a.companion.pid(),
                containers: a.containers.keys().cloned().collect(),
                workload: a.identity.workload.clone(),
            })
            .collect();
        workloads.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        AgentResponse::Status(Status {
            trust_domain: self.ctx.issuer.trust_domain().to_string(),
            issuer: self.ctx.issuer.kind().to_string(),
            bundle_pem: self.ctx.issuer.bundle_pem().to_string(),
            workloads,
        })
    }

    /// Detaches containers whose process is gone without a poststop (runtime crash, `kill -9`
    /// of the runtime, a missed hook), so companions and issuance never outlive their workload.
    pub async fn collect_garbage(&self) {
        let stale: Vec<(CompanionHandle, nhi_core::SpiffeId)> = {
            let mut reg = self.registry.lock().await;
            let dead: Vec<String> = reg
                .by_netns
                .values()
                .flat_map(|a| a.containers.iter())
                .filter(|(_, p)| !p.alive())
                .map(|(c, _)| c.clone())
                .collect();
            dead.iter()
                .filter_map(|c| {
                    tracing::info!(container = %c, "container process is gone without poststop; detaching");
                    take_container(&mut reg, c)
                })
                .collect()
        };
        for (h, id) in stale {
            h.stop().await;
            tracing::info!(spiffe_id = %id, "companion stopped");
        }
    }

    /// Stops every companion (daemon shutdown).
    pub async fn shutdown(&self) {
        let all: Vec<Attachment> = {
            let mut reg = self.registry.lock().await;
            reg.netns_of.clear();
            reg.by_netns.drain().map(|(_, a)| a).collect()
        };
        for a in all {
            a.companion.stop().await;
        }
    }
}

/// Removes a container; when it was the last of its namespace, hands back the companion to stop.
fn take_container(
    reg: &mut Registry,
    container_id: &str,
) -> Option<(CompanionHandle, nhi_core::SpiffeId)> {
    let inode = reg.netns_of.remove(container_id)?;
    let a = reg.by_netns.get_mut(&inode)?;
    a.containers.remove(container_id);
    if !a.containers.is_empty() {
        return None;
    }
    let a = reg.by_netns.remove(&inode)?;
    Some((a.companion, a.identity.spiffe_id.clone()))
}
