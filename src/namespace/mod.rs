//! Namespace strings, fstab text, and the mount/bind/unshare calls behind a trait.
//!
//! The client turns `-namespace` (and `-fstab`) into the CPU_FSTAB text (spec 3.5); the remote
//! side parses that text and applies it in the session's private mount namespace (spec 5.4).
//!
//! - [`fstab`]: fstab lines and mount option translation (pure).
//! - [`ops`]: the [`MountOps`] trait over every privileged call, and [`SystemOps`], the real one.
//! - [`recording`]: [`RecordingOps`], the recording test double.
//! - [`session`]: the setup sequence of `cpud -remote` ([`prepare_session`]).

pub mod fstab;
pub mod ops;
pub mod recording;
pub mod session;

pub use fstab::{parse_fstab, translate_options, FstabEntry, MountOptions, MsFlags};
pub use ops::{BindSource, MountOps, PathKind, SystemOps};
pub use recording::{Call, RecordingOps};
pub use session::{prepare_session, Prepared, SessionSettings};

use std::path::Path;

use crate::error::{Error, Result};
use crate::protocol::MOUNT_POINT;

/// One element of a namespace string: the client's `source` shown at the server's `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Where the directory appears on the server.
    pub target: String,
    /// The client path (relative to the 9P root) that is shown there.
    pub source: String,
}

/// Parses a colon-separated namespace string (`P` or `T=S` elements). Empty or `none`: no
/// binds (the Go client treats `none` as a path; we treat it as the help text promises).
pub fn parse_namespace(namespace: &str) -> Result<Vec<Bind>> {
    if namespace.is_empty() || namespace == "none" {
        return Ok(Vec::new());
    }
    namespace
        .split(':')
        .map(|element| {
            let (target, source) = element.split_once('=').unwrap_or((element, element));
            if target.is_empty() || source.is_empty() {
                return Err(Error::Usage(format!(
                    "bad -namespace element {element:?} in {namespace:?}: want PATH or TARGET=SOURCE, separated by ':'"
                )));
            }
            Ok(Bind { target: target.to_string(), source: source.to_string() })
        })
        .collect()
}

/// Lexically cleans a path like Go's path.Clean: `//`, `.` and `..` resolved.
pub fn clean_path(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    match (absolute, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

/// The fstab the client sends as CPU_FSTAB (spec 3.5): the `-fstab` file's contents, then one
/// bind line per namespace element, joined with newlines, ending in one newline.
pub fn client_fstab(namespace: &str, fstab_file: Option<&str>) -> Result<String> {
    fstab_with_sources(namespace, fstab_file, |source| source.to_string())
}

/// [`client_fstab`] with each bind source's symlinks resolved here, on the client, inside the
/// export `root`: `/lib` becomes `/usr/lib` where the client's /lib is a link to `usr/lib`.
/// The remote then binds the real directory without walking, stat-ing and reading the link
/// over 9P (3 round trips per link: 9 of a session's requests on a merged-/usr client), and an
/// absolute link means the client's directory, not the remote's. A source that does not
/// resolve, or resolves outside the root, is sent as it is.
pub fn client_fstab_resolved(namespace: &str, fstab_file: Option<&str>, root: &Path) -> Result<String> {
    let root = std::fs::canonicalize(root).ok();
    fstab_with_sources(namespace, fstab_file, |source| match &root {
        Some(root) => resolve_in_root(root, source).unwrap_or_else(|| source.to_string()),
        None => source.to_string(),
    })
}

/// `source` (a path under the export root) with its symlinks resolved, if it stays inside.
fn resolve_in_root(root: &Path, source: &str) -> Option<String> {
    let relative = clean_path(&format!("/{source}"));
    let real = std::fs::canonicalize(root.join(relative.trim_start_matches('/'))).ok()?;
    let inside = real.strip_prefix(root).ok()?;
    Some(format!("/{}", inside.to_str()?))
}

fn fstab_with_sources(
    namespace: &str,
    fstab_file: Option<&str>,
    source: impl Fn(&str) -> String,
) -> Result<String> {
    let binds = parse_namespace(namespace)?;
    let bind_lines: Vec<String> = binds
        .iter()
        .map(|b| {
            format!(
                "{} {} none defaults,bind 0 0",
                clean_path(&format!("{MOUNT_POINT}/{}", source(&b.source))),
                b.target
            )
        })
        .collect();
    let pieces = [fstab_file.unwrap_or("").trim_matches('\n').to_string(), bind_lines.join("\n")];
    Ok(format!("{}\n", pieces.join("\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_namespace_matches_go() {
        let f = client_fstab(crate::options::DEFAULT_NAMESPACE, None).unwrap();
        assert_eq!(
            f,
            "\n/tmp/cpu/lib /lib none defaults,bind 0 0\n/tmp/cpu/lib64 /lib64 none defaults,bind 0 0\n\
/tmp/cpu/usr /usr none defaults,bind 0 0\n/tmp/cpu/bin /bin none defaults,bind 0 0\n\
/tmp/cpu/etc /etc none defaults,bind 0 0\n/tmp/cpu/home /home none defaults,bind 0 0\n"
        );
    }

    #[test]
    fn target_equals_source_and_fstab_file() {
        let f = client_fstab("/bin=/home/me/arm64/bin", Some("\nproc /proc proc defaults 0 0\n")).unwrap();
        assert_eq!(
            f,
            "proc /proc proc defaults 0 0\n/tmp/cpu/home/me/arm64/bin /bin none defaults,bind 0 0\n"
        );
        assert_eq!(client_fstab("", None).unwrap(), "\n\n");
        assert_eq!(client_fstab("none", None).unwrap(), "\n\n");
    }

    #[test]
    fn syntax_errors() {
        for bad in ["a::b", ":a", "a:", "=x", "x="] {
            assert!(matches!(client_fstab(bad, None), Err(Error::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn sources_resolved_on_the_client_inside_the_root() {
        let root = std::env::temp_dir().join(format!("cpu-fstab-resolve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::create_dir_all(root.join("home")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink(root.join("usr/lib"), root.join("abs")).unwrap();
        std::os::unix::fs::symlink("/", root.join("out")).unwrap();
        let f = client_fstab_resolved("/lib:/abs:/home:/out:/nosuch:/x=/lib/", None, &root).unwrap();
        assert_eq!(
            f,
            "\n/tmp/cpu/usr/lib /lib none defaults,bind 0 0\n/tmp/cpu/usr/lib /abs none defaults,bind 0 0\n\
/tmp/cpu/home /home none defaults,bind 0 0\n/tmp/cpu/out /out none defaults,bind 0 0\n\
/tmp/cpu/nosuch /nosuch none defaults,bind 0 0\n/tmp/cpu/usr/lib /x none defaults,bind 0 0\n"
        );
        // The root itself, and an unreadable root: unchanged.
        assert_eq!(
            client_fstab_resolved("/=/", None, &root).unwrap(),
            "\n/tmp/cpu / none defaults,bind 0 0\n"
        );
        assert_eq!(
            client_fstab_resolved("/lib", None, &root.join("nosuch")).unwrap(),
            client_fstab("/lib", None).unwrap()
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn clean() {
        assert_eq!(clean_path("/tmp/cpu//a/./b/../c"), "/tmp/cpu/a/c");
        assert_eq!(clean_path("/tmp/cpu/../../.."), "/");
        assert_eq!(clean_path("a/../.."), "..");
    }
}
