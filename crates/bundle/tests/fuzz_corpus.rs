//! Replays the fuzz corpus (fuzz/corpus/<target>/*) and any saved crashers
//! (fuzz/regressions/<target>/*) through the same entry points the fuzz targets use.

use std::path::Path;

use shipperd_bundle::fuzzing;

fn replay(target: &str, f: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            f(&std::fs::read(&p).unwrap());
            n += 1;
        }
    }
    assert!(n > 0, "no corpus for {target}");
}

#[test]
fn detect() {
    replay("detect", fuzzing::detect);
}

#[test]
fn tar() {
    replay("tar", fuzzing::tar);
}

#[test]
fn squashfs() {
    replay("squashfs", fuzzing::squashfs);
}

#[test]
fn squashfs_tables() {
    replay("squashfs_tables", fuzzing::squashfs_tables);
}

#[test]
fn oci_layout() {
    replay("oci_layout", fuzzing::oci_layout);
}

#[test]
fn registry_tree() {
    replay("registry_tree", fuzzing::registry_tree);
}
