//! Container detection by magic bytes. A Koffer bundle named `.tar.xz` is usually gzip:
//! names lie, bytes do not.

use std::{fmt, io::Read, path::Path};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Squashfs,
    Tar,
    Gzip,
    Zstd,
    Xz,
    Unknown,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Squashfs => "squashfs",
            Format::Tar => "tar",
            Format::Gzip => "gzip",
            Format::Zstd => "zstd",
            Format::Xz => "xz",
            Format::Unknown => "unknown",
        })
    }
}

/// Detects the format from the first bytes of a file (at least 262 for tar).
pub fn detect_bytes(head: &[u8]) -> Format {
    if head.starts_with(b"hsqs") {
        Format::Squashfs
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Format::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Format::Zstd
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Format::Xz
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Format::Tar
    } else {
        Format::Unknown
    }
}

/// Detects the format of the file at `path`.
pub fn detect(path: &Path) -> Result<Format> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let mut head = Vec::with_capacity(512);
    std::fs::File::open(path)
        .map_err(io)?
        .take(512)
        .read_to_end(&mut head)
        .map_err(io)?;
    Ok(detect_bytes(&head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_bytes_decide() {
        assert_eq!(detect_bytes(b"hsqs\0\0\0\0"), Format::Squashfs);
        assert_eq!(detect_bytes(&[0x1f, 0x8b, 8, 0]), Format::Gzip);
        assert_eq!(detect_bytes(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Format::Zstd);
        assert_eq!(detect_bytes(b"\xfd7zXZ\0rest"), Format::Xz);
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        assert_eq!(detect_bytes(&tar), Format::Tar);
        assert_eq!(detect_bytes(b"PK\x03\x04"), Format::Unknown);
        assert_eq!(detect_bytes(b""), Format::Unknown);
    }
}
