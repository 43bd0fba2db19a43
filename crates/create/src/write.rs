//! Writing the bundle: an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`) straight into a squashfs (backhand's writer) or a tar (plain or
//! zstd), from the cache, without a directory tree in between.
//!
//! The same inputs give the same bytes: entries in a fixed order (the layout files, then
//! blobs by digest), every time `0`, owner `0:0`, modes `0644`/`0755`. Every blob is
//! read again from the cache and checked against its digest as it is written; a damaged
//! cache file fails the write with its name (and is removed, so the next run fetches it
//! again). The bundle is written beside the output as `OUTPUT.partial` and renamed
//! into place when whole: an output file is always a complete bundle.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

use serde::Serialize;
use sha2::{Digest as _, Sha256};
use shipperd_bundle::{
    Descriptor,
    layout::{ANNOTATION_MADE_FOR, ANNOTATION_REF_NAME},
};
use shipperd_model::Digest;

use crate::{Error, Result, cache::Cache};

/// The bundle's file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Squashfs,
    Tar,
    TarZstd,
}

impl Format {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "squashfs" | "sqfs" => Ok(Format::Squashfs),
            "tar" => Ok(Format::Tar),
            "tar.zst" | "tar.zstd" | "tzst" => Ok(Format::TarZstd),
            _ => Err(Error::Input(format!(
                "format {s:?}: one of squashfs, tar, tar.zst"
            ))),
        }
    }

    /// The format a file name says.
    pub fn from_name(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        if name.ends_with(".squashfs") || name.ends_with(".sqfs") {
            Some(Format::Squashfs)
        } else if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
            Some(Format::TarZstd)
        } else if name.ends_with(".tar") {
            Some(Format::Tar)
        } else {
            None
        }
    }
}

/// `oci-layout`'s content.
const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

#[derive(Serialize)]
struct IndexJson<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    manifests: &'a [Descriptor],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<&'static str, &'a str>,
}

/// The layout's `index.json`: one descriptor per image, named by its full reference
/// (`org.opencontainers.image.ref.name`; a referrer without a name), sorted by name
/// (referrers first, by digest); for a differential bundle, the registry it was made
/// for ([`ANNOTATION_MADE_FOR`]).
pub fn index_json(images: &[(Option<String>, Descriptor)], made_for: Option<&str>) -> Vec<u8> {
    let mut named: Vec<Descriptor> = images
        .iter()
        .map(|(name, d)| {
            let mut d = Descriptor::new(d.media_type.clone(), d.digest.clone(), d.size);
            if let Some(name) = name {
                d.annotations
                    .insert(ANNOTATION_REF_NAME.into(), name.clone());
            }
            d
        })
        .collect();
    named.sort_by(|a, b| {
        (a.annotations.get(ANNOTATION_REF_NAME), &a.digest)
            .cmp(&(b.annotations.get(ANNOTATION_REF_NAME), &b.digest))
    });
    named.dedup();
    serde_json::to_vec(&IndexJson {
        schema_version: 2,
        media_type: shipperd_bundle::layout::OCI_INDEX,
        manifests: &named,
        annotations: made_for
            .map(|r| BTreeMap::from([(ANNOTATION_MADE_FOR, r)]))
            .unwrap_or_default(),
    })
    .expect("an index serialises")
}

/// Bytes the bundle takes besides its blobs' (headers, tables), at most, for the
/// free-space check: generous.
pub fn overhead(files: usize, index: usize) -> u64 {
    64 << 10 | (files as u64 * 1024 + index as u64 * 2)
}

/// `OUTPUT.partial`: where the bundle is written before it is whole.
pub fn partial_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// What a bundle holds besides `oci-layout`.
#[derive(Debug, Default)]
pub struct Contents {
    /// `index.json`.
    pub index: Vec<u8>,
    /// Blobs (manifests, configs, layers): digest → size, from the cache.
    pub files: BTreeMap<Digest, u64>,
    /// Other files (lookaside signatures): path → their bytes' digest and size, from
    /// the cache.
    pub extras: BTreeMap<String, (Digest, u64)>,
}

/// Writes the bundle to `out`, every file from `cache`. Returns the bundle's size.
pub fn write(out: &Path, format: Format, contents: &Contents, cache: &Cache) -> Result<u64> {
    let tmp = partial_path(out);
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = match format {
        Format::Squashfs => squashfs(file, contents, cache),
        Format::Tar => tar(io::BufWriter::with_capacity(1 << 20, file), contents, cache)
            .and_then(|w| w.into_inner().map_err(|e| e.into_error())),
        Format::TarZstd => {
            let enc = zstd::Encoder::new(io::BufWriter::with_capacity(1 << 20, file), 3)
                .map_err(|e| Error::io(&tmp, e))?;
            tar(enc, contents, cache)
                .and_then(|enc| enc.finish()?.into_inner().map_err(|e| e.into_error()))
        }
    };
    let done = written.and_then(|f| {
        f.sync_all()?;
        f.metadata().map(|m| m.len())
    });
    let size = match done {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(damaged_or_io(e, &tmp, cache));
        }
    };
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(size)
}

/// The name of part `n` of `out`: `site.tar` → `site_000001.tar` (as oc-mirror names
/// its parts; `shipperd push` takes them in order as one bundle).
pub fn part_path(out: &Path, n: usize) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (stem, ext) = match name.find('.') {
        Some(i) => (&name[..i], &name[i..]),
        None => (name.as_str(), ""),
    };
    out.with_file_name(format!("{stem}_{n:06}{ext}"))
}

/// Splits the finished bundle `out` into parts of at most `max` bytes, from its end (a
/// part is copied out, the file cut short), so the split needs no more free space than
/// one part. The parts' concatenation is the bundle.
pub fn split(out: &Path, max: u64) -> Result<Vec<PathBuf>> {
    use std::io::{Seek, SeekFrom};
    let io = |e| Error::io(out, e);
    let len = std::fs::metadata(out).map_err(io)?.len();
    let n = len.div_ceil(max).max(1) as usize;
    if n > 999_999 {
        return Err(Error::Input(format!(
            "{n} parts of {max} bytes: give a larger --max-part-size"
        )));
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(out)
        .map_err(io)?;
    for i in (2..=n).rev() {
        let start = (i as u64 - 1) * max;
        let part = part_path(out, i);
        let mut dst = File::create(&part).map_err(|e| Error::io(&part, e))?;
        f.seek(SeekFrom::Start(start)).map_err(io)?;
        io::copy(&mut (&mut f).take(max), &mut dst).map_err(|e| Error::io(&part, e))?;
        dst.sync_all().map_err(|e| Error::io(&part, e))?;
        f.set_len(start).map_err(io)?;
    }
    f.sync_all().map_err(io)?;
    drop(f);
    let first = part_path(out, 1);
    std::fs::rename(out, &first).map_err(io)?;
    Ok((1..=n).map(|i| part_path(out, i)).collect())
}

/// A damaged cache file (see [`Verified`]) is said as such, and removed from the cache.
fn damaged_or_io(e: io::Error, path: &Path, cache: &Cache) -> Error {
    if let Some(d) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<DamagedBlob>())
    {
        cache.forget(&d.0);
        return Error::Damaged(format!(
            "the cached file of {} (removed: run again to fetch it again)",
            d.0
        ));
    }
    Error::io(path, e)
}

#[derive(Debug)]
struct DamagedBlob(Digest);

impl std::fmt::Display for DamagedBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cached blob {} does not match its digest", self.0)
    }
}

impl std::error::Error for DamagedBlob {}

/// A cached blob, opened when first read, checked against its digest and size at its
/// end (an error instead of the end when it does not match).
struct Verified {
    path: PathBuf,
    digest: Digest,
    size: u64,
    file: Option<File>,
    hasher: Sha256,
    len: u64,
    /// Read to its end and found whole: every later read is the end again.
    done: bool,
}

impl Verified {
    fn new(cache: &Cache, digest: &Digest, size: u64) -> Self {
        Verified {
            path: cache.path(digest),
            digest: digest.clone(),
            size,
            file: None,
            hasher: Sha256::new(),
            len: 0,
            done: false,
        }
    }
}

impl Read for Verified {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.file.is_none() {
            self.file = Some(File::open(&self.path)?);
        }
        let f = self.file.as_mut().expect("opened above");
        let n = f.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        if self.len > self.size
            || (n == 0 && hex::encode(self.hasher.clone().finalize()) != self.digest.hex())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                DamagedBlob(self.digest.clone()),
            ));
        }
        if n == 0 {
            // Closed at its end: a squashfs of 100,000 blobs holds no 100,000 files open.
            self.file = None;
            self.done = true;
        }
        Ok(n)
    }
}

fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// The directories above `paths`, each once, parents first.
fn parents<'a>(paths: impl Iterator<Item = &'a String>) -> std::collections::BTreeSet<String> {
    let mut dirs = std::collections::BTreeSet::new();
    for p in paths {
        let mut at = 0;
        while let Some(i) = p[at..].find('/') {
            dirs.insert(p[..at + i].to_string());
            at += i + 1;
        }
    }
    dirs
}

fn tar<W: Write>(w: W, contents: &Contents, cache: &Cache) -> io::Result<W> {
    let mut b = tar::Builder::new(w);
    let mut entry = |path: &str, size: u64, dir: bool, data: &mut dyn Read| -> io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(size);
        h.set_mode(if dir { 0o755 } else { 0o644 });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(if dir {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        // Sets the path (a GNU long-name entry before it when it is long) and the sum.
        b.append_data(&mut h, path, data)
    };
    entry(
        "oci-layout",
        OCI_LAYOUT.len() as u64,
        false,
        &mut &OCI_LAYOUT[..],
    )?;
    entry(
        "index.json",
        contents.index.len() as u64,
        false,
        &mut &contents.index[..],
    )?;
    entry("blobs/", 0, true, &mut io::empty())?;
    entry("blobs/sha256/", 0, true, &mut io::empty())?;
    for (d, size) in &contents.files {
        entry(
            &blob_path(d),
            *size,
            false,
            &mut Verified::new(cache, d, *size),
        )?;
    }
    for dir in parents(contents.extras.keys()) {
        entry(&format!("{dir}/"), 0, true, &mut io::empty())?;
    }
    for (path, (d, size)) in &contents.extras {
        entry(path, *size, false, &mut Verified::new(cache, d, *size))?;
    }
    b.into_inner()
}

fn squashfs(mut out: File, contents: &Contents, cache: &Cache) -> io::Result<File> {
    use backhand::{
        FilesystemCompressor, FilesystemWriter, NodeHeader,
        compression::Compressor,
        kind::{self, Kind},
    };
    let to_io = |e: backhand::BackhandError| match e {
        backhand::BackhandError::StdIo(e) => e,
        other => io::Error::other(other.to_string()),
    };
    let mut fs = FilesystemWriter::default();
    fs.set_time(0);
    fs.set_root_mode(0o755);
    fs.set_root_uid(0);
    fs.set_root_gid(0);
    fs.set_kind(Kind::from_const(kind::LE_V4_0).map_err(io::Error::other)?);
    // Layers are compressed already: zstd's fast level spends little on them, and
    // squashfs keeps a block raw where compressing does not pay.
    fs.set_compressor(
        FilesystemCompressor::new(
            Compressor::Zstd,
            Some(backhand::compression::CompressionOptions::Zstd(
                backhand::compression::Zstd {
                    compression_level: 3,
                },
            )),
        )
        .map_err(to_io)?,
    );
    // Every blob is its own digest: no two are alike, nothing to look for.
    fs.set_no_duplicate_files(false);
    let file = NodeHeader::new(0o644, 0, 0, 0);
    let dir = NodeHeader::new(0o755, 0, 0, 0);
    fs.push_file(io::Cursor::new(OCI_LAYOUT), "oci-layout", file)
        .map_err(to_io)?;
    fs.push_file(io::Cursor::new(contents.index.clone()), "index.json", file)
        .map_err(to_io)?;
    fs.push_dir("blobs", dir).map_err(to_io)?;
    fs.push_dir("blobs/sha256", dir).map_err(to_io)?;
    for (d, size) in &contents.files {
        fs.push_file(Verified::new(cache, d, *size), blob_path(d), file)
            .map_err(to_io)?;
    }
    for d in parents(contents.extras.keys()) {
        fs.push_dir(d, dir).map_err(to_io)?;
    }
    for (path, (d, size)) in &contents.extras {
        fs.push_file(Verified::new(cache, d, *size), path, file)
            .map_err(to_io)?;
    }
    fs.write(&mut out).map_err(to_io)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_concatenate_to_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("site.tar.zst");
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&out, &bytes).unwrap();
        let parts = split(&out, 3000).unwrap();
        let names: Vec<String> = parts
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "site_000001.tar.zst",
                "site_000002.tar.zst",
                "site_000003.tar.zst",
                "site_000004.tar.zst"
            ]
        );
        let joined: Vec<u8> = parts
            .iter()
            .flat_map(|p| std::fs::read(p).unwrap())
            .collect();
        assert_eq!(joined, bytes);
        assert!(!out.exists());
        assert_eq!(std::fs::metadata(&parts[3]).unwrap().len(), 1000);
    }

    #[test]
    fn formats_from_names() {
        let f = |s: &str| Format::from_name(Path::new(s));
        assert_eq!(f("/x/site.squashfs"), Some(Format::Squashfs));
        assert_eq!(f("b.tar"), Some(Format::Tar));
        assert_eq!(f("b.TAR.ZST"), Some(Format::TarZstd));
        assert_eq!(f("b.tgz"), None);
    }

    /// A damaged cache file fails the write by name, and leaves no output.
    #[test]
    fn a_damaged_blob_fails_the_write_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let good = b"good".to_vec();
        let gd = Digest::of(&good);
        cache.put(&gd, &good).unwrap();
        let bad = Digest::of(b"bad");
        std::fs::write(cache.path(&bad), b"BAD").unwrap();
        let files = BTreeMap::from([(gd.clone(), 4), (bad.clone(), 3)]);
        let contents = Contents {
            index: b"{}".to_vec(),
            files,
            ..Default::default()
        };
        for format in [Format::Tar, Format::Squashfs] {
            let out = dir.path().join("b");
            std::fs::write(cache.path(&bad), b"BAD").unwrap();
            let err = write(&out, format, &contents, &cache).unwrap_err();
            assert!(
                matches!(err, Error::Damaged(ref m) if m.contains(bad.as_str())),
                "{err}"
            );
            assert!(!out.exists() && !partial_path(&out).exists());
            assert!(!cache.path(&bad).exists(), "the damaged file is removed");
            assert!(cache.path(&gd).exists());
        }
    }

    /// Read past its end (as backhand does), a blob stays at its end.
    #[test]
    fn a_blob_read_past_its_end_stays_there() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let b = vec![7u8; 3000];
        let d = Digest::of(&b);
        cache.put(&d, &b).unwrap();
        let mut v = Verified::new(&cache, &d, 3000);
        let mut out = Vec::new();
        v.read_to_end(&mut out).unwrap();
        assert_eq!(out, b);
        assert_eq!(v.read(&mut [0u8; 10]).unwrap(), 0);
        assert_eq!(v.read(&mut [0u8; 10]).unwrap(), 0);
    }

    /// The same inputs, twice (a second apart): the same bytes, in every format.
    #[test]
    #[allow(clippy::disallowed_methods)]
    fn the_same_inputs_give_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let mut files = BTreeMap::new();
        for i in 0..50u32 {
            let b: Vec<u8> = (0..(i * 997)).map(|x| (x * i) as u8).collect();
            let d = Digest::of(&b);
            cache.put(&d, &b).unwrap();
            files.insert(d, b.len() as u64);
        }
        let img = Descriptor::new(
            "application/vnd.oci.image.manifest.v1+json",
            Digest::of(b"m"),
            1,
        );
        let index = index_json(&[(Some("quay.io/a/b:1".into()), img)], None);
        let sig = b"a signature".to_vec();
        cache.put(&Digest::of(&sig), &sig).unwrap();
        let long = format!(
            "sigstore/{}/app@sha256={}/signature-1",
            "namespace".repeat(8),
            "a".repeat(64)
        );
        let contents = Contents {
            index,
            files,
            extras: BTreeMap::from([(long.clone(), (Digest::of(&sig), sig.len() as u64))]),
        };
        for format in [Format::Tar, Format::TarZstd, Format::Squashfs] {
            let (a, b) = (dir.path().join("a"), dir.path().join("b"));
            write(&a, format, &contents, &cache).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1100));
            write(&b, format, &contents, &cache).unwrap();
            assert_eq!(
                std::fs::read(&a).unwrap(),
                std::fs::read(&b).unwrap(),
                "{format:?}"
            );
            if format == Format::Tar {
                let mut t = tar::Archive::new(File::open(&a).unwrap());
                let found = t.entries().unwrap().any(|e| {
                    let mut e = e.unwrap();
                    let mut body = Vec::new();
                    e.path().unwrap().to_string_lossy() == long
                        && e.read_to_end(&mut body).is_ok()
                        && body == sig
                });
                assert!(found, "the long-named signature is in the tar");
            }
        }
    }
}
