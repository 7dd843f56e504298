//! `nhictl node revoke NODE [--undo]`: cut a node off the cluster with an operator's OpenBao
//! token, read from a file (never argv or the environment) and sent once over `nhid`'s
//! root-only socket.

use std::path::Path;

use nhi_core::nhid_client::NhidClient;
use nhi_core::wire::Redacted;

/// Reads the operator token from `file` (one line, at most 4 KiB).
pub fn read_token(file: &Path) -> Result<Redacted, String> {
    let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let raw = crate::secret::read_limited(f, 4096, &file.display().to_string())?;
    let text = std::str::from_utf8(&raw)
        .map_err(|_| format!("{}: the token is not UTF-8", file.display()))?
        .trim();
    if text.is_empty() || text.contains(char::is_whitespace) {
        return Err(format!(
            "{}: expected one OpenBao token on one line",
            file.display()
        ));
    }
    Ok(Redacted(text.to_string()))
}

/// Revokes (or, `undo`, restores) `node`; the line to show.
pub fn revoke(
    nhid: &NhidClient,
    node: &str,
    undo: bool,
    token_file: &Path,
) -> Result<String, String> {
    let token = read_token(token_file)?;
    let (entity, all) = nhid
        .node_revoke(node, undo, token)
        .map_err(|e| e.to_string())?;
    let now = if all.is_empty() {
        "none".to_string()
    } else {
        all.join(", ")
    };
    Ok(if undo {
        format!(
            "node {node}: back in the cluster (OpenBao entity {entity} enabled); nodes cut off now: {now}"
        )
    } else {
        format!(
            "node {node}: cut off (OpenBao entity {entity} disabled, its JWT keys dropped by every node within one poll_interval); nodes cut off now: {now}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_file_holds_one_word() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("t");
        std::fs::write(&f, "s.abcdef\n").unwrap();
        assert_eq!(read_token(&f).unwrap().0, "s.abcdef");
        assert!(!format!("{:?}", read_token(&f).unwrap()).contains("abcdef"));
        std::fs::write(&f, "two words\n").unwrap();
        assert!(read_token(&f).is_err());
        std::fs::write(&f, "\n").unwrap();
        assert!(read_token(&f).is_err());
        assert!(read_token(&d.path().join("missing")).is_err());
    }
}
