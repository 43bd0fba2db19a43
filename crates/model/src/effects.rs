//! What must happen after a state transition, as data: a transition of
//! [`BundleSummary`](crate::BundleSummary) returns [`Effects`] and one executor (in
//! `shipperd-state`) performs them, each idempotently (messages carry de-duplication
//! ids). Deciding what follows a phase is done here, once, and tested as a table;
//! sending it is done there, once.

use crate::ImageState;

/// One thing to do after a transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send `bundle.received` (again): the bundle is to be unpacked.
    Announce,
    /// Send the publish jobs of the images this generation has not counted.
    Dispatch,
    /// Send the commit job: every image is in the registry, set the tags.
    Commit,
    /// Send `bundle.unpacked`.
    Unpacked,
    /// Send `image.published` or `image.failed` for this image, as recorded.
    ImageEnded(Box<ImageState>),
    /// Send `bundle.published` or `bundle.failed`, once, and note that it went.
    Ended,
    /// Let go of the bundle's expanded blobs in the shared blob store.
    ReleaseBlobs,
}

/// Effects, performed in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects(Vec<Effect>);

impl Effects {
    pub fn none() -> Self {
        Effects(Vec::new())
    }

    pub fn of(list: impl IntoIterator<Item = Effect>) -> Self {
        Effects(list.into_iter().collect())
    }

    pub fn push(&mut self, e: Effect) {
        self.0.push(e);
    }

    /// These, then `more`.
    pub fn then(mut self, more: Effects) -> Self {
        self.0.extend(more.0);
        self
    }

    pub fn iter(&self) -> impl Iterator<Item = &Effect> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, e: &Effect) -> bool {
        self.0.contains(e)
    }
}

impl IntoIterator for Effects {
    type Item = Effect;
    type IntoIter = std::vec::IntoIter<Effect>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}
