//! nhi-core: what every nhi binary shares. Config, workload metadata as the runtime attested it,
//! SPIFFE IDs and identity templates, selection rules and the wire types. No daemons, no sockets
//! beyond the one blocking client call the hook and nhictl make.

pub mod atomic_file;
pub mod audit;
pub mod audit_log;
pub mod cgroupfs;
pub mod clock;
pub mod config;
pub mod fd_limit;
pub mod grant;
pub mod http_path;
pub mod jwt;
pub mod k8s;
pub mod nhid_client;
pub mod nomad;
pub mod openbao_config;
pub mod policy;
pub mod select;
pub mod spiffe;
pub mod subjects;
pub mod template;
pub mod untrusted_fs;
pub mod wire;
pub mod workload;

pub use config::{Config, Rule};
pub use spiffe::SpiffeId;
pub use workload::Workload;
