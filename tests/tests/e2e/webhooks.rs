//! Webhook delivery: at-least-once through outages, one target never holding up another.

use std::{collections::BTreeSet, time::Duration};

use shipperd_tests::{
    app::{Options, spawn_app},
    eventually,
    fixtures::{Compression, sample},
    servers::free_port,
    webhook::WebhookSink,
};

const DONE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_that_was_down_gets_every_event_when_it_comes_back() -> anyhow::Result<()> {
    let down_port = free_port();
    let down_url = format!("http://127.0.0.1:{down_port}/hook");
    let healthy = WebhookSink::start().await?;
    let flaky = WebhookSink::start().await?;
    flaky.refuse_next(4); // 503 for the first four attempts
    let app = spawn_app(Options {
        webhooks: vec![down_url, healthy.url(), flaky.url()],
        secret: Some("raw-secret".into()),
        ..Default::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("w.squashfs");
    let layout = sample("webhooks", "w", 0);
    layout.write_squashfs(&path, Compression::Gzip)?;
    let (_, body) = app.put("w.squashfs", std::fs::read(&path)?, None).await?;
    let rec = app.wait_done(body["id"].as_str().unwrap(), DONE).await?;
    assert_eq!(rec["phase"], "Published");

    // The healthy target is not held up by the dead one.
    let expected = 3 + layout.images.len(); // received, unpacked, published, N images
    let ids = |s: &WebhookSink| {
        s.deliveries()
            .into_iter()
            .map(|d| d.id)
            .collect::<BTreeSet<_>>()
    };
    eventually("healthy target to hear everything", DONE, || async {
        (ids(&healthy).len() == expected).then_some(())
    })
    .await?;
    eventually("flaky target to hear everything", DONE, || async {
        (ids(&flaky).len() == expected).then_some(())
    })
    .await?;

    // The dead target comes back: every event arrives, none lost, same ids.
    let back = WebhookSink::start_on(down_port).await?;
    eventually("returning target to hear everything", DONE, || async {
        (ids(&back).len() == expected).then_some(())
    })
    .await?;
    assert_eq!(ids(&back), ids(&healthy));
    assert_eq!(ids(&flaky), ids(&healthy));
    for d in back.deliveries() {
        assert!(d.signed_with(b"raw-secret"), "{}", d.id);
    }
    app.stop().await
}
