//! A `Bundle`'s `url` and `path` sources: fetched (or taken from the namespace's import
//! directory) into the store in a task of their own; the reconciler is woken when one
//! ends.

use kube::{ResourceExt as _, runtime::reflector::ObjectRef};
use shipperd_model::TargetName;
use shipperd_store::FetchSource;

use super::{Context, Fetch, parse_id};
use crate::{crd::Bundle, error::Error};

/// Starts fetching a `url` source in a task of its own.
pub(crate) async fn start_fetch(
    b: &Bundle,
    url: &crate::crd::UrlSource,
    target: Option<&TargetName>,
    uid: &str,
    ctx: &Context,
) -> Result<(), Error> {
    // The CA to trust for an https URL, from its ConfigMap or Secret.
    let ca_pem = match &url.ca {
        None => None,
        Some(ca) => {
            let ns = b.namespace().unwrap_or_default();
            match crate::targets::key_of(&ctx.client, &ns, ca)
                .await
                .map_err(|e| Error::Invalid(e.to_string()))?
            {
                Ok(pem) => Some(pem),
                Err(p) => {
                    ctx.set_fetch(uid, Fetch::Failed(format!("the URL's CA: {}", p.message)));
                    return Ok(());
                }
            }
        }
    };
    let source = FetchSource {
        url: url.url.clone(),
        sha256: parse_id(&url.sha256)?,
        ca_pem,
        owner: b.namespace(),
    };
    let target = target.cloned();
    let name = b.name_any();
    ctx.set_fetch(uid, Fetch::Running);
    let (store, settings, uid) = (ctx.store.clone(), ctx.fetch.clone(), uid.to_string());
    let done = ctx.fetches.clone();
    let (wake, me) = (ctx.wake.clone(), ObjectRef::from_obj(b));
    tokio::spawn(async move {
        let outcome = store
            .fetch(&name, &source, target.as_ref(), &settings)
            .await;
        let state = match outcome {
            Ok(a) => Fetch::Done(a.summary.id),
            Err(e) => {
                tracing::warn!(bundle = %name, error = %e, "fetching the bundle failed");
                Fetch::Failed(e.to_string())
            }
        };
        done.lock().expect("not poisoned").insert(uid, state);
        let _ = wake.send(me);
    });
    Ok(())
}

/// Takes a `path` source (a file in the import directory) into the store, in a task of
/// its own: hashed in place, then moved in (as the drop directory does). The path is
/// relative to the import directory; `..`, absolute paths and symbolic links anywhere
/// on the way are refused (the file is opened beneath the directory with no link
/// followed), and a wrong `sha256` does not tell the file's real one.
pub(crate) fn start_take(
    b: &Bundle,
    src: &crate::crd::PathSource,
    target: Option<&TargetName>,
    uid: &str,
    ctx: &Context,
) -> Result<(), Error> {
    let ns = b.namespace().unwrap_or_default();
    let file = match confined(&ctx.import_dir, &ns, &src.path) {
        Ok(file) => file,
        Err(why) => {
            ctx.set_fetch(uid, Fetch::Failed(why));
            return Ok(());
        }
    };
    let expected = src.sha256.as_deref().map(parse_id).transpose()?;
    let name = b.name_any();
    let origin = shipperd_store::Origin {
        target: target.cloned(),
        owner: b.namespace(),
        uploader: None,
    };
    ctx.set_fetch(uid, Fetch::Running);
    let (store, uid, done) = (ctx.store.clone(), uid.to_string(), ctx.fetches.clone());
    let (wake, me) = (ctx.wake.clone(), ObjectRef::from_obj(b));
    tokio::spawn(async move {
        let state = match store
            .receive_opened(&name, file, expected.as_ref(), &origin)
            .await
        {
            Ok(a) => Fetch::Done(a.summary.id),
            Err(shipperd_store::Error::ChecksumMismatch { .. }) => {
                Fetch::Failed("the file's sha256 is not the one given; it was not taken".into())
            }
            Err(e) => {
                tracing::warn!(bundle = %name, error = %e, "taking the bundle's file failed");
                Fetch::Failed(e.to_string())
            }
        };
        done.lock().expect("not poisoned").insert(uid, state);
        let _ = wake.send(me);
    });
    Ok(())
}

/// `rel` under `dir/<ns>` (a namespace takes only what was staged for it), when it
/// stays there: relative, no `..`, and no symbolic link on the way, a regular file;
/// opened once, by descriptor (its directory with `openat2(RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS)`, then the file in it the same way), so what is read and moved
/// is what was checked. Else why not, in words for the status.
pub fn confined(
    dir: &std::path::Path,
    ns: &str,
    rel: &str,
) -> Result<shipperd_store::Opened, String> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let p = std::path::Path::new(rel);
    let plain = !rel.is_empty()
        && !p.is_absolute()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Err(format!(
            "path {rel:?} must be relative to the import directory, without `..`"
        ));
    }
    let beneath = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let why = |e: rustix::io::Errno| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => format!(
            "path {rel:?} goes through a symbolic link; links are not followed in the import \
             directory"
        ),
        rustix::io::Errno::NOENT => format!(
            "path {rel:?} is not in the import directory of namespace {ns} ({}/{ns})",
            dir.display()
        ),
        e => format!("path {rel:?} cannot be opened: {e}"),
    };
    let base = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        format!(
            "the import directory {} cannot be opened: {e}",
            dir.display()
        )
    })?;
    let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mine = rustix::fs::openat2(&base, ns, dir_flags, Mode::empty(), beneath).map_err(why)?;
    let (parent, leaf) = match (p.parent(), p.file_name()) {
        (Some(up), Some(leaf)) if !up.as_os_str().is_empty() => (
            rustix::fs::openat2(&mine, up, dir_flags, Mode::empty(), beneath).map_err(why)?,
            leaf,
        ),
        (_, Some(leaf)) => (mine, leaf),
        _ => return Err(format!("path {rel:?} names no file")),
    };
    let f = rustix::fs::openat2(
        &parent,
        leaf,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
        Mode::empty(),
        beneath,
    )
    .map_err(why)?;
    let st = rustix::fs::fstat(&f).map_err(|e| format!("path {rel:?}: {e}"))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(format!("path {rel:?} is not a regular file"));
    }
    Ok(shipperd_store::Opened {
        file: std::fs::File::from(f),
        dir: parent,
        leaf: leaf.to_owned(),
        shown: format!("{}/{ns}/{rel}", dir.display()),
    })
}
