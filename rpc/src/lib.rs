//! # quicx: RPC over QUIC, in the spirit of rpcx
//!
//! quicx is a remote procedure call framework for Rust built on QUIC (quinn + rustls). It keeps
//! the vocabulary of Go's rpcx — services registered by name, `send_message`, `XClient` with
//! discovery, selectors and fail modes — and uses what QUIC gives for free:
//!
//! - **Calls** each travel on their own bidirectional QUIC stream: thousands run concurrently on
//!   one connection with no head-of-line blocking between them. Payloads are serde values,
//!   postcard-encoded by default. Calls carry metadata and a deadline, may be oneway, and fail
//!   with a typed [`Error`].
//! - **Server push** (rpcx's bidirectional mode): the server keeps each connected client as a
//!   [`Connection`] handle, can bind it to a client identity, and pushes messages on
//!   server-opened unidirectional streams. A client receives them on a bounded channel with an
//!   explicit full-channel policy. A slow push consumer never delays call replies.
//! - **Reverse calls**: a client registers services like a server does, and the server calls
//!   them through the connection handle — a device behind NAT needs no server of its own.
//!
//! ## A call
//!
//! ```
//! use quicx::{Client, ClientTls, Context, DevCertificate, Server, Service};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Args { a: i64, b: i64 }
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Reply { c: i64 }
//!
//! # #[tokio::main] async fn main() -> quicx::Result<()> {
//! let dev = DevCertificate::localhost()?;
//! let server = Server::builder().dev_certificate(&dev).build()?;
//! server.register("Arith", Service::new().method("Mul", |_ctx: Context, args: Args| async move {
//!     Ok(Reply { c: args.a * args.b })
//! }));
//! let addr = server.bind("127.0.0.1:0").await?;
//!
//! let client = Client::builder()
//!     .tls(ClientTls::new().trust(dev.certificate()))
//!     .server_name("localhost")
//!     .connect(&addr.to_string())
//!     .await?;
//! let reply: Reply = client.call("Arith", "Mul", &Args { a: 10, b: 20 }).await?;
//! assert_eq!(reply, Reply { c: 200 });
//! # client.close().await; server.shutdown(std::time::Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```
//!
//! ## Server push and reverse calls
//!
//! A client that declares an identity and passes a push channel can be reached by the server at
//! any time; a client that registers services can be called by it.
//!
//! ```
//! use quicx::{
//!     Authenticator, Client, ClientTls, Context, DevCertificate, Hello, Metadata, Refusal, Server,
//!     Service, push_channel,
//! };
//!
//! # #[tokio::main] async fn main() -> quicx::Result<()> {
//! let dev = DevCertificate::localhost()?;
//! // Device ids bind only when verified: here a token per device.
//! let devices = Authenticator::new(|hello: Hello| async move {
//!     match hello.token.as_deref() {
//!         Some("device-7-secret") if hello.client_id == "device-7" => Ok(hello.client_id),
//!         _ => Err(Refusal::Unauthenticated("unknown device".into())),
//!     }
//! });
//! let server = Server::builder().dev_certificate(&dev).authenticator(devices).build()?;
//! let addr = server.bind("127.0.0.1:0").await?.to_string();
//!
//! let (tx, mut pushes) = push_channel(16);
//! let device = Client::builder()
//!     .tls(ClientTls::new().trust(dev.certificate()))
//!     .server_name("localhost")
//!     .client_id("device-7")
//!     .token("device-7-secret")
//!     .push_channel(tx)
//!     .register("Device", Service::new().method("Battery", |_ctx: Context, (): ()| async move {
//!         Ok(87u8)
//!     }))
//!     .connect(&addr)
//!     .await?;
//!
//! // Push to the device by its id; it arrives on the channel.
//! server.send_to_client("device-7", "Command", "Reboot", Metadata::new(), b"now").await?;
//! let msg = pushes.recv().await.expect("a push");
//! assert_eq!((msg.service_method.as_str(), &msg.payload[..]), ("Reboot", &b"now"[..]));
//!
//! // Call the device back over the connection it opened.
//! let conn = server.client("device-7").expect("bound by its hello");
//! let battery: u8 = conn.call("Device", "Battery", &()).await?;
//! assert_eq!(battery, 87);
//! # device.close().await; server.shutdown(std::time::Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```
//!
//! ## Discovery, selectors and fail modes
//!
//! An [`XClient`] calls a service whose endpoints a [`discovery`] lists (peer-to-peer, a static
//! list, mDNS), choosing one per call with a [`SelectMode`] and handling transport failures with
//! a [`FailMode`]:
//!
//! ```
//! use quicx::{ClientOption, ClientTls, Context, DevCertificate, FailMode, SelectMode, Server, Service, XClient};
//! use quicx::discovery::{Endpoint, MultipleServersDiscovery};
//!
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! let dev = DevCertificate::localhost()?;
//! let mut endpoints = Vec::new();
//! let mut servers = Vec::new();
//! for _ in 0..2 {
//!     let server = Server::builder().dev_certificate(&dev).build()?;
//!     server.register("Arith", Service::new().method("Mul", |_ctx: Context, (a, b): (i64, i64)| async move {
//!         Ok(a * b)
//!     }));
//!     let addr = server.bind("127.0.0.1:0").await?;
//!     endpoints.push(Endpoint::parse(&addr.to_string())?.with_server_name("localhost"));
//!     servers.push(server);
//! }
//! let option = ClientOption::with_tls(ClientTls::new().trust(dev.certificate()));
//! let discovery = MultipleServersDiscovery::new(endpoints);
//! let xclient = XClient::new("Arith", FailMode::Failover, SelectMode::RoundRobin, discovery, option)?;
//!
//! servers[0].shutdown(std::time::Duration::ZERO).await; // one server dies
//! let product: i64 = xclient.call("Mul", &(10i64, 20i64)).await?; // failover to the other
//! assert_eq!(product, 200);
//! # xclient.close().await;
//! # Ok(()) }
//! ```
//!
//! ## How streams are used
//!
//! Everything rides QUIC streams of one connection per client and server; nothing is
//! multiplexed by hand:
//!
//! | what | stream | opened by |
//! |---|---|---|
//! | a call, a hello | bidirectional: request frame, then response frame | client |
//! | a reverse call, a push with receipt | bidirectional | server |
//! | a push | unidirectional: one frame | server |
//!
//! A frame is a 5-byte prefix, a postcard header and the payload to the end of the stream, so a
//! slow or cancelled call never blocks another, and cancelling is resetting one stream. While
//! calls wait on a silent peer, empty QUIC DATAGRAM frames probe it (see
//! [`TransportOptions::unresponsive_timeout`]). `docs/PROTOCOL.md` specifies every byte.
//!
//! ## Errors
//!
//! Every failure is a variant of [`Error`], one per failure a caller handles differently:
//! [`Error::UnknownService`], [`Error::UnknownMethod`], [`Error::Decode`], [`Error::TooLarge`],
//! [`Error::DeadlineExceeded`], [`Error::ConnectTimeout`], [`Error::PushTimeout`],
//! [`Error::PeerUnresponsive`], [`Error::Remote`] (the handler's own [`ServiceError`] with its
//! code and message), [`Error::ConnectionLost`] (with quinn's typed cause),
//! [`Error::Handshake`], [`Error::HelloRefused`], ... Fail modes retry only transport errors
//! ([`Error::is_transport`]); a handler's error is returned at once. Wire codes are typed
//! ([`StreamCode`], [`CloseCode`], [`status`]).
//!
//! ## Security
//!
//! TLS 1.3 is always on and certificates are verified. [`DevCertificate`] generates a
//! self-signed certificate at run time for examples and tests; real deployments load PEM files
//! ([`ServerTls::from_pem_files`], [`ClientTls::trust_pem_file`]). Client certificates (mTLS)
//! are verified against a CA and the certificate's common name becomes the client identity. The
//! only way to skip verification is [`ClientTls::insecure_skip_server_verification`].
//! [`Server::enable_admin`] serves the admin service (connected clients, pushes, counters; what
//! the `quicx` command-line tool calls) to the identities it names, and to no one else.
//!
//! ## Non-goals
//!
//! - **Not a transport for arbitrary streams.** One request and one response per call; a large
//!   transfer is a payload (up to [`Limits::max_payload_size`]), not a byte stream.
//! - **No reflection, no IDL.** Services are Rust closures over serde types; other languages
//!   speak the documented wire format (JSON payloads make that easy).
//! - **No exactly-once calls.** A call that fails with a transport error may or may not have
//!   run; fail modes retry such calls, so make retried methods idempotent (or use
//!   [`FailMode::Failfast`]).
//! - **No coordination protocol of its own.** Discovery plugs in ([`discovery`]); agreement
//!   belongs to existing engines.
//!
//! ## Common issues
//!
//! - **`Error::Handshake` on connect**: the client does not trust the server's certificate, or
//!   the name differs. Pass the certificate ([`ClientTls::trust`]) and the name it carries
//!   ([`ClientBuilder::server_name`], or [`Endpoint::with_server_name`](discovery::Endpoint::with_server_name)).
//! - **A handler that blocks**: an async handler must not block its thread
//!   (`std::thread::sleep`, blocking I/O): its first two calls run on the connection's I/O thread
//!   and hold the other connections of that thread until they return (later calls of the method
//!   move to the handler pool). Register blocking code with [`Service::blocking_method`].
//! - **A oneway call or a push "got lost" at exit**: they return once handed to QUIC. Close the
//!   client with [`Client::close`] (which waits until the close was sent) rather than dropping
//!   it, and use a normal call or [`Connection::send_message_with_receipt`] when delivery
//!   matters.
//! - **Calls wait the whole deadline on a dead server**: the liveness probes need DATAGRAM
//!   support on both sides (quicx has it); with
//!   [`TransportOptions::unresponsive_timeout`] set to `None` only the idle timeout (15 s)
//!   notices a killed peer.
//! - **`Error::WrongSide`**: pushes go from a server to its clients only; a client calls.
//!
//! The wire protocol is specified in `docs/PROTOCOL.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

mod admin;
mod auth;
mod client;
mod codec;
mod config;
mod connection;
mod context;
mod durable;
mod error;
mod events;
mod failmode;
mod intercept;
mod io;
mod limits;
mod metadata;
pub mod metrics;
mod push;
mod selector;
mod server;
mod service;
mod stats;
mod sync;
mod tls;
pub mod trace;
mod wire;
mod xclient;

pub use crate::{
    admin::ADMIN_SERVICE,
    auth::{Authenticator, CallAuthorizer, Hello, Refusal, TOKEN_METADATA_KEY},
    client::{Client, ClientBuilder, ClientEndpoint},
    codec::Codec,
    config::TransportOptions,
    connection::{CallOptions, Connection, RawReply},
    context::Context,
    durable::{
        DurableBacklog, DurableLimits, Fsync, MSG_ID_KEY, MSG_PREV_KEY, MSG_REDELIVERED_KEY,
        MSG_SPACE_KEY, Overflow, PendingMessage, msg_space,
    },
    error::{Error, FramePart, HandshakeError, NotConnected, ProtocolError, Result, ServiceError},
    events::{ClientEvent, DisconnectReason, ServerEvent},
    failmode::FailMode,
    intercept::{CallInterceptor, CallOutcome, Interceptor, OutgoingCall},
    io::Placement,
    limits::AbuseLimits,
    metadata::Metadata,
    push::{
        FullPolicy, PushMessage, PushReceiver, PushSender, push_channel, push_channel_with,
        push_handler,
    },
    selector::{
        Candidate, ConsistentHash, LatencyBased, RandomSelect, RoundRobin, SelectInfo, SelectMode,
        Selector, WeightedRoundRobin,
    },
    server::{PushResult, Server, ServerBuilder, WeakServer},
    service::Service,
    stats::Stats,
    tls::{
        ClientTls, DevCertificate, DevCertificateAuthority, PeerIdentity, ServerTls,
        load_certificates_pem, load_private_key_pem,
    },
    wire::{ALPN, ALPN_V2, CloseCode, Limits, StreamCode, status},
    xclient::{ClientOption, XClient, XClientBuilder},
};

/// The wire decoders, for the fuzzer (`cargo xtask fuzz`). Not part of the API.
#[doc(hidden)]
pub mod fuzz {
    pub use crate::wire::{fuzz_decoders, fuzz_seeds};
}
pub use bytes::Bytes;
pub use quicx_discovery as discovery;
