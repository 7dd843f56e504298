//! nhi-shim: how container runtimes reach nhi without hooks.d.
//!
//! - `nhi-runc`: a runc-compatible wrapper. On `create`/`run` it adds the nhi hooks to the
//!   bundle's config.json, then `exec`s the real runtime with the very same arguments. Every
//!   other subcommand is a pure pass-through. This is how Docker (`runtimes`), CRI
//!   (`options.BinaryName`) and `ctr --runc-binary` reach nhi.
//! - `containerd-shim-nhi-v2`: the runtime `io.containerd.nhi.v2`. It `exec`s the stock
//!   `containerd-shim-runc-v2` with a directory first on `PATH` whose `runc` is `nhi-runc`, so
//!   process management (exec, attach, PTY, OOM events, stats, pod grouping) is runc's own.

pub mod args;
pub mod inject;
pub mod runtime;
pub mod shim;
pub mod wrapper;
