//! HTTP request paths as the upstream will see them. An edge rule such as `deny path_prefix =
//! "/admin"` is only as good as the agreement between what the proxy compares and what the
//! upstream serves: nginx, Envoy, Tomcat and friends decode `%XX`, merge `//`, resolve `.` and `..`
//! and sometimes treat `\` or `;` specially, so `//admin`, `/./admin`, `/x/../admin`, `/%61dmin`
//! and `/%2e/admin` all reach `/admin` there. [`normalize`] turns a request path into the one
//! canonical spelling the proxy both matches and forwards (RFC 3986 §6.2.2 plus slash merging,
//! like Envoy's `normalize_path` + `merge_slashes`), and refuses the spellings whose meaning
//! differs between servers (Envoy's `path_with_escaped_slashes_action = REJECT_REQUEST`, the
//! lesson of CVE-2019-9901 and CVE-2021-29492):
//!
//! - `%XX` of an unreserved character (`A-Z a-z 0-9 - . _ ~`) is decoded; every other escape
//!   is kept with upper-case hex digits (so `%3f` and `%3F` are one spelling);
//! - an encoded `/` or `\` (`%2F`, `%5C`) is refused, or with [`EscapedSlashes::Keep`] kept
//!   encoded and never treated as a separator (only for upstreams that do not decode it);
//! - a raw `\`, a malformed escape, an encoded or raw control character or NUL, and anything
//!   outside printable ASCII are refused;
//! - empty segments are merged (`//` → `/`), then `.` and `..` segments resolved (`..` never
//!   climbs above the root);
//! - a segment that is empty, `.` or `..` once its `;parameters` are cut (`/..;/admin`,
//!   `/;x/admin`: Tomcat and Spring resolve those) is refused.
//!
//! Pure functions; the edge proxy calls them for every plaintext HTTP request.

use std::fmt;

/// What to do with `%2F` and `%5C` in a path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    /// Refuse the request (default): upstreams disagree on whether `%2F` separates segments.
    #[default]
    Reject,
    /// Keep them encoded, as data inside a segment. Only safe in front of upstreams that never
    /// decode them (nginx does decode them).
    Keep,
}

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not an origin-form path (does not start with `/`).
    NotAbsolute,
    /// `%2F` (encoded `/`) or `%5C` (encoded `\`).
    EncodedSlash,
    /// A raw `\`.
    Backslash,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// A control character, NUL, space or non-ASCII byte, raw or encoded.
    BadCharacter,
    /// A segment that is empty, `.` or `..` before its `;` parameters.
    DotSegmentWithParameters,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the path does not start with '/'",
            PathError::EncodedSlash => {
                "an encoded '/' or '\\' (%2F, %5C) is ambiguous: upstreams disagree on whether it separates segments"
            }
            PathError::Backslash => "a '\\' in the path is ambiguous: some upstreams read it as '/'",
            PathError::BadEscape => "a '%' not followed by two hex digits",
            PathError::BadCharacter => "a control, space or non-ASCII character in the path",
            PathError::DotSegmentWithParameters => {
                "a segment that is empty, '.' or '..' before ';' parameters is ambiguous (Tomcat resolves it)"
            }
        })
    }
}

impl std::error::Error for PathError {}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The canonical spelling of `path` (the part of a request target before `?`), or why it is
/// refused. See the module documentation for the rules.
pub fn normalize(path: &str, slashes: EscapedSlashes) -> Result<String, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Pass 1: escapes. Decoded unreserved characters become plain; the rest stay encoded with
    // upper-case hex. Separators are only the raw '/' left after this pass.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let v = (h << 4) | l;
                if is_unreserved(v) {
                    decoded.push(v as char);
                } else if v == b'/' || v == b'\\' {
                    if slashes == EscapedSlashes::Reject {
                        return Err(PathError::EncodedSlash);
                    }
                    decoded.push_str(&format!("%{v:02X}"));
                } else if v < 0x20 || v == 0x7f {
                    return Err(PathError::BadCharacter);
                } else {
                    decoded.push_str(&format!("%{v:02X}"));
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            0x21..=0x7e => {
                decoded.push(c as char);
                i += 1;
            }
            _ => return Err(PathError::BadCharacter),
        }
    }
    // Pass 2: merge slashes, resolve dot segments.
    let trailing = decoded.ends_with('/')
        || decoded
            .rsplit('/')
            .next()
            .is_some_and(|last| last == "." || last == "..");
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        if let Some((before, _)) = seg.split_once(';') {
            if matches!(before, "" | "." | "..") {
                return Err(PathError::DotSegmentWithParameters);
            }
        }
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(decoded.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() || trailing {
        s.push('/');
    }
    Ok(s)
}

/// Whether `path` starts with `prefix`, ASCII case-insensitively when `ignore_case`.
pub fn has_prefix(path: &str, prefix: &str, ignore_case: bool) -> bool {
    if ignore_case {
        path.len() >= prefix.len()
            && path.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    } else {
        path.starts_with(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p, EscapedSlashes::Reject)
    }

    #[test]
    fn every_spelling_of_admin_is_admin() {
        for p in [
            "/admin",
            "//admin",
            "///admin",
            "/./admin",
            "/x/../admin",
            "/x/y/../../admin",
            "/%61dmin",
            "/%61%64%6D%69%6E",
            "/%2e/admin",
            "/%2E%2E/admin",
            "/x/%2e%2e/admin",
            "/../admin",
            "/../../admin",
            "/.//./admin",
        ] {
            assert_eq!(n(p).as_deref(), Ok("/admin"), "{p}");
        }
        assert_eq!(n("/admin/").as_deref(), Ok("/admin/"));
        assert_eq!(n("//admin//users").as_deref(), Ok("/admin/users"));
        assert_eq!(n("/admin/users/..").as_deref(), Ok("/admin/"));
        assert_eq!(n("/admin/.").as_deref(), Ok("/admin/"));
    }

    #[test]
    fn roots_and_plain_paths() {
        assert_eq!(n("/").as_deref(), Ok("/"));
        assert_eq!(n("/..").as_deref(), Ok("/"));
        assert_eq!(n("/.").as_deref(), Ok("/"));
        assert_eq!(n("//").as_deref(), Ok("/"));
        assert_eq!(n("/a/b.c/d-e_f~g").as_deref(), Ok("/a/b.c/d-e_f~g"));
        // '.' inside a segment is data.
        assert_eq!(n("/a/..b/.c").as_deref(), Ok("/a/..b/.c"));
        // Parameters on an ordinary segment are data.
        assert_eq!(n("/a;v=1/b").as_deref(), Ok("/a;v=1/b"));
    }

    #[test]
    fn reserved_escapes_stay_encoded_in_one_spelling() {
        assert_eq!(n("/a%3fb").as_deref(), Ok("/a%3Fb"));
        assert_eq!(n("/a%3Fb").as_deref(), Ok("/a%3Fb"));
        assert_eq!(n("/a%20b").as_deref(), Ok("/a%20b"));
        // %25 is '%': kept encoded, so a double-encoded dot stays data, never a dot segment.
        assert_eq!(n("/%252e/admin").as_deref(), Ok("/%252e/admin"));
        assert_eq!(n("/caf%C3%A9").as_deref(), Ok("/caf%C3%A9"));
    }

    #[test]
    fn ambiguous_spellings_are_refused() {
        assert_eq!(n("/%2Fadmin"), Err(PathError::EncodedSlash));
        assert_eq!(n("/x%2f..%2fadmin"), Err(PathError::EncodedSlash));
        assert_eq!(n("/%5Cadmin"), Err(PathError::EncodedSlash));
        assert_eq!(n("/\\admin"), Err(PathError::Backslash));
        assert_eq!(n("/x\\..\\admin"), Err(PathError::Backslash));
        assert_eq!(n("/%zzadmin"), Err(PathError::BadEscape));
        assert_eq!(n("/admin%2"), Err(PathError::BadEscape));
        assert_eq!(n("/admin%"), Err(PathError::BadEscape));
        assert_eq!(n("/adm%00in"), Err(PathError::BadCharacter));
        assert_eq!(n("/adm%0ain"), Err(PathError::BadCharacter));
        assert_eq!(n("/adm%7fin"), Err(PathError::BadCharacter));
        assert_eq!(n("/adm in"), Err(PathError::BadCharacter));
        assert_eq!(n("/adm\u{e9}in"), Err(PathError::BadCharacter));
        assert_eq!(n("/x/..;/admin"), Err(PathError::DotSegmentWithParameters));
        assert_eq!(n("/;x/admin"), Err(PathError::DotSegmentWithParameters));
        assert_eq!(n("/.;x/admin"), Err(PathError::DotSegmentWithParameters));
        assert_eq!(n("admin"), Err(PathError::NotAbsolute));
        assert_eq!(n(""), Err(PathError::NotAbsolute));
        assert_eq!(n("*"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn escaped_slashes_can_be_kept_as_data() {
        let k = |p| normalize(p, EscapedSlashes::Keep);
        assert_eq!(
            k("/api/group%2fproject").as_deref(),
            Ok("/api/group%2Fproject")
        );
        // Kept encoded, so never a separator: no dot segment forms across it.
        assert_eq!(k("/x%2F..%2Fadmin").as_deref(), Ok("/x%2F..%2Fadmin"));
        assert_eq!(k("/a%5Cb").as_deref(), Ok("/a%5Cb"));
        assert_eq!(k("/a\\b"), Err(PathError::Backslash));
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for p in ["/a/./b/../c//d/", "/%61%2e/x", "/x%3f", "/"] {
            let once = n(p).unwrap();
            assert_eq!(n(&once).unwrap(), once, "{p}");
        }
    }

    #[test]
    fn prefixes_with_and_without_case() {
        assert!(has_prefix("/admin/x", "/admin", false));
        assert!(!has_prefix("/Admin/x", "/admin", false));
        assert!(has_prefix("/Admin/x", "/admin", true));
        assert!(has_prefix("/ADMIN", "/admin", true));
        assert!(!has_prefix("/adm", "/admin", true));
        assert!(!has_prefix("/\u{e9}dmin", "/admin", true));
    }
}
