//! Server push, identity, broadcast, lifecycle and reverse calls, end to end on loopback.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use quicx::{
    ClientEvent, Context, DisconnectReason, Error, FullPolicy, Metadata, ServerEvent, Service,
    TransportOptions, push_channel, push_channel_with,
};
use quicx_tests::{Args, Reply, TestServer, start_server, start_server_with};
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(5);

async fn next_server_event(
    events: &mut broadcast::Receiver<ServerEvent>,
    mut pick: impl FnMut(&ServerEvent) -> bool,
) -> ServerEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            let event = events.recv().await.expect("event stream open");
            if pick(&event) {
                return event;
            }
        }
    })
    .await
    .expect("event within the wait")
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Connects a device client with identity `id` pushing into `tx` and allowing the server
/// `max_pushes` push streams at once; returns the client and the server's handle to it.
async fn device(
    t: &TestServer,
    id: &str,
    tx: quicx::PushSender,
    max_pushes: u32,
) -> (quicx::Client, quicx::Connection) {
    let transport = TransportOptions {
        max_concurrent_pushes: max_pushes,
        ..TransportOptions::default()
    };
    let client = t
        .client()
        .transport(transport)
        .client_id(id)
        .push_channel(tx)
        .connect(&t.address())
        .await
        .unwrap();
    let conn = t.server.client(id).expect("bound by the hello");
    (client, conn)
}

#[tokio::test]
async fn push_round_trip_with_metadata_before_any_call() {
    let t = start_server().await;
    let (tx, mut rx) = push_channel(8);
    let client = t
        .client()
        .client_id("dev-a")
        .push_channel(tx)
        .connect(&t.address())
        .await
        .unwrap();
    // No call has been made: the push must still arrive.
    let conn = t.server.client("dev-a").expect("bound by the hello");
    let md = Metadata::new().with("priority", "high");
    t.server
        .send_message(
            &conn,
            "test_service_path",
            "test_service_method",
            md.clone(),
            b"abcde",
        )
        .await
        .unwrap();
    let msg = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.service_path, "test_service_path");
    assert_eq!(msg.service_method, "test_service_method");
    assert_eq!(msg.metadata, md);
    assert_eq!(&msg.payload[..], b"abcde");
    assert_eq!(msg.server, t.addr, "tagged with its origin");
    // Typed payloads and receipts.
    conn.send_message_typed("p", "typed", Metadata::new(), &Args { a: 1, b: 2 })
        .await
        .unwrap();
    let typed: Args = rx.recv().await.unwrap().decode().unwrap();
    assert_eq!(typed, Args { a: 1, b: 2 });
    conn.send_message_with_receipt("p", "receipt", Metadata::new(), b"r")
        .await
        .unwrap();
    assert_eq!(
        rx.try_recv().unwrap().service_method,
        "receipt",
        "in the channel on return"
    );
    assert_eq!(t.server.stats().pushes_sent, 2);
    client.close().await;
}

/// A push handler sees every push once, in order, without a channel.
#[tokio::test]
async fn a_push_handler_sees_ten_thousand_pushes_once_in_order() {
    let t = start_server().await;
    let (done_tx, done) = tokio::sync::oneshot::channel();
    // (next expected, where to say it is over: the first wrong number, or None when all came)
    let state = std::sync::Mutex::new((0u32, Some(done_tx)));
    const N: u32 = 10_000;
    let handler = quicx::push_handler(move |msg| {
        let mut state = state.lock().unwrap();
        let n = u32::from_be_bytes(msg.payload[..].try_into().unwrap());
        if n != state.0 {
            let _ = state.1.take().map(|tx| tx.send(Some((state.0, n))));
            return;
        }
        state.0 += 1;
        if state.0 == N {
            let _ = state.1.take().map(|tx| tx.send(None));
        }
    });
    let (_client, conn) = device(&t, "dev-handler", handler, 1024).await;
    for i in 0..N {
        conn.send_message("seq", "n", Metadata::new(), i.to_be_bytes())
            .await
            .unwrap();
    }
    let wrong = tokio::time::timeout(WAIT, done)
        .await
        .expect("every push within the wait")
        .expect("the handler saw the end");
    assert_eq!(wrong, None, "(expected, got): exactly once, in order");
}

/// A handler that pushes in a loop runs on the I/O thread that drives its connection, and so
/// does the connection's driver, which sends the pushes. QUIC takes each push at once, so only
/// the push itself can make the loop yield: each uses a unit of tokio's cooperative budget, and
/// a task spawned on that thread runs after at most 128 of them, not after the whole loop.
#[tokio::test]
async fn a_push_loop_on_the_connections_thread_yields_to_it_every_128_pushes() {
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
    const N: u32 = 500;
    let t = start_server().await;
    t.server.register(
        "Loop",
        Service::new().method("Push", |ctx: Context, n: u32| async move {
            let sent = Arc::new(AtomicU32::new(0));
            let seen = Arc::new(AtomicU32::new(u32::MAX));
            // Runs on the handler's thread once the handler yields; records how far it got.
            tokio::spawn({
                let (sent, seen) = (sent.clone(), seen.clone());
                async move { seen.store(sent.load(Relaxed), Relaxed) }
            });
            for i in 0..n {
                ctx.conn()
                    .send_message("loop", "n", Metadata::new(), i.to_be_bytes())
                    .await?;
                sent.fetch_add(1, Relaxed);
            }
            Ok(seen.load(Relaxed))
        }),
    );
    // The client grants streams for all of them from the start, so no push waits for QUIC
    // (which would yield without the budget); its channel holds them all.
    let transport = TransportOptions::default()
        .initial_concurrent_pushes(N)
        .max_concurrent_pushes(N);
    let (tx, mut rx) = push_channel(N as usize);
    let client = t
        .client()
        .transport(transport)
        .push_channel(tx)
        .connect(&t.address())
        .await
        .unwrap();
    let seen: u32 = client.call("Loop", "Push", &N).await.unwrap();
    assert!(
        (1..=128).contains(&seen),
        "the spawned task ran after {seen} pushes (u32::MAX: only after the loop)"
    );
    for i in 0..N {
        let msg = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("every push within the wait")
            .expect("channel open");
        assert_eq!(msg.payload[..], i.to_be_bytes(), "exactly once, in order");
    }
}

#[tokio::test]
async fn ten_thousand_pushes_arrive_exactly_once_in_order() {
    let t = start_server().await;
    let (tx, mut rx) = push_channel(256);
    let (_client, conn) = device(&t, "dev-order", tx, 1024).await;
    const N: u32 = 10_000;
    let sender = tokio::spawn(async move {
        for i in 0..N {
            conn.send_message("seq", "n", Metadata::new(), i.to_be_bytes())
                .await
                .unwrap();
        }
    });
    let mut next = 0u32;
    while next < N {
        let msg = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("pushes keep coming")
            .unwrap();
        let n = u32::from_be_bytes(msg.payload[..].try_into().unwrap());
        assert_eq!(n, next, "exactly once, in order");
        next += 1;
    }
    sender.await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(rx.try_recv().is_none(), "no duplicates");
    assert_eq!(rx.dropped(), 0);
}

/// An application task writes its push stream itself (no hand-over to the I/O thread that drives
/// the connection), with the push timer on that I/O thread: a push from a runtime without timers
/// (or from a thread of no runtime) still times out with its typed error instead of panicking.
#[tokio::test]
async fn a_push_from_a_runtime_without_timers_times_out_cleanly() {
    let t = start_server_with(|b| b.push_timeout(Duration::from_millis(300))).await;
    let (tx, _rx) = push_channel(4);
    let (_client, conn) = device(&t, "timerless", tx, 8).await;
    let (sent, err) = tokio::task::spawn_blocking(move || {
        // No `enable_time`: `tokio::time::sleep` would panic on this runtime.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut sent = 0u32;
            loop {
                match conn
                    .send_message("p", "m", Metadata::new(), sent.to_be_bytes())
                    .await
                {
                    Ok(()) => sent += 1,
                    Err(e) => break (sent, e),
                }
                assert!(sent < 1000, "backpressure never reached the server");
            }
        })
    })
    .await
    .unwrap();
    assert!(matches!(err, Error::PushTimeout(_)), "{err:?}");
    assert!(sent >= 4, "the channel's capacity went through ({sent})");
}

#[tokio::test]
async fn full_channel_backpressure_loses_nothing_and_push_times_out() {
    let t = start_server_with(|b| b.push_timeout(Duration::from_millis(300))).await;
    let (tx, mut rx) = push_channel(4);
    let (_client, conn) = device(&t, "slow", tx, 8).await;
    // Nobody reads: push until the server's push times out.
    let mut sent = 0u32;
    let err = loop {
        match conn
            .send_message("p", "m", Metadata::new(), sent.to_be_bytes())
            .await
        {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 1000, "backpressure never reached the server");
    };
    assert!(matches!(err, Error::PushTimeout(_)), "{err:?}");
    assert!(
        sent >= 4,
        "at least the channel's capacity went through ({sent})"
    );
    // Now read: every push the server handed to QUIC arrives, in order, none lost.
    for i in 0..sent {
        let msg = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(u32::from_be_bytes(msg.payload[..].try_into().unwrap()), i);
    }
    assert_eq!(rx.dropped(), 0);
    // The timed-out push was reset, so its partial frame never shows up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_none());
    // And the connection pushes again once there is room.
    conn.send_message("p", "m", Metadata::new(), b"again")
        .await
        .unwrap();
    assert_eq!(&rx.recv().await.unwrap().payload[..], b"again");
}

#[tokio::test]
async fn drop_policy_counts_drops() {
    let t = start_server().await;
    let (tx, mut rx) = push_channel_with(2, FullPolicy::Drop);
    let (_client, conn) = device(&t, "dropper", tx, 1024).await;
    for i in 0..10u8 {
        conn.send_message("p", "m", Metadata::new(), [i])
            .await
            .unwrap();
    }
    wait_until("all 10 pushes are accounted for", || {
        rx.delivered() + rx.dropped() == 10
    })
    .await;
    assert_eq!(rx.delivered(), 2);
    assert_eq!(rx.dropped(), 8);
    // A push with receipt learns that it was dropped.
    let err = conn
        .send_message_with_receipt("p", "m", Metadata::new(), b"r")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PushDropped), "{err:?}");
    assert_eq!(rx.dropped(), 9);
    assert_eq!(&rx.recv().await.unwrap().payload[..], &[0]);
}

#[tokio::test]
async fn slow_push_consumer_does_not_slow_calls() {
    let t = start_server_with(|b| b.push_timeout(Duration::from_secs(30))).await;
    let (tx, rx) = push_channel(1);
    let (client, conn) = device(&t, "busy", tx, 2).await;
    // Fill the channel and the stream credit; the pusher is now stuck on backpressure.
    let pusher = tokio::spawn(async move {
        for i in 0..100u32 {
            if conn
                .send_message("p", "m", Metadata::new(), i.to_be_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    wait_until("the push channel is full", || rx.len() == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !pusher.is_finished(),
        "the pusher is blocked by backpressure"
    );
    // Calls on the same connection complete while pushes are blocked.
    let started = Instant::now();
    for i in 0..200 {
        let reply: Reply = client
            .call("Arith", "Mul", &Args { a: i, b: 2 })
            .await
            .unwrap();
        assert_eq!(reply.c, i * 2);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "calls were held up: {:?}",
        started.elapsed()
    );
    assert_eq!(rx.len(), 1, "the channel stayed full throughout");
    pusher.abort();
}

/// Runs only as the child process of `push_to_killed_client_fails_and_registry_drops_it`.
#[tokio::test]
#[ignore = "helper: runs as a child process"]
async fn child_client_process() {
    let (Ok(addr), Ok(cert)) = (
        std::env::var("QUICX_CHILD_ADDR"),
        std::env::var("QUICX_CHILD_CERT"),
    ) else {
        return;
    };
    let path = std::env::temp_dir().join(format!("quicx-child-{}.pem", std::process::id()));
    std::fs::write(&path, cert).unwrap();
    let (tx, _rx) = push_channel(8);
    let _client = quicx::Client::builder()
        .tls(quicx::ClientTls::empty().trust_pem_file(&path).unwrap())
        .server_name("localhost")
        .client_id("doomed")
        .push_channel(tx)
        .connect(&addr)
        .await
        .unwrap();
    println!("CONNECTED");
    tokio::time::sleep(Duration::from_secs(60)).await;
}

#[tokio::test]
async fn push_to_killed_client_fails_and_registry_drops_it() {
    let idle = Duration::from_secs(2);
    let t = start_server_with(|b| {
        b.transport(
            TransportOptions::default()
                .idle_timeout(idle)
                .keep_alive_interval(Some(Duration::from_millis(500))),
        )
    })
    .await;
    let mut events = t.server.events();
    let mut child = quicx_tests::child::test_child(
        "child_client_process",
        &[
            ("QUICX_CHILD_ADDR", t.address()),
            ("QUICX_CHILD_CERT", t.dev.certificate_pem().to_owned()),
        ],
        "CONNECTED",
    )
    .await;
    let conn = t.server.client("doomed").expect("child bound its id");
    child.kill().await.unwrap();
    let killed = Instant::now();
    let ServerEvent::Disconnected { reason, .. } = next_server_event(
        &mut events,
        |e| matches!(e, ServerEvent::Disconnected { conn: c, .. } if *c == conn),
    )
    .await
    else {
        unreachable!()
    };
    let noticed = killed.elapsed();
    assert_eq!(reason, DisconnectReason::IdleTimeout);
    assert!(
        noticed <= idle + Duration::from_secs(2),
        "noticed after {noticed:?}"
    );
    assert!(t.server.client("doomed").is_none(), "left the registry");
    assert!(t.server.connection(conn.id()).is_none());
    let started = Instant::now();
    let err = t
        .server
        .send_message(&conn, "p", "m", Metadata::new(), b"x")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ConnectionLost(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(100), "fails fast");
    let err = t
        .server
        .send_to_client("doomed", "p", "m", Metadata::new(), b"x")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotConnected(_)), "{err:?}");
}

/// A raw QUIC client that speaks quicx/1 but grants the server no unidirectional streams: it
/// never reads a push.
async fn deaf_client(t: &TestServer) -> quinn::Connection {
    quicx_tests::raw_connection(t.addr, &t.dev, quicx::ALPN)
        .await
        .unwrap()
}

#[tokio::test]
async fn broadcast_to_100_clients_one_never_reads() {
    let t = start_server().await;
    let mut receivers = Vec::new();
    let mut clients = Vec::new();
    for i in 0..99 {
        let (tx, rx) = push_channel(4);
        clients.push(
            t.client()
                .client_id(format!("dev-{i}"))
                .push_channel(tx)
                .connect(&t.address())
                .await
                .unwrap(),
        );
        receivers.push(rx);
    }
    let _deaf = deaf_client(&t).await;
    wait_until("100 clients are registered", || {
        t.server.connections().len() == 100
    })
    .await;
    let timeout = Duration::from_millis(500);
    let started = Instant::now();
    let results = t
        .server
        .broadcast("news", "flash", Metadata::new(), b"hello all", timeout)
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(results.len(), 100);
    let failed: Vec<_> = results.iter().filter(|r| r.result.is_err()).collect();
    assert_eq!(failed.len(), 1, "only the deaf client fails");
    assert!(failed[0].conn.client_id().is_none());
    assert!(matches!(failed[0].result, Err(Error::PushTimeout(_))));
    assert!(took < timeout + Duration::from_millis(500), "took {took:?}");
    for rx in &mut receivers {
        let msg = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&msg.payload[..], b"hello all");
    }
    // broadcast_to a chosen set.
    let chosen: Vec<_> = ["dev-1", "dev-2"]
        .iter()
        .map(|id| t.server.client(id).unwrap())
        .collect();
    let results = t
        .server
        .broadcast_to(chosen, "news", "two", Metadata::new(), b"2", timeout)
        .await
        .unwrap();
    assert!(results.iter().all(|r| r.result.is_ok()));
    assert_eq!(receivers[1].recv().await.unwrap().service_method, "two");
    assert_eq!(receivers[2].recv().await.unwrap().service_method, "two");
    assert!(receivers[0].try_recv().is_none());
}

#[tokio::test]
async fn identity_binding_and_lookup() {
    let t = start_server().await;
    t.server.register(
        "Auth",
        Service::new().method("Login", |ctx: Context, user: String| async move {
            ctx.conn().bind_client_id(format!("user:{user}"));
            Ok(())
        }),
    );
    let declared = t
        .client()
        .client_id("sensor-9")
        .connect(&t.address())
        .await
        .unwrap();
    let anonymous = t.client().connect(&t.address()).await.unwrap();
    assert_eq!(declared.client_id(), Some("sensor-9"));
    let conn = t.server.client("sensor-9").unwrap();
    assert_eq!(conn.client_id().as_deref(), Some("sensor-9"));
    assert_eq!(t.server.connection(conn.id()), Some(conn.clone()));
    assert!(t.server.client("user:ann").is_none());
    let () = anonymous.call("Auth", "Login", "ann").await.unwrap();
    let bound = t.server.client("user:ann").expect("bound by the handler");
    assert_ne!(bound, conn);
    assert_eq!(t.server.connections().len(), 2);
}

#[tokio::test]
async fn reconnect_rebinds_identity_and_push_arrives() {
    let t = start_server().await;
    let (tx, mut rx) = push_channel(8);
    let client = t
        .client()
        .client_id("roamer")
        .push_channel(tx)
        .connect(&t.address())
        .await
        .unwrap();
    let mut client_events = client.events();
    let old = t.server.client("roamer").unwrap();
    old.close();
    let reconnected = tokio::time::timeout(WAIT, async {
        loop {
            if let ClientEvent::Reconnected { .. } = client_events.recv().await.unwrap() {
                return;
            }
        }
    })
    .await;
    assert!(reconnected.is_ok(), "the client reconnected");
    let new = t.server.client("roamer").expect("re-bound");
    assert_ne!(new, old);
    // No call needed: the push reaches the new connection.
    t.server
        .send_to_client("roamer", "p", "m", Metadata::new(), b"after")
        .await
        .unwrap();
    let msg = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&msg.payload[..], b"after");
    // Calls work on the new connection too.
    let reply: Reply = client
        .call("Arith", "Mul", &Args { a: 3, b: 3 })
        .await
        .unwrap();
    assert_eq!(reply.c, 9);
}

#[tokio::test]
async fn reverse_call_round_trip_and_unknown_service() {
    let t = start_server().await;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let _device = t
        .client()
        .client_id("thermo")
        .register(
            "Device",
            Service::new().method("Temperature", move |ctx: Context, unit: String| {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    ctx.set_reply_metadata("unit", unit.clone());
                    Ok(if unit == "C" { 21.5f64 } else { 70.7 })
                }
            }),
        )
        .connect(&t.address())
        .await
        .unwrap();
    let _plain = t
        .client()
        .client_id("plain")
        .connect(&t.address())
        .await
        .unwrap();
    let conn = t.server.client("thermo").unwrap();
    let celsius: f64 = conn.call("Device", "Temperature", "C").await.unwrap();
    assert!((celsius - 21.5).abs() < f64::EPSILON);
    let opts = quicx::CallOptions::new().timeout(Duration::from_secs(1));
    let raw = conn
        .call_raw(
            "Device",
            "Temperature",
            &quicx::Codec::Postcard.encode("F").unwrap(),
            &opts,
        )
        .await
        .unwrap();
    assert_eq!(raw.metadata.get("unit"), Some("F"));
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    let err = conn
        .call::<_, f64>("Device", "Humidity", &())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownMethod { .. }), "{err:?}");
    let plain = t.server.client("plain").unwrap();
    let err = plain
        .call::<_, f64>("Device", "Temperature", "C")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownService { .. }), "{err:?}");
}

#[tokio::test]
async fn lifecycle_events_on_both_sides() {
    let t = start_server().await;
    let mut server_events = t.server.events();
    let builder = t.client().client_id("life");
    let mut client_events = builder.events();
    let client = builder.connect(&t.address()).await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, client_events.recv())
            .await
            .unwrap()
            .unwrap(),
        ClientEvent::Connected { server: t.addr }
    );
    let ServerEvent::Connected(first) = next_server_event(&mut server_events, |e| {
        matches!(e, ServerEvent::Connected(_))
    })
    .await
    else {
        unreachable!()
    };
    let ServerEvent::Bound { client_id, .. } = next_server_event(&mut server_events, |e| {
        matches!(e, ServerEvent::Bound { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(client_id, "life");
    // The server drops the client: both sides see it, the client comes back.
    first.close();
    match tokio::time::timeout(WAIT, client_events.recv())
        .await
        .unwrap()
        .unwrap()
    {
        ClientEvent::Disconnected { reason, .. } => {
            assert!(
                matches!(reason, DisconnectReason::ClosedByPeer { code: 0, .. }),
                "{reason:?}"
            );
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(matches!(
        tokio::time::timeout(WAIT, client_events.recv())
            .await
            .unwrap()
            .unwrap(),
        ClientEvent::Reconnected { attempts: 1, .. }
    ));
    let ServerEvent::Disconnected { reason, .. } = next_server_event(&mut server_events, |e| {
        matches!(e, ServerEvent::Disconnected { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(reason, DisconnectReason::ClosedLocally);
    // The client closes for good: the server sees the peer's close.
    client.close().await;
    let ServerEvent::Disconnected { reason, .. } = next_server_event(&mut server_events, |e| {
        matches!(e, ServerEvent::Disconnected { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert!(
        matches!(reason, DisconnectReason::ClosedByPeer { code: 0, .. }),
        "{reason:?}"
    );
    assert!(matches!(
        tokio::time::timeout(WAIT, client_events.recv())
            .await
            .unwrap()
            .unwrap(),
        ClientEvent::Disconnected {
            reason: DisconnectReason::ClosedLocally,
            ..
        }
    ));
    assert!(t.server.connections().is_empty());
}
