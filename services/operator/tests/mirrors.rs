//! The cluster resources generated for published bundles, against the expected YAML
//! derived from oc-mirror v2's rules (`internal/pkg/clusterresources/`): a release
//! bundle (a payload by tag, its components by digest, the graph data image), an
//! operator bundle (a catalog, images by digest and by tag) and generic images.

use shipperd_model::{Digest, Reference};
use shipperd_operator::cluster::mirrors::{Gathered, Landed, Merged, cluster_resources};

fn landed(source: &str, target: &str, catalog: bool) -> Landed {
    Landed {
        source: Reference::parse(source).unwrap(),
        target: Reference::parse(target).unwrap(),
        digest: Digest::of(source.as_bytes()),
        catalog,
    }
}

fn d(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

fn release() -> Vec<Landed> {
    vec![
        landed(
            "quay.io/openshift-release-dev/ocp-release:4.18.1-x86_64",
            "reg.example:5000/mirror/openshift-release-dev/ocp-release:4.18.1-x86_64",
            false,
        ),
        landed(
            &format!("quay.io/openshift-release-dev/ocp-v4.0-art-dev@{}", d(1)),
            &format!(
                "reg.example:5000/mirror/openshift-release-dev/ocp-v4.0-art-dev@{}",
                d(1)
            ),
            false,
        ),
        landed(
            "localhost:55000/openshift/graph-image:latest",
            "reg.example:5000/mirror/openshift/graph-image:latest",
            false,
        ),
    ]
}

fn operators(catalog_tag: &str) -> Vec<Landed> {
    vec![
        landed(
            &format!("registry.redhat.io/redhat/redhat-operator-index:{catalog_tag}"),
            &format!("reg.example:5000/mirror/redhat/redhat-operator-index:{catalog_tag}"),
            true,
        ),
        landed(
            &format!("registry.redhat.io/rhel9/postgresql-15@{}", d(2)),
            &format!("reg.example:5000/mirror/rhel9/postgresql-15@{}", d(2)),
            false,
        ),
        landed(
            "registry.redhat.io/openshift4/ose-cli:v4.18",
            "reg.example:5000/mirror/openshift4/ose-cli:v4.18",
            false,
        ),
    ]
}

fn generic() -> Vec<Landed> {
    vec![
        // Landed elsewhere than its path: mirrored by repository.
        landed(
            "docker.io/library/busybox:1.36",
            "reg.example:5000/apps/busybox:1.36",
            false,
        ),
        // By tag and digest: in both mirror sets.
        landed(
            &format!("quay.io/team/app:v1@{}", d(3)),
            &format!("reg.example:5000/mirror/team/app:v1@{}", d(3)),
            false,
        ),
        landed("apps:v3", "reg.example:5000/mirror/apps:v3", false),
    ]
}

const EXPECTED: &str = include_str!("mirrors.expected.yaml");

fn gathered(with_tags: bool) -> Gathered {
    let mut g = Gathered::default();
    g.add_bundle(release(), false, with_tags);
    let sig = format!("4.18.1-x86_64-sha256-{}", "cd".repeat(32));
    g.add_signatures([(sig.as_str(), b"a signature".as_slice())]);
    g.add_bundle(operators("v4.18"), true, with_tags);
    g.add_bundle(generic(), false, with_tags);
    g
}

#[test]
fn published_bundles_get_what_oc_mirror_would_write() {
    let g = gathered(true);
    let out = g.resources();
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
    let names: Vec<&str> = out
        .digest_mirror_sets
        .iter()
        .chain(&out.tag_mirror_sets)
        .map(|m| m.metadata.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "idms-release-0",
            "idms-operator-0",
            "idms-generic-0",
            "itms-release-0",
            "itms-operator-0",
            "itms-generic-0"
        ]
    );
    assert_eq!(
        out.catalog_sources[0].metadata.name,
        "cs-redhat-operator-index-v4-18"
    );
    // Kept per bundle as JSON, and read back the same.
    let json = serde_json::to_string(&g).unwrap();
    let mut kept = g.clone();
    kept.left_out.clear();
    assert_eq!(serde_json::from_str::<Gathered>(&json).unwrap(), kept);
}

#[test]
fn tag_mirror_sets_only_when_asked_and_later_bundles_of_a_namespace_win_its_catalog() {
    let out = cluster_resources(&operators("v4.18"), false);
    assert_eq!(out.digest_mirror_sets.len(), 1);
    assert!(out.tag_mirror_sets.is_empty());
    // A Day-2 bundle of the same catalog (same name) moves it; its mirrors add up.
    let mut all = Gathered::default();
    all.add_bundle(operators("v4.18"), true, false);
    let mut day2 = Gathered::default();
    let mut later = operators("v4.18");
    later[0].target =
        Reference::parse("reg.example:5000/day2/redhat/redhat-operator-index:v4.18").unwrap();
    later[1] = landed(
        &format!("registry.redhat.io/rhel9/redis-7@{}", d(4)),
        &format!("reg.example:5000/day2/rhel9/redis-7@{}", d(4)),
        false,
    );
    day2.add_bundle(later, true, false);
    // Both of one namespace: the later one's catalog wins.
    let mut merged = Merged::default();
    merged.add("ns", "ns/b1", all);
    merged.add("ns", "ns/b2", day2);
    assert!(merged.conflicts.is_empty(), "{:?}", merged.conflicts);
    let out = merged.all.resources();
    assert_eq!(out.catalog_sources.len(), 1);
    assert_eq!(
        out.catalog_sources[0].spec.image,
        "reg.example:5000/day2/redhat/redhat-operator-index:v4.18"
    );
    let idms = &out.digest_mirror_sets[0].spec["imageDigestMirrors"];
    let rhel9 = idms
        .iter()
        .find(|m| m.source == "registry.redhat.io/rhel9")
        .unwrap();
    assert_eq!(
        rhel9.mirrors,
        [
            "reg.example:5000/mirror/rhel9",
            "reg.example:5000/day2/rhel9"
        ],
        "a mirror another bundle still needs stays"
    );
}
