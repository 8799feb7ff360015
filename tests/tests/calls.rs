//! Calls end to end: round trips, concurrency, typed errors, limits, timeouts, cancellation,
//! malformed input, TLS refusals, shutdown and oneway calls. Real QUIC on 127.0.0.1.

use std::{sync::atomic::Ordering, time::Duration};

use quicx::{
    ALPN, CallOptions, ClientTls, Codec, Error, FramePart, Limits, StreamCode, TransportOptions,
};
use quicx_tests::{Args, DIVIDE_BY_ZERO, Reply, raw_connection, start_server, start_server_with};

#[tokio::test]
async fn call_round_trip() {
    let t = start_server().await;
    let client = t.client().connect(&t.address()).await.unwrap();
    let reply: Reply = client
        .call("Arith", "Mul", &Args { a: 10, b: 20 })
        .await
        .unwrap();
    assert_eq!(reply, Reply { c: 200 });
    assert_eq!(t.server.stats().calls_served, 1);
    client.close().await;
}

#[tokio::test]
async fn metadata_travels_both_ways_and_json_codec_works() {
    let t = start_server().await;
    let client = t.client().connect(&t.address()).await.unwrap();
    let opts = CallOptions::new().metadata("tenant", "acme");
    let value: Option<String> = client
        .call_with("Arith", "Meta", "tenant", &opts)
        .await
        .unwrap();
    assert_eq!(value.as_deref(), Some("acme"));
    let raw = client
        .call_raw(
            "Arith",
            "Meta",
            &quicx::Codec::Postcard.encode("tenant").unwrap(),
            &opts,
        )
        .await
        .unwrap();
    assert_eq!(raw.metadata.get("seen"), Some("yes"));
    let json = CallOptions::new().codec(Codec::Json);
    let reply: Reply = client
        .call_with("Arith", "Mul", &Args { a: 6, b: 7 }, &json)
        .await
        .unwrap();
    assert_eq!(reply.c, 42);
}

#[tokio::test]
async fn thousand_concurrent_calls_on_one_connection() {
    let t = start_server().await;
    let client = t.client().connect(&t.address()).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000i64 {
        let client = client.clone();
        tasks.spawn(async move {
            let reply: Reply = client.call("Arith", "Mul", &Args { a: i, b: 3 }).await?;
            Ok::<_, Error>((i, reply.c))
        });
    }
    let mut done = 0;
    while let Some(result) = tasks.join_next().await {
        let (i, c) = result.unwrap().unwrap();
        assert_eq!(c, i * 3);
        done += 1;
    }
    assert_eq!(done, 1000);
    assert_eq!(
        t.server.connections().len(),
        1,
        "all calls shared one connection"
    );
}

#[tokio::test]
async fn unknown_service_and_method_are_typed() {
    let t = start_server().await;
    let client = t.client().connect(&t.address()).await.unwrap();
    let err = client
        .call::<_, Reply>("Nope", "Mul", &Args { a: 1, b: 2 })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::UnknownService { service_path } if service_path == "Nope"),
        "{err:?}"
    );
    let err = client
        .call::<_, Reply>("Arith", "Pow", &Args { a: 1, b: 2 })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::UnknownMethod { service_method, .. } if service_method == "Pow"),
        "{err:?}"
    );
}

#[tokio::test]
async fn undecodable_arguments_are_a_decode_error() {
    let t = start_server().await;
    let client = t.client().connect(&t.address()).await.unwrap();
    // Mul expects two varints; one byte with the continuation bit set cannot decode.
    let err = client
        .call_raw("Arith", "Mul", &[0xff], &CallOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Decode(_)), "{err:?}");
}

#[tokio::test]
async fn oversized_request_is_typed_and_connection_keeps_serving() {
    let small = Limits {
        max_header_size: 1024,
        max_payload_size: 1024,
    };
    let t = start_server_with(|b| b.transport(TransportOptions::default().limits(small))).await;
    // The client allows more than the server, so the server's own check is exercised.
    let client = t.client().connect(&t.address()).await.unwrap();
    let big = vec![7u8; 64 * 1024];
    let err = client
        .call_raw("Arith", "Echo", &big, &CallOptions::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                what: FramePart::Payload,
                ..
            }
        ),
        "{err:?}"
    );
    // An oversized header (metadata) too.
    let opts = CallOptions::new().metadata("k", "v".repeat(4096));
    let err = client
        .call_raw("Arith", "Echo", b"x", &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                what: FramePart::Header,
                ..
            }
        ),
        "{err:?}"
    );
    // Same connection, still serving.
    let reply: Reply = client
        .call("Arith", "Mul", &Args { a: 2, b: 3 })
        .await
        .unwrap();
    assert_eq!(reply.c, 6);
    assert_eq!(t.server.connections().len(), 1);

    // The client checks its own limit before sending anything.
    let strict = t
        .client()
        .transport(TransportOptions::default().limits(small))
        .connect(&t.address())
        .await
        .unwrap();
    let err = strict
        .call_raw("Arith", "Echo", &big, &CallOptions::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                what: FramePart::Payload,
                limit: Some(1024)
            }
        ),
        "{err:?}"
    );
}

/// A remote that gives up before the caller's deadline (a deadline of its own) is reported as
/// the remote's, and the caller's timeout travels rounded up to whole milliseconds. Played by a
/// hand-written server that answers DEADLINE_EXCEEDED at once.
#[tokio::test]
async fn a_remote_deadline_before_the_callers_is_the_remotes() {
    let dev = quicx::DevCertificate::localhost().unwrap();
    let endpoint = quicx_tests::raw_server(&dev, &[quicx::ALPN_V2, ALPN]);
    let addr = endpoint.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let request = recv.read_to_end(1 << 16).await.unwrap();
        // kind, header_len, then "Arith", "Sleep", 0 metadata pairs, and timeout_ms.
        let at = 5 + 1 + usize::from(request[5]);
        let at = at + 1 + usize::from(request[at]) + 1;
        let timeout_ms = u64::from(request[at] & 0x7f) | u64::from(request[at + 1]) << 7;
        // RESPONSE, header_len 6: status Error { code 5 (DEADLINE_EXCEEDED), "dl" }, no
        // metadata.
        send.write_all(&[0x02, 0, 0, 0, 6, 0x01, 0x05, 0x02, b'd', b'l', 0x00])
            .await
            .unwrap();
        send.finish().unwrap();
        let _ = conn.closed().await;
        timeout_ms
    });
    let client = quicx::Client::builder()
        .tls(ClientTls::new().trust(dev.certificate()))
        .connect_addr(addr, "localhost")
        .await
        .unwrap();
    let opts = CallOptions::new().timeout(Duration::from_micros(1_500_300));
    let err = client
        .call_with::<_, u64>("Arith", "Sleep", &10_000u64, &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::DeadlineExceeded { remote: true }),
        "{err:?}"
    );
    client.close().await;
    assert_eq!(server.await.unwrap(), 1_501);
}

#[tokio::test]
async fn handler_error_reaches_caller_with_code_and_message() {
    let t = start_server().await;
    let client = t.client().connect(&t.address()).await.unwrap();
    let err = client
        .call::<_, Reply>("Arith", "Div", &Args { a: 1, b: 0 })
        .await
        .unwrap_err();
    match err {
        Error::Remote { code, message } => {
            assert_eq!(code, DIVIDE_BY_ZERO);
            assert_eq!(message, "divide by zero");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    let err = client
        .call::<_, ()>("Arith", "Panic", &())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Internal(m) if m.contains("boom")),
        "{err:?}"
    );
    // The server survived the panic.
    let reply: Reply = client
        .call("Arith", "Div", &Args { a: 9, b: 3 })
        .await
        .unwrap();
    assert_eq!(reply.c, 3);
}

#[tokio::test]
async fn client_timeout_cancels_the_server_handler() {
    let t = start_server().await;
    let client = t.client().connect(&t.address()).await.unwrap();
    let opts = CallOptions::new().timeout(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let err = client
        .call_with::<_, u64>("Arith", "Sleep", &10_000u64, &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::DeadlineExceeded { remote: false }),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // The handler sees the cancellation shortly after.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while t.observed.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "handler never cancelled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(t.observed.finished.load(Ordering::SeqCst), 0);
    // Dropping a call future cancels the handler too.
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call::<_, u64>("Arith", "Sleep", &10_000u64).await }
    });
    t.until_sleeping(2).await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while t.observed.cancelled.load(Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "dropped call not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reply: u64 = client.call("Arith", "Sleep", &1u64).await.unwrap();
    assert_eq!(reply, 1);
}

async fn expect_reset(conn: &quinn::Connection, bytes: &[u8], expected: u64) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    match recv.read_to_end(1024).await {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            assert_eq!(code.into_inner(), expected, "reset code for {bytes:02x?}");
        }
        other => panic!("expected a reset for {bytes:02x?}, got {other:?}"),
    }
}

#[tokio::test]
async fn garbage_and_truncated_frames_are_reset_and_server_keeps_serving() {
    let t = start_server().await;
    let raw = raw_connection(t.addr, &t.dev, ALPN).await.unwrap();
    // Unknown frame kind.
    expect_reset(
        &raw,
        b"\xde\xad\xbe\xef garbage",
        StreamCode::MALFORMED_FRAME.value(),
    )
    .await;
    // Truncated prefix.
    expect_reset(&raw, &[0x01, 0x00], StreamCode::MALFORMED_FRAME.value()).await;
    // Header announced longer than what follows.
    expect_reset(
        &raw,
        &[0x01, 0, 0, 0, 40, 5, b'A'],
        StreamCode::MALFORMED_FRAME.value(),
    )
    .await;
    // Header that is not a valid request header.
    expect_reset(
        &raw,
        &[0x01, 0, 0, 0, 3, 0xff, 0xff, 0xff],
        StreamCode::MALFORMED_FRAME.value(),
    )
    .await;
    // Header length above the limit: rejected before reading it.
    expect_reset(
        &raw,
        &[0x01, 0xff, 0xff, 0xff, 0xff],
        StreamCode::HEADER_TOO_LARGE.value(),
    )
    .await;
    // A response frame where a request belongs.
    expect_reset(
        &raw,
        &[0x02, 0, 0, 0, 2, 0, 0],
        StreamCode::UNEXPECTED_STREAM.value(),
    )
    .await;
    // The server also refuses unidirectional streams from clients: it grants none.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), raw.open_uni())
            .await
            .is_err()
    );
    // The same raw connection still gets answers to a well-formed request.
    let request = [
        0x01, 0, 0, 0, 0x0e, 0x05, b'A', b'r', b'i', b't', b'h', 0x03, b'M', b'u', b'l', 0, 0, 0,
        0, 0x14, 0x28,
    ];
    let (mut send, mut recv) = raw.open_bi().await.unwrap();
    send.write_all(&request).await.unwrap();
    send.finish().unwrap();
    let response = recv.read_to_end(1024).await.unwrap();
    assert_eq!(response, [0x02, 0, 0, 0, 2, 0x00, 0x00, 0x90, 0x03]);
    // And other clients are served.
    let client = t.client().connect(&t.address()).await.unwrap();
    let reply: Reply = client
        .call("Arith", "Mul", &Args { a: 10, b: 20 })
        .await
        .unwrap();
    assert_eq!(reply.c, 200);
}

#[tokio::test]
async fn another_alpn_is_refused() {
    let t = start_server().await;
    let err = raw_connection(t.addr, &t.dev, b"h3").await.unwrap_err();
    assert!(
        err.to_string().contains("no_application_protocol")
            || err.to_string().contains("120")
            || err.to_string().contains("0x178"),
        "{err}"
    );
    // Through quicx's own client the refusal is a typed handshake error.
    let err = t
        .client()
        .tls(
            ClientTls::empty()
                .trust(t.dev.certificate())
                .with_alpn(vec![b"h3".to_vec()]),
        )
        .connect(&t.address())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Handshake(_)), "{err:?}");
}

#[tokio::test]
async fn untrusted_certificate_is_refused() {
    let t = start_server().await;
    // Trusts the Mozilla roots only: the dev certificate is not among them.
    let err = quicx::Client::builder()
        .server_name("localhost")
        .connect(&t.address())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Handshake(_)), "{err:?}");
    // Trusts a different self-signed certificate.
    let other = quicx::DevCertificate::localhost().unwrap();
    let err = quicx::Client::builder()
        .tls(ClientTls::empty().trust(other.certificate()))
        .server_name("localhost")
        .connect(&t.address())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Handshake(_)), "{err:?}");
    // The right certificate but the wrong name.
    let err = t
        .client()
        .server_name("example.com")
        .connect(&t.address())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Handshake(_)), "{err:?}");
    // The explicitly insecure opt-out connects.
    let insecure = quicx::Client::builder()
        .tls(ClientTls::insecure_skip_server_verification())
        .server_name("localhost")
        .connect(&t.address())
        .await
        .unwrap();
    let reply: Reply = insecure
        .call("Arith", "Mul", &Args { a: 1, b: 1 })
        .await
        .unwrap();
    assert_eq!(reply.c, 1);
}

#[tokio::test]
async fn graceful_shutdown_drains_in_flight_and_refuses_new() {
    let t = start_server().await;
    let client = t
        .client()
        .reconnect(false)
        .connect(&t.address())
        .await
        .unwrap();
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, u64>("Arith", "Sleep", &300u64).await })
    };
    t.until_sleeping(1).await;
    let server = t.server.clone();
    let shutdown = tokio::spawn(async move { server.shutdown(Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A new call on the open connection is refused while draining.
    let err = client
        .call::<_, Reply>("Arith", "Mul", &Args { a: 1, b: 2 })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ShuttingDown), "{err:?}");
    // The in-flight call finishes.
    assert_eq!(in_flight.await.unwrap().unwrap(), 300);
    assert!(shutdown.await.unwrap(), "drained within the deadline");
    // New connections are refused (or, once the socket is gone, never answered).
    let err = t
        .client()
        .connect_timeout(Duration::from_millis(500))
        .connect(&t.address())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Handshake(_) | Error::ConnectTimeout(_)),
        "{err:?}"
    );
}

#[tokio::test]
async fn shutdown_deadline_cancels_stragglers() {
    let t = start_server().await;
    let client = t
        .client()
        .reconnect(false)
        .connect(&t.address())
        .await
        .unwrap();
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, u64>("Arith", "Sleep", &60_000u64).await })
    };
    t.until_sleeping(1).await;
    assert!(!t.server.shutdown(Duration::from_millis(100)).await);
    let err = slow.await.unwrap().unwrap_err();
    assert!(
        matches!(err, Error::ShuttingDown | Error::ConnectionLost(_)),
        "{err:?}"
    );
    assert_eq!(t.observed.cancelled.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn oneway_runs_the_handler_without_reply() {
    let mut t = start_server().await;
    let client = t.client().connect(&t.address()).await.unwrap();
    client.oneway("Arith", "Log", "hello").await.unwrap();
    let line = tokio::time::timeout(Duration::from_secs(5), t.logs.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line, "hello");
    // A oneway call to an unknown method returns Ok: no reply, not even an error, comes back.
    client.oneway("Arith", "Nope", "x").await.unwrap();
}

#[tokio::test]
async fn mutual_tls_identity_reaches_the_handler() {
    let ca = quicx::DevCertificateAuthority::generate("quicx test CA").unwrap();
    let server_cert = ca.issue("server", ["localhost"]).unwrap();
    let device_cert = ca.issue("device-42", Vec::<String>::new()).unwrap();
    let server = quicx::Server::builder()
        .tls(
            quicx::ServerTls::from_dev(&server_cert)
                .require_client_certificates(vec![ca.certificate()]),
        )
        .build()
        .unwrap();
    server.register(
        "Who",
        quicx::Service::new().method("AmI", |ctx: quicx::Context, (): ()| async move {
            Ok(ctx
                .conn()
                .peer_identity()
                .and_then(|p| p.common_name.clone()))
        }),
    );
    let addr = server.bind("127.0.0.1:0").await.unwrap().to_string();
    let client = quicx::Client::builder()
        .tls(
            ClientTls::empty()
                .trust(ca.certificate())
                .client_dev_certificate(&device_cert),
        )
        .server_name("localhost")
        .connect(&addr)
        .await
        .unwrap();
    let name: Option<String> = client.call("Who", "AmI", &()).await.unwrap();
    assert_eq!(name.as_deref(), Some("device-42"));
    assert!(
        server.client("device-42").is_some(),
        "certificate name bound as identity"
    );
    // Without a client certificate the handshake fails.
    let anonymous = quicx::Client::builder()
        .tls(ClientTls::empty().trust(ca.certificate()))
        .server_name("localhost")
        .reconnect(false)
        .connect(&addr)
        .await;
    match anonymous {
        Err(e) => assert!(matches!(e, Error::Handshake(_)), "{e:?}"),
        // TLS 1.3: the client may finish its side before the server rejects its certificate.
        Ok(c) => {
            let err = c
                .call::<_, Option<String>>("Who", "AmI", &())
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Handshake(_) | Error::ConnectionLost(_) | Error::NotConnected(_)
                ),
                "{err:?}"
            );
        }
    }
}

#[tokio::test]
async fn connection_limit_refuses_at_the_handshake() {
    let t = start_server_with(|b| b.max_connections(1)).await;
    let first = t.client().connect(&t.address()).await.unwrap();
    let err = t
        .client()
        .reconnect(false)
        .connect(&t.address())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Handshake(_)), "{err:?}");
    let reply: Reply = first
        .call("Arith", "Mul", &Args { a: 2, b: 2 })
        .await
        .unwrap();
    assert_eq!(reply.c, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_placement_serves_calls_and_pushes() {
    use quicx::Placement;
    for server_placement in [
        Placement::Auto,
        Placement::CallerRuntime,
        Placement::IoThread,
    ] {
        let t = start_server_with(|b| b.placement(server_placement)).await;
        for client_placement in [
            Placement::Auto,
            Placement::CallerRuntime,
            Placement::IoThread,
        ] {
            let (tx, mut rx) = quicx::push_channel(4);
            let client = t
                .client()
                .placement(client_placement)
                .client_id("placed")
                .push_channel(tx)
                .connect(&t.address())
                .await
                .unwrap();
            let reply: Reply = client
                .call("Arith", "Mul", &Args { a: 6, b: 7 })
                .await
                .unwrap();
            assert_eq!(reply.c, 42, "{server_placement:?}/{client_placement:?}");
            t.server
                .send_to_client("placed", "p", "m", quicx::Metadata::new(), b"x")
                .await
                .unwrap();
            let msg = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap();
            assert_eq!(&msg.unwrap().payload[..], b"x");
            client.close().await;
        }
        t.server.shutdown(Duration::from_secs(1)).await;
    }
}
