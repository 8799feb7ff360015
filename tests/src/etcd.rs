//! A real etcd server for tests: one single-member etcd on loopback ports that it picks itself,
//! with a fresh data directory, killed (SIGKILL) and its directory removed on drop.
//!
//! Std only (no extra dependency, no async): the readiness check is a plain HTTP/1.1
//! `GET /health` on the client port (etcd's gRPC gateway answers `{"health":"true"}` once the
//! member has a leader and serves reads), so it works from sync tests, from `#[tokio::test]`
//! (it blocks the calling thread for the ~0.2-0.5 s etcd needs to start) and from `xtask`.
//!
//! ```ignore
//! let mut etcd = match EtcdServer::start() {
//!     Ok(e) => e,
//!     Err(e @ EtcdHarnessError::NotInstalled { .. }) => {
//!         eprintln!("SKIPPED (loudly): {e}");
//!         return;
//!     }
//!     Err(e) => panic!("{e}"),
//! };
//! let client = etcd_client::Client::connect([etcd.endpoint()], None).await?;
//! etcd.stop();      // SIGKILL, like a crash
//! etcd.restart()?;  // same data dir, same ports; blocks until healthy again
//! ```
//!
//! The binary is taken from `$QUICX_ETCD_BIN`, else `etcd` on `PATH`, else `/usr/bin/etcd`
//! (Debian's `etcd-server` package installs it there).

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long [`EtcdServer::start`] and [`EtcdServer::restart`] wait for `/health`. etcd 3.4 answers
/// in ~0.2 s on a fresh dir and ~0.4 s on a restart with the timings below; the margin is for a
/// loaded 2-core CI machine.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Raft timings for a single member: a restart waits one election timeout before the member
/// elects itself (1.2 s with etcd's defaults of 100/1000 ms, 0.4 s with these).
const HEARTBEAT_MS: u32 = 20;
const ELECTION_MS: u32 = 200;

/// Why an etcd server could not be had.
#[derive(Debug)]
pub enum EtcdHarnessError {
    /// No etcd binary: the caller should skip, loudly.
    NotInstalled { searched: Vec<PathBuf> },
    /// The binary is there but could not be run.
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    /// The data directory or log file could not be made.
    Io {
        what: String,
        source: std::io::Error,
    },
    /// etcd exited before it became healthy.
    Exited { status: String, log_tail: String },
    /// etcd kept running but never answered `/health` with `true`.
    NotReady { waited: Duration, log_tail: String },
}

impl fmt::Display for EtcdHarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotInstalled { searched } => write!(
                f,
                "etcd is not installed (looked at $QUICX_ETCD_BIN, PATH and {searched:?}); \
                 install it with `apt-get install -y etcd-server`"
            ),
            Self::Spawn { bin, source } => write!(f, "cannot run {}: {source}", bin.display()),
            Self::Io { what, source } => write!(f, "{what}: {source}"),
            Self::Exited { status, log_tail } => {
                write!(
                    f,
                    "etcd exited before it was ready ({status}); log tail:\n{log_tail}"
                )
            }
            Self::NotReady { waited, log_tail } => {
                write!(
                    f,
                    "etcd not healthy after {waited:?}; log tail:\n{log_tail}"
                )
            }
        }
    }
}

impl std::error::Error for EtcdHarnessError {}

/// Finds the etcd binary: `$QUICX_ETCD_BIN`, `PATH`, then `/usr/bin/etcd`.
pub fn find_etcd() -> Result<PathBuf, EtcdHarnessError> {
    let mut searched = Vec::new();
    if let Some(p) = std::env::var_os("QUICX_ETCD_BIN") {
        let p = PathBuf::from(p);
        if is_executable(&p) {
            return Ok(p);
        }
        searched.push(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("etcd");
            if is_executable(&p) {
                return Ok(p);
            }
        }
    }
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        let p = PathBuf::from(p);
        if is_executable(&p) {
            return Ok(p);
        }
        searched.push(p);
    }
    Err(EtcdHarnessError::NotInstalled { searched })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A single-member etcd on 127.0.0.1, owned by the test.
#[derive(Debug)]
pub struct EtcdServer {
    bin: PathBuf,
    /// Holds `data/` and `etcd.log`; removed on drop.
    base: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on two free loopback ports with a fresh data dir and waits until it is healthy.
    pub fn start() -> Result<Self, EtcdHarnessError> {
        let bin = find_etcd()?;
        let base = unique_dir()?;
        // From here on, Drop removes `base` on every error path.
        let mut server = Self {
            bin,
            base,
            client_port: 0,
            peer_port: 0,
            child: None,
        };
        // A port picked by binding :0 may be taken by someone else before etcd binds it: retry.
        let mut attempt = 0;
        loop {
            attempt += 1;
            (server.client_port, server.peer_port) =
                free_port_pair().map_err(|source| EtcdHarnessError::Io {
                    what: "picking free ports".into(),
                    source,
                })?;
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                Err(EtcdHarnessError::Exited { log_tail, .. })
                    if attempt < 5 && log_tail.contains("address already in use") =>
                {
                    let _ = std::fs::remove_dir_all(server.data_dir());
                    let _ = std::fs::remove_file(server.log_path());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`: what `etcd_client::Client::connect` takes.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client address.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// The data directory (kept across [`restart`](Self::restart)).
    pub fn data_dir(&self) -> PathBuf {
        self.base.join("data")
    }

    /// etcd's own log (stdout and stderr), appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.base.join("etcd.log")
    }

    /// The running process id, if it is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still alive (reaps it if it exited by itself).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// Kills etcd with SIGKILL (a crash, no graceful shutdown) and reaps it. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // std's kill is SIGKILL on Unix
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports with the same data dir (keys and leases survive; etcd
    /// renews every lease's TTL when it comes back) and waits until it is healthy.
    pub fn restart(&mut self) -> Result<(), EtcdHarnessError> {
        self.stop();
        self.spawn_and_wait()
    }

    /// The last `n` lines of etcd's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path(), n)
    }

    fn spawn_and_wait(&mut self) -> Result<(), EtcdHarnessError> {
        let data = self.data_dir();
        std::fs::create_dir_all(&data).map_err(|source| EtcdHarnessError::Io {
            what: format!("creating {}", data.display()),
            source,
        })?;
        // etcd 3.4 warns unless the data dir is 0700.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|source| EtcdHarnessError::Io {
                what: "opening etcd.log".into(),
                source,
            })?;
        let log2 = log.try_clone().map_err(|source| EtcdHarnessError::Io {
            what: "cloning etcd.log handle".into(),
            source,
        })?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&self.bin);
        // etcd reads every ETCD_* variable as a flag: do not inherit the caller's.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        if let Some(arch) = unsupported_goarch() {
            cmd.env("ETCD_UNSUPPORTED_ARCH", arch);
        }
        cmd.arg("--name")
            .arg("quicx-test")
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("quicx-test={peer}"))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--heartbeat-interval")
            .arg(HEARTBEAT_MS.to_string())
            .arg("--election-timeout")
            .arg(ELECTION_MS.to_string())
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .arg("--log-level")
            .arg("warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd.spawn().map_err(|source| EtcdHarnessError::Spawn {
            bin: self.bin.clone(),
            source,
        })?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), EtcdHarnessError> {
        let started = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(EtcdHarnessError::Exited {
                    status: status.to_string(),
                    log_tail: self.log_tail(20),
                });
            }
            if health_ok(self.client_addr()) {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                self.stop();
                return Err(EtcdHarnessError::NotReady {
                    waited: READY_TIMEOUT,
                    log_tail: self.log_tail(20),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// `GET /health` over HTTP/1.1; true once etcd answers `"health":"true"`.
fn health_ok(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.starts_with("HTTP/1.1 200") && text.contains("\"health\":\"true\"")
}

/// Two distinct free TCP ports on 127.0.0.1 (held together while picked, so they differ).
fn free_port_pair() -> std::io::Result<(u16, u16)> {
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

fn unique_dir() -> Result<PathBuf, EtcdHarnessError> {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "quicx-etcd-{}-{}-{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|source| EtcdHarnessError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    Ok(dir)
}

/// etcd 3.4 refuses to start on architectures other than amd64/ppc64le (and arm64 in later
/// releases) unless `ETCD_UNSUPPORTED_ARCH` names the running one. Harmless where not needed.
fn unsupported_goarch() -> Option<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => None,
        "aarch64" => Some("arm64"),
        "powerpc64" => Some("ppc64le"),
        "s390x" => Some("s390x"),
        "riscv64" => Some("riscv64"),
        "x86" => Some("386"),
        "arm" => Some("arm"),
        _ => None,
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
