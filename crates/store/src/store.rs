//! The bundle store: `<data>/bundles/<id>/bundle` (or `.../parts/`), written once.
//!
//! Uploads stream into `<data>/tmp/` while being hashed, are fsynced, then renamed into
//! place (same filesystem, so the rename is atomic: a stored bundle is always whole).
//! A temp file is removed whenever an upload does not complete. Before a bundle is put
//! in place, `meta.json` beside it says what it is, so a crash between storing it and
//! recording it leaves something the janitor can record later.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shipperd_bus::Bus;
use shipperd_model::{BundleId, BundleSummary, DataDir, Effect, Effects, Phase, TargetName};
use shipperd_state::{Executor, StateStore};
use tokio::io::AsyncReadExt;

use shipperd_telemetry::metrics::metrics;

use crate::{
    Error, Result,
    disk::DiskWriter,
    space::{Limits, Space},
};

/// Result of taking a bundle in.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub summary: BundleSummary,
    /// `false` when the bundle was known already (same bytes, same id).
    pub created: bool,
}

/// What a stored bundle is, kept beside it (`meta.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub name: String,
    pub size: u64,
    /// Relative to the data directory.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetName>,
    /// The namespace that brought it in (see `BundleSummary::owner`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Who uploaded it (see `BundleSummary::uploader`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploader: Option<String>,
}

impl Meta {
    /// A bundle stored as one file, `id`, that came from `origin`.
    fn file(name: &str, size: u64, id: &BundleId, origin: &Origin) -> Self {
        Meta {
            name: name.to_string(),
            size,
            path: DataDir::bundle_file_rel(id),
            target: origin.target.clone(),
            owner: origin.owner.clone(),
            uploader: origin.uploader.clone(),
        }
    }
}

/// Where a bundle goes and who brought it in: its registry target (`None`: the
/// default), the Kubernetes namespace of the `Bundle` that fetched it (`None`: the
/// ingest endpoint or the drop directory) and who uploaded it there.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub target: Option<TargetName>,
    pub owner: Option<String>,
    pub uploader: Option<String>,
}

impl Origin {
    /// An upload through the API by `uploader` (see `auth::Caller`), to `target`.
    pub fn upload(target: Option<&TargetName>, uploader: &str) -> Self {
        Origin {
            target: target.cloned(),
            owner: None,
            uploader: Some(uploader.to_string()),
        }
    }

    /// A file of the drop directory (the admin's: whoever may write there).
    pub fn drop_directory() -> Self {
        Origin {
            uploader: Some(shipperd_model::DROP_DIRECTORY.into()),
            ..Origin::default()
        }
    }
}

pub struct Store {
    bus: Bus,
    state: StateStore,
    executor: Executor,
    data: DataDir,
    max_bytes: u64,
    /// This process's own temp directory, `<data>/tmp/<instance>`: other replicas (and
    /// the operator) have theirs, so a start-up cleans only what this one left.
    tmp: PathBuf,
    limits: Limits,
    pub(crate) space: Space,
}

/// This replica's name among those sharing the data directory (the pod's name): its
/// temp directory is `<data>/tmp/<instance>`.
pub fn instance() -> String {
    let raw = std::env::var("SHIPPERD_INSTANCE")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "local".into());
    let s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() { "local".into() } else { s }
}

/// Suffix of a drop-directory file taken into the store but not yet stored: the user's
/// only copy, never deleted at start-up (put back instead).
const TAKEN: &str = ".taken";

/// Removes a temp file unless the upload completed.
pub(crate) struct TempFile {
    pub(crate) path: PathBuf,
    keep: bool,
}

impl TempFile {
    /// A file kept when dropped (a partial fetch, resumed later).
    pub(crate) fn kept(path: PathBuf) -> Self {
        TempFile { path, keep: true }
    }

    /// Removed when dropped after all.
    pub(crate) fn discard(&mut self) {
        self.keep = false;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Most parts one multi-part bundle may have.
pub const MAX_PARTS: u32 = 9999;
/// Checksums of the parts received so far, beside them until completion.
const SUMS_DIR: &str = ".sums";
/// The SHA-256 of the upload id of a multi-part upload, beside its parts: only the
/// client that started it (and got the id) may add parts or complete it.
const OWNER: &str = ".owner";

/// How a request names the multi-part upload it belongs to.
#[derive(Debug, Clone, Copy)]
pub enum UploadId<'a> {
    /// None given: a first part, which starts the upload.
    Start,
    Given(&'a str),
}

/// A part of a multi-part upload, taken in.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Part {
    /// The upload's id: every later part and the completion must give it.
    pub upload_id: String,
    pub n: u32,
    pub sha256: String,
    pub size: u64,
}

fn check_expected(expected: Option<&str>, actual: &str) -> Result<()> {
    match expected {
        Some(e) if e != actual => Err(Error::ChecksumMismatch {
            expected: e.to_string(),
            actual: actual.to_string(),
        }),
        _ => Ok(()),
    }
}

pub(crate) fn hash_id(hasher: Sha256) -> BundleId {
    BundleId::from_sha256(&hasher.finalize().into())
}

pub fn validate_name(name: &str) -> Result<()> {
    let ok = (1..=200).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

/// A sha256 as people write it (any case, optional `sha256:`), as 64 lowercase hex.
pub fn parse_checksum(s: &str) -> Result<BundleId> {
    BundleId::from_checksum(s).map_err(|_| Error::BadChecksum(s.trim().to_string()))
}

async fn restore(from: &Path, to: &Path) {
    if let Err(error) = tokio::fs::rename(from, to).await {
        tracing::error!(%error, from = %from.display(), to = %to.display(), "cannot put a dropped bundle back");
    }
}

/// A file opened by descriptor beneath a directory held open: how `path` sources are
/// taken (see [`Store::receive_opened`]).
pub struct Opened {
    /// The file, opened for reading without following a link.
    pub file: std::fs::File,
    /// Its directory, and its name there.
    pub dir: rustix::fd::OwnedFd,
    pub leaf: std::ffi::OsString,
    /// Its path, for messages.
    pub shown: String,
}

/// Where a taken file goes back to when it cannot be stored.
enum Back {
    Path(PathBuf),
    At {
        dir: rustix::fd::OwnedFd,
        leaf: std::ffi::OsString,
    },
}

impl Back {
    async fn restore(&self, from: &Path) {
        match self {
            Back::Path(to) => restore(from, to).await,
            Back::At { dir, leaf } => {
                let r = rustix::fs::renameat(rustix::fs::CWD, from, dir, leaf);
                if let Err(error) = r {
                    tracing::error!(%error, from = %from.display(), "cannot put a taken bundle back");
                }
            }
        }
    }
}

impl Store {
    /// Opens the store for the ingest service: the leftovers of uploads a crash of this
    /// replica cut off (in its own temp directory) are removed first; drop-directory
    /// files it had taken are kept, for [`Store::recover_taken`]. Other replicas' temp
    /// files are left alone.
    pub async fn open(bus: Bus, data: &DataDir, max_bytes: u64) -> Result<Self> {
        let store = Self::with_tmp(bus, data, max_bytes, instance()).await?;
        let mut entries = tokio::fs::read_dir(&store.tmp)
            .await
            .map_err(|e| Error::io(&store.tmp, e))?;
        while let Ok(Some(e)) = entries.next_entry().await {
            if !e.file_name().to_string_lossy().ends_with(TAKEN) {
                let _ = tokio::fs::remove_file(e.path()).await;
            }
        }
        Ok(store)
    }

    /// Opens the store beside a running ingest service (the operator's fetches), with a
    /// temp directory of its own.
    pub async fn attach(bus: Bus, data: &DataDir, max_bytes: u64) -> Result<Self> {
        Self::with_tmp(
            bus,
            data,
            max_bytes,
            format!("{}.{}", instance(), std::process::id()),
        )
        .await
    }

    async fn with_tmp(bus: Bus, data: &DataDir, max_bytes: u64, name: String) -> Result<Self> {
        let tmp = data.tmp().join(name);
        for d in [&tmp, &data.bundles(), &data.uploads()] {
            tokio::fs::create_dir_all(d)
                .await
                .map_err(|e| Error::io(d, e))?;
        }
        let limits = Limits::default();
        let state = StateStore::open(&bus).await?;
        Ok(Store {
            executor: Executor::new(bus.clone(), state.clone(), data.clone()),
            state,
            bus,
            data: data.clone(),
            max_bytes,
            space: Space::new(tmp.clone(), Self::counted(data), &limits),
            tmp,
            limits,
        })
    }

    /// What counts as stored against `max_stored_bytes`.
    fn counted(data: &DataDir) -> Vec<PathBuf> {
        vec![data.bundles(), data.uploads(), data.tmp()]
    }

    /// The same store, with these limits on what it takes in.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.space = Space::new(self.tmp.clone(), Self::counted(&self.data), &limits);
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Puts the drop-directory files a crash left taken but not stored back into
    /// `drop_dir` (under their names; a name taken meanwhile gets a suffix), to be taken
    /// again. Without a drop directory they stay where they are.
    pub async fn recover_taken(&self, drop_dir: &Path) {
        let Ok(mut entries) = tokio::fs::read_dir(&self.tmp).await else {
            return;
        };
        while let Ok(Some(e)) = entries.next_entry().await {
            let file = e.file_name().to_string_lossy().to_string();
            let Some(name) = file
                .strip_suffix(TAKEN)
                .and_then(|f| f.split_once("--"))
                .map(|(_, n)| n.to_string())
            else {
                continue;
            };
            let mut to = drop_dir.join(&name);
            let mut n = 1;
            while tokio::fs::try_exists(&to).await.unwrap_or(true) && n < 1000 {
                to = drop_dir.join(format!("{name}.recovered-{n}"));
                n += 1;
            }
            match tokio::fs::rename(e.path(), &to).await {
                Ok(()) => {
                    tracing::warn!(file = %to.display(), "a dropped bundle a crash left half taken is back in the drop directory")
                }
                Err(error) => {
                    tracing::error!(%error, from = %e.path().display(), "cannot put a dropped bundle back")
                }
            }
        }
    }

    pub fn state(&self) -> &StateStore {
        &self.state
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    pub fn data(&self) -> &DataDir {
        &self.data
    }

    /// A known bundle, if `id` names one.
    pub async fn known(&self, id: &BundleId) -> Result<Option<BundleSummary>> {
        Ok(self.state.summary(id).await?)
    }

    pub(crate) fn temp_file(&self, keep: bool) -> TempFile {
        TempFile {
            path: self.tmp.join(format!("{}.part", uuid::Uuid::new_v4())),
            keep,
        }
    }

    /// Where a drop-directory file named `name` waits while it is stored (see
    /// [`TAKEN`]).
    fn taken_file(&self, name: &str) -> TempFile {
        TempFile {
            path: self
                .tmp
                .join(format!("{}--{name}{TAKEN}", uuid::Uuid::new_v4())),
            keep: true,
        }
    }

    /// Takes a bundle in from a stream of chunks (of `declared` bytes, if the client
    /// said).
    pub async fn receive<S>(
        &self,
        name: &str,
        body: S,
        declared: Option<u64>,
        expected: Option<&BundleId>,
        origin: &Origin,
    ) -> Result<Accepted>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        validate_name(name)?;
        let tmp = self.temp_file(false);
        let (hasher, size) = self.write_stream(&tmp.path, body, declared).await?;
        let id = hash_id(hasher);
        check_expected(expected.map(BundleId::as_str), id.as_str())?;
        metrics().bytes_received.inc_by(size);
        self.commit(name, tmp, id, size, origin).await
    }

    /// Streams `body` into a new file at `path` (fsynced), hashing it; returns the hash
    /// and the size. Refuses empty bodies, bodies over the size limit, more uploads at
    /// once than the bounds allow, and bodies the data volume has no room for.
    async fn write_stream<S>(
        &self,
        path: &Path,
        mut body: S,
        declared: Option<u64>,
    ) -> Result<(Sha256, u64)>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        let limit = self.max_bytes;
        if declared.is_some_and(|d| d > limit) {
            return Err(Error::TooLarge { limit });
        }
        let mut claim = self.space.claim(declared).await?;
        // Hashed and written on threads of their own (see `disk`).
        let mut out = DiskWriter::create(path)
            .await
            .map_err(|e| Error::io(path, e))?;
        let mut size = 0u64;
        let received = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| match e {
                    Error::Stream(reason) => Error::Incomplete {
                        received: size,
                        reason,
                    },
                    e => e,
                })?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(Error::TooLarge { limit });
                }
                claim.wrote(size)?;
                out.write(chunk).await.map_err(|e| Error::io(path, e))?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = received {
            out.abort().await;
            return Err(e);
        }
        let hasher = out.finish().await.map_err(|e| Error::io(path, e))?;
        if size == 0 {
            return Err(Error::Empty);
        }
        Ok((hasher, size))
    }

    /// Where the parts of the multi-part upload `name` wait for completion.
    fn upload_dir(&self, name: &str) -> PathBuf {
        self.data.upload(name)
    }

    /// Takes in part `n` (1-based) of the multi-part bundle `name`; a part sent again
    /// replaces the earlier one.
    pub async fn receive_part<S>(
        &self,
        name: &str,
        n: u32,
        id: UploadId<'_>,
        body: S,
        declared: Option<u64>,
        expected: Option<&BundleId>,
    ) -> Result<Part>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        validate_name(name)?;
        if !(1..=MAX_PARTS).contains(&n) {
            return Err(Error::BadPart(format!(
                "part number {n} is outside 1..={MAX_PARTS}"
            )));
        }
        let dir = self.upload_dir(name);
        let sums = dir.join(SUMS_DIR);
        let starts = matches!(id, UploadId::Start);
        if starts {
            tokio::fs::create_dir_all(&sums)
                .await
                .map_err(|e| Error::io(&sums, e))?;
        }
        let upload_id = self.own(name, &dir, id).await?;
        let stored = async {
            let tmp = self.temp_file(false);
            let (hasher, size) = self.write_stream(&tmp.path, body, declared).await?;
            let sha256 = hex::encode(hasher.finalize());
            check_expected(expected.map(BundleId::as_str), &sha256)?;
            let part = dir.join(format!("{n:06}"));
            tokio::fs::write(sums.join(format!("{n:06}")), format!("{sha256} {size}\n"))
                .await
                .map_err(|e| Error::io(&sums, e))?;
            tokio::fs::rename(&tmp.path, &part)
                .await
                .map_err(|e| Error::io(&part, e))?;
            Ok((sha256, size))
        }
        .await;
        let (sha256, size) = match stored {
            Ok(s) => s,
            Err(e) => {
                // The client never learnt the id of an upload its first part started:
                // the name is freed again.
                if starts {
                    let _ = tokio::fs::remove_dir_all(&dir).await;
                }
                return Err(e);
            }
        };
        metrics().bytes_received.inc_by(size);
        Ok(Part {
            upload_id,
            n,
            sha256,
            size,
        })
    }

    /// Checks that `id` owns the multi-part upload `name` (in `dir`), or, for a first
    /// part, makes a new id its owner; returns the id.
    async fn own(&self, name: &str, dir: &Path, id: UploadId<'_>) -> Result<String> {
        let owner = dir.join(OWNER);
        let digest = |id: &str| hex::encode(Sha256::digest(id.as_bytes()));
        match id {
            UploadId::Start => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                let created = tokio::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&owner)
                    .await;
                match created {
                    Ok(mut f) => {
                        use tokio::io::AsyncWriteExt as _;
                        f.write_all(digest(&id).as_bytes())
                            .await
                            .map_err(|e| Error::io(&owner, e))?;
                        Ok(id)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Err(Error::Conflict(format!(
                            "a multi-part upload named {name} is in progress: give its upload_id (returned with its first part) to add to it, or use another name"
                        )))
                    }
                    Err(e) => Err(Error::io(&owner, e)),
                }
            }
            UploadId::Given(id) => {
                let known = tokio::fs::read_to_string(&owner).await.unwrap_or_default();
                let given = digest(id);
                if shipperd_model::same_secret(known.as_bytes(), given.as_bytes()) {
                    Ok(id.to_string())
                } else {
                    Err(Error::Conflict(format!(
                        "upload_id does not match the multi-part upload {name} (it belongs to another client, or it expired): nothing was kept"
                    )))
                }
            }
        }
    }

    /// Completes the multi-part upload `name` of `parts` parts: they become one bundle,
    /// read as their concatenation in part order. Its id is the sha256 of the list of
    /// part checksums (`shipperd-parts-v1`, then `<sha256> <size>` per part).
    pub async fn complete(
        &self,
        name: &str,
        upload_id: &str,
        parts: u32,
        origin: &Origin,
    ) -> Result<Accepted> {
        validate_name(name)?;
        let dir = self.upload_dir(name);
        self.own(name, &dir, UploadId::Given(upload_id)).await?;
        if !(1..=MAX_PARTS).contains(&parts) {
            return Err(Error::BadPart(format!(
                "parts={parts} is outside 1..={MAX_PARTS}"
            )));
        }
        let mut list = String::from("shipperd-parts-v1\n");
        let mut size = 0u64;
        for n in 1..=parts {
            let sum = tokio::fs::read_to_string(dir.join(SUMS_DIR).join(format!("{n:06}")))
                .await
                .map_err(|_| Error::BadPart(format!("part {n} of {name} has not been uploaded")))?;
            let bytes: u64 = sum
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            size += bytes;
            list.push_str(&sum);
        }
        // Exactly parts 1..N become the bundle: a part beyond them is refused by name
        // (it would otherwise be read as part of the bundle; nothing is lost).
        let mut extra = Vec::new();
        let mut entries = tokio::fs::read_dir(&dir)
            .await
            .map_err(|e| Error::io(&dir, e))?;
        while let Ok(Some(e)) = entries.next_entry().await {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = shipperd_bundle::parts::part_number(&name)
                && n > parts
            {
                extra.push(n);
            }
        }
        if !extra.is_empty() {
            extra.sort();
            let list: Vec<String> = extra.iter().map(u32::to_string).collect();
            return Err(Error::Conflict(format!(
                "{name} has part {} beyond parts={parts}: complete it with the right number of \
                 parts, or start a new upload (nothing was kept as a bundle)",
                list.join(", ")
            )));
        }
        let id = BundleId::from_sha256(&Sha256::digest(list.as_bytes()).into());
        let rel = DataDir::bundle_parts_rel(&id);
        let dest = self.data.bundle_parts(&id);
        let meta = Meta {
            name: name.to_string(),
            size,
            path: rel.clone(),
            target: origin.target.clone(),
            owner: origin.owner.clone(),
            uploader: origin.uploader.clone(),
        };
        if !tokio::fs::try_exists(&dest).await.unwrap_or(false) {
            self.write_meta(&id, &meta).await?;
            let _ = tokio::fs::remove_dir_all(dir.join(SUMS_DIR)).await;
            let _ = tokio::fs::remove_file(dir.join(OWNER)).await;
            tokio::fs::rename(&dir, &dest)
                .await
                .map_err(|e| Error::io(&dest, e))?;
        } else {
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        self.record(&id, &meta).await
    }

    /// Writes `bundles/<id>/meta.json` (creating the bundle's directory).
    async fn write_meta(&self, id: &BundleId, meta: &Meta) -> Result<()> {
        let dir = self.data.bundle_dir(id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::io(&dir, e))?;
        let path = self.data.meta(id);
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec(meta).expect("meta serialises");
        tokio::fs::write(&tmp, body)
            .await
            .map_err(|e| Error::io(&tmp, e))?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|e| Error::io(&path, e))
    }

    /// What `bundles/<id>/meta.json` says, if it is there and whole.
    pub async fn read_meta(&self, id: &BundleId) -> Option<Meta> {
        let raw = tokio::fs::read(self.data.meta(id)).await.ok()?;
        serde_json::from_slice(&raw).ok()
    }

    /// Takes in a file that is already on this machine (the drop directory): hashed in
    /// place, then moved into the store.
    pub async fn receive_file(
        &self,
        name: &str,
        path: &Path,
        expected: Option<&BundleId>,
        origin: &Origin,
    ) -> Result<Accepted> {
        validate_name(name)?;
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Error::io(path, e))?;
        let (id, size) = self.hash_file(&mut file, path).await?;
        check_expected(expected.map(BundleId::as_str), id.as_str())?;
        // The bytes are the user's only copy: on failure they go back, never away (a
        // crash leaves them `.taken`, and the next start puts them back).
        let mut tmp = self.taken_file(name);
        if let Err(e) = tokio::fs::rename(path, &tmp.path).await {
            if e.kind() != std::io::ErrorKind::CrossesDevices {
                return Err(Error::io(path, e));
            }
            // The drop directory is on another filesystem: copy, then remove the original.
            tmp.keep = false;
            tokio::fs::copy(path, &tmp.path)
                .await
                .map_err(|e| Error::io(path, e))?;
            tokio::fs::remove_file(path)
                .await
                .map_err(|e| Error::io(path, e))?;
            tmp.keep = true;
        }
        let back = Back::Path(path.to_path_buf());
        self.keep_taken(name, tmp, id, size, origin, &back).await
    }

    /// Takes in a file opened beneath a directory by descriptor (a `path` source): read
    /// through its descriptor, then moved out of the directory held open (by name, as
    /// the only way there is) and checked to be the very file that was read: a file or
    /// symbolic link swapped in meanwhile is put back, and nothing is taken.
    pub async fn receive_opened(
        &self,
        name: &str,
        opened: Opened,
        expected: Option<&BundleId>,
        origin: &Origin,
    ) -> Result<Accepted> {
        use rustix::fs::{AtFlags, OFlags};
        validate_name(name)?;
        let Opened {
            file,
            dir,
            leaf,
            shown,
        } = opened;
        let shown = Path::new(&shown);
        let read = rustix::fs::fstat(&file).map_err(|e| Error::io(shown, e.into()))?;
        let mut file = tokio::fs::File::from_std(file);
        let (id, size) = self.hash_file(&mut file, shown).await?;
        check_expected(expected.map(BundleId::as_str), id.as_str())?;
        let tmp = self.taken_file(name);
        let tmp_dir = rustix::fs::open(
            &self.tmp,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| Error::io(&self.tmp, e.into()))?;
        let tmp_leaf = tmp.path.file_name().expect("a file name").to_owned();
        rustix::fs::renameat(&dir, &leaf, &tmp_dir, &tmp_leaf).map_err(|e| match e {
            rustix::io::Errno::XDEV => Error::BadRequest(format!(
                "{}: the import directory must be on the data volume (it is moved into \
                 the store, not copied)",
                shown.display()
            )),
            e => Error::io(shown, e.into()),
        })?;
        let moved = rustix::fs::statat(&tmp_dir, &tmp_leaf, AtFlags::SYMLINK_NOFOLLOW);
        if moved.map_or(true, |m| (m.st_dev, m.st_ino) != (read.st_dev, read.st_ino)) {
            let _ = rustix::fs::renameat(&tmp_dir, &tmp_leaf, &dir, &leaf);
            return Err(Error::BadRequest(format!(
                "{} was replaced while it was read (a file or link swapped in): it was put \
                 back, and nothing was taken",
                shown.display()
            )));
        }
        let back = Back::At { dir, leaf };
        self.keep_taken(name, tmp, id, size, origin, &back).await
    }

    /// Reads a file through, hashing it; its id and size. Empty files and files over
    /// the limit are refused.
    async fn hash_file(&self, file: &mut tokio::fs::File, shown: &Path) -> Result<(BundleId, u64)> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).await.map_err(|e| Error::io(shown, e))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > self.max_bytes {
                return Err(Error::TooLarge {
                    limit: self.max_bytes,
                });
            }
            hasher.update(&buf[..n]);
        }
        if size == 0 {
            return Err(Error::Empty);
        }
        Ok((hash_id(hasher), size))
    }

    /// Stores a file taken into the temp directory (`tmp`) as bundle `id` and records
    /// it; on failure the file goes `back` where it came from, never away.
    async fn keep_taken(
        &self,
        name: &str,
        mut tmp: TempFile,
        id: BundleId,
        size: u64,
        origin: &Origin,
        back: &Back,
    ) -> Result<Accepted> {
        let meta = Meta::file(name, size, &id, origin);
        let dest = match self.place(&mut tmp, &id, &meta).await {
            Ok(dest) => dest,
            Err(e) => {
                back.restore(&tmp.path).await;
                return Err(e);
            }
        };
        match self.record(&id, &meta).await {
            Ok(a) => {
                // Known already: the stored copy stays, this one goes.
                tmp.keep = dest.is_some();
                metrics().bytes_received.inc_by(size);
                Ok(a)
            }
            Err(e) => {
                // Put the file back where the user left it, to be taken again later.
                back.restore(dest.as_deref().unwrap_or(&tmp.path)).await;
                Err(e)
            }
        }
    }

    /// The largest bundle taken in.
    pub(crate) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Moves a complete, hashed temp file into place and records the bundle.
    pub(crate) async fn commit(
        &self,
        name: &str,
        mut tmp: TempFile,
        id: BundleId,
        size: u64,
        origin: &Origin,
    ) -> Result<Accepted> {
        let meta = Meta::file(name, size, &id, origin);
        self.place(&mut tmp, &id, &meta).await?;
        self.record(&id, &meta).await
    }

    /// Moves the temp file to `bundles/<id>/bundle` (its `meta.json` first); returns
    /// that path if it moved it there (`None`: the same bytes were stored already, and
    /// the temp file is dropped).
    async fn place(
        &self,
        tmp: &mut TempFile,
        id: &BundleId,
        meta: &Meta,
    ) -> Result<Option<PathBuf>> {
        let dest = self.data.bundle_file(id);
        if tokio::fs::try_exists(&dest).await.unwrap_or(false) {
            return Ok(None);
        }
        self.write_meta(id, meta).await?;
        tokio::fs::rename(&tmp.path, &dest)
            .await
            .map_err(|e| Error::io(&dest, e))?;
        tmp.keep = true;
        Ok(Some(dest))
    }

    /// Creates the bundle's summary and announces it (or finds the existing one).
    pub async fn record(&self, id: &BundleId, meta: &Meta) -> Result<Accepted> {
        let mut summary = BundleSummary::new(
            id.clone(),
            meta.name.clone(),
            meta.size,
            meta.path.clone(),
            meta.target.clone(),
        );
        summary.owner = meta.owner.clone();
        summary.uploader = meta.uploader.clone();
        let name = meta.name.as_str();
        if self.state.create(&summary).await? {
            tracing::info!(bundle_id = %id, name, size = meta.size, "bundle received");
            metrics().bundles_received.inc();
            self.announce(&summary).await?;
            return Ok(Accepted {
                summary,
                created: true,
            });
        }
        let mut existing = self
            .known(id)
            .await?
            .ok_or_else(|| shipperd_bus::Error::NotFound(id.to_string()))?;
        if existing.expired_at.is_some() {
            // Its files had expired; they are back.
            if let Some(((), s)) = self
                .state
                .update(id, |s| s.expired_at.take().map(|_| ()))
                .await?
            {
                existing = s;
            }
        }
        if existing.phase == Phase::Received {
            // Possibly a crash between the summary and its event last time: the event is
            // de-duplicated by id if it did go out.
            self.announce(&existing).await?;
        }
        tracing::info!(bundle_id = %id, name, "bundle already known");
        Ok(Accepted {
            summary: existing,
            created: false,
        })
    }

    /// Sends `bundle.received` for `s` (its generation's and re-drive's).
    pub async fn announce(&self, s: &BundleSummary) -> Result<()> {
        self.executor
            .perform(s, &Effects::of([Effect::Announce]))
            .await?;
        Ok(())
    }

    /// The executor of state transitions' effects.
    pub fn executor(&self) -> &Executor {
        &self.executor
    }
}
