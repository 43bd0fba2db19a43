//! `shipperd verify BUNDLE --policy FILE`: the site's signature check, offline, before an
//! upload or on the connected side. It reads the bundle as unpack does and checks each
//! image against the policies with the signatures the bundle carries, with the same
//! messages; it exits non-zero when an image is rejected.

use std::path::PathBuf;

use anyhow::Context as _;

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The bundle file (or its parts, in order: `mirror_000001.tar mirror_000002.tar`).
    #[arg(required = true, value_name = "BUNDLE")]
    pub bundle: Vec<PathBuf>,
    /// A `containers-policy.json` every image must satisfy; repeat for several (the
    /// site-wide policy and a target's), each of which must accept.
    #[arg(long, required = true, value_name = "FILE")]
    pub policy: Vec<PathBuf>,
    /// Print the report as JSON (one document: the images' answers and the counts).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let policies = shipperd_trust::Policies::load(&args.policy)
        .map_err(anyhow::Error::msg)?
        .context("no policy given")?;
    let scratch = tempfile::tempdir().context("a scratch directory")?;
    let parts = args.bundle.clone();
    let report = tokio::task::spawn_blocking(move || {
        shipperd_trust::verify_bundle(
            &parts,
            &policies,
            &shipperd_bundle::Limits::default(),
            scratch.path(),
        )
    })
    .await?
    .with_context(|| format!("reading {}", args.bundle[0].display()))?;
    if args.json {
        let images: Vec<serde_json::Value> = report
            .images
            .iter()
            .map(|c| match &c.answer {
                Ok(trust) => serde_json::json!({
                    "source": c.source.to_string(), "digest": c.digest.to_string(),
                    "accepted": true, "trust": trust,
                }),
                Err(why) => serde_json::json!({
                    "source": c.source.to_string(), "digest": c.digest.to_string(),
                    "accepted": false, "reason": why,
                }),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "images": images,
                "verification": report.verification,
                "rejection": report.rejection,
            }))?
        );
    } else {
        for c in &report.images {
            match &c.answer {
                Ok(trust) => {
                    let by: Vec<String> = trust
                        .by
                        .iter()
                        .map(|b| match &b.key {
                            Some(k) => format!("{} (key {k})", b.requirement),
                            None => b.requirement.clone(),
                        })
                        .collect();
                    println!("accepted  {}  {}", c.source, by.join(", "));
                }
                Err(why) => println!("REJECTED  {}  {why}", c.source),
            }
        }
        let v = &report.verification;
        println!(
            "{} images: {} accepted by a signature, {} without one, {} rejected",
            report.images.len(),
            v.signed,
            v.unsigned,
            report.images.iter().filter(|c| c.answer.is_err()).count()
        );
    }
    match report.rejection {
        Some(why) => anyhow::bail!(why),
        None => Ok(()),
    }
}
