//! Metrics through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! quicx records these series into whatever recorder the application installed (none: they cost
//! a few hundred nanoseconds per call and go nowhere; a served call finds its series through its
//! method, with no lookup by name). **Install the recorder before building servers and
//! clients**: each caches its series handles when it first uses them, and each thread keeps the
//! handles of the client call series it recorded into lately for every client of the process.
//!
//! | series | kind | labels |
//! |---|---|---|
//! | `quicx_server_calls_total` | counter | `service`, `method`, `status` |
//! | `quicx_server_call_duration_seconds` | histogram | `service`, `method` |
//! | `quicx_server_connections` | gauge | |
//! | `quicx_handshakes_total` | counter | `result` = `ok`, `failed`, `refused`, `moved` (sent a Retry to another I/O thread: it comes back as a handshake of its own) |
//! | `quicx_auth_failures_total` | counter | |
//! | `quicx_pushes_total` | counter | `result` = `ok`, `error` |
//! | `quicx_push_dropped_total` | counter | (pushes a client's full channel dropped, as receipts report) |
//! | `quicx_client_calls_total` | counter | `service`, `method`, `status` |
//! | `quicx_client_call_duration_seconds` | histogram | `service`, `method` |
//! | `quicx_client_connections` | gauge | |
//! | `quicx_client_handshakes_total` | counter | `result` = `ok`, `failed` |
//! | `quicx_client_pushes_received_total` | counter | |
//! | `quicx_client_push_dropped_total` | counter | (dropped by this client's full push channel) |
//! | `quicx_durable_pending` | gauge | (durable messages in a server's store) |
//! | `quicx_durable_pending_bytes` | gauge | (their stored bytes, payload and header) |
//! | `quicx_durable_pending_identities` | gauge | (identities with at least one pending message) |
//! | `quicx_durable_delivered_total`, `_redelivered_total`, `_expired_total`, `_overflowed_total` | counter | |
//!
//! `status` is [`status::name`](crate::status::name) of the reply's code (`ok`,
//! `unknown_method`, `rate_limited`, `application`, ...) on servers, and
//! [`Error::kind`](crate::Error::kind) (or `ok`) on clients, where a call whose future the
//! caller dropped counts as `cancelled`. Only registered methods get series
//! (an unknown method name from a peer cannot grow them). Turn them off with
//! [`ServerBuilder::metrics`](crate::ServerBuilder::metrics) /
//! [`ClientBuilder::metrics`](crate::ClientBuilder::metrics).
//!
//! With the `prometheus` feature, `install_prometheus` installs `metrics-exporter-prometheus`
//! and serves the text format on `http://ADDR/metrics`.

use crate::sync::ReadWrite;
use std::{
    collections::HashMap,
    sync::{Arc, OnceLock, RwLock},
    time::Duration,
};

use metrics::{Counter, Histogram};

use crate::{CallOutcome, Context, Error, Interceptor, intercept::CallInterceptor};

/// Names of the series (see the module docs).
pub mod names {
    /// Calls served, by service, method and status.
    pub const SERVER_CALLS: &str = "quicx_server_calls_total";
    /// Time to serve a call, by service and method.
    pub const SERVER_CALL_DURATION: &str = "quicx_server_call_duration_seconds";
    /// Connections open on servers.
    pub const SERVER_CONNECTIONS: &str = "quicx_server_connections";
    /// Server handshakes by result.
    pub const HANDSHAKES: &str = "quicx_handshakes_total";
    /// Refused hellos and calls refused as unauthenticated or denied.
    pub const AUTH_FAILURES: &str = "quicx_auth_failures_total";
    /// Pushes sent, by result.
    pub const PUSHES: &str = "quicx_pushes_total";
    /// Pushes with receipt that the client's full channel dropped.
    pub const PUSH_DROPPED: &str = "quicx_push_dropped_total";
    /// Calls made by clients, by service, method and status.
    pub const CLIENT_CALLS: &str = "quicx_client_calls_total";
    /// Time of a call made by a client, by service and method.
    pub const CLIENT_CALL_DURATION: &str = "quicx_client_call_duration_seconds";
    /// Connections open on clients.
    pub const CLIENT_CONNECTIONS: &str = "quicx_client_connections";
    /// Client handshakes by result.
    pub const CLIENT_HANDSHAKES: &str = "quicx_client_handshakes_total";
    /// Pushes a client received.
    pub const CLIENT_PUSHES_RECEIVED: &str = "quicx_client_pushes_received_total";
    /// Pushes a client's full channel dropped.
    pub const CLIENT_PUSH_DROPPED: &str = "quicx_client_push_dropped_total";
    /// Durable messages pending in a server's store.
    pub const DURABLE_PENDING: &str = "quicx_durable_pending";
    /// Stored bytes (payload and header) of the durable messages pending in a server's store.
    pub const DURABLE_PENDING_BYTES: &str = "quicx_durable_pending_bytes";
    /// Identities with durable messages pending in a server's store.
    pub const DURABLE_PENDING_IDENTITIES: &str = "quicx_durable_pending_identities";
    /// Durable messages acknowledged by their devices.
    pub const DURABLE_DELIVERED: &str = "quicx_durable_delivered_total";
    /// Durable messages acknowledged after more than one delivery.
    pub const DURABLE_REDELIVERED: &str = "quicx_durable_redelivered_total";
    /// Durable messages dropped when their TTL passed.
    pub const DURABLE_EXPIRED: &str = "quicx_durable_expired_total";
    /// Durable messages dropped to make room.
    pub const DURABLE_OVERFLOWED: &str = "quicx_durable_overflowed_total";
}

/// The call series of one served method: a counter per status code (in a fixed array: no lock,
/// no lookup per call) and the duration histogram.
pub(crate) struct ServedSeries {
    service: String,
    method: String,
    /// Codes 0..=15, then `application`, then any other.
    calls: [OnceLock<Counter>; 18],
    duration: Histogram,
}

impl ServedSeries {
    fn new(service: &str, method: &str) -> Self {
        Self {
            service: service.to_owned(),
            method: method.to_owned(),
            calls: std::array::from_fn(|_| OnceLock::new()),
            duration: metrics::histogram!(
                names::SERVER_CALL_DURATION,
                "service" => service.to_owned(),
                "method" => method.to_owned()
            ),
        }
    }

    fn record(&self, code: u32, elapsed: Duration) {
        self.duration.record(elapsed.as_secs_f64());
        let slot = match code {
            0..=15 => code as usize,
            crate::status::APPLICATION.. => 16,
            _ => 17,
        };
        self.calls[slot]
            .get_or_init(|| {
                metrics::counter!(
                    names::SERVER_CALLS,
                    "service" => self.service.clone(),
                    "method" => self.method.clone(),
                    "status" => crate::status::name(code)
                )
            })
            .increment(1);
    }
}

impl std::fmt::Debug for ServedSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServedSeries({}.{})", self.service, self.method)
    }
}

/// One series family per (service, method): a counter per status, one histogram.
struct MethodSeries {
    service: String,
    method: String,
    calls_name: &'static str,
    /// Status names are a small fixed set, so the counters are created on first use.
    calls: RwLock<HashMap<&'static str, Counter>>,
    duration: Histogram,
}

impl MethodSeries {
    fn new(names: (&'static str, &'static str), service: &str, method: &str) -> Self {
        let (calls_name, duration_name) = names;
        Self {
            service: service.to_owned(),
            method: method.to_owned(),
            calls_name,
            calls: RwLock::default(),
            duration: metrics::histogram!(
                duration_name,
                "service" => service.to_owned(),
                "method" => method.to_owned()
            ),
        }
    }

    /// The counter of `status`, created on first use.
    fn counter(&self, status: &'static str) -> Counter {
        if let Some(c) = self.calls.read_locked().get(status) {
            return c.clone();
        }
        self.calls
            .write_locked()
            .entry(status)
            .or_insert_with(|| {
                metrics::counter!(
                    self.calls_name,
                    "service" => self.service.clone(),
                    "method" => self.method.clone(),
                    "status" => status
                )
            })
            .clone()
    }
}

/// How many (series name, service, method) series each thread keeps handles of.
const RECENT_SERIES: usize = 16;

/// A thread's own handles to one method's series: what a call records into without touching
/// a lock or a reference count that other threads touch too (measured: with the shared map
/// alone, the two read locks and the string hashing of each call cost a multi-thread client at
/// 256 concurrent calls about a tenth of its rate).
struct Recent {
    /// The calls series' name (client and server caches record under different names).
    name: &'static str,
    service: Box<str>,
    method: Box<str>,
    duration: Histogram,
    /// The counters of the statuses this thread saw, created on first use from the shared
    /// series (a handful: `ok` and the error kinds that happened).
    calls: Vec<(&'static str, Counter)>,
    shared: Arc<MethodSeries>,
}

thread_local! {
    /// The series this thread recorded into lately, the most recently used last. Keyed by the
    /// series' name and labels, not by client: every client of the process records the same
    /// series, so a gateway with thousands of clients still finds its handles here.
    static RECENT: std::cell::RefCell<Vec<Recent>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The series of every (service, method) seen, created on first use; each thread keeps its own
/// handles to the ones it used lately (`RECENT`).
struct SeriesCache {
    names: (&'static str, &'static str),
    by_service: RwLock<HashMap<String, HashMap<String, Arc<MethodSeries>>>>,
}

impl SeriesCache {
    fn new(names: (&'static str, &'static str)) -> Self {
        Self {
            names,
            by_service: RwLock::default(),
        }
    }

    /// Records one call in the series of (service, method), creating them on first use.
    fn record(&self, service: &str, method: &str, status: &'static str, elapsed: Duration) {
        let recorded = RECENT.try_with(|recent| {
            let mut recent = recent.borrow_mut();
            let name = self.names.0;
            let r = match recent
                .iter()
                .rposition(|r| r.name == name && *r.method == *method && *r.service == *service)
            {
                Some(i) => {
                    // Most recently used last: what a thread stops calling leaves first.
                    recent[i..].rotate_left(1);
                    recent.last_mut().expect("found")
                }
                None => {
                    if recent.len() == RECENT_SERIES {
                        recent.remove(0);
                    }
                    let shared = self.shared(service, method);
                    recent.push(Recent {
                        name,
                        service: service.into(),
                        method: method.into(),
                        duration: shared.duration.clone(),
                        calls: Vec::new(),
                        shared,
                    });
                    recent.last_mut().expect("just pushed")
                }
            };
            r.duration.record(elapsed.as_secs_f64());
            match r.calls.iter().find(|(s, _)| *s == status) {
                Some((_, c)) => c.increment(1),
                None => {
                    let c = r.shared.counter(status);
                    c.increment(1);
                    r.calls.push((status, c));
                }
            }
        });
        if recorded.is_err() {
            // The thread is exiting (a call dropped while its thread-locals go): record through
            // the shared series.
            let series = self.shared(service, method);
            series.duration.record(elapsed.as_secs_f64());
            series.counter(status).increment(1);
        }
    }

    /// The shared series of (service, method), created on first use.
    fn shared(&self, service: &str, method: &str) -> Arc<MethodSeries> {
        if let Some(s) = self
            .by_service
            .read_locked()
            .get(service)
            .and_then(|m| m.get(method))
        {
            return s.clone();
        }
        self.by_service
            .write_locked()
            .entry(service.to_owned())
            .or_default()
            .entry(method.to_owned())
            .or_insert_with(|| Arc::new(MethodSeries::new(self.names, service, method)))
            .clone()
    }
}

/// Calls served by a side: `quicx_server_calls_total` and its duration histogram, in each
/// method's own series.
pub(crate) struct ServerCallMetrics;

impl ServerCallMetrics {
    pub(crate) fn new() -> Self {
        describe();
        Self
    }
}

impl Interceptor for ServerCallMetrics {
    fn after_call(&self, ctx: &Context, outcome: &CallOutcome) {
        ctx.method()
            .series
            .get_or_init(|| ServedSeries::new(ctx.service_path(), ctx.service_method()))
            .record(outcome.status, outcome.elapsed);
    }

    fn on_connect(&self, _conn: &crate::Connection) -> Result<(), crate::Refusal> {
        metrics::gauge!(names::SERVER_CONNECTIONS).increment(1.0);
        Ok(())
    }

    fn on_disconnect(&self, _conn: &crate::Connection) {
        metrics::gauge!(names::SERVER_CONNECTIONS).decrement(1.0);
    }
}

/// Calls made by a side: `quicx_client_calls_total` and its duration histogram.
pub(crate) struct ClientCallMetrics(SeriesCache);

impl ClientCallMetrics {
    pub(crate) fn new() -> Self {
        describe();
        Self(SeriesCache::new((
            names::CLIENT_CALLS,
            names::CLIENT_CALL_DURATION,
        )))
    }
}

impl CallInterceptor for ClientCallMetrics {
    fn after_call(
        &self,
        service_path: &str,
        service_method: &str,
        result: Result<(), &Error>,
        elapsed: Duration,
    ) {
        let status = result.map_or_else(Error::kind, |()| "ok");
        self.0.record(service_path, service_method, status, elapsed);
    }
}

/// Events counted outside calls (connections, handshakes, pushes), when a side has metrics on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    Handshake(&'static str),
    ClientHandshake(&'static str),
    ClientConnected,
    ClientDisconnected,
    AuthFailure,
    Push { ok: bool },
    PushDropped,
    ClientPushReceived,
    ClientPushDropped,
}

/// The handles of the series a side records per push (made on first use: install the recorder
/// first, see the module docs), so that a push costs an increment, not a key built and looked
/// up in the recorder (a label list allocated and hashed per push: measured 4% of a server I/O
/// thread pushing 32 B messages).
#[derive(Default)]
pub(crate) struct EventSeries {
    pushed: OnceLock<Counter>,
    push_failed: OnceLock<Counter>,
    push_dropped: OnceLock<Counter>,
    client_received: OnceLock<Counter>,
    client_dropped: OnceLock<Counter>,
}

impl EventSeries {
    /// Records `event`, through a kept handle for the per-push ones.
    pub(crate) fn record(&self, event: Event) {
        let (handle, make): (&OnceLock<Counter>, fn() -> Counter) = match event {
            Event::Push { ok: true } => (
                &self.pushed,
                || metrics::counter!(names::PUSHES, "result" => "ok"),
            ),
            Event::Push { ok: false } => (
                &self.push_failed,
                || metrics::counter!(names::PUSHES, "result" => "error"),
            ),
            Event::PushDropped => (&self.push_dropped, || {
                metrics::counter!(names::PUSH_DROPPED)
            }),
            Event::ClientPushReceived => (&self.client_received, || {
                metrics::counter!(names::CLIENT_PUSHES_RECEIVED)
            }),
            Event::ClientPushDropped => (&self.client_dropped, || {
                metrics::counter!(names::CLIENT_PUSH_DROPPED)
            }),
            other => return record(other),
        };
        handle.get_or_init(make).increment(1);
    }
}

impl std::fmt::Debug for EventSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSeries")
    }
}

fn record(event: Event) {
    match event {
        Event::Handshake(result) => {
            metrics::counter!(names::HANDSHAKES, "result" => result).increment(1)
        }
        Event::ClientHandshake(result) => {
            metrics::counter!(names::CLIENT_HANDSHAKES, "result" => result).increment(1);
        }
        Event::ClientConnected => metrics::gauge!(names::CLIENT_CONNECTIONS).increment(1.0),
        Event::ClientDisconnected => metrics::gauge!(names::CLIENT_CONNECTIONS).decrement(1.0),
        Event::AuthFailure => metrics::counter!(names::AUTH_FAILURES).increment(1),
        Event::Push { ok } => {
            let result = if ok { "ok" } else { "error" };
            metrics::counter!(names::PUSHES, "result" => result).increment(1);
        }
        Event::PushDropped => metrics::counter!(names::PUSH_DROPPED).increment(1),
        Event::ClientPushReceived => metrics::counter!(names::CLIENT_PUSHES_RECEIVED).increment(1),
        Event::ClientPushDropped => metrics::counter!(names::CLIENT_PUSH_DROPPED).increment(1),
    }
}

/// Describes every series once (units and help text) to the installed recorder.
fn describe() {
    static DESCRIBED: OnceLock<()> = OnceLock::new();
    DESCRIBED.get_or_init(|| {
        use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
        describe_counter!(
            names::SERVER_CALLS,
            "Calls served, by service, method and status"
        );
        describe_histogram!(
            names::SERVER_CALL_DURATION,
            Unit::Seconds,
            "Time from reading a request to its reply"
        );
        describe_gauge!(names::SERVER_CONNECTIONS, "Connections open on servers");
        describe_counter!(names::HANDSHAKES, "Server handshakes by result");
        describe_counter!(
            names::AUTH_FAILURES,
            "Hellos and calls refused as unauthenticated or denied"
        );
        describe_counter!(names::PUSHES, "Pushes sent by result");
        describe_counter!(
            names::PUSH_DROPPED,
            "Pushes with receipt dropped by the client's full channel"
        );
        describe_counter!(
            names::CLIENT_CALLS,
            "Calls made, by service, method and status"
        );
        describe_histogram!(
            names::CLIENT_CALL_DURATION,
            Unit::Seconds,
            "Time of a call made, from encoding to reply"
        );
        describe_gauge!(names::CLIENT_CONNECTIONS, "Connections open on clients");
        describe_counter!(names::CLIENT_HANDSHAKES, "Client handshakes by result");
        describe_counter!(names::CLIENT_PUSHES_RECEIVED, "Pushes received by clients");
        describe_counter!(
            names::CLIENT_PUSH_DROPPED,
            "Pushes dropped by a client's full push channel"
        );
    });
}

/// Installs the Prometheus exporter as the global `metrics` recorder and serves the text format
/// on `http://addr/metrics` (any path answers). Call it before building servers and clients.
///
/// Duration histograms get buckets from 50 µs to 10 s. Returns the handle (its `render()` gives
/// the same text) once the listener is bound; an error if a recorder is already installed or the
/// address cannot be bound. The listener runs on the current Tokio runtime (or a thread of its
/// own outside one) until the process exits.
#[cfg(feature = "prometheus")]
pub fn install_prometheus(
    addr: std::net::SocketAddr,
) -> crate::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    const BUCKETS: &[f64] = &[
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let config = |e: metrics_exporter_prometheus::BuildError| Error::Config(e.to_string());
    let builder = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .map_err(config)?;
    // `build` binds the listener and spawns the recorder's upkeep task on the current runtime.
    let install = move || {
        let (recorder, exporter) = builder.build().map_err(config)?;
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).map_err(|e| Error::Config(e.to_string()))?;
        Ok::<_, Error>((handle, exporter))
    };
    let handle = match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            let (handle, exporter) = install()?;
            rt.spawn(exporter);
            handle
        }
        Err(_) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (handle, exporter) = runtime.block_on(async { install() })?;
            std::thread::Builder::new()
                .name("quicx-prometheus".into())
                .spawn(move || runtime.block_on(exporter))?;
            handle
        }
    };
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    };

    use metrics::{
        CounterFn, GaugeFn, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };

    use super::*;

    /// Counts every counter increment and histogram sample by series (name and labels).
    #[derive(Default)]
    struct Counting(Mutex<HashMap<String, Arc<Cell>>>);

    #[derive(Default)]
    struct Cell(AtomicU64);

    impl CounterFn for Cell {
        fn increment(&self, value: u64) {
            self.0.fetch_add(value, Ordering::Relaxed);
        }
        fn absolute(&self, value: u64) {
            self.0.store(value, Ordering::Relaxed);
        }
    }

    impl HistogramFn for Cell {
        fn record(&self, _value: f64) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    impl GaugeFn for Cell {
        fn increment(&self, _: f64) {}
        fn decrement(&self, _: f64) {}
        fn set(&self, _: f64) {}
    }

    impl Counting {
        fn cell(&self, key: &Key) -> Arc<Cell> {
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            self.0.lock().unwrap().entry(name).or_default().clone()
        }

        fn get(&self, series: &str) -> u64 {
            self.0
                .lock()
                .unwrap()
                .get(series)
                .map_or(0, |c| c.0.load(Ordering::Relaxed))
        }
    }

    impl Recorder for Counting {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(self.cell(key))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::from_arc(self.cell(key))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(self.cell(key))
        }
    }

    #[test]
    fn client_calls_count_in_their_series_from_any_thread_and_past_what_a_thread_keeps() {
        let recorder = Counting::default();
        let first = ClientCallMetrics::new();
        let second = ClientCallMetrics::new();
        // More methods than a thread keeps handles of, so handles are dropped and made again.
        let methods: Vec<String> = (0..RECENT_SERIES * 2 + 3)
            .map(|i| format!("m{i}"))
            .collect();
        let failed = Error::DeadlineExceeded { remote: false };
        let calls = |metrics: &ClientCallMetrics| {
            metrics::with_local_recorder(&recorder, || {
                for _ in 0..3 {
                    for m in &methods {
                        metrics.after_call("S", m, Ok(()), Duration::from_micros(5));
                    }
                    metrics.after_call("S", "m0", Err(&failed), Duration::from_micros(5));
                }
            });
        };
        std::thread::scope(|s| {
            s.spawn(|| calls(&first));
            s.spawn(|| calls(&first));
            s.spawn(|| calls(&second));
        });
        calls(&second);
        for m in &methods {
            assert_eq!(
                recorder.get(&format!(
                    "quicx_client_calls_total{{service=S,method={m},status=ok}}"
                )),
                12,
                "{m}"
            );
            let errors = if m == "m0" { 12 } else { 0 };
            assert_eq!(
                recorder.get(&format!(
                    "quicx_client_calls_total{{service=S,method={m},status=deadline_exceeded}}"
                )),
                errors,
                "{m}"
            );
            assert_eq!(
                recorder.get(&format!(
                    "quicx_client_call_duration_seconds{{service=S,method={m}}}"
                )),
                12 + errors,
                "{m}"
            );
        }
    }
}
