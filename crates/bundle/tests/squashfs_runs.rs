//! Files of a squashfs image are read straight from the image file (blocks stored as
//! they are, compressed blocks unpacked here, holes, tails in fragment blocks), from any
//! offset, byte for byte what was squashed. Images are made by Debian's mksquashfs (scripts/install-deps.sh), with tail
//! ends in fragments and without, data compressed and not.

use std::{io::Read, path::Path, process::Command};

use shipperd_bundle::{BundleFs, Limits, SquashfsBundle};

/// Bytes that do not compress (a xorshift stream).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn squash(dir: &Path, out: &Path, flags: &[&str]) {
    let st = Command::new("mksquashfs")
        .arg(dir)
        .arg(out)
        .args(["-noappend", "-quiet", "-no-progress", "-b", "131072"])
        .args(flags)
        .status()
        .expect("mksquashfs (scripts/install-deps.sh installs squashfs-tools)");
    assert!(st.success());
}

fn read_from(fs: &SquashfsBundle, path: &str, start: u64) -> Vec<u8> {
    let (mut r, _) = fs.open_from(path, start).unwrap();
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

#[test]
fn files_are_read_from_the_image_from_any_offset() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let block = 131_072;
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("layer", noise(3 * block + 4321, 7)),
        ("exact", noise(2 * block, 8)),
        ("small", noise(1000, 9)),
        ("text", b"compresses well ".repeat(40_000)),
        ("empty", Vec::new()),
        // Blocks of zeros are holes: nothing stored.
        ("zeros", vec![0; 3 * block]),
    ];
    for (name, bytes) in &files {
        std::fs::write(src.join(name), bytes).unwrap();
    }
    // (flags, files read in place, files read by backhand); the others depend on
    // mksquashfs' choices (a tail may go to a fragment, which is stored uncompressed
    // when compressing it does not help).
    let cases: [&[&str]; 6] = [
        // Compressed blocks and fragment blocks, unpacked here.
        &["-comp", "gzip"],
        &["-comp", "xz"],
        &["-comp", "zstd", "-no-fragments"],
        &["-comp", "gzip", "-noF"],
        &["-comp", "lz4"],
        // Nothing compressed at all.
        &["-noI", "-noD", "-noF", "-noX"],
    ];
    for flags in cases {
        let img = dir.path().join("img.squashfs");
        squash(&src, &img, flags);
        let fs = SquashfsBundle::open(&img, &Limits::default()).unwrap();
        for (name, bytes) in &files {
            assert!(fs.read_directly(name), "{name} with {flags:?}");
            let len = bytes.len() as u64;
            for start in [
                0,
                1,
                4321,
                block as u64 - 1,
                block as u64,
                2 * block as u64 + 17,
                len,
            ] {
                if start > len {
                    continue;
                }
                assert_eq!(
                    read_from(&fs, name, start),
                    bytes[start as usize..],
                    "{name} from {start} with {flags:?}"
                );
            }
            let (mut r, l) = fs.open(name).unwrap();
            let mut all = Vec::new();
            r.read_to_end(&mut all).unwrap();
            assert_eq!((all.as_slice(), l), (bytes.as_slice(), len), "{name}");
        }
    }
}
