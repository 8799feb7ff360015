//! `quicx`, the command-line tool of quicx (what grpcurl is to gRPC): calls any method with JSON
//! arguments and prints the JSON reply, lists and pushes to the clients of a server, lists and
//! cancels the durable messages waiting for its devices and prints its counters through the
//! server's admin service (`Server::enable_admin`), and browses mDNS.
//!
//! ```text
//! quicx call 127.0.0.1:8972 Arith.Mul '{"a":10,"b":20}' --ca cert.pem    # {"c":200}
//! quicx clients 127.0.0.1:8972 --ca cert.pem --client-id ops --token "$OPS_TOKEN"
//! quicx push 127.0.0.1:8972 device-7 Command.Reboot '{"delay_s":5}' --ca cert.pem --client-id ops --token "$OPS_TOKEN"
//! quicx stats 127.0.0.1:8972 --ca cert.pem --client-id ops --token "$OPS_TOKEN"
//! quicx durable 127.0.0.1:8972 [device-7] --ca cert.pem --client-id ops --token "$OPS_TOKEN"
//! quicx cancel 127.0.0.1:8972 device-7 41 --ca cert.pem --client-id ops --token "$OPS_TOKEN"
//! quicx discover Arith --timeout 3s
//! ```
//!
//! Replies go to stdout as the server sent them (compact JSON). An error is one line on stderr,
//! `error: <kind>: <message>`, where the kind is `quicx::Error::kind` in kebab case
//! (`unauthenticated`, `permission-denied`, `connect-timeout`, `unknown-method`, ...); the exit
//! status is then 1, or 2 for a usage error.
#![forbid(unsafe_code)]

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use quicx::{
    ADMIN_SERVICE, CallOptions, Client, ClientTls, Codec, Error, TOKEN_METADATA_KEY,
    discovery::{Discovery, Interfaces, MdnsDiscovery, MdnsOptions},
    load_certificates_pem, load_private_key_pem,
};

/// Call quicx services from the command line: JSON in, JSON out.
#[derive(Debug, Parser)]
#[command(name = "quicx", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Call Service.Method with JSON arguments and print the JSON reply.
    Call {
        /// The server, `host:port`.
        addr: String,
        /// `Service.Method`: the method is what follows the last dot (`quicx.Admin.Stats`).
        #[arg(value_name = "SERVICE.METHOD", value_parser = parse_method)]
        method: (String, String),
        /// The arguments as JSON; `-` reads them from stdin.
        #[arg(default_value = "null")]
        data: String,
        /// Request metadata (repeatable).
        #[arg(long, short, value_name = "KEY=VALUE", value_parser = parse_pair)]
        metadata: Vec<(String, String)>,
        #[command(flatten)]
        connect: ConnectOptions,
    },
    /// List the clients connected to a server: id, address, identity, RTT (admin service).
    Clients {
        /// The server, `host:port`.
        addr: String,
        #[command(flatten)]
        connect: ConnectOptions,
    },
    /// Push a message to the client bound to CLIENT_ID (admin service). Prints nothing once the
    /// server handed the push to QUIC.
    Push {
        /// The server, `host:port`.
        addr: String,
        /// The identity of the client to push to.
        #[arg(value_name = "CLIENT_ID")]
        target: String,
        /// `Service.Method` the push names.
        #[arg(value_name = "SERVICE.METHOD", value_parser = parse_method)]
        method: (String, String),
        /// The message as JSON (the client receives its JSON text); `-` reads it from stdin.
        #[arg(default_value = "null")]
        data: String,
        /// Metadata of the pushed message (repeatable).
        #[arg(long, short, value_name = "KEY=VALUE", value_parser = parse_pair)]
        metadata: Vec<(String, String)>,
        #[command(flatten)]
        connect: ConnectOptions,
    },
    /// Print what a server's durable store holds, as JSON (admin service): the totals and the
    /// identities with the most pending messages, or with CLIENT_ID that identity's pending
    /// messages, oldest first.
    Durable {
        /// The server, `host:port`.
        addr: String,
        /// List this identity's pending messages.
        #[arg(value_name = "CLIENT_ID")]
        target: Option<String>,
        /// How many identities to list, largest backlog first (without CLIENT_ID).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        connect: ConnectOptions,
    },
    /// Cancel a pending durable message (admin service). Prints `true` if it was pending,
    /// `false` if not (already delivered, expired or cancelled).
    Cancel {
        /// The server, `host:port`.
        addr: String,
        /// The identity the message waits for.
        #[arg(value_name = "CLIENT_ID")]
        target: String,
        /// The message id (from `quicx durable ADDR CLIENT_ID`).
        id: u64,
        #[command(flatten)]
        connect: ConnectOptions,
    },
    /// Print a server's counters as JSON (admin service).
    Stats {
        /// The server, `host:port`.
        addr: String,
        #[command(flatten)]
        connect: ConnectOptions,
    },
    /// Browse mDNS for the servers of SERVICE and print their endpoints as JSON.
    Discover {
        /// The service name the servers announce (`Arith`).
        service: String,
        /// How long to listen for answers.
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        timeout: Duration,
        /// Browse on this network interface only (repeatable; default: all).
        #[arg(long, value_name = "NAME")]
        interface: Vec<String>,
    },
}

/// How to reach and authenticate to a server.
#[derive(Debug, Args)]
struct ConnectOptions {
    /// Trust this PEM certificate (a CA, or the server's self-signed certificate) besides the
    /// Mozilla roots (repeatable).
    #[arg(long, value_name = "PEM")]
    ca: Vec<PathBuf>,
    /// The name the server's certificate must carry (default: the host of ADDR).
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Client certificate chain (PEM) for mTLS; its name is this client's identity.
    #[arg(long, value_name = "PEM", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "PEM", requires = "cert")]
    key: Option<PathBuf>,
    /// The identity to declare when connecting (verified by the server, e.g. with --token). A
    /// connection already bound to it is taken over (closed by the server).
    #[arg(long, value_name = "ID")]
    client_id: Option<String>,
    /// The token to present when connecting, and with the call (metadata `quicx-token`).
    #[arg(long, env = "QUICX_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// How long connecting, then the call, may each take (`2s`, `500ms`, `1m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Do not verify the server's certificate: anyone on the path can impersonate the server.
    #[arg(long, conflicts_with = "ca")]
    insecure_skip_verify: bool,
}

/// What failed: printed as `error: <kind>: <message>`.
#[derive(Debug)]
struct Failure {
    kind: String,
    message: String,
    /// The process's exit status.
    status: u8,
}

impl Failure {
    /// A bad argument: exit status 2, as for clap's usage errors.
    fn invalid_argument(message: impl Into<String>) -> Self {
        Self {
            kind: "invalid-argument".into(),
            message: message.into(),
            status: 2,
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let (kind, message) = describe(&e);
        Self {
            kind,
            message,
            status: 1,
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e).into()
    }
}

/// The kind of an error ([`Error::kind`], in kebab case: `permission-denied`) and the message
/// to print. Messages a server sent are printed as sent; the rest as the error displays itself.
fn describe(e: &Error) -> (String, String) {
    let message = match e {
        Error::Unauthenticated(m)
        | Error::PermissionDenied(m)
        | Error::RateLimited(m)
        | Error::HelloRefused(m)
        | Error::Internal(m) => m.clone(),
        Error::Remote { code, message } => format!("{message} (code {code})"),
        other => other.to_string(),
    };
    (e.kind().replace('_', "-"), message)
}

/// `Service.Method`, split at the last dot.
fn parse_method(s: &str) -> Result<(String, String), String> {
    match s.rsplit_once('.') {
        Some((service, method)) if !service.is_empty() && !method.is_empty() => {
            Ok((service.to_owned(), method.to_owned()))
        }
        _ => Err(format!("expected Service.Method, got `{s}`")),
    }
}

/// `key=value`.
fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}

/// A duration with a unit: `500ms`, `2s`, `1.5s`, `1m`, `1h`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{s}` has no unit: write `{s}s` or `{s}ms`"))?;
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` does not start with a number"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("unknown unit `{unit}` in `{s}`: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{s}`: {e}"))
}

/// The JSON text of an argument (`-`: stdin), checked to be JSON.
fn json_argument(data: &str) -> Result<String, Failure> {
    let text = if data == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        text
    } else {
        data.to_owned()
    };
    if let Err(e) = serde_json::from_str::<serde_json::Value>(&text) {
        return Err(Failure::invalid_argument(format!(
            "DATA is not JSON ({e}); quote a string as JSON: '\"text\"'"
        )));
    }
    Ok(text)
}

/// Connects as the options say: no reconnects, one timeout for connecting.
async fn connect(addr: &str, options: &ConnectOptions) -> Result<Client, Failure> {
    let mut tls = if options.insecure_skip_verify {
        ClientTls::insecure_skip_server_verification()
    } else {
        ClientTls::new()
    };
    for ca in &options.ca {
        tls = tls.trust_pem_file(ca)?;
    }
    if let (Some(cert), Some(key)) = (&options.cert, &options.key) {
        tls = tls.client_certificate(load_certificates_pem(cert)?, load_private_key_pem(key)?);
    }
    let mut builder = Client::builder()
        .tls(tls)
        .reconnect(false)
        .connect_timeout(options.timeout)
        .call_timeout(Some(options.timeout));
    if let Some(name) = &options.server_name {
        builder = builder.server_name(name);
    }
    if let Some(id) = &options.client_id {
        builder = builder.client_id(id);
    }
    if let Some(token) = &options.token {
        builder = builder.token(token);
    }
    Ok(builder.connect(addr).await?)
}

/// Connects, makes one JSON call, closes; returns the reply's bytes.
async fn call_once(
    addr: &str,
    options: &ConnectOptions,
    (service, method): (&str, &str),
    args: &[u8],
    metadata: &[(String, String)],
) -> Result<quicx::Bytes, Failure> {
    let client = connect(addr, options).await?;
    let mut call = CallOptions::new()
        .codec(Codec::Json)
        .timeout(options.timeout);
    for (key, value) in metadata {
        call = call.metadata(key, value);
    }
    if let Some(token) = &options.token {
        call = call.metadata(TOKEN_METADATA_KEY, token);
    }
    let reply = client.call_raw(service, method, args, &call).await;
    client.close().await;
    Ok(reply?.payload)
}

/// Calls the admin service's `method` with JSON `args` and prints the reply.
async fn admin_print(
    addr: &str,
    connect: &ConnectOptions,
    method: &str,
    args: &serde_json::Value,
) -> Result<(), Failure> {
    let args = args.to_string();
    let reply = call_once(addr, connect, (ADMIN_SERVICE, method), args.as_bytes(), &[]).await?;
    print(&reply)
}

/// Writes a reply and a newline to stdout.
fn print(bytes: &[u8]) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Call {
            addr,
            method: (service, method),
            data,
            metadata,
            connect,
        } => {
            let args = json_argument(&data)?;
            let reply = call_once(
                &addr,
                &connect,
                (&service, &method),
                args.as_bytes(),
                &metadata,
            )
            .await?;
            print(&reply)
        }
        Command::Clients { addr, connect } => {
            admin_print(&addr, &connect, "Clients", &serde_json::Value::Null).await
        }
        Command::Durable {
            addr,
            target,
            limit,
            connect,
        } => {
            let args = match target {
                Some(client_id) => serde_json::json!({ "client_id": client_id }),
                None => serde_json::json!({ "limit": limit }),
            };
            admin_print(&addr, &connect, "Durable", &args).await
        }
        Command::Cancel {
            addr,
            target,
            id,
            connect,
        } => {
            let args = serde_json::json!({ "client_id": target, "id": id });
            admin_print(&addr, &connect, "CancelDurable", &args).await
        }
        Command::Stats { addr, connect } => {
            admin_print(&addr, &connect, "Stats", &serde_json::Value::Null).await
        }
        Command::Push {
            addr,
            target,
            method: (service_path, service_method),
            data,
            metadata,
            connect,
        } => {
            let payload: serde_json::Value = serde_json::from_str(&json_argument(&data)?)
                .map_err(|e| Failure::invalid_argument(e.to_string()))?;
            let metadata: serde_json::Map<String, serde_json::Value> = metadata
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            let args = serde_json::json!({
                "client_id": target,
                "service_path": service_path,
                "service_method": service_method,
                "payload": payload,
                "metadata": metadata,
            });
            call_once(
                &addr,
                &connect,
                (ADMIN_SERVICE, "Push"),
                args.to_string().as_bytes(),
                &[],
            )
            .await?;
            Ok(())
        }
        Command::Discover {
            service,
            timeout,
            interface,
        } => discover(&service, timeout, interface).await,
    }
}

/// Listens for mDNS answers for `timeout`, then prints what it found; `no-endpoints` if nothing.
async fn discover(
    service: &str,
    timeout: Duration,
    interfaces: Vec<String>,
) -> Result<(), Failure> {
    let mut options = MdnsOptions::default();
    if !interfaces.is_empty() {
        options.interfaces = Interfaces::Named(interfaces);
    }
    let discovery = MdnsDiscovery::new(service, &options).map_err(Error::from)?;
    tokio::time::sleep(timeout).await;
    let endpoints = Discovery::watch(&discovery).borrow().clone();
    if endpoints.is_empty() {
        return Err(Failure {
            kind: "no-endpoints".into(),
            message: format!("no server of `{service}` answered mDNS within {timeout:?}"),
            status: 1,
        });
    }
    let list: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|e| {
            serde_json::json!({
                "address": e.address,
                "server_name": e.server_name,
                "weight": e.weight,
                "group": e.group,
                "metadata": e.metadata,
            })
        })
        .collect();
    print(serde_json::Value::Array(list).to_string().as_bytes())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return report(&Failure::from(e)),
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => report(&failure),
    }
}

/// Prints a failure as one line on stderr and returns its exit status.
fn report(failure: &Failure) -> ExitCode {
    let message = failure.message.replace(['\r', '\n'], " ");
    eprintln!("error: {}: {message}", failure.kind);
    ExitCode::from(failure.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("2").unwrap_err().contains("no unit"));
        assert!(parse_duration("2d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn methods_split_at_the_last_dot() {
        assert_eq!(
            parse_method("Arith.Mul"),
            Ok(("Arith".into(), "Mul".into()))
        );
        assert_eq!(
            parse_method("quicx.Admin.Stats"),
            Ok(("quicx.Admin".into(), "Stats".into()))
        );
        assert!(parse_method("Arith").is_err());
        assert!(parse_method("Arith.").is_err());
        assert_eq!(parse_pair("k=v=w"), Ok(("k".into(), "v=w".into())));
        assert!(parse_pair("=v").is_err());
    }

    #[test]
    fn errors_name_their_kind() {
        let (kind, message) = describe(&Error::PermissionDenied(
            "`device-7` is not an admin".into(),
        ));
        assert_eq!(
            (kind.as_str(), message.as_str()),
            ("permission-denied", "`device-7` is not an admin")
        );
        let (kind, _) = describe(&Error::ConnectTimeout(Duration::from_secs(2)));
        assert_eq!(kind, "connect-timeout");
        let (kind, _) = describe(&Error::UnknownMethod {
            service_path: "Arith".into(),
            service_method: "Nope".into(),
        });
        assert_eq!(kind, "unknown-method");
        let (kind, message) = describe(&Error::Remote {
            code: 1000,
            message: "boom".into(),
        });
        assert_eq!(
            (kind.as_str(), message.as_str()),
            ("remote", "boom (code 1000)")
        );
    }

    #[test]
    fn the_command_line_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
