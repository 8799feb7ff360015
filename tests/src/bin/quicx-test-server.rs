//! A quicx server as a child process, for fault tests that kill it with a signal.
//!
//! `quicx-test-server <cert.pem> <key.pem> <listen addr> <name> [stall ms]` serves `Who.Name`
//! (answers the name) and `Who.Work` (sleeps the stall, default 0, then answers the name),
//! prints `READY <addr>` on stdout once it accepts connections, and runs until killed.
#![forbid(unsafe_code)]

use std::{io::Write, time::Duration};

use quicx::{Context, Server, ServerTls, Service};

#[tokio::main]
async fn main() -> quicx::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (cert, key, addr, name, stall) = match &args[..] {
        [_, cert, key, addr, name] => (cert, key, addr, name, 0),
        [_, cert, key, addr, name, stall] => (cert, key, addr, name, stall.parse().unwrap_or(0)),
        _ => {
            eprintln!(
                "usage: quicx-test-server <cert.pem> <key.pem> <listen addr> <name> [stall ms]"
            );
            std::process::exit(2);
        }
    };
    let server = Server::builder()
        .tls(ServerTls::from_pem_files(cert, key)?)
        .build()?;
    let (n1, n2) = (name.clone(), name.clone());
    server.register(
        "Who",
        Service::new()
            .method("Name", move |_ctx: Context, (): ()| {
                let n = n1.clone();
                async move { Ok(n) }
            })
            .method("Work", move |_ctx: Context, (): ()| {
                let n = n2.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(stall)).await;
                    Ok(n)
                }
            }),
    );
    let local = server.bind(addr.as_str()).await?;
    println!("READY {local}");
    std::io::stdout().flush()?;
    std::future::pending::<()>().await;
    Ok(())
}
