//! A cluster node as a child process, for tests that kill one with SIGKILL.
//!
//! `quicx-cluster-node <cert.pem> <key.pem> <etcd url> <prefix> <node name> <lease ttl s> <secret>`
//! serves `Who.Name` (answers the node name) on 127.0.0.1, joins the cluster (registering `Who`),
//! serves `Durable.Send` (`(client_id, payload)`: a durable message through this node, TTL 60 s;
//! answers its id once etcd committed it), prints `READY <addr>` once registered, and runs until
//! killed. Hello ids bind unverified
//! (test devices carry no credentials).
#![forbid(unsafe_code)]

use std::{io::Write, time::Duration};

use quicx::{ClientTls, Context, Metadata, Server, ServerTls, Service, ServiceError};
use quicx_cluster::{ClusterNode, ClusterOptions, EtcdOptions, ServiceEntry};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, cert, key, etcd, prefix, name, ttl, secret] = &args[..] else {
        eprintln!(
            "usage: quicx-cluster-node <cert.pem> <key.pem> <etcd url> <prefix> <name> <ttl s> <secret>"
        );
        std::process::exit(2);
    };
    let server = Server::builder()
        .tls(ServerTls::from_pem_files(cert, key)?)
        .insecure_accept_unverified_client_ids()
        .build()?;
    let n = name.clone();
    server.register(
        "Who",
        Service::new().method("Name", move |_ctx: Context, (): ()| {
            let n = n.clone();
            async move { Ok(n) }
        }),
    );
    let local = server.bind("127.0.0.1:0").await?;
    let tls = ClientTls::new().trust_pem_file(cert)?;
    let etcd = EtcdOptions::new([etcd.as_str()])
        .prefix(prefix.as_str())
        .lease_ttl(Duration::from_secs(ttl.parse()?));
    let node = ClusterNode::start(
        &server,
        ClusterOptions::new(name.as_str(), etcd, tls, secret.as_str())
            .service(ServiceEntry::new("Who")),
    )
    .await?;
    let sender = node.clone();
    server.register(
        "Durable",
        Service::new().method(
            "Send",
            move |_ctx: Context, (client_id, payload): (String, String)| {
                let node = sender.clone();
                async move {
                    node.send_durable(
                        &client_id,
                        "Device",
                        "Cmd",
                        Metadata::new(),
                        payload,
                        Duration::from_secs(60),
                    )
                    .await
                    .map_err(|e| ServiceError::new(ServiceError::APPLICATION, e.to_string()))
                }
            },
        ),
    );
    println!("READY {local}");
    std::io::stdout().flush()?;
    std::future::pending::<()>().await;
    Ok(())
}
