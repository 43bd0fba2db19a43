//! A `Bundle` for every bundle that came in through the ingest endpoint or the drop
//! directory: made in the upload namespace, named after the upload.

use kube::{Api, ResourceExt as _};
use shipperd_model::BundleSummary;

use crate::{crd::Bundle, error::Error};

/// The name of the `Bundle` made for an uploaded bundle: its file name and short id.
pub fn upload_object_name(s: &BundleSummary) -> String {
    let mut name: String = s
        .name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    name = name.trim_matches('-').chars().take(40).collect();
    let name = name.trim_end_matches('-');
    let short = &s.id.as_str()[..12];
    if name.is_empty() {
        format!("upload-{short}")
    } else {
        format!("{name}-{short}")
    }
}

/// Creates the `Bundle` of a bundle that arrived through ingest (an `upload` source),
/// unless it is there already. Whether it created one.
pub async fn adopt(api: &Api<Bundle>, s: &BundleSummary) -> Result<bool, Error> {
    if s.deleting || s.owner.is_some() {
        // Being deleted, or brought in by a namespace's Bundle, which stands for it.
        return Ok(false);
    }
    let (target, cluster_target) = match &s.target {
        Some(t) if t.namespace().is_some() => (Some(t.name().to_string()), None),
        Some(t) => (None, Some(t.to_string())),
        None => (None, None),
    };
    let mut b = Bundle::new(
        &upload_object_name(s),
        crate::crd::BundleSpec {
            source: crate::crd::BundleSource {
                upload: Some(crate::crd::UploadSource {
                    name: s.name.clone(),
                    bundle_id: s.id.to_string(),
                }),
                url: None,
                path: None,
            },
            target,
            cluster_target,
            apply_cluster_resources: false,
            tag_mirror_set: false,
        },
    );
    b.metadata.labels = Some(
        [(
            "shipperd.io/bundle".to_string(),
            s.id.as_str()[..12].to_string(),
        )]
        .into(),
    );
    match api.create(&kube::api::PostParams::default(), &b).await {
        Ok(_) => {
            tracing::info!(bundle_id = %s.id, name = %b.name_any(), "Bundle created for an upload");
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}
