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
    closed_loop_spread(&[caller], concurrency, warmup, duration).await
}

/// The same load with the `concurrency` callers spread evenly over `callers` (one per
/// connection): caller `i` calls through `callers[i % callers.len()]`.
pub(crate) async fn closed_loop_spread(
    callers: &[Caller],
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Sample> {
    anyhow::ensure!(!callers.is_empty(), "no connection to call through");
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..concurrency {
        let caller = callers[i % callers.len()].clone();
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

/// What a paced probe measured.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Paced {
    /// Calls that succeeded.
    pub(crate) calls: u64,
    /// Calls that failed or did not complete within [`PACED_CALL_LIMIT`].
    pub(crate) errors: u64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) max_us: f64,
}

/// Longest a paced call may take before it counts as an error: a bound on every probe.
const PACED_CALL_LIMIT: Duration = Duration::from_secs(30);

/// One call every `interval` for `window`, each started on its schedule whatever the earlier
/// calls are doing (open loop), so a stall counts for every call sent during it, not once. A
/// call's latency runs from when it is sent (not from its scheduled time: tokio's timer wakes up
/// to a millisecond late, which would swamp a trivial call's latency).
pub(crate) async fn paced(caller: Caller, interval: Duration, window: Duration) -> Paced {
    let start = Instant::now();
    let n = (window.as_nanos() / interval.as_nanos().max(1)) as u32;
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..n {
        let due = start + interval * k;
        tokio::time::sleep_until(due.into()).await;
        let caller = caller.clone();
        tasks.spawn(async move {
            let sent = Instant::now();
            let ok = matches!(
                tokio::time::timeout(PACED_CALL_LIMIT, caller()).await,
                Ok(Ok(()))
            );
            (ok, sent.elapsed())
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut out = Paced::default();
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok((true, latency)) => {
                hist.saturating_record((latency.as_micros() as u64).max(1));
                out.calls += 1;
            }
            _ => out.errors += 1,
        }
    }
    if out.calls > 0 {
        out.p50_us = hist.value_at_quantile(0.5) as f64;
        out.p99_us = hist.value_at_quantile(0.99) as f64;
        out.max_us = hist.max() as f64;
    }
    out
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

/// CPU time (user + system) process `pid` has used so far, from `/proc/<pid>/stat` (in clock
/// ticks of 10 ms on Linux; zero when unreadable).
pub(crate) fn cpu_time_of(pid: u32) -> Duration {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| ticks_of_stat(&s))
        .unwrap_or_default()
}

/// A process's CPU time (user + system) so far, in all and per thread, from `/proc` (10 ms
/// ticks; zero and no threads when unreadable).
pub(crate) struct ProcessCpu {
    total: Duration,
    threads: std::collections::HashMap<u32, Duration>,
}

impl ProcessCpu {
    /// Process `pid`'s CPU time now.
    pub(crate) fn of(pid: u32) -> Self {
        Self {
            total: cpu_time_of(pid),
            threads: thread_times_of(pid),
        }
    }

    /// The CPU time used between `earlier` and `self`: the whole process's, and its busiest
    /// thread's (a thread that started meanwhile counts from zero; one that ended is missed).
    pub(crate) fn since(&self, earlier: &Self) -> (Duration, Duration) {
        let busiest = self
            .threads
            .iter()
            .map(|(tid, t)| t.saturating_sub(earlier.threads.get(tid).copied().unwrap_or_default()))
            .max()
            .unwrap_or_default();
        (self.total.saturating_sub(earlier.total), busiest)
    }
}

/// CPU time (user + system) of each thread of process `pid` so far, by thread id, from
/// `/proc/<pid>/task/*/stat` (10 ms ticks; empty when unreadable).
fn thread_times_of(pid: u32) -> std::collections::HashMap<u32, Duration> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Default::default();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid: u32 = task.file_name().to_str()?.parse().ok()?;
            let s = std::fs::read_to_string(task.path().join("stat")).ok()?;
            Some((tid, ticks_of_stat(&s)?))
        })
        .collect()
}

/// utime + stime of a `/proc` `stat` line.
fn ticks_of_stat(s: &str) -> Option<Duration> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_utime_plus_stime_whatever_the_command_name_holds() {
        // The name may hold spaces and parentheses; utime 150 and stime 25 ticks follow it as
        // the 12th and 13th fields.
        let line = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 3";
        assert_eq!(ticks_of_stat(line), Some(Duration::from_millis(1750)));
        assert_eq!(ticks_of_stat("42 (cut short) S 1 2"), None);
    }

    #[test]
    fn a_thread_that_burns_cpu_is_the_busiest_and_counts_in_the_process() {
        let before = ProcessCpu::of(std::process::id());
        assert!(!before.threads.is_empty());
        // 80 ms of this thread's CPU time: at least 7 of the 10 ms ticks, whatever the others.
        crate::systems::burn(80_000);
        let (total, busiest) = ProcessCpu::of(std::process::id()).since(&before);
        assert!(
            busiest >= Duration::from_millis(70),
            "busiest thread {busiest:?}"
        );
        assert!(
            total >= busiest,
            "process {total:?} < busiest thread {busiest:?}"
        );
    }
}
