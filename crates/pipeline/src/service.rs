//! What a stage service (unpack, publish) is made of before its own part: its settings
//! ([`ServiceConfig`]: NATS, the data directory, the targets and the file they follow,
//! how its stage runs) and its start-up ([`Service::connect`]: connected, topology
//! declared, state opened, the executor and runtime made, the targets followed).

use std::{path::PathBuf, time::Duration};

use shipperd_bus::{Bus, NatsConfig};
use shipperd_model::{Backoff, DataDir};
use shipperd_registry_targets::{LiveTargets, Targets};
use shipperd_state::{Executor, StateStore};
use tokio_util::sync::CancellationToken;

use crate::{Runtime, Settings};

/// How often the targets file is looked at.
const TARGETS_POLL: Duration = Duration::from_secs(2);

/// The settings every stage service has.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Where NATS is and how to log in (servers, credentials, TLS, replicas).
    pub nats: NatsConfig,
    pub data_dir: DataDir,
    /// Where images go: named registries, their credentials, trust and path mapping.
    pub targets: Targets,
    /// The file `targets` came from: read again when it changes (the next job uses
    /// what it says; jobs under way finish with what they began with).
    pub targets_file: Option<PathBuf>,
    /// How the stage runs: jobs at once in this replica, attempts before a failure
    /// that may heal fails the job (a worker that died counts), retry delays, the ack
    /// wait.
    pub stage: Settings,
}

impl ServiceConfig {
    pub fn new(
        nats_url: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        targets: Targets,
    ) -> Self {
        ServiceConfig {
            nats: NatsConfig::new(nats_url),
            data_dir: DataDir::new(data_dir.into()),
            targets,
            targets_file: None,
            stage: Settings {
                backoff: Backoff::new(Duration::from_secs(2), Duration::from_secs(60)),
                ..Settings::default()
            },
        }
    }
}

/// A stage service, started: connected, its topology declared.
pub struct Service {
    pub bus: Bus,
    pub state: StateStore,
    pub executor: Executor,
    pub runtime: Runtime,
    /// The targets now, following [`ServiceConfig::targets_file`] once [`Service::follow`]
    /// runs.
    pub targets: LiveTargets,
}

impl Service {
    /// Connects to NATS as `name` and makes what every stage needs.
    pub async fn connect(config: &ServiceConfig, name: &str) -> shipperd_bus::Result<Self> {
        let bus = Bus::connect_with(&config.nats, name).await?;
        bus.ensure_topology().await?;
        let state = StateStore::open(&bus).await?;
        let executor = Executor::new(bus.clone(), state.clone(), config.data_dir.clone());
        Ok(Service {
            runtime: Runtime::new(&bus, executor.clone()).await?,
            targets: LiveTargets::new(config.targets.clone(), config.targets_file.clone()),
            bus,
            state,
            executor,
        })
    }

    /// Follows the targets file until `shutdown`.
    pub fn follow_targets(targets: &LiveTargets, shutdown: &CancellationToken) {
        tokio::spawn(
            targets
                .clone()
                .follow(TARGETS_POLL, shutdown.clone().cancelled_owned()),
        );
    }
}
