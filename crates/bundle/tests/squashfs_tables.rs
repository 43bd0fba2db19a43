//! The bound on a squashfs image's tables, checked before backhand unpacks them: images
//! mksquashfs makes (every codec, many entries, with and without an export table and
//! fragments) pass, and open; a metadata bomb (tiny compressed blocks that each unpack to
//! 8 KiB) is refused with the reason, whatever its superblock claims, without unpacking.

use std::{path::Path, process::Command};

use shipperd_bundle::{
    Error, Limits, SquashfsBundle, fuzzing::squashfs_metadata_bomb, squashfs_tables,
};

fn squash(dir: &Path, out: &Path, flags: &[&str]) {
    let st = Command::new("mksquashfs")
        .arg(dir)
        .arg(out)
        .args(["-noappend", "-quiet", "-no-progress"])
        .args(flags)
        .status()
        .expect("mksquashfs (scripts/install-deps.sh installs squashfs-tools)");
    assert!(st.success());
}

fn check(path: &Path, limits: &Limits) -> shipperd_bundle::Result<squashfs_tables::Tables> {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    squashfs_tables::check(&f, len, limits)
}

#[test]
fn real_images_pass_and_open() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    // A registry tree's shape: many directories of 64-character names, small files.
    for i in 0..3000u32 {
        let d = src.join(format!("blobs/sha256/{:02x}/{i:064x}", i % 256));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("data"), "x".repeat((i % 50) as usize)).unwrap();
    }
    // And a directory of many empty files (tables that compress best).
    let flat = src.join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    for i in 0..5000 {
        std::fs::write(flat.join(i.to_string()), b"").unwrap();
    }
    let limits = Limits::default();
    for flags in [
        &["-comp", "gzip"][..],
        &["-comp", "xz", "-no-exports"],
        &["-comp", "zstd", "-no-fragments"],
        &["-comp", "lz4", "-noI", "-noD"],
    ] {
        let img = dir.path().join("img");
        squash(&src, &img, flags);
        let t = check(&img, &limits).unwrap_or_else(|e| panic!("{flags:?}: {e}"));
        assert!(t.inodes > 8000, "{flags:?}: {t:?}");
        assert!(t.blocks > 1 && t.unpacked > 0, "{flags:?}: {t:?}");
        SquashfsBundle::open(&img, &limits).unwrap_or_else(|e| panic!("{flags:?}: {e}"));
    }
}

#[test]
fn a_metadata_bomb_is_refused_before_it_is_unpacked() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits::default();
    // Claiming few inodes, or as many as the limit allows (the bound is then the ratio).
    for (len, inodes) in [
        (1 << 20, 1),
        (4 << 20, 1),
        (1 << 20, 500_000),
        (4 << 20, 500_000),
    ] {
        let img = dir.path().join("bomb");
        std::fs::write(&img, squashfs_metadata_bomb(len, inodes)).unwrap();
        let err = check(&img, &limits).unwrap_err();
        assert!(matches!(err, Error::Hostile(_)), "{len} {inodes}: {err}");
        assert!(
            err.to_string().contains("metadata unpacks to more than"),
            "{err}"
        );
        // Refused at the first block over the budget: the walk did not go through.
        let err = SquashfsBundle::open(&img, &limits).err().expect("refused");
        assert!(matches!(err, Error::Hostile(_)), "{err}");
    }
    // More inodes than entries allowed: refused by the superblock alone.
    let img = dir.path().join("many");
    std::fs::write(&img, squashfs_metadata_bomb(4096, 600_000)).unwrap();
    let err = check(&img, &limits).unwrap_err();
    assert!(err.to_string().contains("600000 inodes"), "{err}");
}

#[test]
fn a_table_that_does_not_end_where_the_next_begins_is_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let mut bomb = squashfs_metadata_bomb(4096, 500_000);
    // The directory table now starts inside the inode table's last block.
    let dir_table = u64::from_le_bytes(bomb[72..80].try_into().unwrap()) - 3;
    bomb[72..80].copy_from_slice(&dir_table.to_le_bytes());
    let img = dir.path().join("cut");
    std::fs::write(&img, &bomb).unwrap();
    let err = check(&img, &Limits::default()).unwrap_err();
    assert!(matches!(err, Error::Squashfs(_)), "{err}");
    assert!(err.to_string().contains("past the next table"), "{err}");
}
