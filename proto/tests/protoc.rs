//! `proto/` is valid for every protobuf compiler, not only the one that builds it:
//! the reference `protoc` (PyPI grpcio-tools, installed by `scripts/install-deps.sh`
//! into `.deps/pypi`) compiles it, the lint rules below hold (those of `buf lint`'s
//! DEFAULT set that matter to a client in another language), and a Python client made
//! by protoc decodes what ShipperD encodes.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use prost::Message as _;
use prost_types::{DescriptorProto, FileDescriptorProto};

const FILES: [&str; 2] = ["shipperd/v1/events.proto", "shipperd/v1/bundles.proto"];

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn pypi() -> PathBuf {
    let p = proto_dir().join("../.deps/pypi");
    assert!(
        p.join("grpc_tools").is_dir(),
        "grpcio-tools is not in {}: run scripts/install-deps.sh",
        p.display()
    );
    p
}

fn protoc(out: &Path) -> std::process::Output {
    Command::new("python3")
        .env("PYTHONPATH", pypi())
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(proto_dir())
        .arg(format!("--python_out={}", out.display()))
        .arg(format!(
            "--descriptor_set_out={}",
            out.join("fds.bin").display()
        ))
        .args(FILES)
        .output()
        .expect("python3 runs")
}

#[test]
fn the_reference_protoc_compiles_proto() {
    let out = tempfile::tempdir().unwrap();
    let o = protoc(out.path());
    assert!(
        o.status.success(),
        "protoc refused proto/: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Both compilers see the same messages.
    let reference = prost_types::FileDescriptorSet::decode(
        std::fs::read(out.path().join("fds.bin"))
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    let ours = protox::compile(FILES, [proto_dir()]).unwrap();
    let names = |s: &prost_types::FileDescriptorSet| -> Vec<String> {
        s.file
            .iter()
            .flat_map(|f| f.message_type.iter().map(|m| m.name().to_string()))
            .collect()
    };
    assert_eq!(names(&reference), names(&ours));
}

#[test]
fn protoc_refuses_what_protox_let_through() {
    // The check above can fail: a message that reuses a name it reserves (the clash
    // protox accepted and protoc refused) is refused here.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.proto");
    std::fs::write(
        &bad,
        "syntax = \"proto3\";\npackage x;\nmessage M {\n  reserved \"images\";\n  uint32 images = 1;\n}\n",
    )
    .unwrap();
    let o = Command::new("python3")
        .env("PYTHONPATH", pypi())
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(dir.path())
        .arg(format!("--python_out={}", dir.path().display()))
        .arg("bad.proto")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("reserved"));
    assert!(!lint_file(&protox::compile(["bad.proto"], [dir.path()]).unwrap().file[0]).is_empty());
}

fn is_pascal(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && !s.contains('_')
}

fn is_lower_snake(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn is_upper_snake(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn lint_message(m: &DescriptorProto, problems: &mut Vec<String>) {
    let name = m.name();
    if !is_pascal(name) {
        problems.push(format!("message {name}: not PascalCase"));
    }
    for f in &m.field {
        if !is_lower_snake(f.name()) {
            problems.push(format!("{name}.{}: not lower_snake_case", f.name()));
        }
        if m.reserved_name.iter().any(|r| r == f.name()) {
            problems.push(format!("{name}.{}: the name is reserved", f.name()));
        }
        if m.reserved_range
            .iter()
            .any(|r| (r.start()..r.end()).contains(&f.number()))
        {
            problems.push(format!(
                "{name}.{}: number {} is reserved",
                f.name(),
                f.number()
            ));
        }
    }
    for e in &m.enum_type {
        problems.push(format!(
            "{name}.{}: nested enums are not used here",
            e.name()
        ));
    }
    for n in &m.nested_type {
        lint_message(n, problems);
    }
}

/// `buf lint` DEFAULT rules that matter to other languages' clients: package and
/// directory agree and are versioned, PascalCase messages and enums, lower_snake_case
/// fields, UPPER_SNAKE enum values prefixed with the enum's name and a zero
/// `_UNSPECIFIED`, and no field that reuses a reserved name or number.
fn lint_file(f: &FileDescriptorProto) -> Vec<String> {
    let mut problems = Vec::new();
    let dir = Path::new(f.name())
        .parent()
        .map(|p| p.to_string_lossy().replace('/', "."))
        .unwrap_or_default();
    if f.package() != dir {
        problems.push(format!(
            "{}: package {} is not its directory",
            f.name(),
            f.package()
        ));
    }
    if !f
        .package()
        .split('.')
        .next_back()
        .is_some_and(|v| v.starts_with('v'))
    {
        problems.push(format!(
            "{}: package {} has no version",
            f.name(),
            f.package()
        ));
    }
    for m in &f.message_type {
        lint_message(m, &mut problems);
    }
    // Services: PascalCase, and each method takes `<Method>Request` and returns
    // `<Method>Response` of its own (so either can grow without touching another).
    for s in &f.service {
        if !is_pascal(s.name()) {
            problems.push(format!("service {}: not PascalCase", s.name()));
        }
        for m in &s.method {
            let (input, output) = (
                m.input_type().rsplit('.').next().unwrap_or_default(),
                m.output_type().rsplit('.').next().unwrap_or_default(),
            );
            if input != format!("{}Request", m.name()) || output != format!("{}Response", m.name())
            {
                problems.push(format!(
                    "{}.{}: takes {input} and returns {output}, not {0}Request and {0}Response",
                    s.name(),
                    m.name()
                ));
            }
        }
    }
    for e in &f.enum_type {
        let name = e.name();
        if !is_pascal(name) {
            problems.push(format!("enum {name}: not PascalCase"));
        }
        let prefix: String = name
            .chars()
            .enumerate()
            .flat_map(|(i, c)| {
                let sep = (i > 0 && c.is_ascii_uppercase()).then_some('_');
                sep.into_iter()
                    .chain(std::iter::once(c.to_ascii_uppercase()))
            })
            .collect();
        for v in &e.value {
            if !is_upper_snake(v.name()) || !v.name().starts_with(&format!("{prefix}_")) {
                problems.push(format!("{name}.{}: not {prefix}_UPPER_SNAKE", v.name()));
            }
            if v.number() == 0 && !v.name().ends_with("_UNSPECIFIED") {
                problems.push(format!(
                    "{name}.{}: the zero value is not _UNSPECIFIED",
                    v.name()
                ));
            }
        }
    }
    problems
}

#[test]
fn proto_follows_the_lint_rules() {
    let set = protox::compile(FILES, [proto_dir()]).unwrap();
    let problems: Vec<String> = set
        .file
        .iter()
        .filter(|f| f.name().starts_with("shipperd/"))
        .flat_map(lint_file)
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn a_python_client_made_by_protoc_reads_our_events() {
    let out = tempfile::tempdir().unwrap();
    assert!(protoc(out.path()).status.success());
    let event = shipperd_proto::v1::BundlePublished {
        bundle_id: "ab".repeat(32),
        name: "ocp-4.18.squashfs".into(),
        images: Some(shipperd_proto::v1::ImageCounts {
            total: 20_000,
            published: 19_999,
            skipped: 7,
            failed: 1,
        }),
        target_name: "openshift-internal".into(),
        ..Default::default()
    };
    let bytes = event.encode_to_vec();
    std::fs::write(out.path().join("event.bin"), &bytes).unwrap();
    let script = r#"
import json, sys
from google.protobuf import json_format
from shipperd.v1 import events_pb2
m = events_pb2.BundlePublished()
m.ParseFromString(open(sys.argv[1], "rb").read())
print(json.dumps(json_format.MessageToDict(m)))
"#;
    let o = Command::new("python3")
        .env(
            "PYTHONPATH",
            format!("{}:{}", out.path().display(), pypi().display()),
        )
        .args(["-c", script])
        .arg(out.path().join("event.bin"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(got["bundleId"], event.bundle_id);
    assert_eq!(got["name"], "ocp-4.18.squashfs");
    assert_eq!(got["targetName"], "openshift-internal");
    assert_eq!(got["images"]["total"], 20_000);
    assert_eq!(got["images"]["published"], 19_999);
    assert_eq!(got["images"]["failed"], 1);
}
