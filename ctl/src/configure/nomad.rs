//! Nomad: the client plugin stanzas to paste (nhictl never edits Nomad's HCL).

pub fn stanzas() -> String {
    include_str!("../../../config/nomad/client.hcl").to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_both_drivers() {
        let s = super::stanzas();
        assert!(s.contains("allow_runtimes") && s.contains("io.containerd.nhi.v2"));
        assert!(s.contains("file = true") && s.contains("jwks.json"));
    }
}
