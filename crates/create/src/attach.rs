//! What is attached to an image at its source registry, carried with it:
//!
//! - cosign's tags beside it, `sha256-<hex>.sig`, `.att` and `.sbom` (of its top
//!   digest), found in one tag listing per repository and carried as named images, so
//!   the site gets the same tags;
//! - its OCI 1.1 referrers (signatures, SBOMs, attestations as artifacts whose
//!   `subject` is the image), from the referrers API or the `sha256-<hex>` fallback tag,
//!   carried unnamed in `index.json`: the site pushes each with its subject.
//!
//! Images from OCI layouts have no registry to ask; their referrers are not looked for.

use std::collections::{BTreeMap, HashSet};

use futures::{StreamExt as _, TryStreamExt as _};
use shipperd_model::Reference;

use crate::{Error, Resolved, Result, collect::Origin, list::Wanted};

/// cosign's tag suffixes.
pub const COSIGN_SUFFIXES: [&str; 3] = ["sig", "att", "sbom"];

/// An attachment to resolve: the reference to read it by, and whether it is named in
/// the bundle (a cosign tag) or not (a referrer).
pub type Attachment = (Wanted, bool);

/// The attachments of `images` (each once, in a stable order).
pub async fn find(
    images: &[Resolved],
    origins: &[Origin],
    concurrency: usize,
) -> Result<Vec<Attachment>> {
    // One tag listing per repository.
    let mut repos: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (i, (img, origin)) in images.iter().zip(origins).enumerate() {
        if let (Origin::Registry { repo, .. }, Some(host)) = (origin, &img.name.host) {
            repos.entry((host.clone(), repo.clone())).or_insert(i);
        }
    }
    let tags: BTreeMap<(String, String), HashSet<String>> = futures::stream::iter(repos)
        .map(|(key, i)| async move {
            let Origin::Registry { reg, repo } = &origins[i] else {
                unreachable!("only registry origins are listed")
            };
            let tags = reg.tags(repo).await.map_err(|e| Error::Source {
                what: format!("the tags of {}/{repo}", key.0),
                cause: format!(
                    "{} (to carry signatures without listing tags: --without-attached)",
                    e.cause()
                ),
            })?;
            Ok::<_, Error>((key, tags.into_iter().collect()))
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    let mut out: Vec<Attachment> = Vec::new();
    let mut seen = HashSet::new();
    for img in images.iter().filter(|i| i.named) {
        let Some(host) = &img.name.host else { continue };
        let Some(held) = tags.get(&(host.clone(), img.name.repository.clone())) else {
            continue;
        };
        for suffix in COSIGN_SUFFIXES {
            let tag = format!("{}.{suffix}", img.top.digest.referrers_tag());
            if held.contains(&tag) {
                let r = Reference {
                    host: Some(host.clone()),
                    repository: img.name.repository.clone(),
                    tag: Some(tag),
                    digest: None,
                };
                if seen.insert(r.to_string()) {
                    out.push((Wanted::Registry(r), true));
                }
            }
        }
    }
    // The referrers of each image's top manifest.
    let found: Vec<Vec<Attachment>> = futures::stream::iter(images.iter().zip(origins))
        .filter(|(img, _)| std::future::ready(img.named))
        .map(|(img, origin)| async move {
            let (Origin::Registry { reg, repo }, Some(host)) = (origin, &img.name.host) else {
                return Ok(Vec::new());
            };
            let refs = reg
                .referrers(repo, &img.top.digest, None)
                .await
                .map_err(|e| Error::source(&format!("{host}/{repo}"), "referrers", e))
                .map_err(|e| e.for_image(&img.name))?;
            Ok::<_, Error>(
                refs.into_iter()
                    .map(|d| {
                        let r = Reference {
                            host: Some(host.clone()),
                            repository: repo.clone(),
                            tag: None,
                            digest: Some(d.digest),
                        };
                        (Wanted::Registry(r), false)
                    })
                    .collect(),
            )
        })
        .buffered(concurrency.max(1))
        .try_collect()
        .await?;
    for (w, named) in found.into_iter().flatten() {
        if let Wanted::Registry(r) = &w
            && seen.insert(r.to_string())
        {
            out.push((w, named));
        }
    }
    Ok(out)
}
