//! nhi-runc: runc's command line; adds the nhi hooks on create/run, then execs the real runtime.
fn main() {
    std::process::exit(nhi_shim::wrapper::main(std::env::args().skip(1).collect()));
}
