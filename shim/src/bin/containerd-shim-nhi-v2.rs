//! containerd-shim-nhi-v2: runtime io.containerd.nhi.v2, the stock runc v2 shim with nhi-runc.
fn main() {
    std::process::exit(nhi_shim::shim::main(std::env::args().skip(1).collect()));
}
