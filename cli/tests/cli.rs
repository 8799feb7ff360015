//! The `quicx` binary against a server in this process: calls print the JSON reply, the admin
//! commands answer admins only, pushes reach the device, counters match the calls made, errors
//! are one line with their kind and a non-zero exit status.

use std::{
    path::PathBuf,
    process::Output,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use quicx::{
    Authenticator, Client, ClientTls, Context, DevCertificate, DevCertificateAuthority,
    DurableLimits, Hello, Metadata, PushReceiver, Refusal, Server, ServerBuilder, ServerTls,
    Service, push_channel,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Args {
    a: i64,
    b: i64,
}

#[derive(Serialize, Deserialize)]
struct Reply {
    c: i64,
}

/// One row of `quicx clients`.
#[derive(Debug, Deserialize)]
struct ClientRow {
    id: u64,
    remote_address: String,
    client_id: Option<String>,
    rtt_ms: f64,
}

/// A directory of its own under the system's temporary directory, removed on drop: the
/// certificates the binary reads (generated at run time, never committed).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("quicx-cli-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server with `Arith.Mul`, devices that authenticate with `secret-of-<id>`, the identity
/// `admin` with `admin-secret`, and the admin service enabled for `admin`.
struct Fixture {
    server: Server,
    addr: String,
    dev: DevCertificate,
    ca_pem: String,
    _dir: TempDir,
}

fn arith() -> Service {
    Service::new().method("Mul", |_ctx: Context, args: Args| async move {
        Ok(Reply { c: args.a * args.b })
    })
}

async fn fixture() -> Fixture {
    fixture_with(|builder| builder).await
}

/// [`fixture`] with more settings on the server's builder.
async fn fixture_with(more: impl FnOnce(ServerBuilder) -> ServerBuilder) -> Fixture {
    let dev = DevCertificate::localhost().unwrap();
    let server = more(Server::builder())
        .dev_certificate(&dev)
        .authenticator(Authenticator::new(|hello: Hello| async move {
            match hello.token.as_deref() {
                Some("admin-secret") if hello.client_id == "admin" => Ok(hello.client_id),
                Some(t) if t == format!("secret-of-{}", hello.client_id) => Ok(hello.client_id),
                _ => Err(Refusal::Unauthenticated("wrong token".into())),
            }
        }))
        .build()
        .unwrap();
    server.register("Arith", arith());
    server.enable_admin(["admin"]);
    let addr = server.bind("127.0.0.1:0").await.unwrap().to_string();
    let dir = TempDir::new();
    let ca_pem = dir.write("server.pem", dev.certificate_pem());
    Fixture {
        server,
        addr,
        dev,
        ca_pem,
        _dir: dir,
    }
}

impl Fixture {
    /// Runs `quicx <command> ADDR <args> --ca .. --server-name localhost <flags>`.
    async fn quicx(&self, command: &str, args: &[&str], flags: &[&str]) -> Output {
        let mut all = vec![command, &self.addr];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--ca", &self.ca_pem, "--server-name", "localhost"]);
        all.extend_from_slice(flags);
        quicx(&all).await
    }

    /// A device that authenticates as `id` and receives pushes.
    async fn device(&self, id: &str) -> (Client, PushReceiver) {
        let (tx, pushes) = push_channel(8);
        let client = Client::builder()
            .tls(ClientTls::new().trust(self.dev.certificate()))
            .server_name("localhost")
            .client_id(id)
            .token(format!("secret-of-{id}"))
            .push_channel(tx)
            .connect(&self.addr)
            .await
            .unwrap();
        (client, pushes)
    }
}

const ADMIN: &[&str] = &["--client-id", "admin", "--token", "admin-secret"];

/// Runs the binary with `args`, with no token in its environment.
async fn quicx(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_quicx"))
        .args(args)
        .env_remove("QUICX_TOKEN")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// Asserts a successful run and returns its stdout.
fn success(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}: stdout {:?}, stderr {:?}",
        out.status,
        stdout(out),
        stderr(out)
    );
    assert_eq!(stderr(out), "");
    stdout(out)
}

/// Asserts a failed run with exit status `code` and one error line of `kind`; returns the message.
fn failure(out: &Output, code: i32, kind: &str) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr {err:?}");
    assert_eq!(stdout(out), "", "nothing on stdout on failure");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    let prefix = format!("error: {kind}: ");
    assert!(
        err.starts_with(&prefix),
        "{err:?} should start with {prefix:?}"
    );
    err[prefix.len()..].trim_end().to_owned()
}

#[tokio::test]
async fn call_prints_the_json_reply() {
    let f = fixture().await;
    let out = f
        .quicx("call", &["Arith.Mul", r#"{"a":10,"b":20}"#], &[])
        .await;
    assert_eq!(success(&out), "{\"c\":200}\n");
    // Metadata and a timeout are accepted; no identity is needed for a plain call.
    let out = f
        .quicx(
            "call",
            &["Arith.Mul", r#"{"a":-3,"b":7}"#],
            &["--metadata", "trace=1", "-m", "k=v", "--timeout", "2s"],
        )
        .await;
    assert_eq!(success(&out), "{\"c\":-21}\n");
}

#[tokio::test]
async fn errors_are_one_line_with_their_kind() {
    let f = fixture().await;
    let out = f.quicx("call", &["Arith.Nope", "{}"], &[]).await;
    let message = failure(&out, 1, "unknown-method");
    assert!(message.contains("`Nope`"), "{message}");

    let out = f.quicx("call", &["Nothing.Mul", "{}"], &[]).await;
    failure(&out, 1, "unknown-service");

    // Arguments the method cannot decode: the server's decode error.
    let out = f.quicx("call", &["Arith.Mul", r#"{"a":"x"}"#], &[]).await;
    failure(&out, 1, "decode-error");

    // Arguments that are not JSON never leave the machine: a usage error.
    let out = f.quicx("call", &["Arith.Mul", "{a:1"], &[]).await;
    failure(&out, 2, "invalid-argument");

    // A wrong token is refused when connecting.
    let out = f
        .quicx("stats", &[], &["--client-id", "admin", "--token", "guess"])
        .await;
    assert_eq!(failure(&out, 1, "unauthenticated"), "wrong token");

    // A certificate the tool does not trust.
    let out = quicx(&[
        "call",
        &f.addr,
        "Arith.Mul",
        "{}",
        "--server-name",
        "localhost",
    ])
    .await;
    failure(&out, 1, "handshake");

    // Nothing listens there.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let out = quicx(&["call", &addr, "Arith.Mul", "{}", "--timeout", "300ms"]).await;
    failure(&out, 1, "connect-timeout");

    // clap's own usage errors exit with 2 too.
    let out = quicx(&["call", &f.addr, "NoDot"]).await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn clients_lists_a_connected_device() {
    let f = fixture().await;
    let (device, _pushes) = f.device("device-7").await;
    let out = f.quicx("clients", &[], ADMIN).await;
    let rows: Vec<ClientRow> = serde_json::from_str(&success(&out)).unwrap();
    let conn = f.server.client("device-7").unwrap();
    let row = rows
        .iter()
        .find(|r| r.client_id.as_deref() == Some("device-7"))
        .unwrap_or_else(|| panic!("device-7 listed: {rows:?}"));
    assert_eq!(row.id, conn.id());
    assert_eq!(row.remote_address, conn.remote_address().to_string());
    assert!(row.rtt_ms >= 0.0);
    // The tool's own connection, as admin, is listed too.
    assert!(rows.iter().any(|r| r.client_id.as_deref() == Some("admin")));
    device.close().await;
}

#[tokio::test]
async fn only_admins_reach_the_admin_service() {
    let f = fixture().await;
    let (device, _pushes) = f.device("device-8").await;
    let device_flags = ["--client-id", "device-8", "--token", "secret-of-device-8"];
    for command in ["clients", "stats"] {
        let out = f.quicx(command, &[], &device_flags).await;
        let message = failure(&out, 1, "permission-denied");
        assert_eq!(message, "`device-8` is not an admin identity");
        // Without an identity at all.
        let out = f.quicx(command, &[], &[]).await;
        failure(&out, 1, "unauthenticated");
    }
    let out = f
        .quicx("push", &["device-8", "Command.Reboot", "{}"], &device_flags)
        .await;
    failure(&out, 1, "permission-denied");
    // The token travels in the environment as well as in a flag.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_quicx"))
        .args([
            "stats",
            &f.addr,
            "--ca",
            &f.ca_pem,
            "--server-name",
            "localhost",
        ])
        .args(["--client-id", "admin"])
        .env("QUICX_TOKEN", "admin-secret")
        .output()
        .await
        .unwrap();
    success(&out);
    device.close().await;
}

#[tokio::test]
async fn push_reaches_the_device() {
    let f = fixture().await;
    let (device, mut pushes) = f.device("device-7").await;
    let out = f
        .quicx(
            "push",
            &["device-7", "Command.Reboot", r#"{"delay_s":5}"#],
            &[ADMIN, &["--metadata", "reason=test"]].concat(),
        )
        .await;
    assert_eq!(success(&out), "", "push prints nothing");
    let msg = tokio::time::timeout(Duration::from_secs(5), pushes.recv())
        .await
        .expect("the push arrives")
        .unwrap();
    assert_eq!(msg.service_path, "Command");
    assert_eq!(msg.service_method, "Reboot");
    assert_eq!(&msg.payload[..], br#"{"delay_s":5}"#);
    assert_eq!(msg.metadata.get("reason"), Some("test"));

    // A string payload, from stdin.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_quicx"))
        .args(["push", &f.addr, "device-7", "Command.Say", "-"])
        .args(["--ca", &f.ca_pem, "--server-name", "localhost"])
        .args(ADMIN)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(br#""hello""#).await.unwrap();
    }
    success(&child.wait_with_output().await.unwrap());
    let msg = tokio::time::timeout(Duration::from_secs(5), pushes.recv())
        .await
        .expect("the second push arrives")
        .unwrap();
    assert_eq!(
        (msg.service_method.as_str(), &msg.payload[..]),
        ("Say", &br#""hello""#[..])
    );

    // Nobody is bound to that id: the server says so.
    let out = f
        .quicx("push", &["device-9", "Command.Reboot", "{}"], ADMIN)
        .await;
    let message = failure(&out, 1, "remote");
    assert!(
        message.contains("no client bound to `device-9`"),
        "{message}"
    );
    device.close().await;
}

#[tokio::test]
async fn stats_count_the_calls_made() {
    let f = fixture().await;
    let calls = 3;
    for i in 0..calls {
        let args = format!(r#"{{"a":{i},"b":2}}"#);
        success(&f.quicx("call", &["Arith.Mul", &args], &[]).await);
    }
    let out = f.quicx("stats", &[], ADMIN).await;
    let stats: serde_json::Value = serde_json::from_str(&success(&out)).unwrap();
    // The stats call counts itself.
    assert_eq!(stats["calls_served"], calls + 1, "{stats}");
    assert_eq!(stats["call_handler_errors"], 0, "{stats}");
    assert_eq!(stats["connections"], calls + 1, "{stats}");
    assert_eq!(stats["auth_failures"], 0, "{stats}");
    assert!(stats["open_connections"].as_u64().unwrap() >= 1, "{stats}");
    for field in [
        "pushes_sent",
        "push_errors",
        "calls_sent",
        "buffered_request_bytes",
    ] {
        assert!(stats[field].is_u64(), "{field} in {stats}");
    }
    // Calls that fail are counted apart.
    failure(
        &f.quicx("call", &["Arith.Mul", "[1]"], &[]).await,
        1,
        "decode-error",
    );
    let stats = f.server.stats();
    assert_eq!(stats.calls_served, calls + 2);
    assert_eq!(stats.call_handler_errors, 1);
}

#[tokio::test]
async fn durable_lists_backlogs_and_messages_and_cancel_withdraws_one() {
    // A server without a store says so.
    let plain = fixture().await;
    let message = failure(&plain.quicx("durable", &[], ADMIN).await, 1, "remote");
    assert!(message.contains("no durable store"), "{message}");

    let store = TempDir::new();
    let path = store.0.join("store.redb");
    let f = fixture_with(|b| b.durable_store(&path, DurableLimits::default())).await;
    let ttl = Duration::from_secs(600);
    let mut ids = Vec::new();
    for (who, size) in [
        ("device-7", 10),
        ("device-8", 5),
        ("device-7", 20),
        ("device-7", 30),
    ] {
        let id = f
            .server
            .send_durable(
                who,
                "Command",
                "Run",
                Metadata::new(),
                vec![b'x'; size],
                ttl,
            )
            .await
            .unwrap();
        ids.push(id);
    }

    let overview: serde_json::Value =
        serde_json::from_str(&success(&f.quicx("durable", &[], ADMIN).await)).unwrap();
    assert_eq!(overview["pending"], 4, "{overview}");
    assert_eq!(overview["identities"], 2, "{overview}");
    // Bytes as the bounds count them: the payload and the stored header, the same for each
    // message here (same service, method, metadata and TTL).
    let largest = overview["largest"].as_array().unwrap();
    let names: Vec<&str> = largest
        .iter()
        .map(|b| b["identity"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["device-7", "device-8"], "{overview}");
    let counts: Vec<u64> = largest
        .iter()
        .map(|b| b["messages"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [3, 1], "{overview}");
    let header = largest[1]["bytes"].as_u64().unwrap() - 5;
    assert_eq!(largest[0]["bytes"], 60 + 3 * header, "{overview}");
    assert_eq!(overview["pending_bytes"], 65 + 4 * header, "{overview}");
    let top: serde_json::Value = serde_json::from_str(&success(
        &f.quicx("durable", &["--limit", "1"], ADMIN).await,
    ))
    .unwrap();
    assert_eq!(top["largest"].as_array().unwrap().len(), 1, "{top}");
    assert_eq!(top["largest"][0]["identity"], "device-7", "{top}");

    let listed: serde_json::Value =
        serde_json::from_str(&success(&f.quicx("durable", &["device-7"], ADMIN).await)).unwrap();
    let rows = listed.as_array().unwrap();
    let listed_ids: Vec<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(listed_ids, [ids[0], ids[2], ids[3]], "{listed}");
    let sizes: Vec<u64> = rows.iter().map(|r| r["size"].as_u64().unwrap()).collect();
    assert_eq!(sizes, [10, 20, 30], "{listed}");
    assert_eq!(rows[0]["service_method"], "Run", "{listed}");
    let expires_in = rows[0]["expires_in_ms"].as_u64().unwrap();
    assert!((1..=600_000).contains(&expires_in), "{listed}");

    // Cancel the middle one: `true`, then `false` once it is gone.
    let middle = ids[2].to_string();
    assert_eq!(
        success(&f.quicx("cancel", &["device-7", &middle], ADMIN).await).trim(),
        "true"
    );
    assert_eq!(
        success(&f.quicx("cancel", &["device-7", &middle], ADMIN).await).trim(),
        "false"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&success(&f.quicx("stats", &[], ADMIN).await)).unwrap();
    assert_eq!(stats["durable_pending"], 3, "{stats}");
    assert_eq!(stats["durable_pending_bytes"], 45 + 3 * header, "{stats}");
    assert_eq!(stats["durable_pending_identities"], 2, "{stats}");

    // Only admins see the store.
    let device = ["--client-id", "device-7", "--token", "secret-of-device-7"];
    failure(
        &f.quicx("durable", &[], &device).await,
        1,
        "permission-denied",
    );
    failure(
        &f.quicx("cancel", &["device-7", &middle], &device).await,
        1,
        "permission-denied",
    );

    // The device gets what was not cancelled, in order.
    let (client, mut pushes) = f.device("device-7").await;
    for size in [10, 30] {
        let msg = tokio::time::timeout(Duration::from_secs(10), pushes.recv())
            .await
            .expect("the durable message arrives")
            .unwrap();
        assert_eq!(msg.payload.len(), size);
    }
    client.close().await;
}

#[tokio::test]
async fn an_mtls_admin_uses_its_certificate() {
    let ca = DevCertificateAuthority::generate("quicx test CA").unwrap();
    let dev = DevCertificate::localhost().unwrap();
    let server = Server::builder()
        .tls(ServerTls::from_dev(&dev).require_client_certificates(vec![ca.certificate()]))
        .build()
        .unwrap();
    server.enable_admin(["ops"]);
    let addr = server.bind("127.0.0.1:0").await.unwrap().to_string();
    let dir = TempDir::new();
    let server_pem = dir.write("server.pem", dev.certificate_pem());
    let clients_as = |name: &str| {
        let cert = ca.issue(name, [name]).unwrap();
        let cert_pem = dir.write(&format!("{name}.pem"), cert.certificate_pem());
        let key_pem = dir.write(&format!("{name}.key"), cert.private_key_pem());
        let args = [
            "clients",
            &addr,
            "--ca",
            &server_pem,
            "--server-name",
            "localhost",
        ]
        .into_iter()
        .map(str::to_owned)
        .chain(["--cert".into(), cert_pem, "--key".into(), key_pem])
        .collect::<Vec<String>>();
        async move { quicx(&args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let out = clients_as("ops").await;
    let rows: Vec<ClientRow> = serde_json::from_str(&success(&out)).unwrap();
    assert!(
        rows.iter().any(|r| r.client_id.as_deref() == Some("ops")),
        "{rows:?}"
    );
    let out = clients_as("device-1").await;
    assert_eq!(
        failure(&out, 1, "permission-denied"),
        "`device-1` is not an admin identity"
    );
}

/// `quicx discover` finds a server announced with mDNS. Runs inside a network namespace of its
/// own (only `lo`), as `tests/tests/mdns.rs` does; skipped, loudly, where none can be created.
#[test]
fn discover_finds_an_announced_server() {
    use quicx::discovery::{Announcement, MdnsAdvertiser, MdnsOptions};
    if let Err(reason) = quicx_discovery::sandbox::enter_private_network_namespace() {
        eprintln!(
            "SKIPPED: cannot create a private network namespace ({reason}); this mDNS test would \
             otherwise multicast on the machine's real interfaces. Run it as root."
        );
        return;
    }
    // Built after unshare: the runtime's threads, and the binary it starts, live in it too.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let advertiser = MdnsAdvertiser::new(&MdnsOptions::default()).unwrap();
        let mut announcement = Announcement::new("Arith", "arith-1", 8972);
        announcement.addresses = vec!["127.0.0.1".parse().unwrap()];
        announcement.weight = 3;
        let _registration = advertiser.advertise(&announcement).unwrap();

        let out = quicx(&["discover", "Arith", "--timeout", "3s"]).await;
        let found: serde_json::Value = serde_json::from_str(&success(&out)).unwrap();
        assert_eq!(found.as_array().map(Vec::len), Some(1), "{found}");
        assert_eq!(found[0]["address"], "127.0.0.1:8972", "{found}");
        assert_eq!(found[0]["weight"], 3, "{found}");

        let out = quicx(&["discover", "Nothing", "--timeout", "500ms"]).await;
        failure(&out, 1, "no-endpoints");
    });
}
