//! Results: one JSON record per measurement, a markdown report with ratios, SVG plots.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use plotters::prelude::*;
use serde::Serialize;

use crate::{devices::Fleet, systems::System};

/// One measured figure (median of the repetitions).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Record {
    pub(crate) system: System,
    pub(crate) system_name: &'static str,
    pub(crate) layout: &'static str,
    pub(crate) scenario: &'static str,
    pub(crate) payload: usize,
    pub(crate) concurrency: usize,
    /// Calls (or messages) per second.
    pub(crate) rate: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) cpu_us_per_call: f64,
    pub(crate) repetitions: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fleet: Option<Fleet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) setup_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) handler_cpu: Option<HandlerCpu>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) blocking: Option<Blocking>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) push_cpu: Option<PushCpu>,
}

/// Where a push run's CPU went (two-process layout only; medians of the repetitions). From
/// `/proc` in 10 ms ticks over the whole run, connection set-up included.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct PushCpu {
    /// Server process CPU time ÷ the run's wall time.
    pub(crate) server_cores: f64,
    /// The same for the server's busiest thread: one thread near 1.0 bounds the rate.
    pub(crate) server_busiest_thread_cores: f64,
    /// The client's (the harness's) process.
    pub(crate) client_cores: f64,
    /// Server and client CPU per message, µs.
    pub(crate) server_us_per_push: f64,
    pub(crate) client_us_per_push: f64,
}

/// The handler-cpu scenario's own figures (rate and latencies are in the [`Record`]).
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct HandlerCpu {
    /// CPU each call's handler burns, µs.
    pub(crate) work_us: u64,
    pub(crate) callers: usize,
    pub(crate) connections: usize,
    /// Server process CPU time ÷ wall time over the measured window (two-process layout only).
    pub(crate) server_cores: Option<f64>,
    /// The same for the client's process (the harness), over the same window.
    pub(crate) client_cores: Option<f64>,
    /// The server's CPU per call less the handler's burn, µs (its transport, runtime and
    /// dispatch); per run, then the median.
    pub(crate) server_us_beyond_handler: Option<f64>,
}

/// The blocking scenario's figures: connection B's probe while connection A's handler blocks.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Blocking {
    /// How A's handler is registered.
    pub(crate) handler: &'static str,
    /// How long each of A's calls blocks its handler's thread, ms.
    pub(crate) block_ms: u64,
    /// B's call interval, ms.
    pub(crate) interval_ms: u64,
    /// B's measured window, seconds.
    pub(crate) window_s: f64,
    pub(crate) probe_calls: u64,
    pub(crate) probe_errors: u64,
    pub(crate) probe_max_us: f64,
    /// A's calls completed while B was measured.
    pub(crate) blocked_calls: u64,
}

fn k(rate: f64) -> String {
    if rate >= 1000.0 {
        format!("{:.0}k", rate / 1000.0)
    } else {
        format!("{rate:.0}")
    }
}

fn find<'a>(
    records: &'a [Record],
    system: System,
    layout: &str,
    scenario: &str,
    payload: usize,
    c: usize,
) -> Option<&'a Record> {
    records.iter().find(|r| {
        r.system == system
            && r.layout == layout
            && r.scenario == scenario
            && r.payload == payload
            && r.concurrency == c
    })
}

/// The markdown report.
pub(crate) fn markdown(records: &[Record], machine: &str, settings: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# quicx benchmark report\n\n{machine}\n\n{settings}\n");
    let mut groups: BTreeMap<(&str, usize), Vec<usize>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.scenario == "calls") {
        let cs = groups.entry((r.layout, r.payload)).or_default();
        if !cs.contains(&r.concurrency) {
            cs.push(r.concurrency);
        }
    }
    for ((layout, payload), mut cs) in groups {
        cs.sort_unstable();
        let _ = writeln!(md, "## Calls: {layout}, {payload} B echo\n");
        let head: String = cs.iter().map(|c| format!(" c={c} |")).collect();
        let rule: String = cs.iter().map(|_| "---|").collect();
        let _ = writeln!(
            md,
            "calls/s (p50 / p99 µs, CPU µs per call)\n\n| system |{head}\n|---|{rule}"
        );
        for system in System::ALL {
            let mut row = format!("| {} |", system.name());
            let mut any = false;
            for &c in &cs {
                match find(records, system, layout, "calls", payload, c) {
                    Some(r) => {
                        any = true;
                        let _ = write!(
                            row,
                            " **{}** ({:.0} / {:.0}, {:.1}) |",
                            k(r.rate),
                            r.p50_us,
                            r.p99_us,
                            r.cpu_us_per_call
                        );
                    }
                    None => row.push_str(" – |"),
                }
            }
            if any {
                let _ = writeln!(md, "{row}");
            }
        }
        let _ = writeln!(
            md,
            "\nquicx ÷ system (calls/s ratio; > 1 means quicx is faster)\n\n| vs |{head}\n|---|{rule}"
        );
        for system in System::ALL.into_iter().filter(|s| *s != System::Quicx) {
            let mut row = format!("| {} |", system.name());
            let mut any = false;
            for &c in &cs {
                match (
                    find(records, System::Quicx, layout, "calls", payload, c),
                    find(records, system, layout, "calls", payload, c),
                ) {
                    (Some(q), Some(o)) if o.rate > 0.0 => {
                        any = true;
                        let _ = write!(row, " {:.2} |", q.rate / o.rate);
                    }
                    _ => row.push_str(" – |"),
                }
            }
            if any {
                let _ = writeln!(md, "{row}");
            }
        }
        md.push('\n');
    }
    let pushes: Vec<&Record> = records.iter().filter(|r| r.scenario == "push").collect();
    if !pushes.is_empty() {
        let _ = writeln!(
            md,
            "## Push (server to client), messages/s\n\n\
             CPU (2 processes only): each process's CPU time ÷ the run's wall time, and the \
             server's busiest thread's (a thread near 1.00 bounds the rate); over the whole run, \
             connection set-up included, in 10 ms ticks (coarse for runs under a second).\n\n\
             | layout | system | payload | senders | messages/s | ÷ raw quinn \
             | server cores (busiest thread) | client cores | µs per push: server, client |\n\
             |---|---|---|---|---|---|---|---|---|"
        );
        for r in &pushes {
            let quinn = pushes.iter().find(|q| {
                q.system == System::Quinn
                    && q.layout == r.layout
                    && q.payload == r.payload
                    && q.concurrency == r.concurrency
            });
            let ratio = quinn.map_or("–".into(), |q| format!("{:.2}", r.rate / q.rate));
            let cpu = r.push_cpu.map_or("– | – | –".into(), |c| {
                format!(
                    "{:.2} ({:.2}) | {:.2} | {:.2}, {:.2}",
                    c.server_cores,
                    c.server_busiest_thread_cores,
                    c.client_cores,
                    c.server_us_per_push,
                    c.client_us_per_push
                )
            });
            let _ = writeln!(
                md,
                "| {} | {} | {} B | {} | {} | {ratio} | {cpu} |",
                r.layout,
                r.system_name,
                r.payload,
                r.concurrency,
                k(r.rate)
            );
        }
        md.push('\n');
    }
    let fleets: Vec<&Record> = records.iter().filter(|r| r.scenario == "fleet").collect();
    if !fleets.is_empty() {
        let _ = writeln!(
            md,
            "## Many devices\n\n| layout | system | clients | handshakes/s | server KiB per idle connection | broadcast to all (ms) | of which the server's call (ms) | server's RTT estimate, p50 (ms) | CPU ms during it: client, server | UDP datagrams during it, per device |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in fleets {
            if let Some(f) = r.fleet {
                let mem = if f.server_bytes_per_connection > 0.0 {
                    format!("{:.1}", f.server_bytes_per_connection / 1024.0)
                } else {
                    "–".into()
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.0} | {mem} | {:.0} | {:.0} | {:.1} | {:.0}, {:.0} | {:.1} |",
                    r.layout,
                    r.system_name,
                    f.clients,
                    f.handshakes_per_sec,
                    f.broadcast_ms,
                    f.broadcast_server_ms,
                    f.broadcast_server_rtt_ms,
                    f.broadcast_client_cpu_ms,
                    f.broadcast_server_cpu_ms,
                    f.broadcast_datagrams_per_device
                );
            }
        }
        md.push('\n');
    }
    handler_cpu_markdown(&mut md, records);
    blocking_markdown(&mut md, records);
    let setups: Vec<&Record> = records.iter().filter(|r| r.scenario == "setup").collect();
    if !setups.is_empty() {
        let _ = writeln!(
            md,
            "## Connection setup (connect + first call), median ms\n\n| layout | system | ms |\n|---|---|---|"
        );
        for r in setups {
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} |",
                r.layout,
                r.system_name,
                r.setup_ms.unwrap_or(0.0)
            );
        }
    }
    md
}

fn handler_cpu_markdown(md: &mut String, records: &[Record]) {
    let rows: Vec<(&Record, HandlerCpu)> = records
        .iter()
        .filter(|r| r.scenario == "handler-cpu")
        .filter_map(|r| r.handler_cpu.map(|h| (r, h)))
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "## Handler CPU: each call's handler burns a fixed CPU time\n\n\
         Closed loop, callers spread evenly over connections (one client each). Server and \
         client cores: each process's CPU time ÷ wall time of the measured window (2 processes \
         only); server µs beyond the handler: the server's CPU per call less the handler's \
         burn (its transport, runtime and dispatch). ÷ tarpc: calls/s ratio to tarpc in the \
         same layout and load (> 1 means faster).\n\n\
         | layout | system | handler µs | callers / connections | calls/s | p50 µs | p99 µs \
         | server cores | client cores | server µs per call beyond the handler \
         | ÷ tarpc tcp | ÷ tarpc tcp+TLS |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for &(r, h) in &rows {
        let ratio = |base: System| {
            rows.iter()
                .find(|(o, oh)| {
                    o.system == base
                        && o.layout == r.layout
                        && oh.work_us == h.work_us
                        && oh.callers == h.callers
                        && oh.connections == h.connections
                })
                .filter(|(o, _)| o.rate > 0.0)
                .map_or("–".into(), |(o, _)| format!("{:.2}", r.rate / o.rate))
        };
        let cores = |c: Option<f64>| c.map_or("–".into(), |c| format!("{c:.2}"));
        let beyond = h
            .server_us_beyond_handler
            .map_or("–".into(), |us| format!("{us:.1}"));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} / {} | **{}** | {:.0} | {:.0} | {} | {} | {beyond} | {} | {} |",
            r.layout,
            r.system_name,
            h.work_us,
            h.callers,
            h.connections,
            k(r.rate),
            r.p50_us,
            r.p99_us,
            cores(h.server_cores),
            cores(h.client_cores),
            ratio(System::Tarpc),
            ratio(System::TarpcTls)
        );
    }
    md.push('\n');
}

fn blocking_markdown(md: &mut String, records: &[Record]) {
    let rows: Vec<(&Record, Blocking)> = records
        .iter()
        .filter(|r| r.scenario == "blocking")
        .filter_map(|r| r.blocking.map(|b| (r, b)))
        .collect();
    let Some(&(_, first)) = rows.first() else {
        return;
    };
    let _ = writeln!(
        md,
        "## Blocking isolation: connection B's latency while connection A's handler blocks\n\n\
         One caller on connection A calls a handler that blocks its thread {} ms \
         (`std::thread::sleep`), back to back; connection B starts a trivial call (32 B echo) \
         every {} ms for {:.0} s, open loop (whether or not earlier calls have returned).\n\n\
         | layout | system | A's handler | B p50 µs | B p99 µs | B max µs | B calls (errors) \
         | A calls |\n\
         |---|---|---|---|---|---|---|---|",
        first.block_ms, first.interval_ms, first.window_s
    );
    for (r, b) in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | **{:.0}** | {:.0} | {} ({}) | {} |",
            r.layout,
            r.system_name,
            b.handler,
            r.p50_us,
            r.p99_us,
            b.probe_max_us,
            b.probe_calls,
            b.probe_errors,
            b.blocked_calls
        );
    }
    md.push('\n');
}

/// Two SVG plots per layout and payload: calls/s and p99 against concurrency.
pub(crate) fn plots(records: &[Record], dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut written = Vec::new();
    let mut groups: BTreeMap<(&str, usize), ()> = BTreeMap::new();
    for r in records.iter().filter(|r| r.scenario == "calls") {
        groups.insert((r.layout, r.payload), ());
    }
    for (layout, payload) in groups.into_keys() {
        let slug: String = layout
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        for (metric, label) in [("rate", "calls/s"), ("p99", "p99 latency (µs)")] {
            let file = format!("{metric}-{slug}-{payload}B.svg");
            let path = dir.join(&file);
            let series: Vec<(System, Vec<(f64, f64)>)> = System::ALL
                .into_iter()
                .map(|s| {
                    let mut points: Vec<(f64, f64)> = records
                        .iter()
                        .filter(|r| {
                            r.scenario == "calls"
                                && r.system == s
                                && r.layout == layout
                                && r.payload == payload
                        })
                        .map(|r| {
                            (
                                (r.concurrency as f64).log2(),
                                if metric == "rate" { r.rate } else { r.p99_us },
                            )
                        })
                        .collect();
                    points.sort_by(|a, b| a.0.total_cmp(&b.0));
                    (s, points)
                })
                .filter(|(_, p)| !p.is_empty())
                .collect();
            let max_x = series
                .iter()
                .flat_map(|(_, p)| p.iter().map(|q| q.0))
                .fold(1.0, f64::max);
            let max_y = series
                .iter()
                .flat_map(|(_, p)| p.iter().map(|q| q.1))
                .fold(1.0, f64::max)
                * 1.1;
            let root = SVGBackend::new(&path, (800, 500)).into_drawing_area();
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!("{label}: {layout}, {payload} B"),
                    ("sans-serif", 20),
                )
                .margin(15)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(0f64..max_x, 0f64..max_y)?;
            chart
                .configure_mesh()
                .x_desc("concurrent callers (log2)")
                .y_desc(label)
                .x_label_formatter(&|x| format!("{:.0}", 2f64.powf(*x)))
                .draw()?;
            for (i, (system, points)) in series.into_iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                    .label(system.name())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart.draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
            root.present()?;
            written.push(file);
        }
    }
    Ok(written)
}
