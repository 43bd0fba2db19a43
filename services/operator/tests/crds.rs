//! The committed CRDs are what the code generates, they are structural (what the API
//! server requires of a CRD), and the committed examples are valid resources.

use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use serde::Deserialize as _;
use shipperd_operator::{Bundle, RegistryTarget, WebhookTarget, crds, crds_yaml};

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
            "webhooktargets.shipperd.io"
        ]
    );
    for crd in &docs {
        assert_eq!(crd.spec.group, "shipperd.io");
        assert_eq!(crd.spec.scope, "Namespaced");
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
    // The one-of rule of a bundle's source is enforced by the API server (CEL).
    let yaml = serde_yaml::to_string(&docs[0]).unwrap();
    assert!(yaml.contains("set exactly one of upload, url and path"));
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
    assert_eq!(seen, ["Bundle", "RegistryTarget", "WebhookTarget"]);
}
