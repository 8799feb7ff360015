//! The admin service: the connected clients, pushes to one of them, the durable store's
//! backlogs, and the server's counters, for the identities a server names. What the `quicx`
//! command-line tool's `clients`, `push`, `durable`, `cancel` and `stats` call.

use std::{collections::BTreeMap, collections::HashSet, sync::Arc};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{
    Codec, Context, Metadata, Server, Service, ServiceError, server::WeakServer, wire::status,
};

/// The service path of the admin service (see [`Server::enable_admin`]).
pub const ADMIN_SERVICE: &str = "quicx.Admin";

impl Server {
    /// Serves the admin service, [`ADMIN_SERVICE`] (`quicx.Admin`), to the connections bound to
    /// one of `identities`; any other caller is refused before anything runs. The admin service
    /// is off until this is called; calling it again replaces the set of identities (an empty
    /// set refuses everyone).
    ///
    /// # Who may call it
    /// A connection whose verified identity ([`Connection::client_id`](crate::Connection::client_id):
    /// its mTLS certificate's name, or the id its hello declared and the
    /// [`Authenticator`](crate::Authenticator) verified) is in `identities`. A connection with no
    /// identity gets status `UNAUTHENTICATED` ([`Error::Unauthenticated`](crate::Error::Unauthenticated)),
    /// one with another identity `PERMISSION_DENIED`
    /// ([`Error::PermissionDenied`](crate::Error::PermissionDenied)).
    ///
    /// **On a server built with
    /// [`insecure_accept_unverified_client_ids`](crate::ServerBuilder::insecure_accept_unverified_client_ids)
    /// identities are not verified: any client can claim an admin identity.** Enable one or the
    /// other.
    ///
    /// # Methods
    /// The admin service speaks JSON: call it with [`Codec::Json`]. Arguments of `Clients` and
    /// `Stats` are ignored (send `null`).
    ///
    /// | method | arguments | reply |
    /// |---|---|---|
    /// | `Clients` | – | `[{"id":3,"remote_address":"10.0.0.7:50412","client_id":"device-7","rtt_ms":1.25}, ..]`: every open connection (the caller's too), ordered by [`Connection::id`](crate::Connection::id); `client_id` is `null` for a connection without identity; `rtt_ms` is QUIC's current estimate |
    /// | `Push` | `{"client_id":"device-7","service_path":"Command","service_method":"Reboot","payload":{"delay_s":5},"metadata":{"k":"v"}}` (`payload` defaults to `null`, `metadata` to none) | `null`, once the push was handed to QUIC |
    /// | `Durable` | `null` or `{"limit":20}` | `{"identities":3,"largest":[{"bytes":3000,"identity":"device-7","messages":10}, ..],"pending":12,"pending_bytes":3400}`: the durable store's totals and its `limit` (default 20, at most 1,000) largest backlogs, most first ([`durable_backlog`](Self::durable_backlog)); the totals and the list are read one after the other, so under load they may differ by what changed in between |
    /// | `Durable` | `{"client_id":"device-7"}` (and `"limit"`: the oldest that many) | `[{"expires_in_ms":59000,"id":41,"service_method":"Reboot","service_path":"Command","size":14}, ..]`: that identity's pending messages, oldest first ([`durable_pending`](Self::durable_pending)) |
    /// | `CancelDurable` | `{"client_id":"device-7","id":41}` | `true` if it was pending and is now cancelled, `false` if not pending ([`cancel_durable`](Self::cancel_durable)) |
    /// | `Stats` | – | the [`Stats`](crate::Stats) counters as an object: `{"calls_served":12,"open_connections":2, ..}`, one field per counter, named as in `Stats`, taken while the call runs: `calls_served` counts this call |
    ///
    /// `Push` sends `payload`'s JSON text as the push's bytes to the connection bound to
    /// `client_id`, with the contract of [`send_to_client`](Self::send_to_client): the reply
    /// comes once the message is handed to QUIC, not when the device read it. When the push
    /// fails — no client bound to that id (the peer is gone), the push timed out, the connection
    /// was lost — the call fails with [`Error::Remote`](crate::Error::Remote) code
    /// [`ServiceError::APPLICATION`] and a message naming the cause. Arguments that are not the
    /// object above fail with `DECODE_ERROR` ([`Error::Decode`](crate::Error::Decode)).
    ///
    /// The service holds no strong reference to the server: it does not keep a dropped server
    /// alive.
    ///
    /// ```
    /// use quicx::{
    ///     ADMIN_SERVICE, Authenticator, CallOptions, Client, ClientTls, Codec, DevCertificate,
    ///     Error, Hello, Refusal, Server,
    /// };
    /// use serde::Deserialize;
    ///
    /// #[derive(Deserialize)]
    /// struct ClientRow { id: u64, client_id: Option<String> }
    ///
    /// # #[tokio::main] async fn main() -> quicx::Result<()> {
    /// let dev = DevCertificate::localhost()?;
    /// let server = Server::builder()
    ///     .dev_certificate(&dev)
    ///     .authenticator(Authenticator::new(|hello: Hello| async move {
    ///         match hello.token.as_deref() {
    ///             Some("ops-secret") if hello.client_id == "ops" => Ok(hello.client_id),
    ///             _ => Err(Refusal::Unauthenticated("unknown token".into())),
    ///         }
    ///     }))
    ///     .build()?;
    /// server.enable_admin(["ops"]);
    /// let addr = server.bind("127.0.0.1:0").await?.to_string();
    ///
    /// let json = CallOptions::new().codec(Codec::Json);
    /// let ops = Client::builder()
    ///     .tls(ClientTls::new().trust(dev.certificate()))
    ///     .client_id("ops")
    ///     .token("ops-secret")
    ///     .connect(&addr)
    ///     .await?;
    /// let clients: Vec<ClientRow> = ops.call_with(ADMIN_SERVICE, "Clients", &(), &json).await?;
    /// assert!(clients.iter().any(|c| c.client_id.as_deref() == Some("ops")));
    ///
    /// // A client without an admin identity is refused.
    /// let anonymous = Client::builder()
    ///     .tls(ClientTls::new().trust(dev.certificate()))
    ///     .connect(&addr)
    ///     .await?;
    /// let refused = anonymous.call_raw(ADMIN_SERVICE, "Stats", b"null", &json).await;
    /// assert!(matches!(refused, Err(Error::Unauthenticated(_))));
    /// # ops.close().await; anonymous.close().await;
    /// # server.shutdown(std::time::Duration::from_secs(1)).await;
    /// # Ok(()) }
    /// ```
    pub fn enable_admin<I, S>(&self, identities: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let admin = Arc::new(Admin {
            server: self.downgrade(),
            identities: identities.into_iter().map(Into::into).collect(),
        });
        let clients = admin.clone();
        let push = admin.clone();
        let durable = admin.clone();
        let cancel = admin.clone();
        let stats = admin;
        self.register(
            ADMIN_SERVICE,
            Service::new()
                .raw_method("Clients", move |ctx: Context, _args: Bytes| {
                    let admin = clients.clone();
                    async move { json(&client_rows(&admin.authorize(&ctx)?)) }
                })
                .raw_method("Push", move |ctx: Context, args: Bytes| {
                    let push = push.clone();
                    async move { push.push(&ctx, &args).await }
                })
                .raw_method("Durable", move |ctx: Context, args: Bytes| {
                    let admin = durable.clone();
                    async move { admin.durable(&ctx, &args).await }
                })
                .raw_method("CancelDurable", move |ctx: Context, args: Bytes| {
                    let admin = cancel.clone();
                    async move { admin.cancel_durable(&ctx, &args).await }
                })
                .raw_method("Stats", move |ctx: Context, _args: Bytes| {
                    let admin = stats.clone();
                    async move { json(&stats_object(&admin.authorize(&ctx)?)) }
                }),
        );
    }
}

/// The admin service's state: who may call it, and the server it reports on.
struct Admin {
    server: WeakServer,
    identities: HashSet<String>,
}

/// One row of `Clients`.
#[derive(Serialize)]
struct ClientRow {
    id: u64,
    remote_address: String,
    client_id: Option<String>,
    rtt_ms: f64,
}

/// The arguments of `Push`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushArgs {
    client_id: String,
    service_path: String,
    service_method: String,
    #[serde(default)]
    payload: serde_json::Value,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// The arguments of `Durable` (all optional: `null` is no arguments).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DurableArgs {
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

/// The arguments of `CancelDurable`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelArgs {
    client_id: String,
    id: u64,
}

/// Most backlogs `Durable` lists.
const MAX_BACKLOGS: usize = 1_000;

/// One pending message in `Durable`'s reply.
#[derive(Serialize)]
struct PendingRow {
    id: u64,
    service_path: String,
    service_method: String,
    size: usize,
    expires_in_ms: u64,
}

/// A store failure (or no store) as the admin service answers it.
fn store_failure(e: crate::Error) -> ServiceError {
    ServiceError::new(ServiceError::APPLICATION, e.to_string())
}

impl Admin {
    async fn durable(&self, ctx: &Context, args: &[u8]) -> Result<Bytes, ServiceError> {
        let server = self.authorize(ctx)?;
        let args: Option<DurableArgs> = decode(args)?;
        let args = args.unwrap_or_default();
        if let Some(client_id) = args.client_id {
            let now = std::time::SystemTime::now();
            let rows: Vec<PendingRow> = server
                .durable_pending(&client_id)
                .await
                .map_err(store_failure)?
                .into_iter()
                .take(args.limit.unwrap_or(usize::MAX))
                .map(|m| PendingRow {
                    id: m.id,
                    service_path: m.service_path,
                    service_method: m.service_method,
                    size: m.size,
                    expires_in_ms: m
                        .expires_at
                        .duration_since(now)
                        .map_or(0, |d| d.as_millis() as u64),
                })
                .collect();
            return json(&rows);
        }
        let largest = server
            .durable_backlog(args.limit.unwrap_or(20).min(MAX_BACKLOGS))
            .map_err(store_failure)?;
        let s = server.stats();
        json(&serde_json::json!({
            "pending": s.durable_pending,
            "pending_bytes": s.durable_pending_bytes,
            "identities": s.durable_pending_identities,
            "largest": largest,
        }))
    }

    async fn cancel_durable(&self, ctx: &Context, args: &[u8]) -> Result<Bytes, ServiceError> {
        let server = self.authorize(ctx)?;
        let args: CancelArgs = decode(args)?;
        let cancelled = server
            .cancel_durable(&args.client_id, args.id)
            .await
            .map_err(store_failure)?;
        json(&cancelled)
    }

    /// The server, if the caller holds an admin identity; the refusal otherwise.
    fn authorize(&self, ctx: &Context) -> Result<Server, ServiceError> {
        match ctx.conn().client_id() {
            Some(id) if self.identities.contains(&id) => {}
            Some(id) => {
                return Err(ServiceError::status(
                    status::PERMISSION_DENIED,
                    format!("`{id}` is not an admin identity"),
                ));
            }
            None => {
                return Err(ServiceError::status(
                    status::UNAUTHENTICATED,
                    "the admin service needs a verified admin identity; this connection has none",
                ));
            }
        }
        self.server
            .upgrade()
            .ok_or_else(|| ServiceError::status(status::SHUTTING_DOWN, "the server is gone"))
    }

    async fn push(&self, ctx: &Context, args: &[u8]) -> Result<Bytes, ServiceError> {
        let server = self.authorize(ctx)?;
        let args: PushArgs = decode(args)?;
        let payload = json(&args.payload)?;
        let mut metadata = Metadata::new();
        for (key, value) in args.metadata {
            metadata.insert(key, value);
        }
        server
            .send_to_client(
                &args.client_id,
                &args.service_path,
                &args.service_method,
                metadata,
                payload,
            )
            .await
            .map_err(|e| {
                ServiceError::new(
                    ServiceError::APPLICATION,
                    format!("push to `{}` failed: {e}", args.client_id),
                )
            })?;
        json(&())
    }
}

/// Every open connection, oldest first.
fn client_rows(server: &Server) -> Vec<ClientRow> {
    let mut rows: Vec<ClientRow> = server
        .connections()
        .into_iter()
        .map(|conn| ClientRow {
            id: conn.id(),
            remote_address: conn.remote_address().to_string(),
            client_id: conn.client_id(),
            // Microsecond precision: a loopback RTT is well below a millisecond.
            rtt_ms: conn.rtt().as_micros() as f64 / 1000.0,
        })
        .collect();
    rows.sort_by_key(|row| row.id);
    rows
}

/// The server's counters as a JSON object, one field per [`Stats`](crate::Stats) field.
fn stats_object(server: &Server) -> serde_json::Value {
    let s = server.stats();
    serde_json::json!({
        "calls_sent": s.calls_sent,
        "call_errors": s.call_errors,
        "calls_served": s.calls_served,
        "call_handler_errors": s.call_handler_errors,
        "pushes_sent": s.pushes_sent,
        "push_errors": s.push_errors,
        "connections": s.connections,
        "open_connections": s.open_connections,
        "auth_failures": s.auth_failures,
        "buffered_request_bytes": s.buffered_request_bytes,
        "durable_pending": s.durable_pending,
        "durable_pending_bytes": s.durable_pending_bytes,
        "durable_pending_identities": s.durable_pending_identities,
        "durable_delivered": s.durable_delivered,
        "durable_redelivered": s.durable_redelivered,
        "durable_expired": s.durable_expired,
        "durable_overflowed": s.durable_overflowed,
    })
}

/// The JSON arguments of an admin call; `DECODE_ERROR` when they are not what it takes.
fn decode<T: serde::de::DeserializeOwned>(args: &[u8]) -> Result<T, ServiceError> {
    Codec::Json
        .decode(args)
        .map_err(|e| ServiceError::status(status::DECODE_ERROR, e.to_string()))
}

/// A reply in JSON.
fn json<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, ServiceError> {
    Codec::Json
        .encode(value)
        .map_err(|e| ServiceError::status(status::ENCODE_ERROR, e.to_string()))
}
