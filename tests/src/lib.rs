//! Shared fixtures of the end-to-end tests: an `Arith` server on loopback, clients that trust it,
//! and raw QUIC connections for protocol-level tests.
#![forbid(unsafe_code)]

pub mod child;
pub mod etcd;
pub mod relay;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use quicx::{
    ClientBuilder, ClientTls, Context, DevCertificate, Server, ServerBuilder, Service, ServiceError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Arguments of `Arith.Mul` (the rpcx example's `Args`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Args {
    /// Left operand.
    pub a: i64,
    /// Right operand.
    pub b: i64,
}

/// Reply of `Arith.Mul`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    /// The product.
    pub c: i64,
}

/// Error code `Arith.Div` returns for a zero divisor.
pub const DIVIDE_BY_ZERO: u32 = 4000;

/// What the `Arith` handlers report back to the test.
#[derive(Debug, Default)]
pub struct Observed {
    /// `Sleep` handlers started.
    pub started: AtomicUsize,
    /// Handlers cancelled (dropped before they finished).
    pub cancelled: AtomicUsize,
    /// Handlers that ran to completion.
    pub finished: AtomicUsize,
}

/// A running server and what a test needs to reach it.
#[derive(Debug)]
pub struct TestServer {
    /// The server.
    pub server: Server,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its certificate.
    pub dev: Arc<DevCertificate>,
    /// Handler observations.
    pub observed: Arc<Observed>,
    /// Arguments of every `Arith.Log` oneway call.
    pub logs: mpsc::UnboundedReceiver<String>,
}

impl TestServer {
    /// A client builder that trusts this server.
    pub fn client(&self) -> ClientBuilder {
        client_builder(&self.dev)
    }

    /// The address as a string.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Returns once `n` `Sleep` handlers have started (in place of sleeping "long enough" for
    /// a call to reach its handler). Panics after 10 s.
    pub async fn until_sleeping(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.observed.started.load(Ordering::SeqCst) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{n} Sleep handler(s) never started"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Sets `flag` when dropped before `disarm`.
struct CancelGuard(Option<Arc<Observed>>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(o) = self.0.take() {
            o.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The `Arith` service: `Mul`, `Div` (error on zero), `Sleep` (millis; reports cancellation),
/// `Panic`, `Log` (oneway: forwards its argument), `Echo` (raw bytes), `Meta` (returns a
/// metadata value and sets reply metadata).
pub fn arith(observed: Arc<Observed>, logs: mpsc::UnboundedSender<String>) -> Service {
    Service::new()
        .method("Mul", |_ctx: Context, args: Args| async move {
            Ok(Reply { c: args.a * args.b })
        })
        .method("Div", |_ctx: Context, args: Args| async move {
            if args.b == 0 {
                return Err(ServiceError::new(DIVIDE_BY_ZERO, "divide by zero"));
            }
            Ok(Reply { c: args.a / args.b })
        })
        .method("Sleep", move |_ctx: Context, millis: u64| {
            let observed = observed.clone();
            async move {
                observed.started.fetch_add(1, Ordering::SeqCst);
                let mut guard = CancelGuard(Some(observed.clone()));
                tokio::time::sleep(Duration::from_millis(millis)).await;
                guard.0 = None;
                observed.finished.fetch_add(1, Ordering::SeqCst);
                Ok(millis)
            }
        })
        .method("Panic", |_ctx: Context, (): ()| async move {
            if true {
                panic!("boom");
            }
            Ok(())
        })
        .method("Log", move |_ctx: Context, line: String| {
            let logs = logs.clone();
            async move {
                let _ = logs.send(line);
                Ok(())
            }
        })
        .raw_method("Echo", |_ctx: Context, payload: bytes::Bytes| async move {
            Ok(payload)
        })
        .method("Meta", |ctx: Context, key: String| async move {
            ctx.set_reply_metadata("seen", "yes");
            Ok(ctx.metadata().get(&key).map(str::to_owned))
        })
}

/// Starts an `Arith` server on 127.0.0.1 with the given builder tweaks.
pub async fn start_server_with(tweak: impl FnOnce(ServerBuilder) -> ServerBuilder) -> TestServer {
    init_tracing();
    let dev = Arc::new(DevCertificate::localhost().expect("dev certificate"));
    // Tests of other features declare client ids freely; tests/tests/security.rs covers the
    // verified default.
    let server = tweak(
        Server::builder()
            .dev_certificate(&dev)
            .insecure_accept_unverified_client_ids(),
    )
    .build()
    .expect("server builds");
    let observed = Arc::new(Observed::default());
    let (tx, logs) = mpsc::unbounded_channel();
    server.register("Arith", arith(observed.clone(), tx));
    let addr = server.bind("127.0.0.1:0").await.expect("server binds");
    TestServer {
        server,
        addr,
        dev,
        observed,
        logs,
    }
}

/// Starts an `Arith` server with default settings.
pub async fn start_server() -> TestServer {
    start_server_with(|b| b).await
}

/// A client builder that trusts `dev` and expects the name `localhost`.
pub fn client_builder(dev: &DevCertificate) -> ClientBuilder {
    quicx::Client::builder()
        .tls(ClientTls::empty().trust(dev.certificate()))
        .server_name("localhost")
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A raw quinn connection to a quicx server offering `alpn`, trusting `dev`: for tests that
/// write bytes by hand. It grants the server no unidirectional streams, so it never reads a push.
pub async fn raw_connection(
    addr: SocketAddr,
    dev: &DevCertificate,
    alpn: &[u8],
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(dev.certificate()).expect("valid certificate");
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic config");
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_uni_streams(0u32.into());
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("address")).expect("client endpoint");
    endpoint.set_default_client_config(config);
    endpoint
        .connect(addr, "localhost")
        .expect("connect starts")
        .await
}

/// A raw quinn server endpoint on loopback with `dev`'s certificate, offering `alpn` (most
/// preferred first): for tests that play a server by hand against a quicx client. It grants
/// clients no unidirectional streams, as a quicx server does.
pub fn raw_server(dev: &DevCertificate, alpn: &[&[u8]]) -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![dev.certificate()], dev.private_key())
        .expect("certificate and key");
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("quic config");
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    quinn::Endpoint::server(config, "127.0.0.1:0".parse().expect("address"))
        .expect("server endpoint")
}
