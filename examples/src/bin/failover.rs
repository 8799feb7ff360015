//! Three `Arith` servers behind one XClient with `Failover`; one server is killed mid-run and
//! the calls go on.
//!
//! ```text
//! cargo run -p quicx-examples --bin failover
//! ```

use std::time::Duration;

use quicx::{
    ClientOption, ClientTls, Context, DevCertificate, FailMode, SelectMode, Server, Service,
    XClient,
    discovery::{Endpoint, MultipleServersDiscovery},
};
use quicx_examples::{Args, init_tracing};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let dev = DevCertificate::localhost()?;
    let mut servers = Vec::new();
    let mut endpoints = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let server = Server::builder().dev_certificate(&dev).build()?;
        server.register(
            "Arith",
            Service::new().method("Mul", move |_ctx: Context, args: Args| async move {
                Ok((args.a * args.b, name.to_owned()))
            }),
        );
        let addr = server.bind("127.0.0.1:0").await?;
        println!("server {name} on {addr}");
        endpoints.push(Endpoint::parse(&addr.to_string())?.with_server_name("localhost"));
        servers.push((name, server));
    }
    let option = ClientOption {
        connect_timeout: Duration::from_millis(500),
        ..ClientOption::with_tls(ClientTls::empty().trust(dev.certificate()))
    };
    let xclient = XClient::new(
        "Arith",
        FailMode::Failover,
        SelectMode::RoundRobin,
        MultipleServersDiscovery::new(endpoints),
        option,
    )?;
    let mut failures = 0;
    for i in 1..=24i64 {
        if i == 10 {
            let (name, server) = &servers[1];
            server.shutdown(Duration::ZERO).await;
            println!("-- killed server {name} --");
        }
        match xclient
            .call::<_, (i64, String)>("Mul", &Args { a: i, b: 10 })
            .await
        {
            Ok((c, by)) => println!("{i:>2} * 10 = {c:<4} (answered by {by})"),
            Err(e) => {
                failures += 1;
                println!("{i:>2} * 10 failed: {e}");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{} calls, {failures} failed", 24);
    xclient.close().await;
    for (_, server) in servers {
        server.shutdown(Duration::from_secs(1)).await;
    }
    anyhow::ensure!(failures == 0, "{failures} calls failed");
    Ok(())
}
