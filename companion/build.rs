//! Compiles the vendored SPIFFE Workload API proto (server side only). Needs `protoc`
//! (Debian: protobuf-compiler, installed by scripts/install-deps).
fn main() -> std::io::Result<()> {
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_protos(&["proto/workload.proto"], &["proto"])
}
