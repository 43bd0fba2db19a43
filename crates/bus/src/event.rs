//! Events: protobuf bodies with CloudEvents attributes in NATS headers (the CloudEvents
//! NATS protocol binding, binary mode), `traceparent` beside them, and `Nats-Msg-Id` equal
//! to the CloudEvents id so that a retried publish is de-duplicated by JetStream.

use async_nats::HeaderMap;
use bytes::Bytes;
use serde_json::Value;
use shipperd_model::now_rfc3339;
use shipperd_proto::v1;

use crate::{Error, MessageId, Result, subjects::EVENT_SOURCE};

/// CloudEvents spec version we speak.
pub const SPEC_VERSION: &str = "1.0";
/// Content type of event bodies on NATS.
pub const PROTOBUF_CONTENT_TYPE: &str = "application/protobuf";

/// Every event ShipperD emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    BundleReceived,
    BundleUnpacked,
    ImagePublished,
    ImageFailed,
    ImageProgress,
    BundlePublished,
    BundleFailed,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::BundleReceived,
        EventKind::BundleUnpacked,
        EventKind::ImagePublished,
        EventKind::ImageFailed,
        EventKind::ImageProgress,
        EventKind::BundlePublished,
        EventKind::BundleFailed,
    ];

    /// The CloudEvents `type`, e.g. `io.shipperd.bundle.received`.
    pub fn type_name(self) -> &'static str {
        match self {
            EventKind::BundleReceived => "io.shipperd.bundle.received",
            EventKind::BundleUnpacked => "io.shipperd.bundle.unpacked",
            EventKind::ImagePublished => "io.shipperd.image.published",
            EventKind::ImageFailed => "io.shipperd.image.failed",
            EventKind::ImageProgress => "io.shipperd.image.progress",
            EventKind::BundlePublished => "io.shipperd.bundle.published",
            EventKind::BundleFailed => "io.shipperd.bundle.failed",
        }
    }

    /// The type without its `io.shipperd.` prefix, e.g. `bundle.received`.
    pub fn short_name(self) -> &'static str {
        self.type_name().trim_start_matches("io.shipperd.")
    }

    /// The NATS subject, e.g. `shipperd.events.bundle.received`.
    pub fn subject(self) -> String {
        format!("shipperd.events.{}", self.short_name())
    }

    pub fn from_type_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.type_name() == name)
    }

    /// Decodes a protobuf body of this kind into JSON (the webhook `data`).
    pub fn body_to_json(self, body: &[u8]) -> Result<Value> {
        fn conv<M: prost::Message + Default + serde::Serialize>(b: &[u8]) -> Result<Value> {
            let m = M::decode(b).map_err(Error::decode("event body"))?;
            serde_json::to_value(m).map_err(Error::decode("event body"))
        }
        match self {
            EventKind::BundleReceived => conv::<v1::BundleReceived>(body),
            EventKind::BundleUnpacked => conv::<v1::BundleUnpacked>(body),
            EventKind::ImagePublished => conv::<v1::ImagePublished>(body),
            EventKind::ImageFailed => conv::<v1::ImageFailed>(body),
            EventKind::ImageProgress => conv::<v1::ImageProgress>(body),
            EventKind::BundlePublished => conv::<v1::BundlePublished>(body),
            EventKind::BundleFailed => conv::<v1::BundleFailed>(body),
        }
    }
}

/// Builds the NATS headers of an outgoing event (trace context included).
/// The CloudEvents id is the message id, so a webhook sees one `webhook-id` for a
/// logical event however often it was published.
pub fn event_headers(kind: EventKind, msg_id: &MessageId) -> HeaderMap {
    let id = msg_id.to_string();
    let mut h = HeaderMap::new();
    h.insert("ce-specversion", SPEC_VERSION);
    h.insert("ce-id", id.as_str());
    h.insert("ce-source", EVENT_SOURCE);
    h.insert("ce-type", kind.type_name());
    h.insert("ce-subject", msg_id.bundle().as_str());
    h.insert("ce-time", now_rfc3339().as_str());
    h.insert("content-type", PROTOBUF_CONTENT_TYPE);
    h.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
    crate::trace::inject(&mut h);
    h
}

/// An event read back from NATS.
#[derive(Debug, Clone)]
pub struct IncomingEvent {
    pub kind: EventKind,
    pub id: String,
    pub time: String,
    pub subject: String,
    pub data: Bytes,
    /// W3C trace context of the work that sent it (`traceparent`, `tracestate`).
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl IncomingEvent {
    /// Reads the CloudEvents attributes from the headers of a NATS message.
    pub fn parse(headers: Option<&HeaderMap>, payload: Bytes) -> Result<Self> {
        let bad = |reason: &str| Error::decode("event headers")(reason.to_string());
        let h = headers.ok_or_else(|| bad("no headers"))?;
        let get = |name: &str| h.get(name).map(|v| v.as_str().to_string());
        let ty = get("ce-type").ok_or_else(|| bad("no ce-type"))?;
        let kind =
            EventKind::from_type_name(&ty).ok_or_else(|| bad(&format!("unknown type {ty}")))?;
        Ok(IncomingEvent {
            kind,
            id: get("ce-id").ok_or_else(|| bad("no ce-id"))?,
            time: get("ce-time").unwrap_or_default(),
            subject: get("ce-subject").unwrap_or_default(),
            data: payload,
            traceparent: get("traceparent"),
            tracestate: get("tracestate").filter(|s| !s.is_empty()),
        })
    }

    pub fn decode<M: prost::Message + Default>(&self) -> Result<M> {
        M::decode(self.data.as_ref()).map_err(Error::decode("event body"))
    }

    /// The event as a CloudEvents JSON document (structured mode), with the
    /// distributed-tracing extension attributes (`traceparent`, `tracestate`) when the
    /// event carries a trace context.
    pub fn to_cloudevent_json(&self) -> Result<Value> {
        let mut v = serde_json::json!({
            "specversion": SPEC_VERSION,
            "id": self.id,
            "source": EVENT_SOURCE,
            "type": self.kind.type_name(),
            "subject": self.subject,
            "time": self.time,
            "datacontenttype": "application/json",
            "data": self.kind.body_to_json(&self.data)?,
        });
        if let Some(t) = &self.traceparent {
            v["traceparent"] = Value::String(t.clone());
        }
        if let Some(t) = &self.tracestate {
            v["tracestate"] = Value::String(t.clone());
        }
        Ok(v)
    }
}

/// Encodes a message for the bus.
pub fn encode(m: &impl prost::Message) -> Bytes {
    Bytes::from(m.encode_to_vec())
}
