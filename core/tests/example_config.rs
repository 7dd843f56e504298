//! The shipped example config must always load.

#[test]
fn shipped_example_config_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/nhi.toml");
    let c = nhi_core::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.rules.len(), 3);
    assert_eq!(c.trust_domain, "cluster.example.org");
}
