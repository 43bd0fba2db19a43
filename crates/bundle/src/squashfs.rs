//! Squashfs bundles, read in place with backhand: the inode tree is parsed once at open,
//! then any file streams out on demand (Read), nothing is extracted to disk.
//! backhand is synchronous: call this from a blocking thread.
//!
//! At open every symbolic link is checked to stay inside the image, and the number of
//! entries is bounded.

use std::{collections::HashMap, fs::File, io::BufReader, io::Read, path::Path};

use backhand::{FilesystemReader, InnerNode};

use crate::{BundleFs, Error, Limits, Result, catalog::Location, paths};

pub struct SquashfsBundle {
    fs: FilesystemReader<'static>,
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
        Ok(SquashfsBundle { fs, by_path, links })
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
        let reader = self
            .fs
            .file(f)
            .reader_checked()
            .map_err(|e| Error::read(&p, e))?;
        Ok((Box::new(reader), f.file_len() as u64))
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
