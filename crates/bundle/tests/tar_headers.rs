//! A tar whose GNU long name or PAX record declares 100 MB is refused with a reason
//! while memory stays small: the tar reader is given a budget for each member's headers
//! (`maxHeaderBytes`), whether the archive is indexed in place or expanded from gzip.

use std::{io::Write, path::Path};

use shipperd_bundle::{
    DataDir, Error, Format, Limits, archive::ArchiveFs, cas::Cas, parts::MultiFile,
};

/// A field of `/proc/self/status`, in bytes.
fn status(field: &str) -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
        * 1024
}

/// How far the resident memory rose above where it was while `f` ran (the kernel's
/// peak, reset first).
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let before = status("VmRSS:");
    let out = f();
    (out, status("VmHWM:").saturating_sub(before))
}

const HUGE: u64 = 100 << 20;

/// A tar: an extension member of type `kind` declaring `HUGE` bytes (zeros), then a
/// small file.
fn write_tar(out: &mut impl Write, kind: u8) -> std::io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_path("././@Extension").unwrap();
    h.set_size(HUGE);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_mode(0o644);
    h.set_cksum();
    out.write_all(h.as_bytes())?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(HUGE >> 20) {
        out.write_all(&zeros)?;
    }
    let mut f = tar::Header::new_ustar();
    f.set_path("index.json").unwrap();
    f.set_size(2);
    f.set_mode(0o644);
    f.set_cksum();
    out.write_all(f.as_bytes())?;
    out.write_all(b"{}")?;
    out.write_all(&[0u8; 510 + 1024])
}

fn assert_refused(result: shipperd_bundle::Result<ArchiveFs>, peak: usize, what: &str) {
    match result {
        Err(Error::Hostile(reason)) => {
            assert!(reason.contains("maxHeaderBytes"), "{what}: {reason}")
        }
        Err(other) => panic!("{what}: refused for another reason: {other}"),
        Ok(_) => panic!("{what}: accepted"),
    }
    assert!(
        peak < 16 << 20,
        "{what}: {} MiB allocated at the peak",
        peak >> 20
    );
}

fn limits() -> Limits {
    Limits {
        expansion_floor: 1 << 30,
        min_free_bytes: 0,
        ..Limits::default()
    }
}

#[test]
fn huge_extension_headers_are_refused_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, name) in [(b'x', "PAX record"), (b'L', "GNU long name")] {
        // Indexed in place.
        let path = dir.path().join(format!("{}.tar", kind as char));
        write_tar(&mut std::fs::File::create(&path).unwrap(), kind).unwrap();
        let source = MultiFile::open(&[path]).unwrap();
        let (result, peak) = peak_of(|| ArchiveFs::index(source, &limits()));
        assert_refused(result, peak, &format!("{name}, uncompressed"));

        // Expanded from gzip: a few hundred KB that would inflate to 100 MB of header.
        let gz = dir.path().join(format!("{}.tar.gz", kind as char));
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::fast(),
        );
        write_tar(&mut enc, kind).unwrap();
        enc.finish().unwrap();
        assert!(std::fs::metadata(&gz).unwrap().len() < 1 << 20);
        let source = MultiFile::open(&[gz]).unwrap();
        let cas = Cas::new(&DataDir::new(dir.path().join("data")));
        let (result, peak) = peak_of(|| {
            ArchiveFs::expand(
                &source,
                Format::Gzip,
                &cas,
                "b1",
                &limits(),
                &Default::default(),
            )
        });
        assert_refused(result, peak, &format!("{name}, gzip"));
    }
}

#[test]
fn ordinary_long_names_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let long = format!("blobs/sha256/{}", "a".repeat(64));
    let deep = format!("{}/{long}", "d".repeat(150));
    for p in [&long, &deep] {
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, p, &b"abc"[..]).unwrap();
    }
    b.finish().unwrap();
    drop(b);
    let fs = ArchiveFs::index(MultiFile::open(&[path]).unwrap(), &limits()).unwrap();
    use shipperd_bundle::BundleFs as _;
    assert!(fs.exists(&deep), "a 200-byte GNU long name is read");
    let _ = Path::new(&deep);
}
