//! `nhictl secret`: values read with a bound, stored, rotated, read back and removed through
//! `nhid`.

use std::io::Read;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use nhi_core::nhid_client::NhidClient;
use zeroize::Zeroizing;

/// Largest secret value accepted.
pub const MAX_SECRET: u64 = 1 << 20;

/// Reads all of `r`, refusing more than `limit` bytes (`what` names the source in errors).
pub fn read_limited(r: impl Read, limit: u64, what: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut buf = Zeroizing::new(Vec::new());
    r.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("reading {what}: {e}"))?;
    if buf.len() as u64 > limit {
        return Err(format!("{what} is larger than {limit} bytes"));
    }
    Ok(buf)
}

/// A value from a file or from `stdin`, base64 for the wire; `None` when neither is given.
pub fn read_value(
    from_file: Option<&Path>,
    stdin: Option<&mut dyn Read>,
) -> Result<Option<String>, String> {
    let raw = match (from_file, stdin) {
        (Some(f), _) => {
            let file = std::fs::File::open(f).map_err(|e| format!("{}: {e}", f.display()))?;
            read_limited(file, MAX_SECRET, &f.display().to_string())?
        }
        (None, Some(r)) => read_limited(r, MAX_SECRET, "stdin")?,
        (None, None) => return Ok(None),
    };
    Ok(Some(B64.encode(&raw[..])))
}

/// Stores a new version (`value_b64` `None` on rotate: `nhid` generates one); the line to show.
pub fn put(
    nhid: &NhidClient,
    name: &str,
    value_b64: Option<String>,
    rotate: bool,
) -> Result<String, String> {
    let (name, version) = nhid
        .secret_put(name, value_b64, rotate)
        .map_err(|e| e.to_string())?;
    Ok(format!("{name}: version {version}"))
}

/// The secret's value, decoded.
pub fn get(nhid: &NhidClient, name: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let s = nhid.secret_get(name).map_err(|e| e.to_string())?;
    Ok(Zeroizing::new(
        B64.decode(&s.value_b64).map_err(|e| e.to_string())?,
    ))
}

/// The listing: JSON, or a line per secret.
pub fn list(nhid: &NhidClient, json: bool) -> Result<String, String> {
    let secrets = nhid.secret_list().map_err(|e| e.to_string())?;
    if json {
        return serde_json::to_string_pretty(&secrets)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string());
    }
    Ok(secrets
        .iter()
        .map(|s| {
            format!(
                "{}\tversion={}\tupdated_at={}\n",
                s.name, s.version, s.updated_at
            )
        })
        .collect())
}

pub fn remove(nhid: &NhidClient, name: &str) -> Result<String, String> {
    let name = nhid.secret_rm(name).map_err(|e| e.to_string())?;
    Ok(format!("{name}: removed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_bounded_and_encoded() {
        let mut small: &[u8] = b"v";
        assert_eq!(
            read_value(None, Some(&mut small)).unwrap().as_deref(),
            Some("dg==")
        );
        assert_eq!(read_value(None, None).unwrap(), None);
        let big = vec![0u8; MAX_SECRET as usize + 1];
        let e = read_value(None, Some(&mut &big[..])).unwrap_err();
        assert!(e.contains("stdin is larger than 1048576 bytes"), "{e}");
        let e = read_value(Some(Path::new("/nonexistent/v")), None).unwrap_err();
        assert!(e.starts_with("/nonexistent/v: "), "{e}");
    }
}
