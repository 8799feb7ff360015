//! `cargo xtask demo`: one server and three device clients on loopback, in one process. The
//! server keeps durable pushes in a store in a temporary directory: commands sent while a device
//! is offline reach it when it reconnects, after the server was restarted on the same store.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use quicx::{
    Authenticator, Client, ClientEvent, ClientTls, Context, DevCertificate, DurableLimits, Hello,
    Metadata, PushMessage, PushReceiver, Refusal, Server, ServerEvent, Service, TransportOptions,
    push_channel,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Args {
    a: i64,
    b: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    c: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Status {
    device: String,
    battery_percent: u8,
    firmware: String,
}

const WAIT: Duration = Duration::from_secs(3);

/// The commands the operator sends device-1 while it is offline: method, payload.
const COMMANDS: [(&str, &str); 3] = [
    ("SetReportInterval", "60s"),
    ("UpdateFirmware", "1.4.3"),
    ("Reboot", "after-update"),
];

/// The server's durable store: a fresh temporary directory, removed on drop (the demo's end,
/// whether it passed, failed or timed out).
struct TempStore {
    dir: PathBuf,
}

impl TempStore {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("quicx-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir); // left by an earlier process with our pid
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the store directory {}", dir.display()))?;
        Ok(Self { dir })
    }

    fn file(&self) -> PathBuf {
        self.dir.join("durable.redb")
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Device {
    id: String,
    client: Client,
    pushes: PushReceiver,
}

impl Device {
    async fn connect(id: &str, addr: &str, dev: &DevCertificate) -> anyhow::Result<Self> {
        Self::connect_with(id, addr, dev, false).await
    }

    /// With `manual_ack`, the device application acknowledges each durable message itself,
    /// once it has applied it ([`PushMessage::ack`]).
    async fn connect_with(
        id: &str,
        addr: &str,
        dev: &DevCertificate,
        manual_ack: bool,
    ) -> anyhow::Result<Self> {
        let (tx, pushes) = push_channel(16);
        let me = id.to_owned();
        let battery = 60 + id.bytes().map(u32::from).sum::<u32>() % 40;
        let client = Client::builder()
            .tls(ClientTls::empty().trust(dev.certificate()))
            .server_name("localhost")
            .client_id(id)
            .token(device_token(id))
            .push_channel(tx)
            .manual_ack(manual_ack)
            .register(
                "Device",
                Service::new().method("Status", move |_ctx: Context, (): ()| {
                    let device = me.clone();
                    async move {
                        Ok(Status {
                            device,
                            battery_percent: battery as u8,
                            firmware: "1.4.2".into(),
                        })
                    }
                }),
            )
            .connect(addr)
            .await
            .with_context(|| format!("{id} connecting"))?;
        Ok(Self {
            id: id.to_owned(),
            client,
            pushes,
        })
    }

    async fn next_message(&mut self) -> anyhow::Result<PushMessage> {
        tokio::time::timeout(WAIT, self.pushes.recv())
            .await
            .with_context(|| format!("{}: no push within {WAIT:?}", self.id))?
            .context("push channel closed")
    }

    async fn next_push(&mut self) -> anyhow::Result<String> {
        Ok(describe(&self.next_message().await?))
    }
}

fn describe(msg: &PushMessage) -> String {
    format!(
        "{}.{} \"{}\"",
        msg.service_path,
        msg.service_method,
        String::from_utf8_lossy(&msg.payload)
    )
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Polls `check` every 10 ms until it holds or `limit` passes; whether it held.
async fn until<F: Future<Output = bool>>(limit: Duration, mut check: impl FnMut() -> F) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Steps {
    passed: AtomicUsize,
    failed: AtomicUsize,
}

impl Steps {
    fn report(&self, title: &str, result: anyhow::Result<String>) {
        match result {
            Ok(detail) => {
                self.passed.fetch_add(1, Ordering::Relaxed);
                println!(
                    "  ok    {title}\n        {}",
                    detail.replace('\n', "\n        ")
                );
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                println!("  FAIL  {title}\n        {e:#}");
            }
        }
    }

    /// The closing line; an error if any step failed.
    fn summary(&self, started: Instant) -> anyhow::Result<()> {
        let (passed, failed) = (
            self.passed.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        );
        println!(
            "\n{passed} of {} steps passed in {:.2} s",
            passed + failed,
            started.elapsed().as_secs_f64()
        );
        ensure!(failed == 0, "{failed} step(s) failed");
        Ok(())
    }
}

pub(crate) fn run() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    // Dropping the demo's future (timeout, a signal) removes the durable store's directory.
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(20), demo()) => {
                r.unwrap_or_else(|_| bail!("the demo did not finish within 20 s"))
            }
            why = crate::cluster_demo::stop_signal() => bail!("{why}: stopped the demo"),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

/// The token each demo device presents (a real fleet would use per-device secrets or mTLS).
fn device_token(id: &str) -> String {
    format!("token-of-{id}")
}

/// The demo's server, with its durable store at `store` (opened, or created if missing).
fn build_server(dev: &DevCertificate, store: &Path) -> quicx::Result<Server> {
    // Devices authenticate: a hello's id binds only with that device's token.
    let authenticator = Authenticator::new(|hello: Hello| async move {
        match hello.token {
            Some(token) if token == device_token(&hello.client_id) => Ok(hello.client_id),
            _ => Err(Refusal::Unauthenticated("wrong or missing token".into())),
        }
    });
    let server = Server::builder()
        .dev_certificate(dev)
        .transport(TransportOptions::default().idle_timeout(Duration::from_secs(5)))
        .authenticator(authenticator)
        .durable_store(store, DurableLimits::default())
        .build()?;
    server.register(
        "Arith",
        Service::new().method("Mul", |_ctx: Context, args: Args| async move {
            Ok(Reply { c: args.a * args.b })
        }),
    );
    Ok(server)
}

/// Shuts `old` down and starts a new server on the same store and, if the port is free again
/// in time, the same address: the new server, its address and what happened.
async fn restart(
    old: Server,
    dev: &DevCertificate,
    store: &Path,
    addr: SocketAddr,
) -> anyhow::Result<(Server, SocketAddr, String)> {
    let mut lines = Vec::new();
    let t = Instant::now();
    let drained = old.shutdown(Duration::from_secs(1)).await;
    drop(old);
    lines.push(format!(
        "server shut down ({}) in {} and dropped: an in-process restart, nothing kept in memory \
         (SIGKILL + restart: tests/tests/durable.rs)",
        if drained {
            "drained"
        } else {
            "drain timed out"
        },
        ms(t.elapsed())
    ));
    // The old server's last tasks may hold the store open for a moment after the drop.
    let t = Instant::now();
    let mut attempts = 0;
    let server = loop {
        attempts += 1;
        match build_server(dev, store) {
            Ok(server) => break server,
            Err(quicx::Error::Store(_)) if t.elapsed() < WAIT => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e).context("starting the new server on the same store"),
        }
    };
    lines.push(format!(
        "new server opened the same store in {}{}",
        ms(t.elapsed()),
        if attempts > 1 {
            format!(" ({attempts} attempts: the old server's last tasks held it open briefly)")
        } else {
            String::new()
        }
    ));
    // UDP: the old socket is closed; retry briefly in case it lingers, else take a new port.
    let t = Instant::now();
    let bound = loop {
        match server.bind(addr).await {
            Ok(a) => break Ok(a),
            Err(_) if t.elapsed() < Duration::from_secs(1) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => break Err(e),
        }
    };
    let addr = match bound {
        Ok(a) => {
            lines.push(format!("listening again on {a} (same port)"));
            a
        }
        Err(e) => {
            let a = server.bind("127.0.0.1:0").await?;
            lines.push(format!(
                "port {} not free again within 1 s ({e}): listening on {a} instead; device-1 \
                 connects there",
                addr.port()
            ));
            a
        }
    };
    Ok((server, addr, lines.join("\n")))
}

async fn demo() -> anyhow::Result<()> {
    let started = Instant::now();
    println!("quicx demo: one server, three devices, all on 127.0.0.1\n");
    let dev = DevCertificate::localhost()?;
    let store = TempStore::new()?;
    let server = build_server(&dev, &store.file())?;
    let mut server_events = server.events();
    let listen = server.bind("127.0.0.1:0").await?;
    let addr = listen.to_string();
    println!("server listening on {addr} (TLS 1.3, ALPN quicx/1, generated dev certificate)");
    println!(
        "durable store: {} (redb; removed when the demo ends)",
        store.file().display()
    );

    let mut devices = Vec::new();
    for id in ["device-1", "device-2", "device-3"] {
        devices.push(Device::connect(id, &addr, &dev).await?);
    }
    let mut bound: Vec<String> = server
        .connections()
        .iter()
        .filter_map(|c| c.client_id())
        .collect();
    bound.sort();
    println!(
        "registry: {} clients connected, bound ids {bound:?}\n",
        bound.len()
    );

    let steps = Steps {
        passed: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
    };

    // 1. A call.
    let result = async {
        let reply: Reply = devices[0]
            .client
            .call("Arith", "Mul", &Args { a: 10, b: 20 })
            .await?;
        ensure!(reply.c == 200, "wrong product {}", reply.c);
        Ok(format!("device-1 -> Arith.Mul: 10 * 20 = {}", reply.c))
    }
    .await;
    steps.report("call", result);

    // 2. A rogue client claims device-2's id with a wrong token: refused; device-2 keeps it.
    let result = async {
        let rogue = Client::builder()
            .tls(ClientTls::empty().trust(dev.certificate()))
            .server_name("localhost")
            .client_id("device-2")
            .token("guessed")
            .connect(&addr)
            .await;
        match rogue {
            Err(quicx::Error::Unauthenticated(why)) => {
                let holder = server
                    .client("device-2")
                    .context("device-2 lost its binding")?;
                ensure!(
                    holder.peer_identity().is_none() && !holder.is_closed(),
                    "device-2's connection was disturbed"
                );
                // The refused connection leaves the server's list a moment later; the
                // broadcast below is for the three devices.
                ensure!(
                    until(WAIT, || async { server.connections().len() == 3 }).await,
                    "the refused connection is still listed {WAIT:?} later"
                );
                Ok(format!(
                    "rogue client claiming device-2 refused ({why}); device-2 keeps its connection"
                ))
            }
            Err(e) => Err(anyhow::anyhow!("unexpected error {e}")),
            Ok(_) => Err(anyhow::anyhow!("the rogue client was accepted")),
        }
    }
    .await;
    steps.report("takeover refused", result);

    // 3. A push to one device, found by its id.
    let result = async {
        let t = Instant::now();
        server
            .send_to_client(
                "device-2",
                "Command",
                "Reboot",
                Metadata::new().with("at", "03:00"),
                b"reboot",
            )
            .await?;
        let got = devices[1].next_push().await?;
        Ok(format!(
            "server -> device-2: {got}, received in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        ))
    }
    .await;
    steps.report("push to one device by id", result);

    // 4. A broadcast with per-device results.
    let result = async {
        let t = Instant::now();
        let results = server
            .broadcast(
                "Command",
                "SyncClock",
                Metadata::new(),
                b"sync",
                Duration::from_secs(2),
            )
            .await?;
        let mut lines = Vec::new();
        for r in &results {
            lines.push(format!(
                "{}: {}",
                r.conn.client_id().unwrap_or_default(),
                match &r.result {
                    Ok(()) => "sent".to_owned(),
                    Err(e) => format!("error: {e}"),
                }
            ));
        }
        lines.sort();
        ensure!(
            results.iter().all(|r| r.result.is_ok()),
            "some pushes failed: {lines:?}"
        );
        for d in &mut devices {
            let got = d.next_push().await?;
            lines.push(format!("{} received {got}", d.id));
        }
        Ok(format!(
            "broadcast to {} devices in {:.1} ms\n{}",
            results.len(),
            t.elapsed().as_secs_f64() * 1e3,
            lines.join("\n")
        ))
    }
    .await;
    steps.report("broadcast", result);

    // 5. A reverse call: the server calls a service the device registered.
    let result = async {
        let conn = server
            .client("device-3")
            .context("device-3 not in the registry")?;
        let status: Status = conn.call("Device", "Status", &()).await?;
        ensure!(status.device == "device-3", "answered by {}", status.device);
        Ok(format!(
            "server -> device-3 Device.Status: battery {}%, firmware {}",
            status.battery_percent, status.firmware
        ))
    }
    .await;
    steps.report("reverse call (server calls the device)", result);

    // 6. A device drops out and reconnects; its identity is re-bound and pushes reach it.
    let result = async {
        let device = &mut devices[0];
        let mut client_events = device.client.events();
        let old = server
            .client("device-1")
            .context("device-1 not in the registry")?;
        let t = Instant::now();
        old.close(); // the link drops, as on a flaky network
        let mut lines = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, client_events.recv()).await?? {
                ClientEvent::Disconnected { reason, .. } => {
                    lines.push(format!("device-1 sees: disconnected ({reason:?})"));
                }
                ClientEvent::Reconnected { attempts, .. } => {
                    lines.push(format!(
                        "device-1 sees: reconnected after {attempts} attempt(s), {:.1} ms",
                        t.elapsed().as_secs_f64() * 1e3
                    ));
                    break;
                }
                _ => {}
            }
        }
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        while seen.len() < 2 && Instant::now() < deadline {
            if let Ok(Ok(event)) = tokio::time::timeout(WAIT, server_events.recv()).await {
                match event {
                    ServerEvent::Disconnected { conn, reason } if conn == old => {
                        seen.push(format!("server sees: device-1 disconnected ({reason:?})"));
                    }
                    ServerEvent::Bound { conn, client_id }
                        if client_id == "device-1" && conn != old =>
                    {
                        seen.push(format!(
                            "server sees: device-1 re-bound to connection {}",
                            conn.id()
                        ));
                    }
                    _ => {}
                }
            }
        }
        lines.extend(seen);
        let new = server.client("device-1").context("device-1 not re-bound")?;
        ensure!(
            new != old,
            "the registry still points at the dead connection"
        );
        server
            .send_to_client(
                "device-1",
                "Command",
                "Hello",
                Metadata::new(),
                b"welcome back",
            )
            .await?;
        lines.push(format!(
            "push after reconnect: device-1 received {}",
            device.next_push().await?
        ));
        Ok(lines.join("\n"))
    }
    .await;
    steps.report("drop out and reconnect", result);

    // 7. device-1 goes offline; the operator sends it three durable commands, each stored on
    //    disk before send_durable returns.
    let ttl = Duration::from_secs(3600);
    let result = async {
        devices[0].client.close().await;
        ensure!(
            until(WAIT, || async { server.client("device-1").is_none() }).await,
            "the server still lists device-1 {WAIT:?} after it closed"
        );
        let mut lines = vec!["device-1 closed its client: the server lists it offline".to_owned()];
        let mut ids = Vec::new();
        for (method, payload) in COMMANDS {
            let t = Instant::now();
            let id = server
                .send_durable(
                    "device-1",
                    "Command",
                    method,
                    Metadata::new().with("operator", "ops-console"),
                    payload,
                    ttl,
                )
                .await?;
            lines.push(format!(
                "send_durable Command.{method} \"{payload}\" -> id {id}, committed to disk in {}",
                ms(t.elapsed())
            ));
            ids.push(id);
        }
        let pending = server.durable_pending("device-1").await?;
        let listed: Vec<u64> = pending.iter().map(|m| m.id).collect();
        ensure!(
            listed == ids,
            "durable_pending lists {listed:?}, sent {ids:?}"
        );
        lines.push(format!(
            "durable_pending(\"device-1\"): {} messages {listed:?}",
            pending.len()
        ));
        let backlog = server.durable_backlog(5)?;
        ensure!(
            backlog.len() == 1
                && backlog[0].identity == "device-1"
                && backlog[0].messages == ids.len() as u64,
            "durable_backlog(5) is {backlog:?}"
        );
        lines.push(format!(
            "durable_backlog(5): device-1 has {} messages, {} bytes (`quicx durable ADDR` prints the same)",
            backlog[0].messages, backlog[0].bytes
        ));
        Ok((lines.join("\n"), ids))
    }
    .await;
    let ids = match result {
        Ok((detail, ids)) => {
            steps.report("durable commands for an offline device", Ok(detail));
            ids
        }
        Err(e) => {
            steps.report("durable commands for an offline device", Err(e));
            Vec::new()
        }
    };

    // 8. The server restarts on the same store; the commands are still there. (Events not yet
    //    received hold their connections, and so the old server and its store: drop them.)
    drop(server_events);
    let (server, addr) = match restart(server, &dev, &store.file(), listen).await {
        Ok((server, addr, detail)) => {
            let result = async {
                let mut detail = detail;
                if addr == listen {
                    // The other devices reconnect by themselves (their clients retry with
                    // backoff).
                    let t = Instant::now();
                    ensure!(
                        until(WAIT, || async {
                            server.client("device-2").is_some()
                                && server.client("device-3").is_some()
                        })
                        .await,
                        "device-2 and device-3 did not reconnect within {WAIT:?}"
                    );
                    detail.push_str(&format!(
                        "\ndevice-2 and device-3 reconnected on their own {} later",
                        ms(t.elapsed())
                    ));
                }
                let pending: Vec<u64> = server
                    .durable_pending("device-1")
                    .await?
                    .iter()
                    .map(|m| m.id)
                    .collect();
                ensure!(
                    pending == ids,
                    "after the restart the store holds {pending:?} for device-1, expected {ids:?}"
                );
                Ok(format!(
                    "{detail}\ndurable_pending(\"device-1\") after the restart: {pending:?}"
                ))
            }
            .await;
            steps.report("server restart on the same store", result);
            (server, addr)
        }
        Err(e) => {
            steps.report("server restart on the same store", Err(e));
            for d in &devices {
                d.client.close().await;
            }
            return steps.summary(started);
        }
    };

    // 9. device-1 comes back (with its token, as before): the commands arrive in order, once.
    let result = async {
        ensure!(
            ids.len() == COMMANDS.len(),
            "no commands to wait for (storing them failed)"
        );
        let mut server_events = server.events();
        let mut bound = tokio::spawn(async move {
            loop {
                match server_events.recv().await {
                    Ok(ServerEvent::Bound { client_id, .. }) if client_id == "device-1" => {
                        return Some(Instant::now());
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    _ => {}
                }
            }
        });
        let t = Instant::now();
        // Manual ack: the device acknowledges a command once it has applied it.
        devices[0] = Device::connect_with("device-1", &addr.to_string(), &dev, true).await?;
        let device = &mut devices[0];
        let connected = t.elapsed();
        let mut lines = vec![format!(
            "device-1 reconnected to {addr} in {} (QUIC handshake + hello, token checked), \
             manual-ack mode",
            ms(connected)
        )];
        let mut last = t;
        for (i, &id) in ids.iter().enumerate() {
            let msg = device.next_message().await?;
            last = Instant::now();
            let (method, payload) = COMMANDS[i];
            ensure!(
                msg.durable_id() == Some(id)
                    && msg.service_method == method
                    && &msg.payload[..] == payload.as_bytes(),
                "expected id {id} Command.{method}, got {:?} {}",
                msg.durable_id(),
                describe(&msg)
            );
            ensure!(!msg.is_redelivered(), "id {id} is marked redelivered");
            ensure!(msg.ack(), "acknowledging id {id} failed");
            lines.push(format!(
                "device-1 received id {id} {} (first delivery), applied it, acked",
                describe(&msg)
            ));
        }
        // Each once: nothing more comes.
        if let Ok(Some(extra)) =
            tokio::time::timeout(Duration::from_millis(300), device.pushes.recv()).await
        {
            bail!(
                "an extra push arrived: id {:?} {}",
                extra.durable_id(),
                describe(&extra)
            );
        }
        lines.push("nothing more within 300 ms: each command once".into());
        let hello = tokio::time::timeout(WAIT, &mut bound).await;
        bound.abort();
        let hello = hello
            .ok()
            .and_then(Result::ok)
            .flatten()
            .context("no Bound event for device-1 on the new server")?;
        lines.push(format!(
            "from the hello (device-1 bound) to the last command received: {}",
            ms(last.saturating_duration_since(hello))
        ));
        ensure!(
            until(WAIT, || async {
                server
                    .durable_pending("device-1")
                    .await
                    .is_ok_and(|p| p.is_empty())
            })
            .await,
            "the store still holds messages for device-1 {WAIT:?} after the acks"
        );
        let stats = server.stats();
        lines.push(format!(
            "durable_pending(\"device-1\"): [] (store total {}, delivered {}, redelivered {})",
            stats.durable_pending, stats.durable_delivered, stats.durable_redelivered
        ));
        Ok(lines.join("\n"))
    }
    .await;
    steps.report("offline commands arrive after the reconnect", result);

    let mut closing = tokio::task::JoinSet::new();
    for d in &devices {
        let client = d.client.clone();
        closing.spawn(async move { client.close().await });
    }
    closing.join_all().await;
    server.shutdown(Duration::from_secs(1)).await;
    drop(server);
    steps.summary(started)
}
