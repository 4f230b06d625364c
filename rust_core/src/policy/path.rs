//! Request path normalization, done once before routing and authorization (sans IO).
//!
//! Follows Envoy's HTTP connection manager: `path_with_escaped_slashes_action` first, then
//! `normalize_path` (RFC 3986 §6.2.2: percent-decoding of unreserved characters, `.` and `..`
//! segments removed, never above the root), then `merge_slashes`. The query string is never
//! touched. Whatever this returns is what routing, RBAC and the upstream all see, so a policy can
//! never judge a different path than the one the application receives.

use std::borrow::Cow;

use serde::Serialize;

/// What to do with `%2F` and `%5C` (any case) in a path (Envoy's PathWithEscapedSlashesAction,
/// minus UNESCAPE_AND_REDIRECT, which the decoder refuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EscapedSlashes {
    #[default]
    KeepUnchanged,
    RejectRequest,
    UnescapeAndForward,
}

/// The connection manager's path settings; the default changes nothing.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PathNormalization {
    /// RFC 3986 normalization (Envoy's `normalize_path`).
    pub normalize: bool,
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashes,
}

/// Why a path was refused; every refusal is answered with 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRejection {
    /// `%2F` or `%5C` under REJECT_REQUEST.
    EscapedSlash,
    /// `%00` or a raw control character (meshctl's own rule, see `normalize`).
    ControlCharacter,
}

impl PathRejection {
    pub fn message(self) -> &'static str {
        match self {
            PathRejection::EscapedSlash => "invalid path: percent-encoded slash or backslash (%2F, %5C)",
            PathRejection::ControlCharacter => "invalid path: NUL (%00) or control character",
        }
    }
}

impl PathNormalization {
    pub fn is_enabled(&self) -> bool {
        self.normalize || self.merge_slashes || self.escaped_slashes != EscapedSlashes::KeepUnchanged
    }

    /// Normalize a request target's path (`/a/b?q`); borrowed back when nothing changed.
    pub fn apply<'a>(&self, path_and_query: &'a str) -> Result<Cow<'a, str>, PathRejection> {
        if !self.is_enabled() {
            return Ok(Cow::Borrowed(path_and_query));
        }
        let (path, query) = match path_and_query.find('?') {
            Some(i) => path_and_query.split_at(i),
            None => (path_and_query, ""),
        };
        // `*` (OPTIONS) and CONNECT's empty path have no segments to normalize.
        if !path.starts_with('/') {
            return Ok(Cow::Borrowed(path_and_query));
        }
        let mut current: Cow<'_, str> = Cow::Borrowed(path);
        match self.escaped_slashes {
            EscapedSlashes::KeepUnchanged => {}
            EscapedSlashes::RejectRequest if has_escaped_slash(&current) => return Err(PathRejection::EscapedSlash),
            EscapedSlashes::RejectRequest => {}
            EscapedSlashes::UnescapeAndForward if has_escaped_slash(&current) => {
                current = Cow::Owned(unescape_slashes(&current));
            }
            EscapedSlashes::UnescapeAndForward => {}
        }
        if self.normalize {
            if let Cow::Owned(normalized) = normalize(&current)? {
                current = Cow::Owned(normalized);
            }
        }
        if self.merge_slashes && current.contains("//") {
            current = Cow::Owned(merge_slashes(&current));
        }
        if current == path {
            return Ok(Cow::Borrowed(path_and_query));
        }
        let mut rebuilt = current.into_owned();
        rebuilt.push_str(query);
        Ok(Cow::Owned(rebuilt))
    }
}

/// Normalize a request's path and query, keeping the original (shared bytes) when unchanged.
pub fn normalize_request_target(
    settings: &PathNormalization,
    original: http::uri::PathAndQuery,
) -> Result<http::uri::PathAndQuery, PathRejection> {
    let changed = match settings.apply(original.as_str())? {
        Cow::Borrowed(_) => None,
        Cow::Owned(changed) => Some(changed),
    };
    match changed {
        None => Ok(original),
        // Normalization only removes characters or decodes unreserved ones: still a valid target.
        Some(changed) => http::uri::PathAndQuery::try_from(changed).map_err(|_| PathRejection::ControlCharacter),
    }
}

fn hex_value(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|d| d as u8)
}

/// The byte a `%XY` at `at` stands for, if it is one.
fn escaped_byte(bytes: &[u8], at: usize) -> Option<u8> {
    if bytes.get(at) != Some(&b'%') {
        return None;
    }
    Some(hex_value(*bytes.get(at + 1)?)? * 16 + hex_value(*bytes.get(at + 2)?)?)
}

fn has_escaped_slash(path: &str) -> bool {
    let bytes = path.as_bytes();
    (0..bytes.len()).any(|i| matches!(escaped_byte(bytes, i), Some(b'/' | b'\\')))
}

fn unescape_slashes(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match escaped_byte(bytes, i) {
            Some(b @ (b'/' | b'\\')) => {
                out.push(b as char);
                i += 3;
            }
            _ => {
                // Copy up to the next '%' in one go; the path is ASCII-checked text already.
                let next = path[i + 1..].find('%').map_or(bytes.len(), |n| i + 1 + n);
                out.push_str(&path[i..next]);
                i = next;
            }
        }
    }
    out
}

/// RFC 3986 §2.3.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 normalization of an absolute path: unreserved characters decoded, every other
/// escape kept with upper-case hex, `\` read as `/` (as Envoy's Chromium-derived canonicalizer
/// does, so a Windows-minded upstream cannot be reached around a policy), then dot segments
/// removed.
///
/// meshctl's own rule, stricter than Envoy: `%00` and raw control characters (0x00-0x1F, 0x7F)
/// are refused rather than forwarded, because a NUL truncates the path in C-based applications
/// (the app would then serve a path the policy never judged) and no legitimate path needs one.
fn normalize(path: &str) -> Result<Cow<'_, str>, PathRejection> {
    let bytes = path.as_bytes();
    // Most paths need nothing: no escape, no backslash, no control character, no dot segment.
    if !path.contains("/.") && bytes.iter().all(|&b| b >= 0x20 && b != 0x7f && b != b'%' && b != b'\\') {
        return Ok(Cow::Borrowed(path));
    }
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte < 0x20 || byte == 0x7f {
            return Err(PathRejection::ControlCharacter);
        }
        match escaped_byte(bytes, i) {
            Some(0) => return Err(PathRejection::ControlCharacter),
            Some(value) if is_unreserved(value) => {
                decoded.push(value);
                i += 3;
            }
            Some(_) => {
                decoded.extend_from_slice(&[b'%', bytes[i + 1].to_ascii_uppercase(), bytes[i + 2].to_ascii_uppercase()]);
                i += 3;
            }
            // A stray '%' is passed on as it is, like Envoy does.
            None if byte == b'\\' => {
                decoded.push(b'/');
                i += 1;
            }
            None => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    // Only ASCII was decoded, and everything else was copied from a str.
    let decoded = String::from_utf8(decoded).expect("normalization keeps the path valid UTF-8");
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// RFC 3986 §5.2.4 for a path starting with '/': `..` at the root stays at the root, and a path
/// ending in `.` or `..` keeps its trailing slash.
///
/// Like Envoy, a `.` or `..` followed by `;parameters` is a dot segment too (its parameters are
/// dropped): servlet containers read `/x/..;/admin` as `/admin`, so forwarding it unchanged would
/// let it past a policy on `/admin`. Unlike Envoy, this also holds for an escaped `%2e%2e;`.
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut kept: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        let without_parameters = segment.split_once(';').map_or(*segment, |(name, _)| name);
        match without_parameters {
            "." => {}
            ".." => {
                kept.pop();
            }
            _ => {
                kept.push(segment);
                continue;
            }
        }
        if i == last {
            kept.push("");
        }
    }
    let mut out = String::with_capacity(path.len());
    out.push('/');
    out.push_str(&kept.join("/"));
    out
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inbound mesh setting: normalize, merge slashes, refuse escaped slashes.
    const MESH: PathNormalization =
        PathNormalization { normalize: true, merge_slashes: true, escaped_slashes: EscapedSlashes::RejectRequest };

    fn mesh(path: &str) -> Result<String, PathRejection> {
        MESH.apply(path).map(Cow::into_owned)
    }

    #[test]
    fn mesh_table() {
        use PathRejection::*;
        let table: &[(&str, Result<&str, PathRejection>)] = &[
            ("/admin", Ok("/admin")),
            ("//admin", Ok("/admin")),
            ("///admin//x", Ok("/admin/x")),
            ("/admin/", Ok("/admin/")),
            ("/%61dmin", Ok("/admin")),
            ("/%61%64%6D%69%6e", Ok("/admin")),
            ("/ADMIN", Ok("/ADMIN")),
            ("/admin;x", Ok("/admin;x")),
            ("/a/../admin", Ok("/admin")),
            ("/a/b/../../admin", Ok("/admin")),
            ("/admin%2Fx", Err(EscapedSlash)),
            ("/admin%2fx", Err(EscapedSlash)),
            ("/admin%5Cx", Err(EscapedSlash)),
            ("/admin%5cx", Err(EscapedSlash)),
            ("/%00", Err(ControlCharacter)),
            ("/admin%00.html", Err(ControlCharacter)),
            ("/a\u{1}b", Err(ControlCharacter)),
            ("/a\u{7f}b", Err(ControlCharacter)),
            ("/./admin", Ok("/admin")),
            ("/a/%2e%2e/admin", Ok("/admin")),
            ("/a/%2E%2e/admin", Ok("/admin")),
            ("/a/.%2e/admin", Ok("/admin")),
            ("/..", Ok("/")),
            ("/../..", Ok("/")),
            ("/../admin", Ok("/admin")),
            ("/.", Ok("/")),
            ("/a/..", Ok("/")),
            ("/a/b/..", Ok("/a/")),
            ("/a/./b/.", Ok("/a/b/")),
            ("/admin?x=/../y", Ok("/admin?x=/../y")),
            ("/a/../admin?x=%2F&y=//z", Ok("/admin?x=%2F&y=//z")),
            ("/a%2Fb?q", Err(EscapedSlash)),
            ("/%7e%2d%5f%2E", Ok("/~-_.")),
            ("/a%7bb", Ok("/a%7Bb")),
            ("/a%3fb", Ok("/a%3Fb")),
            ("/a%25%32%46b", Ok("/a%252Fb")),
            ("/100%", Ok("/100%")),
            ("/%zz", Ok("/%zz")),
            ("/a\\..\\admin", Ok("/admin")),
            ("/admin\\", Ok("/admin/")),
            ("/", Ok("/")),
            ("/...", Ok("/...")),
            ("/a/..b/c", Ok("/a/..b/c")),
            ("/admin/.", Ok("/admin/")),
            ("//..//admin", Ok("/admin")),
            ("*", Ok("*")),
            ("/x/..;/admin", Ok("/admin")),
            ("/x/..;x/public", Ok("/public")),
            ("/x/.;a=b/public", Ok("/x/public")),
            ("/x/%2e%2e;/admin", Ok("/admin")),
            ("/x/...;/public", Ok("/x/...;/public")),
            ("/x/a;/public", Ok("/x/a;/public")),
            ("/x/..%3b/public", Ok("/x/..%3B/public")),
            ("/x/y/..;", Ok("/x/")),
        ];
        assert!(table.len() >= 30);
        let mut failures = Vec::new();
        for (input, expected) in table {
            let got = mesh(input);
            if got.as_deref().map_err(|e| *e) != *expected {
                failures.push(format!("{input:?}: expected {expected:?}, got {got:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn unchanged_paths_are_borrowed() {
        assert!(matches!(MESH.apply("/a/b?c=/../d"), Ok(Cow::Borrowed(_))));
        assert!(matches!(PathNormalization::default().apply("//a/../%2f"), Ok(Cow::Borrowed("//a/../%2f"))));
    }

    #[test]
    fn keep_unchanged_leaves_escaped_slashes_as_data() {
        let keep = PathNormalization { normalize: true, merge_slashes: true, escaped_slashes: EscapedSlashes::KeepUnchanged };
        // The escaped slash is not a separator, so `..` removes the whole `a%2F..` segment's
        // predecessor only; hex case is canonicalized.
        assert_eq!(keep.apply("/admin%2fx").unwrap(), "/admin%2Fx");
        assert_eq!(keep.apply("/x/a%2F..%2Fadmin").unwrap(), "/x/a%2F..%2Fadmin");
    }

    #[test]
    fn unescape_and_forward_turns_escaped_slashes_into_separators() {
        let forward =
            PathNormalization { normalize: true, merge_slashes: true, escaped_slashes: EscapedSlashes::UnescapeAndForward };
        assert_eq!(forward.apply("/a%2F..%2Fadmin").unwrap(), "/admin");
        assert_eq!(forward.apply("/admin%5Cx").unwrap(), "/admin/x");
        assert_eq!(forward.apply("/admin%2f%2Fx?q=%2F").unwrap(), "/admin/x?q=%2F");
    }

    #[test]
    fn each_setting_alone() {
        let merge_only = PathNormalization { merge_slashes: true, ..Default::default() };
        assert_eq!(merge_only.apply("//a/./%61//b").unwrap(), "/a/./%61/b");
        let normalize_only = PathNormalization { normalize: true, ..Default::default() };
        assert_eq!(normalize_only.apply("//a/../%61").unwrap(), "//a");
        let reject_only = PathNormalization { escaped_slashes: EscapedSlashes::RejectRequest, ..Default::default() };
        assert_eq!(reject_only.apply("/a%2F"), Err(PathRejection::EscapedSlash));
        // NUL refusal belongs to normalize_path.
        assert_eq!(reject_only.apply("/a%00").unwrap(), "/a%00");
    }
}
