//! Identity re-binding, shutdown, hello refusal, pushes from the wrong side and closing many
//! clients of a shared endpoint: each a defect found in review, each test failed before its fix.

use std::time::{Duration, Instant};

use quicx::{
    Authenticator, ClientEndpoint, Context, DevCertificate, Error, Hello, Metadata, NotConnected,
    Placement, Server, ServerEvent, Service, TransportOptions,
};
use quicx_tests::{client_builder, start_server};

#[tokio::test]
async fn rebinding_a_connection_releases_its_old_identity() {
    let t = start_server().await;
    t.server.register(
        "Auth",
        Service::new().method("Rename", |ctx: Context, id: String| async move {
            ctx.conn().bind_client_id(id);
            Ok(())
        }),
    );
    let client = t
        .client()
        .client_id("old")
        .connect(&t.address())
        .await
        .unwrap();
    let conn = t.server.client("old").expect("bound by the hello");
    let () = client.call("Auth", "Rename", "new").await.unwrap();
    assert_eq!(t.server.client("new"), Some(conn.clone()));
    assert_eq!(conn.client_id().as_deref(), Some("new"));
    assert!(
        t.server.client("old").is_none(),
        "the old id still finds the re-bound connection"
    );
    // Re-binding to the same id again is harmless.
    let () = client.call("Auth", "Rename", "new").await.unwrap();
    assert_eq!(t.server.client("new"), Some(conn));
    client.close().await;
}

#[tokio::test]
async fn a_cancelled_shutdown_still_shuts_the_server_down() {
    let t = start_server().await;
    let server = t.server.clone();
    let serving = tokio::spawn(async move {
        // `serve` on a server that is already bound waits for the shutdown like this.
        let mut events = server.events();
        while events.recv().await.is_ok() {}
    });
    let client = t.client().connect(&t.address()).await.unwrap();
    let conn = client.connection().await.unwrap();
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.call::<_, u64>("Arith", "Sleep", &10_000u64).await })
    };
    t.until_sleeping(1).await;
    // The caller gives up on the shutdown half-way through the drain.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(50),
        t.server.shutdown(Duration::from_millis(300)),
    )
    .await;
    assert!(gave_up.is_err(), "the drain takes longer than 50 ms");
    // The shutdown goes on by itself: the call is cancelled, the connection closed.
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    assert!(
        matches!(closed, Ok(Error::ShuttingDown)),
        "connection not closed by the shutdown: {closed:?}"
    );
    assert!(matches!(slow.await.unwrap(), Err(Error::ShuttingDown)));
    // A second shutdown call returns the first one's result at once.
    let started = Instant::now();
    assert!(!t.server.shutdown(Duration::from_secs(10)).await);
    assert!(started.elapsed() < Duration::from_secs(1));
    serving.abort();
}

#[tokio::test]
async fn server_events_end_after_a_shutdown_with_its_disconnects() {
    let t = start_server().await;
    let mut events = t.server.events();
    let _client = t.client().connect(&t.address()).await.unwrap();
    // The server's side of the connection.
    let id = match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
        Ok(Ok(ServerEvent::Connected(conn))) => conn.id(),
        other => panic!("expected Connected, got {other:?}"),
    };
    assert!(t.server.shutdown(Duration::from_secs(1)).await);
    let mut disconnected = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Ok(ServerEvent::Disconnected { conn, .. })) if conn.id() == id => {
                disconnected = true;
            }
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => break,
            Ok(Err(e)) => panic!("{e:?}"),
            Err(_) => panic!("the events did not end within 5 s of the shutdown"),
        }
    }
    assert!(
        disconnected,
        "the client's Disconnected came before the end"
    );
    // A subscription after the shutdown ends at once.
    let late = t.server.events().recv().await;
    assert!(matches!(
        late,
        Err(tokio::sync::broadcast::error::RecvError::Closed)
    ));
}

#[tokio::test]
async fn a_client_cannot_push_and_learns_it_at_once() {
    let t = start_server().await;
    let client = t.client().connect(&t.address()).await.unwrap();
    let conn = client.connection().await.unwrap();
    let started = Instant::now();
    let err = conn
        .send_message("p", "m", Metadata::new(), b"x")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WrongSide(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(100));
    client.close().await;
}

#[tokio::test]
async fn a_refused_hello_is_a_typed_error() {
    let t = start_server().await;
    let err = t
        .client()
        .client_id("")
        .connect(&t.address())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::HelloRefused(ref m) if m.contains("empty")),
        "{err:?}"
    );
}

#[tokio::test]
async fn sending_to_an_unknown_client_is_a_typed_error() {
    let t = start_server().await;
    let err = t
        .server
        .send_to_client("nobody", "p", "m", Metadata::new(), b"x")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotConnected(NotConnected::NoClient(ref id)) if id == "nobody"),
        "{err:?}"
    );
}

/// Clients sharing one endpoint, closed one by one, then their runtime (as a process exiting)
/// is gone at once: the server must see every disconnect right away, not at its idle timeout.
#[tokio::test]
async fn closing_clients_of_a_shared_endpoint_reaches_the_server_before_exit() {
    const CLIENTS: usize = 50;
    let t = quicx_tests::start_server_with(|b| {
        b.transport(TransportOptions::default().idle_timeout(Duration::from_secs(30)))
    })
    .await;
    let mut events = t.server.events();
    let address = t.address();
    let dev = t.dev.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let shared = ClientEndpoint::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let mut clients = Vec::new();
            for _ in 0..CLIENTS {
                let client = quicx_tests::client_builder(&dev)
                    .endpoint(&shared)
                    .placement(Placement::CallerRuntime)
                    .connect(&address)
                    .await
                    .unwrap();
                clients.push(client);
            }
            for client in &clients {
                client.close().await;
            }
        });
        // The runtime, the endpoint and its socket go away here, as in a process that exits.
        drop(runtime);
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut disconnected = 0;
    while disconnected < CLIENTS {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(ServerEvent::Disconnected { .. })) => disconnected += 1,
            Ok(Ok(_)) => {}
            other => panic!("{disconnected} of {CLIENTS} disconnects seen: {other:?}"),
        }
    }
    assert!(t.server.connections().is_empty());
}

#[tokio::test]
async fn closing_a_client_whose_server_is_gone_returns_at_once() {
    let t = start_server().await;
    // It keeps trying to reconnect (the default) to a port nobody answers on any more.
    let client = t.client().connect(&t.address()).await.unwrap();
    let mut events = client.events();
    t.server.shutdown(Duration::ZERO).await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(
            events.recv().await,
            Ok(quicx::ClientEvent::Disconnected { .. })
        ) {}
    })
    .await
    .expect("the client sees its server go");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Nothing is left to tell the server: closing does not wait for a send that cannot come.
    let started = Instant::now();
    client.close().await;
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "close took {:?}",
        started.elapsed()
    );
}

/// On a multi-thread runtime, a shared endpoint bound to any port has one socket per client
/// I/O thread, and clients driven by those threads connect through their own thread's socket:
/// every socket carries connections, and every call works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_endpoint_has_a_socket_per_client_thread_and_clients_use_them_all() {
    use quicx_tests::{Args, Reply};
    let t = start_server().await;
    let shared = ClientEndpoint::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let locals = shared.local_addrs().unwrap();
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    assert_eq!(locals.len(), threads, "{locals:?}");
    let mut ports: Vec<u16> = locals.iter().map(std::net::SocketAddr::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), locals.len(), "one port per socket: {locals:?}");
    assert_eq!(shared.local_addr().unwrap(), locals[0]);
    let mut clients = Vec::new();
    for i in 0..4 * threads as i64 {
        let client = t
            .client()
            .endpoint(&shared)
            .placement(Placement::IoThread)
            .connect(&t.address())
            .await
            .unwrap();
        let reply: Reply = client
            .call("Arith", "Mul", &Args { a: i, b: 3 })
            .await
            .unwrap();
        assert_eq!(reply.c, i * 3);
        clients.push(client);
    }
    let mut seen: Vec<u16> = t
        .server
        .connections()
        .iter()
        .map(|c| c.remote_address().port())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    let mut expected: Vec<u16> = locals.iter().map(std::net::SocketAddr::port).collect();
    expected.sort_unstable();
    assert_eq!(seen, expected, "every socket carries connections");
    for client in &clients {
        client.close().await;
    }

    // A fixed port: one socket.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let fixed = ClientEndpoint::bind(port).unwrap();
    assert_eq!(fixed.local_addrs().unwrap(), vec![port]);
}

/// A client whose runtime stalls for longer than the unresponsive timeout while a call waits
/// (its process did not run, so it could hear nothing) keeps its connection to a live server:
/// the call still gets its reply.
#[tokio::test]
async fn a_stalled_client_runtime_does_not_make_a_live_server_look_dead() {
    let t = start_server().await;
    // On this current_thread runtime: the client is driven here, the server on its own threads.
    let client = t.client().connect(&t.address()).await.unwrap();
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.call::<_, u64>("Arith", "Sleep", &2500u64).await }
    });
    // The call waits and its liveness probe runs; then the whole runtime stalls for 2 s, past
    // the 1.5 s unresponsive timeout.
    tokio::time::sleep(Duration::from_millis(520)).await;
    std::thread::sleep(Duration::from_secs(2));
    let reply = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the call ends")
        .unwrap();
    assert_eq!(reply.unwrap(), 2500);
}

/// A connect abandoned during its hello (the caller's own timeout) leaves no connection behind:
/// the client closes the one it was establishing, so the server neither keeps it nor binds the
/// identity to it.
#[tokio::test]
async fn a_connect_abandoned_during_its_hello_leaves_no_connection() {
    let dev = DevCertificate::localhost().unwrap();
    let server = Server::builder()
        .dev_certificate(&dev)
        .authenticator(Authenticator::new(|hello: Hello| async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            Ok(hello.client_id)
        }))
        .build()
        .unwrap();
    let addr = server.bind("127.0.0.1:0").await.unwrap().to_string();
    let connecting = client_builder(&dev)
        .client_id("slow-1")
        .token("t")
        .connect(&addr);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), connecting)
            .await
            .is_err(),
        "still saying hello at 300 ms"
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while !(server.connections().is_empty() && server.client("slow-1").is_none()) {
        assert!(
            Instant::now() < deadline,
            "the abandoned connection is still open ({} open, bound: {})",
            server.connections().len(),
            server.client("slow-1").is_some()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server shut down before it listened refuses to listen afterwards (it bound a port no one
/// would ever read).
#[tokio::test]
async fn a_server_shut_down_refuses_to_bind() {
    let dev = DevCertificate::localhost().unwrap();
    let server = Server::builder().dev_certificate(&dev).build().unwrap();
    server.shutdown(Duration::from_millis(100)).await;
    let err = server.bind("127.0.0.1:0").await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
}
