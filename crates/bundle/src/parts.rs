//! A bundle stored as one file or as several parts (oc-mirror's `mirror_000001.tar`, …,
//! or `split` pieces), read as the concatenation of its parts, in order. Reads are
//! positional (`pread`), so any number of readers share the files without a lock.

use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use crate::{Error, Result};

pub struct MultiFile {
    /// (file, offset of its first byte in the whole, its length)
    parts: Vec<(File, u64, u64)>,
    len: u64,
    name: String,
}

impl MultiFile {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut parts = Vec::with_capacity(paths.len());
        let mut len = 0;
        for p in paths {
            let io = |source| Error::Io {
                path: p.display().to_string(),
                source,
            };
            let f = File::open(p).map_err(io)?;
            let n = f.metadata().map_err(io)?.len();
            parts.push((f, len, n));
            len += n;
        }
        let name = match paths {
            [one] => one.display().to_string(),
            _ => format!(
                "{} parts starting with {}",
                paths.len(),
                paths
                    .first()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        };
        Ok(MultiFile { parts, len, name })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads at `offset` of the whole, crossing into the next part as needed. Returns 0
    /// only at the end.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let i = self.parts.partition_point(|(_, start, _)| *start <= offset) - 1;
        let (file, start, n) = &self.parts[i];
        let within = offset - start;
        let want = buf.len().min((n - within) as usize);
        file.read_at(&mut buf[..want], within)
    }

    /// A reader of `len` bytes from `offset`.
    pub fn range(&self, offset: u64, len: u64) -> RangeReader<'_> {
        RangeReader {
            file: self,
            pos: offset,
            end: offset.saturating_add(len),
        }
    }

    /// A seekable reader of the whole.
    pub fn cursor(&self) -> RangeReader<'_> {
        self.range(0, self.len)
    }
}

/// Reads a byte range of a [`MultiFile`]; seeks are relative to the whole.
pub struct RangeReader<'a> {
    file: &'a MultiFile,
    pos: u64,
    end: u64,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(self.end.saturating_sub(self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} ends before byte {}", self.file.name, self.end),
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for RangeReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let next = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.end.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = next.ok_or_else(|| io::Error::other("seek out of range"))?;
        Ok(self.pos)
    }
}

/// The files of the bundle stored at `path`: the file itself, or the parts of a
/// multi-part bundle, which are exactly `000001`, `000002`, ... with no gap. Anything
/// else in the directory fails the bundle: a parts directory is made by ingest from the
/// parts a completion named, and a stray file must never be read as part of it.
pub fn part_paths(path: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    if !std::fs::metadata(path).map_err(io)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut numbered = Vec::new();
    for e in std::fs::read_dir(path).map_err(io)? {
        let e = e.map_err(io)?;
        let name = e.file_name().to_string_lossy().into_owned();
        let n = part_number(&name)
            .filter(|_| e.file_type().is_ok_and(|t| t.is_file()))
            .ok_or_else(|| {
                Error::Layout(format!(
                    "{} holds {name:?}, which is not a part (000001, 000002, ...)",
                    path.display()
                ))
            })?;
        numbered.push((n, e.path()));
    }
    numbered.sort();
    if numbered.is_empty() {
        return Err(Error::Layout(format!("{} holds no parts", path.display())));
    }
    for (i, (n, _)) in numbered.iter().enumerate() {
        if *n as usize != i + 1 {
            return Err(Error::Layout(format!(
                "{} lacks part {}",
                path.display(),
                i + 1
            )));
        }
    }
    Ok(numbered.into_iter().map(|(_, p)| p).collect())
}

/// The number of a part file's name (`000042` is 42).
pub fn part_number(name: &str) -> Option<u32> {
    (name.len() == 6 && name.bytes().all(|b| b.is_ascii_digit()))
        .then(|| name.parse().ok())
        .flatten()
        .filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_across_parts() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = vec![];
        for (i, s) in ["abc", "", "defg", "h"].iter().enumerate() {
            let p = dir.path().join(format!("{:06}", i + 1));
            std::fs::write(&p, s).unwrap();
            paths.push(p);
        }
        let mf = MultiFile::open(&paths).unwrap();
        assert_eq!(mf.len(), 8);
        let mut s = String::new();
        mf.cursor().read_to_string(&mut s).unwrap();
        assert_eq!(s, "abcdefgh");
        let mut s = String::new();
        mf.range(2, 4).read_to_string(&mut s).unwrap();
        assert_eq!(s, "cdef");
        let mut short = mf.range(6, 5);
        let mut v = vec![];
        assert!(short.read_to_end(&mut v).is_err());
        assert_eq!(part_paths(dir.path()).unwrap(), paths);
    }

    #[test]
    fn a_parts_directory_is_exactly_its_numbered_parts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("000001"), "a").unwrap();
        std::fs::write(dir.path().join("000003"), "c").unwrap();
        let e = part_paths(dir.path()).unwrap_err().to_string();
        assert!(e.ends_with("lacks part 2"), "{e}");
        std::fs::write(dir.path().join("000002"), "b").unwrap();
        assert_eq!(part_paths(dir.path()).unwrap().len(), 3);
        std::fs::write(dir.path().join("index.json"), "{}").unwrap();
        let e = part_paths(dir.path()).unwrap_err().to_string();
        assert!(e.contains("\"index.json\", which is not a part"), "{e}");
        assert_eq!(part_number("000000"), None);
        assert_eq!(part_number("00001"), None);
    }
}
