//! Leader election against a fake API server holding one Lease (optimistic concurrency
//! on `resourceVersion`, as the real one): of two replicas only one leads, the other
//! takes over when the leader stops renewing or hands the lease back.

// Tests wait for servers, clients and clocks in every way; the rule that every wait has
// a name (clippy.toml) is for the product's code.
#![allow(clippy::disallowed_methods)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response};
use kube::{Api, client::Body};
use serde_json::{Value, json};
use shipperd_operator::leader::{Elector, Settings};
use tokio_util::sync::CancellationToken;

type Shared = Arc<Mutex<Option<Value>>>;

/// A client whose API server keeps `lease` (shared by every client made from it).
fn client(lease: Shared) -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (method, path) = (req.method().to_string(), req.uri().path().to_string());
            let body = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let mut held = lease.lock().unwrap();
            let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                  "reason": "Conflict", "code": 409, "message": "conflict"});
            let (status, answer) = match (method.as_str(), held.as_mut()) {
                ("GET", Some(l)) => (200, l.clone()),
                ("GET", None) => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
                ("POST", Some(_)) => (409, conflict),
                ("POST", None) => {
                    let mut l = body;
                    l["metadata"]["resourceVersion"] = json!("1");
                    *held = Some(l.clone());
                    (201, l)
                }
                ("PUT", Some(l))
                    if l["metadata"]["resourceVersion"] == body["metadata"]["resourceVersion"] =>
                {
                    let rv: u64 = l["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    let mut next = body;
                    next["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
                    *l = next.clone();
                    (200, next)
                }
                ("PUT", _) => (409, conflict),
                _ => (405, json!({})),
            };
            assert!(path.contains("/leases"), "{method} {path}");
            drop(held);
            send.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    kube::Client::new(service, "ns")
}

fn elector(lease: &Shared, me: &str) -> Elector {
    let mut s = Settings::new("shipperd-operator", me);
    s.lease_duration = Duration::from_secs(1);
    s.renew_deadline = Duration::from_millis(700);
    s.retry_period = Duration::from_millis(100);
    Elector::new(Api::namespaced(client(lease.clone()), "ns"), s)
}

fn holder(lease: &Shared) -> Option<String> {
    lease.lock().unwrap().as_ref()?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test]
async fn one_replica_leads_and_another_takes_over_an_expired_lease() {
    let lease = Shared::default();
    let (a, b) = (elector(&lease, "a"), elector(&lease, "b"));
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert!(!b.try_acquire_or_renew().await.unwrap());
    assert!(a.try_acquire_or_renew().await.unwrap(), "renewed");
    assert!(!b.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&lease).as_deref(), Some("a"));
    // `a` dies: its lease expires, `b` takes it; `a` cannot take it back.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(b.try_acquire_or_renew().await.unwrap());
    assert!(!a.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&lease).as_deref(), Some("b"));
    let l = lease.lock().unwrap().clone().unwrap();
    assert_eq!(l["spec"]["leaseTransitions"], 1);
}

#[tokio::test]
async fn only_the_leader_acts_and_a_graceful_stop_hands_over_at_once() {
    let lease = Shared::default();
    let acting: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let most = Arc::new(Mutex::new(0usize));
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for me in ["a", "b"] {
        let e = elector(&lease, me);
        let stop = CancellationToken::new();
        let (acting, most, s) = (acting.clone(), most.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            e.run(s, move |lead| {
                let (acting, most) = (acting.clone(), most.clone());
                async move {
                    {
                        let mut a = acting.lock().unwrap();
                        a.push(me);
                        let mut m = most.lock().unwrap();
                        *m = (*m).max(a.len());
                    }
                    lead.cancelled().await;
                    acting.lock().unwrap().retain(|x| *x != me);
                }
            })
            .await
        }));
        stops.push(stop);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let first = {
        let a = acting.lock().unwrap();
        assert_eq!(a.len(), 1, "one leader: {a:?}");
        a[0]
    };
    assert_eq!(holder(&lease).as_deref(), Some(first));
    // The leader stops gracefully: it hands the lease back, the other leads at once
    // (well before the lease would have expired).
    let i = if first == "a" { 0 } else { 1 };
    stops[i].cancel();
    tasks.remove(i).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = acting.lock().unwrap().clone();
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second[0], first);
    assert_eq!(*most.lock().unwrap(), 1, "never two leaders at once");
    for s in &stops {
        s.cancel();
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A holder whose clock is an hour behind (its `renewTime` looks long expired) keeps
/// its lease while it renews: expiry is judged on the watcher's own clock, from when
/// the lease last changed. Once it stops renewing, the lease is taken after one
/// duration.
#[tokio::test]
async fn a_holder_with_a_skewed_clock_keeps_its_lease_while_it_renews() {
    let lease = Shared::default();
    let b = elector(&lease, "b");
    let skewed = |rv: u64| {
        let an_hour_ago =
            k8s_openapi::jiff::Timestamp::now() - std::time::Duration::from_secs(3600);
        json!({ "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": { "name": "shipperd-operator", "namespace": "ns",
                              "resourceVersion": rv.to_string() },
                "spec": { "holderIdentity": "a", "leaseDurationSeconds": 1,
                          "renewTime": an_hour_ago.to_string() } })
    };
    // `a` renews every 300 ms for 2.5 s, its clock an hour behind.
    for rv in 1..=8 {
        *lease.lock().unwrap() = Some(skewed(rv));
        assert!(
            !b.try_acquire_or_renew().await.unwrap(),
            "taken from a live holder at {rv}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(holder(&lease).as_deref(), Some("a"));
    // `a` stops: after one lease duration without a change, `b` takes it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(b.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&lease).as_deref(), Some("b"));
}
