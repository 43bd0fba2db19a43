//! Squashfs bundles, read in place with backhand: the inode tree is parsed once at open,
//! then any file streams out on demand (Read), nothing is extracted to disk.
//! backhand is synchronous: call this from a blocking thread.
//!
//! At open, before backhand reads the inode tree, what its tables unpack to is bounded
//! (`squashfs_tables`); then every symbolic link is checked to stay inside the image, and
//! the number of entries is bounded.
//!
//! Files are read straight from the image file with positioned reads: data blocks
//! stored as they are (mksquashfs stores already-compressed layers so) are read in place,
//! a compressed block (gzip, xz, zstd, lz4) is unpacked here one at a time, a hole is zeros,
//! and the tail comes from its fragment block the same way. No lock is shared with other
//! readers (backhand reads through one), and a `Range` goes straight to the block
//! holding its first byte. A file of another codec (lzo, which backhand does not read either) is backhand's.

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
        // What its tables unpack to is bounded before backhand unpacks them.
        crate::squashfs_tables::check(&image, image_len, limits)?;
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

    /// Where the bytes of `f` are in the image file: its data blocks one after another
    /// from `blocks_start` (each stored as it is, compressed, or a hole of zeros), then
    /// its tail, if it has one, in a fragment block. `None` when a compressed block is
    /// of a codec not unpacked here (gzip, xz, zstd and lz4 are), and for numbers that
    /// do not add up (a damaged or hostile image is left to backhand's checks).
    fn pieces(&self, f: &SquashfsFileReader) -> Option<Vec<Piece>> {
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
        let codec = || {
            use backhand::traits::types::Compressor as C;
            match self.fs.compressor? {
                C::Gzip => Some(Codec::Zlib),
                C::Xz => Some(Codec::Xz),
                C::Zstd => Some(Codec::Zstd),
                C::Lz4 => Some(Codec::Lz4),
                _ => None,
            }
        };
        let mut pieces: Vec<Piece> = Vec::with_capacity(2);
        let mut at = start;
        let mut left = size;
        for (i, b) in blocks.iter().enumerate() {
            let n = u64::from(b.size());
            let last = i + 1 == blocks.len() && frag == NO_FRAGMENT;
            let want = if last { left } else { block.min(left) };
            if want == 0 || n > block {
                return None;
            }
            if n == 0 {
                pieces.push(Piece::Zeros { len: want });
            } else if b.uncompressed() {
                if n != want {
                    return None;
                }
                match pieces.last_mut() {
                    Some(Piece::Raw { start: s, len: l }) if *s + *l == at => *l += n,
                    _ => pieces.push(Piece::Raw { start: at, len: n }),
                }
            } else {
                pieces.push(Piece::Packed {
                    start: at,
                    stored: n,
                    codec: codec()?,
                    offset: 0,
                    len: want,
                    block,
                });
            }
            at = at.checked_add(n)?;
            left -= want;
        }
        if frag != NO_FRAGMENT {
            let fragment = self.fs.fragments.as_ref()?.get(frag as usize)?;
            let stored = u64::from(fragment.size.size());
            let offset = u64::from(frag_offset);
            if left == 0 || offset.checked_add(left)? > block || stored > block || stored == 0 {
                return None;
            }
            if fragment.size.uncompressed() {
                if offset + left > stored {
                    return None;
                }
                pieces.push(Piece::Raw {
                    start: fragment.start.checked_add(offset)?,
                    len: left,
                });
            } else {
                pieces.push(Piece::Packed {
                    start: fragment.start,
                    stored,
                    codec: codec()?,
                    offset,
                    len: left,
                    block,
                });
            }
            left = 0;
        }
        let inside = pieces.iter().all(|p| {
            let (s, l) = p.stored_range();
            s.checked_add(l).is_some_and(|e| e <= self.image_len)
        });
        (left == 0 && inside).then_some(pieces)
    }

    /// Is the file at `path` read here, straight from the image (not through backhand)?
    pub fn read_directly(&self, path: &str) -> bool {
        self.file(path)
            .is_ok_and(|(_, i)| match &self.fs.root.nodes[i].inner {
                InnerNode::File(f) => self.pieces(f).is_some(),
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
        self.open_from(path, 0)
    }

    fn open_from(&self, path: &str, start: u64) -> Result<(Box<dyn Read + '_>, u64)> {
        let (p, i) = self.file(path)?;
        let InnerNode::File(f) = &self.fs.root.nodes[i].inner else {
            return Err(Error::NotAFile(path.to_string()));
        };
        let len = f.file_len() as u64;
        if let Some(pieces) = self.pieces(f) {
            return Ok((
                Box::new(Runs::new(&self.image, pieces, start.min(len))),
                len,
            ));
        }
        // backhand reads from the start only.
        let mut reader = self
            .fs
            .file(f)
            .reader_checked()
            .map_err(|e| Error::read(&p, e))?;
        io::copy(&mut (&mut reader).take(start), &mut io::sink())
            .map_err(|e| Error::read(&p, e))?;
        Ok((Box::new(reader), len))
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

/// How a block is compressed (squashfs' gzip is a zlib stream).
#[derive(Debug, Clone, Copy)]
enum Codec {
    Zlib,
    Xz,
    Zstd,
    /// An LZ4 block (not a frame).
    Lz4,
}

/// Part of a file's bytes in the image.
#[derive(Debug, Clone)]
enum Piece {
    /// Stored as they are.
    Raw { start: u64, len: u64 },
    /// A hole: zeros, nothing stored.
    Zeros { len: u64 },
    /// `len` bytes at `offset` of a compressed block (`stored` bytes at `start`, at most
    /// `block` once unpacked): a data block, or a fragment block holding the tail.
    Packed {
        start: u64,
        stored: u64,
        codec: Codec,
        offset: u64,
        len: u64,
        block: u64,
    },
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Raw { len, .. } | Piece::Zeros { len } | Piece::Packed { len, .. } => *len,
        }
    }

    /// The bytes of the image it reads.
    fn stored_range(&self) -> (u64, u64) {
        match self {
            Piece::Raw { start, len } => (*start, *len),
            Piece::Zeros { .. } => (0, 0),
            Piece::Packed { start, stored, .. } => (*start, *stored),
        }
    }
}

/// Reads and unpacks a compressed block, at most `block` bytes of it.
fn unpack(image: &File, start: u64, stored: u64, codec: Codec, block: u64) -> io::Result<Vec<u8>> {
    let mut packed = vec![0u8; stored as usize];
    image.read_exact_at(&mut packed, start)?;
    let src: &[u8] = &packed;
    let reader: Box<dyn Read + '_> = match codec {
        Codec::Lz4 => {
            let mut out = vec![0u8; block as usize];
            let n = lz4_flex::block::decompress_into(src, &mut out)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            out.truncate(n);
            return Ok(out);
        }
        Codec::Zlib => Box::new(flate2::read::ZlibDecoder::new(src)),
        Codec::Xz => Box::new(liblzma::read::XzDecoder::new(src)),
        Codec::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(src)?),
    };
    let mut out = Vec::with_capacity(block as usize);
    reader.take(block).read_to_end(&mut out)?;
    Ok(out)
}

/// Positioned reads of a file's pieces in the image (no shared file position).
struct Runs<'a> {
    image: &'a File,
    pieces: Vec<Piece>,
    /// The piece being read, and how far into it.
    at: usize,
    into: u64,
    /// The last `Packed` piece unpacked (its index), and its block.
    unpacked: Option<(usize, Vec<u8>)>,
}

impl<'a> Runs<'a> {
    fn new(image: &'a File, pieces: Vec<Piece>, mut skip: u64) -> Self {
        let mut at = 0;
        while at < pieces.len() && skip >= pieces[at].len() {
            skip -= pieces[at].len();
            at += 1;
        }
        Runs {
            image,
            pieces,
            at,
            into: skip,
            unpacked: None,
        }
    }
}

impl Read for Runs<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(piece) = self.pieces.get(self.at) else {
            return Ok(0);
        };
        let len = piece.len();
        let want = buf.len().min((len - self.into) as usize);
        let n = match *piece {
            Piece::Raw { start, .. } => {
                let n = self.image.read_at(&mut buf[..want], start + self.into)?;
                if n == 0 && want > 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the squashfs image ends inside a file",
                    ));
                }
                n
            }
            Piece::Zeros { .. } => {
                buf[..want].fill(0);
                want
            }
            Piece::Packed {
                start,
                stored,
                codec,
                offset,
                block,
                ..
            } => {
                if self.unpacked.as_ref().is_none_or(|(i, _)| *i != self.at) {
                    let data = unpack(self.image, start, stored, codec, block)?;
                    self.unpacked = Some((self.at, data));
                }
                let data = self
                    .unpacked
                    .as_ref()
                    .map_or(&[][..], |(_, d)| d.as_slice());
                let from = (offset + self.into) as usize;
                let Some(bytes) = data.get(from..from + want) else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a compressed squashfs block is shorter than the file says",
                    ));
                };
                buf[..want].copy_from_slice(bytes);
                want
            }
        };
        self.into += n as u64;
        if self.into == len {
            self.at += 1;
            self.into = 0;
        }
        Ok(n)
    }
}
