//! Failure recovery with servers as child processes killed by SIGKILL: calls in flight fail
//! over in about a second, dead endpoints get one connect attempt at a time, the connect time
//! counts against the call's deadline, and a restarted server's clients are back within a
//! second.

use std::time::{Duration, Instant};

use quicx::{
    CallOptions, ClientOption, ClientTls, DevCertificate, Error, FailMode, SelectMode,
    TransportOptions, XClient,
    discovery::{Endpoint, MultipleServersDiscovery},
};
use quicx_tests::child::{BlackHole, ChildServer, PemFiles, free_port};

const EXE: &str = env!("CARGO_BIN_EXE_quicx-test-server");

fn endpoint(addr: std::net::SocketAddr) -> Endpoint {
    Endpoint::parse(&format!("quic@{addr}"))
        .unwrap()
        .with_server_name("localhost")
}

fn option(dev: &DevCertificate) -> ClientOption {
    ClientOption::with_tls(ClientTls::empty().trust(dev.certificate()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_completes_calls_in_flight_to_a_killed_server_within_2s() {
    let dev = DevCertificate::localhost().unwrap();
    let pem = PemFiles::write(&dev).unwrap();
    // `a` never answers `Work` in time; `b` answers at once.
    let mut a = ChildServer::start(EXE, &pem, "127.0.0.1:0", "a", 60_000).unwrap();
    let b = ChildServer::start(EXE, &pem, "127.0.0.1:0", "b", 0).unwrap();
    let x = XClient::new(
        "Who",
        FailMode::Failover,
        SelectMode::RoundRobin,
        MultipleServersDiscovery::new(vec![endpoint(a.addr), endpoint(b.addr)]),
        option(&dev),
    )
    .unwrap();
    // Both connected.
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(x.call::<_, String>("Name", &()).await.unwrap());
    }
    assert!(names.contains(&"a".to_owned()) && names.contains(&"b".to_owned()));
    // Eight calls in flight; round robin sends half of them to `a`, where they stall.
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let x = x.clone();
            tokio::spawn(async move {
                let r = x.call::<_, String>("Work", &()).await;
                (r, Instant::now())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.kill();
    let killed = Instant::now();
    for call in calls {
        let (result, done) = call.await.unwrap();
        assert_eq!(result.unwrap(), "b");
        let after = done.saturating_duration_since(killed);
        assert!(
            after < Duration::from_secs(2),
            "completed {after:?} after the kill"
        );
    }
    // Afterwards no call waits on the dead endpoint.
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(x.call::<_, String>("Name", &()).await.unwrap(), "b");
        assert!(started.elapsed() < Duration::from_millis(500));
    }
    x.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_gets_one_connect_attempt_whatever_the_number_of_callers() {
    let dev = DevCertificate::localhost().unwrap();
    let pem = PemFiles::write(&dev).unwrap();
    let live = ChildServer::start(EXE, &pem, "127.0.0.1:0", "live", 0).unwrap();
    let dead = BlackHole::bind().await.unwrap();
    let x = XClient::new(
        "Who",
        FailMode::Failover,
        SelectMode::RandomSelect,
        MultipleServersDiscovery::new(vec![endpoint(dead.addr), endpoint(live.addr)]),
        ClientOption {
            connect_timeout: Duration::from_secs(1),
            ..option(&dev)
        },
    )
    .unwrap();
    let started = Instant::now();
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let x = x.clone();
            tokio::spawn(async move { x.call::<_, String>("Name", &()).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), "live");
    }
    let took = started.elapsed();
    // Callers that picked the dead endpoint waited for one shared attempt (1 s), then failed
    // over: not one attempt after another.
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    assert_eq!(
        dead.attempts(),
        1,
        "connection attempts to the dead endpoint"
    );
    // While it cools down and `live` is connected, calls do not touch it.
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(x.call::<_, String>("Name", &()).await.unwrap(), "live");
        assert!(started.elapsed() < Duration::from_millis(300));
    }
    x.close().await;
}

#[tokio::test]
async fn connecting_counts_against_the_call_deadline() {
    let dev = DevCertificate::localhost().unwrap();
    let dead = BlackHole::bind().await.unwrap();
    let x = XClient::new(
        "Who",
        FailMode::Failfast,
        SelectMode::RandomSelect,
        MultipleServersDiscovery::new(vec![endpoint(dead.addr)]),
        ClientOption {
            connect_timeout: Duration::from_secs(3),
            ..option(&dev)
        },
    )
    .unwrap();
    let started = Instant::now();
    let err = x
        .call_with::<_, String>(
            "Name",
            &(),
            &CallOptions::new().timeout(Duration::from_millis(400)),
        )
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(
            err,
            Error::ConnectTimeout(_) | Error::DeadlineExceeded { .. }
        ),
        "{err:?}"
    );
    assert!(
        took < Duration::from_millis(1000),
        "a 400 ms deadline took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_server_restarted_on_the_same_port_reconnect_within_1s() {
    quicx_tests::init_tracing();
    let dev = DevCertificate::localhost().unwrap();
    let pem = PemFiles::write(&dev).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = ChildServer::start(EXE, &pem, &listen, "first", 0).unwrap();
    // Liveness probes off: this checks the stateless reset alone.
    let client = quicx_tests::client_builder(&dev)
        .transport(TransportOptions {
            unresponsive_timeout: None,
            ..TransportOptions::default()
        })
        .connect(&listen)
        .await
        .unwrap();
    assert_eq!(
        client.call::<_, String>("Who", "Name", &()).await.unwrap(),
        "first"
    );
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _server = ChildServer::start(EXE, &pem, &listen, "second", 0).unwrap();
    let back = Instant::now();
    let options = CallOptions::new().timeout(Duration::from_millis(200));
    let reconnected = loop {
        match client
            .call_with::<_, String>("Who", "Name", &(), &options)
            .await
        {
            Ok(name) => break name,
            Err(_) if back.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("not back after 10 s: {e:?}"),
        }
    };
    let took = back.elapsed();
    assert_eq!(reconnected, "second");
    assert!(
        took < Duration::from_secs(1),
        "reconnected {took:?} after the restart"
    );
    client.close().await;
}

#[tokio::test]
async fn a_slow_handler_on_a_live_server_is_not_mistaken_for_a_dead_one() {
    let t = quicx_tests::start_server().await;
    let client = t.client().connect(&t.address()).await.unwrap();
    let conn = client.connection().await.unwrap();
    // Twice the unresponsive timeout: the server acknowledges the probes meanwhile.
    let slept: u64 = client.call("Arith", "Sleep", &3_000u64).await.unwrap();
    assert_eq!(slept, 3_000);
    assert!(!conn.is_closed());
    client.close().await;
}

/// A discovery that remembers which endpoints callers could not reach.
#[derive(Debug)]
struct Reporting {
    list: MultipleServersDiscovery,
    unreachable: std::sync::Mutex<Vec<String>>,
}

impl quicx::discovery::Discovery for Reporting {
    async fn endpoints(&self) -> quicx::discovery::Endpoints {
        quicx::discovery::Discovery::endpoints(&self.list).await
    }

    fn watch(&self) -> tokio::sync::watch::Receiver<quicx::discovery::Endpoints> {
        quicx::discovery::Discovery::watch(&self.list)
    }

    fn report_unreachable(&self, endpoint: &Endpoint) {
        self.unreachable
            .lock()
            .unwrap()
            .push(endpoint.address.clone());
    }
}

#[tokio::test]
async fn a_failed_connect_is_reported_to_the_discovery() {
    let dev = DevCertificate::localhost().unwrap();
    let dead = BlackHole::bind().await.unwrap();
    let discovery = std::sync::Arc::new(Reporting {
        list: MultipleServersDiscovery::new(vec![endpoint(dead.addr)]),
        unreachable: std::sync::Mutex::default(),
    });
    let x = XClient::new(
        "Who",
        FailMode::Failfast,
        SelectMode::RandomSelect,
        ArcDiscovery(discovery.clone()),
        ClientOption {
            connect_timeout: Duration::from_millis(300),
            ..option(&dev)
        },
    )
    .unwrap();
    assert!(x.call::<_, String>("Name", &()).await.is_err());
    // The attempt's task reports right after it failed.
    let deadline = Instant::now() + Duration::from_secs(2);
    while discovery.unreachable.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        *discovery.unreachable.lock().unwrap(),
        [dead.addr.to_string()]
    );
}

/// Shares a discovery between the test and the XClient.
#[derive(Debug)]
struct ArcDiscovery(std::sync::Arc<Reporting>);

impl quicx::discovery::Discovery for ArcDiscovery {
    async fn endpoints(&self) -> quicx::discovery::Endpoints {
        quicx::discovery::Discovery::endpoints(&*self.0).await
    }

    fn watch(&self) -> tokio::sync::watch::Receiver<quicx::discovery::Endpoints> {
        quicx::discovery::Discovery::watch(&*self.0)
    }

    fn report_unreachable(&self, endpoint: &Endpoint) {
        quicx::discovery::Discovery::report_unreachable(&*self.0, endpoint);
    }
}
