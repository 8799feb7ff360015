//! mDNS: a server advertises, a client finds it by service name and calls it, withdrawal removes
//! it. Runs inside a network namespace the test creates (only `lo`), never on the machine's real
//! interfaces; where namespaces cannot be created the test says so and is skipped.

use std::time::{Duration, Instant};

use quicx::{
    ClientOption, ClientTls, DevCertificate, FailMode, SelectMode, Server, XClient,
    discovery::{
        Announcement, Discovery, MdnsAdvertiser, MdnsDiscovery, MdnsOptions, wait_for_endpoints,
    },
};
use quicx_discovery::sandbox::enter_private_network_namespace;
use quicx_tests::{Args, Reply, arith};

fn in_private_namespace(test: impl std::future::Future<Output = ()>) {
    if let Err(reason) = enter_private_network_namespace() {
        eprintln!(
            "SKIPPED: cannot create a private network namespace ({reason}); this mDNS test would \
             otherwise multicast on the machine's real interfaces. Run it as root."
        );
        return;
    }
    // Built after unshare: the runtime's threads live in the namespace too.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(test);
}

#[test]
fn mdns_advertise_discover_call_withdraw() {
    in_private_namespace(async {
        let dev = DevCertificate::localhost().unwrap();
        let server = Server::builder().dev_certificate(&dev).build().unwrap();
        let (tx, _logs) = tokio::sync::mpsc::unbounded_channel();
        server.register("Arith", arith(Default::default(), tx));
        let addr = server.bind("127.0.0.1:0").await.unwrap();

        let options = MdnsOptions::default();
        let advertiser = MdnsAdvertiser::new(&options).unwrap();
        let mut announcement = Announcement::new("Arith", "arith-1", addr.port());
        announcement.addresses = vec![addr.ip()];
        announcement.weight = 7;
        announcement.group = Some("lab".into());
        announcement.metadata.insert("version".into(), "1.2".into());
        let registration = advertiser.advertise(&announcement).unwrap();
        // A server of another service on the same LAN must not be picked up.
        let mut other = Announcement::new("Other", "other-1", addr.port() + 1);
        other.addresses = vec![addr.ip()];
        let _other = advertiser.advertise(&other).unwrap();

        let started = Instant::now();
        let discovery = MdnsDiscovery::new("Arith", &options).unwrap();
        let found = wait_for_endpoints(&discovery, Duration::from_secs(10)).await;
        let found_after = started.elapsed();
        assert_eq!(found.len(), 1, "{found:?}");
        let endpoint = &found[0];
        assert_eq!(endpoint.address, addr.to_string());
        assert_eq!(endpoint.server_name, "localhost");
        assert_eq!(endpoint.weight, 7);
        assert_eq!(endpoint.group.as_deref(), Some("lab"));
        assert_eq!(
            endpoint.metadata.get("version").map(String::as_str),
            Some("1.2")
        );
        // The other service's announcement has had time to arrive too; it is filtered out.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(Discovery::endpoints(&discovery).await.len(), 1);

        let mut watch = Discovery::watch(&discovery);
        let xclient = XClient::new(
            "Arith",
            FailMode::Failover,
            SelectMode::RoundRobin,
            discovery,
            ClientOption::with_tls(ClientTls::empty().trust(dev.certificate())),
        )
        .unwrap();
        let reply: Reply = xclient.call("Mul", &Args { a: 10, b: 20 }).await.unwrap();
        assert_eq!(reply.c, 200);

        let withdrawn = Instant::now();
        registration.withdraw().await;
        tokio::time::timeout(Duration::from_secs(10), watch.wait_for(|e| e.is_empty()))
            .await
            .expect("withdrawal removes the endpoint")
            .unwrap();
        let gone_after = withdrawn.elapsed();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !xclient.endpoints().is_empty() {
            assert!(Instant::now() < deadline, "the XClient kept the endpoint");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!(
            "mDNS: found the server after {:.0} ms, noticed it gone after {:.0} ms",
            found_after.as_secs_f64() * 1e3,
            gone_after.as_secs_f64() * 1e3
        );
        xclient.close().await;
        server.shutdown(Duration::from_secs(1)).await;
    });
}

#[test]
fn mdns_loopback_only_option() {
    in_private_namespace(async {
        let options = MdnsOptions::loopback();
        let advertiser = MdnsAdvertiser::new(&options).unwrap();
        let mut a = Announcement::new("Echo", "echo-1", 9000);
        a.addresses = vec!["127.0.0.1".parse().unwrap()];
        let _reg = advertiser.advertise(&a).unwrap();
        let discovery = MdnsDiscovery::new("Echo", &options).unwrap();
        let found = wait_for_endpoints(&discovery, Duration::from_secs(10)).await;
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].address, "127.0.0.1:9000");
    });
}

#[test]
fn mdns_named_interface_option() {
    in_private_namespace(async {
        let options = MdnsOptions {
            interfaces: quicx::discovery::Interfaces::Named(vec!["lo".into()]),
            ..MdnsOptions::default()
        };
        let advertiser = MdnsAdvertiser::new(&options).unwrap();
        let mut a = Announcement::new("Named", "named-1", 9100);
        a.addresses = vec!["127.0.0.1".parse().unwrap()];
        let _reg = advertiser.advertise(&a).unwrap();
        let discovery = MdnsDiscovery::new("Named", &options).unwrap();
        let found = wait_for_endpoints(&discovery, Duration::from_secs(10)).await;
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].address, "127.0.0.1:9100");
    });
}
