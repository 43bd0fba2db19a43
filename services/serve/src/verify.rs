//! serve checks what it serves: a blob's bytes are checked against its digest the first
//! time they are served from a bundle, and the answer is remembered for that bundle.
//! A later bundle may claim another image's digest with other bytes (by mistake or on
//! purpose); its copy is then passed over for the next bundle holding the digest, and
//! where none holds the right bytes the blob is `404` with the reason in the log.
//!
//! Where only one bundle holds a digest and the whole blob is asked for, the bytes are
//! hashed as they stream out and the last chunk is held back until they check: a copy
//! that does not match ends the response with an error instead (the client's download
//! fails; the next request is answered 404). Where several bundles hold it, or a range
//! is asked for, the copy is read whole first, once.

use std::{
    collections::HashMap,
    io::Read as _,
    sync::{Arc, Mutex},
};

use sha2::{Digest as _, Sha256};
use shipperd_bundle::Digest;

use crate::{Index, Loaded};

/// What is known of one bundle's copies of blobs: digest → its bytes hash to it; and
/// the digests being read whole now (one reader per copy: others wait for its answer).
#[derive(Default)]
pub(crate) struct Checked(
    Mutex<HashMap<Digest, bool>>,
    Mutex<HashMap<Digest, Arc<Mutex<()>>>>,
);

impl Checked {
    /// The lock of reading `digest`'s copy whole (held while it is hashed).
    fn reading(&self, digest: &Digest) -> Arc<Mutex<()>> {
        self.1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(digest.clone())
            .or_default()
            .clone()
    }

    /// Forgets the lock once the answer is known.
    fn read(&self, digest: &Digest) {
        self.1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(digest);
    }

    pub(crate) fn get(&self, digest: &Digest) -> Option<bool> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .copied()
    }

    pub(crate) fn note(&self, digest: &Digest, good: bool) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest.clone(), good);
    }
}

/// A bundle's copy of a blob, at a path in it.
pub(crate) type Copy = (Arc<Loaded>, String);

/// The copies of `digest` not known to be wrong, the newest bundle first.
pub(crate) fn candidates(index: &Index, digest: &Digest) -> Vec<Copy> {
    index
        .bundles
        .iter()
        .rev()
        .filter(|b| b.checked.get(digest) != Some(false))
        .filter_map(|b| b.paths.get(digest).map(|p| (b.clone(), p)))
        .collect()
}

/// Does `b`'s copy at `path` hash to `digest`? Read whole the first time (blocking; a
/// request asking meanwhile waits for that answer rather than reading it again),
/// remembered after.
pub(crate) fn hashes_to(b: &Loaded, path: &str, digest: &Digest) -> bool {
    if let Some(known) = b.checked.get(digest) {
        return known;
    }
    let lock = b.checked.reading(digest);
    let _one = lock.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = b.checked.get(digest) {
        return known;
    }
    let good = match b.fs.open(path) {
        Ok((mut r, _)) => {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 256 << 10];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break hex::encode(h.finalize()) == digest.hex(),
                    Ok(n) => h.update(&buf[..n]),
                    Err(error) => {
                        tracing::warn!(%error, %digest, path, "a blob cannot be read from its bundle");
                        break false;
                    }
                }
            }
        }
        Err(error) => {
            tracing::warn!(%error, %digest, path, "a blob cannot be opened in its bundle");
            false
        }
    };
    noted(b, path, digest, good);
    b.checked.read(digest);
    good
}

/// Notes what was found of `b`'s copy of `digest`, saying so when it is wrong.
pub(crate) fn noted(b: &Loaded, path: &str, digest: &Digest, good: bool) {
    if !good {
        tracing::error!(
            %digest,
            bundle = %b.name,
            path,
            "the bundle's copy of this blob does not hash to its digest: not served from it"
        );
    }
    b.checked.note(digest, good);
}

/// The first of `copies` whose bytes hash to `digest` (each read whole once).
pub(crate) fn first_good(copies: Vec<Copy>, digest: &Digest) -> Option<Copy> {
    copies.into_iter().find(|(b, p)| hashes_to(b, p, digest))
}
