//! `xtask cluster-node` (hidden): one node of `cargo xtask demo --cluster`, run as a child process
//! so that the demo can kill it with SIGKILL.
//!
//! A quicx server on 127.0.0.1 (certificate and key from PEM files) that binds a device id only
//! with that device's token, joins the cluster on etcd (lease TTL `--lease-ttl`, the cluster
//! secret from `$QUICX_CLUSTER_SECRET`, never from the command line where `ps` shows it), and
//! serves the demo's control service `Demo` (every call must carry the cluster secret):
//!
//! - `Demo.Name ()` → the node's name;
//! - `Demo.Push {client_id, text}` → pushes `Device.Notify` with receipt to the device, wherever
//!   it is connected ([`ClusterNode::send_to_client_with_receipt`]);
//! - `Demo.Call client_id` → calls the device's `Device.Status` ([`ClusterNode::call_client`]);
//! - `Demo.Locate client_id` → the node that holds the device, from this node's cache;
//! - `Demo.Nodes ()` → the nodes of the cluster.
//!
//! On stdout: `READY <addr>` once it is in the cluster, then one line per cluster event its etcd
//! watch sees, `EVENT <unix µs> <kind> <names…>`. It exits when its stdin closes (the demo
//! holds it open), so a demo that dies leaves no node behind.

use std::{
    io::Write,
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use quicx::{
    Authenticator, CallAuthorizer, ClientTls, Context, Hello, Metadata, Refusal, Server, ServerTls,
    Service, ServiceError,
};
use quicx_cluster::{
    ClusterError, ClusterEvent, ClusterNode, ClusterOptions, EtcdOptions, SECRET_METADATA_KEY,
    ServiceEntry,
};
use serde::{Deserialize, Serialize};

/// The environment variable that carries the cluster secret to a node.
pub(crate) const SECRET_ENV: &str = "QUICX_CLUSTER_SECRET";
/// The control service every node serves (and registers in etcd, for XClients).
pub(crate) const CONTROL: &str = "Demo";

/// Error codes of `Demo.Push` and `Demo.Call`: which [`ClusterError`] the node got.
pub(crate) mod code {
    pub(crate) const OFFLINE: u32 = 1001;
    pub(crate) const NODE_UNREACHABLE: u32 = 1002;
    pub(crate) const DEVICE: u32 = 1003;
    pub(crate) const OTHER: u32 = 1004;
}

/// Where a node runs.
#[derive(Debug, clap::Args)]
pub(crate) struct NodeArgs {
    /// etcd's client URL.
    #[arg(long)]
    etcd: String,
    /// The key prefix of the cluster in etcd.
    #[arg(long, default_value = "/quicx-demo")]
    prefix: String,
    /// The node's name (unique in the cluster).
    #[arg(long)]
    name: String,
    /// The server certificate (PEM); nodes trust it to reach each other.
    #[arg(long)]
    cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// The TTL of the node's etcd lease, in seconds.
    #[arg(long, default_value_t = 2)]
    lease_ttl: u64,
}

/// `Demo.Push`'s argument.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PushArgs {
    pub(crate) client_id: String,
    pub(crate) text: String,
}

/// What `Demo.Push` and `Demo.Call` answer: the value, the node that held the device (as the
/// asked node's cache said before routing), and how long the routed push or call took there.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Routed<T> {
    pub(crate) value: T,
    pub(crate) owner: Option<String>,
    pub(crate) micros: u64,
}

/// What a device answers to `Device.Status`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Status {
    pub(crate) device: String,
    pub(crate) connected_to: String,
    pub(crate) battery_percent: u8,
    pub(crate) firmware: String,
}

/// The token a demo device presents (a real fleet would use per-device secrets or mTLS).
pub(crate) fn device_token(id: &str) -> String {
    format!("token-of-{id}")
}

/// Microseconds since the Unix epoch: event times comparable across the demo's processes.
pub(crate) fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One line to the demo, ignoring a closed pipe (the demo is gone: stdin's EOF ends us).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub(crate) fn run(args: NodeArgs) -> anyhow::Result<()> {
    let secret = std::env::var(SECRET_ENV)
        .with_context(|| format!("the cluster secret is read from ${SECRET_ENV}"))?;
    // The demo holds our stdin open: its end (the demo exited or was killed) ends the node.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        std::process::exit(0);
    });
    tokio::runtime::Runtime::new()?.block_on(serve(args, secret))
}

async fn serve(args: NodeArgs, secret: String) -> anyhow::Result<()> {
    let secret: Arc<str> = secret.into();
    let control_secret = secret.clone();
    let server = Server::builder()
        .tls(ServerTls::from_pem_files(&args.cert, &args.key)?)
        // A device id binds only with that device's token.
        .authenticator(Authenticator::new(|hello: Hello| async move {
            match hello.token {
                Some(token) if token == device_token(&hello.client_id) => Ok(hello.client_id),
                _ => Err(Refusal::Unauthenticated("wrong or missing token".into())),
            }
        }))
        // The control service pushes to any device: only with the cluster secret.
        .authorize_calls(CallAuthorizer::new(move |ctx| {
            if ctx.service_path() == CONTROL
                && ctx.metadata().get(SECRET_METADATA_KEY) != Some(&*control_secret)
            {
                return Err(Refusal::Unauthenticated(
                    "the control service needs the cluster secret".into(),
                ));
            }
            Ok(())
        }))
        .build()?;
    let cell: Arc<OnceLock<ClusterNode>> = Arc::default();
    server.register(CONTROL, control(&args.name, &cell));
    let addr = server.bind("127.0.0.1:0").await?;
    let etcd = EtcdOptions::new([args.etcd.as_str()])
        .prefix(args.prefix.as_str())
        .lease_ttl(Duration::from_secs(args.lease_ttl));
    let tls = ClientTls::empty().trust_pem_file(&args.cert)?;
    let node = ClusterNode::start(
        &server,
        ClusterOptions::new(args.name.as_str(), etcd, tls, &*secret)
            .service(ServiceEntry::new(CONTROL))
            .route_timeout(Duration::from_secs(3)),
    )
    .await
    .with_context(|| format!("{} joining the cluster", args.name))?;
    let mut events = node.events();
    let _ = cell.set(node);
    say(&format!("READY {addr}"));
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        };
        let what = match event {
            ClusterEvent::DeviceConnected { client_id, node } => {
                format!("connected {client_id} {node}")
            }
            ClusterEvent::DeviceMoved {
                client_id,
                from,
                to,
            } => format!("moved {client_id} {from} {to}"),
            ClusterEvent::DeviceDisconnected { client_id, node } => {
                format!("disconnected {client_id} {node}")
            }
            ClusterEvent::NodeUp { node } => format!("node-up {node}"),
            ClusterEvent::NodeDown { node } => format!("node-down {node}"),
            _ => continue,
        };
        say(&format!("EVENT {} {what}", unix_micros()));
    }
    drop(server);
    Ok(())
}

fn node_of(cell: &OnceLock<ClusterNode>) -> Result<ClusterNode, ServiceError> {
    cell.get()
        .cloned()
        .ok_or_else(|| ServiceError::new(code::OTHER, "the node is still joining the cluster"))
}

fn cluster_error(e: &ClusterError) -> ServiceError {
    let code = match e {
        ClusterError::Offline { .. } => code::OFFLINE,
        ClusterError::NodeUnreachable { .. } => code::NODE_UNREACHABLE,
        ClusterError::Device { .. } => code::DEVICE,
        _ => code::OTHER,
    };
    ServiceError::new(code, e.to_string())
}

/// The `Demo` service.
fn control(name: &str, cell: &Arc<OnceLock<ClusterNode>>) -> Service {
    let name = name.to_owned();
    let (push, call, locate, nodes) = (cell.clone(), cell.clone(), cell.clone(), cell.clone());
    Service::new()
        .method("Name", move |_ctx: Context, (): ()| {
            let name = name.clone();
            async move { Ok(name) }
        })
        .method("Push", move |_ctx: Context, args: PushArgs| {
            let node = node_of(&push);
            async move {
                let node = node?;
                let owner = node.locate(&args.client_id);
                let started = Instant::now();
                node.send_to_client_with_receipt(
                    &args.client_id,
                    "Device",
                    "Notify",
                    Metadata::new().with("from", node.name()),
                    args.text.as_bytes(),
                )
                .await
                .map_err(|e| cluster_error(&e))?;
                Ok(Routed {
                    value: (),
                    owner,
                    micros: started.elapsed().as_micros() as u64,
                })
            }
        })
        .method("Call", move |_ctx: Context, client_id: String| {
            let node = node_of(&call);
            async move {
                let node = node?;
                let owner = node.locate(&client_id);
                let started = Instant::now();
                let status: Status = node
                    .call_client(&client_id, "Device", "Status", &())
                    .await
                    .map_err(|e| cluster_error(&e))?;
                Ok(Routed {
                    value: status,
                    owner,
                    micros: started.elapsed().as_micros() as u64,
                })
            }
        })
        .method("Locate", move |_ctx: Context, client_id: String| {
            let node = node_of(&locate);
            async move { Ok(node?.locate(&client_id)) }
        })
        .method("Nodes", move |_ctx: Context, (): ()| {
            let node = node_of(&nodes);
            async move { Ok(node?.nodes()) }
        })
}
