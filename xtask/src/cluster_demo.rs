//! `cargo xtask demo --cluster`: etcd and three quicx nodes on loopback (child processes, so one
//! can be killed with SIGKILL), six devices spread over them (clients in this process), pushes
//! and a reverse call that cross nodes, a node killed and its devices reconnecting elsewhere,
//! pushes reaching them there.
//!
//! The nodes are this binary again (`xtask cluster-node`, see `cluster_node.rs`); the demo asks
//! them to push and call through their `Demo` control service. Every child (etcd, nodes) is
//! killed when the demo ends, whether it passed, failed, timed out or was interrupted.

use std::{
    collections::BTreeMap,
    hash::{BuildHasher, RandomState},
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use quicx::{
    CallOptions, Client, ClientEvent, ClientOption, ClientTls, Context, DevCertificate, FailMode,
    PushReceiver, PushSender, SelectMode, Service, TransportOptions, XClient,
    discovery::{Discovery, Endpoint, Endpoints},
    push_channel,
};
use quicx_cluster::{EtcdDiscovery, EtcdOptions, SECRET_METADATA_KEY};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    cluster_node::{self, CONTROL, PushArgs, Routed, SECRET_ENV, Status, code, device_token},
    etcd::{self, Etcd},
};

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
/// The node the demo kills.
const VICTIM: usize = 1;
const DEVICES: usize = 6;
const PREFIX: &str = "/quicx-demo";
/// The nodes' lease TTL: how long a dead node's devices stay listed, at most.
const LEASE_TTL: Duration = Duration::from_secs(2);
/// Devices send keep-alives this often and give a silent node up after `DEVICE_IDLE`.
const DEVICE_KEEP_ALIVE: Duration = Duration::from_millis(250);
const DEVICE_IDLE: Duration = Duration::from_secs(1);
/// The bound of every single wait.
const WAIT: Duration = Duration::from_secs(5);
/// The bound of the whole demo.
const DEMO_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) fn run() -> anyhow::Result<()> {
    let Ok(bin) = etcd::find_etcd() else {
        bail!("{}", etcd::INSTALL_HINT);
    };
    let runtime = tokio::runtime::Runtime::new()?;
    // Dropping the demo's future (timeout, a signal) drops its children's guards: they are
    // killed. (Were this process SIGKILLed, the nodes would still exit, as their stdin closes.)
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = tokio::time::timeout(DEMO_TIMEOUT, demo(&bin)) => r.unwrap_or_else(|_| {
                bail!("the cluster demo did not finish within {DEMO_TIMEOUT:?}")
            }),
            why = stop_signal() => Err(anyhow!("{why}: stopped etcd and the nodes")),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

/// SIGINT, SIGTERM or SIGHUP.
pub(crate) async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
        _ = hup.recv() => "hung up",
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn micros(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1e3)
}

/// A random cluster secret (the std hasher's per-process random keys; a demo on loopback needs
/// no more).
fn random_secret() -> String {
    (0..4)
        .map(|i: u64| format!("{:016x}", RandomState::new().hash_one(i)))
        .collect()
}

/// The dev certificate's PEM files in a private temporary directory, removed on drop.
struct Pem {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pem {
    fn write(dev: &DevCertificate) -> anyhow::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let dir = std::env::temp_dir().join(format!(
            "quicx-demo-pem-{}-{}",
            std::process::id(),
            cluster_node::unix_micros()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let pem = Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            dir,
        };
        std::fs::write(&pem.cert, dev.certificate_pem())?;
        let mut key = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pem.key)?;
        std::io::Write::write_all(&mut key, dev.private_key_pem().as_bytes())?;
        Ok(pem)
    }
}

impl Drop for Pem {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node child process: killed (SIGKILL) and reaped on drop.
struct NodeProc {
    name: &'static str,
    child: Child,
    /// Held open: the node exits when it closes.
    _stdin: Option<ChildStdin>,
    addr: SocketAddr,
    /// Its stdout after `READY`: the cluster events it sees.
    lines: Option<mpsc::UnboundedReceiver<String>>,
    control: Option<Client>,
    options: CallOptions,
    alive: bool,
}

impl NodeProc {
    async fn start(
        name: &'static str,
        etcd_url: &str,
        pem: &Pem,
        secret: &str,
        tls: &ClientTls,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the xtask binary")?;
        let mut child = Command::new(exe)
            .arg("cluster-node")
            .args(["--etcd", etcd_url, "--prefix", PREFIX, "--name", name])
            .arg("--cert")
            .arg(&pem.cert)
            .arg("--key")
            .arg(&pem.key)
            .args(["--lease-ttl", &LEASE_TTL.as_secs().to_string()])
            .env(SECRET_ENV, secret)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // From here on, Drop kills the child on every error path.
        let mut node = Self {
            name,
            child,
            _stdin: stdin,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            lines: Some(rx),
            control: None,
            options: CallOptions::new()
                .metadata(SECRET_METADATA_KEY, secret)
                .timeout(WAIT),
            alive: true,
        };
        let first = tokio::time::timeout(Duration::from_secs(15), async {
            node.lines.as_mut().expect("set above").recv().await
        })
        .await;
        let line = match first {
            Ok(Some(line)) => line,
            Ok(None) => {
                let status = node.child.wait().map(|s| s.to_string());
                bail!("{name} exited before it was ready ({status:?})");
            }
            Err(_) => bail!("{name} did not join the cluster within 15 s"),
        };
        node.addr = line
            .strip_prefix("READY ")
            .and_then(|a| a.trim().parse().ok())
            .with_context(|| format!("{name} said {line:?} instead of READY <addr>"))?;
        node.control = Some(
            Client::builder()
                .tls(tls.clone())
                .connect_timeout(WAIT)
                .connect_addr(node.addr, "localhost")
                .await
                .with_context(|| format!("connecting to {name}'s control service"))?,
        );
        Ok(node)
    }

    /// Calls `Demo.<method>` on this node, with the cluster secret.
    async fn control<A: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        args: &A,
    ) -> quicx::Result<R> {
        let client = self.control.as_ref().expect("connected in start");
        client.call_with(CONTROL, method, args, &self.options).await
    }

    fn kill(&mut self) -> anyhow::Result<()> {
        self.alive = false;
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a device's supervisor tells the demo.
#[derive(Debug)]
enum Note {
    /// Its connection died (idle timeout: the node stopped answering).
    LinkLost(Instant),
    /// Its node left the registry; it connected to another one.
    Moved {
        from: String,
        to: String,
        at: Instant,
    },
    /// It could not connect to any other node.
    Stranded(String),
}

/// A device: a quicx client with an identity and a token, a push channel, a `Device.Status`
/// service, and a supervisor that moves it to another node when its own leaves the registry.
struct Device {
    id: String,
    /// The node it is connected to.
    node: Arc<Mutex<String>>,
    pushes: PushReceiver,
    notes: mpsc::UnboundedReceiver<Note>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn node_name(e: &Endpoint) -> &str {
    e.metadata.get("node").map_or("?", String::as_str)
}

fn lock(m: &Mutex<String>) -> String {
    m.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Connects device `id` to the node at `endpoint`.
async fn connect_device(
    id: &str,
    endpoint: &Endpoint,
    tls: &ClientTls,
    push: &PushSender,
    node: &Arc<Mutex<String>>,
) -> anyhow::Result<Client> {
    let addr: SocketAddr = endpoint
        .address
        .parse()
        .with_context(|| format!("bad address {}", endpoint.address))?;
    let me = id.to_owned();
    let at = node.clone();
    let battery = 60 + id.bytes().map(u32::from).sum::<u32>() % 40;
    let client = Client::builder()
        .tls(tls.clone())
        .client_id(id)
        .token(device_token(id))
        .push_channel(push.clone())
        .transport(
            TransportOptions::default()
                .keep_alive_interval(Some(DEVICE_KEEP_ALIVE))
                .idle_timeout(DEVICE_IDLE),
        )
        .connect_timeout(Duration::from_secs(2))
        .register(
            "Device",
            Service::new().method("Status", move |_ctx: Context, (): ()| {
                let status = Status {
                    device: me.clone(),
                    connected_to: lock(&at),
                    battery_percent: battery as u8,
                    firmware: "1.4.2".into(),
                };
                async move { Ok(status) }
            }),
        )
        .connect_addr(addr, &endpoint.server_name)
        .await
        .with_context(|| format!("{id} connecting to {}", node_name(endpoint)))?;
    *node.lock().unwrap_or_else(|e| e.into_inner()) = node_name(endpoint).to_owned();
    Ok(client)
}

impl Device {
    /// Connects to the node `endpoint` and starts the supervisor.
    async fn start(
        number: usize,
        endpoint: &Endpoint,
        endpoints: watch::Receiver<Endpoints>,
        tls: &ClientTls,
    ) -> anyhow::Result<Self> {
        let id = format!("device-{number}");
        let (push, pushes) = push_channel(64);
        let node = Arc::new(Mutex::new(String::new()));
        let client = connect_device(&id, endpoint, tls, &push, &node).await?;
        let (notes_tx, notes) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(supervise(Supervisor {
            id: id.clone(),
            number,
            client,
            node: node.clone(),
            endpoints,
            tls: tls.clone(),
            push,
            notes: notes_tx,
            stopped,
        }));
        Ok(Self {
            id,
            node,
            pushes,
            notes,
            stop: Some(stop),
            task: Some(task),
        })
    }

    fn node(&self) -> String {
        lock(&self.node)
    }

    /// The next push, which must carry `text`.
    async fn expect_push(&mut self, text: &str) -> anyhow::Result<quicx::PushMessage> {
        let msg = tokio::time::timeout(WAIT, self.pushes.recv())
            .await
            .with_context(|| format!("{}: no push within {WAIT:?}", self.id))?
            .context("push channel closed")?;
        ensure!(
            msg.payload[..] == *text.as_bytes(),
            "{} received {:?} instead of {text:?}",
            self.id,
            String::from_utf8_lossy(&msg.payload)
        );
        Ok(msg)
    }

    /// Stops the supervisor, which closes the client.
    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }
}

struct Supervisor {
    id: String,
    number: usize,
    client: Client,
    node: Arc<Mutex<String>>,
    endpoints: watch::Receiver<Endpoints>,
    tls: ClientTls,
    push: PushSender,
    notes: mpsc::UnboundedSender<Note>,
    stopped: oneshot::Receiver<()>,
}

/// A device's own policy: a dropped link is retried on the same node (the client reconnects by
/// itself: a blip is not a dead node); once the registry no longer lists its node (the node's
/// lease expired, or it shut down), it connects to another node the registry lists.
async fn supervise(mut s: Supervisor) {
    let mut events = s.client.events();
    let (mut events_open, mut registry_open, mut link_up) = (true, true, true);
    loop {
        tokio::select! {
            _ = &mut s.stopped => break,
            event = events.recv(), if events_open => match event {
                Ok(ClientEvent::Disconnected { .. }) if link_up => {
                    link_up = false;
                    let _ = s.notes.send(Note::LinkLost(Instant::now()));
                }
                Ok(ClientEvent::Reconnected { .. }) => link_up = true,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => events_open = false,
            },
            changed = s.endpoints.changed(), if registry_open => {
                if changed.is_err() {
                    registry_open = false;
                    continue;
                }
                let list = s.endpoints.borrow_and_update().clone();
                let here = lock(&s.node);
                if list.iter().any(|e| node_name(e) == here) {
                    continue;
                }
                let mut others: Vec<Endpoint> = list.iter().cloned().collect();
                others.sort_by(|a, b| node_name(a).cmp(node_name(b)));
                // Stop retrying the dead node (in the background: a close waits up to 1 s for
                // the dead connection to drain), then try the others, starting at one that
                // depends on the device (so the devices of a dead node spread).
                let old = s.client.clone();
                tokio::spawn(async move { old.close().await });
                let mut why = format!("no other node is registered (had {here})");
                for k in 0..others.len() {
                    let e = &others[(s.number + k) % others.len()];
                    match connect_device(&s.id, e, &s.tls, &s.push, &s.node).await {
                        Ok(client) => {
                            s.client = client;
                            events = s.client.events();
                            (events_open, link_up) = (true, true);
                            let _ = s.notes.send(Note::Moved {
                                from: here.clone(),
                                to: node_name(e).to_owned(),
                                at: Instant::now(),
                            });
                            why.clear();
                            break;
                        }
                        Err(e) => why = format!("{e:#}"),
                    }
                }
                if !why.is_empty() {
                    let _ = s.notes.send(Note::Stranded(why));
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), s.client.close()).await;
}

/// The cluster events one node printed, with their times (µs since the epoch).
struct Timeline {
    rx: mpsc::UnboundedReceiver<String>,
    seen: Vec<(u64, String)>,
}

impl Timeline {
    /// The time of the first event `event` (e.g. `"node-down node-b"`), waiting until
    /// `deadline` for it.
    async fn wait(&mut self, event: &str, deadline: Instant) -> Option<u64> {
        loop {
            if let Some((t, _)) = self.seen.iter().find(|(_, e)| e == event) {
                return Some(*t);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = tokio::time::timeout(left, self.rx.recv()).await.ok()??;
            let Some(rest) = line.strip_prefix("EVENT ") else {
                continue;
            };
            if let Some((t, e)) = rest.split_once(' ') {
                self.seen.push((t.parse().unwrap_or(0), e.to_owned()));
            }
        }
    }
}

#[derive(Default)]
struct Steps {
    passed: usize,
    failed: usize,
}

impl Steps {
    fn report(&mut self, title: &str, result: anyhow::Result<String>) {
        match result {
            Ok(detail) => {
                self.passed += 1;
                println!(
                    "  ok    {title}\n        {}",
                    detail.replace('\n', "\n        ")
                );
            }
            Err(e) => {
                self.failed += 1;
                println!("  FAIL  {title}\n        {e:#}");
            }
        }
    }
}

/// Waits (at most `limit`) until `check` passes; how long it took.
async fn until<F: Future<Output = bool>>(
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if check().await {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// `node` pushes `text` to `device` (which must receive it): the node's answer and how long
/// the push took from the demo's request to the device's push channel.
async fn push_via(
    node: &NodeProc,
    device: &mut Device,
    text: &str,
) -> anyhow::Result<(Routed<()>, Duration)> {
    let started = Instant::now();
    let routed: Routed<()> = node
        .control(
            "Push",
            &PushArgs {
                client_id: device.id.clone(),
                text: text.to_owned(),
            },
        )
        .await
        .with_context(|| format!("{} pushing to {}", node.name, device.id))?;
    device.expect_push(text).await?;
    Ok((routed, started.elapsed()))
}

/// `rounds` pushes through `node` to `device`: the median of the node's routed-push times.
async fn push_median(node: &NodeProc, device: &mut Device, rounds: usize) -> anyhow::Result<u64> {
    let mut times = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let (routed, _) = push_via(node, device, &format!("tick {i}")).await?;
        times.push(routed.micros);
    }
    Ok(median(times))
}

/// An XClient on the control service, following the nodes in etcd.
async fn spread(xclient: &XClient, options: &CallOptions, calls: usize) -> anyhow::Result<String> {
    let mut per_node = BTreeMap::<String, usize>::new();
    for _ in 0..calls {
        let name: String = xclient.call_with("Name", &(), options).await?;
        *per_node.entry(name).or_default() += 1;
    }
    Ok(per_node
        .iter()
        .map(|(n, c)| format!("{n} {c}"))
        .collect::<Vec<_>>()
        .join(", "))
}

async fn demo(etcd_bin: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    println!(
        "quicx cluster demo: etcd, three nodes (child processes) and {DEVICES} devices, all on \
         127.0.0.1\n"
    );

    // etcd.
    let t = Instant::now();
    let etcd = tokio::task::spawn_blocking(Etcd::start).await??;
    println!(
        "etcd {} on {} ({}, data in {}), healthy in {}",
        etcd::version(etcd_bin),
        etcd.endpoint(),
        etcd_bin.display(),
        etcd.data_dir().display(),
        secs(t.elapsed())
    );

    // Three nodes, each its own process.
    let dev = DevCertificate::localhost()?;
    let pem = Pem::write(&dev)?;
    let tls = ClientTls::empty().trust(dev.certificate());
    let secret = random_secret();
    let mut nodes = Vec::new();
    for name in NODES {
        let t = Instant::now();
        let node = NodeProc::start(name, &etcd.endpoint(), &pem, &secret, &tls).await?;
        println!(
            "{name}  pid {:<7} {}  joined the cluster in {} (lease TTL {LEASE_TTL:?})",
            node.child.id(),
            node.addr,
            secs(t.elapsed())
        );
        nodes.push(node);
    }
    let mut timeline = Timeline {
        rx: nodes[0].lines.take().context("node-a's events")?,
        seen: Vec::new(),
    };

    // Devices find the nodes through etcd.
    let etcd_options = EtcdOptions::new([etcd.endpoint()]).prefix(PREFIX);
    let registry = EtcdDiscovery::connect(&etcd_options, CONTROL).await?;
    let mut endpoints = registry.watch();
    ensure!(
        until(WAIT, || {
            let n = endpoints.borrow().len();
            async move { n == NODES.len() }
        })
        .await
        .is_some(),
        "etcd lists {} nodes, not {}",
        endpoints.borrow().len(),
        NODES.len()
    );
    let listed: Vec<Endpoint> = endpoints.borrow_and_update().to_vec();
    let mut devices = Vec::new();
    for number in 1..=DEVICES {
        let want = NODES[(number - 1) % NODES.len()];
        let endpoint = listed
            .iter()
            .find(|e| node_name(e) == want)
            .with_context(|| format!("{want} is not in etcd"))?;
        devices.push(Device::start(number, endpoint, registry.watch(), &tls).await?);
    }
    println!(
        "{DEVICES} devices found the nodes through EtcdDiscovery(\"{CONTROL}\") and connected with \
         their tokens:"
    );
    for name in NODES {
        let on: Vec<&str> = devices
            .iter()
            .filter(|d| d.node() == name)
            .map(|d| d.id.as_str())
            .collect();
        println!("  {name}: {}", on.join(", "));
    }
    println!();

    let xclient = XClient::builder(
        CONTROL,
        EtcdDiscovery::connect(&etcd_options, CONTROL).await?,
    )
    .fail_mode(FailMode::Failover)
    .select_mode(SelectMode::RoundRobin)
    .option(ClientOption::with_tls(tls.clone()))
    .build()?;
    let control_options = CallOptions::new()
        .metadata(SECRET_METADATA_KEY, secret.as_str())
        .timeout(WAIT);

    let mut steps = Steps::default();

    // 1. Presence: every node learns where every device is, from its etcd watch.
    let result = async {
        let expected: Vec<(String, String)> =
            devices.iter().map(|d| (d.id.clone(), d.node())).collect();
        let nodes = &nodes;
        let expected = &expected;
        let took = until(WAIT, || async move {
            for node in nodes {
                for (id, at) in expected {
                    let found: Option<String> = node.control("Locate", id).await.unwrap_or(None);
                    if found.as_deref() != Some(at.as_str()) {
                        return false;
                    }
                }
            }
            true
        })
        .await
        .context("the nodes did not agree on where the devices are")?;
        let members: Vec<String> = nodes[2].control("Nodes", &()).await?;
        Ok(format!(
            "all {} nodes locate all {DEVICES} devices, converged {} after the last device \
             connected; members: {}\n\
             XClient over EtcdDiscovery, round robin, 30 calls of Demo.Name: {}",
            NODES.len(),
            ms(took),
            members.join(", "),
            spread(&xclient, &control_options, 30).await?
        ))
    }
    .await;
    steps.report("every node knows where every device is", result);

    // 2. A push that crosses nodes: node-a pushes to device-2, which is on node-b.
    let result = async {
        let (first, arrived) = push_via(&nodes[0], &mut devices[1], "firmware 1.5 is out").await?;
        ensure!(
            first.owner.as_deref() == Some("node-b"),
            "node-a placed device-2 on {:?}",
            first.owner
        );
        let remote = push_median(&nodes[0], &mut devices[1], 20).await?;
        let local = push_median(&nodes[0], &mut devices[0], 20).await?;
        Ok(format!(
            "node-a -> node-b -> device-2: Device.Notify \"firmware 1.5 is out\", receipt on node-a in \
             {} (first push, opens the node-a -> node-b link); in the demo's hands {} after it asked\n\
             crossed nodes in {} (median of 20, with receipt); a local push node-a -> device-1: {}",
            micros(first.micros),
            ms(arrived),
            micros(remote),
            micros(local)
        ))
    }
    .await;
    steps.report("push that crosses nodes", result);

    // 3. A reverse call that crosses nodes: node-c calls device-1 (on node-a).
    let result = async {
        let routed: Routed<Status> = nodes[2].control("Call", &devices[0].id).await?;
        let status = routed.value;
        ensure!(
            status.device == "device-1" && status.connected_to == "node-a",
            "answered by {} on {}",
            status.device,
            status.connected_to
        );
        Ok(format!(
            "node-c -> node-a -> device-1 Device.Status: battery {}%, firmware {}, connected to {}; \
             {} on node-c (first call: opens the node-c -> node-a link)",
            status.battery_percent,
            status.firmware,
            status.connected_to,
            micros(routed.micros)
        ))
    }
    .await;
    steps.report("reverse call that crosses nodes", result);

    // 4. Typed errors: a device nobody holds; a control call without the cluster secret.
    let result = async {
        let offline = nodes[0]
            .control::<_, Routed<()>>(
                "Push",
                &PushArgs {
                    client_id: "device-404".into(),
                    text: "anyone?".into(),
                },
            )
            .await;
        let why = match offline {
            Err(quicx::Error::Remote { code, message }) if code == code::OFFLINE => message,
            other => bail!("expected an offline error, got {other:?}"),
        };
        let stranger: quicx::Result<Routed<()>> = nodes[0]
            .control
            .as_ref()
            .context("control client")?
            .call(
                CONTROL,
                "Push",
                &PushArgs {
                    client_id: "device-1".into(),
                    text: "pwned".into(),
                },
            )
            .await;
        let refused = match stranger {
            Err(quicx::Error::Unauthenticated(m)) => m,
            other => bail!("a call without the cluster secret was not refused: {other:?}"),
        };
        Ok(format!(
            "node-a -> device-404: offline ({why})\nwithout the cluster secret: refused ({refused})"
        ))
    }
    .await;
    steps.report("typed errors", result);

    // 5. node-b is killed (SIGKILL: no goodbye to etcd, to its devices or to the other nodes).
    let victim = NODES[VICTIM];
    let doomed: Vec<usize> = (0..devices.len())
        .filter(|&i| devices[i].node() == victim)
        .collect();
    let doomed_ids: Vec<String> = doomed.iter().map(|&i| devices[i].id.clone()).collect();
    for &i in &doomed {
        while devices[i].notes.try_recv().is_ok() {}
    }
    // When the registry stops listing the victim, as a device's discovery sees it.
    let mut unlisted = {
        let (tx, rx) = oneshot::channel();
        let mut watch = registry.watch();
        tokio::spawn(async move {
            loop {
                if !watch
                    .borrow_and_update()
                    .iter()
                    .any(|e| node_name(e) == victim)
                {
                    let _ = tx.send(Instant::now());
                    return;
                }
                if watch.changed().await.is_err() {
                    return;
                }
            }
        });
        rx
    };
    let pid = nodes[VICTIM].child.id();
    let killed = Instant::now();
    let killed_us = cluster_node::unix_micros();
    let since_kill = |us: u64| Duration::from_micros(us.saturating_sub(killed_us));
    // When node-a saw each of them go offline (µs since the epoch, node-a's clock).
    let mut offline_at: Vec<(String, u64)> = Vec::new();
    let result = async {
        nodes[VICTIM].kill()?;
        let mut lines = vec![format!(
            "{victim} (pid {pid}) killed, holding {}",
            doomed_ids.join(", ")
        )];
        // Its lease expires: node-a's watch sees its devices go and the node leave.
        let deadline = killed + LEASE_TTL + Duration::from_secs(3);
        let mut offline = Vec::new();
        let offline_at = &mut offline_at;
        for id in &doomed_ids {
            let at = timeline
                .wait(&format!("disconnected {id} {victim}"), deadline)
                .await
                .with_context(|| format!("node-a never saw {id} go offline"))?;
            offline.push(format!("{id} offline {}", secs(since_kill(at))));
            offline_at.push((id.clone(), at));
        }
        let down = timeline
            .wait(&format!("node-down {victim}"), deadline)
            .await
            .context("node-a never saw node-b leave")?;
        let down = since_kill(down);
        let target = LEASE_TTL + Duration::from_secs(1);
        lines.push(format!(
            "node-a sees {} after the kill: {victim}'s lease expired (TTL {LEASE_TTL:?}, target \
             TTL + 1 s: {})",
            offline.join(", "),
            if down <= target { "met" } else { "MISSED" }
        ));
        lines.push(format!(
            "{victim} left the cluster {} after the kill; members now: {}",
            secs(down),
            nodes[0]
                .control::<_, Vec<String>>("Nodes", &())
                .await?
                .join(", ")
        ));
        let gone = tokio::time::timeout(WAIT, &mut unlisted)
            .await
            .ok()
            .and_then(Result::ok)
            .context("EtcdDiscovery still lists node-b")?;
        lines.push(format!(
            "EtcdDiscovery dropped {victim} {} after the kill: it lists {}",
            secs(gone - killed),
            endpoints
                .borrow()
                .iter()
                .map(node_name)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        Ok(lines.join("\n"))
    }
    .await;
    steps.report(&format!("kill -9 {victim}: its devices go offline"), result);

    // 6. Its devices reconnect to other nodes, which record them.
    let result = async {
        let mut lines = Vec::new();
        let deadline = killed + LEASE_TTL + WAIT;
        let mut moved = Vec::new();
        let mut last_move = killed;
        for &i in &doomed {
            let device = &mut devices[i];
            let mut link_lost = None;
            let (to, at) = loop {
                let left = deadline
                    .checked_duration_since(Instant::now())
                    .unwrap_or_default();
                match tokio::time::timeout(left, device.notes.recv()).await {
                    Ok(Some(Note::LinkLost(at))) => link_lost = Some(at),
                    Ok(Some(Note::Moved { from, to, at })) => {
                        ensure!(
                            from == victim,
                            "{} moved from {from}, not {victim}",
                            device.id
                        );
                        break (to, at);
                    }
                    Ok(Some(Note::Stranded(why))) => bail!("{} found no node: {why}", device.id),
                    Ok(None) | Err(_) => bail!("{} did not reconnect elsewhere", device.id),
                }
            };
            let link = match link_lost {
                Some(l) => format!(
                    "link dead after {} (idle timeout {DEVICE_IDLE:?}), ",
                    secs(l - killed)
                ),
                None => String::new(),
            };
            let recorded = timeline
                .wait(&format!("connected {} {to}", device.id), deadline)
                .await
                .with_context(|| format!("node-a never saw {} on {to}", device.id))?;
            let gap = offline_at
                .iter()
                .find(|(id, _)| *id == device.id)
                .map(|(_, t)| {
                    format!(
                        " (offline cluster-wide for {}, as node-a saw it)",
                        ms(Duration::from_micros(recorded.saturating_sub(*t)))
                    )
                })
                .unwrap_or_default();
            lines.push(format!(
                "{}: {link}moved once the registry dropped {victim}: on {to} {} after the \
                 kill{gap}",
                device.id,
                secs(at - killed),
            ));
            last_move = last_move.max(at);
            moved.push((device.id.clone(), to));
        }
        // Every surviving node's presence cache (its own etcd watch) places them there.
        let (live, moved) = (nodes.iter().filter(|n| n.alive).collect::<Vec<_>>(), &moved);
        let live = &live;
        until(WAIT, || async move {
            for node in live {
                for (id, to) in moved {
                    let at: Option<String> = node.control("Locate", id).await.unwrap_or(None);
                    if at.as_deref() != Some(to.as_str()) {
                        return false;
                    }
                }
            }
            true
        })
        .await
        .context("the surviving nodes do not agree on where the devices went")?;
        lines.push(format!(
            "{} place them there {} after the last reconnect",
            live.iter()
                .map(|n| n.name)
                .collect::<Vec<_>>()
                .join(" and "),
            ms(last_move.elapsed())
        ));
        Ok(lines.join("\n"))
    }
    .await;
    steps.report("its devices reconnect to other nodes", result);

    // 7. Pushes and a reverse call reach them on their new nodes, from another node.
    let result = async {
        let mut lines = Vec::new();
        for &i in &doomed {
            let now_on = devices[i].node();
            let from = nodes
                .iter()
                .find(|n| n.alive && n.name != now_on)
                .context("no other live node")?;
            let text = format!("welcome to {now_on}");
            let (routed, arrived) = push_via(from, &mut devices[i], &text).await?;
            ensure!(
                routed.owner.as_deref() == Some(now_on.as_str()),
                "{} placed {} on {:?}",
                from.name,
                devices[i].id,
                routed.owner
            );
            lines.push(format!(
                "{} -> {now_on} -> {}: \"{text}\", receipt in {}, in the demo's hands after {}",
                from.name,
                devices[i].id,
                micros(routed.micros),
                ms(arrived)
            ));
            let status: Routed<Status> = from.control("Call", &devices[i].id).await?;
            ensure!(
                status.value.connected_to == now_on,
                "{} says it is on {}",
                devices[i].id,
                status.value.connected_to
            );
            lines.push(format!(
                "{} -> {now_on} -> {} Device.Status: connected to {}, {}",
                from.name,
                devices[i].id,
                status.value.connected_to,
                micros(status.micros)
            ));
        }
        Ok(lines.join("\n"))
    }
    .await;
    steps.report("pushes reach them on their new nodes", result);

    // 8. The XClient follows etcd: the dead node is no longer used.
    let result = async {
        let spread = spread(&xclient, &control_options, 30).await?;
        ensure!(
            !spread.contains(victim),
            "the XClient still used {victim}: {spread}"
        );
        Ok(format!("30 calls of Demo.Name: {spread}"))
    }
    .await;
    steps.report(&format!("an XClient stops using {victim}"), result);

    for device in &mut devices {
        device.stop().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), xclient.close()).await;
    for node in &nodes {
        if let Some(control) = &node.control {
            let _ = tokio::time::timeout(Duration::from_secs(1), control.close()).await;
        }
    }
    drop(nodes);
    drop(etcd);
    println!(
        "\n{} of {} steps passed in {}; etcd and the nodes are stopped",
        steps.passed,
        steps.passed + steps.failed,
        secs(started.elapsed())
    );
    ensure!(steps.failed == 0, "{} step(s) failed", steps.failed);
    Ok(())
}
