//! Registry targets: where bundles are published, how to reach and trust each registry,
//! how to log in, and where each image lands.
//!
//! Targets come from the `--registry` flags (one target, named `default`) or from a
//! targets file (TOML, several named targets; see `docs/targets.example.toml`). Both
//! are read and checked once, at start, so a wrong path or a missing credential stops
//! the service with a clear message before it takes any work.

mod auth;
pub mod egress;
mod live;
mod mapping;

use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use shipperd_model::{RegistryUrl, Secret, TargetName};

pub use auth::{AuthSpec, Credentials, DockerAuth, DockerConfig};
pub use egress::Egress;
pub use live::LiveTargets;
pub use mapping::{Mapping, NAMESPACE as NAMESPACE_PREFIX, Rename};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("targets file {path}: {problem}")]
    File { path: String, problem: String },
    #[error("target {target}: {problem}")]
    Target { target: String, problem: String },
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("path mapping: {0}")]
    Mapping(String),
    #[error("no target named {0:?}")]
    Unknown(String),
    #[error(
        "the bundle names no target and none is the default (mark a ClusterRegistryTarget \
         `default: true`, or name a target)"
    )]
    NoDefault,
    #[error(transparent)]
    Name(#[from] shipperd_model::ParseError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How blobs move to one target.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Transfer {
    /// Requests carrying blob bytes at once to this target, over every image.
    pub concurrency: usize,
    /// Blobs larger than this go up in chunks (POST, PATCH..., PUT) and resume after a
    /// failure from the offset the registry reports; smaller ones in one PUT (sent
    /// again whole after a failure). Chunks cost time (one request after another,
    /// a round trip and a KV write between them), so only blobs whose re-sending
    /// would hurt are chunked.
    pub chunk_threshold: u64,
    /// Bytes per PATCH of a chunked upload.
    pub chunk_size: u64,
    /// A request that moves no byte for this long is abandoned and retried.
    #[serde(with = "secs")]
    pub stall_timeout: Duration,
    /// Attempts of one request on 429, 5xx or a broken connection.
    pub retries: u32,
    /// First retry delay (doubled each time up to `retry_max`, plus up to as much
    /// again at random), unless the registry says `Retry-After`.
    #[serde(with = "secs")]
    pub retry_base: Duration,
    #[serde(with = "secs")]
    pub retry_max: Duration,
    /// Publish replicas take a lease (in NATS KV) on each blob they upload, so a layer
    /// goes up once however many replicas need it; the others wait and then mount it.
    /// A lease its holder has not renewed for this long (the holder died) is taken over.
    #[serde(with = "secs")]
    pub lease_timeout: Duration,
}

impl Default for Transfer {
    fn default() -> Self {
        Transfer {
            concurrency: 4,
            chunk_threshold: 256 << 20,
            chunk_size: 64 << 20,
            stall_timeout: Duration::from_secs(30),
            retries: 6,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            lease_timeout: Duration::from_secs(20),
        }
    }
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = f64::deserialize(d)?;
        if !(0.0..=86_400.0).contains(&s) {
            return Err(serde::de::Error::custom("seconds must be within 0..=86400"));
        }
        Ok(Duration::from_secs_f64(s))
    }
}

/// Who may move a tag in this registry. A tag ShipperD set belongs to the owner of the
/// bundle that set it (its namespace, or whoever uploaded it) and to the repository its
/// image came from; by default no other may move it, and no bundle moves a tag
/// ShipperD did not set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TagPolicy {
    /// A bundle may move a tag another owner (or another source repository) set; the
    /// move is logged and noted in the `image.published` event. The admin's override.
    pub take_over: bool,
    /// A bundle may move a tag that something other than ShipperD set (it is then
    /// ShipperD's, and the bundle's owner's).
    pub overwrite_unowned: bool,
}

/// One registry to publish into.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: TargetName,
    pub url: RegistryUrl,
    /// Plain HTTP to a host that is not loopback, or TLS without verification.
    pub insecure: bool,
    /// Extra trusted CA certificates (PEM), e.g. the cluster's service CA.
    pub ca_pem: Option<Vec<u8>>,
    pub auth: AuthSpec,
    pub mapping: Mapping,
    pub transfer: Transfer,
    pub tags: TagPolicy,
    /// Bundles uploaded through the ingest endpoint (or dropped) may go here: `false`
    /// for a cluster target whose conditions leave the upload namespace out.
    pub uploads: bool,
    /// The target's signature policies (`containers-policy.json` files), applied with
    /// the site-wide one: an image lands here only when every one accepts it.
    pub policies: Vec<std::path::PathBuf>,
}

/// One `[[target]]` of a targets file, as written (relative file names are taken from
/// the file's directory). The operator writes these with `toml`; the services read them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetEntry {
    pub name: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub insecure: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub auth: AuthSpec,
    #[serde(default, skip_serializing_if = "is_default")]
    pub mapping: Mapping,
    #[serde(default, skip_serializing_if = "is_default")]
    pub transfer: Transfer,
    #[serde(default, skip_serializing_if = "is_default")]
    pub tags: TagPolicy,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub uploads: bool,
    /// `containers-policy.json` files every image must satisfy to land here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<std::path::PathBuf>,
}

impl TargetEntry {
    /// An entry with nothing but its name and URL.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        TargetEntry {
            name: name.into(),
            url: url.into(),
            insecure: false,
            ca_file: None,
            auth: AuthSpec::default(),
            mapping: Mapping::default(),
            transfer: Transfer::default(),
            tags: TagPolicy::default(),
            uploads: true,
            policies: Vec::new(),
        }
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

/// A targets file: the default target's name (`""`: none) and every target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target: Vec<TargetEntry>,
}

impl TargetsFile {
    /// The file's TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a targets file serialises")
    }
}

/// Is `host` (`name[:port]`) a loopback address or `localhost`?
pub fn is_loopback(host: &str) -> bool {
    let h = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Target {
    /// A target from its parts, checked.
    pub fn new(
        name: &str,
        url: &str,
        insecure: bool,
        ca_pem: Option<Vec<u8>>,
        auth: AuthSpec,
        mapping: Mapping,
        transfer: Transfer,
    ) -> Result<Self> {
        let bad = |problem: String| Error::Target {
            target: name.to_string(),
            problem,
        };
        let name = TargetName::parse(name).map_err(|e| bad(e.to_string()))?;
        let url = RegistryUrl::parse(url).map_err(|e| bad(e.to_string()))?;
        if !url.https && !insecure && !is_loopback(&url.host) {
            return Err(bad(format!(
                "plain http to {} needs insecure = true (or --registry-insecure)",
                url.host
            )));
        }
        mapping.validate().map_err(|e| bad(e.to_string()))?;
        auth.validate().map_err(|e| bad(e.to_string()))?;
        auth.credentials(&url.host)
            .map_err(|e| bad(e.to_string()))?;
        if transfer.concurrency == 0 || transfer.chunk_size == 0 {
            return Err(bad("concurrency and chunk_size must be above 0".into()));
        }
        if transfer.stall_timeout.is_zero() || transfer.lease_timeout.is_zero() {
            return Err(bad("stall_timeout and lease_timeout must be above 0".into()));
        }
        Ok(Target {
            name,
            url,
            insecure,
            ca_pem,
            auth,
            mapping,
            transfer,
            tags: TagPolicy::default(),
            uploads: true,
            policies: Vec::new(),
        })
    }

    /// The credentials to present now (files are read again each time).
    pub fn credentials(&self) -> Result<Credentials> {
        self.auth.credentials(&self.url.host)
    }
}

/// Every configured target, and the one bundles go to unless they name another.
#[derive(Debug, Clone)]
pub struct Targets {
    targets: Vec<Target>,
    /// `None`: bundles must name their target (a file with `default = ""`, or none).
    default: Option<usize>,
}

impl Targets {
    /// The one target of the `--registry` flags, named `default`.
    pub fn single(
        url: &str,
        prefix: &str,
        username: Option<String>,
        password: Option<Secret>,
        insecure: bool,
    ) -> Result<Self> {
        let auth = AuthSpec {
            username,
            password,
            ..Default::default()
        };
        let mapping = Mapping {
            prefix: prefix.to_string(),
            ..Default::default()
        };
        let t = Target::new(
            "default",
            url,
            insecure,
            None,
            auth,
            mapping,
            Transfer::default(),
        )?;
        Ok(Targets {
            targets: vec![t],
            default: Some(0),
        })
    }

    /// `targets`, with `default` the default one: absent, the first; `""`, none (a
    /// file the operator renders may hold no target at all, and no default).
    pub fn from_list(targets: Vec<Target>, default: Option<&str>) -> Result<Self> {
        if targets.is_empty() && default != Some("") {
            return Err(Error::Unknown("(no targets configured)".into()));
        }
        for (i, t) in targets.iter().enumerate() {
            if targets[..i].iter().any(|o| o.name == t.name) {
                return Err(Error::Target {
                    target: t.name.to_string(),
                    problem: "named twice".into(),
                });
            }
        }
        let default = match default {
            Some("") => None,
            Some(d) => Some(
                targets
                    .iter()
                    .position(|t| t.name.as_str() == d)
                    .ok_or_else(|| Error::Unknown(d.to_string()))?,
            ),
            None => Some(0),
        };
        Ok(Targets { targets, default })
    }

    /// Reads a targets file (TOML).
    pub fn load(path: &Path) -> Result<Self> {
        let file = |problem: String| Error::File {
            path: path.display().to_string(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new("."))).map_err(|e| match e {
            Error::File { problem, .. } => file(problem),
            other => other,
        })
    }

    /// Parses a targets file's text; relative file names are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let file: TargetsFile = toml::from_str(text).map_err(|e| Error::File {
            path: String::new(),
            problem: e.to_string(),
        })?;
        Self::from_file(file, base)
    }

    /// The targets of a targets file, checked as when read (credentials and CA files
    /// readable); relative file names are taken from `base`.
    pub fn from_file(file: TargetsFile, base: &Path) -> Result<Self> {
        let mut targets = Vec::new();
        for t in file.target {
            let rel = |p: Option<std::path::PathBuf>| p.map(|p| base.join(p));
            let ca_pem = match rel(t.ca_file) {
                Some(f) => Some(std::fs::read(&f).map_err(|e| Error::Target {
                    target: t.name.clone(),
                    problem: format!("ca_file {}: {e}", f.display()),
                })?),
                None => None,
            };
            let mut auth = t.auth;
            auth.password_file = rel(auth.password_file);
            auth.docker_config = rel(auth.docker_config);
            auth.service_account_token = rel(auth.service_account_token);
            auth.bearer_token_file = rel(auth.bearer_token_file);
            let mut target = Target::new(
                &t.name, &t.url, t.insecure, ca_pem, auth, t.mapping, t.transfer,
            )?;
            target.tags = t.tags;
            target.uploads = t.uploads;
            target.policies = t.policies.into_iter().map(|p| base.join(p)).collect();
            targets.push(target);
        }
        Self::from_list(targets, file.default.as_deref())
    }

    /// The target called `name`, or the default one for `None`.
    pub fn get(&self, name: Option<&TargetName>) -> Result<&Target> {
        match name {
            None => self
                .default
                .map(|d| &self.targets[d])
                .ok_or(Error::NoDefault),
            Some(n) => self
                .targets
                .iter()
                .find(|t| &t.name == n)
                .ok_or_else(|| Error::Unknown(n.to_string())),
        }
    }

    /// The default target, if there is one.
    pub fn default_target(&self) -> Option<&Target> {
        self.default.map(|d| &self.targets[d])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.targets.iter()
    }

    /// Changes every target's transfer settings (tests and benchmarks).
    pub fn with_transfer(mut self, f: impl Fn(&mut Transfer)) -> Self {
        for t in &mut self.targets {
            f(&mut t.transfer);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_targets_file_written_with_toml_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("password"), "pw").unwrap();
        let mut shared = TargetEntry::new("shared", "https://registry.example:5000");
        shared.auth.username = Some("robot \"one\"".into());
        shared.auth.password_file = Some(dir.path().join("password"));
        shared.mapping.prefix = "{namespace}".into();
        shared.mapping.upload_namespace = Some("shipperd".into());
        shared.mapping.max_depth = Some(2);
        shared.mapping.renames = vec![Rename {
            from: "quay.io/a".into(),
            to: "b".into(),
        }];
        shared.transfer.concurrency = 8;
        shared.tags.take_over = true;
        shared.uploads = false;
        let plain = TargetEntry::new("team-a/mirror", "http://127.0.0.1:5000");
        let file = TargetsFile {
            default: Some("shared".into()),
            target: vec![shared.clone(), plain.clone()],
        };
        let text = file.to_toml();
        // Only what differs from the defaults is written.
        assert!(!text.contains("insecure"), "{text}");
        assert!(
            !text.contains("stall_timeout") || text.contains("concurrency = 8"),
            "{text}"
        );
        let back: TargetsFile = toml::from_str(&text).unwrap();
        assert_eq!(back, file, "{text}");
        let targets = Targets::parse(&text, dir.path()).unwrap();
        let t = targets.get(None).unwrap();
        assert_eq!(t.name.as_str(), "shared");
        assert_eq!(t.transfer.concurrency, 8);
        assert!(t.tags.take_over && !t.uploads);
        assert_eq!(t.mapping.renames.len(), 1);
        assert!(
            targets
                .iter()
                .any(|t| t.name.as_str() == "team-a/mirror" && t.uploads)
        );
    }

    #[test]
    fn parses_a_targets_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "sa-token").unwrap();
        let t = Targets::parse(
            r#"
            default = "internal"

            [[target]]
            name = "quay"
            url = "https://quay.example"
            [target.mapping]
            keep_host = true
            max_depth = 2

            [[target]]
            name = "internal"
            url = "https://image-registry.openshift-image-registry.svc:5000"
            auth.service_account_token = "token"
            mapping.prefix = "mirror"
            transfer = { concurrency = 8, stall_timeout = 5 }
            "#,
            dir.path(),
        )
        .unwrap();
        let d = t.get(None).unwrap();
        assert_eq!(d.name.as_str(), "internal");
        assert_eq!(d.transfer.concurrency, 8);
        assert_eq!(d.transfer.stall_timeout, Duration::from_secs(5));
        assert_eq!(d.transfer.chunk_size, Transfer::default().chunk_size);
        assert!(matches!(
            d.credentials().unwrap(),
            Credentials::Basic { username, .. } if username == "serviceaccount"
        ));
        let named = |n: &str| TargetName::parse(n).unwrap();
        assert_eq!(
            t.get(Some(&named("quay"))).unwrap().mapping.max_depth,
            Some(2)
        );
        assert!(t.get(Some(&named("nope"))).is_err());
    }

    #[test]
    fn refuses_what_would_surprise() {
        let base = Path::new("/");
        for (bad, why) in [
            (
                "[[target]]\nname='a'\nurl='http://reg.example'",
                "needs insecure",
            ),
            (
                "[[target]]\nname='a'\nurl='https://r'\ncolour=1",
                "unknown field",
            ),
            (
                "[[target]]\nname='a'\nurl='https://r'\n[[target]]\nname='a'\nurl='https://s'",
                "named twice",
            ),
            (
                "default='x'\n[[target]]\nname='a'\nurl='https://r'",
                "no target named",
            ),
            (
                "[[target]]\nname='a'\nurl='https://r'\nauth.password_file='/nonexistent'\nauth.username='u'",
                "/nonexistent",
            ),
        ] {
            let err = Targets::parse(bad, base).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert!(Targets::single("http://127.0.0.1:5000", "", None, None, false).is_ok());
        assert!(Targets::single("http://[::1]:5000", "", None, None, false).is_ok());
        assert!(Targets::single("http://reg:5000", "", None, None, true).is_ok());
    }
}
