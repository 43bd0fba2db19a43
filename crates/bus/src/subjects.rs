//! Names on the bus. Everything a user may subscribe to or a replica must agree on lives
//! here, so no service spells a subject by hand.

/// Stream holding every event (`shipperd.events.>`), limits retention: users and the
/// notify service read it with their own consumers; it is the bundle's history.
pub const EVENTS_STREAM: &str = "SHIPPERD";
/// Subjects of [`EVENTS_STREAM`].
pub const EVENTS_SUBJECTS: &str = "shipperd.events.>";

/// Stream holding work (`shipperd.jobs.>`), work-queue retention: a job is gone once acked.
pub const JOBS_STREAM: &str = "SHIPPERD_JOBS";
/// Subjects of [`JOBS_STREAM`].
pub const JOBS_SUBJECTS: &str = "shipperd.jobs.>";
/// One message per image to publish.
pub const PUBLISH_JOB_SUBJECT: &str = "shipperd.jobs.publish";
/// One message per bundle (and generation) whose images are all in the registry: set
/// its tags.
pub const COMMIT_JOB_SUBJECT: &str = "shipperd.jobs.commit";

/// KV bucket with one small summary per bundle, keyed by bundle id.
pub const BUNDLES_BUCKET: &str = "shipperd-bundles";
/// KV bucket with the state of every image, keyed `<bundle id>.<image index>`.
pub const IMAGES_BUCKET: &str = "shipperd-images";
/// KV bucket of publish's registry bookkeeping, per registry: a repository holding each
/// blob (so later pushes to other repositories can be cross-repository mounts), open
/// chunked upload sessions, upload leases across replicas, and who set each tag last.
pub const BLOBS_BUCKET: &str = "shipperd-blobs";

/// A registry's part of its keys in [`BLOBS_BUCKET`] (KV keys cannot hold the `:` of a
/// host with a port): the blob locations of registry `host` are `<this>.<digest hex>`.
pub fn registry_key_prefix(host: &str) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(host.as_bytes())[..6])
}

/// KV bucket of the stage runtime: the attempts made at each piece of work, counted
/// before the work starts, keyed by the work's message id (without re-drive).
pub const ATTEMPTS_BUCKET: &str = "shipperd-attempts";

/// Durable consumer of the unpack service (bundle.received).
pub const UNPACK_CONSUMER: &str = "unpack";
/// Durable consumer of the publish service (publish jobs).
pub const PUBLISH_CONSUMER: &str = "publish";
/// Durable consumer of the publish service's commit stage (commit jobs).
pub const COMMIT_CONSUMER: &str = "commit";
/// Prefix of the notify service's durable consumers, one per webhook target.
pub const NOTIFY_CONSUMER_PREFIX: &str = "notify-";

/// CloudEvents `source` attribute of every event.
pub const EVENT_SOURCE: &str = "/shipperd";
