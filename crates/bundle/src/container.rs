//! Opening a stored bundle: one file or a directory of parts, whatever its container.

use std::path::Path;

use crate::{
    BundleFs, Error, Format, Guard, Limits, Result, SquashfsBundle,
    archive::ArchiveFs,
    cas::Cas,
    catalog::Container,
    format::detect_bytes,
    parts::{MultiFile, part_paths},
};

/// An opened bundle.
pub struct Opened {
    pub fs: Box<dyn BundleFs>,
    pub format: Format,
    pub container: Container,
}

/// Opens the bundle stored at `path` (a file, or a directory of parts read in name
/// order as one archive). Compressed tars are expanded into `cas` for `bundle_id`,
/// as long as `guard` lets them.
pub fn open(
    path: &Path,
    cas: &Cas,
    bundle_id: &str,
    limits: &Limits,
    guard: &Guard,
) -> Result<Opened> {
    open_parts(&part_paths(path)?, cas, bundle_id, limits, guard)
}

/// [`open`] for a bundle whose parts are these files, read in this order as one
/// archive (e.g. oc-mirror's `mirror_000001.tar`, `mirror_000002.tar`, ...).
pub fn open_parts(
    parts: &[std::path::PathBuf],
    cas: &Cas,
    bundle_id: &str,
    limits: &Limits,
    guard: &Guard,
) -> Result<Opened> {
    guard.check()?;
    let source = MultiFile::open(parts)?;
    let mut head = [0u8; 512];
    let mut got = 0;
    while got < head.len() {
        match source.read_at(&mut head[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(Error::read(source.name(), e)),
        }
    }
    let format = detect_bytes(&head[..got]);
    let (fs, container): (Box<dyn BundleFs>, Container) = match format {
        Format::Squashfs if parts.len() == 1 => (
            Box::new(SquashfsBundle::open(&parts[0], limits)?),
            Container::Squashfs,
        ),
        Format::Squashfs => {
            return Err(Error::Layout(
                "a squashfs image cannot be split into parts".into(),
            ));
        }
        Format::Tar => (Box::new(ArchiveFs::index(source, limits)?), Container::Tar),
        Format::Gzip | Format::Zstd | Format::Xz => (
            Box::new(ArchiveFs::expand(
                &source, format, cas, bundle_id, limits, guard,
            )?),
            Container::Expanded,
        ),
        Format::Unknown => return Err(Error::Unsupported(format)),
    };
    Ok(Opened {
        fs,
        format,
        container,
    })
}
