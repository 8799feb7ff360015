//! rpcx's bidirectional example on quicx: the server saves the client's connection in
//! `Arith.Mul`, then pushes `abcde` to it every second over the connection the client opened.
//!
//! ```text
//! cargo run -p quicx-examples --bin bidirectional              # both in one process (5 pushes)
//! cargo run -p quicx-examples --bin bidirectional -- server    # terminal 1
//! cargo run -p quicx-examples --bin bidirectional -- client    # terminal 2
//! ```
//!
//! `--metrics 127.0.0.1:9000` serves the process's [metrics](quicx::metrics) in the Prometheus
//! text format on `http://127.0.0.1:9000/metrics` (with `server`: the server's series;
//! `curl -s 127.0.0.1:9000/metrics | grep quicx_`).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use quicx::{Client, ClientTls, Connection, Context, Metadata, Server, Service, push_channel};
use quicx_examples::{
    Args, Reply, init_tracing, publish_dev_certificate, trust_published_certificate,
};
use tokio::sync::Mutex;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    /// Address to listen on / connect to.
    #[arg(long, default_value = "127.0.0.1:8972", global = true)]
    addr: String,
    /// Stop after this many pushes (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0, global = true)]
    count: u32,
    /// Serve the metrics in the Prometheus text format on http://ADDR/metrics (keep it on
    /// loopback, e.g. 127.0.0.1:9000).
    #[arg(long, value_name = "ADDR", global = true)]
    metrics: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum Role {
    /// Serve `Arith` and push to the last caller every second.
    Server,
    /// Call `Arith.Mul` and print every push.
    Client,
}

/// Registers `Arith.Mul`, which remembers the calling client, and pushes `abcde` to it every
/// second, `count` times (0: forever).
async fn run_server(server: Server, count: u32) {
    let client_conn: Arc<Mutex<Option<Connection>>> = Arc::default();
    let saved = client_conn.clone();
    server.register(
        "Arith",
        Service::new().method("Mul", move |ctx: Context, args: Args| {
            let saved = saved.clone();
            async move {
                *saved.lock().await = Some(ctx.conn().clone());
                Ok(Reply { c: args.a * args.b })
            }
        }),
    );
    let mut sent = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    while count == 0 || sent < count {
        ticker.tick().await;
        let Some(conn) = client_conn.lock().await.clone() else {
            continue;
        };
        match server
            .send_message(
                &conn,
                "test_service_path",
                "test_service_method",
                Metadata::new(),
                b"abcde",
            )
            .await
        {
            Ok(()) => sent += 1,
            Err(e) => {
                println!("failed to send messsage to {}: {e}", conn.remote_address());
                *client_conn.lock().await = None;
            }
        }
    }
}

async fn run_client(addr: &str, tls: ClientTls, count: u32) -> anyhow::Result<()> {
    let (tx, mut rx) = push_channel(64);
    let client = Client::builder()
        .tls(tls)
        .server_name("localhost")
        .push_channel(tx)
        .connect(addr)
        .await?;
    let args = Args { a: 10, b: 20 };
    let reply: Reply = client.call("Arith", "Mul", &args).await?;
    println!("{} * {} = {}", args.a, args.b, reply.c);
    let mut received = 0;
    while let Some(msg) = rx.recv().await {
        println!(
            "receive msg from server: {}",
            String::from_utf8_lossy(&msg.payload)
        );
        received += 1;
        if count != 0 && received >= count {
            break;
        }
    }
    client.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let cli = Cli::parse();
    if let Some(addr) = cli.metrics {
        // Before any server or client is built: they take their series from the recorder.
        quicx::metrics::install_prometheus(addr)?;
        println!("metrics on http://{addr}/metrics");
    }
    match cli.role {
        Some(Role::Server) => {
            let dev = publish_dev_certificate("bidirectional")?;
            let server = Server::builder().dev_certificate(&dev).build()?;
            let local = server.bind(cli.addr.as_str()).await?;
            println!("serving on {local}; Ctrl-C to stop");
            tokio::select! {
                () = run_server(server.clone(), cli.count) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            server.shutdown(Duration::from_secs(2)).await;
        }
        Some(Role::Client) => {
            run_client(
                &cli.addr,
                trust_published_certificate("bidirectional")?,
                cli.count,
            )
            .await?;
        }
        None => {
            let count = if cli.count == 0 { 5 } else { cli.count };
            let dev = quicx::DevCertificate::localhost()?;
            let server = Server::builder().dev_certificate(&dev).build()?;
            let local = server.bind("127.0.0.1:0").await?;
            let pusher = tokio::spawn(run_server(server.clone(), count));
            run_client(
                &local.to_string(),
                ClientTls::empty().trust(dev.certificate()),
                count,
            )
            .await?;
            pusher.abort();
            server.shutdown(Duration::from_secs(1)).await;
        }
    }
    Ok(())
}
