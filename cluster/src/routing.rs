//! The routing service nodes call on each other (`quicx.Cluster`): push to, call, and broadcast
//! to the devices a node holds. Every request carries the cluster secret; a request without it
//! is refused with `UNAUTHENTICATED` before anything else happens.

use std::time::Duration;

use quicx::{
    Bytes, CallOptions, Codec, Connection, Context, Error, Metadata, Server, Service, ServiceError,
    status,
};
use serde::{Deserialize, Serialize};

/// The service name nodes route through.
pub const ROUTING_SERVICE: &str = "quicx.Cluster";

/// The metadata key that carries the cluster secret on routing requests.
pub const SECRET_METADATA_KEY: &str = "quicx-cluster-secret";

/// Why the node that was asked could not deliver to a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DeviceFailure {
    /// The device is not connected to that node (any more).
    pub(crate) offline: bool,
    /// `quicx::Error::kind` of what the device (or its connection) answered.
    pub(crate) kind: String,
    /// The status code the device answered with, for errors that have one.
    pub(crate) code: Option<u32>,
    pub(crate) message: String,
}

impl DeviceFailure {
    fn offline(client_id: &str) -> Self {
        Self {
            offline: true,
            kind: "not_connected".into(),
            code: None,
            message: format!("`{client_id}` is not connected here"),
        }
    }

    fn from_error(e: &Error) -> Self {
        let offline = matches!(e, Error::NotConnected(_) | Error::ConnectionLost(_));
        let code = match e {
            Error::Remote { code, .. } => Some(*code),
            _ => None,
        };
        let message = match e {
            Error::Remote { message, .. } => message.clone(),
            other => other.to_string(),
        };
        Self {
            offline,
            kind: e.kind().to_owned(),
            code,
            message,
        }
    }
}

/// A push to route.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PushRequest {
    pub(crate) client_id: String,
    pub(crate) service_path: String,
    pub(crate) service_method: String,
    pub(crate) metadata: Metadata,
    pub(crate) data: Vec<u8>,
    pub(crate) receipt: bool,
}

/// A reverse call to route.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct CallRequest {
    pub(crate) client_id: String,
    pub(crate) service_path: String,
    pub(crate) service_method: String,
    pub(crate) metadata: Metadata,
    pub(crate) payload: Vec<u8>,
    pub(crate) codec: u8,
    pub(crate) timeout_ms: u64,
}

/// A broadcast to the devices of one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BroadcastRequest {
    pub(crate) service_path: String,
    pub(crate) service_method: String,
    pub(crate) metadata: Metadata,
    pub(crate) data: Vec<u8>,
    pub(crate) timeout_ms: u64,
}

pub(crate) type Routed<T> = Result<T, DeviceFailure>;

/// The routing service of a node that serves `server`'s devices. It holds the server weakly
/// (it is registered on it).
pub(crate) fn service(server: &Server, secret: std::sync::Arc<str>) -> Service {
    let service = Service::new();
    let service = routed(
        service,
        "Push",
        server,
        &secret,
        |server, req: PushRequest| async move { push_here(&server, req).await },
    );
    let service = routed(
        service,
        "Call",
        server,
        &secret,
        |server, req: CallRequest| async move { call_here(&server, req).await },
    );
    let service = routed(
        service,
        "PushBatch",
        server,
        &secret,
        |server, reqs: Vec<PushRequest>| async move {
            futures_util::future::join_all(reqs.into_iter().map(|req| {
                let server = server.clone();
                async move { push_here(&server, req).await }
            }))
            .await
        },
    );
    routed(
        service,
        "Broadcast",
        server,
        &secret,
        |server, req: BroadcastRequest| async move { broadcast_here(&server, req).await },
    )
}

/// Adds a routing method: the secret is checked before the request is even decoded (postcard,
/// whatever codec the caller named), then `f` runs with the server.
fn routed<Q, R, F, Fut>(
    service: Service,
    name: &str,
    server: &Server,
    secret: &std::sync::Arc<str>,
    f: F,
) -> Service
where
    Q: serde::de::DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    F: Fn(Server, Q) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = R> + Send + 'static,
{
    let weak = server.downgrade();
    let secret = secret.clone();
    service.raw_method(name, move |ctx: Context, payload: Bytes| {
        let (server, f) = (admit(&ctx, &secret, weak.upgrade()), f.clone());
        async move {
            let server = server?;
            let request: Q = Codec::Postcard
                .decode(&payload)
                .map_err(|e| ServiceError::new(status::DECODE_ERROR, e.to_string()))?;
            Codec::Postcard
                .encode(&f(server, request).await)
                .map_err(|e| ServiceError::new(status::ENCODE_ERROR, e.to_string()))
        }
    })
}

/// Checks the cluster secret (in constant time) and that the server is still there.
fn admit(ctx: &Context, secret: &str, server: Option<Server>) -> Result<Server, ServiceError> {
    let given = ctx.metadata().get(SECRET_METADATA_KEY).unwrap_or_default();
    if !constant_time_eq(given.as_bytes(), secret.as_bytes()) {
        tracing::warn!(
            remote = %ctx.conn().remote_address(),
            "routing request without the cluster secret: refused"
        );
        return Err(ServiceError::new(
            status::UNAUTHENTICATED,
            "routing requests need the cluster secret",
        ));
    }
    server.ok_or_else(|| ServiceError::new(status::SHUTTING_DOWN, "node shutting down"))
}

/// Whether `a == b`, in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The newest connection of `client_id` on this node.
fn device(server: &Server, client_id: &str) -> Routed<Connection> {
    server
        .client(client_id)
        .ok_or_else(|| DeviceFailure::offline(client_id))
}

pub(crate) async fn push_here(server: &Server, req: PushRequest) -> Routed<()> {
    let conn = device(server, &req.client_id)?;
    let result = if req.receipt {
        conn.send_message_with_receipt(
            &req.service_path,
            &req.service_method,
            req.metadata,
            &req.data,
        )
        .await
    } else {
        conn.send_message(
            &req.service_path,
            &req.service_method,
            req.metadata,
            &req.data,
        )
        .await
    };
    result.map_err(|e| DeviceFailure::from_error(&e))
}

pub(crate) async fn call_here(server: &Server, req: CallRequest) -> Routed<Vec<u8>> {
    let conn = device(server, &req.client_id)?;
    let mut options = CallOptions::new().codec(Codec::from_wire(req.codec).unwrap_or_default());
    options.metadata = req.metadata;
    if req.timeout_ms > 0 {
        options.timeout = Some(Duration::from_millis(req.timeout_ms));
    }
    conn.call_raw(
        &req.service_path,
        &req.service_method,
        &req.payload,
        &options,
    )
    .await
    .map(|reply| reply.payload.to_vec())
    .map_err(|e| DeviceFailure::from_error(&e))
}

pub(crate) async fn broadcast_here(
    server: &Server,
    req: BroadcastRequest,
) -> Vec<(String, Routed<()>)> {
    // Only bound devices: a broadcast reports per device identity.
    let conns: Vec<Connection> = server
        .connections()
        .into_iter()
        .filter(|c| c.client_id().is_some())
        .collect();
    let timeout = Duration::from_millis(req.timeout_ms.max(1));
    match server
        .broadcast_to(
            conns,
            &req.service_path,
            &req.service_method,
            req.metadata,
            &req.data,
            timeout,
        )
        .await
    {
        Ok(results) => results
            .into_iter()
            .map(|r| {
                let id = r.conn.client_id().unwrap_or_default();
                (id, r.result.map_err(|e| DeviceFailure::from_error(&e)))
            })
            .collect(),
        Err(e) => {
            tracing::warn!("broadcast could not be encoded: {e}");
            Vec::new()
        }
    }
}

/// The reply payload of a routed call, decoded.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(payload: &Bytes) -> Result<T, Error> {
    Codec::Postcard.decode(payload)
}
