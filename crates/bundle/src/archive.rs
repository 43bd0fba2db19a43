//! Tar bundles: indexed in place when uncompressed (member name → byte offset, so any
//! file is read at random without extracting), or expanded once into the [`Cas`] when
//! gzip, zstd or xz compressed (blobs verified as they are written, a `docker save`
//! archive's layers and configs stored by what they hash to; other small files kept in
//! memory). Several parts are read as one archive.
//!
//! Every member path is confined to the bundle (no absolute paths, no `..`, no symbolic
//! link pointing outside), the number of entries and the expansion ratio are bounded,
//! and a truncated or corrupt archive is an error that names the member it broke in.

use std::{
    cell::Cell,
    collections::HashMap,
    io::{self, Read, Seek},
    rc::Rc,
    sync::Arc,
};

use crate::{
    BundleFs, Error, Format, Guard, Limits, Result, cas::Cas, catalog::Location, parts::MultiFile,
    paths,
};

#[derive(Debug, Clone)]
enum At {
    /// Byte offset of the data in the (uncompressed) archive.
    Range(u64),
    /// Blob `<hex>` of the content-addressed store.
    Cas(String),
    Inline(Arc<[u8]>),
    /// A large file that is not a blob: listed, not kept.
    Dropped,
}

#[derive(Debug, Clone)]
enum Node {
    File {
        size: u64,
        at: At,
    },
    /// A symbolic link, its target already resolved to a path inside the bundle.
    Link(String),
    Other,
}

/// Symbolic links followed at most this many times for one path.
const MAX_HOPS: usize = 8;

pub struct ArchiveFs {
    nodes: HashMap<String, Node>,
    source: Option<MultiFile>,
    cas: Option<Cas>,
    format: Format,
}

/// The blob digest a member's path names, if it is a blob file of an OCI layout
/// (`…/blobs/sha256/<hex>`) or of a registry storage tree (`…/blobs/sha256/<2>/<hex>/data`).
pub fn blob_hex(path: &str) -> Option<&str> {
    let valid = |h: &str| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let mut it = path.rsplit('/');
    let last = it.next()?;
    if valid(last) && it.next() == Some("sha256") && it.next() == Some("blobs") {
        return Some(last);
    }
    if last == "data" {
        let hex = it.next()?;
        let two = it.next()?;
        if valid(hex)
            && hex.starts_with(two)
            && two.len() == 2
            && it.next() == Some("sha256")
            && it.next() == Some("blobs")
        {
            return Some(hex);
        }
    }
    None
}

struct Builder<'l> {
    nodes: HashMap<String, Node>,
    limits: &'l Limits,
    last: String,
}

impl Builder<'_> {
    /// Adds one member; returns its normalised path when it is a regular file.
    fn add(
        &mut self,
        header: &tar::Header,
        raw_path: &[u8],
        link: Option<&[u8]>,
        size: u64,
        at: impl FnOnce(&str) -> Result<At>,
    ) -> Result<Option<String>> {
        if self.nodes.len() as u64 >= self.limits.max_entries {
            return Err(Error::Hostile(format!(
                "the archive has more than {} entries (limit maxEntries)",
                self.limits.max_entries
            )));
        }
        let path = paths::member(raw_path, self.limits.max_path_bytes)?;
        self.last = path.clone();
        let link_path = || -> Result<String> {
            let raw =
                link.ok_or_else(|| Error::Hostile(format!("link {path:?} names no target")))?;
            std::str::from_utf8(raw)
                .map(str::to_string)
                .map_err(|_| Error::Hostile(format!("link {path:?} has a non-UTF-8 target")))
        };
        use tar::EntryType as T;
        let node = match header.entry_type() {
            T::Regular | T::Continuous => Node::File {
                size,
                at: at(&path)?,
            },
            T::Directory => return Ok(None),
            T::Symlink => Node::Link(paths::link_target(&path, &link_path()?)?),
            T::Link => {
                let target = paths::member(link_path()?.as_bytes(), self.limits.max_path_bytes)?;
                match self.nodes.get(&target) {
                    Some(n @ Node::File { .. }) => n.clone(),
                    _ => {
                        return Err(Error::Hostile(format!(
                            "hard link {path:?} points at {target:?}, which is not an earlier file of the archive"
                        )));
                    }
                }
            }
            T::GNUSparse => {
                return Err(Error::Hostile(format!(
                    "member {path:?} is a sparse file, which bundles never need"
                )));
            }
            _ => Node::Other,
        };
        let file = matches!(node, Node::File { .. });
        self.nodes.insert(path.clone(), node);
        Ok(file.then_some(path))
    }
}

fn corrupt(what: &str, after: &str, e: impl std::fmt::Display) -> Error {
    let e = e.to_string();
    if e.contains(BOMB) {
        return Error::Hostile(format!("{what} {e}"));
    }
    let place = if after.is_empty() {
        "at its start".to_string()
    } else {
        format!("after member {after:?}")
    };
    Error::Corrupt(format!("{what} is corrupt or truncated {place}: {e}"))
}

impl ArchiveFs {
    /// Indexes an uncompressed tar (one or several parts) in place.
    pub fn index(source: MultiFile, limits: &Limits) -> Result<Self> {
        let total = source.len();
        let mut b = Builder {
            nodes: HashMap::new(),
            limits,
            last: String::new(),
        };
        let mut end = 0u64;
        {
            let (reader, budget) = HeaderBudget::new(source.cursor(), limits.max_header_bytes);
            let mut ar = tar::Archive::new(reader);
            ar.set_ignore_zeros(true);
            let mut entries = ar
                .entries_with_seek()
                .map_err(|e| corrupt("the tar archive", "", e))?;
            // Data is skipped by seeking: what is read between two members is headers.
            while let Some(entry) = budget.next(&mut entries) {
                let e = entry.map_err(|e| budget.error(e, "the tar archive", &b.last))?;
                let (offset, size) = (e.raw_file_position(), e.size());
                let data_end = offset.saturating_add(size);
                let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
                if data_end > total {
                    return Err(Error::Corrupt(format!(
                        "tar member {path:?} needs bytes up to {data_end}, but the archive ends at {total}: the bundle is truncated"
                    )));
                }
                end = data_end.div_ceil(512) * 512;
                let link = e.link_name_bytes().map(|l| l.into_owned());
                b.add(e.header(), &e.path_bytes(), link.as_deref(), size, |_| {
                    Ok(At::Range(offset))
                })?;
            }
        }
        // A whole tar ends with two zero blocks; without them it was cut off between
        // members.
        let mut tail = [0u8; 1024];
        let mut got = 0;
        while got < tail.len() {
            match source.read_at(&mut tail[got..], end + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return Err(Error::read(source.name(), e)),
            }
        }
        if got < tail.len() || tail.iter().any(|&x| x != 0) {
            return Err(Error::Corrupt(format!(
                "the tar archive has no end-of-archive marker after member {:?}: the bundle is truncated",
                b.last
            )));
        }
        Ok(ArchiveFs {
            nodes: b.nodes,
            source: Some(source),
            cas: None,
            format: Format::Tar,
        })
    }

    /// Expands a compressed tar once: blob files go into `cas` (claimed for
    /// `bundle_id`), other small files stay in memory. The data volume keeps
    /// `limits.min_free_bytes` free (checked as blobs are written), and `guard` may call
    /// the expansion off.
    pub fn expand(
        source: &MultiFile,
        format: Format,
        cas: &Cas,
        bundle_id: &str,
        limits: &Limits,
        guard: &Guard,
    ) -> Result<Self> {
        let compressed = io::BufReader::with_capacity(1 << 20, source.cursor());
        let decoder: Box<dyn Read + '_> = match format {
            Format::Gzip => Box::new(flate2::read::MultiGzDecoder::new(compressed)),
            Format::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(compressed)
                    .map_err(|e| corrupt("the zstd stream", "", e))?,
            ),
            Format::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(compressed)),
            other => return Err(Error::Unsupported(other)),
        };
        let limit = limits.expansion_budget(source.len());
        let cas_dir = cas.dir();
        let room = || guard.room(&cas_dir, limits.min_free_bytes);
        let counted = Counted {
            inner: decoder,
            read: 0,
            limit,
            compressed: source.len(),
        };
        let what = format!("the {format} stream");
        let mut b = Builder {
            nodes: HashMap::new(),
            limits,
            last: String::new(),
        };
        let mut claim = cas.claim(bundle_id)?;
        let mut small_total = 0u64;
        let (reader, budget) = HeaderBudget::new(counted, limits.max_header_bytes);
        let mut ar = tar::Archive::new(reader);
        ar.set_ignore_zeros(true);
        let mut entries = ar.entries().map_err(|e| corrupt(&what, "", e))?;
        while let Some(entry) = budget.next(&mut entries) {
            guard.check()?;
            let mut e = entry.map_err(|e| budget.error(e, &what, &b.last))?;
            let size = e.size();
            let header = e.header().clone();
            let raw = e.path_bytes().into_owned();
            let link = e.link_name_bytes().map(|l| l.into_owned());
            b.add(&header, &raw, link.as_deref(), size, |path| {
                if let Some(hex) = blob_hex(path) {
                    cas.put(&mut claim, hex, size, &mut e, path, &room)
                        .map_err(|err| match err {
                            Error::Read { reason, .. } => corrupt(&what, path, reason),
                            other => other,
                        })?;
                    return Ok(At::Cas(hex.to_string()));
                }
                if crate::docker::is_member_by_name(path) {
                    let hex = cas
                        .put_hashed(&mut claim, size, &mut e, path, &room)
                        .map_err(|err| match err {
                            Error::Read { reason, .. } => corrupt(&what, path, reason),
                            other => other,
                        })?;
                    return Ok(At::Cas(hex));
                }
                if size > limits.max_small_file_bytes
                    || small_total + size > limits.max_small_total_bytes
                {
                    return Ok(At::Dropped);
                }
                small_total += size;
                let mut buf = Vec::with_capacity(size as usize);
                (&mut e)
                    .take(size)
                    .read_to_end(&mut buf)
                    .map_err(|err| corrupt(&what, path, err))?;
                if buf.len() as u64 != size {
                    return Err(corrupt(&what, path, "the member is cut short"));
                }
                Ok(At::Inline(buf.into()))
            })?;
            // What this member has left is read here, not by the next header's read:
            // only headers count against the budget.
            io::copy(&mut e, &mut io::sink()).map_err(|err| corrupt(&what, &b.last, err))?;
        }
        claim.commit()?;
        Ok(ArchiveFs {
            nodes: b.nodes,
            source: None,
            cas: Some(cas.clone()),
            format,
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The file node at `path`, following symbolic links inside the bundle.
    fn file(&self, path: &str) -> Result<(String, u64, &At)> {
        let mut p = path.to_string();
        for _ in 0..MAX_HOPS {
            match self.nodes.get(&p) {
                None => return Err(Error::Missing(path.to_string())),
                Some(Node::File { size, at }) => return Ok((p, *size, at)),
                Some(Node::Link(t)) => p = t.clone(),
                Some(Node::Other) => return Err(Error::NotAFile(path.to_string())),
            }
        }
        Err(Error::Hostile(format!(
            "{path:?} goes through more than {MAX_HOPS} symbolic links"
        )))
    }
}

/// A tar stream's headers held to a budget: [`Budget::next`] gives the tar reader
/// `max` bytes to read the next member's header with its extensions (a GNU long name or
/// a PAX record of any declared size is read whole into memory by it); more is refused,
/// so memory stays bounded whatever the archive declares.
struct HeaderBudget<R> {
    inner: R,
    state: Rc<BudgetState>,
}

struct BudgetState {
    left: Cell<u64>,
    /// The budget ran out (the tar crate keeps only the text of a reader's error).
    spent: Cell<bool>,
}

/// The budget's handle, kept by the loop over members.
struct Budget {
    state: Rc<BudgetState>,
    max: u64,
}

impl<R> HeaderBudget<R> {
    fn new(inner: R, max: u64) -> (Self, Budget) {
        let state = Rc::new(BudgetState {
            left: Cell::new(max),
            spent: Cell::new(false),
        });
        (
            HeaderBudget {
                inner,
                state: state.clone(),
            },
            Budget { state, max },
        )
    }
}

impl Budget {
    /// The next member, read within the budget.
    fn next<I: Iterator>(&self, entries: &mut I) -> Option<I::Item> {
        self.state.left.set(self.max);
        let next = entries.next();
        // The member's own data (read by the caller) is not headers.
        self.state.left.set(u64::MAX);
        next
    }

    /// `e` as a bundle error: hostile when the budget ran out, else corrupt.
    fn error(&self, e: io::Error, what: &str, after: &str) -> Error {
        if self.state.spent.get() {
            return Error::Hostile(format!(
                "{what}, after member {after:?}: a member's tar headers (with GNU long-name or PAX extension records) take more than {} bytes (limit maxHeaderBytes)",
                self.max
            ));
        }
        corrupt(what, after, e)
    }
}

impl<R: Read> Read for HeaderBudget<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.state.left.get();
        if left == 0 {
            self.state.spent.set(true);
            return Err(io::Error::other("tar headers over budget (maxHeaderBytes)"));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.state.left.set(left - n as u64);
        Ok(n)
    }
}

impl<R: Seek> Seek for HeaderBudget<R> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

const BOMB: &str = "refusing a likely decompression bomb";

/// Counts decompressed bytes and stops a stream that expands past its limit.
struct Counted<'a> {
    inner: Box<dyn Read + 'a>,
    read: u64,
    limit: u64,
    compressed: u64,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(io::Error::other(format!(
                "expands past {} bytes from {} compressed bytes: {BOMB} (limits maxExpansionRatio, expansionFloor)",
                self.limit, self.compressed
            )));
        }
        Ok(n)
    }
}

impl BundleFs for ArchiveFs {
    fn open(&self, path: &str) -> Result<(Box<dyn Read + '_>, u64)> {
        let (p, size, at) = self.file(path)?;
        let reader: Box<dyn Read + '_> = match at {
            At::Range(offset) => Box::new(
                self.source
                    .as_ref()
                    .expect("indexed archives keep their source")
                    .range(*offset, size),
            ),
            At::Cas(hex) => {
                let cas = self.cas.as_ref().expect("expanded archives have a store");
                let f = cas.blob_path(hex);
                Box::new(std::fs::File::open(&f).map_err(|source| Error::Io {
                    path: f.display().to_string(),
                    source,
                })?)
            }
            At::Inline(bytes) => Box::new(io::Cursor::new(bytes.clone())),
            At::Dropped => {
                return Err(Error::read(
                    &p,
                    "it is too large to keep and is not a blob (limit maxSmallFileBytes)",
                ));
            }
        };
        Ok((reader, size))
    }

    fn open_from(&self, path: &str, start: u64) -> Result<(Box<dyn Read + '_>, u64)> {
        let (p, size, at) = self.file(path)?;
        let start = start.min(size);
        let reader: Box<dyn Read + '_> = match at {
            // In place: the rest of the member, straight from its offset.
            At::Range(offset) => Box::new(
                self.source
                    .as_ref()
                    .expect("indexed archives keep their source")
                    .range(*offset + start, size - start),
            ),
            At::Cas(hex) => {
                use std::io::Seek as _;
                let cas = self.cas.as_ref().expect("expanded archives have a store");
                let f = cas.blob_path(hex);
                let io = |source| Error::Io {
                    path: f.display().to_string(),
                    source,
                };
                let mut file = std::fs::File::open(&f).map_err(io)?;
                file.seek(io::SeekFrom::Start(start)).map_err(io)?;
                Box::new(file)
            }
            At::Inline(bytes) => Box::new(io::Cursor::new(bytes[start as usize..].to_vec())),
            At::Dropped => {
                return Err(Error::read(
                    &p,
                    "it is too large to keep and is not a blob (limit maxSmallFileBytes)",
                ));
            }
        };
        Ok((reader, size))
    }

    fn exists(&self, path: &str) -> bool {
        self.file(path).is_ok()
    }

    fn files(&self) -> Vec<&str> {
        self.nodes.keys().map(String::as_str).collect()
    }

    fn locate(&self, path: &str) -> Result<(Location, u64)> {
        let (p, size, at) = self.file(path)?;
        match at {
            At::Range(offset) => Ok((Location::Range { offset: *offset }, size)),
            At::Cas(hex) => Ok((Location::Cas { hex: hex.clone() }, size)),
            _ => Err(Error::Layout(format!(
                "{p} is a blob but was not stored as one when the compressed bundle was \
                 expanded (blob files, and a docker archive's layer tars and configs at its \
                 top, are)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_paths() {
        let h = "ab".repeat(32);
        assert_eq!(blob_hex(&format!("blobs/sha256/{h}")), Some(h.as_str()));
        assert_eq!(
            blob_hex(&format!("x/images/blobs/sha256/{h}")),
            Some(h.as_str())
        );
        assert_eq!(
            blob_hex(&format!("p/docker/registry/v2/blobs/sha256/ab/{h}/data")),
            Some(h.as_str())
        );
        assert_eq!(blob_hex(&format!("blobs/sha256/cd/{h}/data")), None);
        assert_eq!(blob_hex(&format!("blobs/sha512/{h}")), None);
        assert_eq!(blob_hex("blobs/sha256/../../x"), None);
    }
}
