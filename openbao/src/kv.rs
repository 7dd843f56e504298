//! KV v2 paths (every segment percent-encoded, no `..`) and wiping request bodies.

use super::*;

/// Overwrites every string in a JSON value (the request body copy of KV data) before drop.
pub(crate) fn zeroize_value(v: &mut Value) {
    use zeroize::Zeroize;
    match v {
        Value::String(s) => s.zeroize(),
        Value::Array(a) => a.iter_mut().for_each(zeroize_value),
        Value::Object(m) => m.values_mut().for_each(zeroize_value),
        _ => {}
    }
}

/// `<mount>/<kind>/<prefix>/<path>` with every segment of `path` percent-encoded; `dir`
/// adds the trailing `/` a LIST wants and allows an empty path (the prefix itself).
pub(crate) fn kv_api_path(
    mount: &str,
    kind: &str,
    prefix: &str,
    path: &str,
    dir: bool,
) -> Result<String, BaoError> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() && !dir {
        return Err(BaoError::Invalid("empty KV path".into()));
    }
    let mut out = format!("{mount}/{kind}/{prefix}");
    if !trimmed.is_empty() {
        for seg in trimmed.split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(BaoError::Invalid(format!(
                    "KV path {path:?} has an empty, . or .. segment"
                )));
            }
            out.push('/');
            encode_segment(seg, &mut out);
        }
    }
    if dir {
        out.push('/');
    }
    Ok(out)
}

pub(crate) fn encode_segment(seg: &str, out: &mut String) {
    for b in seg.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}
