//! What can go wrong reconciling, with a label for each kind in the metrics.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Bus(#[from] shipperd_bus::Error),
    #[error(transparent)]
    Store(#[from] shipperd_store::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    Invalid(String),
    /// The cluster's resources could not be brought up to date.
    #[error("applying cluster resources: {0}")]
    Converge(String),
}

impl Error {
    /// The `error` label of `shipperd_operator_reconcile_errors_total` (few values:
    /// one per kind, never the message).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Bus(_) => "bus",
            Error::Store(_) => "store",
            Error::Finalizer(_) => "finalizer",
            Error::Invalid(_) => "invalid",
            Error::Converge(_) => "converge",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
