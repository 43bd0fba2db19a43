//! `--auth kubernetes`: a bearer token is checked with a TokenReview, and its user must be
//! allowed (SubjectAccessReview) to act on `bundles.shipperd.io` in the namespace: `get`
//! to read, `delete` to delete, `create` for everything else. So
//! `curl -H "Authorization: Bearer $(oc whoami -t)"` works for a user with that right.
//!
//! Answers are cached for a short time per token digest (30 s for an allowed user, 5 s
//! for a refused one) so a busy client does not send two reviews per request. The caches
//! are bounded and forget the least recently used first; approvals and refusals are kept
//! apart, so a flood of made-up tokens (each a refusal) never pushes out the approvals of
//! real users (and the gate limits failed authentications per client address before a
//! review is asked for). When the API server cannot be asked, the request is refused
//! (503), never let through.

use std::{
    num::NonZeroUsize,
    sync::Mutex,
    time::{Duration, Instant},
};

use lru::LruCache;

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::api::{Api, PostParams};

/// The group and resource a user must have rights on.
pub const GROUP: &str = "shipperd.io";
pub const RESOURCE: &str = "bundles";

const ALLOWED_FOR: Duration = Duration::from_secs(30);
const REFUSED_FOR: Duration = Duration::from_secs(5);
const MAX_CACHED: usize = 4096;
/// Reviews under way at once (a flood of made-up tokens reaches the API server at this
/// pace), and the time one may take.
const MAX_ASKING: usize = 8;
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the API server said of a token, for one verb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The user (the token review's username) may.
    Allowed { user: String },
    /// Not a valid token.
    Unauthenticated,
    /// A known user without the right.
    Forbidden { user: String },
    /// The API server could not be asked.
    Unavailable(String),
}

/// A token's digest and the verb asked for.
type Key = ([u8; 32], &'static str);

pub struct Review {
    client: kube::Client,
    namespace: String,
    /// Verdicts, with when they were given: approvals, and apart from them refusals.
    allowed: Mutex<LruCache<Key, (Instant, String)>>,
    refused: Mutex<LruCache<Key, (Instant, Verdict)>>,
    asking: tokio::sync::Semaphore,
}

impl Review {
    pub fn new(client: kube::Client, namespace: String) -> Self {
        Review {
            client,
            namespace,
            allowed: Mutex::new(LruCache::new(cached())),
            refused: Mutex::new(LruCache::new(cached())),
            asking: tokio::sync::Semaphore::new(MAX_ASKING),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The user of the token whose SHA-256 is `digest`, if the Kubernetes API allowed
    /// it `verb` within the approvals' lifetime (nothing is asked).
    pub fn approved(&self, digest: [u8; 32], verb: &'static str) -> Option<String> {
        let mut allowed = self.allowed.lock().expect("not poisoned");
        let (at, user) = allowed.get(&(digest, verb))?;
        (at.elapsed() < ALLOWED_FOR).then(|| user.clone())
    }

    /// May the holder of `token` (its SHA-256 `digest`) do `verb` on bundles?
    pub async fn check(&self, token: &str, digest: [u8; 32], verb: &'static str) -> Verdict {
        let key = (digest, verb);
        if let Some((at, user)) = self.allowed.lock().expect("not poisoned").get(&key)
            && at.elapsed() < ALLOWED_FOR
        {
            return Verdict::Allowed { user: user.clone() };
        }
        if let Some((at, v)) = self.refused.lock().expect("not poisoned").get(&key)
            && at.elapsed() < REFUSED_FOR
        {
            return v.clone();
        }
        let v = match tokio::time::timeout(ASK_TIMEOUT, async {
            let _turn = self.asking.acquire().await;
            self.ask(token, verb).await
        })
        .await
        {
            Ok(v) => v,
            Err(_) => Verdict::Unavailable(format!(
                "the Kubernetes API did not review the token within {}s",
                ASK_TIMEOUT.as_secs()
            )),
        };
        match &v {
            Verdict::Allowed { user } => {
                self.allowed
                    .lock()
                    .expect("not poisoned")
                    .put(key, (Instant::now(), user.clone()));
            }
            Verdict::Unauthenticated | Verdict::Forbidden { .. } => {
                self.refused
                    .lock()
                    .expect("not poisoned")
                    .put(key, (Instant::now(), v.clone()));
            }
            Verdict::Unavailable(_) => {}
        }
        v
    }

    async fn ask(&self, token: &str, verb: &'static str) -> Verdict {
        let unavailable = |e: kube::Error| {
            tracing::warn!(error = %e, "cannot review a token with the Kubernetes API; refusing the request");
            Verdict::Unavailable(format!(
                "cannot check the token with the Kubernetes API: {e}"
            ))
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviewed = match Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
        {
            Ok(r) => r,
            Err(e) => return unavailable(e),
        };
        let status = reviewed.status.unwrap_or_default();
        let Some(user) = status.user.filter(|_| status.authenticated == Some(true)) else {
            return Verdict::Unauthenticated;
        };
        let name = user.username.clone().unwrap_or_default();
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                uid: user.uid,
                groups: user.groups,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(self.namespace.clone()),
                    verb: Some(verb.to_string()),
                    group: Some(GROUP.to_string()),
                    resource: Some(RESOURCE.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        match Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &access)
            .await
        {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {
                Verdict::Allowed { user: name }
            }
            Ok(_) => Verdict::Forbidden { user: name },
            Err(e) => unavailable(e),
        }
    }
}

fn cached() -> NonZeroUsize {
    NonZeroUsize::new(MAX_CACHED).expect("not zero")
}
