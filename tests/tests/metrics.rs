//! The Prometheus endpoint serves the named series, with values that match the calls, pushes,
//! connections and refusals made. One test: a process has one global recorder.

use std::time::Duration;

use quicx::{
    Authenticator, Context, DevCertificate, DurableLimits, Error, Hello, Metadata, Refusal, Server,
    Service, ServiceError, push_channel,
};
use quicx_tests::client_builder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /metrics` over plain HTTP/1.1; the body.
async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the series line that starts with `series` (name and labels, exactly as the
/// exporter writes them: labels sorted by key).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn the_metrics_endpoint_serves_the_named_series_with_matching_values() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = listener.local_addr().unwrap();
    drop(listener);
    quicx::metrics::install_prometheus(metrics_addr).unwrap();

    let dev = DevCertificate::localhost().unwrap();
    let store = std::env::temp_dir().join(format!("quicx-metrics-{}", std::process::id()));
    // A store left by an earlier run with the same process id would hold its messages.
    let _ = std::fs::remove_dir_all(&store);
    std::fs::create_dir_all(&store).unwrap();
    let server = Server::builder()
        .dev_certificate(&dev)
        .durable_store(store.join("store.redb"), DurableLimits::default())
        .authenticator(Authenticator::new(|hello: Hello| async move {
            match hello.token.as_deref() {
                Some("good") => Ok(hello.client_id),
                _ => Err(Refusal::Unauthenticated("bad token".into())),
            }
        }))
        .build()
        .unwrap();
    server.register(
        "Arith",
        Service::new()
            .method("Mul", |_ctx: Context, (a, b): (i64, i64)| async move {
                Ok(a * b)
            })
            .method("Fail", |_ctx: Context, (): ()| async move {
                Err::<(), _>(ServiceError::new(1000, "no"))
            }),
    );
    let addr = server.bind("127.0.0.1:0").await.unwrap().to_string();

    let (tx, mut pushes) = push_channel(64);
    let device = client_builder(&dev)
        .client_id("device-1")
        .token("good")
        .push_channel(tx)
        .connect(&addr)
        .await
        .unwrap();
    for i in 0..5 {
        let c: i64 = device.call("Arith", "Mul", &(i, 2)).await.unwrap();
        assert_eq!(c, i * 2);
    }
    for _ in 0..2 {
        let err = device
            .call::<_, ()>("Arith", "Fail", &())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Remote { code: 1000, .. }));
    }
    let err = device
        .call::<_, ()>("Arith", "Nope", &())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownMethod { .. }));
    for _ in 0..3 {
        server
            .send_to_client("device-1", "Device", "Blink", quicx::Metadata::new(), b"on")
            .await
            .unwrap();
    }
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(5), pushes.recv())
            .await
            .unwrap()
            .unwrap();
    }
    // Durable messages: 2 to the connected device (delivered and acknowledged), 3 to one that
    // is away (pending).
    let ttl = Duration::from_secs(600);
    for (who, n) in [("device-1", 2), ("device-9", 3)] {
        for _ in 0..n {
            server
                .send_durable(who, "Device", "Run", Metadata::new(), [0u8; 100], ttl)
                .await
                .unwrap();
        }
    }
    for _ in 0..2 {
        let msg = tokio::time::timeout(Duration::from_secs(5), pushes.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(msg.durable_id().is_some());
    }
    let refused = client_builder(&dev)
        .client_id("device-2")
        .token("bad")
        .connect(&addr)
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::Unauthenticated(_)), "{refused:?}");

    // The refused client's connection closes on its own; wait until the gauge shows one.
    let mut text = String::new();
    for _ in 0..100 {
        text = scrape(metrics_addr).await;
        if value(&text, "quicx_server_connections") == Some(1.0)
            && value(&text, "quicx_durable_delivered_total") == Some(2.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expect = |series: &str, want: f64| {
        assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
    };
    expect(
        r#"quicx_server_calls_total{service="Arith",method="Mul",status="ok"}"#,
        5.0,
    );
    expect(
        r#"quicx_server_calls_total{service="Arith",method="Fail",status="application"}"#,
        2.0,
    );
    expect(
        r#"quicx_server_call_duration_seconds_count{service="Arith",method="Mul"}"#,
        5.0,
    );
    expect("quicx_server_connections", 1.0);
    expect(r#"quicx_handshakes_total{result="ok"}"#, 2.0);
    expect("quicx_auth_failures_total", 1.0);
    expect(r#"quicx_pushes_total{result="ok"}"#, 3.0);
    expect(
        r#"quicx_client_calls_total{service="Arith",method="Mul",status="ok"}"#,
        5.0,
    );
    expect(
        r#"quicx_client_calls_total{service="Arith",method="Fail",status="remote"}"#,
        2.0,
    );
    expect(
        r#"quicx_client_calls_total{service="Arith",method="Nope",status="unknown_method"}"#,
        1.0,
    );
    expect(
        r#"quicx_client_call_duration_seconds_count{service="Arith",method="Mul"}"#,
        5.0,
    );
    expect(r#"quicx_client_handshakes_total{result="ok"}"#, 1.0);
    expect(r#"quicx_client_handshakes_total{result="failed"}"#, 1.0);
    expect("quicx_client_connections", 1.0);
    expect("quicx_client_pushes_received_total", 5.0);
    expect("quicx_durable_pending", 3.0);
    expect("quicx_durable_pending_identities", 1.0);
    expect("quicx_durable_delivered_total", 2.0);
    let stats = server.stats();
    assert_eq!(stats.durable_pending_identities, 1);
    assert!(stats.durable_pending_bytes >= 300, "{stats:?}");
    expect(
        "quicx_durable_pending_bytes",
        stats.durable_pending_bytes as f64,
    );
    assert!(
        text.contains("# TYPE quicx_server_call_duration_seconds histogram"),
        "{text}"
    );
    assert!(
        !text.contains(r#"quicx_server_calls_total{service="Arith",method="Nope""#),
        "an unknown method gets no server series: {text}"
    );
    device.close().await;
    server.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&store);

    // A full server moves no one: a new connection that reaches the busier of two I/O threads
    // would be sent a Retry to the other (`quicx_handshakes_total{result="moved"}`), but with
    // the server full it is refused where it arrived, without the client waiting a round trip
    // for that. Of 8 clients, each would be moved with even odds.
    let full = Server::builder()
        .dev_certificate(&dev)
        .io_threads(2)
        .max_connections(1)
        .build()
        .unwrap();
    let addr = full.bind("127.0.0.1:0").await.unwrap().to_string();
    let counted = |text: &str, result: &str| {
        value(
            text,
            &format!(r#"quicx_handshakes_total{{result="{result}"}}"#),
        )
        .unwrap_or(0.0)
    };
    let before = scrape(metrics_addr).await;
    let first = client_builder(&dev).connect(&addr).await.unwrap();
    for _ in 0..8 {
        let refused = client_builder(&dev)
            .reconnect(false)
            .connect(&addr)
            .await
            .unwrap_err();
        assert!(matches!(refused, Error::Handshake(_)), "{refused:?}");
    }
    let after = scrape(metrics_addr).await;
    assert_eq!(
        counted(&after, "refused") - counted(&before, "refused"),
        8.0
    );
    assert_eq!(
        counted(&after, "moved"),
        counted(&before, "moved"),
        "a full server moved a client: {after}"
    );
    first.close().await;
    full.shutdown(Duration::from_secs(1)).await;
}
