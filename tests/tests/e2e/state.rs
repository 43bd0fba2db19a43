//! The bundle state in a real nats-server's KV: image outcomes delivered several times
//! at once are counted once each and end the bundle once; a claim a crash left is
//! finished by whoever comes next; filtered pages walk a bundle in index order.

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use shipperd_bus::Bus;
use shipperd_model::{
    BundleId, BundleSummary, Digest, ImagePhase, ImageState, Outcome, Phase, PlanRef, Reference,
    state::Unpacked,
};
use shipperd_state::{StateStore, finish};
use shipperd_tests::servers::Nats;

async fn store() -> anyhow::Result<(Nats, StateStore)> {
    shipperd_tests::init();
    let nats = Nats::start().await?;
    let bus = Bus::connect(&nats.url(), "state-test").await?;
    bus.ensure_topology().await?;
    let store = StateStore::open(&bus).await?;
    Ok((nats, store))
}

/// A publishing bundle of `n` pending images.
async fn bundle(store: &StateStore, salt: &str, n: u32) -> anyhow::Result<BundleId> {
    let id = BundleId::parse(Digest::of(salt.as_bytes()).hex())?;
    let mut s = BundleSummary::new(id.clone(), salt.into(), 1, "p".into(), None);
    assert!(s.start_unpacking(1));
    assert!(
        s.unpacked(&Unpacked {
            format: "tar".into(),
            images: n,
            bytes_total: 10 * u64::from(n),
            ..Unpacked::default()
        })
        .is_some()
    );
    assert!(store.create(&s).await?);
    let images: Vec<ImageState> = (0..n)
        .map(|index| ImageState {
            index,
            source: Reference::parse(&format!("src/app{index}:1")).unwrap(),
            target: Reference::parse(&format!("reg.io/app{index}:1")).unwrap(),
            digest: Digest::of(&index.to_be_bytes()),
            media_type: "m".into(),
            size: 1,
            phase: ImagePhase::Pending,
            error: None,
            bytes_total: 10,
            bytes_done: 0,
            skipped: false,
            attempts: 0,
            generation: 0,
            plan: PlanRef::default(),
            blobs: Default::default(),
            catalog: false,
            trust: None,
        })
        .collect();
    store.put_pending_images(&id, &images).await?;
    Ok(id)
}

fn outcome(i: u32) -> Outcome {
    if i.is_multiple_of(2) {
        Outcome::published(10, i.is_multiple_of(4), Default::default())
    } else {
        Outcome::failed(format!("image {i}: refused"), "refused".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outcomes_delivered_at_once_are_counted_once_and_end_the_bundle_once() -> anyhow::Result<()>
{
    let (_nats, store) = store().await?;
    const N: u32 = 40;
    const COPIES: u32 = 4;
    let id = bundle(&store, "race", N).await?;
    let ended = Arc::new(AtomicU32::new(0));
    let counted = Arc::new(AtomicU32::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        for _ in 0..COPIES {
            let (store, id, ended, counted) =
                (store.clone(), id.clone(), ended.clone(), counted.clone());
            tasks.spawn(async move {
                let f = finish::finish_image(&store, &id, i, 0, &outcome(i))
                    .await?
                    .expect("recorded");
                assert!(f.image.is_counted(f.summary.generation));
                if f.counted {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                if f.ended {
                    ended.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    assert_eq!(
        counted.load(Ordering::Relaxed),
        N,
        "each outcome counted once"
    );
    assert_eq!(ended.load(Ordering::Relaxed), 1, "the bundle ended once");
    let s = store.summary(&id).await?.unwrap();
    assert_eq!(s.phase, Phase::Failed);
    assert_eq!((s.counts.published, s.counts.failed), (N / 2, N / 2));
    assert_eq!(s.counts.skipped, N / 4);
    assert!(s.claims.is_empty(), "every claim released");
    assert_eq!(s.bytes_done, 10 * u64::from(N / 2));
    assert_eq!(
        s.error.as_deref(),
        Some(format!("{} of {N} images failed: refused ({} images)", N / 2, N / 2).as_str())
    );

    // Failed images, a page of 7 at a time from the start: 20, in index order.
    let mut seen = Vec::new();
    let mut offset = Some(0);
    while let Some(o) = offset {
        let page = store.page(&s, Some(ImagePhase::Failed), o, 7).await?;
        assert!(page.images.len() <= 7);
        seen.extend(page.images.iter().map(|i| i.index));
        offset = page.next;
    }
    assert_eq!(seen, (0..N).filter(|i| i % 2 == 1).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_left_by_a_crash_is_finished_by_whoever_comes_next() -> anyhow::Result<()> {
    let (_nats, store) = store().await?;
    let id = bundle(&store, "crash", 2).await?;
    // A worker counted image 0 and died before writing it to the image.
    let ok = Outcome::published(10, false, Default::default());
    store
        .update(&id, |s| Some(s.claim(0, &ok)))
        .await?
        .expect("claimed");
    let (img, _) = store.image(&id, 0).await?.unwrap();
    assert_eq!(img.phase, ImagePhase::Pending);

    // A redelivery with another outcome: the claimed one stands, and is not counted
    // again.
    let f = finish::finish_image(&store, &id, 0, 0, &Outcome::failed("x".into(), "x".into()))
        .await?
        .unwrap();
    assert!(!f.counted);
    assert_eq!(f.image.phase, ImagePhase::Published);
    assert!(f.summary.claims.is_empty());
    assert_eq!(f.summary.counts.published, 1);
    assert_eq!(f.summary.counts.failed, 0);

    // Another left claim, settled by the janitor's sweep instead.
    store
        .update(&id, |s| Some(s.claim(1, &ok)))
        .await?
        .expect("claimed");
    assert_eq!(finish::settle_claims(&store, &id).await?, 1);
    let s = store.summary(&id).await?.unwrap();
    // Every image is in the registry: its tags are set next.
    assert_eq!(s.phase, Phase::Tagging);
    assert!(s.claims.is_empty());
    assert_eq!(
        store.image(&id, 1).await?.unwrap().0.phase,
        ImagePhase::Published
    );
    // Nothing left to resume.
    assert!(
        finish::resume(&store, &id, 1)
            .await?
            .is_some_and(|f| !f.counted)
    );
    Ok(())
}

/// A job of an earlier generation (still running when the bundle was retried) counts
/// in none: the retry's own job for that image decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outcome_of_an_earlier_generation_is_not_counted() -> anyhow::Result<()> {
    let (_nats, store) = store().await?;
    let id = bundle(&store, "generations", 2).await?;
    let refused = Outcome::failed("x".into(), "x".into());
    for i in 0..2 {
        finish::finish_image(&store, &id, i, 0, &refused)
            .await?
            .expect("counted");
    }
    let (_, s) = store.update(&id, |s| s.retry()).await?.expect("retried");
    assert_eq!((s.generation, s.phase), (1, Phase::Publishing));
    // The first generation's job for image 0 finishes late: nothing is counted.
    let ok = Outcome::published(10, false, Default::default());
    assert!(
        finish::finish_image(&store, &id, 0, 0, &ok)
            .await?
            .is_none()
    );
    let s = store.summary(&id).await?.unwrap();
    assert_eq!((s.counts.published, s.counts.failed), (0, 0));
    // The retry's job counts.
    let f = finish::finish_image(&store, &id, 0, 1, &ok).await?.unwrap();
    assert!(f.counted);
    assert_eq!(f.summary.counts.published, 1);
    Ok(())
}

/// The operator reconciles a `Bundle` when its summary changes: the watch names each
/// changed bundle (on nats-server 2.9 too).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn summary_changes_are_watched() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let (_nats, store) = store().await?;
    let changes = store.changes().await?;
    futures::pin_mut!(changes);
    let id = bundle(&store, "watched", 1).await?;
    let seen = tokio::time::timeout(std::time::Duration::from_secs(10), changes.next())
        .await?
        .expect("a change");
    assert_eq!(seen, id);
    store
        .update(&id, |s| s.fail("x".into()).map(|_| ()))
        .await?
        .expect("updated");
    let again = tokio::time::timeout(std::time::Duration::from_secs(10), changes.next())
        .await?
        .expect("another change");
    assert_eq!(again, id);
    Ok(())
}
