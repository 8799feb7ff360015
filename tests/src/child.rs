//! Servers and clients as child processes (so a test can kill one with SIGKILL), and a
//! black-hole UDP socket that counts the QUIC connection attempts sent to it.

use std::{
    collections::HashSet,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use quicx::DevCertificate;

/// Runs the `#[ignore]`d test `name` of the current test binary as a child process with the
/// environment `env`, and returns it once it printed a line containing `ready` (its stdout is
/// piped). The child is killed (SIGKILL) when the handle is dropped.
///
/// # Panics
/// If the child cannot be started, or exits or stays silent for 20 s before printing `ready`.
pub async fn test_child(name: &str, env: &[(&str, String)], ready: &str) -> tokio::process::Child {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([name, "--exact", "--ignored", "--nocapture"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the child test");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.expect("child stdout") {
            if line.contains(ready) {
                return;
            }
        }
        panic!("the child `{name}` exited before it printed `{ready}`");
    })
    .await
    .unwrap_or_else(|_| panic!("the child `{name}` did not print `{ready}` within 20 s"));
    child
}

/// A `quicx-test-server` child process. Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct ChildServer {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// PEM files of a development certificate in a fresh temporary directory, removed on drop.
#[derive(Debug)]
pub struct PemFiles {
    dir: PathBuf,
    /// The certificate file.
    pub cert: PathBuf,
    /// The private key file.
    pub key: PathBuf,
}

impl PemFiles {
    /// Writes `dev`'s certificate and key.
    pub fn write(dev: &DevCertificate) -> std::io::Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "quicx-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, dev.certificate_pem())?;
        std::fs::write(&key, dev.private_key_pem())?;
        Ok(Self { dir, cert, key })
    }
}

impl Drop for PemFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl ChildServer {
    /// Starts `exe` (the `quicx-test-server` binary: pass `env!("CARGO_BIN_EXE_quicx-test-server")`)
    /// on `listen` with the certificate in `pem`, answering as `name`, its `Who.Work` taking
    /// `stall_ms`; returns once it accepts connections (at most 20 s).
    pub fn start(
        exe: &str,
        pem: &PemFiles,
        listen: &str,
        name: &str,
        stall_ms: u64,
    ) -> std::io::Result<Self> {
        Self::spawn(
            Command::new(exe)
                .arg(&pem.cert)
                .arg(&pem.key)
                .arg(listen)
                .arg(name)
                .arg(stall_ms.to_string()),
        )
    }

    /// Starts any server binary that prints `READY <addr>` on its first stdout line once it
    /// accepts connections; returns then (at most 20 s). Its stderr goes to the test's.
    pub fn spawn(command: &mut Command) -> std::io::Result<Self> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) else {
            let _ = child.kill();
            return Err(std::io::Error::other("the child server did not start"));
        };
        let addr = line
            .trim()
            .strip_prefix("READY ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("unexpected child output {line:?}")))?;
        Ok(Self { child, addr })
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A UDP socket on loopback that never answers, standing for a server that is down, and
/// counts the distinct QUIC connection attempts (Initial packets' destination connection ids)
/// that reach it.
#[derive(Debug)]
pub struct BlackHole {
    /// Its address.
    pub addr: SocketAddr,
    attempts: Arc<Mutex<HashSet<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    /// Binds it on 127.0.0.1.
    pub async fn bind() -> std::io::Result<Self> {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let addr = socket.local_addr()?;
        let attempts = Arc::new(Mutex::new(HashSet::new()));
        let seen = attempts.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, _)) = socket.recv_from(&mut buf).await {
                // Long header (0x80), Initial type (bits 0x30 == 0): version (4), dcid len, dcid.
                let packet = &buf[..n];
                if n > 6 && packet[0] & 0x80 != 0 && packet[0] & 0x30 == 0 {
                    let len = usize::from(packet[5]);
                    if let Some(dcid) = packet.get(6..6 + len) {
                        seen.lock().unwrap().insert(dcid.to_vec());
                    }
                }
            }
        });
        Ok(Self {
            addr,
            attempts,
            task,
        })
    }

    /// Connection attempts seen so far.
    pub fn attempts(&self) -> usize {
        self.attempts.lock().unwrap().len()
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP port on loopback that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
