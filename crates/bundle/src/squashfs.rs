//! Squashfs bundles, read in place with backhand: the inode tree is parsed once at open,
//! then any file streams out on demand (Read), nothing is extracted to disk.
//! backhand is synchronous: call this from a blocking thread.
//!
//! At open every symbolic link is checked to stay inside the image, and the number of
//! entries is bounded.
//!
//! A file whose data the image stores uncompressed (as mksquashfs stores layers, which
//! compression does not shrink) is read straight from the image file with positioned
//! reads of its runs (its blocks, one after another, and the tail in an uncompressed
//! fragment): no decompression path, no lock shared with other readers (backhand reads
//! through one), and a `Range` goes straight to its first byte. Any other file (compressed
//! blocks, holes, a compressed fragment) is read by backhand.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, BufReader, Read},
    os::unix::fs::FileExt as _,
    path::Path,
};

use backhand::{DataSize, FilesystemReader, InnerNode, SquashfsFileReader};

use crate::{BundleFs, Error, Limits, Result, catalog::Location, paths};

pub struct SquashfsBundle {
    fs: FilesystemReader<'static>,
    /// The image file, for positioned reads of files stored uncompressed.
    image: File,
    image_len: u64,
    /// Path relative to the root (no leading `/`) → index in `fs.root.nodes`.
    by_path: HashMap<String, usize>,
    /// Symbolic links: path → target, resolved inside the image.
    links: HashMap<String, String>,
}

/// Symbolic links followed at most this many times for one path.
const MAX_HOPS: usize = 8;

impl SquashfsBundle {
    pub fn open(path: &Path, limits: &Limits) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let image = file.try_clone().map_err(io)?;
        let image_len = image.metadata().map_err(io)?.len();
        let fs = FilesystemReader::from_reader(BufReader::new(file))
            .map_err(|e| Error::Squashfs(e.to_string()))?;
        let n = fs.root.nodes.len() as u64;
        if n > limits.max_entries {
            return Err(Error::Hostile(format!(
                "the squashfs image has {n} entries, over the limit of {} (maxEntries)",
                limits.max_entries
            )));
        }
        let mut by_path = HashMap::with_capacity(n as usize);
        let mut links = HashMap::new();
        for (i, node) in fs.root.nodes.iter().enumerate() {
            let p = node.fullpath.to_string_lossy();
            let p = paths::member(p.trim_start_matches('/').as_bytes(), limits.max_path_bytes)?;
            if let InnerNode::Symlink(s) = &node.inner {
                let target = paths::link_target(&p, &s.link.to_string_lossy())?;
                links.insert(p.clone(), target);
            }
            by_path.insert(p, i);
        }
        Ok(SquashfsBundle {
            fs,
            image,
            image_len,
            by_path,
            links,
        })
    }

    /// Where the bytes of `f` are in the image file, when every one of them is stored
    /// there as it is: its data blocks (each uncompressed, full but perhaps the last,
    /// one after another from `blocks_start`) and its tail in an uncompressed fragment.
    /// `None` for anything else, and for numbers that do not add up (a damaged or
    /// hostile image is left to backhand's checks).
    fn runs(&self, f: &SquashfsFileReader) -> Option<Vec<(u64, u64)>> {
        const NO_FRAGMENT: u32 = 0xffff_ffff;
        let (start, size, frag, frag_offset, blocks): (u64, u64, u32, u32, &[DataSize]) = match f {
            SquashfsFileReader::Basic(b) => (
                u64::from(b.blocks_start),
                u64::from(b.file_size),
                b.frag_index,
                b.block_offset,
                &b.block_sizes,
            ),
            SquashfsFileReader::Extended(e) => (
                e.blocks_start,
                e.file_size,
                e.frag_index,
                e.block_offset,
                &e.block_sizes,
            ),
        };
        let block = u64::from(self.fs.block_size);
        let mut runs: Vec<(u64, u64)> = Vec::with_capacity(2);
        let mut at = start;
        let mut left = size;
        for (i, b) in blocks.iter().enumerate() {
            let n = u64::from(b.size());
            let last = i + 1 == blocks.len() && frag == NO_FRAGMENT;
            let want = if last { left } else { block.min(left) };
            if !b.uncompressed() || n == 0 || n != want {
                return None;
            }
            match runs.last_mut() {
                Some((s, l)) if *s + *l == at => *l += n,
                _ => runs.push((at, n)),
            }
            at = at.checked_add(n)?;
            left -= n;
        }
        if frag != NO_FRAGMENT {
            let fragment = self.fs.fragments.as_ref()?.get(frag as usize)?;
            let end = u64::from(frag_offset).checked_add(left)?;
            if !fragment.size.uncompressed() || end > u64::from(fragment.size.size()) {
                return None;
            }
            runs.push((fragment.start.checked_add(u64::from(frag_offset))?, left));
            left = 0;
        }
        let inside = runs
            .iter()
            .all(|(s, l)| s.checked_add(*l).is_some_and(|e| e <= self.image_len));
        (left == 0 && inside).then_some(runs)
    }

    /// Is the file at `path` read straight from the image (stored uncompressed)?
    pub fn stored_in_place(&self, path: &str) -> bool {
        self.file(path)
            .is_ok_and(|(_, i)| match &self.fs.root.nodes[i].inner {
                InnerNode::File(f) => self.runs(f).is_some(),
                _ => false,
            })
    }

    /// Number of entries (files, directories, links) in the image.
    pub fn entries(&self) -> usize {
        self.fs.root.nodes.len()
    }

    /// The regular file at `path` (after links): its resolved path and node index.
    fn file(&self, path: &str) -> Result<(String, usize)> {
        let mut p = path.to_string();
        for _ in 0..MAX_HOPS {
            if let Some(t) = self.links.get(&p) {
                p = t.clone();
                continue;
            }
            let i = *self
                .by_path
                .get(&p)
                .ok_or_else(|| Error::Missing(path.to_string()))?;
            return match self.fs.root.nodes[i].inner {
                InnerNode::File(_) => Ok((p, i)),
                _ => Err(Error::NotAFile(path.to_string())),
            };
        }
        Err(Error::Hostile(format!(
            "{path:?} goes through more than {MAX_HOPS} symbolic links"
        )))
    }
}

impl BundleFs for SquashfsBundle {
    fn open(&self, path: &str) -> Result<(Box<dyn Read + '_>, u64)> {
        let (p, i) = self.file(path)?;
        let InnerNode::File(f) = &self.fs.root.nodes[i].inner else {
            return Err(Error::NotAFile(path.to_string()));
        };
        if let Some(runs) = self.runs(f) {
            return Ok((
                Box::new(Runs::new(&self.image, runs, 0)),
                f.file_len() as u64,
            ));
        }
        let reader = self
            .fs
            .file(f)
            .reader_checked()
            .map_err(|e| Error::read(&p, e))?;
        Ok((Box::new(reader), f.file_len() as u64))
    }

    fn open_from(&self, path: &str, start: u64) -> Result<(Box<dyn Read + '_>, u64)> {
        let (p, i) = self.file(path)?;
        let InnerNode::File(f) = &self.fs.root.nodes[i].inner else {
            return Err(Error::NotAFile(path.to_string()));
        };
        let len = f.file_len() as u64;
        if let Some(runs) = self.runs(f) {
            return Ok((Box::new(Runs::new(&self.image, runs, start.min(len))), len));
        }
        let (mut reader, len) = self.open(&p)?;
        io::copy(&mut (&mut reader).take(start), &mut io::sink())
            .map_err(|e| Error::read(&p, e))?;
        Ok((reader, len))
    }

    fn exists(&self, path: &str) -> bool {
        self.file(path).is_ok()
    }

    fn files(&self) -> Vec<&str> {
        self.by_path.keys().map(String::as_str).collect()
    }

    fn locate(&self, path: &str) -> Result<(Location, u64)> {
        let (p, i) = self.file(path)?;
        let InnerNode::File(f) = &self.fs.root.nodes[i].inner else {
            return Err(Error::NotAFile(path.to_string()));
        };
        Ok((Location::Path { path: p }, f.file_len() as u64))
    }
}

/// Positioned reads of a file's runs in the image (no shared file position).
struct Runs<'a> {
    image: &'a File,
    runs: Vec<(u64, u64)>,
    /// The run being read, and how far into it.
    run: usize,
    into: u64,
}

impl<'a> Runs<'a> {
    fn new(image: &'a File, runs: Vec<(u64, u64)>, mut skip: u64) -> Self {
        let mut run = 0;
        while run < runs.len() && skip >= runs[run].1 {
            skip -= runs[run].1;
            run += 1;
        }
        Runs {
            image,
            runs,
            run,
            into: skip,
        }
    }
}

impl Read for Runs<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(&(start, len)) = self.runs.get(self.run) else {
            return Ok(0);
        };
        let want = buf.len().min((len - self.into) as usize);
        let n = self.image.read_at(&mut buf[..want], start + self.into)?;
        if n == 0 && want > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the squashfs image ends inside a file",
            ));
        }
        self.into += n as u64;
        if self.into == len {
            self.run += 1;
            self.into = 0;
        }
        Ok(n)
    }
}
