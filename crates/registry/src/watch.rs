//! Stall detection: a request is abandoned when no byte of its body has moved (and no
//! answer came) for the stall timeout, however long the whole transfer takes.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Bytes moved by a request body, shared with its watchdog.
#[derive(Debug, Clone, Default)]
pub(crate) struct Moved(Arc<AtomicU64>);

impl Moved {
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn total(&self) -> u64 {
        self.get()
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Runs `fut` until it ends, or until `moved` has not changed for `stall`.
pub(crate) async fn watched<T>(
    fut: impl Future<Output = T>,
    moved: &Moved,
    stall: Duration,
) -> Result<T, Duration> {
    tokio::pin!(fut);
    let tick = (stall / 4).max(Duration::from_millis(20));
    let mut last = moved.get();
    let mut since = Instant::now();
    loop {
        tokio::select! {
            out = &mut fut => return Ok(out),
            () = shipperd_model::deadline(tick) => {
                let now = moved.get();
                if now != last {
                    last = now;
                    since = Instant::now();
                } else if since.elapsed() >= stall {
                    return Err(stall);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn moving_bytes_keep_a_slow_transfer_alive() {
        let moved = Moved::default();
        let m = moved.clone();
        let slow = async move {
            for _ in 0..10 {
                shipperd_model::pause(Duration::from_millis(30)).await;
                m.add(1);
            }
        };
        assert!(
            watched(slow, &moved, Duration::from_millis(150))
                .await
                .is_ok()
        );
        let stuck = shipperd_model::deadline(Duration::from_secs(5));
        let t = Instant::now();
        assert!(
            watched(stuck, &moved, Duration::from_millis(100))
                .await
                .is_err()
        );
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
