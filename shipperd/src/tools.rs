//! `shipperd` commands that make something and exit: a bundle, the CRDs, the
//! per-install NATS credentials.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum Tool {
    /// Make the per-install NATS credentials once: a password for the `shipperd` user,
    /// a CA and a server certificate for the NATS Service's names; as a Kubernetes
    /// Secret (created only when absent) or as files. Prints nothing secret.
    NatsCredentials {
        /// Create this Secret (in --namespace) unless it exists.
        #[arg(long, required_unless_present = "out_dir", conflicts_with = "out_dir")]
        secret: Option<String>,
        /// Write the files here instead (unless a password is there already).
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// The namespace of the Secret and of the NATS Service.
        #[arg(long, env = "POD_NAMESPACE", default_value = "shipperd")]
        namespace: String,
        /// The NATS Service: its names (and its pods') go into the certificate.
        #[arg(long, default_value = "nats")]
        service: String,
        /// More names for the certificate (repeat).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Make a bundle on the connected side: the images of --images, from registries and
    /// OCI layouts, into one squashfs or tar (an OCI layout, each image named by its
    /// full source reference), resumable through a cache, the same bytes for the same
    /// inputs.
    Create(crate::create::CreateArgs),
    /// Check a bundle against a signature policy (`containers-policy.json`), offline,
    /// as a site running `--policy` would before publishing: each image's answer, and
    /// a non-zero exit when one is rejected.
    Verify(crate::verify::VerifyArgs),
    /// Print the CustomResourceDefinitions of ShipperD's resources (Bundle,
    /// RegistryTarget, WebhookTarget) as YAML, e.g. `shipperd crd | kubectl apply -f -`.
    Crd,
}

impl Tool {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Tool::Create(args) => crate::create::run(args).await,
            Tool::Verify(args) => crate::verify::run(args).await,
            Tool::Crd => {
                print!("{}", shipperd_operator::crds_yaml());
                Ok(())
            }
            Tool::NatsCredentials {
                secret,
                out_dir,
                namespace,
                service,
                hosts,
            } => {
                let mut names = crate::natscreds::hosts(&service, &namespace);
                names.extend(hosts);
                let made = match (&secret, &out_dir) {
                    (_, Some(dir)) => crate::natscreds::write_files(dir, &names)?,
                    (Some(name), None) => {
                        rustls::crypto::ring::default_provider()
                            .install_default()
                            .map_err(|_| {
                                anyhow::anyhow!("a TLS crypto provider was installed already")
                            })?;
                        let client = kube::Client::try_default().await?;
                        crate::natscreds::ensure_secret(client, &namespace, name, &names).await?
                    }
                    (None, None) => anyhow::bail!("give --secret or --out-dir"),
                };
                let what = secret.map_or_else(
                    || {
                        out_dir
                            .as_ref()
                            .map(|d| d.display().to_string())
                            .unwrap_or_default()
                    },
                    |s| format!("Secret {namespace}/{s}"),
                );
                println!(
                    "{what}: {}",
                    if made {
                        "created"
                    } else {
                        "exists already; left as it is"
                    }
                );
                Ok(())
            }
        }
    }
}
