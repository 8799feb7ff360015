//! A cluster of quicx nodes on a real etcd (started by each test on loopback, with a temporary
//! data dir; the tests skip loudly where etcd is not installed): pushes and reverse calls that
//! cross nodes, devices that move, a node killed with SIGKILL, etcd restarted.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use quicx::Overflow;
use quicx::{
    ClientTls, Context, DevCertificate, Error, Metadata, PushReceiver, Server, Service,
    ServiceError, push_channel,
};
use quicx_cluster::{
    ClusterDurableLimits, ClusterError, ClusterEvent, ClusterNode, ClusterOptions, EtcdDiscovery,
    EtcdOptions, ServiceEntry,
};
use quicx_tests::{
    child::{ChildServer, PemFiles},
    etcd::{EtcdHarnessError, EtcdServer},
};

const SECRET: &str = "test-cluster-secret";

/// Starts etcd, or prints why the test is skipped and returns `None`.
fn etcd_or_skip() -> Option<EtcdServer> {
    match EtcdServer::start() {
        Ok(e) => Some(e),
        Err(e @ EtcdHarnessError::NotInstalled { .. }) => {
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn etcd_options(etcd: &EtcdServer, ttl: Duration) -> EtcdOptions {
    EtcdOptions::new([etcd.endpoint()])
        .prefix("/quicx-test")
        .lease_ttl(ttl)
}

/// A node in this process: a server with `Who.Name` and the node on top.
async fn node(dev: &DevCertificate, etcd: &EtcdOptions, name: &str) -> (Server, ClusterNode) {
    node_with(dev, etcd, name, |options| options).await
}

/// [`node`] with more cluster options.
async fn node_with(
    dev: &DevCertificate,
    etcd: &EtcdOptions,
    name: &str,
    more: impl FnOnce(ClusterOptions) -> ClusterOptions,
) -> (Server, ClusterNode) {
    let server = Server::builder()
        .dev_certificate(dev)
        .insecure_accept_unverified_client_ids()
        .build()
        .unwrap();
    let n = name.to_owned();
    server.register(
        "Who",
        Service::new()
            .method("Name", move |_ctx: Context, (): ()| {
                let n = n.clone();
                async move { Ok(n) }
            })
            // Binds the calling connection to another identity.
            .method("Rebind", |ctx: Context, id: String| async move {
                ctx.conn().bind_client_id(id);
                Ok(())
            }),
    );
    server.bind("127.0.0.1:0").await.unwrap();
    let options = ClusterOptions::new(
        name,
        etcd.clone(),
        ClientTls::new().trust(dev.certificate()),
        SECRET,
    )
    .service(ServiceEntry::new("Who"));
    let node = ClusterNode::start(&server, more(options)).await.unwrap();
    (server, node)
}

/// A device connected to `addr` as `id`: receives pushes, answers `Device.Ping` with its id.
async fn device(dev: &DevCertificate, addr: SocketAddr, id: &str) -> (quicx::Client, PushReceiver) {
    let (tx, rx) = push_channel(64);
    let who = id.to_owned();
    let client = quicx::Client::builder()
        .tls(ClientTls::new().trust(dev.certificate()))
        .server_name("localhost")
        .client_id(id)
        .push_channel(tx)
        .register(
            "Device",
            Service::new()
                .method("Ping", move |_ctx: Context, n: u32| {
                    let who = who.clone();
                    async move { Ok(format!("{who} pong {n}")) }
                })
                .method("Fail", |_ctx: Context, (): ()| async move {
                    Err::<(), _>(ServiceError::new(1042, "device says no"))
                }),
        )
        .connect_addr(addr, "localhost")
        .await
        .unwrap();
    (client, rx)
}

/// Waits (at most `limit`) until `check` holds; how long it took.
async fn until(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Stores `n` durable commands for `device` through `node`, one at a time, each carrying its
/// number (4 bytes, big-endian); their ids.
async fn numbered_commands(node: &ClusterNode, device: &str, n: u32) -> Vec<u64> {
    numbered_commands_of(node, device, n, 4).await
}

/// [`numbered_commands`] with payloads of `size` bytes (at least 4), the number first.
async fn numbered_commands_of(node: &ClusterNode, device: &str, n: u32, size: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut payload = vec![7u8; size];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        let id = node
            .send_durable(
                device,
                "Device",
                "Cmd",
                Metadata::new(),
                payload,
                Duration::from_secs(120),
            )
            .await
            .unwrap();
        ids.push(id);
    }
    ids
}

/// A node whose durable deliveries wait `ack_timeout` for each receipt, on a server whose
/// ordinary pushes give up after `push_timeout`.
async fn node_acking_within(
    dev: &DevCertificate,
    etcd: &EtcdOptions,
    name: &str,
    ack_timeout: Duration,
    push_timeout: Duration,
) -> (Server, ClusterNode) {
    let server = Server::builder()
        .dev_certificate(dev)
        .insecure_accept_unverified_client_ids()
        .push_timeout(push_timeout)
        .build()
        .unwrap();
    server.bind("127.0.0.1:0").await.unwrap();
    let node = ClusterNode::start(
        &server,
        ClusterOptions::new(
            name,
            etcd.clone(),
            ClientTls::new().trust(dev.certificate()),
            SECRET,
        )
        .durable_ack_timeout(ack_timeout),
    )
    .await
    .unwrap();
    (server, node)
}

async fn manual_ack_device(
    dev: &DevCertificate,
    server: &Server,
    node: &ClusterNode,
    id: &str,
) -> (quicx::Client, PushReceiver) {
    let (tx, rx) = push_channel(16);
    let client = quicx::Client::builder()
        .tls(ClientTls::new().trust(dev.certificate()))
        .server_name("localhost")
        .client_id(id)
        .manual_ack(true)
        .push_channel(tx)
        .connect(&server.local_addr().unwrap().to_string())
        .await
        .unwrap();
    assert!(
        until(Duration::from_secs(5), || node.locate(id).is_some())
            .await
            .is_some()
    );
    (client, rx)
}

/// The durable messages still pending for `id` once acknowledgements had up to 2 s to reach
/// etcd (returns as soon as none is).
async fn pending_after_acks(node: &ClusterNode, id: &str) -> i64 {
    let mut left = node.durable_pending(id).await.unwrap();
    for _ in 0..100 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = node.durable_pending(id).await.unwrap();
    }
    left
}

async fn next_push(rx: &mut PushReceiver) -> quicx::PushMessage {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a push within 5 s")
        .expect("channel open")
}

#[tokio::test]
async fn pushes_calls_and_broadcasts_reach_devices_on_other_nodes() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(3));
    let (sa, a) = node(&dev, &options, "a").await;
    let (sb, b) = node(&dev, &options, "b").await;
    let (sc, c) = node(&dev, &options, "c").await;
    let mut events = a.events();
    let (_d1, mut p1) = device(&dev, sb.local_addr().unwrap(), "device-1").await;
    let (_d2, mut p2) = device(&dev, sc.local_addr().unwrap(), "device-2").await;
    let (_d3, mut p3) = device(&dev, sa.local_addr().unwrap(), "device-3").await;
    let seen = until(Duration::from_secs(5), || {
        [&a, &b, &c].iter().all(|n| {
            n.locate("device-1").as_deref() == Some("b")
                && n.locate("device-2").as_deref() == Some("c")
                && n.locate("device-3").as_deref() == Some("a")
        })
    })
    .await;
    assert!(seen.is_some(), "every node learns where the devices are");
    assert_eq!(a.nodes(), vec!["a", "b", "c"]);

    // A push from node a to a device on node b, and one with receipt to node c.
    a.send_to_client(
        "device-1",
        "Device",
        "Blink",
        Metadata::new().with("k", "v"),
        b"on",
    )
    .await
    .unwrap();
    let msg = next_push(&mut p1).await;
    assert_eq!(
        (msg.service_method.as_str(), &msg.payload[..]),
        ("Blink", &b"on"[..])
    );
    assert_eq!(msg.metadata.get("k"), Some("v"));
    a.send_to_client_with_receipt("device-2", "Device", "Blink", Metadata::new(), b"2")
        .await
        .unwrap();
    assert_eq!(&next_push(&mut p2).await.payload[..], b"2");

    // A reverse call across nodes, and the device's own error, typed.
    let pong: String = a
        .call_client("device-1", "Device", "Ping", &7u32)
        .await
        .unwrap();
    assert_eq!(pong, "device-1 pong 7");
    let pong: String = c
        .call_client("device-3", "Device", "Ping", &8u32)
        .await
        .unwrap();
    assert_eq!(pong, "device-3 pong 8");
    match a
        .call_client::<_, ()>("device-2", "Device", "Fail", &())
        .await
    {
        Err(ClusterError::Device {
            node, code, kind, ..
        }) => {
            assert_eq!(
                (node.as_str(), code, kind.as_str()),
                ("c", Some(1042), "remote")
            );
        }
        other => panic!("expected a device error, got {other:?}"),
    }
    // A device nobody holds.
    match a
        .send_to_client("device-404", "Device", "Blink", Metadata::new(), b"")
        .await
    {
        Err(ClusterError::Offline { client_id }) => assert_eq!(client_id, "device-404"),
        other => panic!("expected offline, got {other:?}"),
    }

    // A cluster-wide broadcast: one result per device, across nodes.
    let mut results = b
        .broadcast(
            "Device",
            "All",
            Metadata::new(),
            b"all",
            Duration::from_secs(2),
        )
        .await;
    results.sort_by(|x, y| x.0.cmp(&y.0));
    let ids: Vec<&str> = results.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, vec!["device-1", "device-2", "device-3"]);
    assert!(results.iter().all(|(_, r)| r.is_ok()), "{results:?}");
    for rx in [&mut p1, &mut p2, &mut p3] {
        assert_eq!(&next_push(rx).await.payload[..], b"all");
    }

    // The application sees devices connect anywhere.
    let mut connected = Vec::new();
    while let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
        if let ClusterEvent::DeviceConnected { client_id, node } = e {
            connected.push((client_id, node));
        }
    }
    connected.sort();
    assert_eq!(
        connected,
        vec![
            ("device-1".to_owned(), "b".to_owned()),
            ("device-2".to_owned(), "c".to_owned()),
            ("device-3".to_owned(), "a".to_owned()),
        ]
    );

    // Nodes take routing requests only with the cluster secret.
    let intruder = quicx::Client::builder()
        .tls(ClientTls::new().trust(dev.certificate()))
        .connect_addr(sb.local_addr().unwrap(), "localhost")
        .await
        .unwrap();
    let err = intruder
        .call_raw(
            quicx_cluster::ROUTING_SERVICE,
            "Push",
            b"",
            &quicx::CallOptions::new(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");
    drop((sc, c));
}

#[tokio::test]
async fn a_device_that_moves_is_reached_on_its_new_node() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(3));
    let (_sa, a) = node(&dev, &options, "a").await;
    let (sb, _b) = node(&dev, &options, "b").await;
    let (sc, _c) = node(&dev, &options, "c").await;
    let mut events = a.events();
    let (old, _p_old) = device(&dev, sb.local_addr().unwrap(), "device-7").await;
    assert!(
        until(Duration::from_secs(5), || a.locate("device-7").as_deref()
            == Some("b"))
        .await
        .is_some()
    );

    // The device comes back through node c (say its network changed).
    let hello = Instant::now();
    let (_new, mut p_new) = device(&dev, sc.local_addr().unwrap(), "device-7").await;
    let moved = until(Duration::from_secs(5), || {
        a.locate("device-7").as_deref() == Some("c")
    })
    .await
    .expect("node a sees the move");
    eprintln!(
        "presence converged {:?} after the hello returned ({:?} after it started)",
        moved,
        hello.elapsed()
    );
    a.send_to_client("device-7", "Device", "Blink", Metadata::new(), b"here")
        .await
        .unwrap();
    assert_eq!(&next_push(&mut p_new).await.payload[..], b"here");
    // Node b closed its stale connection as taken over: the old instance does not come back.
    assert!(
        until(Duration::from_secs(5), || sb.client("device-7").is_none())
            .await
            .is_some(),
        "node b dropped the stale connection"
    );
    assert!(
        until(Duration::from_secs(5), || !old.is_connected())
            .await
            .is_some()
    );
    let mut moved_event = None;
    while let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(300), events.recv()).await {
        if let ClusterEvent::DeviceMoved { .. } = e {
            moved_event = Some(e);
        }
    }
    assert_eq!(
        moved_event,
        Some(ClusterEvent::DeviceMoved {
            client_id: "device-7".into(),
            from: "b".into(),
            to: "c".into()
        })
    );
    // Node b's departure record did not erase node c's.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.locate("device-7").as_deref(), Some("c"));
}

#[tokio::test]
async fn a_connection_bound_to_another_identity_releases_the_old_presence() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(3));
    let (sa, _a) = node(&dev, &options, "a").await;
    let (_sb, b) = node(&dev, &options, "b").await;
    let (client, _pushes) = device(&dev, sa.local_addr().unwrap(), "sensor-1").await;
    assert!(
        until(Duration::from_secs(5), || b.locate("sensor-1").as_deref()
            == Some("a"))
        .await
        .is_some()
    );
    // The same connection is bound to another identity: the old one is gone from the
    // cluster (not left behind until the node's lease ends), the new one is on node a.
    let (): () = client
        .call("Who", "Rebind", &"sensor-2".to_owned())
        .await
        .unwrap();
    assert!(
        until(Duration::from_secs(5), || b.locate("sensor-2").as_deref()
            == Some("a"))
        .await
        .is_some(),
        "the new identity is recorded"
    );
    assert!(
        until(Duration::from_secs(5), || b.locate("sensor-1").is_none())
            .await
            .is_some(),
        "the old identity's record is removed"
    );
    let err = b
        .send_to_client("sensor-1", "Device", "Blink", Metadata::new(), b"x")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClusterError::Offline { .. }),
        "a push to the released identity: {err:?}"
    );
    // A disconnect now removes the new identity's record.
    client.close().await;
    assert!(
        until(Duration::from_secs(5), || b.locate("sensor-2").is_none())
            .await
            .is_some(),
        "the record goes with the connection"
    );
}

/// A `quicx-cluster-node` child process (killed on drop).
fn child_node(pem: &PemFiles, etcd: &EtcdServer, name: &str, ttl_s: u64) -> ChildServer {
    ChildServer::spawn(
        Command::new(env!("CARGO_BIN_EXE_quicx-cluster-node"))
            .arg(&pem.cert)
            .arg(&pem.key)
            .arg(etcd.endpoint())
            .arg("/quicx-test")
            .arg(name)
            .arg(ttl_s.to_string())
            .arg(SECRET),
    )
    .unwrap()
}

#[tokio::test]
async fn a_killed_node_goes_offline_within_its_lease_and_xclients_stop_using_it() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let pem = PemFiles::write(&dev).unwrap();
    let ttl = Duration::from_secs(2);
    let options = etcd_options(&etcd, ttl);
    let (_sa, a) = node(&dev, &options, "a").await;
    let mut doomed = child_node(&pem, &etcd, "doomed", ttl.as_secs());
    let (_d, _p) = device(&dev, doomed.addr, "device-9").await;
    assert!(
        until(Duration::from_secs(5), || a.locate("device-9").as_deref()
            == Some("doomed"))
        .await
        .is_some()
    );

    let discovery = EtcdDiscovery::connect(&options, "Who").await.unwrap();
    let mut endpoints = quicx_discovery::Discovery::watch(&discovery);
    assert_eq!(endpoints.borrow_and_update().len(), 2);
    let xclient = quicx::XClient::builder("Who", discovery)
        .option(quicx::ClientOption::with_tls(
            ClientTls::new().trust(dev.certificate()),
        ))
        .build()
        .unwrap();
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..40 {
        names.insert(xclient.call::<_, String>("Name", &()).await.unwrap());
    }
    assert_eq!(names.into_iter().collect::<Vec<_>>(), vec!["a", "doomed"]);
    // A routed push opens node a's connection to the doomed node.
    a.send_to_client("device-9", "Device", "Blink", Metadata::new(), b"")
        .await
        .unwrap();
    assert_eq!(a.connected_peers().await, vec!["doomed".to_owned()]);

    doomed.kill();
    let killed = Instant::now();
    let offline = until(ttl + Duration::from_secs(5), || {
        a.locate("device-9").is_none()
    })
    .await
    .expect("the dead node's device goes offline");
    eprintln!("device offline {offline:?} after SIGKILL (lease TTL {ttl:?})");
    // The target (TTL + 1 s) is measured by `cargo xtask demo --cluster` and the cluster
    // benchmark; on a loaded test machine this checks that the lease did it, not anything slower
    // (the idle timeout is 15 s).
    assert!(
        offline <= ttl + Duration::from_secs(3),
        "offline after {offline:?}"
    );
    match a
        .send_to_client("device-9", "Device", "Blink", Metadata::new(), b"")
        .await
    {
        Err(ClusterError::Offline { .. }) => {}
        other => panic!("expected offline, got {other:?}"),
    }
    assert!(
        until(Duration::from_secs(2), || endpoints.borrow().len() == 1)
            .await
            .is_some()
    );
    eprintln!("endpoint gone {:?} after SIGKILL", killed.elapsed());
    // Node a lets go of its connection to the dead node (no reconnecting to it forever).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.connected_peers().await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "node a still holds a connection to the dead node"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..20 {
        let name: String = xclient.call("Name", &()).await.unwrap();
        assert_eq!(name, "a", "the XClient stopped using the dead node");
    }
}

#[tokio::test]
async fn after_an_etcd_restart_nodes_register_again_and_routing_resumes() {
    let Some(mut etcd) = etcd_or_skip() else {
        return;
    };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(2));
    let (sa, a) = node(&dev, &options, "a").await;
    let (sb, b) = node(&dev, &options, "b").await;
    let (_d1, mut p1) = device(&dev, sb.local_addr().unwrap(), "device-1").await;
    assert!(
        until(Duration::from_secs(5), || a.locate("device-1").is_some())
            .await
            .is_some()
    );
    let discovery = EtcdDiscovery::connect(&options, "Who").await.unwrap();
    let endpoints = quicx_discovery::Discovery::watch(&discovery);
    assert_eq!(endpoints.borrow().len(), 2);

    etcd.stop();
    // Without etcd, the caches keep routing: pushes reach the known device.
    a.send_to_client("device-1", "Device", "Blink", Metadata::new(), b"during")
        .await
        .unwrap();
    assert_eq!(&next_push(&mut p1).await.payload[..], b"during");
    // A device that connects while etcd is down is recorded once it is back.
    let (_d2, mut p2) = device(&dev, sa.local_addr().unwrap(), "device-2").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        endpoints.borrow().len(),
        2,
        "the discovery keeps the last known list"
    );
    etcd.restart().unwrap();

    let known = until(Duration::from_secs(10), || {
        b.locate("device-2").as_deref() == Some("a")
    })
    .await
    .expect("the device bound during the outage is recorded after it");
    eprintln!("presence healed {known:?} after etcd was back");
    b.send_to_client("device-2", "Device", "Blink", Metadata::new(), b"after")
        .await
        .unwrap();
    assert_eq!(&next_push(&mut p2).await.payload[..], b"after");
    a.send_to_client("device-1", "Device", "Blink", Metadata::new(), b"after")
        .await
        .unwrap();
    assert_eq!(&next_push(&mut p1).await.payload[..], b"after");
    // Registrations survived (or were put again): the discovery still lists both nodes.
    assert!(
        until(Duration::from_secs(5), || endpoints.borrow().len() == 2)
            .await
            .is_some()
    );
}

#[tokio::test]
async fn a_graceful_shutdown_deregisters_first() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(30));
    let (_sa, a) = node(&dev, &options, "a").await;
    let (sb, b) = node(&dev, &options, "b").await;
    let (_d, _p) = device(&dev, sb.local_addr().unwrap(), "device-1").await;
    let discovery = EtcdDiscovery::connect(&options, "Who").await.unwrap();
    let endpoints = quicx_discovery::Discovery::watch(&discovery);
    assert!(
        until(Duration::from_secs(5), || a.locate("device-1").is_some())
            .await
            .is_some()
    );
    assert_eq!(endpoints.borrow().len(), 2);
    b.shutdown(Duration::from_secs(1)).await;
    // Gone at once, not after the (30 s) lease.
    let gone = until(Duration::from_secs(2), || {
        endpoints.borrow().len() == 1 && a.locate("device-1").is_none()
    })
    .await;
    assert!(gone.is_some(), "deregistered on shutdown");
    assert!(!a.nodes().contains(&"b".to_owned()));
}

#[tokio::test]
async fn a_durable_message_survives_the_node_that_accepted_it() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(2));
    let (sa, a) = node(&dev, &options, "a").await;
    let (sb, b) = node(&dev, &options, "b").await;
    // The device is offline; node a accepts three commands for it.
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            a.send_durable(
                "device-8",
                "Device",
                "Cmd",
                Metadata::new(),
                format!("cmd-{i}"),
                Duration::from_secs(60),
            )
            .await
            .unwrap(),
        );
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    assert_eq!(b.durable_pending("device-8").await.unwrap(), 3);
    // Node a dies (its lease and connections go without a word).
    drop(a);
    sa.shutdown(Duration::ZERO).await;
    // The device connects to node b and gets the commands, in order, once.
    let (_d, mut rx) = device(&dev, sb.local_addr().unwrap(), "device-8").await;
    for (i, id) in ids.iter().enumerate() {
        let msg = next_push(&mut rx).await;
        assert_eq!(msg.payload, format!("cmd-{i}").as_bytes());
        assert_eq!(msg.durable_id(), Some(*id));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "nothing more"
    );
    assert_eq!(
        pending_after_acks(&b, "device-8").await,
        0,
        "acknowledged messages leave etcd"
    );
    // Sent while the device is online on b, from b: delivered at once.
    b.send_durable(
        "device-8",
        "Device",
        "Cmd",
        Metadata::new(),
        "live",
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(&next_push(&mut rx).await.payload[..], b"live");
}

/// Sends one durable message of `size` bytes to `device` through `node` (TTL 60 s).
async fn durable_of(node: &ClusterNode, device: &str, size: usize) -> Result<u64, ClusterError> {
    node.send_durable(
        device,
        "Device",
        "Cmd",
        Metadata::new(),
        vec![b'x'; size],
        Duration::from_secs(60),
    )
    .await
}

fn ids_of(pending: &[quicx::PendingMessage]) -> Vec<u64> {
    pending.iter().map(|p| p.id).collect()
}

#[tokio::test]
async fn cluster_durable_bounds_hold_under_each_policy_and_list_and_cancel_work() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(2));
    // Node a refuses over the per-device bytes; node b drops the oldest over the per-device
    // count.
    let (_sa, a) = node_with(&dev, &options, "a", |o| {
        o.durable_limits(ClusterDurableLimits::default().per_device(10, 1000))
    })
    .await;
    let (sb, b) = node_with(&dev, &options, "b", |o| {
        o.durable_limits(
            ClusterDurableLimits::default()
                .per_device(3, 1 << 20)
                .overflow(Overflow::DropOldest),
        )
    })
    .await;

    // Bytes of one device: two 400-byte messages fit in 1,000, a third does not.
    durable_of(&a, "dev-bytes", 400).await.unwrap();
    durable_of(&a, "dev-bytes", 400).await.unwrap();
    let err = durable_of(&a, "dev-bytes", 400).await.unwrap_err();
    assert!(matches!(err, ClusterError::DurableFull(_)), "{err:?}");
    assert_eq!(a.durable_pending("dev-bytes").await.unwrap(), 2);
    // A message above the per-device bytes on its own is refused by either policy.
    let err = durable_of(&b, "dev-big", 2 << 20).await.unwrap_err();
    assert!(matches!(err, ClusterError::DurableFull(_)), "{err:?}");

    // Messages of one device, dropping the oldest: 5 sent, the last 3 stay, 2 counted.
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(durable_of(&b, "dev-count", 10).await.unwrap() as u64);
    }
    let listed = b.durable_messages("dev-count").await.unwrap();
    assert_eq!(ids_of(&listed), ids[2..]);
    assert!(
        listed
            .iter()
            .all(|p| p.size == 10 && p.service_method == "Cmd")
    );
    assert_eq!(b.durable_stats().overflowed, 2);
    // Any node lists them.
    assert_eq!(
        ids_of(&a.durable_messages("dev-count").await.unwrap()),
        ids[2..]
    );

    // Cancel the middle one; the device gets the other two, in order, and they are counted
    // as delivered by the node that holds it.
    assert!(b.cancel_durable("dev-count", ids[3]).await.unwrap());
    assert!(!b.cancel_durable("dev-count", ids[3]).await.unwrap());
    assert_eq!(
        ids_of(&b.durable_messages("dev-count").await.unwrap()),
        [ids[2], ids[4]]
    );
    let (_d, mut rx) = device(&dev, sb.local_addr().unwrap(), "dev-count").await;
    assert_eq!(next_push(&mut rx).await.durable_id(), Some(ids[2]));
    assert_eq!(next_push(&mut rx).await.durable_id(), Some(ids[4]));
    assert_eq!(pending_after_acks(&b, "dev-count").await, 0);
    assert!(
        until(Duration::from_secs(5), || b.durable_stats().delivered == 2)
            .await
            .is_some(),
        "{:?}",
        b.durable_stats()
    );

    // Each node's watch shows the cluster's backlog: dev-bytes' two messages.
    for node in [&a, &b] {
        assert!(
            until(Duration::from_secs(5), || {
                let s = node.durable_stats();
                s.pending == 2 && s.pending_devices == 1 && s.pending_bytes >= 800
            })
            .await
            .is_some(),
            "{:?}",
            node.durable_stats()
        );
    }

    // In all: a node bounded at 4 messages takes 2 more, then refuses (as its watch shows the
    // cluster).
    let (_sc, c) = node_with(&dev, &options, "c", |o| {
        o.durable_limits(ClusterDurableLimits::default().total(4, 1 << 30))
    })
    .await;
    assert!(
        until(Duration::from_secs(5), || c.durable_stats().pending == 2)
            .await
            .is_some()
    );
    durable_of(&c, "dev-total", 10).await.unwrap();
    assert!(
        until(Duration::from_secs(5), || c.durable_stats().pending == 3)
            .await
            .is_some()
    );
    durable_of(&c, "dev-other", 10).await.unwrap();
    assert!(
        until(Duration::from_secs(5), || c.durable_stats().pending == 4)
            .await
            .is_some()
    );
    let err = durable_of(&c, "dev-third", 10).await.unwrap_err();
    assert!(matches!(err, ClusterError::DurableFull(_)), "{err:?}");
}

/// A device's expired messages make room under either policy, and are counted as expired.
#[tokio::test]
async fn expired_cluster_durable_messages_make_room_for_new_ones() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(2));
    let (_sa, a) = node_with(&dev, &options, "a", |o| {
        o.durable_limits(ClusterDurableLimits::default().per_device(2, 1 << 20))
    })
    .await;
    let short = |i: u32| {
        a.send_durable(
            "dev-ttl",
            "Device",
            "Cmd",
            Metadata::new(),
            i.to_be_bytes(),
            // Long enough that the third send below (each one an etcd transaction) surely
            // comes before they expire.
            Duration::from_secs(2),
        )
    };
    short(0).await.unwrap();
    short(1).await.unwrap();
    let err = durable_of(&a, "dev-ttl", 10).await.unwrap_err();
    assert!(matches!(err, ClusterError::DurableFull(_)), "{err:?}");
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    // Both expired: the device (never connected) takes two new ones, and nothing overflowed.
    let kept = [
        durable_of(&a, "dev-ttl", 10).await.unwrap() as u64,
        durable_of(&a, "dev-ttl", 10).await.unwrap() as u64,
    ];
    assert_eq!(ids_of(&a.durable_messages("dev-ttl").await.unwrap()), kept);
    assert_eq!(a.durable_pending("dev-ttl").await.unwrap(), 2);
    let stats = a.durable_stats();
    assert_eq!((stats.expired, stats.overflowed), (2, 0), "{stats:?}");
}

/// Sends racing through two nodes to one device: the per-device bound holds exactly.
#[tokio::test]
async fn concurrent_durable_sends_through_two_nodes_never_overshoot_a_device_bound() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(2));
    let limits = ClusterDurableLimits::default().per_device(10, 1 << 20);
    let (_sa, a) = node_with(&dev, &options, "a", |o| o.durable_limits(limits)).await;
    let (_sb, b) = node_with(&dev, &options, "b", |o| o.durable_limits(limits)).await;
    let sends = (0..40).map(|i| {
        let node = if i % 2 == 0 { &a } else { &b };
        durable_of(node, "dev-race", 10)
    });
    let results = futures_util::future::join_all(sends).await;
    let stored = results.iter().filter(|r| r.is_ok()).count();
    for r in &results {
        if let Err(e) = r {
            assert!(matches!(e, ClusterError::DurableFull(_)), "{e:?}");
        }
    }
    assert_eq!(stored, 10, "{results:?}");
    assert_eq!(a.durable_pending("dev-race").await.unwrap(), 10);
}

/// Sends that wait together for one device are written many to an etcd transaction: their ids
/// still differ and grow in the order written, a backlog whose transactions straddle the pages
/// a delivery reads arrives whole and in order, and dropping the oldest can drop messages of
/// the same transaction.
#[tokio::test]
async fn a_burst_to_one_device_is_written_in_batches_and_delivered_whole_in_order() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(2));
    let (sa, a) = node(&dev, &options, "a").await;
    let (_sb, b) = node_with(&dev, &options, "b", |o| {
        o.durable_limits(
            ClusterDurableLimits::default()
                .per_device(3, 1 << 20)
                .overflow(Overflow::DropOldest),
        )
    })
    .await;

    // 600 sends, 50 waiting at a time (transactions of up to 50 do not divide the 256 a
    // delivery reads at a time).
    let n = 600u32;
    let ids: Vec<u64> = futures_util::stream::iter(0..n)
        .map(|i| {
            let a = &a;
            async move {
                a.send_durable(
                    "burst",
                    "Device",
                    "Cmd",
                    Metadata::new(),
                    i.to_be_bytes(),
                    Duration::from_secs(60),
                )
                .await
                .unwrap() as u64
            }
        })
        .buffered(50)
        .collect()
        .await;
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "every id differs");
    let listed = ids_of(&a.durable_messages("burst").await.unwrap());
    assert_eq!(listed, sorted, "listed whole, in id order");
    let (_d, mut rx) = device(&dev, sa.local_addr().unwrap(), "burst").await;
    for id in &sorted {
        let msg = next_push(&mut rx).await;
        assert_eq!(msg.durable_id(), Some(*id));
        // What was sent with this id.
        let i = ids.iter().position(|x| x == id).unwrap() as u32;
        assert_eq!(msg.payload[..], i.to_be_bytes());
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "nothing more"
    );
    assert_eq!(pending_after_acks(&a, "burst").await, 0);

    // 10 sends at once to a device bounded at 3, dropping the oldest: all return an id, the 3
    // latest stay, 7 are counted.
    let sends = (0..10).map(|_| durable_of(&b, "dropping", 10));
    let mut ids: Vec<u64> = futures_util::future::join_all(sends)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids_of(&b.durable_messages("dropping").await.unwrap()),
        ids[7..]
    );
    assert_eq!(b.durable_stats().overflowed, 7);
}

/// The node that accepted the messages is a process of its own, killed with SIGKILL.
#[tokio::test]
async fn durable_messages_survive_a_sigkill_of_the_node_that_accepted_them() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let pem = PemFiles::write(&dev).unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(2));
    let (sb, b) = node(&dev, &options, "b").await;
    let mut doomed = child_node(&pem, &etcd, "doomed", 2);
    let sender = quicx::Client::builder()
        .tls(ClientTls::new().trust(dev.certificate()))
        .connect_addr(doomed.addr, "localhost")
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let id: u64 = sender
            .call("Durable", "Send", &("device-k", format!("cmd-{i}")))
            .await
            .unwrap();
        ids.push(id);
    }
    assert_eq!(b.durable_pending("device-k").await.unwrap(), 3);
    doomed.kill();
    // The device connects to node b and gets the commands, in order, once.
    let (_d, mut rx) = device(&dev, sb.local_addr().unwrap(), "device-k").await;
    for (i, id) in ids.iter().enumerate() {
        let msg = next_push(&mut rx).await;
        assert_eq!(msg.payload, format!("cmd-{i}").as_bytes());
        assert_eq!(msg.durable_id(), Some(*id));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "nothing more"
    );
    assert_eq!(pending_after_acks(&b, "device-k").await, 0);
}

#[tokio::test]
async fn a_durable_message_refused_by_a_connected_device_comes_again() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(2));
    let (sa, a) = node(&dev, &options, "a").await;
    let (_device, mut rx) = manual_ack_device(&dev, &sa, &a, "device-5").await;
    let id = a
        .send_durable(
            "device-5",
            "Device",
            "Cmd",
            Metadata::new(),
            "reboot",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    // The device's application drops it without acknowledging (it could not process it).
    let first = next_push(&mut rx).await;
    assert_eq!(first.durable_id(), Some(id));
    drop(first);
    let mut refused = Instant::now();
    // The device stays connected: the node sends it again by itself, after its retry pause (no
    // reconnect, no new message to wake it), and this time it is acknowledged and leaves etcd.
    // A copy sooner than the pause is a second run the node's own etcd watch asked for: it is
    // refused too, so the one acknowledged is owed to the retry.
    let again = loop {
        let copy = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("the refused message comes again while the device stays connected")
            .unwrap();
        assert_eq!(copy.durable_id(), Some(id));
        if refused.elapsed() >= Duration::from_millis(900) {
            break copy;
        }
        drop(copy);
        refused = Instant::now();
    };
    assert_eq!(&again.payload[..], b"reboot");
    assert!(again.ack());
    assert_eq!(
        pending_after_acks(&a, "device-5").await,
        0,
        "the acknowledged message leaves etcd"
    );
}

#[tokio::test]
async fn a_durable_message_waits_for_a_slow_device_ack_not_the_push_timeout() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(2));
    // Ordinary pushes give up after 300 ms on this server; durable ones wait 10 s for the ack.
    let (server, node) = node_acking_within(
        &dev,
        &options,
        "slow",
        Duration::from_secs(10),
        Duration::from_millis(300),
    )
    .await;
    let (_device, mut rx) = manual_ack_device(&dev, &server, &node, "device-6").await;
    node.send_durable(
        "device-6",
        "Device",
        "Cmd",
        Metadata::new(),
        "calibrate",
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let msg = next_push(&mut rx).await;
    assert!(!msg.is_redelivered());
    // The device's application takes a second, well past the push timeout, then acknowledges.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(msg.ack(), "the acknowledgement still counts");
    assert_eq!(
        pending_after_acks(&node, "device-6").await,
        0,
        "the acknowledged message leaves etcd"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), rx.recv())
            .await
            .is_err(),
        "not sent again"
    );
}

#[tokio::test]
async fn a_long_backlog_drains_in_order_and_a_refusal_in_the_middle_resends_from_there() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(2));
    let (sa, a) = node(&dev, &options, "a").await;
    // More than one read of etcd (256 at a time), stored while the device is offline.
    let ids = numbered_commands(&a, "device-9", 300).await;
    let (_device, mut rx) = manual_ack_device(&dev, &sa, &a, "device-9").await;
    // The application acknowledges everything but the first copy of message 100: the run stops
    // there (the pushes after it in flight are cancelled, never handed over) and the node sends
    // from message 100 on again.
    let mut seen = Vec::new();
    let mut refused = false;
    while seen.len() < 300 {
        let msg = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("the backlog drains")
            .unwrap();
        let i = u32::from_be_bytes(msg.payload[..].try_into().unwrap()) as usize;
        assert_eq!(msg.durable_id(), Some(ids[i]));
        if i == 100 && !refused {
            refused = true;
            drop(msg);
            continue;
        }
        assert!(msg.ack());
        seen.push(i);
    }
    assert_eq!(seen, (0..300).collect::<Vec<_>>(), "in order, each once");
    assert!(refused);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "nothing more"
    );
    assert_eq!(pending_after_acks(&a, "device-9").await, 0);
}

#[tokio::test]
async fn a_device_acknowledging_by_hand_gets_a_backlog_once_each_however_long_the_window_waits() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(2));
    // Each receipt may take 2 s; the application takes 700 ms per message, so the fifth of
    // the pushes sent at once waits 2.8 s at the device for the four before it.
    let (server, node) = node_acking_within(
        &dev,
        &options,
        "patient",
        Duration::from_secs(2),
        Duration::from_secs(10),
    )
    .await;
    let ids = numbered_commands(&node, "device-4", 5).await;
    let (_device, mut rx) = manual_ack_device(&dev, &server, &node, "device-4").await;
    let started = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let msg = next_push(&mut rx).await;
        assert_eq!(msg.durable_id(), Some(*id), "message {i}");
        tokio::time::sleep(Duration::from_millis(700)).await;
        // A push whose receipt the node gave up on can no longer be acknowledged.
        assert!(msg.ack(), "message {i}");
    }
    // No run stopped at a timeout (its retry pause would show), nothing sent twice.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err(),
        "nothing more"
    );
    assert_eq!(pending_after_acks(&node, "device-4").await, 0);
}

/// A backlog whose one read from etcd (256 messages) is far above the etcd client's default
/// 4 MiB reply limit is delivered: 300 messages of 60 KiB.
#[tokio::test]
async fn a_backlog_of_large_durable_messages_is_delivered() {
    let Some(etcd) = etcd_or_skip() else { return };
    let dev = DevCertificate::localhost().unwrap();
    let options = etcd_options(&etcd, Duration::from_secs(5));
    let (server, node) = node(&dev, &options, "a").await;
    numbered_commands_of(&node, "big-device", 300, 60 * 1024).await;
    let (_device, mut rx) = device(&dev, server.local_addr().unwrap(), "big-device").await;
    for i in 0..300u32 {
        let msg = next_push(&mut rx).await;
        assert_eq!(msg.payload.len(), 60 * 1024);
        assert_eq!(msg.payload[..4], i.to_be_bytes(), "message {i} in order");
    }
    node.shutdown(Duration::from_secs(1)).await;
}

/// A node reads a prefix in pages of a thousand keys at one revision: a presence larger than a
/// page arrives whole, with nothing lost or repeated at the page boundaries.
#[tokio::test]
async fn a_presence_larger_than_a_snapshot_page_is_read_whole() {
    let Some(etcd) = etcd_or_skip() else { return };
    let options = etcd_options(&etcd, Duration::from_secs(5));
    // 2,345 devices held by a node that is not running: more than two pages.
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let n = 2345;
    let ids: Vec<String> = (0..n).map(|i| format!("far-{i:05}")).collect();
    for chunk in ids.chunks(100) {
        let puts: Vec<_> = chunk
            .iter()
            .map(|id| {
                etcd_client::TxnOp::put(
                    format!("/quicx-test/presence/{id}"),
                    r#"{"node":"elsewhere","conn":7}"#,
                    None,
                )
            })
            .collect();
        client
            .txn(etcd_client::Txn::new().and_then(puts))
            .await
            .unwrap();
    }
    let dev = DevCertificate::localhost().unwrap();
    let (_server, node) = node(&dev, &options, "reader").await;
    let located: Vec<_> = ids.iter().filter_map(|id| node.locate(id)).collect();
    assert_eq!(located.len(), n, "every device of the snapshot is known");
    assert!(located.iter().all(|at| at == "elsewhere"));
    assert_eq!(node.locate("far-99999"), None);
    node.shutdown(Duration::ZERO).await;
}

/// A node refuses a short (or empty) secret: routing requests carry none, and an empty one
/// would match them. Checked before etcd is asked, so no etcd is needed.
#[tokio::test]
async fn a_node_refuses_a_short_cluster_secret() {
    let dev = DevCertificate::localhost().unwrap();
    let server = Server::builder().dev_certificate(&dev).build().unwrap();
    server.bind("127.0.0.1:0").await.unwrap();
    for secret in ["", "short"] {
        let options = ClusterOptions::new(
            "a",
            // Nothing listens there: reaching etcd would fail differently.
            EtcdOptions::new(["http://127.0.0.1:1"]).prefix("/quicx-test"),
            ClientTls::new().trust(dev.certificate()),
            secret,
        );
        let err = ClusterNode::start(&server, options).await.unwrap_err();
        assert!(matches!(err, ClusterError::Config(_)), "{err:?}");
    }
}
