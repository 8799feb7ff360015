//! Interceptors around served and made calls, and W3C trace context across a call and the
//! reverse call its handler makes.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use quicx::{
    CallInterceptor, CallOutcome, Context, DevCertificate, Error, Interceptor, OutgoingCall,
    Refusal, Server, Service, ServiceError,
    trace::{self, TRACEPARENT, TraceContext},
};
use quicx_tests::client_builder;

/// Refuses calls without `x-tenant`; records every outcome and every connection.
#[derive(Default)]
struct Tenants {
    outcomes: Mutex<Vec<(String, u32)>>,
    connects: AtomicUsize,
    disconnects: AtomicUsize,
}

impl Interceptor for Tenants {
    fn on_connect(&self, _conn: &quicx::Connection) -> Result<(), Refusal> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn before_call(&self, ctx: &Context) -> Result<(), ServiceError> {
        match ctx.metadata().get("x-tenant") {
            Some(_) => Ok(()),
            None => Err(ServiceError::new(1001, "x-tenant missing")),
        }
    }

    fn after_call(&self, ctx: &Context, outcome: &CallOutcome) {
        self.outcomes
            .lock()
            .unwrap()
            .push((ctx.service_method().to_owned(), outcome.status));
    }

    fn on_disconnect(&self, _conn: &quicx::Connection) {
        self.disconnects.fetch_add(1, Ordering::SeqCst);
    }
}

/// Adds `x-tenant` to every call and counts results.
#[derive(Default)]
struct AddTenant {
    ok: AtomicUsize,
    failed: AtomicUsize,
    /// The addresses the calls went to.
    remotes: std::sync::Mutex<Vec<std::net::SocketAddr>>,
}

impl CallInterceptor for AddTenant {
    fn before_call(&self, call: &mut OutgoingCall<'_>) -> Result<(), Error> {
        self.remotes.lock().unwrap().push(call.remote());
        if call.service_method() == "Forbidden" {
            return Err(Error::PermissionDenied("refused locally".into()));
        }
        call.insert_metadata("x-tenant", "acme");
        Ok(())
    }

    fn after_call(
        &self,
        _path: &str,
        _method: &str,
        result: Result<(), &Error>,
        _elapsed: std::time::Duration,
    ) {
        match result {
            Ok(()) => self.ok.fetch_add(1, Ordering::SeqCst),
            Err(_) => self.failed.fetch_add(1, Ordering::SeqCst),
        };
    }
}

fn echo_tenant() -> Service {
    Service::new()
        .method("Tenant", |ctx: Context, (): ()| async move {
            Ok(ctx
                .metadata()
                .get("x-tenant")
                .unwrap_or_default()
                .to_owned())
        })
        .method("Fail", |_ctx: Context, (): ()| async move {
            Err::<(), _>(ServiceError::new(1002, "no"))
        })
}

#[tokio::test]
async fn server_and_client_interceptors_see_refuse_and_tag_calls() {
    let dev = DevCertificate::localhost().unwrap();
    let tenants = Arc::new(Tenants::default());
    let server = Server::builder()
        .dev_certificate(&dev)
        .interceptor(tenants.clone())
        .build()
        .unwrap();
    server.register("T", echo_tenant());
    let addr = server.bind("127.0.0.1:0").await.unwrap().to_string();

    // Without the client interceptor the server's interceptor refuses, with its code.
    let bare = client_builder(&dev).connect(&addr).await.unwrap();
    let err = bare
        .call::<_, String>("T", "Tenant", &())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Remote { code: 1001, message } if message == "x-tenant missing"),
        "{err:?}"
    );

    // With it, the metadata arrives and the handler runs.
    let adder = Arc::new(AddTenant::default());
    let tagged = client_builder(&dev)
        .call_interceptor(adder.clone())
        .connect(&addr)
        .await
        .unwrap();
    let tenant: String = tagged.call("T", "Tenant", &()).await.unwrap();
    assert_eq!(tenant, "acme");
    let err = tagged.call::<_, ()>("T", "Fail", &()).await.unwrap_err();
    assert!(matches!(err, Error::Remote { code: 1002, .. }), "{err:?}");
    // A local refusal sends nothing and is the call's error.
    let err = tagged
        .call::<_, ()>("T", "Forbidden", &())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
    assert_eq!(adder.ok.load(Ordering::SeqCst), 1);
    assert_eq!(adder.failed.load(Ordering::SeqCst), 2);
    assert_eq!(
        *adder.remotes.lock().unwrap(),
        vec![addr.parse::<std::net::SocketAddr>().unwrap(); 3]
    );

    let outcomes = tenants.outcomes.lock().unwrap().clone();
    assert_eq!(
        outcomes,
        vec![
            ("Tenant".to_owned(), 1001),
            ("Tenant".to_owned(), 0),
            ("Fail".to_owned(), 1002),
        ],
        "the refused call, the served one, the failed one; nothing for the local refusal"
    );
    assert_eq!(tenants.connects.load(Ordering::SeqCst), 2);
    bare.close().await;
    tagged.close().await;
    let disconnected = async {
        while tenants.disconnects.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), disconnected)
        .await
        .expect("on_disconnect for both connections");
}

/// Refuses every connection.
struct NoOne;

impl Interceptor for NoOne {
    fn on_connect(&self, _conn: &quicx::Connection) -> Result<(), Refusal> {
        Err(Refusal::PermissionDenied("closed for maintenance".into()))
    }
}

#[tokio::test]
async fn an_interceptor_can_refuse_a_connection() {
    let dev = DevCertificate::localhost().unwrap();
    let server = Server::builder()
        .dev_certificate(&dev)
        .interceptor(NoOne)
        .build()
        .unwrap();
    server.register("T", echo_tenant());
    let addr = server.bind("127.0.0.1:0").await.unwrap().to_string();
    let client = client_builder(&dev)
        .reconnect(false)
        .connect(&addr)
        .await
        .unwrap();
    let err = client
        .call::<_, String>("T", "Tenant", &())
        .await
        .unwrap_err();
    assert!(err.is_transport(), "{err:?}");
    assert!(server.connections().is_empty());
}

/// Panics in `on_connect` for the first `panics` connections.
struct PanicsFirst {
    panics: usize,
    seen: std::sync::atomic::AtomicUsize,
}

impl Interceptor for PanicsFirst {
    fn on_connect(&self, _conn: &quicx::Connection) -> Result<(), Refusal> {
        let n = self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        assert!(n >= self.panics, "interceptor bug on connection {n}");
        Ok(())
    }
}

/// An interceptor that panics costs the connection it panicked on, not a place under the
/// connection limit: once the panics stop, clients connect again.
#[tokio::test]
async fn an_interceptor_that_panics_does_not_use_up_the_connection_limit() {
    let dev = DevCertificate::localhost().unwrap();
    let server = Server::builder()
        .dev_certificate(&dev)
        .max_connections(2)
        .interceptor(PanicsFirst {
            panics: 3,
            seen: 0.into(),
        })
        .build()
        .unwrap();
    server.register("T", echo_tenant());
    let addr = server.bind("127.0.0.1:0").await.unwrap().to_string();
    for _ in 0..3 {
        // The handshake completes; the server's task for the connection then panics, and the
        // connection goes with it.
        let client = client_builder(&dev)
            .reconnect(false)
            .connect(&addr)
            .await
            .unwrap();
        let _ = client.call::<_, String>("T", "Tenant", &()).await;
    }
    let client = client_builder(&dev)
        .reconnect(false)
        .connect(&addr)
        .await
        .expect("a place under the limit");
    let _tenant: String = client
        .call("T", "Tenant", &())
        .await
        .expect("served once the panics stopped");
}

/// What the handlers saw of the trace.
#[derive(Debug, Default, Clone)]
struct Seen {
    forward: Option<(TraceContext, String)>,
    reverse: Option<(TraceContext, String)>,
}

#[tokio::test]
async fn a_trace_joins_a_call_and_the_reverse_call_its_handler_makes() {
    let dev = DevCertificate::localhost().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let server = Server::builder()
        .dev_certificate(&dev)
        .insecure_accept_unverified_client_ids()
        .build()
        .unwrap();
    let s = seen.clone();
    server.register(
        "Api",
        Service::new().method("Hop", move |ctx: Context, (): ()| {
            let s = s.clone();
            async move {
                let parent = ctx.metadata().get(TRACEPARENT).unwrap_or_default();
                s.lock().unwrap().forward = Some((ctx.trace().expect("traced"), parent.to_owned()));
                // A reverse call from inside the handler continues the trace.
                let answer: u32 = ctx
                    .conn()
                    .call("Device", "Ping", &())
                    .await
                    .map_err(|e| ServiceError::new(1000, e.to_string()))?;
                Ok(answer)
            }
        }),
    );
    let addr = server.bind("127.0.0.1:0").await.unwrap().to_string();
    let s = seen.clone();
    let client = client_builder(&dev)
        .client_id("device-1")
        .register(
            "Device",
            Service::new().method("Ping", move |ctx: Context, (): ()| {
                let s = s.clone();
                async move {
                    let parent = ctx.metadata().get(TRACEPARENT).unwrap_or_default();
                    s.lock().unwrap().reverse =
                        Some((ctx.trace().expect("traced"), parent.to_owned()));
                    Ok(7u32)
                }
            }),
        )
        .connect(&addr)
        .await
        .unwrap();

    let root = TraceContext::new_root();
    let answer: u32 = trace::scope(root, client.call("Api", "Hop", &()))
        .await
        .unwrap();
    assert_eq!(answer, 7);
    let seen = seen.lock().unwrap().clone();
    let (server_span, sent) = seen.forward.expect("forward call seen");
    let sent = TraceContext::parse(&sent).expect("a valid traceparent");
    assert_eq!(sent.trace_id(), root.trace_id(), "the call joins the trace");
    assert_ne!(sent.span_id(), root.span_id(), "as a child span");
    assert_eq!(server_span.trace_id(), root.trace_id());
    assert_ne!(
        server_span.span_id(),
        sent.span_id(),
        "the server has its own span"
    );
    let (device_span, sent_back) = seen.reverse.expect("reverse call seen");
    let sent_back = TraceContext::parse(&sent_back).unwrap();
    assert_eq!(
        sent_back.trace_id(),
        root.trace_id(),
        "the reverse call too"
    );
    assert_eq!(device_span.trace_id(), root.trace_id());

    // Outside any scope a call carries no trace unless the client starts one per call.
    let echo = Server::builder().dev_certificate(&dev).build().unwrap();
    echo.register(
        "Echo",
        Service::new().method("Parent", |ctx: Context, (): ()| async move {
            Ok(ctx.metadata().get(TRACEPARENT).map(str::to_owned))
        }),
    );
    let echo_addr = echo.bind("127.0.0.1:0").await.unwrap().to_string();
    let untraced = client_builder(&dev).connect(&echo_addr).await.unwrap();
    let none: Option<String> = untraced.call("Echo", "Parent", &()).await.unwrap();
    assert_eq!(none, None);
    let traced = client_builder(&dev)
        .trace_calls(true)
        .connect(&echo_addr)
        .await
        .unwrap();
    let a: Option<String> = traced.call("Echo", "Parent", &()).await.unwrap();
    let b: Option<String> = traced.call("Echo", "Parent", &()).await.unwrap();
    let (a, b) = (
        TraceContext::parse(&a.unwrap()).unwrap(),
        TraceContext::parse(&b.unwrap()).unwrap(),
    );
    assert_ne!(a.trace_id(), b.trace_id(), "a new trace per call");
    // A traceparent the caller set itself is sent as it is.
    let mine = TraceContext::new_root().to_string();
    let options = quicx::CallOptions::new().metadata(TRACEPARENT, mine.clone());
    let kept: Option<String> = traced
        .call_with("Echo", "Parent", &(), &options)
        .await
        .unwrap();
    assert_eq!(kept.as_deref(), Some(mine.as_str()));
}

/// Records the error kind of every call that failed.
#[derive(Default)]
struct Kinds(Mutex<Vec<&'static str>>);

impl CallInterceptor for Kinds {
    fn after_call(
        &self,
        _path: &str,
        _method: &str,
        result: Result<(), &Error>,
        _elapsed: std::time::Duration,
    ) {
        if let Err(e) = result {
            self.0.lock().unwrap().push(e.kind());
        }
    }
}

#[tokio::test]
async fn a_call_dropped_by_its_caller_is_reported_as_cancelled() {
    let dev = DevCertificate::localhost().unwrap();
    let server = Server::builder().dev_certificate(&dev).build().unwrap();
    server.register(
        "T",
        Service::new().method("Slow", |_ctx: Context, (): ()| async move {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            Ok(())
        }),
    );
    let addr = server.bind("127.0.0.1:0").await.unwrap().to_string();
    let kinds = Arc::new(Kinds::default());
    let client = client_builder(&dev)
        .call_interceptor(kinds.clone())
        .connect(&addr)
        .await
        .unwrap();
    // The caller gives up before the reply: its future is dropped mid-call.
    let gave_up = tokio::time::timeout(
        std::time::Duration::from_millis(100),
        client.call::<_, ()>("T", "Slow", &()),
    )
    .await;
    assert!(gave_up.is_err());
    assert_eq!(*kinds.0.lock().unwrap(), vec!["cancelled"]);
}
