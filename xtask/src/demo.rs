//! `cargo xtask demo`: one server and three device clients on loopback, in one process.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use quicx::{
    Authenticator, Client, ClientEvent, ClientTls, Context, DevCertificate, Hello, Metadata,
    PushReceiver, Refusal, Server, ServerEvent, Service, TransportOptions, push_channel,
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

struct Device {
    id: String,
    client: Client,
    pushes: PushReceiver,
}

impl Device {
    async fn connect(id: &str, addr: &str, dev: &DevCertificate) -> anyhow::Result<Self> {
        let (tx, pushes) = push_channel(16);
        let me = id.to_owned();
        let battery = 60 + id.bytes().map(u32::from).sum::<u32>() % 40;
        let client = Client::builder()
            .tls(ClientTls::empty().trust(dev.certificate()))
            .server_name("localhost")
            .client_id(id)
            .token(device_token(id))
            .push_channel(tx)
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

    async fn next_push(&mut self) -> anyhow::Result<String> {
        let msg = tokio::time::timeout(WAIT, self.pushes.recv())
            .await
            .with_context(|| format!("{}: no push within {WAIT:?}", self.id))?
            .context("push channel closed")?;
        Ok(format!(
            "{}.{} \"{}\"",
            msg.service_path,
            msg.service_method,
            String::from_utf8_lossy(&msg.payload)
        ))
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
}

pub(crate) fn run() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let outcome = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(14), demo())
            .await
            .unwrap_or_else(|_| bail!("the demo did not finish within 14 s"))
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

/// The token each demo device presents (a real fleet would use per-device secrets or mTLS).
fn device_token(id: &str) -> String {
    format!("token-of-{id}")
}

async fn demo() -> anyhow::Result<()> {
    let started = Instant::now();
    println!("quicx demo: one server, three devices, all on 127.0.0.1\n");
    let dev = DevCertificate::localhost()?;
    // Devices authenticate: a hello's id binds only with that device's token.
    let authenticator = Authenticator::new(|hello: Hello| async move {
        match hello.token {
            Some(token) if token == device_token(&hello.client_id) => Ok(hello.client_id),
            _ => Err(Refusal::Unauthenticated("wrong or missing token".into())),
        }
    });
    let server = Server::builder()
        .dev_certificate(&dev)
        .transport(TransportOptions::default().idle_timeout(Duration::from_secs(5)))
        .authenticator(authenticator)
        .build()?;
    server.register(
        "Arith",
        Service::new().method("Mul", |_ctx: Context, args: Args| async move {
            Ok(Reply { c: args.a * args.b })
        }),
    );
    let mut server_events = server.events();
    let addr = server.bind("127.0.0.1:0").await?.to_string();
    println!("server listening on {addr} (TLS 1.3, ALPN quicx/1, generated dev certificate)");

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

    for d in &devices {
        d.client.close().await;
    }
    server.shutdown(Duration::from_secs(1)).await;
    let (passed, failed) = (
        steps.passed.load(Ordering::Relaxed),
        steps.failed.load(Ordering::Relaxed),
    );
    println!(
        "\n{passed} of {} steps passed in {:.2} s",
        passed + failed,
        started.elapsed().as_secs_f64()
    );
    ensure!(failed == 0, "{failed} step(s) failed");
    Ok(())
}
