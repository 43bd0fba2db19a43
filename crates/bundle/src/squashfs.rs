//! Squashfs bundles, read in place with backhand: the inode tree is parsed once at open,
//! then any file streams out on demand (Read), nothing is extracted to disk.
//! backhand is synchronous: call this from a blocking thread.

use std::{collections::HashMap, fs::File, io::BufReader, io::Read, path::Path};

use backhand::{FilesystemReader, InnerNode};

use crate::{BundleFs, Error, Result};

pub struct SquashfsBundle {
    fs: FilesystemReader<'static>,
    /// Path relative to the root (no leading `/`) → index in `fs.root.nodes`.
    by_path: HashMap<String, usize>,
}

impl SquashfsBundle {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let fs = FilesystemReader::from_reader(BufReader::new(file))
            .map_err(|e| Error::Squashfs(e.to_string()))?;
        let by_path = fs
            .root
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let p = n.fullpath.to_string_lossy();
                (p.trim_start_matches('/').to_string(), i)
            })
            .collect();
        Ok(SquashfsBundle { fs, by_path })
    }

    /// Number of entries (files, directories, links) in the image.
    pub fn entries(&self) -> usize {
        self.fs.root.nodes.len()
    }
}

impl BundleFs for SquashfsBundle {
    fn open(&self, path: &str) -> Result<(Box<dyn Read + '_>, u64)> {
        let i = *self
            .by_path
            .get(path)
            .ok_or_else(|| Error::Missing(path.to_string()))?;
        match &self.fs.root.nodes[i].inner {
            InnerNode::File(f) => {
                let reader = self
                    .fs
                    .file(f)
                    .reader_checked()
                    .map_err(|e| Error::read(path, e))?;
                Ok((Box::new(reader), f.file_len() as u64))
            }
            _ => Err(Error::NotAFile(path.to_string())),
        }
    }

    fn exists(&self, path: &str) -> bool {
        self.by_path
            .get(path)
            .is_some_and(|&i| matches!(self.fs.root.nodes[i].inner, InnerNode::File(_)))
    }
}
