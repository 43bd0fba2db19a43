//! Targets that follow their file: a targets file changed while the services run (by
//! hand, or by the operator from `RegistryTarget` resources) is read again and applies
//! to the next image, without a restart. A file that no longer parses is refused with
//! the reason logged, and the targets read before stay.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use crate::Targets;

/// The current targets, and the file they come from (if any).
#[derive(Debug, Clone)]
pub struct LiveTargets {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    current: RwLock<(Arc<Targets>, u64)>,
    file: Option<PathBuf>,
}

impl LiveTargets {
    /// `targets`, read from `file` when given (which is then watched by
    /// [`LiveTargets::follow`]).
    pub fn new(targets: Targets, file: Option<PathBuf>) -> Self {
        LiveTargets {
            inner: Arc::new(Inner {
                current: RwLock::new((Arc::new(targets), 0)),
                file,
            }),
        }
    }

    /// The targets now.
    pub fn get(&self) -> Arc<Targets> {
        self.snapshot().0
    }

    /// The targets now, and their version, read together: bumped each time they change
    /// (callers keep what they built per target until it moves).
    pub fn snapshot(&self) -> (Arc<Targets>, u64) {
        self.inner.current.read().expect("not poisoned").clone()
    }

    /// Reads the file again and applies it; whether it could.
    pub fn reload(&self) -> bool {
        let Some(path) = &self.inner.file else {
            return false;
        };
        match Targets::load(path) {
            Ok(t) => {
                let mut cur = self.inner.current.write().expect("not poisoned");
                tracing::info!(file = %path.display(), targets = t.iter().count(), "targets changed; applying");
                *cur = (Arc::new(t), cur.1 + 1);
                true
            }
            Err(error) => {
                tracing::warn!(%error, "the targets file does not parse; keeping the targets read before");
                false
            }
        }
    }

    /// Reads the file again every `every` (a cheap read of a small file) until
    /// `stop` resolves.
    pub async fn follow(self, every: Duration, stop: impl std::future::Future<Output = ()>) {
        if self.inner.file.is_none() {
            return;
        }
        let mut last = self.read_raw();
        let watch = async {
            loop {
                shipperd_model::pause(every).await;
                let now = self.read_raw();
                if now != last {
                    last = now;
                    self.reload();
                }
            }
        };
        tokio::select! {
            _ = watch => {}
            _ = stop => {}
        }
    }

    fn read_raw(&self) -> Option<Vec<u8>> {
        self.inner.file.as_ref().and_then(|p| std::fs::read(p).ok())
    }
}
