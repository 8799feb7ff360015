//! mDNS on the LAN: a server announces `Arith` on `_quicx._udp.local.`, a client finds it by
//! service name, with no address configured, and calls it.
//!
//! ```text
//! sudo cargo run -p quicx-examples --bin mdns          # in a private network namespace (default)
//! cargo run -p quicx-examples --bin mdns -- --lan      # on your real LAN: multicasts on every interface
//! ```
//!
//! By default the example moves itself into a network namespace of its own (only `lo`), so
//! it never multicasts on the machine's interfaces; that needs root.

use std::time::{Duration, Instant};

use clap::Parser;
use quicx::{
    ClientOption, ClientTls, DevCertificate, FailMode, SelectMode, Server, XClient,
    discovery::{Announcement, MdnsAdvertiser, MdnsDiscovery, MdnsOptions, wait_for_endpoints},
};
use quicx_examples::{Args, Reply, arith, init_tracing};

#[derive(Parser)]
struct Cli {
    /// Announce and browse on the real LAN instead of a private namespace.
    #[arg(long)]
    lan: bool,
}

fn main() -> anyhow::Result<()> {
    init_tracing();
    let cli = Cli::parse();
    if !cli.lan {
        quicx_discovery::sandbox::enter_private_network_namespace().map_err(|e| {
            anyhow::anyhow!(
                "{e}\nrun as root for the private namespace, or pass --lan to use the real LAN"
            )
        })?;
        println!("running in a private network namespace (only lo)");
    }
    // The runtime's threads start after unshare, inside the namespace.
    tokio::runtime::Runtime::new()?.block_on(run(cli.lan))
}

async fn run(lan: bool) -> anyhow::Result<()> {
    let dev = DevCertificate::localhost()?;
    let server = Server::builder().dev_certificate(&dev).build()?;
    server.register("Arith", arith());
    let addr = server
        .bind(if lan { "0.0.0.0:0" } else { "127.0.0.1:0" })
        .await?;
    let options = MdnsOptions::default();
    let advertiser = MdnsAdvertiser::new(&options)?;
    let mut announcement = Announcement::new("Arith", "arith-example", addr.port());
    if !lan {
        announcement.addresses = vec![addr.ip()];
    }
    let registration = advertiser.advertise(&announcement)?;
    println!(
        "server: Arith on {addr}, announced as {}",
        quicx::discovery::SERVICE_TYPE
    );

    let started = Instant::now();
    let discovery = MdnsDiscovery::new("Arith", &options)?;
    let found = wait_for_endpoints(&discovery, Duration::from_secs(10)).await;
    anyhow::ensure!(!found.is_empty(), "no Arith server found within 10 s");
    println!(
        "client: found {} after {:.0} ms",
        found[0],
        started.elapsed().as_secs_f64() * 1e3
    );
    let xclient = XClient::new(
        "Arith",
        FailMode::Failover,
        SelectMode::RandomSelect,
        discovery,
        ClientOption::with_tls(ClientTls::empty().trust(dev.certificate())),
    )?;
    let args = Args { a: 10, b: 20 };
    let reply: Reply = xclient.call("Mul", &args).await?;
    println!("{} * {} = {}", args.a, args.b, reply.c);
    registration.withdraw().await;
    xclient.close().await;
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
