//! Every end-to-end test in one binary: one link instead of one per file, and the
//! tests of different files run side by side (`cargo test` runs binaries one after
//! another). Each module is one area; its own doc says what it proves.

// Tests wait for servers, clients and clocks in every way; the rule that every wait has
// a name (clippy.toml) is for the product's code.
#![allow(clippy::disallowed_methods)]

// The longest test first: it starts at once, and the others share the other threads.
mod at_scale;
mod auth;
mod bundles;
mod cli;
mod crash;
mod create;
mod cutoff;
mod differential;
mod docker_archives;
mod drift;
mod exposure;
mod fetch;
mod formats;
mod grpc;
mod hardening;
mod hostile;
mod image;
mod ingest;
mod lifecycle;
mod logs;
mod manifests;
mod nats_cluster;
mod operator;
mod outage;
mod owners;
mod pipeline;
mod publish_faults;
mod registry_client;
mod secrets;
mod serve;
mod signatures;
mod state;
mod stopping;
mod targets;
mod traces;
mod trust;
mod ui;
mod webhooks;
