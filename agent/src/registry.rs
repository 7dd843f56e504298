//! Which network namespaces have a companion and which containers use each: the registry's
//! state and its transitions, with no I/O. `nhid` (`crate::agent`) holds it under a lock,
//! asks it what an attach or a detach means, and executes the answer (start a companion, stop
//! one); the transitions are unit-tested here with plain values in place of namespaces,
//! processes and companions.
//!
//! One network namespace, one identity, one companion. A Kubernetes pod sandbox reserves its
//! namespace (the pause container has no identity to give); the pod's first app container fixes
//! the identity and starts the companion; later containers join it, and must have the same
//! identity; the companion stops when the last container of the namespace is gone.

use std::collections::{BTreeMap, HashMap};

use nhi_core::workload::HostUser;
use nhi_core::{SpiffeId, Workload};

/// What the registry needs to know of a running companion.
pub trait Serving {
    fn spiffe_id(&self) -> &SpiffeId;
    fn companion_pid(&self) -> i32;
}

/// One network namespace's attachment. `N`: a handle on the namespace, `P`: a container's
/// process, `R`: the running companion.
pub struct Attachment<N, P, R> {
    pub rule: String,
    /// The first workload seen in the namespace (the sandbox, for pods).
    pub first: Workload,
    /// Held while the identity is pending, to start the companion in it later.
    pub netns: Option<N>,
    pub running: Option<R>,
    /// Container id → its init process when attached.
    pub containers: BTreeMap<String, P>,
    /// Container id → who its process runs as (owner of its `/run/nhi` files), when known.
    pub users: BTreeMap<String, HostUser>,
}

impl<N, P, R> Attachment<N, P, R> {
    pub fn new(rule: &str, first: Workload) -> Self {
        Attachment {
            rule: rule.to_string(),
            first,
            netns: None,
            running: None,
            containers: BTreeMap::new(),
            users: BTreeMap::new(),
        }
    }
}

pub struct Registry<N, P, R> {
    pub by_netns: HashMap<u64, Attachment<N, P, R>>,
    pub netns_of: HashMap<String, u64>,
}

impl<N, P, R> Default for Registry<N, P, R> {
    fn default() -> Self {
        Registry {
            by_netns: HashMap::new(),
            netns_of: HashMap::new(),
        }
    }
}

/// A container as the registry keeps it.
pub struct Member<'a, P> {
    pub container_id: &'a str,
    pub process: P,
    /// Who its process runs as, when known.
    pub user: Option<HostUser>,
}

/// A container arriving in namespace `inode` (an attach whose rule nhid selected).
pub struct Arrival<'a, N, P> {
    pub inode: u64,
    pub member: Member<'a, P>,
    /// The namespace, opened through the container's process.
    pub netns: N,
    pub rule: &'a str,
    pub workload: &'a Workload,
    /// `None` for a pod sandbox, which has no identity of its own.
    pub spiffe_id: Option<&'a SpiffeId>,
}

/// What an attach means; the registry has recorded what it can already.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<N> {
    /// A pod sandbox: the namespace is reserved for the pod's companion.
    Reserved,
    /// The namespace's companion serves the same identity: the container joined it.
    Joined { companion_pid: i32 },
    /// The namespace's companion serves another identity: refused, nothing recorded.
    Conflict { serving: String },
    /// No companion yet: start one in `netns` (the pod's reserved namespace, or the
    /// container's), then report [`Registry::started`] or [`Registry::start_failed`].
    Start { netns: N },
}

/// What a detach means.
#[derive(Debug, PartialEq, Eq)]
pub enum Left<R> {
    /// The container was not attached in that namespace.
    NotAttached,
    /// Others remain in the namespace (or nothing ran yet).
    Remaining,
    /// It was the namespace's last container: its companion (if one ran) must be stopped.
    Last(Option<R>),
}

impl<N, P, R: Serving> Registry<N, P, R> {
    /// Records `a` as far as it can and says what is left to do.
    pub fn attach(&mut self, a: Arrival<'_, N, P>) -> Step<N> {
        let attachment = self
            .by_netns
            .entry(a.inode)
            .or_insert_with(|| Attachment::new(a.rule, a.workload.clone()));
        let Some(spiffe_id) = a.spiffe_id else {
            if attachment.running.is_none() && attachment.netns.is_none() {
                attachment.netns = Some(a.netns);
            }
            Self::add(&mut self.netns_of, attachment, a.inode, a.member);
            return Step::Reserved;
        };
        match &attachment.running {
            Some(r) if r.spiffe_id() != spiffe_id => {
                let serving = r.spiffe_id().to_string();
                // An attachment made just now for this arrival goes again.
                self.forget_if_empty(a.inode);
                Step::Conflict { serving }
            }
            Some(r) => {
                let companion_pid = r.companion_pid();
                Self::add(&mut self.netns_of, attachment, a.inode, a.member);
                Step::Joined { companion_pid }
            }
            None => Step::Start {
                netns: attachment.netns.take().unwrap_or(a.netns),
            },
        }
    }

    /// The companion [`Step::Start`] asked for runs: the container is attached to it. The
    /// attachment is made anew if it went meanwhile (a sandbox removed while its first app
    /// container started).
    pub fn started(
        &mut self,
        inode: u64,
        member: Member<'_, P>,
        rule: &str,
        workload: &Workload,
        running: R,
    ) {
        let attachment = self
            .by_netns
            .entry(inode)
            .or_insert_with(|| Attachment::new(rule, workload.clone()));
        attachment.rule = rule.to_string();
        attachment.running = Some(running);
        Self::add(&mut self.netns_of, attachment, inode, member);
    }

    /// The companion [`Step::Start`] asked for did not start: the namespace's attachment goes
    /// if no container holds it, else it stays reserved with `reopen()` (the namespace opened
    /// again) for the next container.
    pub fn start_failed(&mut self, inode: u64, reopen: impl FnOnce() -> Option<N>) {
        if !self.forget_if_empty(inode) {
            if let Some(a) = self.by_netns.get_mut(&inode) {
                a.netns = reopen();
            }
        }
    }

    /// Removes namespace `inode`'s attachment if no container holds it; whether it did.
    pub fn forget_if_empty(&mut self, inode: u64) -> bool {
        if self
            .by_netns
            .get(&inode)
            .is_some_and(|a| a.containers.is_empty())
        {
            self.by_netns.remove(&inode);
            return true;
        }
        false
    }

    /// Removes container `container_id` of namespace `inode`. A container id reused meanwhile
    /// by a container in another namespace stays attached there.
    pub fn detach(&mut self, inode: u64, container_id: &str) -> Left<R> {
        let Some(a) = self.by_netns.get_mut(&inode) else {
            return Left::NotAttached;
        };
        if a.containers.remove(container_id).is_none() {
            return Left::NotAttached;
        }
        a.users.remove(container_id);
        let last = a.containers.is_empty();
        if self.netns_of.get(container_id) == Some(&inode) {
            self.netns_of.remove(container_id);
        }
        if !last {
            return Left::Remaining;
        }
        Left::Last(self.by_netns.remove(&inode).and_then(|a| a.running))
    }

    /// The attachment of the namespace container `container_id` is attached in.
    pub fn attachment_of(&self, container_id: &str) -> Option<&Attachment<N, P, R>> {
        self.by_netns.get(self.netns_of.get(container_id)?)
    }

    /// The running companion of the namespace container `container_id` is attached in.
    pub fn serving(&self, container_id: &str) -> Option<&R> {
        self.attachment_of(container_id)?.running.as_ref()
    }

    /// How many namespaces have a running companion.
    pub fn running(&self) -> usize {
        self.by_netns
            .values()
            .filter(|a| a.running.is_some())
            .count()
    }

    fn add(
        netns_of: &mut HashMap<String, u64>,
        attachment: &mut Attachment<N, P, R>,
        inode: u64,
        m: Member<'_, P>,
    ) {
        let id = m.container_id.to_string();
        if let Some(u) = m.user {
            attachment.users.insert(id.clone(), u);
        }
        attachment.containers.insert(id.clone(), m.process);
        netns_of.insert(id, inode);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A companion stand-in.
    #[derive(Debug, PartialEq, Eq)]
    struct Companion(SpiffeId, i32);

    impl Serving for Companion {
        fn spiffe_id(&self) -> &SpiffeId {
            &self.0
        }
        fn companion_pid(&self) -> i32 {
            self.1
        }
    }

    /// Namespaces are names, processes pids.
    type Reg = Registry<&'static str, i32, Companion>;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn member(cid: &str) -> Member<'_, i32> {
        Member {
            container_id: cid,
            process: 100,
            user: Some(HostUser {
                uid: 1000,
                gid: 1000,
            }),
        }
    }

    fn arrival<'a, N>(
        inode: u64,
        cid: &'a str,
        netns: N,
        spiffe_id: Option<&'a SpiffeId>,
        w: &'a Workload,
    ) -> Arrival<'a, N, i32> {
        Arrival {
            inode,
            member: member(cid),
            netns,
            rule: "r",
            workload: w,
            spiffe_id,
        }
    }

    #[test]
    fn a_pod_reserves_its_namespace_the_first_app_container_starts_the_companion_and_others_join() {
        let (w, a, b) = (
            Workload::default(),
            id("spiffe://td/a"),
            id("spiffe://td/b"),
        );
        let mut reg = Reg::default();
        // The sandbox: reserved, its namespace held for the companion.
        assert_eq!(
            reg.attach(arrival(7, "pause", "ns-of-pause", None, &w)),
            Step::Reserved
        );
        // The first app container: start in the sandbox's namespace, not its own.
        assert_eq!(
            reg.attach(arrival(7, "app", "ns-of-app", Some(&a), &w)),
            Step::Start {
                netns: "ns-of-pause"
            }
        );
        reg.started(7, member("app"), "r", &w, Companion(a.clone(), 42));
        assert_eq!(reg.serving("app").map(|c| c.1), Some(42));
        assert_eq!(reg.serving("pause").map(|c| c.1), Some(42));
        // A sidecar with the same identity joins; one with another is refused.
        assert_eq!(
            reg.attach(arrival(7, "side", "ns", Some(&a), &w)),
            Step::Joined { companion_pid: 42 }
        );
        assert_eq!(
            reg.attach(arrival(7, "evil", "ns", Some(&b), &w)),
            Step::Conflict {
                serving: "spiffe://td/a".into()
            }
        );
        assert!(!reg.netns_of.contains_key("evil"));
        assert!(!reg.by_netns[&7].users.contains_key("evil"));
        assert_eq!(reg.running(), 1);
        // Containers leave; the last one's companion is handed back to be stopped.
        assert_eq!(reg.detach(7, "side"), Left::Remaining);
        assert_eq!(reg.detach(7, "app"), Left::Remaining);
        assert_eq!(reg.detach(7, "app"), Left::NotAttached);
        assert_eq!(reg.detach(7, "pause"), Left::Last(Some(Companion(a, 42))));
        assert!(reg.by_netns.is_empty() && reg.netns_of.is_empty());
        assert_eq!(reg.running(), 0);
    }

    #[test]
    fn a_failed_start_keeps_a_reservation_usable_and_leaves_nothing_otherwise() {
        let (w, a) = (Workload::default(), id("spiffe://td/a"));
        let mut reg = Reg::default();
        // A plain container whose companion fails: nothing is left.
        assert_eq!(
            reg.attach(arrival(1, "c", "ns-c", Some(&a), &w)),
            Step::Start { netns: "ns-c" }
        );
        reg.start_failed(1, || Some("reopened"));
        assert!(reg.by_netns.is_empty());
        // In a pod: the sandbox still holds the namespace, reserved again for the next app
        // container, which starts in it.
        reg.attach(arrival(2, "pause", "ns-pause", None, &w));
        let Step::Start { netns } = reg.attach(arrival(2, "app", "ns-app", Some(&a), &w)) else {
            panic!()
        };
        assert_eq!(netns, "ns-pause");
        assert_eq!(reg.by_netns[&2].netns, None, "taken for the start");
        reg.start_failed(2, || Some("ns-pause-reopened"));
        assert_eq!(reg.by_netns[&2].netns, Some("ns-pause-reopened"));
        assert_eq!(
            reg.attach(arrival(2, "app", "ns-app", Some(&a), &w)),
            Step::Start {
                netns: "ns-pause-reopened"
            }
        );
    }

    #[test]
    fn a_sandbox_removed_during_its_first_start_is_attached_anew_and_reused_ids_stay() {
        let (w, a) = (Workload::default(), id("spiffe://td/a"));
        let mut reg = Reg::default();
        reg.attach(arrival(3, "pause", "ns", None, &w));
        assert!(matches!(
            reg.attach(arrival(3, "app", "ns", Some(&a), &w)),
            Step::Start { .. }
        ));
        // The sandbox goes while the companion starts (no companion to stop yet).
        assert_eq!(reg.detach(3, "pause"), Left::Last(None));
        reg.started(3, member("app"), "r", &w, Companion(a.clone(), 9));
        assert_eq!(reg.serving("app").map(|c| c.1), Some(9));
        // The same container id, reused in another namespace, is not detached from there.
        reg.attach(arrival(4, "pause", "ns4", None, &w));
        reg.netns_of.insert("app".into(), 4);
        assert_eq!(reg.detach(3, "app"), Left::Last(Some(Companion(a, 9))));
        assert_eq!(reg.netns_of.get("app"), Some(&4));
    }
}
