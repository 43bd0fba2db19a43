//! The committed CRDs are what the code generates, they are structural (what the API
//! server requires of a CRD), and the committed examples are valid resources.

use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use serde::Deserialize as _;
use shipperd_operator::{
    Bundle, ClusterRegistryTarget, RegistryTarget, WebhookTarget, crds, crds_yaml,
};

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds")
}

#[test]
fn the_committed_crds_are_what_the_code_generates() {
    let committed = std::fs::read_to_string(deploy().join("shipperd.io.yaml")).unwrap();
    assert!(
        committed == crds_yaml(),
        "deploy/crds/shipperd.io.yaml is stale: run \
         `cargo run -q -p shipperd -- crd > deploy/crds/shipperd.io.yaml`"
    );
}

/// Every schema node says its type, objects list their properties (or say they keep
/// unknown fields), and nothing uses what structural schemas forbid at the top.
fn assert_structural(path: &str, s: &JSONSchemaProps) {
    let preserves = s.x_kubernetes_preserve_unknown_fields == Some(true);
    let int_or_string = s.x_kubernetes_int_or_string == Some(true);
    assert!(
        s.type_.is_some() || preserves || int_or_string,
        "{path} has no type"
    );
    if s.type_.as_deref() == Some("object") {
        assert!(
            s.properties.is_some() || s.additional_properties.is_some() || preserves,
            "{path}: an object without properties"
        );
    }
    for (name, p) in s.properties.iter().flatten() {
        assert_structural(&format!("{path}.{name}"), p);
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(items)) =
        &s.items
    {
        assert_structural(&format!("{path}[]"), items);
    }
    for forbidden in [&s.one_of, &s.any_of, &s.all_of] {
        assert!(
            forbidden.is_none() || path.contains('.'),
            "{path}: oneOf/anyOf/allOf at the root"
        );
    }
}

#[test]
fn the_crds_are_structural_with_status_and_columns() {
    let docs: Vec<CustomResourceDefinition> = serde_yaml::Deserializer::from_str(&crds_yaml())
        .map(|d| CustomResourceDefinition::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs, crds(), "the YAML reads back as the same CRDs");
    let names: Vec<&str> = docs
        .iter()
        .map(|c| c.metadata.name.as_deref().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "bundles.shipperd.io",
            "registrytargets.shipperd.io",
            "clusterregistrytargets.shipperd.io",
            "webhooktargets.shipperd.io"
        ]
    );
    for crd in &docs {
        assert_eq!(crd.spec.group, "shipperd.io");
        let scope = if crd.spec.names.kind == "ClusterRegistryTarget" {
            "Cluster"
        } else {
            "Namespaced"
        };
        assert_eq!(crd.spec.scope, scope, "{}", crd.spec.names.kind);
        let [v] = crd.spec.versions.as_slice() else {
            panic!("one version")
        };
        assert_eq!(
            (v.name.as_str(), v.served, v.storage),
            ("v1alpha1", true, true)
        );
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{}: a status subresource",
            crd.spec.names.kind
        );
        let schema = v
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap();
        assert_structural(&crd.spec.names.kind, schema);
    }
    let columns: Vec<&str> = docs[0].spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["Phase", "Images", "Progress", "Target", "Age"]);
    // The API server enforces (CEL, patterns): one source; at most one target; source
    // and target immutable; names and checksums well formed.
    let yaml = serde_yaml::to_string(&docs[0]).unwrap();
    for rule in [
        "set exactly one of upload, url and path",
        "set at most one of target and clusterTarget",
        "self.source == oldSelf.source",
        "source, target and clusterTarget cannot change",
    ] {
        assert!(yaml.contains(rule), "{rule}");
    }
    let spec = &docs[0].spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap()
        .properties
        .as_ref()
        .unwrap()["spec"];
    let prop = |path: &[&str]| {
        let mut s = spec;
        for p in path {
            s = &s.properties.as_ref().unwrap()[*p];
        }
        s.clone()
    };
    for path in [&["target"][..], &["clusterTarget"]] {
        let p = prop(path);
        assert!(
            p.pattern.is_some() && p.max_length == Some(63),
            "{path:?}: {p:?}"
        );
    }
    assert_eq!(
        prop(&["source", "path", "sha256"]).pattern.as_deref(),
        Some("^[0-9a-f]{64}$")
    );
    // A cluster target carries the target's fields and its cluster-resources policy.
    let ct = serde_yaml::to_string(&docs[2]).unwrap();
    assert!(
        ct.contains("openshiftInternal") && ct.contains("tagMirrorSets"),
        "{ct}"
    );
}

#[test]
fn the_examples_are_valid_resources() {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(deploy().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_json::Value::deserialize(doc).unwrap();
            let kind = v["kind"].as_str().unwrap().to_string();
            let ok = match kind.as_str() {
                "Bundle" => serde_json::from_value::<Bundle>(v.clone()).map(|_| ()),
                "RegistryTarget" => serde_json::from_value::<RegistryTarget>(v.clone()).map(|_| ()),
                "ClusterRegistryTarget" => {
                    serde_json::from_value::<ClusterRegistryTarget>(v.clone()).map(|_| ())
                }
                "WebhookTarget" => serde_json::from_value::<WebhookTarget>(v.clone()).map(|_| ()),
                other => panic!("{}: unknown kind {other}", path.display()),
            };
            ok.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(v["apiVersion"], "shipperd.io/v1alpha1");
            seen.push(kind);
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        [
            "Bundle",
            "ClusterRegistryTarget",
            "RegistryTarget",
            "WebhookTarget"
        ]
    );
}

#[test]
fn a_cluster_target_reads_its_target_fields_and_policy() {
    let t: ClusterRegistryTarget = serde_json::from_value(serde_json::json!({
        "apiVersion": "shipperd.io/v1alpha1", "kind": "ClusterRegistryTarget",
        "metadata": { "name": "mirror" },
        "spec": { "url": "http://127.0.0.1:5000", "default": true,
                  "clusterResources": { "apply": true } } }))
    .unwrap();
    assert!(t.spec.target.default);
    assert_eq!(t.spec.target.url.as_deref(), Some("http://127.0.0.1:5000"));
    assert!(t.spec.cluster_resources.unwrap().apply);
}
