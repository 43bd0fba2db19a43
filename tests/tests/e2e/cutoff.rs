//! An upload cut off mid-way leaves nothing behind. (Its own test binary: it watches the
//! process-wide ingest counters.)

use std::time::Duration;

use shipperd_tests::{
    app::{Options, spawn_app},
    eventually,
};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_cut_off_mid_way_leaves_nothing() -> anyhow::Result<()> {
    let app = spawn_app(Options::default()).await?;
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await?;
    conn.write_all(
        b"PUT /v1/bundles/cut.squashfs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1048576\r\n\r\n",
    )
    .await?;
    conn.write_all(&[7u8; 64 * 1024]).await?;
    conn.flush().await?;
    // The temp file exists while the upload is in flight...
    eventually("upload to start", Duration::from_secs(10), || async {
        (app.temp_files() == 1).then_some(())
    })
    .await?;
    drop(conn);
    // ...and is gone once the connection drops, with no record and no stored bundle.
    eventually("temp file removal", Duration::from_secs(10), || async {
        (app.temp_files() == 0).then_some(())
    })
    .await?;
    let metrics = app
        .http
        .get(format!("{}/metrics", app.base))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("shipperd_ingest_uploads_rejected_total 1"),
        "{metrics}"
    );
    assert_eq!(app.stored_bundles(), 0);
    assert!(app.bundles().await?.is_empty());
    app.stop().await
}
