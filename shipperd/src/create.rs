//! `shipperd create OUTPUT`: a bundle made on the connected side (see
//! [`shipperd_create`]), with a progress bar on a terminal and plain lines otherwise;
//! `--plan` says what it would carry without fetching a blob.

use std::{path::PathBuf, sync::atomic::Ordering, time::Duration};

use anyhow::Context as _;
use clap::Args;
use shipperd_create::{Format, Options, Progress, SourceOptions, Wanted};

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The bundle file to write (`.squashfs`, `.tar` or `.tar.zst`: the name says the
    /// format unless --format does; squashfs when neither does).
    pub output: PathBuf,
    /// The images: one reference a line (by tag or digest), or `oci:DIR[:REF] [NAME]`;
    /// `#` starts a comment.
    #[arg(long, required_unless_present = "config")]
    pub images: Option<PathBuf>,
    /// An oc-mirror v2 `ImageSetConfiguration`: its additionalImages, and its operator
    /// catalogs with the bundles and related images their packages select.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// squashfs, tar or tar.zst.
    #[arg(long)]
    pub format: Option<String>,
    /// Where fetched manifests and blobs are kept, so that a run stopped anywhere and
    /// run again fetches only what it lacks (default: `$XDG_CACHE_HOME/shipperd`, else
    /// `~/.cache/shipperd`).
    #[arg(long, env = "SHIPPERD_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Registry credentials, a `containers-auth.json` (podman/skopeo login) or docker
    /// `config.json`.
    #[arg(long, env = "REGISTRY_AUTH_FILE")]
    pub authfile: Option<PathBuf>,
    /// A token service on another host than its registry's that may be sent the
    /// registry's credentials (repeat); Docker Hub's is known.
    #[arg(long = "token-host")]
    pub token_hosts: Vec<String>,
    /// Images resolved, and blobs fetched, at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// The site's inventory (`shipperd inventory -o FILE` there): carry only the
    /// manifests and blobs it lacks; the bundle is then for that registry alone.
    #[arg(long)]
    pub have: Option<PathBuf>,
    /// A `registries.d` directory (as skopeo's `--registries.d`): the lookasides whose
    /// simple-signing signatures of each image are carried in the bundle
    /// (`sigstore/<repo>@sha256=<hex>/signature-N`).
    #[arg(long = "registries.d")]
    pub registries_d: Option<PathBuf>,
    /// Require the site's signature policy (a `containers-policy.json`; repeat for
    /// several): once written, the bundle is checked as the site will check it (`shipperd
    /// verify`), and removed, with the reasons, when an image it carries is rejected.
    /// Images a `--have` bundle leaves out are the site's to check.
    #[arg(long, value_name = "FILE")]
    pub policy: Vec<PathBuf>,
    /// Leave out what is attached to the images (cosign `.sig`/`.att`/`.sbom` tags, OCI
    /// referrers); saves a tag listing per repository and a request per image.
    #[arg(long)]
    pub without_attached: bool,
    /// Of a multi-platform index, carry only these platforms' manifests
    /// (`os/arch[/variant]`, repeat). The index itself is carried as it is (its digest,
    /// which mirror sets and signatures name, unchanged), naming manifests the bundle
    /// leaves out: the site's registry must accept that or hold them already. See
    /// --rewrite-index.
    #[arg(long = "platform")]
    pub platforms: Vec<String>,
    /// With --platform: write each index anew with only the platforms carried (a new
    /// digest; images named by digest are refused).
    #[arg(long, requires = "platforms")]
    pub rewrite_index: bool,
    /// Split a tar bundle into parts of at most this many bytes (`k`, `M`, `G` suffixes
    /// of 1024), `NAME_000001.tar`, ... as oc-mirror names them; `shipperd push` takes
    /// them together as one bundle.
    #[arg(long, value_parser = parse_size)]
    pub max_part_size: Option<u64>,
    /// Say what the bundle would carry (images, sizes, what is to fetch) and write
    /// nothing.
    #[arg(long)]
    pub plan: bool,
    /// Print the plan, or the result, as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `4G`, `512M`, `64k` or bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (n, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], s[i..].trim()),
        None => (s, ""),
    };
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let shift = match unit
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("{s:?}: a size is a number and k, M, G or T")),
    };
    n.checked_mul(1 << shift)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a size above 0"))
}

fn default_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("shipperd")
}

impl CreateArgs {
    fn options(&self) -> anyhow::Result<Options> {
        let mut images = match &self.images {
            Some(f) => {
                let images = Wanted::read_file(f)?;
                anyhow::ensure!(!images.is_empty(), "{} names no image", f.display());
                images
            }
            None => Vec::new(),
        };
        let set = match &self.config {
            Some(f) => shipperd_create::isc::ImageSet::read_file(f)?,
            None => Default::default(),
        };
        for w in set.images {
            if !images.contains(&w) {
                images.push(w);
            }
        }
        anyhow::ensure!(
            !images.is_empty() || !set.catalogs.is_empty(),
            "nothing to carry: the configuration names no image and no catalog"
        );
        let have = match &self.have {
            None => None,
            Some(p) => {
                let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                let inv = shipperd_model::Inventory::from_json(&bytes)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                anyhow::ensure!(
                    !inv.registry.is_empty(),
                    "{}: the site has published nothing there yet: make a full bundle (without --have)",
                    p.display()
                );
                Some(inv)
            }
        };
        let lookasides = self
            .registries_d
            .as_deref()
            .map(shipperd_create::lookaside::Lookasides::read_dir)
            .transpose()?
            .map(std::sync::Arc::new);
        let platforms = shipperd_create::collect::Platforms {
            wanted: self
                .platforms
                .iter()
                .map(|p| shipperd_create::collect::Platform::parse(p))
                .collect::<Result<_, _>>()?,
            rewrite: self.rewrite_index,
        };
        Ok(Options {
            platforms,
            max_part_size: self.max_part_size,
            lookasides,
            attached: !self.without_attached,
            have,
            images,
            catalogs: set.catalogs,
            blocked: set.blocked,
            output: self.output.clone(),
            format: self.format.as_deref().map(Format::parse).transpose()?,
            cache_dir: self.cache_dir.clone().unwrap_or_else(default_cache),
            sources: SourceOptions {
                authfile: self.authfile.clone(),
                token_hosts: self.token_hosts.clone(),
                concurrency: self.concurrency.into(),
            },
            concurrency: self.concurrency.into(),
        })
    }
}

const MIB: f64 = (1u64 << 20) as f64;

pub async fn run(args: CreateArgs) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let opts = args.options()?;
    let progress = Progress::default();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr()) && !args.json;
    if args.plan {
        let planned = shipperd_create::plan(&opts, &progress).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&planned)?);
            return Ok(());
        }
        for i in &planned.images {
            println!(
                "{:<60} {} {:>10.1} MiB  {} manifests, {} blobs{}",
                i.name,
                &i.digest.as_str()[..19],
                i.size as f64 / MIB,
                i.manifests,
                i.blobs,
                if i.held {
                    "  (the site has it)".to_string()
                } else if planned.made_for.is_some() {
                    format!("  ({:.1} MiB carried)", i.carried as f64 / MIB)
                } else {
                    String::new()
                }
            );
        }
        if planned.signatures > 0 {
            println!("{} lookaside signatures carried", planned.signatures);
        }
        if let Some(r) = &planned.made_for {
            println!(
                "for {r}: {} images and {} blobs ({:.1} MiB) the site holds are left out",
                planned.held_images,
                planned.held_blobs,
                planned.held_bytes as f64 / MIB
            );
        }
        println!(
            "{}: {} images, {} files, {:.1} MiB ({:.1} MiB to fetch; the rest is in the cache), {}",
            planned.output.display(),
            planned.images.len(),
            planned.files,
            planned.bytes as f64 / MIB,
            planned.to_fetch as f64 / MIB,
            planned.format
        );
        return Ok(());
    }
    let started = std::time::Instant::now();
    let made = {
        let work = shipperd_create::create(&opts, &progress);
        tokio::pin!(work);
        let every = if tty {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(10)
        };
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                r = &mut work => break r,
                _ = tick.tick() => show(&progress, started, tty),
            }
        }
    };
    if tty {
        eprintln!();
    }
    let made = made.with_context(|| format!("creating {}", opts.output.display()))?;
    if !args.policy.is_empty() {
        require_policy(&args.policy, &made).await?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&made)?);
    } else if !made.parts.is_empty() {
        println!(
            "{} parts, {} to {}: {} images, {:.1} MiB, sha256:{} of the whole ({:.1} MiB fetched, {:.1}s)",
            made.parts.len(),
            made.parts[0].display(),
            made.parts[made.parts.len() - 1].display(),
            made.images,
            made.size as f64 / MIB,
            made.sha256,
            made.fetched as f64 / MIB,
            started.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "{}: {} images, {} files, {:.1} MiB, sha256:{} ({:.1} MiB fetched, {:.1}s)",
            made.output.display(),
            made.images,
            made.files,
            made.size as f64 / MIB,
            made.sha256,
            made.fetched as f64 / MIB,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Checks the bundle just made against `policies` as the site will; removes it when
/// an image it carries is rejected.
async fn require_policy(
    policies: &[PathBuf],
    made: &shipperd_create::Created,
) -> anyhow::Result<()> {
    let p = shipperd_trust::Policies::load(policies)
        .map_err(anyhow::Error::msg)?
        .context("no policy")?;
    let files = if made.parts.is_empty() {
        vec![made.output.clone()]
    } else {
        made.parts.clone()
    };
    let scratch = tempfile::tempdir()?;
    let parts = files.clone();
    let report = tokio::task::spawn_blocking(move || {
        shipperd_trust::verify_bundle(
            &parts,
            &p,
            &shipperd_bundle::Limits::default(),
            scratch.path(),
        )
    })
    .await??;
    let refused: Vec<String> = report
        .images
        .iter()
        .filter(|c| c.carried)
        .filter_map(|c| {
            c.answer
                .as_ref()
                .err()
                .map(|why| format!("{}: {why}", c.source))
        })
        .collect();
    if refused.is_empty() {
        eprintln!(
            "the signature policy accepts every image carried ({} by a signature, {} without one)",
            report.verification.signed, report.verification.unsigned
        );
        return Ok(());
    }
    for f in files.iter().chain(std::iter::once(&made.output)) {
        let _ = std::fs::remove_file(f);
    }
    anyhow::bail!(
        "the signature policy rejects {} of the images carried, so the bundle was removed: {}",
        refused.len(),
        refused.join("; ")
    )
}

/// One line of progress: a bar on a terminal, a plain line otherwise.
fn show(p: &Progress, started: std::time::Instant, tty: bool) {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let (images, images_done) = (get(&p.images), get(&p.images_done));
    let (total, done, fetched) = (get(&p.bytes), get(&p.bytes_done), get(&p.bytes_fetched));
    let secs = started.elapsed().as_secs_f64().max(0.001);
    let rate = fetched as f64 / secs;
    let eta = if rate > 0.0 {
        format!("{}s", (total.saturating_sub(done) as f64 / rate) as u64)
    } else {
        "-".into()
    };
    let pct = (done * 100).checked_div(total).unwrap_or(0);
    if tty {
        let fill = (pct as usize * 30 / 100).min(30);
        eprint!(
            "\r[{}{}] {pct:>3}% images {images_done}/{images} {:.1}/{:.1} MiB {:.1} MiB/s ETA {eta}   ",
            "#".repeat(fill),
            " ".repeat(30 - fill),
            done as f64 / MIB,
            total as f64 / MIB,
            rate / MIB
        );
    } else {
        eprintln!(
            "images {images_done}/{images}, {done} of {total} bytes ({pct}%), {:.1} MiB/s, ETA {eta}",
            rate / MIB
        );
    }
}
