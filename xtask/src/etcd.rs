//! A throwaway single-member etcd on loopback for `cargo xtask demo --cluster`: free ports, a
//! fresh data directory, SIGKILLed and removed on drop.
//!
//! The minimal start/stop logic of the tests' harness (`tests/src/etcd.rs`), std only: readiness
//! is a plain HTTP/1.1 `GET /health` on the client port.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};

/// How long etcd may take to become healthy (it needs ~0.3 s; the margin is for a busy machine).
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// What to tell someone who has no etcd.
pub(crate) const INSTALL_HINT: &str = "etcd is not installed: the cluster demo runs a real etcd \
     server on loopback.\n  Debian/Ubuntu: sudo apt-get install -y etcd-server\n  elsewhere: \
     https://etcd.io/docs/latest/install/ (or point $QUICX_ETCD_BIN at an etcd binary)";

/// The etcd binary: `$QUICX_ETCD_BIN`, `etcd` on `PATH`, `/usr/bin/etcd`, `/usr/local/bin/etcd`.
pub(crate) fn find_etcd() -> Option<PathBuf> {
    let from_env = std::env::var_os("QUICX_ETCD_BIN").map(PathBuf::from);
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("etcd"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    from_env
        .into_iter()
        .chain(on_path)
        .chain(["/usr/bin/etcd", "/usr/local/bin/etcd"].map(PathBuf::from))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A running etcd, killed (SIGKILL) and its directory removed on drop.
#[derive(Debug)]
pub(crate) struct Etcd {
    base: PathBuf,
    client_port: u16,
    child: Option<Child>,
}

impl Etcd {
    /// Starts `bin` on two free loopback ports with a fresh data dir; returns once healthy.
    pub(crate) fn start(bin: &Path) -> anyhow::Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let base =
            std::env::temp_dir().join(format!("quicx-demo-etcd-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
        // From here on, Drop removes `base`.
        let mut etcd = Self {
            base,
            client_port: 0,
            child: None,
        };
        // A port picked by binding :0 may be taken before etcd binds it: retry a few times.
        for attempt in 1.. {
            let (client, peer) = free_port_pair()?;
            etcd.client_port = client;
            match etcd.spawn_and_wait(bin, peer) {
                Ok(()) => return Ok(etcd),
                Err(_) if attempt < 5 && etcd.log_tail(20).contains("address already in use") => {
                    let _ = std::fs::remove_dir_all(etcd.base.join("data"));
                    let _ = std::fs::remove_file(etcd.base.join("etcd.log"));
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!()
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The directory holding its data and log.
    pub(crate) fn dir(&self) -> &Path {
        &self.base
    }

    /// The last `n` lines of its log.
    pub(crate) fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.base.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn spawn_and_wait(&mut self, bin: &Path, peer_port: u16) -> anyhow::Result<()> {
        let data = self.base.join("data");
        std::fs::create_dir_all(&data)?;
        {
            // etcd warns unless its data dir is 0700.
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.base.join("etcd.log"))?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(bin);
        // etcd reads every ETCD_* variable as a flag: do not pass the caller's on.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        if std::env::consts::ARCH == "aarch64" {
            // etcd 3.4 refuses arm64 unless told it is fine.
            cmd.env("ETCD_UNSUPPORTED_ARCH", "arm64");
        }
        cmd.args(["--name", "quicx-demo", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("quicx-demo={peer}")])
            .args(["--initial-cluster-state", "new"])
            // A single member: short raft timings make it elect itself at once.
            .args(["--heartbeat-interval", "20", "--election-timeout", "200"])
            .args([
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("running {}", bin.display()))?,
        );
        let started = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                bail!(
                    "etcd exited before it was ready ({status}); log tail:\n{}",
                    self.log_tail(20)
                );
            }
            if health_ok(SocketAddr::from(([127, 0, 0, 1], self.client_port))) {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                self.stop();
                bail!(
                    "etcd not healthy after {READY_TIMEOUT:?}; log tail:\n{}",
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap. Idempotent.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// `GET /health`; true once etcd answers `"health":"true"`.
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

/// Two distinct free TCP ports on 127.0.0.1.
fn free_port_pair() -> anyhow::Result<(u16, u16)> {
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// `etcd --version`'s first line, for the demo's banner.
pub(crate) fn version(bin: &Path) -> String {
    let mut cmd = Command::new(bin);
    if std::env::consts::ARCH == "aarch64" {
        cmd.env("ETCD_UNSUPPORTED_ARCH", "arm64");
    }
    cmd.arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("etcd Version:").trim().to_owned())
        })
        .unwrap_or_else(|| "(unknown version)".into())
}
