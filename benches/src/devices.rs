//! Many devices: N clients connected to one server: handshake rate, server memory per idle
//! connection, and how long a broadcast takes to reach them all.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream};
use serde::Serialize;

use crate::{
    load::{self, rss_bytes},
    systems::{self, ServerInfo, System},
};

/// Handshakes in flight at once while connecting the fleet (`--fleet-connect-parallelism`).
pub(crate) static CONNECT_PARALLELISM: AtomicUsize = AtomicUsize::new(64);

/// What one fleet measured.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Fleet {
    pub(crate) clients: usize,
    pub(crate) handshakes_per_sec: f64,
    /// Server RSS growth per connection, bytes (0 when the server shares this process).
    pub(crate) server_bytes_per_connection: f64,
    pub(crate) broadcast_ms: f64,
    /// Until the server's broadcast call returned (every push handed to QUIC), milliseconds.
    pub(crate) broadcast_server_ms: f64,
    /// CPU the client process (all N clients) used from the broadcast until all had it, ms.
    pub(crate) broadcast_client_cpu_ms: f64,
    /// CPU the server process used over the same time, ms (0 when it shares this process).
    pub(crate) broadcast_server_cpu_ms: f64,
    /// The median of the server's smoothed RTT estimates over the devices' connections just
    /// before the broadcast, milliseconds: a server probes a device whose acknowledgement has
    /// not come after about this plus 4 × its variance plus the device's 25 ms ACK delay.
    pub(crate) broadcast_server_rtt_ms: f64,
    /// UDP datagrams sent on this machine over the same time, per device (both directions:
    /// everything runs on loopback; 0 where `/proc/net/snmp` is not there). Anything else
    /// sending UDP meanwhile counts too.
    pub(crate) broadcast_datagrams_per_device: f64,
}

/// UDP datagrams this machine sent so far (`/proc/net/snmp`, Linux).
fn udp_datagrams_sent() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let column = names.split_whitespace().position(|n| n == "OutDatagrams")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

enum Held {
    Quicx(Vec<quicx::Client>),
    Quinn(Vec<quinn::Connection>),
}

/// Connects `n` clients of `info.system` (quicx or raw quinn) through one client socket, then
/// broadcasts `size` bytes to all of them.
pub(crate) async fn fleet(
    info: &ServerInfo,
    n: usize,
    size: u32,
    server_pid: Option<u32>,
) -> anyhow::Result<Fleet> {
    let received = Arc::new(AtomicU64::new(0));
    let rss_before = server_pid.map(rss_bytes);
    let parallelism = CONNECT_PARALLELISM.load(Ordering::Relaxed);
    let started = Instant::now();
    let held = match info.system {
        System::Quicx => {
            let endpoint = quicx::ClientEndpoint::bind("127.0.0.1:0".parse()?)?;
            let clients: Vec<_> = stream::iter(0..n)
                .map(|_| systems::quicx_client(info, Some(&endpoint), Some(received.clone())))
                .buffer_unordered(parallelism)
                .collect()
                .await;
            Held::Quicx(clients.into_iter().collect::<anyhow::Result<_>>()?)
        }
        System::Quinn => {
            let endpoint = systems::quinn_client_endpoint()?;
            let config = systems::quinn_client_config(info)?;
            let conns: Vec<_> = stream::iter(0..n)
                .map(|_| systems::quinn_connect(info, &endpoint, &config, Some(received.clone())))
                .buffer_unordered(parallelism)
                .collect()
                .await;
            Held::Quinn(conns.into_iter().collect::<anyhow::Result<_>>()?)
        }
        other => anyhow::bail!("{} has no fleet benchmark", other.name()),
    };
    let handshakes_per_sec = n as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server_bytes_per_connection = match (server_pid, rss_before) {
        (Some(pid), Some(before)) => rss_bytes(pid).saturating_sub(before) as f64 / n as f64,
        _ => 0.0,
    };
    let client_cpu0 = load::cpu_time();
    let server_cpu0 = server_pid.map(load::cpu_time_of);
    let sent0 = udp_datagrams_sent();
    let started = Instant::now();
    let (server_us, rtt_us) = match &held {
        Held::Quicx(clients) => {
            let (ok, server_us, rtt_us): (u64, u64, u64) =
                clients[0].call("Bench", "Broadcast", &size).await?;
            anyhow::ensure!(ok as usize == n, "broadcast reached {ok} of {n}");
            (server_us, rtt_us)
        }
        Held::Quinn(conns) => {
            let reply =
                systems::quinn_request(&conns[0], systems::op_broadcast(), &size.to_le_bytes())
                    .await?;
            anyhow::ensure!(reply.len() == 24, "short broadcast reply");
            let word = |i: usize| u64::from_le_bytes(reply[i..i + 8].try_into().expect("8 bytes"));
            let ok = word(0);
            anyhow::ensure!(ok as usize == n, "broadcast reached {ok} of {n}");
            (word(8), word(16))
        }
    };
    systems::wait_count(&received, n as u64, Duration::from_secs(30)).await?;
    let broadcast_ms = started.elapsed().as_secs_f64() * 1e3;
    let broadcast_datagrams_per_device = match (sent0, udp_datagrams_sent()) {
        (Some(before), Some(after)) => after.saturating_sub(before) as f64 / n as f64,
        _ => 0.0,
    };
    let broadcast_client_cpu_ms = (load::cpu_time() - client_cpu0).as_secs_f64() * 1e3;
    let broadcast_server_cpu_ms = match (server_pid, server_cpu0) {
        (Some(pid), Some(before)) => {
            load::cpu_time_of(pid).saturating_sub(before).as_secs_f64() * 1e3
        }
        _ => 0.0,
    };
    match held {
        Held::Quicx(clients) => {
            for c in clients {
                c.close().await;
            }
        }
        Held::Quinn(conns) => {
            for c in conns {
                c.close(0u32.into(), b"done");
            }
        }
    }
    let _ = received.load(Ordering::Relaxed);
    Ok(Fleet {
        clients: n,
        handshakes_per_sec,
        server_bytes_per_connection,
        broadcast_ms,
        broadcast_server_ms: server_us as f64 / 1e3,
        broadcast_server_rtt_ms: rtt_us as f64 / 1e3,
        broadcast_client_cpu_ms,
        broadcast_server_cpu_ms,
        broadcast_datagrams_per_device,
    })
}

/// Median time to open one connection and make one call, milliseconds, over `rounds`.
pub(crate) async fn setup_ms(info: &ServerInfo, rounds: usize) -> anyhow::Result<f64> {
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let (caller, keep) = systems::echo_caller(info, 32).await?;
        caller().await?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
        drop(keep);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
