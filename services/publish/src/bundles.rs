//! Bundles opened for reading, one per bundle and process, shared by its jobs. Opening
//! is the costly part (a squashfs's inode table, a tar's parts); each job then reads
//! only its own plan (one small read at the offset its job names).

use std::sync::Arc;

use shipperd_bundle::{BlobStore, Catalog, StoredPlan, read_plan};
use shipperd_model::{BundleId, DataDir, PlanRef};
use tokio::sync::OnceCell;

use crate::{Error, Result};

/// Bundles kept open at once; beyond that the least recently opened is closed (its
/// jobs keep their handle until they end).
const MAX_OPEN: usize = 16;

type Slot = Arc<OnceCell<Arc<BlobStore>>>;

pub(crate) struct Bundles {
    data: DataDir,
    open: std::sync::Mutex<Vec<(BundleId, Slot)>>,
}

impl Bundles {
    pub(crate) fn new(data: DataDir) -> Self {
        Bundles {
            data,
            open: Default::default(),
        }
    }

    /// The opened bundle `id` and the plan at `at` in its plans file.
    pub(crate) async fn plan(
        &self,
        id: &BundleId,
        at: PlanRef,
    ) -> Result<(Arc<BlobStore>, StoredPlan)> {
        let store = self.get(id).await?;
        Ok((store, self.plan_only(id, at).await?))
    }

    /// The plan at `at` in bundle `id`'s plans file, without opening the bundle.
    pub(crate) async fn plan_only(&self, id: &BundleId, at: PlanRef) -> Result<StoredPlan> {
        let path = self.data.plans(id);
        tokio::task::spawn_blocking(move || read_plan(&path, at))
            .await
            .map_err(|e| Error::Internal(format!("reading a plan: {e}")))?
            .map_err(Error::from)
    }

    async fn get(&self, id: &BundleId) -> Result<Arc<BlobStore>> {
        let slot = {
            let mut open = self.open.lock().expect("not poisoned");
            match open.iter().position(|(k, _)| k == id) {
                Some(i) => open[i].1.clone(),
                None => {
                    if open.len() >= MAX_OPEN {
                        open.remove(0);
                    }
                    let slot = Slot::default();
                    open.push((id.clone(), slot.clone()));
                    slot
                }
            }
        };
        let data = self.data.clone();
        let id = id.clone();
        let store = slot
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || -> Result<Arc<BlobStore>> {
                    Ok(Arc::new(Catalog::load(&data, &id)?.open(&data)?))
                })
                .await
                .map_err(|e| Error::Internal(format!("opening a bundle: {e}")))?
            })
            .await?;
        Ok(store.clone())
    }

    /// The bundle ended: close it.
    pub(crate) fn forget(&self, id: &BundleId) {
        self.open
            .lock()
            .expect("not poisoned")
            .retain(|(k, _)| k != id);
    }
}
