//! nhi-shim: home of `nhi-runc` (the runc-compatible wrapper) and `containerd-shim-nhi-v2`.
//! Empty until the runtime-integration issue: the walking skeleton reaches runc through hooks in
//! the bundle's config.json.
