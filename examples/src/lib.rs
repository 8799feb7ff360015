//! What the examples share: the rpcx example's `Arith` service and a way for a client process to
//! trust a server process's generated development certificate.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use quicx::{ClientTls, Context, DevCertificate, Service};
use serde::{Deserialize, Serialize};

/// The rpcx example's `Args`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Args {
    /// Left operand.
    pub a: i64,
    /// Right operand.
    pub b: i64,
}

/// The rpcx example's `Reply`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Reply {
    /// The product.
    pub c: i64,
}

/// `Arith` with `Mul`.
pub fn arith() -> Service {
    Service::new().method("Mul", |_ctx: Context, args: Args| async move {
        Ok(Reply { c: args.a * args.b })
    })
}

/// Where a server process writes the *public* certificate it generated, for client processes
/// on the same machine to trust. The private key never leaves the server's memory.
pub fn dev_certificate_path(example: &str) -> PathBuf {
    std::env::temp_dir().join(format!("quicx-{example}-dev-cert.pem"))
}

/// Generates a development certificate and publishes its public part for clients.
pub fn publish_dev_certificate(example: &str) -> anyhow::Result<DevCertificate> {
    let dev = DevCertificate::localhost()?;
    std::fs::write(dev_certificate_path(example), dev.certificate_pem())?;
    Ok(dev)
}

/// Client TLS that trusts the certificate a server process of `example` published.
pub fn trust_published_certificate(example: &str) -> anyhow::Result<ClientTls> {
    let path = dev_certificate_path(example);
    ClientTls::empty()
        .trust_pem_file(&path)
        .map_err(|e| anyhow::anyhow!("{e} (start the server first: it writes {})", path.display()))
}

/// Logs to stderr when `RUST_LOG` is set.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}
