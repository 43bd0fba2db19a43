//! The operator's own metrics: reconciles by kind and result.

/// Counts a reconcile of `kind` (`shipperd_operator_reconciles_total{kind, result}`).
fn count(kind: &'static str, ok: bool) {
    shipperd_telemetry::metrics::metrics()
        .reconciles
        .get_or_create(&shipperd_telemetry::metrics::labels(
            ("kind", kind),
            ("result", if ok { "ok" } else { "error" }),
        ))
        .inc();
}

/// A reconcile of `kind`, counted when it ends.
pub(crate) async fn counted<T, E>(
    kind: &'static str,
    reconcile: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let r = reconcile.await;
    count(kind, r.is_ok());
    r
}
