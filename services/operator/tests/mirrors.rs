//! The cluster resources generated for a published bundle, against the expected YAML.

use shipperd_model::{Digest, Reference};
use shipperd_operator::mirrors::{Landed, cluster_resources};

fn landed(source: &str, target: &str, catalog: bool) -> Landed {
    Landed {
        source: Reference::parse(source).unwrap(),
        target: Reference::parse(target).unwrap(),
        digest: Digest::of(source.as_bytes()),
        catalog,
    }
}

/// A bundle with nested repositories (two side by side in one namespace, one three
/// levels deep), a release image alone in its namespace, an operator catalog, and an
/// image named by tag only.
fn bundle() -> Vec<Landed> {
    vec![
        landed(
            "registry.redhat.io/openshift4/ose-cli:v4.18",
            "reg.example:5000/mirror/openshift4/ose-cli:v4.18",
            false,
        ),
        landed(
            "registry.redhat.io/openshift4/ose-tools-rhel9:v4.18",
            "reg.example:5000/mirror/openshift4/ose-tools-rhel9:v4.18",
            false,
        ),
        landed(
            "quay.io/openshift-release-dev/ocp-release:4.18.1-x86_64",
            "reg.example:5000/mirror/openshift-release-dev/ocp-release:4.18.1-x86_64",
            false,
        ),
        landed(
            "quay.io/team/tools/deep/builder:2",
            "reg.example:5000/mirror/team/tools/deep/builder:2",
            false,
        ),
        landed(
            "registry.redhat.io/redhat/redhat-operator-index:v4.18",
            "reg.example:5000/mirror/redhat/redhat-operator-index:v4.18",
            true,
        ),
        landed("apps:v3", "reg.example:5000/mirror/apps:v3", false),
    ]
}

const EXPECTED: &str = include_str!("mirrors.expected.yaml");

#[test]
fn a_published_bundle_gets_mirror_sets_and_catalog_sources() {
    let id = "5c5f68bac5b0b183ebc8be292aacb82e9ec1d9fa50000770d50ad72c3707ba69";
    let out = cluster_resources("mirror_seq2_000000.tar", id, &bundle(), true);
    let got = out.to_yaml();
    if std::env::var_os("SHIPPERD_BLESS").is_some() {
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mirrors.expected.yaml"),
            &got,
        )
        .unwrap();
    }
    assert_eq!(got, EXPECTED, "{got}");
    assert_eq!(
        out.left_out,
        ["apps:v3: named without a registry host, so there is no source to mirror"]
    );
}

#[test]
fn a_tag_mirror_set_only_when_asked() {
    let id = "5c5f68bac5b0b183ebc8be292aacb82e9ec1d9fa50000770d50ad72c3707ba69";
    let out = cluster_resources("b", id, &bundle(), false);
    assert!(out.digest_mirror_set.is_some());
    assert!(out.tag_mirror_set.is_none());
    // Another bundle gets objects of its own: mirror sets are never edited in place.
    let other = cluster_resources("b", &"d".repeat(64), &bundle(), false);
    assert_ne!(
        other.digest_mirror_set.unwrap().metadata.name,
        out.digest_mirror_set.unwrap().metadata.name
    );
}
