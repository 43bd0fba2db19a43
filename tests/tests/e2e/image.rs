//! ShipperD's own container image, built without a container engine: reproducible (the
//! same inputs give the same digest), it runs `shipperd --version` from its own layers
//! as its non-root user (chroot), and ShipperD publishes the image layout as a bundle
//! into docker-registry, where skopeo reads it back at the same digest.

use std::{path::Path, process::Command, time::Duration};

use shipperd_tests::{
    app::{Options, skopeo_raw, spawn_app},
    fixtures::{sha256, tar_bytes},
    image::{ImageSpec, UID, build},
};

/// The shipperd binary as the image would carry it (stripped, as a release build is).
fn binary(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let bin = dir.join("shipperd");
    std::fs::copy(env!("CARGO_BIN_EXE_shipperd-process"), &bin)?;
    // Without strip (binutils) the image is only larger.
    let _ = Command::new("strip").arg(&bin).status();
    Ok(bin)
}

fn files_of(layout: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = vec![
        (
            "oci-layout".to_string(),
            std::fs::read(layout.join("oci-layout"))?,
        ),
        (
            "index.json".to_string(),
            std::fs::read(layout.join("index.json"))?,
        ),
    ];
    for e in std::fs::read_dir(layout.join("blobs/sha256"))? {
        let e = e?;
        out.push((
            format!("blobs/sha256/{}", e.file_name().to_string_lossy()),
            std::fs::read(e.path())?,
        ));
    }
    Ok(out)
}

/// Runs `argv` inside `root` as the image's user: chroot, or (without the right to
/// chroot) a user namespace that grants it.
fn run_in(root: &Path, argv: &[&str]) -> anyhow::Result<std::process::Output> {
    let user = format!("--userspec={UID}:{UID}");
    let direct = Command::new("chroot")
        .arg(&user)
        .arg(root)
        .args(argv)
        .output()?;
    if direct.status.success() {
        return Ok(direct);
    }
    Ok(Command::new("unshare")
        .args(["--map-root-user", "chroot"])
        .arg(root)
        .args(argv)
        .output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_image_is_reproducible_runs_from_its_layers_and_ships_through_shipperd()
-> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let bin = binary(work.path())?;
    let spec = ImageSpec::new(&bin, "shipperd:0.1.0");

    // Reproducible: built twice, one digest; another time stamp, another digest.
    let a = build(&spec, &work.path().join("a"))?;
    let b = build(&spec, &work.path().join("b"))?;
    assert_eq!(a.manifest, b.manifest);
    let later = build(
        &ImageSpec {
            epoch: 1_764_806_400,
            ..spec.clone()
        },
        &work.path().join("c"),
    )?;
    assert_ne!(later.manifest, a.manifest, "the time is part of the image");
    assert_ne!(later.layer, a.layer, "file times are in the layer");

    // Its one layer is a root filesystem shipperd runs from, as the non-root user.
    let layout = work.path().join("a");
    let layer = std::fs::read(
        layout
            .join("blobs/sha256")
            .join(a.layer.trim_start_matches("sha256:")),
    )?;
    let root = work.path().join("root");
    tar::Archive::new(flate2::read::GzDecoder::new(layer.as_slice())).unpack(&root)?;
    let out = run_in(&root, &["/usr/local/bin/shipperd", "--version"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("shipperd "),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        concat!("shipperd ", env!("CARGO_PKG_VERSION"))
    );

    // ShipperD carries its own image in: the layout, as a tar bundle, through the
    // pipeline into docker-registry; skopeo reads the same manifest and config.
    let app = spawn_app(Options::default()).await?;
    let (st, r) = app
        .put("shipperd-image.tar", tar_bytes(&files_of(&layout)?)?, None)
        .await?;
    assert_eq!(st, 202, "{r}");
    let rec = app
        .wait_done(r["id"].as_str().unwrap(), Duration::from_secs(120))
        .await?;
    assert_eq!(rec["phase"], "Published", "{}", rec["error"]);
    let target = format!("{}/shipperd:0.1.0", app.registry.host());
    let raw = skopeo_raw(&target)?;
    assert_eq!(sha256(&raw), a.manifest);
    let config = Command::new("skopeo")
        .args(["inspect", "--config", "--tls-verify=false"])
        .arg(format!("docker://{target}"))
        .output()?;
    assert!(config.status.success());
    let config: serde_json::Value = serde_json::from_slice(&config.stdout)?;
    assert_eq!(config["config"]["User"], format!("{UID}:{UID}"));
    assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/shipperd");
    app.stop().await
}
