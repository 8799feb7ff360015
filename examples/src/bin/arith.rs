//! The rpcx `Arith` example on quicx.
//!
//! ```text
//! cargo run -p quicx-examples --bin arith              # server and client in one process
//! cargo run -p quicx-examples --bin arith -- server    # terminal 1
//! cargo run -p quicx-examples --bin arith -- client    # terminal 2
//! ```

use clap::{Parser, Subcommand};
use quicx::{Client, ClientTls, Server};
use quicx_examples::{
    Args, Reply, arith, init_tracing, publish_dev_certificate, trust_published_certificate,
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    /// Address to listen on / connect to.
    #[arg(long, default_value = "127.0.0.1:8972", global = true)]
    addr: String,
}

#[derive(Subcommand)]
enum Role {
    /// Serve `Arith` until Ctrl-C.
    Server,
    /// Call `Arith.Mul` once.
    Client,
}

async fn call(addr: &str, tls: ClientTls) -> anyhow::Result<()> {
    let client = Client::builder()
        .tls(tls)
        .server_name("localhost")
        .connect(addr)
        .await?;
    let args = Args { a: 10, b: 20 };
    let reply: Reply = client.call("Arith", "Mul", &args).await?;
    println!("{} * {} = {}", args.a, args.b, reply.c);
    client.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let cli = Cli::parse();
    match cli.role {
        Some(Role::Server) => {
            let dev = publish_dev_certificate("arith")?;
            let server = Server::builder().dev_certificate(&dev).build()?;
            server.register("Arith", arith());
            let local = server.bind(cli.addr.as_str()).await?;
            println!("serving Arith on {local}; Ctrl-C to stop");
            tokio::signal::ctrl_c().await?;
            server.shutdown(std::time::Duration::from_secs(5)).await;
        }
        Some(Role::Client) => call(&cli.addr, trust_published_certificate("arith")?).await?,
        None => {
            let dev = quicx::DevCertificate::localhost()?;
            let server = Server::builder().dev_certificate(&dev).build()?;
            server.register("Arith", arith());
            let local = server.bind("127.0.0.1:0").await?;
            call(
                &local.to_string(),
                ClientTls::empty().trust(dev.certificate()),
            )
            .await?;
            server.shutdown(std::time::Duration::from_secs(1)).await;
        }
    }
    Ok(())
}
