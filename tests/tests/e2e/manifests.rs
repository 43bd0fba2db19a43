//! The install: every kustomization renders and validates offline
//! (`scripts/check-manifests.py`), the rendered objects keep the rules an admin relies
//! on (no cluster-wide Secret access, restricted security contexts, NATS behind a
//! NetworkPolicy), and the NATS configuration the base ships works with credentials made
//! by `shipperd nats-credentials`: TLS and a password, anonymous refused.

use std::{path::Path, process::Command};

use serde::Deserialize as _;
use serde_yaml::Value;
use shipperd_bus::{Bus, NatsConfig};
use shipperd_tests::servers::{Nats, free_port, nats_server_builds};

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn render(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .args(["kustomize", &root().join(dir).display().to_string()])
        .output()
        .expect("kubectl runs (scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "{dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn every_overlay_renders_and_validates_offline() {
    let out = Command::new("python3")
        .arg(root().join("scripts/check-manifests.py"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("0 failed"), "{text}");
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

#[test]
fn rendered_objects_keep_the_rules() {
    for dir in [
        "deploy/kustomize/base",
        "deploy/kustomize/overlays/openshift",
        "deploy/kustomize/overlays/scale-out",
    ] {
        let docs = render(dir);
        // No ClusterRole grants Secrets: those are read only in the namespace served.
        for cr in docs.iter().filter(|d| kind(d) == "ClusterRole") {
            for rule in cr["rules"].as_sequence().unwrap() {
                let res = rule["resources"].as_sequence().unwrap();
                assert!(
                    !res.iter().any(|r| r == "secrets" || r == "*"),
                    "{dir}: ClusterRole {:?} grants {res:?}",
                    cr["metadata"]["name"]
                );
            }
        }
        // Every container: non-root pod, no escalation, no capabilities, read-only root.
        let mut containers = 0;
        for w in docs
            .iter()
            .filter(|d| matches!(kind(d), "Deployment" | "StatefulSet" | "Job"))
        {
            let pod = &w["spec"]["template"]["spec"];
            let name = &w["metadata"]["name"];
            assert_eq!(
                pod["securityContext"]["runAsNonRoot"],
                Value::Bool(true),
                "{dir}: {name:?}"
            );
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
                "{dir}: {name:?}"
            );
            for c in pod["containers"].as_sequence().unwrap() {
                let sc = &c["securityContext"];
                assert_eq!(
                    sc["allowPrivilegeEscalation"],
                    Value::Bool(false),
                    "{dir}: {name:?}"
                );
                assert_eq!(
                    sc["readOnlyRootFilesystem"],
                    Value::Bool(true),
                    "{dir}: {name:?}"
                );
                assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{dir}: {name:?}");
                assert!(
                    !c["resources"]["requests"].is_null(),
                    "{dir}: {name:?} has no requests"
                );
                containers += 1;
            }
            if dir.ends_with("openshift") {
                // restricted-v2 assigns UIDs: none is fixed.
                assert!(
                    pod["securityContext"]["runAsUser"].is_null(),
                    "{dir}: {name:?}"
                );
            }
        }
        assert!(containers >= 6, "{dir}: {containers} containers");
        // NATS admits clients only from ShipperD's pods.
        let np = docs
            .iter()
            .find(|d| kind(d) == "NetworkPolicy" && d["metadata"]["name"] == "nats")
            .expect("a NetworkPolicy for NATS");
        assert_eq!(
            np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["shipperd.io/nats-client"],
            "true"
        );
        // Egress is denied but where a policy says: DNS, NATS, the API server, and the
        // destinations the admin lists (never link-local: the cloud's metadata service).
        let policy = |name: &str| {
            docs.iter()
                .find(|d| kind(d) == "NetworkPolicy" && d["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("{dir}: no NetworkPolicy {name}"))
        };
        let deny = policy("default-deny-egress");
        assert!(
            deny["spec"]["podSelector"]
                .as_mapping()
                .is_some_and(|m| m.is_empty())
        );
        assert_eq!(deny["spec"]["policyTypes"][0], "Egress");
        assert!(
            deny["spec"]["egress"].is_null(),
            "{dir}: the deny lets something out"
        );
        assert_eq!(
            policy("egress-nats")["spec"]["podSelector"]["matchLabels"]["shipperd.io/nats-client"],
            "true"
        );
        let out = &policy("egress-destinations")["spec"]["egress"][0];
        assert_eq!(out["to"][0]["ipBlock"]["except"][0], "169.254.0.0/16");
        // Every pod that talks to NATS carries the label the policy admits.
        for w in docs.iter().filter(|d| kind(d) == "Deployment") {
            assert_eq!(
                w["spec"]["template"]["metadata"]["labels"]["shipperd.io/nats-client"], "true",
                "{dir}: {:?}",
                w["metadata"]["name"]
            );
        }
    }
    // OpenShift: the push role is bound per project, never cluster-wide (that would
    // reach the openshift project every build and node pulls from); the shared default
    // target lands each namespace's images in its own project and lets no tenant apply
    // cluster resources (no namespaces listed: the operator's own only).
    let os = render("deploy/kustomize/overlays/openshift");
    for b in os.iter().filter(|d| kind(d) == "ClusterRoleBinding") {
        assert_ne!(
            b["roleRef"]["name"], "system:image-builder",
            "a cluster-wide push role: {:?}",
            b["metadata"]["name"]
        );
    }
    assert!(
        os.iter().any(|d| kind(d) == "RoleBinding"
            && d["roleRef"]["name"] == "system:image-builder"
            && d["metadata"]["namespace"] == "shipperd"),
        "the push role in ShipperD's own project"
    );
    let internal = os
        .iter()
        .find(|d| {
            kind(d) == "ClusterRegistryTarget" && d["metadata"]["name"] == "openshift-internal"
        })
        .expect("openshift-internal");
    let cr = &internal["spec"]["clusterResources"];
    assert!(
        cr["namespaces"].is_null() && cr["namespaceSelector"].is_null(),
        "openshift-internal lets tenants apply cluster resources: {cr:?}"
    );
    assert_eq!(cr["tagMirrorSets"], Value::Bool(false));
    assert_eq!(internal["spec"]["mapping"]["prefix"], "{namespace}");
    let scaled = render("deploy/kustomize/overlays/scale-out");
    let nats = scaled.iter().find(|d| kind(d) == "StatefulSet").unwrap();
    assert_eq!(nats["spec"]["replicas"], 3);
    let config = scaled
        .iter()
        .find(|d| kind(d) == "ConfigMap" && d["data"]["SHIPPERD_NATS_REPLICAS"].is_string())
        .unwrap();
    assert_eq!(config["data"]["SHIPPERD_NATS_REPLICAS"], "3");
}

/// The base's nats.conf, with its paths moved into a temp dir, its ports made free.
fn base_nats_conf(http: u16) -> String {
    std::fs::read_to_string(root().join("deploy/kustomize/base/nats.conf"))
        .unwrap()
        .replace("/etc/nats/tls/", "{dir}/")
        .replace("store_dir: /data", "store_dir: {dir}/js")
        .replace("/var/run/nats/", "{dir}/")
        .replace("port: 4222", "port: {port}")
        .replace(
            "http_port: 8222",
            &format!("http_port: {http}\nhost: 127.0.0.1"),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nats_config_takes_generated_credentials() -> anyhow::Result<()> {
    shipperd_tests::init();
    let creds = tempfile::tempdir()?;
    let dir = creds.path().join("nats");
    assert!(shipperd::natscreds::write_files(
        &dir,
        &shipperd::natscreds::hosts("nats", "shipperd")
    )?);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let password = read("password");
    let nats = Nats::start_config_env(
        &nats_server_builds()?[1],
        &base_nats_conf(free_port()),
        &[
            ("tls.crt", &read("tls.crt")),
            ("tls.key", &read("tls.key")),
            ("ca.crt", &read("ca.crt")),
        ],
        &[
            ("POD_NAME", "nats-0"),
            ("SHIPPERD_NATS_PASSWORD", &password),
        ],
    )
    .await?;
    let port = nats.0.port;
    // As the base's shipperd-config says: tls://nats, user shipperd, the password and CA
    // files (here at localhost, a name the certificate holds).
    let shipperd = NatsConfig {
        user: Some("shipperd".into()),
        password_file: Some(dir.join("password")),
        tls_ca_file: Some(dir.join("ca.crt")),
        ..NatsConfig::new(format!("tls://localhost:{port}"))
    };
    Bus::connect_with(&shipperd, "manifest-test")
        .await?
        .ensure_topology()
        .await?;
    let anonymous = NatsConfig {
        tls_ca_file: Some(dir.join("ca.crt")),
        ..NatsConfig::new(format!("tls://localhost:{port}"))
    };
    assert!(Bus::connect_with(&anonymous, "anonymous").await.is_err());
    Ok(())
}

/// `shipperd nats-credentials --secret`: against a fake API server, the Secret is created
/// once with every key; a second run finds it and changes nothing (never rotating what
/// running servers use).
#[tokio::test]
async fn the_credentials_secret_is_made_once() -> anyhow::Result<()> {
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use std::sync::{Arc, Mutex};

    let stored: Arc<Mutex<Option<Value>>> = Arc::default();
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let held = stored.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (method, path) = (req.method().to_string(), req.uri().path().to_string());
            assert!(
                path.starts_with("/api/v1/namespaces/shipperd/secrets"),
                "{method} {path}"
            );
            let body = req.into_body().collect_bytes().await.unwrap_or_default();
            let mut s = held.lock().unwrap();
            let (status, answer) = match (method.as_str(), s.as_ref()) {
                ("GET", Some(v)) => (200, v.clone()),
                ("GET", None) => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
                ("POST", None) => {
                    let v: Value = serde_json::from_slice(&body).unwrap();
                    *s = Some(v.clone());
                    (201, v)
                }
                _ => (405, json!({})),
            };
            drop(s);
            send.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    let client = kube::Client::new(service, "shipperd");
    let hosts = shipperd::natscreds::hosts("nats", "shipperd");
    assert!(
        shipperd::natscreds::ensure_secret(client.clone(), "shipperd", "shipperd-nats", &hosts)
            .await?
    );
    let first = stored.lock().unwrap().clone().expect("created");
    for key in ["password", "ca.crt", "tls.crt", "tls.key"] {
        assert!(first["data"][key].is_string(), "{key} missing: {first}");
    }
    assert_eq!(first["metadata"]["name"], "shipperd-nats");
    assert!(
        !shipperd::natscreds::ensure_secret(client, "shipperd", "shipperd-nats", &hosts).await?
    );
    assert_eq!(
        stored.lock().unwrap().clone().unwrap(),
        first,
        "left as it was"
    );
    Ok(())
}
