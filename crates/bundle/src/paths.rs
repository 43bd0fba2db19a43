//! Paths inside a bundle: every one is relative to the bundle's root, `/`-separated, with
//! no `.` or `..` component. Anything that would reach outside the root is refused.

use crate::{Error, Result};

/// Normalises a member path as an archive stores it (`./a/b/`, `a//b`) to `a/b`.
/// Refuses absolute paths, `..` components and paths over `max_bytes`.
pub fn member(raw: &[u8], max_bytes: usize) -> Result<String> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    if raw.len() > max_bytes {
        return Err(Error::Hostile(format!(
            "a member path is {} bytes long, over the limit of {max_bytes}",
            raw.len()
        )));
    }
    let s = std::str::from_utf8(raw)
        .map_err(|_| Error::Hostile(format!("member path {:?} is not UTF-8", shown())))?;
    if s.starts_with('/') {
        return Err(Error::Hostile(format!(
            "member {s:?} has an absolute path: it would write outside the bundle"
        )));
    }
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(Error::Hostile(format!(
                    "member {s:?} has a `..` component: it would reach outside the bundle"
                )));
            }
            c if c.contains('\0') => {
                return Err(Error::Hostile(format!("member {s:?} has a NUL byte")));
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Where the symbolic link at `link` (a normalised path) points, as a normalised path.
/// A target that is absolute or climbs above the root is refused.
pub fn link_target(link: &str, target: &str) -> Result<String> {
    let escapes = || {
        Error::Hostile(format!(
            "symbolic link {link:?} points outside the bundle (to {target:?})"
        ))
    };
    if target.starts_with('/') {
        return Err(escapes());
    }
    let mut parts: Vec<&str> = link.split('/').collect();
    parts.pop(); // the link's own name
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop().ok_or_else(escapes)?;
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_normalised_and_confined() {
        assert_eq!(member(b"./a//b/", 100).unwrap(), "a/b");
        assert_eq!(member(b"a/./b", 100).unwrap(), "a/b");
        for bad in [&b"/etc/passwd"[..], b"a/../../x", b"..", b"a/\xff"] {
            assert!(member(bad, 100).is_err(), "{bad:?}");
        }
        assert!(member(&[b'a'; 101], 100).is_err());
    }

    #[test]
    fn links_stay_inside() {
        assert_eq!(link_target("a/b/l", "../c").unwrap(), "a/c");
        assert_eq!(link_target("a/l", "./x/y").unwrap(), "a/x/y");
        assert!(link_target("a/l", "../../etc/shadow").is_err());
        assert!(link_target("l", "/etc/shadow").is_err());
    }
}
