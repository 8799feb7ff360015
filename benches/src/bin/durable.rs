//! Durable push benchmark (`cargo run -p quicx-benches --release --bin quicx-durable-bench`),
//! issue 12: messages for a device that is offline, stored, then drained when it connects,
//! quicx next to Debian's `mosquitto` broker (persistence on, a QoS 1 persistent session, the
//! `rumqttc` client), for payloads of 32 B and 1 KiB, in one run:
//!
//! - **store rate**: messages/s accepted for an offline device. quicx: `Server::send_durable`
//!   (returns once the message is in a committed redb transaction, fsynced; concurrent sends
//!   share a commit), 64 in flight from one task, and 1 in flight. mosquitto: QoS 1 publishes
//!   counted by their PUBACK, rumqttc's in-flight window 64, and 1.
//! - **drain rate**: the device connects (quicx: a `Client` with that client id and a push
//!   channel; MQTT: the subscriber reconnects with `clean_session = false`) and receives every
//!   stored message: messages/s from the start of its connect to the last one, each message
//!   checked (all arrived, once, in order).
//!
//! mosquitto runs with Debian's default `autosave_interval 1800` twice: with Nagle's algorithm
//! on (mosquitto's and rumqttc's default) and off (`set_tcp_nodelay true`, `TCP_NODELAY`);
//! `--mosquitto-autosave-1s` and `--mosquitto-per-change` add variants that save its database
//! every second or after every change. mosquitto is started here on a free loopback port with
//! a temporary config and persistence directory, and stopped (and the directory removed) at the
//! end, also on error or Ctrl-C. If it is not installed the harness installs it (`apt-get
//! install -y mosquitto`, when it runs as root and apt-get exists), else it skips mosquitto
//! loudly. Every loop is bounded in count and time. Everything runs on loopback, in this process
//! and the broker (2 cores shared).
#![forbid(unsafe_code)]

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures_util::{StreamExt, stream};
use quicx::{ClientTls, DevCertificate, DurableLimits, Fsync, Metadata, Server, push_channel};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};

#[derive(Debug, Parser)]
struct Cli {
    /// Messages stored and drained per system and payload.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Sends (quicx) or publishes (MQTT) in flight for the store rate.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Messages for the store rate with 1 in flight (to another offline device; also bounded
    /// to 10 s).
    #[arg(long, default_value_t = 1_000)]
    serial_messages: usize,
    /// Also run quicx with `Fsync::Interval` of this many ms (its store flushed to the disk at
    /// most this long apart, as mosquitto's autosave does; 0: skip that variant).
    #[arg(long, default_value_t = 1_000)]
    fsync_interval_ms: u64,
    /// Bound of each store and drain phase, seconds.
    #[arg(long, default_value_t = 120)]
    phase_secs: u64,
    /// Payload sizes, bytes (each at least 8: a sequence number leads the payload).
    #[arg(long, value_delimiter = ',', default_values_t = [32usize, 1024])]
    payloads: Vec<usize>,
    /// Where the temporary store and broker directories go (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also run quicx (fsync per commit) with the device pinned to `quicx/1`: one push with
    /// receipt per durable message instead of a durable stream (the drain before `quicx/2`).
    #[arg(long)]
    quicx1: bool,
    /// Also run quicx (fsync per commit) with the device's messages counted in a
    /// `quicx::push_handler` (a function called where the messages are read, as the MQTT client
    /// reads its event loop in the receiving task) instead of a `push_channel` read by a task.
    #[arg(long)]
    push_handler: bool,
    /// Leave mosquitto out.
    #[arg(long)]
    no_mosquitto: bool,
    /// Also run mosquitto saving its database every second (`autosave_interval 1`).
    #[arg(long)]
    mosquitto_autosave_1s: bool,
    /// Also run mosquitto saving its database after every change (`autosave_on_changes true`,
    /// `autosave_interval 1`): a full snapshot per message, slow; bounded by `--phase-secs`.
    #[arg(long)]
    mosquitto_per_change: bool,
}

/// Everything measured for one system and payload size.
#[derive(Debug, Clone)]
struct Row {
    system: String,
    payload: usize,
    /// Store rate with `in_flight` in flight, messages/s.
    store: f64,
    /// Store rate with 1 in flight, messages/s.
    store_serial: f64,
    /// Drain rate, messages/s.
    drain: f64,
    stored: usize,
    check: Check,
    /// Free-form facts worth printing (redeliveries, time to an empty store...).
    notes: Vec<String>,
}

impl Row {
    fn lost(&self) -> usize {
        self.check.lost(self.stored)
    }
}

// ---------------------------------------------------------------------------------------------
// Payloads and their checks.

/// A payload of `size` bytes: `seq` big-endian, then filler.
fn payload(seq: u64, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size.max(8));
    p.extend_from_slice(&seq.to_be_bytes());
    p.resize(size.max(8), b'x');
    p
}

fn seq_of(p: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(p.get(..8)?.try_into().ok()?))
}

/// What a receiver saw: each sequence number once, in the order they were stored.
#[derive(Debug, Clone, Default)]
struct Check {
    seen: Vec<bool>,
    /// Distinct messages received.
    unique: usize,
    /// Messages received again (after their first copy).
    duplicates: usize,
    /// First copies that came after a message stored later.
    out_of_order: usize,
    /// Messages that are not ours, or whose store id does not match the one `send` returned.
    wrong: usize,
    last_key: Option<u64>,
}

impl Check {
    fn new(n: usize) -> Self {
        Self {
            seen: vec![false; n],
            ..Self::default()
        }
    }

    /// A message arrived; `key` orders the messages as stored (quicx: its store id; MQTT: the
    /// sequence number, the order they were published in on one connection).
    fn see(&mut self, payload: &[u8], key: impl FnOnce(u64) -> Option<u64>) {
        let Some(seq) = seq_of(payload).filter(|&s| (s as usize) < self.seen.len()) else {
            self.wrong += 1;
            return;
        };
        let Some(key) = key(seq) else {
            self.wrong += 1;
            return;
        };
        if std::mem::replace(&mut self.seen[seq as usize], true) {
            self.duplicates += 1;
            return;
        }
        self.unique += 1;
        if self.last_key.is_some_and(|last| key <= last) {
            self.out_of_order += 1;
        }
        self.last_key = Some(key);
    }

    /// Stored messages (sequence numbers `0..stored`) never received.
    fn lost(&self, stored: usize) -> usize {
        self.seen[..stored.min(self.seen.len())]
            .iter()
            .filter(|s| !**s)
            .count()
    }

    fn all_of(&self, stored: usize) -> bool {
        self.unique >= stored && self.lost(stored) == 0
    }
}

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let t = |tv: nix::sys::time::TimeVal| {
        Duration::from_secs(tv.tv_sec() as u64) + Duration::from_micros(tv.tv_usec() as u64)
    };
    getrusage(UsageWho::RUSAGE_SELF)
        .map_or(Duration::ZERO, |u| t(u.user_time()) + t(u.system_time()))
}

/// CPU time (user + system) of process `pid` so far, from `/proc/<pid>/stat` (10 ms ticks).
fn cpu_time_of(pid: u32) -> Duration {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
            let rest = &s[s.rfind(')')? + 2..];
            let mut fields = rest.split_whitespace().skip(11);
            let ticks = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
            Some(Duration::from_millis(ticks * 10))
        })
        .unwrap_or_default()
}

/// "cores used": CPU time over wall time.
fn cores(cpu: Duration, wall: Duration) -> String {
    format!(
        "{:.2} cores during the drain",
        cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9)
    )
}

fn rate(n: usize, d: Duration) -> f64 {
    if d.is_zero() {
        return 0.0;
    }
    n as f64 / d.as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Temporary directories.

/// A fresh directory, removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new(base: &Path, what: &str) -> anyhow::Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = base.join(format!(
            "quicx-durable-bench-{}-{what}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: cannot remove {}: {e}", self.0.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// quicx.

const DEVICE: &str = "device-1";
const SERIAL_DEVICE: &str = "device-serial";
const TTL: Duration = Duration::from_secs(3600);

/// How the drained device takes its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Device {
    /// `quicx/2`, through a `push_channel` read by a task.
    Channel,
    /// `quicx/2`, through a `push_handler`.
    Handler,
    /// Pinned to `quicx/1`, through a `push_channel`.
    V1,
}

async fn quicx_run(
    cli: &Cli,
    dev: &DevCertificate,
    base: &Path,
    size: usize,
    fsync: Fsync,
    device: Device,
) -> anyhow::Result<Row> {
    let dir = TempDir::new(base, "quicx")?;
    let n = cli.messages;
    let room = (n + cli.serial_messages + 1) as u64;
    let limits = DurableLimits::default()
        .per_identity(room, room * (size as u64 + 512))
        .total(room, room * (size as u64 + 512))
        .fsync(fsync);
    let server = Server::builder()
        .dev_certificate(dev)
        .insecure_accept_unverified_client_ids()
        .durable_store(dir.path().join("store.redb"), limits)
        .build()?;
    server.bind("127.0.0.1:0").await?;
    let addr = server.local_addr().context("bound")?;
    let result = quicx_measure(cli, dev, &server, addr, size, device)
        .await
        .map(|row| Row {
            system: match fsync {
                Fsync::Interval(every) => {
                    format!("quicx (redb, flushed every {} ms)", every.as_millis())
                }
                _ if device == Device::V1 => "quicx/1 device (redb, fsync per commit)".into(),
                _ if device == Device::Handler => {
                    "quicx, push_handler (redb, fsync per commit)".into()
                }
                _ => "quicx (redb, fsync per commit)".into(),
            },
            ..row
        });
    server.shutdown(Duration::from_secs(1)).await;
    drop(dir);
    result
}

async fn quicx_measure(
    cli: &Cli,
    dev: &DevCertificate,
    server: &Server,
    addr: SocketAddr,
    size: usize,
    device: Device,
) -> anyhow::Result<Row> {
    let n = cli.messages;
    let phase = Duration::from_secs(cli.phase_secs);

    // Store rate, one at a time (each waits for its own commit), to another offline device.
    let start = Instant::now();
    let limit = start + Duration::from_secs(10);
    let mut serial = 0;
    while serial < cli.serial_messages && Instant::now() < limit {
        server
            .send_durable(
                SERIAL_DEVICE,
                "Device",
                "Cmd",
                Metadata::new(),
                payload(serial as u64, size),
                TTL,
            )
            .await?;
        serial += 1;
    }
    let store_serial = rate(serial, start.elapsed());

    // Store rate, `in_flight` at a time from one task (they share commits).
    let start = Instant::now();
    let limit = start + phase;
    let ids: Vec<u64> = stream::iter(0..n)
        .take_while(|_| std::future::ready(Instant::now() < limit))
        .map(|i| {
            server.send_durable(
                DEVICE,
                "Device",
                "Cmd",
                Metadata::new(),
                payload(i as u64, size),
                TTL,
            )
        })
        .buffered(cli.in_flight.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<quicx::Result<_>>()?;
    let store_time = start.elapsed();
    let stored = ids.len();
    let pending = server.durable_pending(DEVICE).await?.len();
    if pending != stored {
        bail!("quicx: {stored} sends returned, but {pending} messages are pending");
    }

    // Drain: the device connects and receives everything.
    let ids = Arc::new(ids);
    let check = Arc::new(std::sync::Mutex::new(Check::new(n)));
    let see = {
        let (check, ids) = (check.clone(), ids.clone());
        move |m: &quicx::PushMessage| {
            let id = m.durable_id();
            let mut check = check.lock().unwrap_or_else(|e| e.into_inner());
            check.see(&m.payload, |seq| {
                id.filter(|id| ids.get(seq as usize) == Some(id))
            });
            check.all_of(stored)
        }
    };
    // With a handler, `all` is told when the last one arrived; with a channel, a task reads it.
    let all = Arc::new(tokio::sync::Notify::new());
    let (sink, rx) = if device == Device::Handler {
        let (see, all) = (see.clone(), all.clone());
        let sink = quicx::push_handler(move |m| {
            if see(&m) {
                all.notify_one();
            }
        });
        (sink, None)
    } else {
        let (tx, rx) = push_channel(4096);
        (tx, Some(rx))
    };
    let cpu = cpu_time();
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + phase;
    let mut tls = ClientTls::new().trust(dev.certificate());
    if device == Device::V1 {
        tls = tls.with_alpn(vec![quicx::ALPN.to_vec()]);
    }
    let client = quicx::Client::builder()
        .tls(tls)
        .client_id(DEVICE)
        .push_channel(sink)
        .connect_addr(addr, "localhost")
        .await?;
    let rx = match rx {
        Some(mut rx) => {
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(m)) if see(&m) => break,
                    Ok(Some(_)) => {}
                    Ok(None) => bail!("quicx: the push channel closed"),
                    Err(_) => break,
                }
            }
            Some(rx)
        }
        None => {
            let _ = tokio::time::timeout_at(deadline, all.notified()).await;
            None
        }
    };
    let drain_time = start.elapsed();
    let mut notes = vec![cores(cpu_time() - cpu, drain_time)];
    let received = check.lock().unwrap_or_else(|e| e.into_inner()).unique;
    // How long until every acknowledgement is committed (the store is empty for the device).
    let empty_limit = Instant::now() + Duration::from_secs(10);
    while Instant::now() < empty_limit && !server.durable_pending(DEVICE).await?.is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let left = server.durable_pending(DEVICE).await?.len();
    if left == 0 {
        notes.push(format!(
            "store empty {:.0} ms after the last message arrived",
            (start.elapsed().saturating_sub(drain_time)).as_secs_f64() * 1e3
        ));
    } else {
        notes.push(format!(
            "{left} messages still pending 10 s after the drain"
        ));
    }
    // Anything more (a duplicate) within a moment? (A handler counts them where it runs.)
    let quiet = tokio::time::Instant::now() + Duration::from_millis(300);
    match rx {
        Some(mut rx) => {
            while let Ok(Some(m)) = tokio::time::timeout_at(quiet, rx.recv()).await {
                see(&m);
            }
        }
        None => tokio::time::sleep_until(quiet).await,
    }
    let stats = server.stats();
    if stats.durable_redelivered > 0 {
        notes.push(format!("{} redeliveries", stats.durable_redelivered));
    }
    client.close().await;
    let check = check.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Row {
        system: "quicx (redb, fsync per commit)".into(),
        payload: size,
        store: rate(stored, store_time),
        store_serial,
        drain: rate(received, drain_time),
        stored,
        check,
        notes,
    })
}

// ---------------------------------------------------------------------------------------------
// The transport's ceiling: raw quinn, no store.

/// Bytes a quicx record adds to a payload (kind, two lengths, the header with its id metadata):
/// about this much, so the ceiling moves the same bytes.
const RECORD_OVERHEAD: usize = 64;

/// Raw quinn, one bidirectional stream, nothing stored or acknowledged: the server writes `n`
/// records of `size + RECORD_OVERHEAD` bytes, 1,024 per write (as quicx's durable stream
/// does), and the client reads them all. Messages/s from the client's connect to the last byte:
/// what QUIC itself carries on this machine, the ceiling of any drain over it.
async fn quinn_ceiling(
    dev: &DevCertificate,
    size: usize,
    n: usize,
    phase: Duration,
) -> anyhow::Result<f64> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![dev.certificate()], dev.private_key())?;
    tls.alpn_protocols = vec![b"ceiling".to_vec()];
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
    let addr = server.local_addr()?;
    let record = size + RECORD_OVERHEAD;
    let sender = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let (mut send, _recv) = conn.open_bi().await?;
        let mut left = n;
        while left > 0 {
            let batch = left.min(1024);
            send.write_chunk(bytes::Bytes::from(vec![b'x'; batch * record]))
                .await?;
            left -= batch;
        }
        send.finish()?;
        // Stay until the client closes (after it read everything).
        conn.closed().await;
        anyhow::Ok(())
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(dev.certificate())?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"ceiling".to_vec()];
    let client_config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    let client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let start = Instant::now();
    let read = tokio::time::timeout(phase, async {
        let conn = client
            .connect_with(client_config, addr, "localhost")?
            .await?;
        // The server opens the stream; it arrives with its first bytes.
        let (_send, mut recv) = conn.accept_bi().await?;
        let mut got = 0;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            got += chunk.bytes.len();
        }
        let elapsed = start.elapsed();
        conn.close(0u32.into(), b"done");
        anyhow::Ok((got, elapsed))
    })
    .await;
    let result = match read {
        Ok(Ok((got, elapsed))) if got == n * record => Ok(rate(n, elapsed)),
        Ok(Ok((got, _))) => Err(anyhow::anyhow!("quinn: read {got} of {} bytes", n * record)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow::anyhow!("quinn: not done within {phase:?}")),
    };
    sender.abort();
    client.wait_idle().await;
    result
}

// ---------------------------------------------------------------------------------------------
// mosquitto.

/// How the broker saves its in-memory database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Autosave {
    /// Debian's default: `autosave_interval 1800` (seconds), so during the bench nothing is
    /// written; the database is saved at shutdown.
    Default,
    /// `autosave_interval 1`: a full snapshot every second.
    EverySecond,
    /// `autosave_on_changes true` + `autosave_interval 1`: a full snapshot after every change.
    EveryChange,
}

impl Autosave {
    fn config(self) -> &'static str {
        match self {
            Self::Default => "autosave_interval 1800\nautosave_on_changes false\n",
            Self::EverySecond => "autosave_interval 1\nautosave_on_changes false\n",
            Self::EveryChange => "autosave_interval 1\nautosave_on_changes true\n",
        }
    }
}

/// One mosquitto setup to measure.
#[derive(Debug, Clone, Copy)]
struct Variant {
    autosave: Autosave,
    /// Nagle's algorithm off on both ends (`set_tcp_nodelay true` in mosquitto, `TCP_NODELAY`
    /// in rumqttc); both default to leaving it on.
    nodelay: bool,
}

impl Variant {
    fn label(self) -> String {
        let autosave = match self.autosave {
            Autosave::Default => "autosave 1800 s",
            Autosave::EverySecond => "autosave every 1 s",
            Autosave::EveryChange => "autosave every change",
        };
        let tcp = if self.nodelay {
            "TCP_NODELAY"
        } else {
            "Nagle on"
        };
        format!("mosquitto ({autosave}, {tcp})")
    }
}

/// Broker → subscriber QoS 1 messages in flight: the window quicx uses for a device.
const MOSQUITTO_INFLIGHT: usize = 32;

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `$QUICX_MOSQUITTO_BIN`, `mosquitto` on `PATH`, `/usr/sbin/mosquitto`.
fn find_mosquitto() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QUICX_MOSQUITTO_BIN") {
        return Some(PathBuf::from(p)).filter(|p| is_executable(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("mosquitto"))
        .chain(["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"].map(PathBuf::from))
        .find(|p| is_executable(p))
}

/// Runs a command for at most `limit`; whether it succeeded.
async fn run_bounded(cmd: &mut tokio::process::Command, limit: Duration) -> bool {
    let child = cmd
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    match child {
        Ok(mut child) => matches!(
            tokio::time::timeout(limit, child.wait()).await,
            Ok(Ok(status)) if status.success()
        ),
        Err(_) => false,
    }
}

/// The mosquitto binary, installed with apt-get if it is missing and we may; else why not.
async fn ensure_mosquitto() -> Result<PathBuf, String> {
    if let Some(p) = find_mosquitto() {
        return Ok(p);
    }
    let root = nix::unistd::geteuid().is_root();
    let apt = Path::new("/usr/bin/apt-get").exists();
    if !root || !apt {
        return Err(format!(
            "mosquitto is not installed, and this process cannot install it ({}): \
             install it with `sudo apt-get install -y mosquitto` (or set QUICX_MOSQUITTO_BIN)",
            if apt { "not root" } else { "no apt-get" }
        ));
    }
    eprintln!("mosquitto is not installed: running `apt-get install -y mosquitto` ...");
    let install = || {
        let mut c = tokio::process::Command::new("apt-get");
        c.args(["install", "-y", "--no-install-recommends", "mosquitto"]);
        c
    };
    let limit = Duration::from_secs(300);
    if !run_bounded(&mut install(), limit).await {
        eprintln!("apt-get install failed; running `apt-get update` and trying again ...");
        let mut update = tokio::process::Command::new("apt-get");
        update.arg("update");
        run_bounded(&mut update, limit).await;
        run_bounded(&mut install(), limit).await;
    }
    find_mosquitto().ok_or_else(|| {
        "mosquitto is not installed and `apt-get install -y mosquitto` did not install it".into()
    })
}

/// `mosquitto version 2.0.11`, from `mosquitto -h`.
fn mosquitto_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-h")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().map(str::to_owned)
        })
        .unwrap_or_else(|| "mosquitto (version unknown)".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

/// A mosquitto broker on a loopback port, with its config, persistence directory and log in a
/// temporary directory; stopped (SIGTERM, then SIGKILL) and the directory removed on drop.
#[derive(Debug)]
struct Mosquitto {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Mosquitto {
    fn start(bin: &Path, base: &Path, variant: Variant) -> anyhow::Result<Self> {
        let mut last = String::new();
        // A port picked by binding :0 may be taken before mosquitto binds it: retry.
        for _ in 0..5 {
            let dir = TempDir::new(base, "mosquitto")?;
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let config = dir.path().join("mosquitto.conf");
            std::fs::write(&config, Self::config(dir.path(), port, variant))?;
            let log = std::fs::File::create(dir.path().join("mosquitto.log"))?;
            let child = Command::new(bin)
                .arg("-c")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("running {}", bin.display()))?;
            let mut broker = Self { child, port, dir };
            match broker.wait_ready() {
                Ok(()) => return Ok(broker),
                // Dropping the broker stops it and removes its directory.
                Err(e) => last = e.to_string(),
            }
        }
        bail!("mosquitto did not start: {last}")
    }

    fn config(dir: &Path, port: u16, variant: Variant) -> String {
        let mut c = format!(
            "# written by quicx-durable-bench\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             persistence true\n\
             persistence_location {}/\n\
             persistence_file mosquitto.db\n\
             {}\
             max_queued_messages 0\n\
             max_queued_bytes 0\n\
             max_inflight_messages {MOSQUITTO_INFLIGHT}\n\
             set_tcp_nodelay {}\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n",
            dir.display(),
            variant.autosave.config(),
            variant.nodelay,
        );
        // Run as root, mosquitto would switch to the `mosquitto` user, which cannot write here.
        if nix::unistd::geteuid().is_root() {
            c.push_str("user root\n");
        }
        c
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let limit = Instant::now() + Duration::from_secs(10);
        while Instant::now() < limit {
            if let Some(status) = self.child.try_wait()? {
                bail!("mosquitto exited ({status}): {}", self.log_tail());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("mosquitto not listening after 10 s: {}", self.log_tail())
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("mosquitto.log")) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Stops the broker (it saves its database on SIGTERM); SIGKILL after 10 s.
    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let limit = Instant::now() + Duration::from_secs(10);
            while Instant::now() < limit {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn mqtt_options(id: &str, port: u16, clean_session: bool, inflight: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(clean_session)
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(inflight.max(1))
        .set_max_packet_size(64 << 10, 64 << 10);
    o
}

/// A client and its event loop; `nodelay` turns Nagle's algorithm off (with it on, a small
/// write can wait for the peer's delayed ACK, up to 40 ms on Linux).
fn mqtt_client(options: MqttOptions, cap: usize, nodelay: bool) -> (AsyncClient, EventLoop) {
    let (client, mut events) = AsyncClient::new(options, cap);
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(nodelay);
    events.set_network_options(network);
    (client, events)
}

/// Polls the event loop until `done` says so, at most until `deadline`.
async fn poll_until(
    events: &mut EventLoop,
    deadline: tokio::time::Instant,
    mut done: impl FnMut(&Event) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(event)) => {
                if done(&event)? {
                    return Ok(());
                }
            }
            Ok(Err(e)) => bail!("MQTT connection: {e}"),
            Err(_) => bail!("MQTT: timed out"),
        }
    }
}

/// Sends DISCONNECT and waits (briefly) until it is written.
async fn mqtt_disconnect(client: &AsyncClient, events: &mut EventLoop) {
    if client.disconnect().await.is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, events.poll()).await {
        if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
            break;
        }
    }
}

/// Connects `id` with a persistent session, subscribes to `topic` with QoS 1, disconnects: the
/// broker now keeps `topic`'s QoS 1 messages for `id`.
async fn mqtt_subscribe_offline(
    port: u16,
    id: &str,
    topic: &str,
    nodelay: bool,
) -> anyhow::Result<()> {
    let (client, mut events) = mqtt_client(mqtt_options(id, port, false, 10), 10, nodelay);
    client.subscribe(topic, QoS::AtLeastOnce).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    poll_until(&mut events, deadline, |e| match e {
        Event::Incoming(Packet::SubAck(ack)) => {
            if ack
                .return_codes
                .iter()
                .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)))
            {
                Ok(true)
            } else {
                bail!("subscription refused: {ack:?}")
            }
        }
        _ => Ok(false),
    })
    .await?;
    mqtt_disconnect(&client, &mut events).await;
    Ok(())
}

/// Publishes up to `n` QoS 1 messages of `size` to `topic`, `inflight` at a time, until `limit`;
/// the messages acknowledged (PUBACK) and the time from the first publish to the last PUBACK.
async fn mqtt_publish(
    port: u16,
    topic: &str,
    n: usize,
    size: usize,
    inflight: u16,
    limit: Duration,
    nodelay: bool,
) -> anyhow::Result<(usize, Duration)> {
    let (client, mut events) = mqtt_client(
        mqtt_options("bench-pub", port, true, inflight),
        1024,
        nodelay,
    );
    // Connect first: the clock starts with the first publish.
    poll_until(
        &mut events,
        tokio::time::Instant::now() + Duration::from_secs(10),
        |e| Ok(matches!(e, Event::Incoming(Packet::ConnAck(_)))),
    )
    .await?;
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let producer = {
        let (client, topic) = (client.clone(), topic.to_owned());
        tokio::spawn(async move {
            for i in 0..n {
                client
                    .publish(
                        topic.as_str(),
                        QoS::AtLeastOnce,
                        false,
                        payload(i as u64, size),
                    )
                    .await?;
            }
            Ok::<_, rumqttc::ClientError>(())
        })
    };
    let mut acked = 0;
    let outcome = async {
        while acked < n {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("MQTT publisher: {e}"),
                Err(_) => break,
            }
        }
        Ok(())
    }
    .await;
    let elapsed = start.elapsed();
    producer.abort();
    outcome?;
    mqtt_disconnect(&client, &mut events).await;
    Ok((acked, elapsed))
}

/// Reconnects `id` (persistent session) and receives until every message `0..stored` arrived
/// or `limit` passed; what arrived, and the time from the connect to the last one.
async fn mqtt_drain(
    port: u16,
    id: &str,
    n: usize,
    stored: usize,
    limit: Duration,
    nodelay: bool,
    broker: u32,
) -> anyhow::Result<(Check, Duration, Duration)> {
    let mut check = Check::new(n);
    let cpu = cpu_time() + cpu_time_of(broker);
    let (client, mut events) = mqtt_client(
        mqtt_options(id, port, false, MOSQUITTO_INFLIGHT as u16),
        10,
        nodelay,
    );
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    while !check.all_of(stored) {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) if !ack.session_present => {
                bail!("mosquitto did not keep the session of {id}")
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => check.see(&p.payload, Some),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("MQTT subscriber: {e}"),
            Err(_) => break,
        }
    }
    let elapsed = start.elapsed();
    let cpu = cpu_time() + cpu_time_of(broker) - cpu;
    // Anything more (a duplicate) within a moment?
    let quiet = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(Ok(event)) = tokio::time::timeout_at(quiet, events.poll()).await {
        if let Event::Incoming(Packet::Publish(p)) = event {
            check.see(&p.payload, Some);
        }
    }
    mqtt_disconnect(&client, &mut events).await;
    Ok((check, elapsed, cpu))
}

async fn mosquitto_run(
    cli: &Cli,
    bin: &Path,
    base: &Path,
    size: usize,
    variant: Variant,
) -> anyhow::Result<Row> {
    let broker = Mosquitto::start(bin, base, variant)?;
    let nodelay = variant.nodelay;
    let port = broker.port;
    let n = cli.messages;
    let phase = Duration::from_secs(cli.phase_secs);
    let (sub, serial_sub) = ("bench-device-1", "bench-device-serial");
    let (topic, serial_topic) = ("bench/device-1", "bench/device-serial");
    mqtt_subscribe_offline(port, sub, topic, nodelay).await?;
    mqtt_subscribe_offline(port, serial_sub, serial_topic, nodelay).await?;

    let (serial, serial_time) = mqtt_publish(
        port,
        serial_topic,
        cli.serial_messages,
        size,
        1,
        Duration::from_secs(10),
        nodelay,
    )
    .await?;
    let in_flight = u16::try_from(cli.in_flight).unwrap_or(u16::MAX);
    let (stored, store_time) =
        mqtt_publish(port, topic, n, size, in_flight, phase, nodelay).await?;
    let (check, drain_time, cpu) =
        mqtt_drain(port, sub, n, stored, phase, nodelay, broker.child.id()).await?;
    let mut notes = vec![format!(
        "{} (this process and the broker's; 10 ms ticks)",
        cores(cpu, drain_time)
    )];
    let db = broker.dir.path().join("mosquitto.db");
    if let Ok(m) = std::fs::metadata(&db) {
        notes.push(format!(
            "mosquitto.db was {} KiB before shutdown",
            m.len() / 1024
        ));
    } else {
        notes.push("no mosquitto.db written before shutdown".into());
    }
    drop(broker);
    Ok(Row {
        system: variant.label(),
        payload: size,
        store: rate(stored, store_time),
        store_serial: rate(serial, serial_time),
        drain: rate(check.unique.min(stored), drain_time),
        stored,
        check,
        notes,
    })
}

// ---------------------------------------------------------------------------------------------
// Report.

fn size_label(size: usize) -> String {
    if size >= 1024 && size / 1024 * 1024 == size {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn print_report(cli: &Cli, rows: &[Row], ceilings: &[(usize, f64)], broker: Result<&str, &str>) {
    println!();
    if let Ok(version) = broker {
        println!("broker: {version}");
    }
    println!("load average (1, 5, 15 min) at the end: {}", loadavg());
    println!(
        "Durable push, {} messages per system and payload; store rate with {} in flight and \
         with 1 in flight ({} messages or 10 s, to another offline device); drain from the \
         device's connect to its last message.",
        cli.messages, cli.in_flight, cli.serial_messages
    );
    println!();
    println!(
        "| system | payload | store msgs/s ({} in flight) | store msgs/s (1 in flight) | drain msgs/s | stored | received | lost | duplicates | out of order |",
        cli.in_flight
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
            r.system,
            size_label(r.payload),
            r.store,
            r.store_serial,
            r.drain,
            r.stored,
            r.check.unique,
            r.lost(),
            r.check.duplicates,
            r.check.out_of_order + r.check.wrong,
        );
    }
    let quicx: Vec<&Row> = rows
        .iter()
        .filter(|r| r.system.starts_with("quicx"))
        .collect();
    let others: Vec<&Row> = rows
        .iter()
        .filter(|r| !r.system.starts_with("quicx"))
        .collect();
    if !others.is_empty() {
        println!();
        println!(
            "| quicx / other | payload | store ({} in flight) | store (1 in flight) | drain |",
            cli.in_flight
        );
        println!("|---|---|---:|---:|---:|");
        for o in &others {
            for q in quicx.iter().filter(|q| q.payload == o.payload) {
                println!(
                    "| {} / {} | {} | {:.2}× | {:.2}× | {:.2}× |",
                    q.system,
                    o.system,
                    size_label(o.payload),
                    q.store / o.store,
                    q.store_serial / o.store_serial,
                    q.drain / o.drain,
                );
            }
        }
    }
    println!();
    println!(
        "The transport's ceiling: raw quinn, one stream, the same bytes (payload + \
         {RECORD_OVERHEAD} B per record), nothing stored or acknowledged, from connect to the \
         last byte."
    );
    println!();
    println!("| payload | raw quinn stream msgs/s | system | drain / ceiling |");
    println!("|---|---:|---|---:|");
    for &(size, ceiling) in ceilings {
        for r in rows.iter().filter(|r| r.payload == size) {
            println!(
                "| {} | {ceiling:.0} | {} | {:.2}× |",
                size_label(size),
                r.system,
                r.drain / ceiling
            );
        }
    }
    println!();
    for r in rows {
        if !r.notes.is_empty() {
            println!(
                "{} {}: {}",
                r.system,
                size_label(r.payload),
                r.notes.join("; ")
            );
        }
    }
    println!();
    println!(
        "Note: quicx's store rate counts sends that returned, i.e. whose redb transaction was \
         committed with an fsync (sends in flight together share one commit), or, flushed \
         every N ms (`Fsync::Interval`), committed in the store and on the disk within N ms. \
         mosquitto acks a \
         QoS 1 PUBLISH once the message is in its memory; with `persistence true` it writes a \
         snapshot of its whole database every `autosave_interval` seconds (1800 by default) and \
         at shutdown, so a crash loses what arrived since the last snapshot. That is not a \
         per-message fsync. mosquitto config: max_queued_messages 0 (unlimited), \
         max_queued_bytes 0, max_inflight_messages {MOSQUITTO_INFLIGHT} (the window quicx \
         uses per device). \"Nagle on\" is mosquitto's and rumqttc's default; \"TCP_NODELAY\" \
         is set_tcp_nodelay true in mosquitto and TCP_NODELAY in rumqttc."
    );
    if let Err(why) = broker {
        println!();
        println!("!!!!!!!! mosquitto SKIPPED: {why}");
        println!("!!!!!!!! the table above has quicx only; there is no comparison.");
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    for &p in &cli.payloads {
        if p < 8 {
            bail!("payloads must be at least 8 bytes (got {p})");
        }
    }
    let base = cli.dir.clone().unwrap_or_else(std::env::temp_dir);
    let mosquitto = if cli.no_mosquitto {
        Err("--no-mosquitto".to_owned())
    } else {
        ensure_mosquitto().await
    };
    if let Err(why) = &mosquitto {
        eprintln!();
        eprintln!("!!!!!!!! mosquitto SKIPPED: {why}");
        eprintln!();
    }
    let mut variants = vec![
        Variant {
            autosave: Autosave::Default,
            nodelay: false,
        },
        Variant {
            autosave: Autosave::Default,
            nodelay: true,
        },
    ];
    if cli.mosquitto_autosave_1s {
        variants.push(Variant {
            autosave: Autosave::EverySecond,
            nodelay: true,
        });
    }
    if cli.mosquitto_per_change {
        variants.push(Variant {
            autosave: Autosave::EveryChange,
            nodelay: true,
        });
    }
    eprintln!("load average (1, 5, 15 min) at the start: {}", loadavg());
    let dev = DevCertificate::localhost()?;
    let mut rows = Vec::new();
    let mut ceilings = Vec::new();
    for &size in &cli.payloads {
        eprintln!(
            "raw quinn stream (the transport's ceiling), {}...",
            size_label(size)
        );
        let phase = Duration::from_secs(cli.phase_secs);
        ceilings.push((size, quinn_ceiling(&dev, size, cli.messages, phase).await?));
        eprintln!("quicx, {}...", size_label(size));
        rows.push(quicx_run(&cli, &dev, &base, size, Fsync::EveryCommit, Device::Channel).await?);
        if cli.push_handler {
            eprintln!("quicx, device with a push_handler, {}...", size_label(size));
            rows.push(
                quicx_run(&cli, &dev, &base, size, Fsync::EveryCommit, Device::Handler).await?,
            );
        }
        if cli.quicx1 {
            eprintln!("quicx, device on quicx/1, {}...", size_label(size));
            rows.push(quicx_run(&cli, &dev, &base, size, Fsync::EveryCommit, Device::V1).await?);
        }
        if cli.fsync_interval_ms > 0 {
            let every = Duration::from_millis(cli.fsync_interval_ms);
            eprintln!("quicx flushed every {every:?}, {}...", size_label(size));
            rows.push(
                quicx_run(
                    &cli,
                    &dev,
                    &base,
                    size,
                    Fsync::Interval(every),
                    Device::Channel,
                )
                .await?,
            );
        }
        if let Ok(bin) = &mosquitto {
            for &v in &variants {
                eprintln!("{}, {}...", v.label(), size_label(size));
                rows.push(mosquitto_run(&cli, bin, &base, size, v).await?);
            }
        }
    }
    let version = mosquitto.as_ref().map(|bin| mosquitto_version(bin));
    print_report(
        &cli,
        &rows,
        &ceilings,
        version.as_deref().map_err(|e| e.as_str()),
    );
    if rows
        .iter()
        .any(|r| r.lost() > 0 || r.check.duplicates > 0 || r.check.out_of_order > 0)
    {
        bail!("messages were lost, duplicated or reordered (see the table)");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // On Ctrl-C the run is dropped: the broker is stopped and the directories removed.
    tokio::select! {
        r = run(cli) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}
