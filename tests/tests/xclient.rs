//! XClient end to end: fail modes with real servers on loopback, discovery updates, broadcast,
//! fork, groups, and a bidirectional XClient.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use quicx::{
    CallOptions, ClientOption, ClientTls, Context, DevCertificate, Error, FailMode, Metadata,
    SelectMode, Server, Service, ServiceError, XClient,
    discovery::{Endpoint, MultipleServersDiscovery, Peer2PeerDiscovery},
    push_channel,
};

struct Named {
    name: String,
    server: Server,
    endpoint: Endpoint,
    /// Invocations of each method.
    calls: Arc<HashMap<&'static str, AtomicUsize>>,
}

impl Named {
    fn count(&self, method: &str) -> usize {
        self.calls[method].load(Ordering::SeqCst)
    }
}

/// A server of service `Who`: `Name` answers its name, `Slow` sleeps (`stall_ms`) then answers,
/// `Fail` returns a handler error.
async fn named(dev: &DevCertificate, name: &str, stall_ms: u64) -> Named {
    let server = Server::builder()
        .dev_certificate(dev)
        .insecure_accept_unverified_client_ids()
        .build()
        .unwrap();
    let calls: Arc<HashMap<&'static str, AtomicUsize>> = Arc::new(
        ["Name", "Slow", "Fail"]
            .into_iter()
            .map(|m| (m, AtomicUsize::new(0)))
            .collect(),
    );
    let (c1, c2, c3) = (calls.clone(), calls.clone(), calls.clone());
    let (n1, n2) = (name.to_owned(), name.to_owned());
    server.register(
        "Who",
        Service::new()
            .method("Name", move |_ctx: Context, (): ()| {
                c1["Name"].fetch_add(1, Ordering::SeqCst);
                let n = n1.clone();
                async move { Ok(n) }
            })
            .method("Slow", move |_ctx: Context, (): ()| {
                c2["Slow"].fetch_add(1, Ordering::SeqCst);
                let n = n2.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(stall_ms)).await;
                    Ok(n)
                }
            })
            .method("Fail", move |_ctx: Context, (): ()| {
                c3["Fail"].fetch_add(1, Ordering::SeqCst);
                async move { Err::<(), _>(ServiceError::new(4242, "no")) }
            }),
    );
    let addr = server.bind("127.0.0.1:0").await.unwrap();
    Named {
        name: name.to_owned(),
        server,
        endpoint: Endpoint::parse(&addr.to_string())
            .unwrap()
            .with_server_name("localhost"),
        calls,
    }
}

fn option(dev: &DevCertificate) -> ClientOption {
    ClientOption {
        connect_timeout: Duration::from_millis(500),
        call_timeout: Some(Duration::from_secs(2)),
        ..ClientOption::with_tls(ClientTls::empty().trust(dev.certificate()))
    }
}

fn list(servers: &[&Named]) -> MultipleServersDiscovery {
    MultipleServersDiscovery::new(servers.iter().map(|s| s.endpoint.clone()).collect())
}

#[tokio::test]
async fn peer_to_peer_call_and_no_endpoints() {
    let dev = DevCertificate::localhost().unwrap();
    let a = named(&dev, "a", 0).await;
    let d = Peer2PeerDiscovery::from_endpoint(a.endpoint.clone());
    let x = XClient::new(
        "Who",
        FailMode::Failtry,
        SelectMode::RandomSelect,
        d,
        option(&dev),
    )
    .unwrap();
    let name: String = x.call("Name", &()).await.unwrap();
    assert_eq!(name, "a");
    let empty = XClient::new(
        "Who",
        FailMode::Failover,
        SelectMode::RoundRobin,
        MultipleServersDiscovery::new(vec![]),
        option(&dev),
    )
    .unwrap();
    let err = empty.call::<_, String>("Name", &()).await.unwrap_err();
    assert!(
        matches!(err, Error::NoEndpoints(ref s) if s == "Who"),
        "{err:?}"
    );
}

#[tokio::test]
async fn failover_survives_a_killed_server() {
    let dev = DevCertificate::localhost().unwrap();
    let servers = [
        named(&dev, "a", 0).await,
        named(&dev, "b", 0).await,
        named(&dev, "c", 0).await,
    ];
    let x = XClient::new(
        "Who",
        FailMode::Failover,
        SelectMode::RoundRobin,
        list(&[&servers[0], &servers[1], &servers[2]]),
        option(&dev),
    )
    .unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (x, done) = (x.clone(), done.clone());
        tasks.spawn(async move {
            let mut names = Vec::new();
            for _ in 0..50 {
                let name: String = x.call("Name", &()).await?;
                names.push(name);
                done.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok::<_, Error>(names)
        });
    }
    while done.load(Ordering::SeqCst) < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    servers[1].server.shutdown(Duration::ZERO).await;
    let killed_at = servers[1].count("Name");
    let mut after_kill = HashMap::new();
    while let Some(result) = tasks.join_next().await {
        for name in result.unwrap().expect("every call succeeds") {
            *after_kill.entry(name).or_insert(0) += 1;
        }
    }
    assert_eq!(done.load(Ordering::SeqCst), 400);
    assert_eq!(
        servers[1].count("Name"),
        killed_at,
        "no call reached the killed server"
    );
    assert!(servers[0].count("Name") > 100 && servers[2].count("Name") > 100);
}

#[tokio::test]
async fn failtry_retries_the_same_endpoint() {
    let dev = DevCertificate::localhost().unwrap();
    let (a, b) = (named(&dev, "a", 5_000).await, named(&dev, "b", 5_000).await);
    let x = XClient::new(
        "Who",
        FailMode::Failtry,
        SelectMode::RoundRobin,
        list(&[&a, &b]),
        ClientOption {
            retries: 2,
            attempt_timeout: Some(Duration::from_millis(400)),
            call_timeout: Some(Duration::from_secs(5)),
            ..option(&dev)
        },
    )
    .unwrap();
    let err = x.call::<_, String>("Slow", &()).await.unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err:?}");
    assert_eq!(
        a.count("Slow"),
        3,
        "one attempt and two retries, all on the first pick"
    );
    assert_eq!(b.count("Slow"), 0);
}

#[tokio::test]
async fn failfast_returns_the_first_error() {
    let dev = DevCertificate::localhost().unwrap();
    let (a, b) = (named(&dev, "a", 5_000).await, named(&dev, "b", 0).await);
    let x = XClient::new(
        "Who",
        FailMode::Failfast,
        SelectMode::RoundRobin,
        list(&[&a, &b]),
        ClientOption {
            call_timeout: Some(Duration::from_millis(500)),
            ..option(&dev)
        },
    )
    .unwrap();
    let err = x.call::<_, String>("Slow", &()).await.unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err:?}");
    assert_eq!(a.count("Slow") + b.count("Slow"), 1);
}

#[tokio::test]
async fn failbackup_answers_from_the_second_when_the_first_stalls() {
    let dev = DevCertificate::localhost().unwrap();
    let (a, b) = (named(&dev, "a", 5_000).await, named(&dev, "b", 0).await);
    let x = XClient::new(
        "Who",
        FailMode::Failbackup,
        SelectMode::RoundRobin,
        list(&[&a, &b]),
        ClientOption {
            backup_latency: Duration::from_millis(300),
            ..option(&dev)
        },
    )
    .unwrap();
    // Both connected first: a connect slower than the backup latency would otherwise let the
    // backup answer before the first request reached `a`.
    for (_, r) in x.broadcast::<_, String>("Name", &()).await.unwrap() {
        r.unwrap();
    }
    let started = Instant::now();
    let name: String = x.call("Slow", &()).await.unwrap();
    assert_eq!(name, "b");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        a.count("Slow"),
        1,
        "the first endpoint got the call and stalled"
    );
    assert_eq!(b.count("Slow"), 1);
}

#[tokio::test]
async fn handler_errors_are_not_retried() {
    let dev = DevCertificate::localhost().unwrap();
    let servers = [named(&dev, "a", 0).await, named(&dev, "b", 0).await];
    for mode in [FailMode::Failover, FailMode::Failtry, FailMode::Failbackup] {
        let x = XClient::new(
            "Who",
            mode,
            SelectMode::RoundRobin,
            list(&[&servers[0], &servers[1]]),
            option(&dev),
        )
        .unwrap();
        let before = servers[0].count("Fail") + servers[1].count("Fail");
        let err = x.call::<_, ()>("Fail", &()).await.unwrap_err();
        assert!(
            matches!(err, Error::Remote { code: 4242, .. }),
            "{mode:?}: {err:?}"
        );
        let after = servers[0].count("Fail") + servers[1].count("Fail");
        assert_eq!(after - before, 1, "{mode:?} retried a handler error");
        let err = x.call::<_, ()>("Nope", &()).await.unwrap_err();
        assert!(
            matches!(err, Error::UnknownMethod { .. }),
            "{mode:?}: {err:?}"
        );
    }
}

/// Refused credentials reach the caller as themselves, at once: Failover does not retry them on
/// another endpoint.
#[tokio::test]
async fn refused_credentials_are_returned_as_such_and_not_retried() {
    let dev = DevCertificate::localhost().unwrap();
    let refused = Arc::new(AtomicUsize::new(0));
    let mut servers = Vec::new();
    for _ in 0..2 {
        let count = refused.clone();
        let server =
            Server::builder()
                .dev_certificate(&dev)
                .authenticator(quicx::Authenticator::new(move |_hello: quicx::Hello| {
                    count.fetch_add(1, Ordering::SeqCst);
                    async move {
                        Err::<String, _>(quicx::Refusal::Unauthenticated("wrong token".into()))
                    }
                }))
                .build()
                .unwrap();
        let addr = server.bind("127.0.0.1:0").await.unwrap();
        servers.push((
            server,
            Endpoint::parse(&addr.to_string())
                .unwrap()
                .with_server_name("localhost"),
        ));
    }
    let discovery = MultipleServersDiscovery::new(servers.iter().map(|(_, e)| e.clone()).collect());
    let x = XClient::new(
        "Who",
        FailMode::Failover,
        SelectMode::RoundRobin,
        discovery,
        ClientOption {
            client_id: Some("device-1".into()),
            token: Some("not-it".into()),
            retries: 3,
            ..option(&dev)
        },
    )
    .unwrap();
    // Every call, on either endpoint, gets the refusal as itself, with one hello each.
    for n in 1..=4 {
        let err = x.call::<_, String>("Name", &()).await.unwrap_err();
        assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");
        // One hello per call: the refusal was not tried on the other endpoint.
        assert_eq!(refused.load(Ordering::SeqCst), n);
    }
}

#[tokio::test]
async fn static_list_updates_reach_a_live_xclient() {
    let dev = DevCertificate::localhost().unwrap();
    let (a, b) = (named(&dev, "a", 0).await, named(&dev, "b", 0).await);
    let discovery = list(&[&a]);
    let x = XClient::new(
        "Who",
        FailMode::Failover,
        SelectMode::RoundRobin,
        discovery.clone(),
        option(&dev),
    )
    .unwrap();
    for _ in 0..4 {
        assert_eq!(x.call::<_, String>("Name", &()).await.unwrap(), "a");
    }
    let mut a_events = a.server.events();
    discovery.update(vec![a.endpoint.clone(), b.endpoint.clone()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while x.endpoints().len() != 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(x.call::<_, String>("Name", &()).await.unwrap());
    }
    assert_eq!(seen.len(), 2, "the new endpoint is used: {seen:?}");
    discovery.update(vec![b.endpoint.clone()]);
    while x.endpoints().len() != 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..4 {
        assert_eq!(x.call::<_, String>("Name", &()).await.unwrap(), "b");
    }
    // The removed endpoint's connection was drained and closed.
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let quicx::ServerEvent::Disconnected { .. } = a_events.recv().await.unwrap() {
                return;
            }
        }
    })
    .await
    .expect("the removed endpoint's connection closes");
    assert!(a.server.connections().is_empty());
}

#[tokio::test]
async fn broadcast_and_fork() {
    let dev = DevCertificate::localhost().unwrap();
    let servers = [
        named(&dev, "a", 0).await,
        named(&dev, "b", 0).await,
        named(&dev, "c", 300).await,
    ];
    let x = XClient::new(
        "Who",
        FailMode::Failfast,
        SelectMode::RandomSelect,
        list(&[&servers[0], &servers[1], &servers[2]]),
        option(&dev),
    )
    .unwrap();
    let results = x.broadcast::<_, String>("Name", &()).await.unwrap();
    let mut names: Vec<String> = results.into_iter().map(|(_, r)| r.unwrap()).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);
    // fork: the fast servers win over the slow one.
    let started = Instant::now();
    let winner: String = x.fork("Slow", &()).await.unwrap();
    assert_ne!(winner, "c");
    assert!(started.elapsed() < Duration::from_millis(300));
    // broadcast reports a dead endpoint's error next to the others' results.
    servers[0].server.shutdown(Duration::ZERO).await;
    let results = x.broadcast::<_, String>("Name", &()).await.unwrap();
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, servers[0].endpoint);
    // fork still succeeds with one endpoint down.
    let _: String = x.fork("Name", &()).await.unwrap();
}

#[tokio::test]
async fn group_filter_and_consistent_hash() {
    let dev = DevCertificate::localhost().unwrap();
    let servers = [
        named(&dev, "a", 0).await,
        named(&dev, "b", 0).await,
        named(&dev, "c", 0).await,
    ];
    let endpoints = vec![
        servers[0].endpoint.clone().with_group("eu"),
        servers[1].endpoint.clone().with_group("us"),
        servers[2].endpoint.clone().with_group("us"),
    ];
    let x = XClient::new(
        "Who",
        FailMode::Failfast,
        SelectMode::ConsistentHash,
        MultipleServersDiscovery::new(endpoints),
        ClientOption {
            group: Some("us".into()),
            ..option(&dev)
        },
    )
    .unwrap();
    assert_eq!(x.endpoints().len(), 2);
    for key in ["device-1", "device-2", "device-3", "device-4"] {
        let opts = CallOptions::new().route_key(key);
        let first: String = x.call_with("Name", &(), &opts).await.unwrap();
        assert_ne!(first, "a", "group filter");
        for _ in 0..5 {
            let again: String = x.call_with("Name", &(), &opts).await.unwrap();
            assert_eq!(again, first, "the same key sticks to one endpoint");
        }
    }
}

#[tokio::test]
async fn bidirectional_xclient_receives_pushes_from_every_server() {
    let dev = DevCertificate::localhost().unwrap();
    let (a, b) = (named(&dev, "a", 0).await, named(&dev, "b", 0).await);
    let (tx, mut rx) = push_channel(16);
    let x = XClient::bidirectional(
        "Who",
        FailMode::Failover,
        SelectMode::RoundRobin,
        list(&[&a, &b]),
        ClientOption {
            client_id: Some("gadget".into()),
            ..option(&dev)
        },
        tx,
    )
    .unwrap();
    // Connected to both at once, without a call.
    for s in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.server.client("gadget").is_none() {
            assert!(Instant::now() < deadline, "{} never saw the client", s.name);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.server
            .send_to_client(
                "gadget",
                "hello",
                "from",
                Metadata::new(),
                s.name.as_bytes(),
            )
            .await
            .unwrap();
    }
    let mut origins = HashMap::new();
    for _ in 0..2 {
        let msg = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        origins.insert(String::from_utf8(msg.payload.to_vec()).unwrap(), msg.server);
    }
    assert_eq!(origins["a"].to_string(), a.endpoint.address);
    assert_eq!(origins["b"].to_string(), b.endpoint.address);
    let _: String = x.call("Name", &()).await.unwrap();
    x.close().await;
}

/// A bidirectional XClient keeps trying an endpoint that did not answer at first (a server
/// starting or restarting), without any call: pushes may be all it gets from it.
#[tokio::test]
async fn a_bidirectional_xclient_connects_to_a_server_that_starts_late() {
    let dev = DevCertificate::localhost().unwrap();
    let a = named(&dev, "a", 0).await;
    let port = quicx_tests::child::free_port();
    let late_endpoint = Endpoint::parse(&format!("127.0.0.1:{port}"))
        .unwrap()
        .with_server_name("localhost");
    let (tx, mut rx) = push_channel(16);
    let x = XClient::bidirectional(
        "Who",
        FailMode::Failover,
        SelectMode::RoundRobin,
        MultipleServersDiscovery::new(vec![a.endpoint.clone(), late_endpoint]),
        ClientOption {
            client_id: Some("gadget".into()),
            ..option(&dev)
        },
        tx,
    )
    .unwrap();
    // Its first connect to the late server fails (nothing listens).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let late = Server::builder()
        .dev_certificate(&dev)
        .insecure_accept_unverified_client_ids()
        .build()
        .unwrap();
    late.bind(format!("127.0.0.1:{port}")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while late.client("gadget").is_none() {
        assert!(
            Instant::now() < deadline,
            "never connected to the late server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    late.send_to_client("gadget", "hello", "from", Metadata::new(), b"late")
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&msg.payload[..], b"late");
    x.close().await;
}

/// A discovery that never answers.
struct Silent(tokio::sync::watch::Sender<quicx::discovery::Endpoints>);

impl quicx::discovery::Discovery for Silent {
    async fn endpoints(&self) -> quicx::discovery::Endpoints {
        std::future::pending().await
    }

    fn watch(&self) -> tokio::sync::watch::Receiver<quicx::discovery::Endpoints> {
        self.0.subscribe()
    }
}

/// The call timeout bounds the wait for a discovery's first answer too.
#[tokio::test]
async fn a_call_waits_for_a_silent_discovery_no_longer_than_its_timeout() {
    let dev = DevCertificate::localhost().unwrap();
    let silent = Silent(tokio::sync::watch::Sender::new(Default::default()));
    let x = XClient::new(
        "Who",
        FailMode::Failfast,
        SelectMode::RandomSelect,
        silent,
        ClientOption {
            call_timeout: Some(Duration::from_millis(200)),
            ..option(&dev)
        },
    )
    .unwrap();
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(5), x.call::<_, String>("Name", &()))
        .await
        .expect("the call returned");
    assert!(result.is_err(), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// A selector of our own: always the last endpoint.
#[derive(Debug)]
struct Last;

impl quicx::Selector for Last {
    fn select(&self, candidates: &[quicx::Candidate<'_>], _info: &quicx::SelectInfo<'_>) -> usize {
        candidates.len() - 1
    }
}

#[tokio::test]
async fn a_custom_selector_plugs_in() {
    let dev = DevCertificate::localhost().unwrap();
    let (a, b) = (named(&dev, "a", 0).await, named(&dev, "b", 0).await);
    let x = XClient::new(
        "Who",
        FailMode::Failfast,
        SelectMode::Custom(Arc::new(Last)),
        list(&[&a, &b]),
        option(&dev),
    )
    .unwrap();
    for _ in 0..5 {
        assert_eq!(x.call::<_, String>("Name", &()).await.unwrap(), "b");
    }
    assert_eq!(a.count("Name"), 0);
}

#[tokio::test]
async fn oneway_through_the_xclient() {
    let dev = DevCertificate::localhost().unwrap();
    let a = named(&dev, "a", 0).await;
    let x = XClient::new(
        "Who",
        FailMode::Failover,
        SelectMode::RoundRobin,
        list(&[&a]),
        option(&dev),
    )
    .unwrap();
    x.oneway("Name", &()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.count("Name") == 0 {
        assert!(Instant::now() < deadline, "the oneway call never ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
