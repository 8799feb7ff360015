//! The systems under test: quicx, raw quinn (the transport's limit), tonic and tarpc, each with
//! the same echo service, and, where they have one, a way to push.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::StreamExt;
use quicx::{CallOptions, Context, DevCertificate, Metadata, Server, Service};
use serde::{Deserialize, Serialize};

use crate::load::{BoxFuture, Caller};

pub(crate) mod pb {
    #![allow(
        unreachable_pub,
        missing_debug_implementations,
        clippy::all,
        missing_docs
    )]
    tonic::include_proto!("echo");
}

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
pub(crate) enum System {
    /// quicx with default settings.
    Quicx,
    /// quicx with an authenticator (token), a per-call authorizer and per-connection and
    /// per-identity call rates installed (set too high to refuse): their per-call cost.
    QuicxSecured,
    /// quicx with metrics off on server and client (`.metrics(false)`): the baseline of the
    /// metrics' per-call cost.
    QuicxNoMetrics,
    /// quicx with the Prometheus recorder installed (`quicx::metrics::install_prometheus` on a
    /// loopback port), so its series record into it: in the two-process layout the server's
    /// process installs it (the client's too with `--prometheus-client`); in one process, both
    /// sides record. A recorder is process-wide, so no `quicx`/`quicx-secured` in that run.
    QuicxPrometheus,
    /// quinn, stream per call, same transport settings as quicx.
    Quinn,
    /// tonic unary gRPC over HTTP/2, plaintext.
    Tonic,
    /// tonic with rustls TLS.
    TonicTls,
    /// tarpc, bincode over TCP, plaintext.
    Tarpc,
    /// tarpc over rustls TLS.
    TarpcTls,
}

impl System {
    /// Every system, in report order.
    pub(crate) const ALL: [Self; 9] = [
        Self::Quicx,
        Self::QuicxSecured,
        Self::QuicxNoMetrics,
        Self::QuicxPrometheus,
        Self::Quinn,
        Self::Tonic,
        Self::TonicTls,
        Self::Tarpc,
        Self::TarpcTls,
    ];

    /// The systems of a run without `--system`: all but the metrics A/B variants, which are
    /// selected explicitly (`quicx-prometheus` needs the two-process layout).
    pub(crate) fn default_set() -> Vec<Self> {
        Self::ALL
            .into_iter()
            .filter(|s| !matches!(s, Self::QuicxNoMetrics | Self::QuicxPrometheus))
            .collect()
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Quicx => "quicx",
            Self::QuicxSecured => "quicx + auth, authorizer, rate limits",
            Self::QuicxNoMetrics => "quicx, metrics off",
            Self::QuicxPrometheus => "quicx + Prometheus recorder",
            Self::Quinn => "raw quinn",
            Self::Tonic => "tonic h2",
            Self::TonicTls => "tonic h2+TLS",
            Self::Tarpc => "tarpc tcp",
            Self::TarpcTls => "tarpc tcp+TLS",
        }
    }

    /// Whether the system can push from server to client.
    pub(crate) fn pushes(self) -> bool {
        matches!(
            self,
            Self::Quicx
                | Self::QuicxNoMetrics
                | Self::QuicxPrometheus
                | Self::Quinn
                | Self::TonicTls
        )
    }
}

/// Server work done by one call of the handler-cpu and blocking scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Work {
    /// The handler (an ordinary async handler) burns this many µs of CPU: a busy loop.
    Spin(u64),
    /// The handler (an ordinary async handler) blocks its thread this many ms.
    Sleep(u64),
    /// The handler blocks this many ms, registered as a blocking handler (quicx's
    /// `Service::blocking_method`; the other systems have no such registration).
    SleepBlocking(u64),
}

/// Burns `micros` µs of the calling thread's CPU time (wall time where that clock cannot be
/// read): what the handler-cpu handlers do. CPU time, so that a handler preempted meanwhile
/// still costs its server the whole burn.
pub(crate) fn burn(micros: u64) {
    use nix::time::{ClockId, clock_gettime};
    let cpu = || clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map(Duration::from);
    let burn = Duration::from_micros(micros);
    if let Ok(start) = cpu() {
        while cpu().is_ok_and(|now| now < start + burn) {
            std::hint::spin_loop();
        }
        return;
    }
    let end = Instant::now() + burn;
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

/// Blocks the calling thread for `millis` ms: what the blocking handlers do.
fn block(millis: u64) {
    std::thread::sleep(Duration::from_millis(millis));
}

/// What a client needs to reach a server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ServerInfo {
    pub(crate) system: System,
    pub(crate) addr: SocketAddr,
    pub(crate) cert_pem: String,
    pub(crate) cert_der: Vec<u8>,
}

fn dev() -> DevCertificate {
    DevCertificate::localhost().expect("dev certificate")
}

const BUFFER: usize = 4 * 1024 * 1024;

/// Starts the server of `system` on 127.0.0.1 in the current runtime.
pub(crate) async fn serve(system: System) -> anyhow::Result<ServerInfo> {
    let dev = dev();
    let addr = match system {
        System::Quicx | System::QuicxSecured | System::QuicxNoMetrics | System::QuicxPrometheus => {
            serve_quicx(&dev, system).await?
        }
        System::Quinn => serve_quinn(&dev)?,
        System::Tonic | System::TonicTls => serve_tonic(&dev, system == System::TonicTls).await?,
        System::Tarpc | System::TarpcTls => serve_tarpc(&dev, system == System::TarpcTls).await?,
    };
    Ok(ServerInfo {
        system,
        addr,
        cert_pem: dev.certificate_pem().to_owned(),
        cert_der: dev.certificate().to_vec(),
    })
}

// ------------------------------------------------------------------------- quicx

/// Installs the Prometheus recorder of quicx (`quicx::metrics::install_prometheus`) as this
/// process's `metrics` recorder, serving `/metrics` on a free loopback port, which it prints to
/// stderr (`who` says which process). Call it on the runtime, before any quicx server or client is
/// built. Every quicx server and client of the process with metrics on then records into it.
pub(crate) fn install_recorder(who: &str) -> anyhow::Result<SocketAddr> {
    // A free port: bind, note it, release it (the exporter binds it again at once).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    quicx::metrics::install_prometheus(addr)?;
    eprintln!("{who}: Prometheus recorder installed, http://{addr}/metrics");
    Ok(addr)
}

#[derive(Serialize, Deserialize)]
struct PushOrder {
    count: u32,
    size: u32,
    pushers: u32,
    /// Push from tasks on the server process's application runtime (as application code calling
    /// `Server::send_to_client` does) instead of tasks the handler spawns on the I/O thread.
    from_app: bool,
}

/// `--push-from-app`: the quicx server pushes from tasks on its application runtime.
pub(crate) static PUSH_FROM_APP: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The token of the bench client of the secured quicx server.
const BENCH_TOKEN: &str = "bench-token";

/// The quicx server of `system` (one of the quicx variants). For `quicx-prometheus` the caller
/// installs the recorder first (see `install_recorder`).
async fn serve_quicx(dev: &DevCertificate, system: System) -> anyhow::Result<SocketAddr> {
    let mut builder = Server::builder()
        .dev_certificate(dev)
        .metrics(system != System::QuicxNoMetrics);
    if system == System::QuicxSecured {
        let rate = std::num::NonZeroU32::new(100_000_000);
        builder = builder
            .authenticator(quicx::Authenticator::new(
                |hello: quicx::Hello| async move {
                    match hello.token.as_deref() {
                        Some(BENCH_TOKEN) => Ok(hello.client_id),
                        _ => Err(quicx::Refusal::Unauthenticated("bad token".into())),
                    }
                },
            ))
            .authorize_calls(quicx::CallAuthorizer::new(|ctx| {
                if ctx.conn().client_id().is_some() {
                    Ok(())
                } else {
                    Err(quicx::Refusal::Unauthenticated("say hello".into()))
                }
            }))
            .abuse_limits(quicx::AbuseLimits {
                calls_per_second_per_connection: rate,
                calls_per_second_per_identity: rate,
                ..quicx::AbuseLimits::default()
            });
    }
    let server = builder.build()?;
    let broadcaster = server.clone();
    let app = tokio::runtime::Handle::current();
    server.register(
        "Bench",
        Service::new()
            .raw_method("Echo", |_ctx: Context, payload: Bytes| async move {
                Ok(payload)
            })
            // Handler-cpu: an ordinary async handler that burns CPU in its body.
            .method("Spin", |_ctx: Context, micros: u64| async move {
                burn(micros);
                Ok(micros)
            })
            // Blocking, variant (a): an ordinary async handler that blocks anyway.
            .method("Sleep", |_ctx: Context, millis: u64| async move {
                block(millis);
                Ok(millis)
            })
            // Blocking, variant (b): registered as a blocking handler.
            .blocking_method("SleepBlocking", |_ctx: Context, millis: u64| {
                block(millis);
                Ok(millis)
            })
            .method("Push", move |ctx: Context, order: PushOrder| {
                let app = app.clone();
                async move {
                    let payload = Bytes::from(vec![7u8; order.size as usize]);
                    for p in 0..order.pushers {
                        let conn = ctx.conn().clone();
                        let payload = payload.clone();
                        let n = order.count / order.pushers
                            + u32::from(p < order.count % order.pushers);
                        let sender = async move {
                            for _ in 0..n {
                                if conn
                                    .send_message("bench", "push", Metadata::new(), &payload)
                                    .await
                                    .is_err()
                                {
                                    break;
                                }
                            }
                        };
                        if order.from_app {
                            app.spawn(sender);
                        } else {
                            tokio::spawn(sender);
                        }
                    }
                    Ok(())
                }
            })
            .method("Broadcast", move |_ctx: Context, size: u32| {
                let server = broadcaster.clone();
                async move {
                    let rtt = median_micros(server.connections().iter().map(|c| c.rtt()));
                    let started = std::time::Instant::now();
                    let results = server
                        .broadcast(
                            "bench",
                            "all",
                            Metadata::new(),
                            vec![7u8; size as usize],
                            Duration::from_secs(10),
                        )
                        .await?;
                    // (pushes that succeeded, µs until `broadcast` returned, the median RTT
                    // estimate before it in µs)
                    Ok((
                        results.iter().filter(|r| r.result.is_ok()).count() as u64,
                        started.elapsed().as_micros() as u64,
                        rtt,
                    ))
                }
            }),
    );
    Ok(server.bind("127.0.0.1:0").await?)
}

/// `--client-on-caller-runtime`: quicx clients use `Placement::CallerRuntime`.
pub(crate) static CLIENT_ON_CALLER_RUNTIME: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// quicx clients on `Placement::IoThread` (`--client-on-io-thread`).
pub(crate) static CLIENT_ON_IO_THREAD: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// `--handler-one-socket`: the quicx clients of [`work_caller`] share one socket.
pub(crate) static HANDLER_ONE_SOCKET: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The one socket of `--handler-one-socket`, on a fixed port (one socket, not one per client
/// I/O thread).
fn one_socket() -> anyhow::Result<quicx::ClientEndpoint> {
    static ENDPOINT: std::sync::OnceLock<quicx::ClientEndpoint> = std::sync::OnceLock::new();
    if let Some(endpoint) = ENDPOINT.get() {
        return Ok(endpoint.clone());
    }
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let endpoint = quicx::ClientEndpoint::bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))?;
    Ok(ENDPOINT.get_or_init(|| endpoint).clone())
}

/// `--quinn-push-channel`: the raw quinn client hands each push to a task through a channel.
pub(crate) static QUINN_PUSH_CHANNEL: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// `--push-handler`: quicx clients count pushes in a `quicx::push_handler`.
pub(crate) static PUSH_HANDLER: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// A quicx client of the bench server; with `pushes`, counts pushed messages into it.
pub(crate) async fn quicx_client(
    info: &ServerInfo,
    endpoint: Option<&quicx::ClientEndpoint>,
    pushes: Option<Arc<AtomicU64>>,
) -> anyhow::Result<quicx::Client> {
    let mut builder = quicx::Client::builder()
        .tls(quicx::ClientTls::empty().trust(info.cert_der.clone().into()))
        .server_name("localhost");
    if info.system == System::QuicxSecured {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        builder = builder.client_id(format!("bench-{n}")).token(BENCH_TOKEN);
    }
    if info.system == System::QuicxNoMetrics {
        builder = builder.metrics(false);
    }
    if CLIENT_ON_CALLER_RUNTIME.load(Ordering::Relaxed) {
        builder = builder.placement(quicx::Placement::CallerRuntime);
    }
    if CLIENT_ON_IO_THREAD.load(Ordering::Relaxed) {
        builder = builder.placement(quicx::Placement::IoThread);
    }
    if let Some(endpoint) = endpoint {
        builder = builder.endpoint(endpoint);
    }
    if let Some(counter) = pushes
        .clone()
        .filter(|_| PUSH_HANDLER.load(Ordering::Relaxed))
    {
        builder = builder.push_channel(quicx::push_handler(move |_msg| {
            counter.fetch_add(1, Ordering::Relaxed);
        }));
    } else if let Some(counter) = pushes {
        let (tx, mut rx) = quicx::push_channel(1024);
        builder = builder.push_channel(tx);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    Ok(builder.connect(&info.addr.to_string()).await?)
}

/// The median of `rtts` in µs (0 for none): the servers' RTT estimates before a broadcast.
fn median_micros(rtts: impl Iterator<Item = Duration>) -> u64 {
    let mut all: Vec<u64> = rtts.map(|d| d.as_micros() as u64).collect();
    all.sort_unstable();
    all.get(all.len() / 2).copied().unwrap_or(0)
}

// ------------------------------------------------------------------------- raw quinn

const ALPN: &[u8] = b"bench";
const OP_ECHO: u8 = 0;
const OP_PUSH: u8 = 1;
const OP_BROADCAST: u8 = 2;
/// Burns the µs the request's first 8 bytes name (little-endian), as the handler-cpu handlers
/// of the other systems do, and echoes them.
const OP_SPIN: u8 = 3;

fn transport(accept_uni: bool) -> Arc<quinn::TransportConfig> {
    // The same settings quicx uses by default.
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(Duration::from_secs(15).try_into().expect("valid")));
    t.max_concurrent_bidi_streams(1024u32.into());
    t.max_concurrent_uni_streams(if accept_uni { 1024u32 } else { 0 }.into());
    Arc::new(t)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn udp_socket(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let s2 = socket2::SockRef::from(&socket);
    let _ = s2.set_recv_buffer_size(BUFFER);
    let _ = s2.set_send_buffer_size(BUFFER);
    Ok(socket)
}

fn quinn_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> anyhow::Result<quinn::Endpoint> {
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        udp_socket(addr)?,
        quinn::default_runtime().ok_or_else(|| anyhow::anyhow!("no runtime"))?,
    )?)
}

fn serve_quinn(dev: &DevCertificate) -> anyhow::Result<SocketAddr> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![dev.certificate()], dev.private_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));
    config.transport_config(transport(false));
    let endpoint = quinn_endpoint("127.0.0.1:0".parse()?, Some(config))?;
    let addr = endpoint.local_addr()?;
    let conns: Arc<Mutex<Vec<quinn::Connection>>> = Arc::default();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let conns = conns.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                conns.lock().expect("lock").push(conn.clone());
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(quinn_stream(conn.clone(), conns.clone(), send, recv));
                }
                conns
                    .lock()
                    .expect("lock")
                    .retain(|c| c.stable_id() != conn.stable_id());
            });
        }
    });
    Ok(addr)
}

async fn quinn_stream(
    conn: quinn::Connection,
    conns: Arc<Mutex<Vec<quinn::Connection>>>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Ok(request) = recv.read_to_end(16 * 1024 * 1024).await else {
        return;
    };
    let Some((&op, rest)) = request.split_first() else {
        return;
    };
    let reply: Bytes = match op {
        OP_ECHO => Bytes::copy_from_slice(rest),
        OP_SPIN if rest.len() >= 8 => {
            burn(u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")));
            Bytes::copy_from_slice(&rest[..8])
        }
        OP_PUSH if rest.len() >= 12 => {
            let word = |i: usize| u32::from_le_bytes(rest[i..i + 4].try_into().expect("4 bytes"));
            let (count, size, pushers) = (word(0), word(4), word(8).max(1));
            let payload = Bytes::from(vec![7u8; size as usize]);
            for p in 0..pushers {
                let (conn, payload) = (conn.clone(), payload.clone());
                let n = count / pushers + u32::from(p < count % pushers);
                tokio::spawn(async move {
                    for _ in 0..n {
                        let Ok(mut s) = conn.open_uni().await else {
                            break;
                        };
                        if s.write_chunk(payload.clone()).await.is_err() {
                            break;
                        }
                        let _ = s.finish();
                    }
                });
            }
            Bytes::new()
        }
        OP_BROADCAST if rest.len() >= 4 => {
            let size = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
            let payload = Bytes::from(vec![7u8; size as usize]);
            // Before the clock starts, as quicx's handler takes it.
            let rtt = median_micros(
                conns
                    .lock()
                    .expect("lock")
                    .iter()
                    .map(quinn::Connection::rtt),
            );
            let started = Instant::now();
            let all: Vec<quinn::Connection> = conns.lock().expect("lock").clone();
            // One loop of open + write + finish: queues every push at once.
            let sends = all.iter().map(|c| {
                let payload = payload.clone();
                async move {
                    let mut s = c.open_uni().await.ok()?;
                    s.write_chunk(payload).await.ok()?;
                    s.finish().ok()
                }
            });
            let ok = futures_util::future::join_all(sends)
                .await
                .iter()
                .flatten()
                .count();
            let mut reply = (ok as u64).to_le_bytes().to_vec();
            reply.extend_from_slice(&(started.elapsed().as_micros() as u64).to_le_bytes());
            reply.extend_from_slice(&rtt.to_le_bytes());
            Bytes::from(reply)
        }
        _ => return,
    };
    if send.write_chunk(reply).await.is_ok() {
        let _ = send.finish();
    }
}

/// A raw quinn client configuration trusting the bench server.
pub(crate) fn quinn_client_config(info: &ServerInfo) -> anyhow::Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(info.cert_der.clone().into())?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    config.transport_config(transport(true));
    Ok(config)
}

/// A client-side quinn endpoint.
pub(crate) fn quinn_client_endpoint() -> anyhow::Result<quinn::Endpoint> {
    quinn_endpoint("127.0.0.1:0".parse()?, None)
}

/// A raw quinn connection; with `pushes`, counts the unidirectional streams it receives.
pub(crate) async fn quinn_connect(
    info: &ServerInfo,
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    pushes: Option<Arc<AtomicU64>>,
) -> anyhow::Result<quinn::Connection> {
    let conn = endpoint
        .connect_with(config.clone(), info.addr, "localhost")?
        .await?;
    if let Some(counter) = pushes {
        let conn = conn.clone();
        let channel = QUINN_PUSH_CHANNEL.load(Ordering::Relaxed).then(|| {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
            let counter = counter.clone();
            tokio::spawn(async move {
                while rx.recv().await.is_some() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
            tx
        });
        tokio::spawn(async move {
            while let Ok(mut recv) = conn.accept_uni().await {
                let Ok(message) = recv.read_to_end(16 * 1024 * 1024).await else {
                    continue;
                };
                match &channel {
                    // As a quicx push channel takes a message: at once when there is room
                    // (no cooperative budget), waiting only when the channel is full.
                    Some(tx) => match tx.try_send(message) {
                        Ok(()) => {}
                        Err(tokio::sync::mpsc::error::TrySendError::Full(message)) => {
                            if tx.send(message).await.is_err() {
                                break;
                            }
                        }
                        Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
                    },
                    None => {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    Ok(conn)
}

/// One request on a raw quinn connection.
pub(crate) async fn quinn_request(
    conn: &quinn::Connection,
    op: u8,
    body: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut frame = Vec::with_capacity(1 + body.len());
    frame.push(op);
    frame.extend_from_slice(body);
    send.write_chunk(frame.into()).await?;
    send.finish()?;
    Ok(recv.read_to_end(16 * 1024 * 1024).await?)
}

pub(crate) fn push_order(count: u32, size: u32, pushers: u32) -> Vec<u8> {
    [count, size, pushers]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

pub(crate) const fn op_broadcast() -> u8 {
    OP_BROADCAST
}

// ------------------------------------------------------------------------- tonic

#[derive(Debug, Default)]
struct TonicEcho;

#[tonic::async_trait]
impl pb::echo_server::Echo for TonicEcho {
    async fn call(
        &self,
        request: tonic::Request<pb::Payload>,
    ) -> Result<tonic::Response<pb::Payload>, tonic::Status> {
        Ok(tonic::Response::new(request.into_inner()))
    }

    type SubscribeStream = BoxStream;

    async fn subscribe(
        &self,
        request: tonic::Request<pb::Payload>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, tonic::Status> {
        let order = request.into_inner().data;
        if order.len() < 8 {
            return Err(tonic::Status::invalid_argument("count and size"));
        }
        let count = u32::from_le_bytes(order[..4].try_into().expect("4 bytes"));
        let size = u32::from_le_bytes(order[4..8].try_into().expect("4 bytes"));
        let data = Bytes::from(vec![7u8; size as usize]);
        let stream = futures_util::stream::iter(
            (0..count).map(move |_| Ok(pb::Payload { data: data.clone() })),
        );
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn spin(
        &self,
        request: tonic::Request<pb::Work>,
    ) -> Result<tonic::Response<pb::Work>, tonic::Status> {
        let work = request.into_inner();
        burn(work.amount);
        Ok(tonic::Response::new(work))
    }

    async fn sleep(
        &self,
        request: tonic::Request<pb::Work>,
    ) -> Result<tonic::Response<pb::Work>, tonic::Status> {
        let work = request.into_inner();
        block(work.amount);
        Ok(tonic::Response::new(work))
    }
}

type BoxStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<pb::Payload, tonic::Status>> + Send>>;

async fn serve_tonic(dev: &DevCertificate, tls: bool) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut builder = tonic::transport::Server::builder();
    if tls {
        let identity =
            tonic::transport::Identity::from_pem(dev.certificate_pem(), dev.private_key_pem());
        builder =
            builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    let router = builder.add_service(pb::echo_server::EchoServer::new(TonicEcho));
    let incoming = tokio_stream_listener(listener);
    tokio::spawn(router.serve_with_incoming(incoming));
    Ok(addr)
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((next, listener))
    })
}

/// A tonic channel (one HTTP/2 connection).
pub(crate) async fn tonic_channel(
    info: &ServerInfo,
) -> anyhow::Result<pb::echo_client::EchoClient<tonic::transport::Channel>> {
    let tls = info.system == System::TonicTls;
    let uri = format!(
        "{}://localhost:{}",
        if tls { "https" } else { "http" },
        info.addr.port()
    );
    let mut endpoint = tonic::transport::Endpoint::from_shared(uri)?.tcp_nodelay(true);
    if tls {
        endpoint = endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&info.cert_pem))
                .domain_name("localhost"),
        )?;
    }
    Ok(pb::echo_client::EchoClient::new(endpoint.connect().await?))
}

// ------------------------------------------------------------------------- tarpc

#[allow(unreachable_pub, missing_debug_implementations)]
mod tarpc_service {
    #[tarpc::service]
    pub trait Bench {
        async fn echo(data: Vec<u8>) -> Vec<u8>;
        /// Burns `micros` µs of CPU in the handler (busy loop).
        async fn spin(micros: u64) -> u64;
        /// Blocks the handler's thread for `millis` ms.
        async fn sleep(millis: u64) -> u64;
    }
}
use tarpc_service::{Bench, BenchClient};

#[derive(Clone)]
struct TarpcBench;

impl Bench for TarpcBench {
    async fn echo(self, _: tarpc::context::Context, data: Vec<u8>) -> Vec<u8> {
        data
    }

    async fn spin(self, _: tarpc::context::Context, micros: u64) -> u64 {
        burn(micros);
        micros
    }

    async fn sleep(self, _: tarpc::context::Context, millis: u64) -> u64 {
        block(millis);
        millis
    }
}

async fn spawn(fut: impl std::future::Future<Output = ()> + Send + 'static) {
    tokio::spawn(fut);
}

async fn serve_tarpc(dev: &DevCertificate, tls: bool) -> anyhow::Result<SocketAddr> {
    use tarpc::server::{BaseChannel, Channel};
    use tarpc::tokio_serde::formats::Bincode;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = if tls {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![dev.certificate()], dev.private_key())?;
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    } else {
        None
    };
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let codec = tokio_util::codec::LengthDelimitedCodec::builder();
                match acceptor {
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(stream).await else {
                            return;
                        };
                        let transport =
                            tarpc::serde_transport::new(codec.new_framed(tls), Bincode::default());
                        BaseChannel::with_defaults(transport)
                            .execute(TarpcBench.serve())
                            .for_each(spawn)
                            .await;
                    }
                    None => {
                        let transport = tarpc::serde_transport::new(
                            codec.new_framed(stream),
                            Bincode::default(),
                        );
                        BaseChannel::with_defaults(transport)
                            .execute(TarpcBench.serve())
                            .for_each(spawn)
                            .await;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// A tarpc client (one TCP connection), in tarpc's default setup.
pub(crate) async fn tarpc_client(info: &ServerInfo) -> anyhow::Result<BenchClient> {
    use tarpc::tokio_serde::formats::Bincode;
    let stream = tokio::net::TcpStream::connect(info.addr).await?;
    stream.set_nodelay(true)?;
    let codec = tokio_util::codec::LengthDelimitedCodec::builder();
    let config = tarpc::client::Config::default();
    if info.system == System::TarpcTls {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(info.cert_der.clone().into())?;
        let tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let stream = connector
            .connect(
                rustls::pki_types::ServerName::try_from("localhost")?,
                stream,
            )
            .await?;
        let transport = tarpc::serde_transport::new(codec.new_framed(stream), Bincode::default());
        Ok(BenchClient::new(config, transport).spawn())
    } else {
        let transport = tarpc::serde_transport::new(codec.new_framed(stream), Bincode::default());
        Ok(BenchClient::new(config, transport).spawn())
    }
}

// ------------------------------------------------------------------------- callers

/// An echo caller of `payload_size` bytes for the system behind `info`.
pub(crate) async fn echo_caller(
    info: &ServerInfo,
    payload_size: usize,
) -> anyhow::Result<(Caller, Box<dyn std::any::Any + Send>)> {
    let payload = Bytes::from(vec![1u8; payload_size]);
    Ok(match info.system {
        System::Quicx | System::QuicxSecured | System::QuicxNoMetrics | System::QuicxPrometheus => {
            let client = quicx_client(info, None, None).await?;
            let keep = client.clone();
            let options = CallOptions::new();
            let caller: Caller = Arc::new(move || {
                let (client, payload, options) = (client.clone(), payload.clone(), options.clone());
                Box::pin(async move {
                    let reply = client.call_raw("Bench", "Echo", &payload, &options).await?;
                    anyhow::ensure!(reply.payload.len() == payload.len(), "short echo");
                    Ok(())
                }) as BoxFuture<_>
            });
            (caller, Box::new(keep))
        }
        System::Quinn => {
            let endpoint = quinn_client_endpoint()?;
            let conn = quinn_connect(info, &endpoint, &quinn_client_config(info)?, None).await?;
            let keep = (endpoint, conn.clone());
            let caller: Caller = Arc::new(move || {
                let (conn, payload) = (conn.clone(), payload.clone());
                Box::pin(async move {
                    let reply = quinn_request(&conn, OP_ECHO, &payload).await?;
                    anyhow::ensure!(reply.len() == payload.len(), "short echo");
                    Ok(())
                }) as BoxFuture<_>
            });
            (caller, Box::new(keep))
        }
        System::Tonic | System::TonicTls => {
            let client = tonic_channel(info).await?;
            let caller: Caller = Arc::new(move || {
                let (mut client, payload) = (client.clone(), payload.clone());
                Box::pin(async move {
                    let reply = client
                        .call(pb::Payload {
                            data: payload.clone(),
                        })
                        .await?;
                    anyhow::ensure!(reply.into_inner().data.len() == payload.len(), "short echo");
                    Ok(())
                }) as BoxFuture<_>
            });
            (caller, Box::new(()))
        }
        System::Tarpc | System::TarpcTls => {
            let client = tarpc_client(info).await?;
            let payload = payload.to_vec();
            let caller: Caller = Arc::new(move || {
                let (client, payload) = (client.clone(), payload.clone());
                Box::pin(async move {
                    let len = payload.len();
                    let reply = client.echo(tarpc::context::current(), payload).await?;
                    anyhow::ensure!(reply.len() == len, "short echo");
                    Ok(())
                }) as BoxFuture<_>
            });
            (caller, Box::new(()))
        }
    })
}

/// A caller of `work` on one new connection of the system behind `info` (quicx, tonic or tarpc;
/// raw quinn for `Work::Spin` only).
pub(crate) async fn work_caller(
    info: &ServerInfo,
    work: Work,
) -> anyhow::Result<(Caller, Box<dyn std::any::Any + Send>)> {
    Ok(match info.system {
        System::Quicx | System::QuicxSecured | System::QuicxNoMetrics | System::QuicxPrometheus => {
            let endpoint = if HANDLER_ONE_SOCKET.load(Ordering::Relaxed) {
                Some(one_socket()?)
            } else {
                None
            };
            let client = quicx_client(info, endpoint.as_ref(), None).await?;
            let keep = client.clone();
            let (method, amount) = match work {
                Work::Spin(us) => ("Spin", us),
                Work::Sleep(ms) => ("Sleep", ms),
                Work::SleepBlocking(ms) => ("SleepBlocking", ms),
            };
            let caller: Caller = Arc::new(move || {
                let client = client.clone();
                Box::pin(async move {
                    let reply: u64 = client.call("Bench", method, &amount).await?;
                    anyhow::ensure!(reply == amount, "wrong reply");
                    Ok(())
                }) as BoxFuture<_>
            });
            (caller, Box::new(keep))
        }
        System::Tonic | System::TonicTls => {
            let client = tonic_channel(info).await?;
            let caller: Caller = Arc::new(move || {
                let mut client = client.clone();
                Box::pin(async move {
                    let (reply, amount) = match work {
                        Work::Spin(a) => (client.spin(pb::Work { amount: a }).await?, a),
                        Work::Sleep(a) => (client.sleep(pb::Work { amount: a }).await?, a),
                        Work::SleepBlocking(_) => anyhow::bail!("tonic has no blocking handler"),
                    };
                    anyhow::ensure!(reply.into_inner().amount == amount, "wrong reply");
                    Ok(())
                }) as BoxFuture<_>
            });
            (caller, Box::new(()))
        }
        System::Tarpc | System::TarpcTls => {
            let client = tarpc_client(info).await?;
            let caller: Caller = Arc::new(move || {
                let client = client.clone();
                Box::pin(async move {
                    let ctx = tarpc::context::current();
                    let (reply, amount) = match work {
                        Work::Spin(us) => (client.spin(ctx, us).await?, us),
                        Work::Sleep(ms) => (client.sleep(ctx, ms).await?, ms),
                        Work::SleepBlocking(_) => anyhow::bail!("tarpc has no blocking handler"),
                    };
                    anyhow::ensure!(reply == amount, "wrong reply");
                    Ok(())
                }) as BoxFuture<_>
            });
            (caller, Box::new(()))
        }
        // Raw quinn's handler-cpu server: a task per stream on the server process's
        // multi-thread runtime, which burns in it (the transport's own floor for this work).
        System::Quinn => {
            let Work::Spin(us) = work else {
                anyhow::bail!("raw quinn has only the handler-cpu work")
            };
            let endpoint = quinn_client_endpoint()?;
            let conn = quinn_connect(info, &endpoint, &quinn_client_config(info)?, None).await?;
            let keep = (endpoint, conn.clone());
            let caller: Caller = Arc::new(move || {
                let conn = conn.clone();
                Box::pin(async move {
                    let reply = quinn_request(&conn, OP_SPIN, &us.to_le_bytes()).await?;
                    anyhow::ensure!(reply == us.to_le_bytes(), "wrong reply");
                    Ok(())
                }) as BoxFuture<_>
            });
            (caller, Box::new(keep))
        }
    })
}

/// Receives `count` pushes of `size` bytes from the server, sent by `pushers` concurrent
/// senders; returns messages per second (bounded by `limit`).
pub(crate) async fn push_rate(
    info: &ServerInfo,
    count: u32,
    size: u32,
    pushers: u32,
    limit: Duration,
) -> anyhow::Result<f64> {
    let received = Arc::new(AtomicU64::new(0));
    let started;
    match info.system {
        System::Quicx | System::QuicxNoMetrics | System::QuicxPrometheus => {
            let client = quicx_client(info, None, Some(received.clone())).await?;
            started = std::time::Instant::now();
            let () = client
                .call(
                    "Bench",
                    "Push",
                    &PushOrder {
                        count,
                        size,
                        pushers,
                        from_app: PUSH_FROM_APP.load(Ordering::Relaxed),
                    },
                )
                .await?;
            wait_count(&received, u64::from(count), limit).await?;
            client.close().await;
        }
        System::Quinn => {
            let endpoint = quinn_client_endpoint()?;
            let conn = quinn_connect(
                info,
                &endpoint,
                &quinn_client_config(info)?,
                Some(received.clone()),
            )
            .await?;
            started = std::time::Instant::now();
            quinn_request(&conn, OP_PUSH, &push_order(count, size, pushers)).await?;
            wait_count(&received, u64::from(count), limit).await?;
            conn.close(0u32.into(), b"done");
        }
        System::Tonic | System::TonicTls => {
            let mut client = tonic_channel(info).await?;
            let mut order = count.to_le_bytes().to_vec();
            order.extend_from_slice(&size.to_le_bytes());
            started = std::time::Instant::now();
            let mut stream = client
                .subscribe(pb::Payload { data: order.into() })
                .await?
                .into_inner();
            let deadline = started + limit;
            while let Some(msg) = tokio::time::timeout_at(deadline.into(), stream.next()).await? {
                msg?;
                received.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::ensure!(
                received.load(Ordering::Relaxed) == u64::from(count),
                "stream ended early"
            );
        }
        System::Tarpc | System::TarpcTls => anyhow::bail!("tarpc has no server push"),
        System::QuicxSecured => anyhow::bail!("the secured quicx variant measures calls only"),
    }
    Ok(f64::from(count) / started.elapsed().as_secs_f64())
}

/// Waits until `counter` reaches `target`, failing after `limit`.
pub(crate) async fn wait_count(
    counter: &AtomicU64,
    target: u64,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + limit;
    while counter.load(Ordering::Relaxed) < target {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "only {} of {target} arrived within {limit:?}",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(())
}
