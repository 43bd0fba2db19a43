//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz), also replayed over the
//! committed corpus by the regular test suite. Each one must never panic, hang or grow
//! without bound, whatever the bytes: errors are the expected outcome.

use std::{collections::HashMap, io::Read, path::Path};

use crate::{
    BundleFs, Error, Limits, Location, Result, Walker, archive::ArchiveFs, cas::Cas, discover,
    format, parts::MultiFile,
};

/// Small limits so a fuzzer explores shapes, not sizes.
fn limits() -> Limits {
    Limits {
        max_entries: 2_000,
        expansion_floor: 16 << 20,
        max_small_total_bytes: 16 << 20,
        min_free_bytes: 0,
        ..Limits::default()
    }
}

/// Reads every file of an opened bundle and walks every image it names.
fn exercise(fs: &dyn BundleFs) {
    let limits = limits();
    for p in fs.files() {
        if let Ok((mut r, _)) = fs.open(p) {
            let _ = std::io::copy(&mut (&mut r).take(1 << 20), &mut std::io::sink());
        }
    }
    let Ok(found) = discover(fs, "fuzz", &limits) else {
        return;
    };
    let blobs = found.blobs(fs);
    let walker = Walker::new(&blobs, &limits);
    let none = |_: &crate::Digest| Vec::new();
    for img in found.images.iter().take(50) {
        if let Ok(plan) = walker.plan("fuzz", &img.descriptor, &none) {
            for b in plan.blobs.iter().take(50) {
                let _ = walker.verify_blob("fuzz", b);
            }
        }
    }
}

/// Container detection.
pub fn detect(data: &[u8]) {
    let _ = format::detect_bytes(data);
}

fn with_file(data: &[u8], f: impl FnOnce(&Path)) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let p = dir.path().join("bundle");
    std::fs::write(&p, data).expect("writing the input");
    f(&p);
}

/// The tar index (in place) and, for compressed input, the expansion into a store.
pub fn tar(data: &[u8]) {
    with_file(data, |p| {
        let Ok(mf) = MultiFile::open(&[p.to_path_buf()]) else {
            return;
        };
        match format::detect_bytes(data) {
            f @ (format::Format::Gzip | format::Format::Zstd | format::Format::Xz) => {
                let cas = Cas::new(&crate::DataDir::new(p.parent().expect("a parent")));
                if let Ok(fs) =
                    ArchiveFs::expand(&mf, f, &cas, "fuzz", &limits(), &crate::Guard::default())
                {
                    exercise(&fs);
                }
            }
            _ => {
                if let Ok(fs) = ArchiveFs::index(mf, &limits()) {
                    exercise(&fs);
                }
            }
        }
    });
}

/// Opening a squashfs image.
pub fn squashfs(data: &[u8]) {
    with_file(data, |p| {
        if let Ok(fs) = crate::SquashfsBundle::open(p, &limits()) {
            exercise(&fs);
        }
    });
}

/// The bounds on a squashfs image's tables, alone (they run before backhand does).
pub fn squashfs_tables(data: &[u8]) {
    with_file(data, |p| {
        if let Ok(f) = std::fs::File::open(p) {
            let _ = crate::squashfs_tables::check(&f, data.len() as u64, &limits());
        }
    });
}

/// A squashfs image of about `len` bytes whose inode table is many tiny compressed
/// metadata blocks, each unpacking to 8 KiB of zeros (about 250 times its size), saying
/// it has `inodes` inodes: a metadata bomb, for the tests and the fuzz corpus.
pub fn squashfs_metadata_bomb(len: usize, inodes: u32) -> Vec<u8> {
    use std::io::Write as _;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&[0u8; 8192]).expect("in memory");
    let block = z.finish().expect("in memory");
    let mut out = vec![0u8; 96];
    let inode_table = out.len() as u64;
    while out.len() + 2 + block.len() + 16 <= len.max(128) {
        out.extend_from_slice(&(block.len() as u16).to_le_bytes());
        out.extend_from_slice(&block);
    }
    let dir_table = out.len() as u64;
    // The id table: its one pointer, to itself (an empty directory table before it).
    let id_table = out.len() as u64;
    out.extend_from_slice(&id_table.to_le_bytes());
    let bytes_used = out.len() as u64;
    let mut sb = Vec::with_capacity(96);
    sb.extend_from_slice(&0x7371_7368u32.to_le_bytes()); // magic
    sb.extend_from_slice(&inodes.to_le_bytes());
    sb.extend_from_slice(&0u32.to_le_bytes()); // mtime
    sb.extend_from_slice(&131_072u32.to_le_bytes()); // block size
    sb.extend_from_slice(&0u32.to_le_bytes()); // fragments
    sb.extend_from_slice(&1u16.to_le_bytes()); // gzip
    sb.extend_from_slice(&17u16.to_le_bytes()); // block log
    sb.extend_from_slice(&0u16.to_le_bytes()); // flags
    sb.extend_from_slice(&1u16.to_le_bytes()); // ids
    sb.extend_from_slice(&4u16.to_le_bytes());
    sb.extend_from_slice(&0u16.to_le_bytes());
    sb.extend_from_slice(&0u64.to_le_bytes()); // root inode
    sb.extend_from_slice(&bytes_used.to_le_bytes());
    sb.extend_from_slice(&id_table.to_le_bytes());
    sb.extend_from_slice(&u64::MAX.to_le_bytes()); // xattrs
    sb.extend_from_slice(&inode_table.to_le_bytes());
    sb.extend_from_slice(&dir_table.to_le_bytes());
    sb.extend_from_slice(&u64::MAX.to_le_bytes()); // fragments
    sb.extend_from_slice(&u64::MAX.to_le_bytes()); // export
    out[..96].copy_from_slice(&sb);
    out
}

/// An in-memory bundle: path → bytes.
#[derive(Default)]
pub struct MemFs(pub HashMap<String, Vec<u8>>);

impl BundleFs for MemFs {
    fn open(&self, path: &str) -> Result<(Box<dyn Read + '_>, u64)> {
        let b = self
            .0
            .get(path)
            .ok_or_else(|| Error::Missing(path.to_string()))?;
        Ok((Box::new(&b[..]), b.len() as u64))
    }
    fn exists(&self, path: &str) -> bool {
        self.0.contains_key(path)
    }
    fn files(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
    fn locate(&self, path: &str) -> Result<(Location, u64)> {
        let (_, n) = self.open(path)?;
        Ok((Location::Path { path: path.into() }, n))
    }
}

/// Splits fuzz input into documents at `\n--\n`.
fn documents(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(4).position(|w| w == b"\n--\n") {
        out.push(&rest[..i]);
        rest = &rest[i + 4..];
    }
    out.push(rest);
    out
}

/// An OCI layout: the first document is `index.json`, every other one a blob stored
/// under its own digest.
pub fn oci_layout(data: &[u8]) {
    let docs = documents(data);
    let mut fs = MemFs::default();
    fs.0.insert("index.json".into(), docs[0].to_vec());
    for d in &docs[1..] {
        let digest = crate::Digest::of(d);
        fs.0.insert(format!("blobs/sha256/{}", digest.hex()), d.to_vec());
    }
    exercise(&fs);
}

/// A registry storage tree: the first document is the content of a tag's link file and
/// the second of a revision's; every other one a blob stored under its own digest.
pub fn registry_tree(data: &[u8]) {
    let docs = documents(data);
    let mut fs = MemFs::default();
    let root = "p/docker/registry/v2/";
    fs.0.insert(
        format!("{root}repositories/a/b/_manifests/tags/v1/current/link"),
        docs[0].to_vec(),
    );
    if let Some(rev) = docs.get(1) {
        let hex = String::from_utf8_lossy(rev)
            .trim()
            .trim_start_matches("sha256:")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(64)
            .collect::<String>();
        fs.0.insert(
            format!("{root}repositories/a/b/_manifests/revisions/sha256/{hex}/link"),
            rev.to_vec(),
        );
    }
    for d in docs.iter().skip(2) {
        let digest = crate::Digest::of(d);
        let hex = digest.hex();
        fs.0.insert(
            format!("{root}blobs/sha256/{}/{hex}/data", &hex[..2]),
            d.to_vec(),
        );
    }
    exercise(&fs);
}
