//! The drop directory: bundles copied in with `oc rsync` or `kubectl cp`.
//!
//! A file is taken only once it is complete: hidden files (rsync writes `.name.XXXXXX`
//! and renames at the end) and `*.part`/`*.tmp` names are skipped, and a file must keep
//! the same size and modification time across one poll interval. A taken file is moved
//! into the store; one that cannot be taken is renamed `<name>.failed` with the reason
//! beside it in `<name>.failed.txt`, so it is neither lost nor retried forever.
//!
//! A sibling `<name>.sha256` (sha256sum format, as Koffer writes it) is the checksum the
//! bundle must have: a bundle that does not match is refused like a corrupt upload.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration, time::SystemTime};

use tokio_util::sync::CancellationToken;

use crate::{
    metrics::METRICS,
    store::{Store, parse_checksum},
};

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

pub async fn watch(dir: PathBuf, every: Duration, store: Arc<Store>, shutdown: CancellationToken) {
    if let Err(error) = tokio::fs::create_dir_all(&dir).await {
        tracing::error!(%error, dir = %dir.display(), "cannot create the drop directory; not watching it");
        return;
    }
    tracing::info!(dir = %dir.display(), "watching drop directory");
    let mut last: HashMap<String, (u64, SystemTime)> = HashMap::new();
    loop {
        let mut now = HashMap::new();
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
                    if !meta.is_file() {
                        continue;
                    }
                    let stamp = (
                        meta.len(),
                        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    );
                    if last.get(&name) == Some(&stamp) && stamp.0 > 0 {
                        take(&store, &dir, &name).await;
                    } else {
                        now.insert(name, stamp);
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, dir = %dir.display(), "cannot list the drop directory")
            }
        }
        last = now;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn take(store: &Store, dir: &std::path::Path, name: &str) {
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
    match store.receive_file(name, &path, expected.as_ref()).await {
        Ok(a) => {
            if expected.is_some() {
                let _ = tokio::fs::remove_file(&sidecar).await;
            }
            tracing::info!(bundle_id = %a.summary.id, name, created = a.created, "took bundle from the drop directory")
        }
        Err(error) if error.is_transient() => {
            tracing::warn!(%error, name, "cannot take bundle from the drop directory now; will try again");
        }
        Err(error) => {
            METRICS.uploads_rejected.add(1);
            tracing::warn!(%error, name, "cannot take bundle from the drop directory");
            let failed = dir.join(format!("{name}.failed"));
            let _ = tokio::fs::rename(&path, &failed).await;
            let _ = tokio::fs::write(dir.join(format!("{name}.failed.txt")), format!("{error}\n"))
                .await;
        }
    }
}
