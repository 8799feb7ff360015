//! Closed-loop load: `concurrency` callers, each issuing calls back to back, for a warm-up and
//! then a measured window; bounded in time and in count.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

/// A boxed future, for callers of every system behind one type.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One call of a system: send the payload, await the echo.
pub(crate) type Caller = Arc<dyn Fn() -> BoxFuture<anyhow::Result<()>> + Send + Sync>;

/// Most calls one caller makes in one run, whatever the duration: a bound on every loop.
const MAX_CALLS_PER_CALLER: u64 = 50_000_000;

/// What one run measured.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    /// Calls completed in the whole run, warm-up included (for CPU per call).
    pub(crate) total_calls: u64,
    /// Calls per second.
    pub(crate) rate: f64,
    /// Median latency, microseconds.
    pub(crate) p50_us: f64,
    /// 99th percentile latency, microseconds.
    pub(crate) p99_us: f64,
}

/// Runs the load and returns the measured sample.
pub(crate) async fn closed_loop(
    caller: Caller,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let caller = caller.clone();
        tasks.spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut calls = 0u64;
            let mut total = 0u64;
            for _ in 0..MAX_CALLS_PER_CALLER {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                caller().await?;
                total += 1;
                let done = Instant::now();
                if t >= measure_from && done <= end {
                    let us = (done - t).as_micros() as u64;
                    hist.saturating_record(us.max(1));
                    calls += 1;
                }
            }
            Ok::<_, anyhow::Error>((hist, calls, total))
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut calls = 0;
    let mut total_calls = 0;
    while let Some(result) = tasks.join_next().await {
        let (h, c, t) = result??;
        hist.add(h).map_err(|e| anyhow::anyhow!("{e}"))?;
        calls += c;
        total_calls += t;
    }
    Ok(Sample {
        total_calls,
        rate: calls as f64 / duration.as_secs_f64(),
        p50_us: hist.value_at_quantile(0.5) as f64,
        p99_us: hist.value_at_quantile(0.99) as f64,
    })
}

/// CPU time (user + system) this process has used so far.
pub(crate) fn cpu_time() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::from_secs(tv.tv_sec() as u64) + Duration::from_micros(tv.tv_usec() as u64)
            };
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or_default()
}

/// Resident memory of a process, bytes (Linux `/proc/<pid>/status`).
pub(crate) fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
