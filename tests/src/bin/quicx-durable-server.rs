//! A server with a durable store as a child process, for tests that kill it with SIGKILL.
//!
//! `quicx-durable-server <cert.pem> <key.pem> <listen addr> <store path>` serves
//! `Ops.Send(client_id, n)`: stores `n` durable messages for `client_id` (payloads `"0"`,
//! `"1"`, ..., 100 at a time, so the store commits them in groups; ids follow the payloads'
//! order) and answers once all are stored. Prints `READY <addr>` once it accepts connections,
//! and runs until killed. Hello ids bind unverified (test devices carry no credentials). A fifth
//! argument, milliseconds, selects `Fsync::Interval` (the default is `Fsync::EveryCommit`).
#![forbid(unsafe_code)]

use std::{io::Write, time::Duration};

use quicx::{Context, DurableLimits, Fsync, Metadata, Server, ServerTls, Service, ServiceError};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (cert, key, addr, store, fsync) = match &args[..] {
        [_, cert, key, addr, store] => (cert, key, addr, store, Fsync::EveryCommit),
        [_, cert, key, addr, store, ms] => (
            cert,
            key,
            addr,
            store,
            Fsync::Interval(Duration::from_millis(ms.parse()?)),
        ),
        _ => {
            eprintln!(
                "usage: quicx-durable-server <cert.pem> <key.pem> <listen addr> <store path> \
                 [fsync interval ms]"
            );
            std::process::exit(2);
        }
    };
    let server = Server::builder()
        .tls(ServerTls::from_pem_files(cert, key)?)
        .insecure_accept_unverified_client_ids()
        .durable_store(store, DurableLimits::default().fsync(fsync))
        .build()?;
    let weak = server.downgrade();
    server.register(
        "Ops",
        Service::new().method("Send", move |_ctx: Context, (id, n): (String, u32)| {
            let server = weak.upgrade();
            async move {
                let server = server.ok_or_else(|| ServiceError::new(1000, "gone"))?;
                // 100 at a time: each batch is queued in order at its first poll (so ids follow
                // the payloads) and committed together.
                for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
                    let sends = chunk.iter().map(|i| {
                        server.send_durable(
                            &id,
                            "Device",
                            "Command",
                            Metadata::new(),
                            i.to_string(),
                            Duration::from_secs(3600),
                        )
                    });
                    for r in futures_util::future::join_all(sends).await {
                        r.map_err(|e| ServiceError::new(1000, e.to_string()))?;
                    }
                }
                Ok(())
            }
        }),
    );
    let local = server.bind(addr.as_str()).await?;
    println!("READY {local}");
    std::io::stdout().flush()?;
    std::future::pending::<()>().await;
    Ok(())
}
