//! `quicx-bench`: quicx side by side with raw quinn, tonic and tarpc, in one run on one machine.
//! Run it with `cargo xtask bench [--quick]`; see BENCHMARKS.md.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

mod devices;
mod load;
mod report;
mod systems;

use load::{Paced, ProcessCpu, Sample, closed_loop, closed_loop_spread, cpu_time, paced};
use report::{PushCpu, Record};
use systems::{ServerInfo, System, Work};

#[derive(Parser)]
#[command(about = "quicx benchmarks against raw quinn, tonic and tarpc")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// A short run (under 3 minutes): fewer points, one repetition, short windows.
    #[arg(long)]
    quick: bool,
    /// Where report.md, results.json and the SVG plots go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Only these systems (default: all but the metrics A/B variants `quicx-no-metrics` and
    /// `quicx-prometheus`, which are named explicitly).
    #[arg(long, value_enum, value_delimiter = ',')]
    system: Vec<System>,
    /// Only these process layouts (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    layout: Vec<Layout>,
    /// Skip the many-devices fleet benchmark.
    #[arg(long)]
    no_fleet: bool,
    /// Messages per push run (default 100,000 quick, 1,000,000 full).
    #[arg(long)]
    push_count: Option<u32>,
    /// Devices per fleet run, repeatable (default 1,000 quick; 1,000 and 10,000 full).
    #[arg(long)]
    fleet_size: Vec<usize>,
    /// Callers per echo point, repeatable (default 1, 64, 256 quick; 1, 16, 64, 256 full).
    #[arg(long)]
    concurrency: Vec<usize>,
    /// Seconds measured per echo point (default 0.6 quick, 3 full).
    #[arg(long)]
    seconds: Option<f64>,
    /// Only these scenarios (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<Scenario>,
    /// Install the Prometheus recorder in this process too, so the clients of `quicx-prometheus`
    /// record into it in the two-process layout (implied when `quicx-prometheus` runs in a
    /// one-process layout). `quicx` and `quicx-secured` cannot run then: they would record too.
    #[arg(long)]
    prometheus_client: bool,
    /// quicx clients on `Placement::CallerRuntime` instead of the default `Placement::Auto`
    /// (the same while the run holds 64 clients or fewer; the fleet scenario holds more).
    #[arg(long)]
    client_on_caller_runtime: bool,
    /// quicx clients on `Placement::IoThread`: each call handed to the client I/O thread that
    /// drives the connection, instead of the default `Placement::Auto`, which drives the
    /// connection on the caller's runtime (for the process's first 64 clients)
    #[arg(long, conflicts_with = "client_on_caller_runtime")]
    client_on_io_thread: bool,
    /// quicx clients receive pushes through `quicx::push_handler` (a function called where the
    /// pushes are read, as the raw quinn client counts them) instead of a `push_channel` read by
    /// a task
    #[arg(long)]
    push_handler: bool,
    /// The quicx server pushes from tasks on its application runtime (as application code that
    /// calls `Server::send_to_client` does) instead of from tasks spawned by the handler on the
    /// I/O thread that drives the connection
    #[arg(long)]
    push_from_app: bool,
    /// The raw quinn client hands each push it read (its bytes) to a task through a bounded
    /// tokio channel of 1,024 (trying without waiting first, as a quicx push channel does),
    /// instead of counting it where it was read: what the hand-off to a task costs it
    #[arg(long)]
    quinn_push_channel: bool,
    /// Handshakes in flight at once while a fleet connects (default 64). The servers' RTT
    /// estimates come from those handshakes: with many in flight the devices' process answers
    /// late, each server's estimate grows with how late, and a server that estimates a longer
    /// RTT probes a device whose push waits in that process later (the fleet table shows the
    /// estimate at the broadcast)
    #[arg(long, default_value_t = 64)]
    fleet_connect_parallelism: usize,
    /// The quicx clients that call the work methods (the handler-cpu scenario's, and the blocking
    /// scenario's busy connection) share one UDP socket on a fixed port, so the kernel puts all
    /// their connections on one server I/O thread: the worst case of `SO_REUSEPORT`'s hashing,
    /// which otherwise happens in about one run in eight with 4 connections on 2 threads
    #[arg(long)]
    handler_one_socket: bool,
}

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Echo calls at each concurrency and payload.
    Calls,
    /// Server push throughput.
    Push,
    /// Connection setup time.
    Setup,
    /// Many connected devices: handshakes, memory, broadcast.
    Fleet,
    /// Handlers that burn a fixed CPU time per call, several connections: calls/s, server cores.
    HandlerCpu,
    /// Isolation: one connection's handler blocks its thread; another connection's latency.
    Blocking,
}

/// One load of the handler-cpu scenario.
#[derive(Debug, Clone, Copy)]
struct CpuLoad {
    /// CPU each call's handler burns, µs.
    work_us: u64,
    /// Concurrent callers, spread evenly over the connections.
    callers: usize,
    /// Connections, each its own client.
    connections: usize,
}

/// Cores each process used over a measured window (CPU time ÷ wall time).
#[derive(Debug, Clone, Copy)]
struct Cores {
    server: f64,
    client: f64,
}

/// How long each of connection A's calls blocks its handler in the blocking scenario.
const BLOCK_MS: u64 = 300;
/// Connection B's call interval in the blocking scenario.
const PROBE_INTERVAL: Duration = Duration::from_millis(5);

#[derive(Subcommand)]
enum Cmd {
    /// Internal: run one system's server in this process (the two-process layout).
    Serve {
        #[arg(long, value_enum)]
        system: System,
    },
}

/// Where server and client run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
enum Layout {
    /// Server and client in one process, on one default (multi-thread) tokio runtime.
    OneProcess,
    /// Server and client in one process, each on its own current_thread runtime and thread.
    ThreadPerSide,
    /// Server and client in separate processes, each on a default tokio runtime (as deployed).
    TwoProcesses,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Self::OneProcess => "1 process, multi-thread runtime",
            Self::ThreadPerSide => "1 process, current_thread runtime per side",
            Self::TwoProcesses => "2 processes, multi-thread runtimes",
        }
    }
}

struct Settings {
    payloads: Vec<usize>,
    concurrency: Vec<usize>,
    repetitions: usize,
    warmup: Duration,
    duration: Duration,
    push_count: u32,
    fleets: Vec<usize>,
    setup_rounds: usize,
    cpu_loads: Vec<CpuLoad>,
    blocking_window: Duration,
}

impl Settings {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                payloads: vec![32],
                concurrency: vec![1, 64, 256],
                repetitions: 1,
                warmup: Duration::from_millis(200),
                duration: Duration::from_millis(600),
                push_count: 100_000,
                fleets: vec![1_000],
                setup_rounds: 3,
                cpu_loads: vec![CpuLoad {
                    work_us: 100,
                    callers: 32,
                    connections: 4,
                }],
                blocking_window: Duration::from_secs(3),
            }
        } else {
            Self {
                payloads: vec![32, 4096],
                concurrency: vec![1, 16, 64, 256],
                repetitions: 3,
                warmup: Duration::from_secs(1),
                duration: Duration::from_secs(3),
                push_count: 1_000_000,
                fleets: vec![1_000, 10_000],
                setup_rounds: 20,
                cpu_loads: vec![
                    CpuLoad {
                        work_us: 20,
                        callers: 64,
                        connections: 8,
                    },
                    CpuLoad {
                        work_us: 100,
                        callers: 32,
                        connections: 4,
                    },
                ],
                blocking_window: Duration::from_secs(10),
            }
        }
    }

    fn describe(&self) -> String {
        format!(
            "Settings: payloads {:?} B, concurrency {:?} callers on one connection, {} repetition(s) \
             run interleaved (A B A B ...), medians reported; each run {:.1} s warm-up + {:.1} s measured. \
             Release build, loopback.",
            self.payloads,
            self.concurrency,
            self.repetitions,
            self.warmup.as_secs_f64(),
            self.duration.as_secs_f64()
        )
    }
}

/// A server running in a child process.
struct ChildServer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ChildServer {
    fn spawn(system: System) -> anyhow::Result<(Self, ServerInfo)> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["serve", "--system"])
            .arg(system.to_possible_value().expect("named").get_name())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let info: ServerInfo =
            serde_json::from_str(&line).with_context(|| format!("server said {line:?}"))?;
        Ok((
            Self {
                child,
                stdin,
                stdout,
            },
            info,
        ))
    }

    fn cpu(&mut self) -> anyhow::Result<Duration> {
        writeln!(self.stdin, "cpu")?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(Duration::from_secs_f64(line.trim().parse()?))
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_child(system: System) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        if system == System::QuicxPrometheus {
            systems::install_recorder("quicx-prometheus server")?;
        }
        let info = systems::serve(system).await?;
        println!("{}", serde_json::to_string(&info)?);
        std::io::stdout().flush()?;
        let stdin = tokio::io::BufReader::new(tokio::io::stdin());
        let mut lines = tokio::io::AsyncBufReadExt::lines(stdin);
        while let Some(line) = lines.next_line().await? {
            if line.trim() == "cpu" {
                println!("{}", cpu_time().as_secs_f64());
                std::io::stdout().flush()?;
            }
        }
        Ok(())
    })
}

/// Servers and the client runtime of one layout.
struct Env {
    runtime: tokio::runtime::Runtime,
    servers: HashMap<System, ServerInfo>,
    children: HashMap<System, ChildServer>,
    /// Keeps the server thread of the thread-per-side layout running.
    _server_thread: Option<std::sync::mpsc::Sender<()>>,
}

impl Env {
    fn new(layout: Layout, systems: &[System]) -> anyhow::Result<Self> {
        let mut servers = HashMap::new();
        let mut children = HashMap::new();
        let mut server_thread = None;
        let runtime = match layout {
            Layout::OneProcess | Layout::TwoProcesses => tokio::runtime::Runtime::new()?,
            Layout::ThreadPerSide => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        };
        match layout {
            Layout::OneProcess => {
                for &s in systems {
                    servers.insert(s, runtime.block_on(systems::serve(s))?);
                }
            }
            Layout::ThreadPerSide => {
                let (info_tx, info_rx) = std::sync::mpsc::channel();
                let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
                let wanted = systems.to_vec();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("server runtime");
                    rt.block_on(async move {
                        for s in wanted {
                            let _ =
                                info_tx.send(systems::serve(s).await.map_err(|e| e.to_string()));
                        }
                        // Park the server runtime until the environment is dropped.
                        let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
                    });
                });
                for _ in systems {
                    let info = info_rx.recv()?.map_err(anyhow::Error::msg)?;
                    servers.insert(info.system, info);
                }
                server_thread = Some(stop_tx);
            }
            Layout::TwoProcesses => {
                for &s in systems {
                    let (child, info) = ChildServer::spawn(s)?;
                    servers.insert(s, info);
                    children.insert(s, child);
                }
            }
        }
        Ok(Self {
            runtime,
            servers,
            children,
            _server_thread: server_thread,
        })
    }

    /// CPU used so far by both sides of `system`.
    fn cpu(&mut self, system: System) -> Duration {
        let own = cpu_time();
        match self.children.get_mut(&system) {
            Some(child) => own + child.cpu().unwrap_or_default(),
            None => own,
        }
    }

    fn calls(
        &mut self,
        system: System,
        payload: usize,
        concurrency: usize,
        s: &Settings,
    ) -> anyhow::Result<(Sample, f64)> {
        let info = self.servers[&system].clone();
        let cpu0 = self.cpu(system);
        let sample = self.runtime.block_on(async {
            let (caller, keep) = systems::echo_caller(&info, payload).await?;
            let sample = closed_loop(caller, concurrency, s.warmup, s.duration).await;
            drop(keep);
            sample
        })?;
        let cpu = self.cpu(system).saturating_sub(cpu0);
        Ok((
            sample,
            cpu.as_secs_f64() * 1e6 / sample.total_calls.max(1) as f64,
        ))
    }
}

impl Env {
    /// One handler-cpu point on `system`: the closed loop's figures and, in the two-process
    /// layout, the cores each process used over the measured window.
    fn handler_cpu(
        &mut self,
        system: System,
        load: CpuLoad,
        s: &Settings,
    ) -> anyhow::Result<(Sample, Option<Cores>)> {
        let info = self.servers[&system].clone();
        let Self {
            runtime, children, ..
        } = self;
        let child = children.get_mut(&system);
        runtime.block_on(async {
            let mut callers = Vec::with_capacity(load.connections);
            let mut keep = Vec::with_capacity(load.connections);
            for _ in 0..load.connections {
                let (caller, k) = systems::work_caller(&info, Work::Spin(load.work_us)).await?;
                callers.push(caller);
                keep.push(k);
            }
            let cores = async {
                // The CPU query is a short pipe round trip; it blocks only this (non-worker)
                // thread, and only with a child, i.e. on a multi-thread runtime.
                let child = child?;
                tokio::time::sleep(s.warmup).await;
                let (t0, cpu0, own0) = (Instant::now(), child.cpu().ok()?, cpu_time());
                tokio::time::sleep(s.duration).await;
                let (t1, cpu1, own1) = (Instant::now(), child.cpu().ok()?, cpu_time());
                let wall = (t1 - t0).as_secs_f64();
                Some(Cores {
                    server: cpu1.saturating_sub(cpu0).as_secs_f64() / wall,
                    client: own1.saturating_sub(own0).as_secs_f64() / wall,
                })
            };
            let (sample, cores) = tokio::join!(
                closed_loop_spread(&callers, load.callers, s.warmup, s.duration),
                cores
            );
            drop(keep);
            Ok((sample?, cores))
        })
    }

    /// The blocking scenario on `system`: connection A calls `work` (a blocking handler) back to
    /// back while connection B's paced probe is measured; returns B's figures and A's calls.
    fn blocking(
        &mut self,
        system: System,
        work: Work,
        window: Duration,
    ) -> anyhow::Result<(Paced, u64)> {
        let info = self.servers[&system].clone();
        self.runtime.block_on(async {
            let (probe, keep_b) = systems::echo_caller(&info, 32).await?;
            probe().await.context("first probe call")?;
            let (blocker, keep_a) = systems::work_caller(&info, work).await?;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stopped = stop.clone();
            // Bounded in time and count: stops when told, or at the latest a minute late.
            let limit = Instant::now() + window + Duration::from_secs(60);
            let a = tokio::spawn(async move {
                let mut calls = 0u64;
                while !stopped.load(std::sync::atomic::Ordering::Relaxed)
                    && Instant::now() < limit
                    && calls < 1_000_000
                {
                    blocker().await.context("blocked call")?;
                    calls += 1;
                }
                Ok::<_, anyhow::Error>(calls)
            });
            // Let A's first call reach its handler: from here on one is always in progress.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let measured = paced(probe, PROBE_INTERVAL, window).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let blocked_calls = a.await??;
            drop((keep_a, keep_b));
            Ok((measured, blocked_calls))
        })
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let rmem = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap_or_default();
    format!(
        "Machine: {cpu}, {cores} cores, Linux {}, net.core.rmem_max {} bytes.",
        kernel.trim(),
        rmem.trim()
    )
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::Serve { system }) = cli.command {
        return serve_child(system);
    }
    let mut settings = Settings::new(cli.quick);
    if let Some(n) = cli.push_count {
        settings.push_count = n.max(1);
    }
    if !cli.fleet_size.is_empty() {
        settings.fleets = cli.fleet_size.clone();
    }
    if !cli.concurrency.is_empty() {
        settings.concurrency = cli.concurrency.clone();
    }
    if let Some(seconds) = cli.seconds {
        settings.duration = Duration::from_secs_f64(seconds);
    }
    let systems: Vec<System> = if cli.system.is_empty() {
        System::default_set()
    } else {
        cli.system.clone()
    };
    let layouts: Vec<Layout> = if cli.layout.is_empty() {
        if cli.quick {
            vec![Layout::OneProcess, Layout::TwoProcesses]
        } else {
            vec![
                Layout::OneProcess,
                Layout::ThreadPerSide,
                Layout::TwoProcesses,
            ]
        }
    } else {
        cli.layout.clone()
    };
    if cli.client_on_caller_runtime {
        systems::CLIENT_ON_CALLER_RUNTIME.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if cli.client_on_io_thread {
        systems::CLIENT_ON_IO_THREAD.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if cli.push_handler {
        systems::PUSH_HANDLER.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if cli.handler_one_socket {
        systems::HANDLER_ONE_SOCKET.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    devices::CONNECT_PARALLELISM.store(
        cli.fleet_connect_parallelism.max(1),
        std::sync::atomic::Ordering::Relaxed,
    );
    if cli.push_from_app {
        systems::PUSH_FROM_APP.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if cli.quinn_push_channel {
        systems::QUINN_PUSH_CHANNEL.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    // A `metrics` recorder is process-wide: once installed here, every quicx server and client
    // of this process with metrics on records into it.
    let recorder_here = cli.prometheus_client
        || (systems.contains(&System::QuicxPrometheus)
            && layouts.iter().any(|&l| l != Layout::TwoProcesses));
    if recorder_here {
        anyhow::ensure!(
            !systems.contains(&System::Quicx) && !systems.contains(&System::QuicxSecured),
            "with the Prometheus recorder in this process (--prometheus-client, or quicx-prometheus \
             in a one-process layout), quicx and quicx-secured would record into it too: \
             measure them in another run"
        );
        systems::install_recorder("bench process")?;
    }
    std::fs::create_dir_all(&cli.out)?;
    let pushers: Vec<System> = systems.iter().copied().filter(|s| s.pushes()).collect();
    let fleet_systems: Vec<System> = systems
        .iter()
        .copied()
        .filter(|s| matches!(s, System::Quicx | System::Quinn))
        .collect();
    let wants = |s: Scenario| cli.scenario.is_empty() || cli.scenario.contains(&s);
    let do_fleet =
        wants(Scenario::Fleet) && !cli.no_fleet && layouts.contains(&Layout::TwoProcesses);
    let do_calls = wants(Scenario::Calls);
    let do_push = wants(Scenario::Push);
    let do_setup = wants(Scenario::Setup);
    // The blocking scenario needs handlers: every system but raw quinn, which serves the
    // handler-cpu work (a busy loop per request) to show the transport's own floor there.
    let handler_systems: Vec<System> = systems
        .iter()
        .copied()
        .filter(|&s| s != System::Quinn)
        .collect();
    let cpu_systems = systems.clone();
    let do_handler_cpu = wants(Scenario::HandlerCpu);
    let do_blocking = wants(Scenario::Blocking);
    // A's handler per system: an ordinary one that blocks, and for quicx also `blocking_method`.
    let blocking_variants: Vec<(System, Work, &'static str)> = handler_systems
        .iter()
        .flat_map(|&s| {
            let mut v = vec![(s, Work::Sleep(BLOCK_MS), "async handler, blocks")];
            if s == System::Quicx {
                v.push((s, Work::SleepBlocking(BLOCK_MS), "blocking_method"));
            }
            v
        })
        .collect();
    let planned = layouts.len()
        * (settings.payloads.len()
            * settings.concurrency.len()
            * settings.repetitions
            * systems.len()
            + settings.repetitions * pushers.len()
            + systems.len())
        + if do_fleet {
            settings.fleets.len() * fleet_systems.len()
        } else {
            0
        }
        + layouts.len()
            * (usize::from(do_handler_cpu)
                * settings.cpu_loads.len()
                * settings.repetitions
                * cpu_systems.len()
                + usize::from(do_blocking) * blocking_variants.len());
    let bar = ProgressBar::new(planned as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")?
            .progress_chars("=> "),
    );
    let mut records = Vec::new();
    for &layout in &layouts {
        bar.set_message(format!("starting servers: {}", layout.name()));
        let mut env = Env::new(layout, &systems)?;
        for &payload in settings.payloads.iter().filter(|_| do_calls) {
            for &c in &settings.concurrency {
                let mut samples: HashMap<System, Vec<(Sample, f64)>> = HashMap::new();
                for _ in 0..settings.repetitions {
                    // Interleaved: every system once per repetition.
                    for &system in &systems {
                        bar.set_message(format!(
                            "{} {payload} B c={c} ({})",
                            system.name(),
                            layout.name()
                        ));
                        let result = env
                            .calls(system, payload, c, &settings)
                            .with_context(|| format!("{} c={c}", system.name()))?;
                        samples.entry(system).or_default().push(result);
                        bar.inc(1);
                    }
                }
                for (system, runs) in samples {
                    records.push(Record {
                        system,
                        system_name: system.name(),
                        layout: layout.name(),
                        scenario: "calls",
                        payload,
                        concurrency: c,
                        rate: median(runs.iter().map(|r| r.0.rate).collect()),
                        p50_us: median(runs.iter().map(|r| r.0.p50_us).collect()),
                        p99_us: median(runs.iter().map(|r| r.0.p99_us).collect()),
                        cpu_us_per_call: median(runs.iter().map(|r| r.1).collect()),
                        repetitions: runs.len(),
                        fleet: None,
                        setup_ms: None,
                        handler_cpu: None,
                        blocking: None,
                        push_cpu: None,
                    });
                }
            }
        }
        let push_senders = 16;
        let mut push_samples: HashMap<System, Vec<(f64, Option<PushCpu>)>> = HashMap::new();
        for _ in 0..settings.repetitions * usize::from(do_push) {
            for &system in &pushers {
                bar.set_message(format!("{} pushes ({})", system.name(), layout.name()));
                let info = env.servers[&system].clone();
                let server = env.children.get(&system).map(|c| c.child.id());
                let before = server.map(ProcessCpu::of);
                let (started, own) = (Instant::now(), cpu_time());
                let rate = env
                    .runtime
                    .block_on(systems::push_rate(
                        &info,
                        settings.push_count,
                        32,
                        push_senders,
                        Duration::from_secs(60),
                    ))
                    .with_context(|| format!("{} push", system.name()))?;
                let (wall, own) = (started.elapsed().as_secs_f64(), cpu_time() - own);
                let cpu = server.zip(before).map(|(pid, before)| {
                    let (server, busiest) = ProcessCpu::of(pid).since(&before);
                    let server = server.as_secs_f64();
                    let per_push = 1e6 / f64::from(settings.push_count);
                    PushCpu {
                        server_cores: server / wall,
                        server_busiest_thread_cores: busiest.as_secs_f64() / wall,
                        client_cores: own.as_secs_f64() / wall,
                        server_us_per_push: server * per_push,
                        client_us_per_push: own.as_secs_f64() * per_push,
                    }
                });
                push_samples.entry(system).or_default().push((rate, cpu));
                bar.inc(1);
            }
        }
        for (system, runs) in push_samples {
            let rates = runs.iter().map(|r| r.0).collect();
            let cpus: Vec<PushCpu> = runs.iter().filter_map(|r| r.1).collect();
            let med = |f: fn(&PushCpu) -> f64| median(cpus.iter().map(f).collect());
            let push_cpu = (!cpus.is_empty()).then(|| PushCpu {
                server_cores: med(|c| c.server_cores),
                server_busiest_thread_cores: med(|c| c.server_busiest_thread_cores),
                client_cores: med(|c| c.client_cores),
                server_us_per_push: med(|c| c.server_us_per_push),
                client_us_per_push: med(|c| c.client_us_per_push),
            });
            records.push(Record {
                system,
                system_name: system.name(),
                layout: layout.name(),
                scenario: "push",
                payload: 32,
                concurrency: if system == System::TonicTls {
                    1
                } else {
                    push_senders as usize
                },
                repetitions: runs.len(),
                rate: median(rates),
                p50_us: 0.0,
                p99_us: 0.0,
                cpu_us_per_call: 0.0,
                fleet: None,
                setup_ms: None,
                handler_cpu: None,
                blocking: None,
                push_cpu,
            });
        }
        for &system in systems.iter().filter(|_| do_setup) {
            bar.set_message(format!(
                "{} connection setup ({})",
                system.name(),
                layout.name()
            ));
            let info = env.servers[&system].clone();
            let ms = env
                .runtime
                .block_on(devices::setup_ms(&info, settings.setup_rounds))?;
            records.push(Record {
                system,
                system_name: system.name(),
                layout: layout.name(),
                scenario: "setup",
                payload: 32,
                concurrency: 1,
                rate: 1e3 / ms,
                p50_us: ms * 1e3,
                p99_us: 0.0,
                cpu_us_per_call: 0.0,
                repetitions: settings.setup_rounds,
                fleet: None,
                setup_ms: Some(ms),
                handler_cpu: None,
                blocking: None,
                push_cpu: None,
            });
            bar.inc(1);
        }
        for &load in settings.cpu_loads.iter().filter(|_| do_handler_cpu) {
            let mut samples: HashMap<System, Vec<(Sample, Option<Cores>)>> = HashMap::new();
            for _ in 0..settings.repetitions {
                // Interleaved: every system once per repetition.
                for &system in &cpu_systems {
                    bar.set_message(format!(
                        "{} handler {} µs, {} callers / {} connections ({})",
                        system.name(),
                        load.work_us,
                        load.callers,
                        load.connections,
                        layout.name()
                    ));
                    let result = env
                        .handler_cpu(system, load, &settings)
                        .with_context(|| format!("{} handler-cpu", system.name()))?;
                    samples.entry(system).or_default().push(result);
                    bar.inc(1);
                }
            }
            for &system in &cpu_systems {
                let Some(runs) = samples.remove(&system) else {
                    continue;
                };
                let cores: Vec<Cores> = runs.iter().filter_map(|r| r.1).collect();
                // Per run, then the median: a run's cores with its own rate.
                let beyond: Vec<f64> = runs
                    .iter()
                    .filter(|r| r.0.rate > 0.0)
                    .filter_map(|r| r.1.map(|c| c.server * 1e6 / r.0.rate - load.work_us as f64))
                    .collect();
                records.push(Record {
                    system,
                    system_name: system.name(),
                    layout: layout.name(),
                    scenario: "handler-cpu",
                    payload: 8,
                    concurrency: load.callers,
                    rate: median(runs.iter().map(|r| r.0.rate).collect()),
                    p50_us: median(runs.iter().map(|r| r.0.p50_us).collect()),
                    p99_us: median(runs.iter().map(|r| r.0.p99_us).collect()),
                    cpu_us_per_call: 0.0,
                    repetitions: runs.len(),
                    fleet: None,
                    setup_ms: None,
                    handler_cpu: Some(report::HandlerCpu {
                        work_us: load.work_us,
                        callers: load.callers,
                        connections: load.connections,
                        server_cores: (!cores.is_empty())
                            .then(|| median(cores.iter().map(|c| c.server).collect())),
                        client_cores: (!cores.is_empty())
                            .then(|| median(cores.iter().map(|c| c.client).collect())),
                        server_us_beyond_handler: (!beyond.is_empty()).then(|| median(beyond)),
                    }),
                    blocking: None,
                    push_cpu: None,
                });
            }
        }
        for &(system, work, handler) in blocking_variants.iter().filter(|_| do_blocking) {
            bar.set_message(format!(
                "{} blocking isolation, {handler} ({})",
                system.name(),
                layout.name()
            ));
            let (probe, blocked_calls) = env
                .blocking(system, work, settings.blocking_window)
                .with_context(|| format!("{} blocking, {handler}", system.name()))?;
            records.push(Record {
                system,
                system_name: system.name(),
                layout: layout.name(),
                scenario: "blocking",
                payload: 32,
                concurrency: 1,
                rate: probe.calls as f64 / settings.blocking_window.as_secs_f64(),
                p50_us: probe.p50_us,
                p99_us: probe.p99_us,
                cpu_us_per_call: 0.0,
                repetitions: 1,
                fleet: None,
                setup_ms: None,
                handler_cpu: None,
                blocking: Some(report::Blocking {
                    handler,
                    block_ms: BLOCK_MS,
                    interval_ms: PROBE_INTERVAL.as_millis() as u64,
                    window_s: settings.blocking_window.as_secs_f64(),
                    probe_calls: probe.calls,
                    probe_errors: probe.errors,
                    probe_max_us: probe.max_us,
                    blocked_calls,
                }),
                push_cpu: None,
            });
            bar.inc(1);
        }
        if do_fleet && layout == Layout::TwoProcesses {
            for &n in &settings.fleets {
                for &system in &fleet_systems {
                    bar.set_message(format!("{} fleet of {n}", system.name()));
                    // A fresh server per fleet, so memory growth is the fleet's alone.
                    let (child, info) = ChildServer::spawn(system)?;
                    let fleet = env
                        .runtime
                        .block_on(devices::fleet(&info, n, 32, Some(child.child.id())))
                        .with_context(|| format!("{} fleet of {n}", system.name()))?;
                    drop(child);
                    records.push(Record {
                        system,
                        system_name: system.name(),
                        layout: layout.name(),
                        scenario: "fleet",
                        payload: 32,
                        concurrency: n,
                        rate: fleet.handshakes_per_sec,
                        p50_us: 0.0,
                        p99_us: 0.0,
                        cpu_us_per_call: 0.0,
                        repetitions: 1,
                        fleet: Some(fleet),
                        setup_ms: None,
                        handler_cpu: None,
                        blocking: None,
                        push_cpu: None,
                    });
                    bar.inc(1);
                }
            }
        }
        drop(env);
    }
    bar.finish_with_message("done");
    let started = Instant::now();
    let mut described = settings.describe();
    let options: Vec<&str> = [
        (cli.push_handler, "--push-handler"),
        (cli.push_from_app, "--push-from-app"),
        (cli.quinn_push_channel, "--quinn-push-channel"),
        (cli.client_on_caller_runtime, "--client-on-caller-runtime"),
        (cli.client_on_io_thread, "--client-on-io-thread"),
        (cli.handler_one_socket, "--handler-one-socket"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect();
    if !options.is_empty() {
        described.push_str(&format!(" Options: {}.", options.join(" ")));
    }
    if recorder_here {
        described.push_str(
            " This process has the Prometheus recorder installed: quicx-prometheus records on \
             both sides.",
        );
    }
    let md = report::markdown(&records, &machine(), &described);
    std::fs::write(cli.out.join("report.md"), &md)?;
    std::fs::write(
        cli.out.join("results.json"),
        serde_json::to_string_pretty(&records)?,
    )?;
    let plots = report::plots(&records, &cli.out)?;
    println!("{md}");
    println!(
        "wrote {}/report.md, results.json and {} SVG plots in {:.1} s",
        cli.out.display(),
        plots.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
