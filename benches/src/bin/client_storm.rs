//! Client storm benchmark (`cargo run -p quicx-benches --release --bin quicx-client-storm`):
//! a gateway or fleet simulator opening thousands of client connections in one process must not
//! hold up the process's other clients. While `--clients` connections (3,000 by default, each a
//! `quicx::Client` with its own socket, `--parallel` handshakes in flight) open from this
//! process:
//!
//! - an unrelated client, connected before the storm, calls `Echo` every 5 ms: its p50, p99 and
//!   worst latency, next to the same probe on the idle process just before (same run);
//! - every 100 ms a new client connects and makes one call: the time that takes.
//!
//! For the default placement (`Placement::Auto`: the process's first 64 clients, the probe
//! among them, on the application's runtime, the storm beyond them spread over one shared
//! client I/O thread per core), `Placement::IoThread` (every client on those threads) and
//! `Placement::CallerRuntime` (every client on the application's own multi-thread runtime), in
//! one run. The server runs in a child process (this
//! binary, `serve`), on loopback. Every loop is bounded in count and time.
#![forbid(unsafe_code)]

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures_util::{StreamExt, stream};
use quicx::{Client, ClientTls, Context, DevCertificate, Placement, Server, ServerTls, Service};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Client connections the storm opens.
    #[arg(long, default_value_t = 3_000)]
    clients: usize,
    /// Handshakes the storm keeps in flight.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    /// The probe's call interval, ms.
    #[arg(long, default_value_t = 5)]
    probe_interval_ms: u64,
    /// How often a newcomer connects during the storm, ms.
    #[arg(long, default_value_t = 100)]
    newcomer_interval_ms: u64,
    /// The idle probe's window before each storm, ms.
    #[arg(long, default_value_t = 1_000)]
    idle_ms: u64,
    /// Bound of one storm, seconds.
    #[arg(long, default_value_t = 120)]
    storm_secs: u64,
    /// Only these placements (default: all three, one storm after the other in this process;
    /// a storm right after another measures slower, so compare each run on its own too).
    #[arg(long, value_enum, value_delimiter = ',')]
    placement: Vec<Which>,
}

/// A placement to run the storm with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    /// `Placement::Auto`.
    Auto,
    /// `Placement::IoThread`.
    IoThread,
    /// `Placement::CallerRuntime`.
    CallerRuntime,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Internal: the server, in a child process; prints its address.
    Serve {
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match &cli.command {
        Some(Cmd::Serve { cert, key }) => runtime.block_on(serve(cert, key)),
        None => runtime.block_on(run(&cli)),
    }
}

async fn serve(cert: &Path, key: &Path) -> anyhow::Result<()> {
    let server = Server::builder()
        .tls(ServerTls::from_pem_files(cert, key)?)
        .max_connections(100_000)
        .build()?;
    server.register(
        "Bench",
        Service::new().method("Echo", |_ctx: Context, v: Vec<u8>| async move { Ok(v) }),
    );
    server.bind("127.0.0.1:0").await?;
    println!("{}", server.local_addr().context("bound")?);
    // Until the parent closes our stdin (or dies).
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        let _ = std::io::stdin().read_line(&mut sink);
    })
    .await?;
    server.shutdown(Duration::from_millis(200)).await;
    Ok(())
}

/// The server child; killed on drop.
struct ChildServer(Child);

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Setup {
    addr: SocketAddr,
    cert: PathBuf,
}

async fn connect(setup: &Setup, placement: Placement) -> anyhow::Result<Client> {
    Ok(Client::builder()
        .tls(ClientTls::new().trust_pem_file(&setup.cert)?)
        .placement(placement)
        .connect_addr(setup.addr, "localhost")
        .await?)
}

async fn echo(client: &Client) -> anyhow::Result<()> {
    let reply: Vec<u8> = client.call("Bench", "Echo", &vec![1u8; 32]).await?;
    anyhow::ensure!(reply.len() == 32, "short echo");
    Ok(())
}

/// Calls every `interval` until `stop` is set or `limit` passes; the latencies.
async fn probe(
    client: &Client,
    interval: Duration,
    stop: &AtomicBool,
    limit: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let end = Instant::now() + limit;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        ticker.tick().await;
        let t = Instant::now();
        echo(client).await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

#[derive(Debug)]
struct Row {
    placement: &'static str,
    idle: Stats,
    storm: Stats,
    newcomers: Stats,
    handshakes_per_sec: f64,
}

#[derive(Debug, Default)]
struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Stats {
    fn of(mut v: Vec<Duration>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let at = |q: f64| ms(v[((v.len() - 1) as f64 * q).round() as usize]);
        Self {
            n: v.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: ms(*v.last().expect("not empty")),
        }
    }
}

async fn storm(
    cli: &Cli,
    setup: &Setup,
    placement: Placement,
    name: &'static str,
) -> anyhow::Result<Row> {
    let probe_client = connect(setup, placement).await?;
    echo(&probe_client).await?;
    let interval = Duration::from_millis(cli.probe_interval_ms);
    let never = AtomicBool::new(false);
    let idle = probe(
        &probe_client,
        interval,
        &never,
        Duration::from_millis(cli.idle_ms),
    )
    .await?;

    let limit = Duration::from_secs(cli.storm_secs);
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let opening = async {
        let clients: Vec<anyhow::Result<Client>> = tokio::time::timeout(
            limit,
            stream::iter(0..cli.clients)
                .map(|_| connect(setup, placement))
                .buffer_unordered(cli.parallel)
                .collect(),
        )
        .await
        .context("the storm did not finish in time")?;
        let elapsed = started.elapsed();
        done.store(true, Ordering::Relaxed);
        let clients = clients.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::Ok((clients, elapsed))
    };
    let newcomers = async {
        let mut times = Vec::new();
        let mut ticker = tokio::time::interval(Duration::from_millis(cli.newcomer_interval_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        while !done.load(Ordering::Relaxed) && started.elapsed() < limit {
            ticker.tick().await;
            let t = Instant::now();
            let c = connect(setup, placement).await?;
            echo(&c).await?;
            times.push(t.elapsed());
            c.close().await;
        }
        anyhow::Ok(times)
    };
    let (opened, probed, newcomers) = tokio::join!(
        opening,
        probe(&probe_client, interval, &done, limit),
        newcomers
    );
    let (clients, elapsed) = opened?;
    let row = Row {
        placement: name,
        idle: Stats::of(idle),
        storm: Stats::of(probed?),
        newcomers: Stats::of(newcomers?),
        handshakes_per_sec: clients.len() as f64 / elapsed.as_secs_f64(),
    };
    stream::iter(clients)
        .for_each_concurrent(256, |c| async move { c.close().await })
        .await;
    probe_client.close().await;
    Ok(row)
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("quicx-client-storm-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(cli, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(cli: &Cli, dir: &Path) -> anyhow::Result<()> {
    let dev = DevCertificate::localhost()?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, dev.certificate_pem())?;
    std::fs::write(&key, dev.private_key_pem())?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("serve")
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let server = ChildServer(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr: SocketAddr = line
        .trim()
        .parse()
        .with_context(|| format!("server said {line:?}"))?;
    let setup = Setup { addr, cert };
    println!(
        "client storm: {} connections ({} handshakes in flight) from this process while a probe \
         calls every {} ms and a newcomer connects every {} ms; server in a child process; \
         latencies in ms",
        cli.clients, cli.parallel, cli.probe_interval_ms, cli.newcomer_interval_ms
    );
    let mut rows = Vec::new();
    for (which, placement, name) in [
        (
            Which::Auto,
            Placement::Auto,
            "Auto (first 64 clients on the caller's runtime, the rest on the I/O threads)",
        ),
        (
            Which::IoThread,
            Placement::IoThread,
            "IoThread (shared client I/O threads)",
        ),
        (
            Which::CallerRuntime,
            Placement::CallerRuntime,
            "CallerRuntime",
        ),
    ] {
        if cli.placement.is_empty() || cli.placement.contains(&which) {
            rows.push(storm(cli, &setup, placement, name).await?);
        }
    }
    println!(
        "\n| placement | idle probe p50 / p99 | probe during storm p50 / p99 / max (calls) | newcomer connect+call p50 / max (n) | storm handshakes/s |"
    );
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.2} / {:.2} | {:.2} / {:.2} / {:.1} ({}) | {:.1} / {:.1} ({}) | {:.0} |",
            r.placement,
            r.idle.p50,
            r.idle.p99,
            r.storm.p50,
            r.storm.p99,
            r.storm.max,
            r.storm.n,
            r.newcomers.p50,
            r.newcomers.max,
            r.newcomers.n,
            r.handshakes_per_sec
        );
    }
    drop(server);
    Ok(())
}
