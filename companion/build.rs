//! Compiles the vendored SPIFFE Workload API proto (server side only) and keeps its encoded
//! file descriptor set for gRPC server reflection. Needs `protoc` (Debian: protobuf-compiler,
//! installed by scripts/install-deps).
fn main() -> std::io::Result<()> {
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .file_descriptor_set_path(out.join("workload_descriptor.bin"))
        .compile_protos(&["proto/workload.proto"], &["proto"])
}
