//! Developer tools for the demo and benchmarks: build a sample bundle, receive webhooks,
//! write a loopback registry config, find a free port.

// Tests wait for servers, clients and clocks in every way; the rule that every wait has
// a name (clippy.toml) is for the product's code.
#![allow(clippy::disallowed_methods)]

use std::{io::Write, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use shipperd_tests::{
    fixtures::{Compression, LayoutBuilder, sample},
    servers::{free_port, registry_config},
    webhook::WebhookSink,
};

#[derive(Parser)]
#[command(name = "shipperd-dev")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Comp {
    Gzip,
    Xz,
    Zstd,
    Lz4,
}

#[derive(Clone, Copy, ValueEnum)]
enum Archive {
    Tar,
    Gzip,
    Zstd,
    Xz,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write the sample bundle (four images, one multi-arch, a shared layer): squashfs by
    /// default, or a tar (plain or compressed) with `--archive`.
    SampleBundle {
        #[arg(long)]
        out: PathBuf,
        /// Squashfs compression.
        #[arg(long, value_enum, default_value = "gzip")]
        compression: Comp,
        /// Write a tar instead of squashfs, compressed this way.
        #[arg(long, value_enum)]
        archive: Option<Archive>,
        /// Lay the images out as a registry storage tree under this prefix (e.g.
        /// `platform/mirror/`, as Koffer does) instead of an OCI layout.
        #[arg(long)]
        tree: Option<String>,
        /// Add a layer of this many MiB of random bytes (memory and speed checks).
        #[arg(long, default_value_t = 0)]
        big_layer_mb: usize,
        /// Makes the bundle's bytes (and id) unique.
        #[arg(long, default_value = "demo")]
        salt: String,
    },
    /// Write the publish benchmark's images (scripts/bench-publish.sh): six images and a
    /// two-platform index sharing a base layer of BASE MiB, each with its own layer of
    /// OWN MiB (half that per platform), random bytes. Writes DIR/layout (an OCI layout),
    /// DIR/bundle.tar, DIR/day2.tar (the same images, other bytes), DIR/images.txt
    /// (one `oci:` reference per line) and DIR/blobs.txt (`digest size` of each blob).
    /// With --own-layers N an image's own bytes are N layers instead of one, each half
    /// the one before (as real images have one large layer and several small ones).
    BenchBundle {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 150)]
        base_mb: usize,
        #[arg(long, default_value_t = 110)]
        own_mb: usize,
        #[arg(long, default_value_t = 1)]
        own_layers: usize,
    },
    /// Write a bundle shaped like an operator-catalog mirror (scripts/bench-scale.sh):
    /// N small images in nested repositories. Writes DIR/bundle.tar (an OCI layout in a
    /// tar), DIR/layout (the same layout as a directory) and DIR/images.txt (one
    /// reference per line).
    CatalogBundle {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        images: usize,
        #[arg(long, default_value = "bench")]
        salt: String,
    },
    /// Push every image of an OCI layout directory into a registry the plain way, as a
    /// 16-connection client would: per blob HEAD, then a mount (when an earlier image
    /// pushed it) or POST + PUT; then PUT the manifest by tag. The ceiling ShipperD is
    /// measured against; prints images/s and requests.
    RawPush {
        #[arg(long)]
        layout: PathBuf,
        /// e.g. http://127.0.0.1:5000
        #[arg(long)]
        registry: String,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Then PUT every manifest again under a second tag, this many at a time (the
        /// registry's cost of tagging last), and print that too.
        #[arg(long)]
        retag: Option<usize>,
    },
    /// Receive webhooks on 127.0.0.1:PORT; print one line per event (signature checked).
    WebhookSink {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        secret: Option<String>,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 3600)]
        seconds: u64,
    },
    /// Print a docker-registry config listening on 127.0.0.1:PORT.
    RegistryConfig {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        root: PathBuf,
    },
    /// Print a free loopback TCP port.
    FreePort,
    /// Build ShipperD's container image as an OCI image layout, without a container
    /// engine, reproducibly (SOURCE_DATE_EPOCH, default 0, for every time).
    BuildImage {
        /// The shipperd binary.
        #[arg(long)]
        binary: PathBuf,
        /// The OCI layout directory to write (emptied first).
        #[arg(long)]
        out: PathBuf,
        /// name:tag recorded in the layout.
        #[arg(long, default_value = concat!("shipperd:", env!("CARGO_PKG_VERSION")))]
        reference: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::SampleBundle {
            out,
            compression,
            archive,
            tree,
            big_layer_mb,
            salt,
        } => {
            let repo = shipperd_bundle::reference::repository_from_bundle_name(
                &out.file_name().unwrap_or_default().to_string_lossy(),
            );
            let layout = sample(&salt, &repo, big_layer_mb);
            let c = match compression {
                Comp::Gzip => Compression::Gzip,
                Comp::Xz => Compression::Xz,
                Comp::Zstd => Compression::Zstd,
                Comp::Lz4 => Compression::Lz4,
            };
            let files = match &tree {
                Some(prefix) => layout.tree_files(prefix),
                None => layout.oci_files(""),
            };
            match archive {
                None => shipperd_tests::fixtures::write_squashfs_files(&files, &out, c)?,
                Some(a) => {
                    use shipperd_tests::fixtures::{TarCompression as T, compress, tar_bytes};
                    let how = match a {
                        Archive::Tar => T::None,
                        Archive::Gzip => T::Gzip,
                        Archive::Zstd => T::Zstd,
                        Archive::Xz => T::Xz,
                    };
                    std::fs::write(&out, compress(tar_bytes(&files)?, how)?)?;
                }
            }
            for img in &layout.images {
                println!("{}:{} {}", img.repo, img.tag, img.digest);
            }
        }
        Cmd::BenchBundle {
            dir,
            base_mb,
            own_mb,
            own_layers,
        } => bench_bundle(&dir, base_mb, own_mb, own_layers)?,
        Cmd::CatalogBundle { dir, images, salt } => {
            let b = shipperd_tests::fixtures::catalog(images, &salt);
            std::fs::create_dir_all(&dir)?;
            let layout = dir.join("layout");
            let _ = std::fs::remove_dir_all(&layout);
            b.write_dir(&layout)?;
            let files = b.oci_files("");
            std::fs::write(
                dir.join("bundle.tar"),
                shipperd_tests::fixtures::tar_bytes(&files)?,
            )?;
            let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("images.txt"))?);
            for img in &b.images {
                writeln!(f, "registry.example.com/{}:{}", img.repo, img.tag)?;
            }
            f.flush()?;
            println!("{} images, {} blobs", b.images.len(), b.blobs.len());
        }
        Cmd::RawPush {
            layout,
            registry,
            connections,
            retag,
        } => shipperd_tests::rawpush::run(&layout, &registry, connections, retag).await?,
        Cmd::WebhookSink {
            port,
            secret,
            seconds,
        } => {
            let sink = WebhookSink::start_on(port).await?;
            let key = secret.as_deref().map(shipperd_notify::sign::key);
            let mut seen = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
            while tokio::time::Instant::now() < deadline {
                let new = sink.deliveries_since(seen);
                for d in &new {
                    let signed = match &key {
                        Some(k) if d.signed_with(k) => "signature ok",
                        Some(_) => "SIGNATURE BAD",
                        None => "unsigned",
                    };
                    println!(
                        "{} {} ({signed}) {}",
                        d.event["time"].as_str().unwrap_or(""),
                        d.event_type(),
                        d.event["data"]
                    );
                    std::io::stdout().flush()?;
                }
                seen += new.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Cmd::RegistryConfig { port, root } => print!("{}", registry_config(&root, port)),
        Cmd::FreePort => println!("{}", free_port()),
        Cmd::BuildImage {
            binary,
            out,
            reference,
        } => {
            let built = shipperd_tests::image::build(
                &shipperd_tests::image::ImageSpec::new(binary, &reference),
                &out,
            )?;
            println!("{reference} {}", built.manifest);
        }
    }
    Ok(())
}

fn random_layer(
    b: &mut LayoutBuilder,
    name: &str,
    bytes: usize,
) -> shipperd_tests::fixtures::Layer {
    let mut data = vec![0u8; bytes];
    rand::Rng::fill(&mut rand::rng(), data.as_mut_slice());
    // Stored (level 0) gzip: valid gzip, no time spent compressing random bytes.
    b.layer(&[(name, data)], flate2::Compression::none())
}

/// The base layer, then `n` random layers of `bytes` in all, each half the one before
/// (the last takes what is left).
fn own_layers(
    b: &mut LayoutBuilder,
    base: &shipperd_tests::fixtures::Layer,
    bytes: usize,
    n: usize,
) -> Vec<shipperd_tests::fixtures::Layer> {
    let mut layers = vec![base.clone()];
    let mut left = bytes;
    for k in 0..n {
        let size = if k + 1 == n { left } else { left / 2 };
        left -= size;
        layers.push(random_layer(b, &format!("own{k}.bin"), size));
    }
    layers
}

fn bench_bundle(
    dir: &std::path::Path,
    base_mb: usize,
    own_mb: usize,
    n: usize,
) -> anyhow::Result<()> {
    use shipperd_tests::fixtures::tar_bytes;
    anyhow::ensure!(n >= 1, "--own-layers must be at least 1");
    let mut b = LayoutBuilder::new();
    let base = random_layer(&mut b, "base.bin", base_mb << 20);
    let mut refs = Vec::new();
    for i in 0..6 {
        let layers = own_layers(&mut b, &base, own_mb << 20, n);
        let name = format!("bench.example.com/bench/app{i}:1.0");
        b.image(
            serde_json::json!({ "org.opencontainers.image.ref.name": name }),
            &layers,
            &format!("bench/app{i}"),
            "1.0",
        );
        refs.push(name);
    }
    let amd = own_layers(&mut b, &base, own_mb << 19, n);
    let arm = own_layers(&mut b, &base, own_mb << 19, n);
    let name = "bench.example.com/bench/multi:1.0".to_string();
    b.multi_arch(
        serde_json::json!({ "org.opencontainers.image.ref.name": name }),
        &[("amd64", amd), ("arm64", arm)],
        "bench/multi",
        "1.0",
    );
    refs.push(name);
    std::fs::create_dir_all(dir)?;
    let layout = dir.join("layout");
    let _ = std::fs::remove_dir_all(&layout);
    b.write_dir(&layout)?;
    let mut files = b.oci_files("");
    std::fs::write(dir.join("bundle.tar"), tar_bytes(&files)?)?;
    files.push((
        "day2.txt".into(),
        b"the same images, in another bundle\n".to_vec(),
    ));
    std::fs::write(dir.join("day2.tar"), tar_bytes(&files)?)?;
    let mut f = std::fs::File::create(dir.join("images.txt"))?;
    for r in &refs {
        writeln!(f, "{r}")?;
    }
    let mut f = std::fs::File::create(dir.join("blobs.txt"))?;
    let mut total = 0;
    for (digest, bytes) in &b.blobs {
        writeln!(f, "{digest} {}", bytes.len())?;
        total += bytes.len();
    }
    println!(
        "{} images, {} blobs, {} MiB",
        refs.len(),
        b.blobs.len(),
        total >> 20
    );
    Ok(())
}
