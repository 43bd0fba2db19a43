//! The drop directory: bundles copied in with `oc rsync` or `kubectl cp`.
//!
//! A file is the user's only copy, so it is taken only once its writer is done:
//!
//! - hidden files (rsync writes `.name.XXXXXX` and renames at the end) and
//!   `*.part`/`*.tmp`/`*.partial` names are never taken;
//! - a file some process on this machine has open for writing is not taken (checked in
//!   `/proc`; writers elsewhere, over NFS say, are covered by the quiet time);
//! - a file is taken once it has stayed unchanged (size, modification time) over one
//!   poll and either was renamed in (its inode changed after its last write: a rename,
//!   or `rsync -t`/`cp -p` setting an older time) or its sibling `<name>.sha256`
//!   (sha256sum format, as Koffer writes it) matches it; otherwise only once it has
//!   stayed unchanged for the whole quiet time (`--drop-quiet`, 30 s).
//!
//! A bundle whose `.sha256` does not match is refused like a corrupt upload, but only
//! once it has been quiet for the quiet time (before that it may still be growing). A
//! taken file is moved into the store; one that cannot be taken is renamed
//! `<name>.failed` with the reason beside it in `<name>.failed.txt`, so it is neither lost
//! nor retried forever.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio_util::sync::CancellationToken;

use shipperd_store::{Origin, Store, parse_checksum};

use crate::{Error, metrics::metrics};

/// How a drop-directory file looked at a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Look {
    size: u64,
    modified: SystemTime,
}

/// A file being watched: how it looked last, and since when it has looked so.
struct Watched {
    look: Look,
    since: Instant,
}

fn skipped(name: &str) -> bool {
    name.starts_with('.')
        || [
            ".part",
            ".tmp",
            ".partial",
            ".failed",
            ".failed.txt",
            ".sha256",
            "~",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

pub async fn watch(
    dir: PathBuf,
    every: Duration,
    quiet: Duration,
    store: Arc<Store>,
    shutdown: CancellationToken,
) {
    if let Err(error) = tokio::fs::create_dir_all(&dir).await {
        tracing::error!(%error, dir = %dir.display(), "cannot create the drop directory; not watching it");
        return;
    }
    tracing::info!(dir = %dir.display(), quiet = ?quiet, "watching drop directory");
    let mut watched: HashMap<String, Watched> = HashMap::new();
    loop {
        let mut seen = HashMap::new();
        let mut ready = Vec::new();
        match tokio::fs::read_dir(&dir).await {
            Ok(mut entries) => {
                while let Ok(Some(e)) = entries.next_entry().await {
                    let name = e.file_name().to_string_lossy().to_string();
                    if skipped(&name) {
                        continue;
                    }
                    let Ok(meta) = e.metadata().await else {
                        continue;
                    };
                    if !meta.is_file() || meta.len() == 0 {
                        continue;
                    }
                    let look = Look {
                        size: meta.len(),
                        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    };
                    let w = match watched.remove(&name) {
                        Some(w) if w.look == look => w,
                        // New, or changed since the last poll: watched from now.
                        _ => {
                            seen.insert(
                                name,
                                Watched {
                                    look,
                                    since: Instant::now(),
                                },
                            );
                            continue;
                        }
                    };
                    ready.push((name.clone(), renamed_in(&meta), w.since.elapsed() >= quiet));
                    seen.insert(name, w);
                }
            }
            Err(error) => {
                tracing::warn!(%error, dir = %dir.display(), "cannot list the drop directory")
            }
        }
        if !ready.is_empty() {
            let open = open_for_writing(&dir).await;
            for (name, renamed, quiet_enough) in ready {
                if open.contains(&name) {
                    tracing::debug!(
                        name,
                        "a process has the file open for writing; not taking it yet"
                    );
                    continue;
                }
                let sidecar = dir.join(format!("{name}.sha256"));
                let has_sum = tokio::fs::try_exists(&sidecar).await.unwrap_or(false);
                if !(renamed || quiet_enough || has_sum) {
                    continue;
                }
                if take(&store, &dir, &name, quiet_enough).await {
                    seen.remove(&name);
                }
            }
        }
        watched = seen;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = shipperd_model::pause(every) => {}
        }
    }
}

/// Was the file renamed (or its times set) after its last write? Its inode changed
/// later than its contents.
fn renamed_in(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    (meta.ctime(), meta.ctime_nsec()) > (meta.mtime(), meta.mtime_nsec())
}

/// Names of the files in `dir` that a process of this machine has open for writing
/// (those whose `/proc` this process may read).
async fn open_for_writing(dir: &Path) -> HashSet<String> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let mut open = HashSet::new();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return open;
        };
        for p in procs.flatten() {
            let pid = p.path();
            if !p
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            let Ok(fds) = std::fs::read_dir(pid.join("fd")) else {
                continue;
            };
            for fd in fds.flatten() {
                let Ok(target) = std::fs::read_link(fd.path()) else {
                    continue;
                };
                if target.parent() != Some(dir.as_path()) {
                    continue;
                }
                // `flags:` in fdinfo is octal; O_WRONLY is 1, O_RDWR 2.
                let writing = std::fs::read_to_string(pid.join("fdinfo").join(fd.file_name()))
                    .ok()
                    .and_then(|info| {
                        info.lines()
                            .find_map(|l| l.strip_prefix("flags:"))
                            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                    })
                    .is_some_and(|flags| flags & 0o3 != 0);
                if writing && let Some(name) = target.file_name() {
                    open.insert(name.to_string_lossy().to_string());
                }
            }
        }
        open
    })
    .await
    .unwrap_or_default()
}

/// Takes `name` into the store; `true` when it is gone from the drop directory (stored,
/// or failed aside). A checksum that does not match yet is waited on until `final_`.
async fn take(store: &Store, dir: &Path, name: &str, final_: bool) -> bool {
    let path = dir.join(name);
    let sidecar = dir.join(format!("{name}.sha256"));
    let expected = match tokio::fs::read_to_string(&sidecar).await {
        Ok(text) => match text.split_whitespace().next().map(parse_checksum) {
            Some(Ok(sum)) => Some(sum),
            _ => {
                tracing::warn!(file = %sidecar.display(), "checksum file is not in sha256sum format; ignoring it");
                None
            }
        },
        Err(_) => None,
    };
    match store
        .receive_file(name, &path, expected.as_ref(), &Origin::drop_directory())
        .await
    {
        Ok(a) => {
            if expected.is_some() {
                let _ = tokio::fs::remove_file(&sidecar).await;
            }
            tracing::info!(bundle_id = %a.summary.id, name, created = a.created, "took bundle from the drop directory");
            true
        }
        Err(Error::ChecksumMismatch { .. }) if !final_ => {
            tracing::debug!(
                name,
                "does not match its .sha256 yet; waiting for the writer"
            );
            false
        }
        Err(error) if error.is_transient() => {
            tracing::warn!(%error, name, "cannot take bundle from the drop directory now; will try again");
            false
        }
        Err(error) => {
            metrics().uploads_rejected.inc();
            tracing::warn!(%error, name, "cannot take bundle from the drop directory");
            let failed = dir.join(format!("{name}.failed"));
            let _ = tokio::fs::rename(&path, &failed).await;
            let _ = tokio::fs::write(dir.join(format!("{name}.failed.txt")), format!("{error}\n"))
                .await;
            true
        }
    }
}
