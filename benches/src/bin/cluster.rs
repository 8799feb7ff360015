//! Cluster benchmark (`cargo run -p quicx-benches --release --bin quicx-cluster-bench`): three
//! nodes on a real etcd (started here on loopback with a temporary data dir), devices spread
//! over them, then, in one run:
//!
//! - push latency to a device on the same node vs on another node (p50/p99, pushes with
//!   receipt, one at a time), next to one loopback quicx round trip;
//! - pushes/s to local devices vs routed to devices on other nodes (64 in flight);
//! - etcd requests per push in steady state (etcd's own gRPC counters before and after);
//! - presence convergence after a device moves (until every node routes to its new node);
//! - presence convergence after a node dies (its lease expires; until no node lists its
//!   devices): a fourth node in a child process killed with SIGKILL, and node c of this process
//!   halted in place;
//! - durable messages (first, on quiet nodes): stored through node a for an offline device,
//!   then drained by that device connected to node b (messages/s each, every one checked).
//!
//! Every loop is bounded in count and time. Nodes a, b and c share this process (and its 2
//! cores); the child node (`quicx-cluster-bench node ...`, this binary) runs beside it.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures_util::{StreamExt, stream};
use quicx::{
    ClientEndpoint, ClientTls, Context, DevCertificate, Metadata, Server, Service, push_channel,
};
use quicx_cluster::{ClusterNode, ClusterOptions, EtcdOptions};
use quicx_tests::etcd::EtcdServer;

#[derive(Debug, Parser)]
struct Cli {
    /// Devices over the three nodes.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Pushes per latency measurement.
    #[arg(long, default_value_t = 2_000)]
    latency_pushes: usize,
    /// Pushes per throughput measurement (each also bounded to 10 s).
    #[arg(long, default_value_t = 30_000)]
    rate_pushes: usize,
    /// Device moves to time.
    #[arg(long, default_value_t = 30)]
    moves: usize,
    /// Lease TTL of the nodes, seconds.
    #[arg(long, default_value_t = 2)]
    ttl: u64,
    /// Durable messages stored for an offline device through node a, then drained by it from
    /// node b (0 skips; at most 1,000, the cluster's bound per device).
    #[arg(long, default_value_t = 1_000)]
    durable: usize,
    /// Only the durable measurement (no fleet, no presence).
    #[arg(long)]
    durable_only: bool,
}

const SECRET: &str = "bench-cluster-secret";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn start_node(
    dev: &DevCertificate,
    etcd: &EtcdOptions,
    name: &str,
) -> anyhow::Result<(Server, ClusterNode)> {
    let server = Server::builder()
        .dev_certificate(dev)
        .insecure_accept_unverified_client_ids()
        .build()?;
    server.register(
        "Echo",
        Service::new().method("Ping", |_ctx: Context, (): ()| async move { Ok(()) }),
    );
    server.bind("127.0.0.1:0").await?;
    let node = ClusterNode::start(
        &server,
        ClusterOptions::new(
            name,
            etcd.clone(),
            ClientTls::new().trust(dev.certificate()),
            SECRET,
        ),
    )
    .await?;
    Ok((server, node))
}

/// The sum of etcd's handled unary gRPC requests (KV, lease grants), from its `/metrics`.
fn etcd_requests(addr: SocketAddr) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("grpc_server_handled_total{") && l.contains("grpc_type=\"unary\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Latency of pushes with receipt from `node` to `device`, one at a time.
async fn push_latency(node: &ClusterNode, device: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(n);
    let limit = Instant::now() + Duration::from_secs(20);
    for _ in 0..n {
        if Instant::now() > limit {
            break;
        }
        let t = Instant::now();
        node.send_to_client_with_receipt(device, "Bench", "Tick", Metadata::new(), b"x")
            .await?;
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok(samples)
}

/// Pushes/s from `node` to `targets` (round robin), 64 in flight, `n` pushes or 10 s.
async fn push_rate(node: &ClusterNode, targets: &[String], n: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    let limit = start + Duration::from_secs(10);
    let done = stream::iter(0..n)
        .take_while(|_| std::future::ready(Instant::now() < limit))
        .map(|i| {
            let target = &targets[i % targets.len()];
            async move {
                node.send_to_client(
                    target,
                    "Bench",
                    "Tick",
                    Metadata::new(),
                    b"0123456789abcdef",
                )
                .await
            }
        })
        .buffer_unordered(64)
        .fold(Ok(0usize), |acc, r| async move {
            match (acc, r) {
                (Ok(n), Ok(())) => Ok(n + 1),
                (Err(e), _) => Err(e),
                (_, Err(e)) => Err(e),
            }
        })
        .await?;
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// `node <cert.pem> <key.pem> <etcd url> <prefix> <name> <ttl s>`: a cluster node in a child
/// process that prints `READY <addr>` once registered and runs until killed.
async fn child_node(args: &[String]) -> anyhow::Result<()> {
    let [cert, key, etcd, prefix, name, ttl] = args else {
        bail!(
            "usage: quicx-cluster-bench node <cert.pem> <key.pem> <etcd url> <prefix> <name> <ttl s>"
        );
    };
    let server = Server::builder()
        .tls(quicx::ServerTls::from_pem_files(cert, key)?)
        .insecure_accept_unverified_client_ids()
        .build()?;
    let local = server.bind("127.0.0.1:0").await?;
    let etcd = EtcdOptions::new([etcd.as_str()])
        .prefix(prefix.as_str())
        .lease_ttl(Duration::from_secs(ttl.parse()?));
    let tls = ClientTls::new().trust_pem_file(cert)?;
    let _node = ClusterNode::start(
        &server,
        ClusterOptions::new(name.as_str(), etcd, tls, SECRET),
    )
    .await?;
    println!("READY {local}");
    std::io::Write::flush(&mut std::io::stdout())?;
    std::future::pending::<()>().await;
    Ok(())
}

/// Stores `n` durable messages for an offline device through `a` (64 in flight, so their
/// order is the order etcd committed them in: their ids), connects the device to `b_addr` and
/// waits until it received all of them, in id order: (stored/s, drained/s, time from the last
/// message received until none is left in etcd).
async fn durable_drain(
    dev: &DevCertificate,
    a: &ClusterNode,
    b: &ClusterNode,
    b_addr: SocketAddr,
    n: usize,
) -> anyhow::Result<(f64, f64, Duration)> {
    const DEVICE: &str = "durable-device";
    let started = Instant::now();
    let stored = stream::iter(0..n)
        .map(|i| {
            a.send_durable(
                DEVICE,
                "Device",
                "Cmd",
                Metadata::new(),
                (i as u32).to_be_bytes(),
                Duration::from_secs(600),
            )
        })
        .buffered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<u64>, _>>()?;
    let mut order: Vec<(u64, usize)> = stored.iter().copied().zip(0..).collect();
    order.sort_unstable();
    let store_rate = n as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        b.durable_pending(DEVICE).await? == n as i64,
        "not all {n} stored"
    );
    let (tx, mut rx) = push_channel(4096);
    let started = Instant::now();
    let device = quicx::Client::builder()
        .tls(ClientTls::new().trust(dev.certificate()))
        .client_id(DEVICE)
        .push_channel(tx)
        .connect_addr(b_addr, "localhost")
        .await?;
    for &(id, i) in &order {
        let msg = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .context("drain stalled")?
            .context("push channel closed")?;
        anyhow::ensure!(
            msg.payload[..] == (i as u32).to_be_bytes() && msg.durable_id() == Some(id),
            "message {i} (id {id}) out of order"
        );
    }
    let drain_rate = n as f64 / started.elapsed().as_secs_f64();
    let emptied = Instant::now();
    while b.durable_pending(DEVICE).await? > 0 {
        anyhow::ensure!(
            emptied.elapsed() < Duration::from_secs(30),
            "acknowledged messages stay in etcd"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let emptied = emptied.elapsed();
    device.close().await;
    Ok((store_rate, drain_rate, emptied))
}

/// Stores `n` durable messages through `node`, round robin over `devices` offline devices, 64
/// in flight (sends to different devices go side by side; to one device through one node they
/// take turns); the rate, stored/s. Leaves them pending.
async fn durable_store_spread(node: &ClusterNode, n: usize, devices: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    stream::iter(0..n)
        .map(|i| async move {
            let device = format!("spread-device-{}", i % devices);
            node.send_durable(
                &device,
                "Device",
                "Cmd",
                Metadata::new(),
                (i as u32).to_be_bytes(),
                Duration::from_secs(600),
            )
            .await
        })
        .buffered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<u64>, _>>()?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Connects `ids` as devices to `addr`, 64 handshakes at a time, through `sockets`.
async fn connect_devices(
    dev: &DevCertificate,
    sockets: &[ClientEndpoint],
    ids: Vec<String>,
    addr: impl Fn(usize) -> SocketAddr,
    tx: &quicx::PushSender,
) -> anyhow::Result<Vec<quicx::Client>> {
    Ok(stream::iter(ids.into_iter().enumerate())
        .map(|(i, id)| {
            let (tls, tx, endpoint) = (
                ClientTls::new().trust(dev.certificate()),
                tx.clone(),
                sockets[i % sockets.len()].clone(),
            );
            let addr = addr(i);
            async move {
                quicx::Client::builder()
                    .tls(tls)
                    .endpoint(&endpoint)
                    .client_id(id)
                    .push_channel(tx)
                    .connect_addr(addr, "localhost")
                    .await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<quicx::Result<_>>()?)
}

/// Waits until no node of `survivors` lists any of `victims` at node `dead`; the time from
/// `killed`, and when the first of them left the caches (the lease expired in etcd and its
/// deletes began to arrive: the rest is delivering and applying them).
async fn until_gone(
    survivors: &[ClusterNode],
    victims: &[String],
    dead: &str,
    killed: Instant,
    limit: Duration,
) -> anyhow::Result<(Duration, Duration)> {
    let mut first_gone: Option<Duration> = None;
    loop {
        let listed = victims
            .iter()
            .filter(|id| {
                survivors
                    .iter()
                    .any(|n| n.locate(id).as_deref() == Some(dead))
            })
            .count();
        if listed < victims.len() && first_gone.is_none() {
            first_gone = Some(killed.elapsed());
        }
        if listed == 0 {
            return Ok((killed.elapsed(), first_gone.unwrap_or_default()));
        }
        if killed.elapsed() > limit {
            bail!("{listed} devices of the dead node {dead} still listed");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("node") {
        return child_node(&args[2..]).await;
    }
    let cli = Cli::parse();
    let etcd_server = match EtcdServer::start() {
        Ok(e) => e,
        Err(e) => bail!("cannot run the cluster benchmark: {e}"),
    };
    let ttl = Duration::from_secs(cli.ttl);
    let etcd = EtcdOptions::new([etcd_server.endpoint()])
        .prefix("/quicx-bench")
        .lease_ttl(ttl);
    let dev = DevCertificate::localhost()?;
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(start_node(&dev, &etcd, name).await?);
    }
    let addrs: Vec<SocketAddr> = nodes
        .iter()
        .map(|(s, _)| s.local_addr().context("bound"))
        .collect::<anyhow::Result<_>>()?;
    if cli.durable > 0 {
        let n = cli
            .durable
            .min(quicx_cluster::MAX_DURABLE_PER_DEVICE as usize);
        let (stored, drained, emptied) =
            durable_drain(&dev, &nodes[0].1, &nodes[1].1, addrs[1], n).await?;
        println!(
            "durable, {n} messages: stored through node a {stored:.0}/s (64 in flight); drained from node b {drained:.0}/s (connect to last message); etcd empty {:.0} ms after the last",
            ms(emptied)
        );
        let spread = durable_store_spread(&nodes[0].1, n, 64).await?;
        println!(
            "durable, {n} messages to 64 offline devices: stored through node a {spread:.0}/s (64 in flight)"
        );
    }
    if cli.durable_only {
        return Ok(());
    }

    // The fleet: devices spread round robin over the nodes, through a few shared sockets.
    let sockets: Vec<ClientEndpoint> = (0..4)
        .map(|_| ClientEndpoint::bind("127.0.0.1:0".parse().expect("addr")))
        .collect::<quicx::Result<_>>()?;
    let (tx, mut rx) = push_channel(1 << 16);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let started = Instant::now();
    let ids = (0..cli.devices).map(|i| format!("device-{i}")).collect();
    let devices = connect_devices(&dev, &sockets, ids, |i| addrs[i % 3], &tx).await?;
    let a = nodes[0].1.clone();
    let seen = Instant::now();
    while (0..cli.devices).any(|i| i % 50 == 0 && a.locate(&format!("device-{i}")).is_none()) {
        if seen.elapsed() > Duration::from_secs(60) {
            bail!("presence did not converge");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{} devices on 3 nodes, connected and recorded in {:.1} s",
        devices.len(),
        started.elapsed().as_secs_f64()
    );

    // One loopback round trip, for reference.
    let probe = quicx::Client::builder()
        .tls(ClientTls::new().trust(dev.certificate()))
        .connect_addr(addrs[1], "localhost")
        .await?;
    let mut rtts = Vec::new();
    for _ in 0..cli.latency_pushes {
        let t = Instant::now();
        probe.call::<_, ()>("Echo", "Ping", &()).await?;
        rtts.push(t.elapsed());
    }
    rtts.sort();

    // device-0 is on node a, device-1 on node b.
    let local = push_latency(&a, "device-0", cli.latency_pushes).await?;
    let remote = push_latency(&a, "device-1", cli.latency_pushes).await?;
    let local_again = push_latency(&a, "device-3", cli.latency_pushes).await?;
    println!(
        "push with receipt, p50/p99 ms: local {:.3}/{:.3} (again {:.3}/{:.3}), cross-node {:.3}/{:.3}; one quicx round trip {:.3}/{:.3}",
        ms(percentile(&local, 0.5)),
        ms(percentile(&local, 0.99)),
        ms(percentile(&local_again, 0.5)),
        ms(percentile(&local_again, 0.99)),
        ms(percentile(&remote, 0.5)),
        ms(percentile(&remote, 0.99)),
        ms(percentile(&rtts, 0.5)),
        ms(percentile(&rtts, 0.99)),
    );
    println!(
        "cross-node p50 - local p50 = {:.3} ms (target: <= one round trip, {:.3} ms)",
        ms(percentile(&remote, 0.5).saturating_sub(percentile(&local, 0.5))),
        ms(percentile(&rtts, 0.5))
    );

    // Throughput: node a to its own devices, then to the devices of b and c.
    let on_a: Vec<String> = (0..cli.devices)
        .filter(|i| i % 3 == 0)
        .map(|i| format!("device-{i}"))
        .collect();
    let elsewhere: Vec<String> = (0..cli.devices)
        .filter(|i| i % 3 != 0)
        .map(|i| format!("device-{i}"))
        .collect();
    let metrics_addr = etcd_server.client_addr();
    let local_rate = push_rate(&a, &on_a, cli.rate_pushes).await?;
    let before = etcd_requests(metrics_addr)?;
    let routed_start = Instant::now();
    let routed_rate = push_rate(&a, &elsewhere, cli.rate_pushes).await?;
    let routed_secs = routed_start.elapsed().as_secs_f64();
    let after = etcd_requests(metrics_addr)?;
    let routed_pushes = routed_rate * routed_secs;
    println!(
        "pushes/s: local {local_rate:.0}, routed {routed_rate:.0} ({:.2}x local)",
        routed_rate / local_rate
    );
    println!(
        "etcd unary requests during {routed_pushes:.0} routed pushes ({routed_secs:.1} s): {:.0} ({:.5} per push; lease keep-alives are a stream, not counted)",
        after - before,
        (after - before) / routed_pushes.max(1.0)
    );

    // A device moves: it connects to another node; time until every node routes to it there.
    let mut moves = Vec::new();
    let move_limit = Instant::now() + Duration::from_secs(60);
    for m in 0..cli.moves {
        if Instant::now() > move_limit {
            break;
        }
        let id = format!("mover-{m}");
        let first = quicx::Client::builder()
            .tls(ClientTls::new().trust(dev.certificate()))
            .client_id(id.clone())
            .connect_addr(addrs[0], "localhost")
            .await?;
        while nodes
            .iter()
            .any(|(_, n)| n.locate(&id).as_deref() != Some("a"))
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let second = quicx::Client::builder()
            .tls(ClientTls::new().trust(dev.certificate()))
            .client_id(id.clone())
            .connect_addr(addrs[2], "localhost")
            .await?;
        let hello = Instant::now();
        while nodes
            .iter()
            .any(|(_, n)| n.locate(&id).as_deref() != Some("c"))
        {
            if hello.elapsed() > Duration::from_secs(5) {
                bail!("move of {id} did not converge");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        moves.push(hello.elapsed());
        drop((first, second));
    }
    moves.sort();
    println!(
        "presence after a move (hello done -> every node routes to the new node), ms: p50 {:.2}, max {:.2} over {} moves",
        ms(percentile(&moves, 0.5)),
        ms(moves.last().copied().unwrap_or_default()),
        moves.len()
    );

    // A node in a child process, with a third of the fleet's size in devices, is killed with
    // SIGKILL.
    let pem = quicx_tests::child::PemFiles::write(&dev)?;
    let mut child = quicx_tests::child::ChildServer::spawn(
        std::process::Command::new(std::env::current_exe()?)
            .arg("node")
            .arg(&pem.cert)
            .arg(&pem.key)
            .arg(etcd_server.endpoint())
            .arg("/quicx-bench")
            .arg("d")
            .arg(cli.ttl.to_string()),
    )?;
    let victims: Vec<String> = (0..cli.devices / 3)
        .map(|i| format!("victim-{i}"))
        .collect();
    let on_child = connect_devices(&dev, &sockets, victims.clone(), |_| child.addr, &tx).await?;
    let survivors: Vec<ClusterNode> = nodes.iter().map(|(_, n)| n.clone()).collect();
    let seen = Instant::now();
    while victims.iter().any(|id| {
        survivors
            .iter()
            .any(|n| n.locate(id).as_deref() != Some("d"))
    }) {
        if seen.elapsed() > Duration::from_secs(60) {
            bail!("presence of the child node's devices did not converge");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // etcd's own view: when the dead node's presence keys are deleted (its lease expired).
    let mut etcd_client = etcd_client::Client::connect([etcd_server.endpoint()], None).await?;
    let mut watch = etcd_client
        .watch("/quicx-bench/presence/victim-0", None)
        .await?;
    child.kill();
    let killed = Instant::now();
    let deleted = tokio::spawn(async move {
        while let Ok(Some(r)) = watch.message().await {
            if r.events()
                .iter()
                .any(|e| e.event_type() == etcd_client::EventType::Delete)
            {
                return Some(killed.elapsed());
            }
        }
        None
    });
    let (gone, first_gone) = until_gone(
        &survivors,
        &victims,
        "d",
        killed,
        ttl + Duration::from_secs(10),
    )
    .await?;
    let deleted = tokio::time::timeout(Duration::from_secs(5), deleted)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    println!(
        "node d (child process) killed with SIGKILL with {} devices: offline on every node after {:.2} s \
         (lease TTL {:.0} s; etcd deleted their keys after {}; the first of them left the caches after {:.2} s)",
        victims.len(),
        gone.as_secs_f64(),
        ttl.as_secs_f64(),
        deleted.map_or("?".into(), |d| format!("{:.2} s", d.as_secs_f64())),
        first_gone.as_secs_f64()
    );
    // Node c must stop once its last handle is dropped below.
    drop((on_child, survivors));

    // Node c dies: it stops renewing its lease and drops its connections without saying so.
    let (server_c, node_c) = nodes.pop().expect("three nodes");
    let victims: Vec<String> = (0..cli.devices)
        .filter(|i| i % 3 == 2)
        .map(|i| format!("device-{i}"))
        .collect();
    drop(node_c);
    let killed = Instant::now();
    // Its connections go too (in the background: measured from the moment it stopped).
    tokio::spawn(async move { server_c.shutdown(Duration::ZERO).await });
    let survivors: Vec<ClusterNode> = nodes.iter().map(|(_, n)| n.clone()).collect();
    let (gone, first_gone) = until_gone(
        &survivors,
        &victims,
        "c",
        killed,
        ttl + Duration::from_secs(10),
    )
    .await?;
    println!(
        "node c (in this process) halted with {} devices: offline on every node after {:.2} s \
         (lease TTL {:.0} s; the first of them left the caches after {:.2} s)",
        victims.len(),
        gone.as_secs_f64(),
        ttl.as_secs_f64(),
        first_gone.as_secs_f64()
    );
    drop(devices);
    drain.abort();
    Ok(())
}
