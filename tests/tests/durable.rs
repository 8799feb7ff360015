//! Durable pushes: stored crash-safe, delivered in order once the device is bound, each seen
//! once by the application, across a SIGKILL of the server, a connection lost before the
//! acknowledgement, and a device that crashes before acking in manual mode (a device process
//! killed with SIGKILL included).

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use quicx::{
    ClientEvent, ClientTls, DevCertificate, DurableLimits, Error, Fsync, Metadata, Overflow,
    PushMessage, PushReceiver, Server, push_channel,
};
use quicx_tests::{
    child::{ChildServer, PemFiles},
    relay::{Direction, Impairment, Relay},
};

/// A fresh path for a store, removed on drop.
struct TempStore(PathBuf);

impl TempStore {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "quicx-durable-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join("store.redb")
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn server(dev: &DevCertificate, store: &TempStore, limits: DurableLimits) -> Server {
    let server = Server::builder()
        .dev_certificate(dev)
        .insecure_accept_unverified_client_ids()
        .durable_store(store.file(), limits)
        .build()
        .unwrap();
    server.bind("127.0.0.1:0").await.unwrap();
    server
}

/// A certificate, a fresh store and a server on it with `limits`.
async fn started(limits: DurableLimits) -> (DevCertificate, TempStore, Server) {
    let dev = DevCertificate::localhost().unwrap();
    let store = TempStore::new();
    let server = server(&dev, &store, limits).await;
    (dev, store, server)
}

async fn device(
    dev: &DevCertificate,
    addr: SocketAddr,
    id: &str,
    manual_ack: bool,
) -> (quicx::Client, PushReceiver) {
    device_with(
        ClientTls::new().trust(dev.certificate()),
        addr,
        id,
        manual_ack,
    )
    .await
}

async fn device_with(
    tls: ClientTls,
    addr: SocketAddr,
    id: &str,
    manual_ack: bool,
) -> (quicx::Client, PushReceiver) {
    let (tx, rx) = push_channel(4096);
    let client = quicx::Client::builder()
        .tls(tls)
        .client_id(id)
        .push_channel(tx)
        .manual_ack(manual_ack)
        .connect_addr(addr, "localhost")
        .await
        .unwrap();
    (client, rx)
}

/// Sends `n` durable messages to `device`, the i-th saying `i` in decimal; their ids.
async fn send_numbered(server: &Server, device: &str, n: u32) -> Vec<u64> {
    send_all(server, device, (0..n).map(|i| i.to_string().into_bytes())).await
}

/// A device `id` taking its pushes in `handler`.
async fn handler_device(
    dev: &DevCertificate,
    server: &Server,
    id: &str,
    handler: quicx::PushSender,
) -> quicx::Client {
    quicx::Client::builder()
        .tls(ClientTls::new().trust(dev.certificate()))
        .client_id(id)
        .push_channel(handler)
        .connect_addr(server.local_addr().unwrap(), "localhost")
        .await
        .unwrap()
}

async fn next(rx: &mut PushReceiver) -> PushMessage {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a push within 10 s")
        .expect("channel open")
}

/// Nothing more arrives within `wait`.
async fn quiet(rx: &mut PushReceiver, wait: Duration) {
    if let Ok(Some(m)) = tokio::time::timeout(wait, rx.recv()).await {
        panic!("unexpected push {m:?}");
    }
}

/// Sends one durable message per payload to `device` (TTL 60 s); their ids.
async fn send_all(
    server: &Server,
    device: &str,
    payloads: impl IntoIterator<Item = Vec<u8>>,
) -> Vec<u64> {
    let mut ids = Vec::new();
    for payload in payloads {
        let id = server
            .send_durable(
                device,
                "Device",
                "Cmd",
                Metadata::new(),
                payload,
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        ids.push(id);
    }
    ids
}

/// The ids of `device`'s pending messages, in order.
async fn pending_ids(server: &Server, device: &str) -> Vec<u64> {
    let pending = server.durable_pending(device).await.unwrap();
    pending.iter().map(|p| p.id).collect()
}

/// Whether `device` comes to have exactly `n` messages pending within `limit`.
async fn pending_becomes(server: &Server, device: &str, n: usize, limit: Duration) -> bool {
    until(limit, async || {
        server.durable_pending(device).await.unwrap().len() == n
    })
    .await
}

/// Whether the store comes to hold nothing for anyone within `limit`.
async fn nothing_pending(server: &Server, limit: Duration) -> bool {
    until(limit, async || server.stats().durable_pending == 0).await
}

async fn until(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn an_online_device_receives_a_durable_message_at_once() {
    let (dev, _store, server) = started(DurableLimits::default()).await;
    let (_d, mut rx) = device(&dev, server.local_addr().unwrap(), "device-1", false).await;
    let id = server
        .send_durable(
            "device-1",
            "Device",
            "Open",
            Metadata::new().with("k", "v"),
            b"now",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let msg = next(&mut rx).await;
    assert_eq!(&msg.payload[..], b"now");
    assert_eq!(msg.durable_id(), Some(id));
    assert_eq!(msg.metadata.get("k"), Some("v"));
    assert!(!msg.is_redelivered());
    assert!(pending_becomes(&server, "device-1", 0, Duration::from_secs(5)).await);
    assert_eq!(server.stats().durable_delivered, 1);
    assert_eq!(server.stats().durable_pending, 0);
}

/// A sender that stops waiting for `send_durable` (its own timeout) after the message reached
/// the store does not hold the message back: a bound device still gets it at once.
#[tokio::test]
async fn a_durable_send_abandoned_before_its_commit_is_still_delivered_at_once() {
    let (dev, _store, server) = started(DurableLimits::default()).await;
    let (_client, mut rx) = device(&dev, server.local_addr().unwrap(), "d", false).await;
    // Each send polled once (the message goes to the store's writer), then dropped unless it
    // completed in that poll; until one was abandoned.
    let mut sent = Vec::new();
    for i in 0..20 {
        let payload = format!("m{i}");
        let mut sending = Box::pin(server.send_durable(
            "d",
            "Device",
            "M",
            Metadata::new(),
            payload.clone(),
            Duration::from_secs(60),
        ));
        sent.push(payload);
        match futures_util::FutureExt::now_or_never(&mut sending) {
            Some(done) => {
                done.unwrap();
            }
            None => break,
        }
    }
    assert!(sent.len() < 20, "every send committed within one poll");
    for payload in &sent {
        assert_eq!(&next(&mut rx).await.payload[..], payload.as_bytes());
    }
}

/// Through a push handler, durable messages are acknowledged once the handler returned: the
/// store empties, and nothing comes twice.
#[tokio::test]
async fn a_push_handler_receives_durable_messages_and_they_are_acknowledged() {
    let (dev, _store, server) = started(DurableLimits::default()).await;
    send_numbered(&server, "device-h", 300).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = quicx::push_handler(move |msg| {
        let _ = tx.send(msg.payload);
    });
    let client = handler_device(&dev, &server, "device-h", handler).await;
    for i in 0..300u32 {
        let payload = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a message within 10 s")
            .unwrap();
        assert_eq!(std::str::from_utf8(&payload).unwrap(), i.to_string());
    }
    assert!(nothing_pending(&server, Duration::from_secs(5)).await);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "nothing twice"
    );
    client.close().await;
}

/// A push handler that panics on a durable message refuses it: the message comes again, and
/// is acknowledged once the handler takes it.
#[tokio::test]
async fn a_durable_message_whose_handler_panicked_comes_again() {
    let (dev, _store, server) = started(DurableLimits::default()).await;
    send_all(&server, "device-p", [b"once".to_vec()]).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let panicked = std::sync::atomic::AtomicBool::new(false);
    let handler = quicx::push_handler(move |msg| {
        if !panicked.swap(true, std::sync::atomic::Ordering::SeqCst) {
            panic!("the handler fails the first time");
        }
        let _ = tx.send(msg.payload);
    });
    let sender = handler.clone();
    let client = handler_device(&dev, &server, "device-p", handler).await;
    let payload = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the message again within 10 s")
        .unwrap();
    assert_eq!(&payload[..], b"once");
    assert_eq!(sender.dropped(), 1, "the panic counted as a drop");
    assert!(nothing_pending(&server, Duration::from_secs(5)).await);
    client.close().await;
}

#[tokio::test]
async fn messages_for_an_offline_device_arrive_in_order_once_it_connects() {
    let (dev, _store, server) = started(DurableLimits::default()).await;
    send_numbered(&server, "device-2", 300).await;
    assert_eq!(server.durable_pending("device-2").await.unwrap().len(), 300);
    let (_d, mut rx) = device(&dev, server.local_addr().unwrap(), "device-2", false).await;
    for i in 0..300u32 {
        let msg = next(&mut rx).await;
        assert_eq!(std::str::from_utf8(&msg.payload).unwrap(), i.to_string());
    }
    quiet(&mut rx, Duration::from_millis(300)).await;
    assert!(nothing_pending(&server, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn quicx2_devices_get_a_durable_stream_and_quicx1_devices_one_push_each() {
    let (dev, _store, server) = started(DurableLimits::default()).await;
    for device in ["new-device", "old-device"] {
        send_numbered(&server, device, 500).await;
    }
    let addr = server.local_addr().unwrap();
    let (_new, mut new_rx) = device(&dev, addr, "new-device", false).await;
    let v1_only = ClientTls::new()
        .trust(dev.certificate())
        .with_alpn(vec![quicx::ALPN.to_vec()]);
    let (_old, mut old_rx) = device_with(v1_only, addr, "old-device", false).await;
    assert_eq!(server.client("new-device").unwrap().protocol_version(), 2);
    assert_eq!(server.client("old-device").unwrap().protocol_version(), 1);
    for rx in [&mut new_rx, &mut old_rx] {
        let mut last = 0;
        for i in 0..500u32 {
            let msg = next(rx).await;
            assert_eq!(std::str::from_utf8(&msg.payload).unwrap(), i.to_string());
            let id = msg.durable_id().expect("an id");
            assert!(id > last, "ids grow");
            last = id;
        }
    }
    // More while both are online: each gets it at once, on a new run.
    for device in ["new-device", "old-device"] {
        send_all(&server, device, [b"late".to_vec()]).await;
    }
    assert_eq!(&next(&mut new_rx).await.payload[..], b"late");
    assert_eq!(&next(&mut old_rx).await.payload[..], b"late");
    tokio::join!(
        quiet(&mut new_rx, Duration::from_millis(300)),
        quiet(&mut old_rx, Duration::from_millis(300))
    );
    assert!(nothing_pending(&server, Duration::from_secs(5)).await);
    assert_eq!(server.stats().durable_delivered, 1002);
    assert_eq!(server.stats().durable_redelivered, 0);
}

#[tokio::test]
async fn large_messages_are_listed_and_delivered_past_one_store_read() {
    // Reads from the store stop after 4 MiB: 6 messages of 1 MiB take two.
    let (dev, _store, server) = started(DurableLimits::default()).await;
    let ids = send_all(&server, "device-big", (0..6u8).map(|i| vec![i; 1 << 20])).await;
    assert_eq!(pending_ids(&server, "device-big").await, ids);
    let (_d, mut rx) = device(&dev, server.local_addr().unwrap(), "device-big", false).await;
    for (i, id) in ids.iter().enumerate() {
        let msg = next(&mut rx).await;
        assert_eq!(msg.durable_id(), Some(*id));
        assert_eq!(msg.payload.len(), 1 << 20);
        assert!(msg.payload.iter().all(|&b| b == i as u8));
    }
    assert!(pending_becomes(&server, "device-big", 0, Duration::from_secs(10)).await);
}

/// A durable record (`docs/PROTOCOL.md` §4, v2) with message id `id`, written by hand.
fn record(id: u64, payload: &[u8]) -> Vec<u8> {
    let id = id.to_string();
    let mut header = vec![1, b'D', 1, b'M', 1];
    for s in ["quicx-msg-id", id.as_str()] {
        header.push(s.len() as u8);
        header.extend_from_slice(s.as_bytes());
    }
    let mut out = vec![0x05];
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads a durable stream's acknowledgements to its end: the ids, or the reset code.
async fn acks(recv: &mut quinn::RecvStream) -> Result<Vec<u64>, u64> {
    match tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20)).await {
        Ok(Ok(bytes)) => {
            assert_eq!(bytes.len() % 8, 0, "acknowledgements are 8 bytes each");
            Ok(bytes
                .chunks(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect())
        }
        Ok(Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)))) => {
            Err(code.into_inner())
        }
        other => panic!("the client neither finished nor reset: {other:?}"),
    }
}

/// A quicx client connected to a hand-written server speaking `quicx/2` and `quicx/1`: the
/// client (keep it), the server's side of the connection, and the client's push channel.
/// `builder` adds to the client (TLS with the dev certificate and the channel are set).
async fn hand_written_server(
    builder: impl FnOnce(quicx::ClientBuilder, ClientTls) -> quicx::ClientBuilder,
) -> (quicx::Client, quinn::Connection, PushReceiver) {
    let dev = DevCertificate::localhost().unwrap();
    let endpoint = quicx_tests::raw_server(&dev, &[quicx::ALPN_V2, quicx::ALPN]);
    let addr = endpoint.local_addr().unwrap();
    let (tx, rx) = push_channel(64);
    let tls = ClientTls::new().trust(dev.certificate());
    let client =
        builder(quicx::Client::builder().push_channel(tx), tls).connect_addr(addr, "localhost");
    let accept = async { endpoint.accept().await.unwrap().await.unwrap() };
    let (client, conn) = tokio::join!(client, accept);
    (client.unwrap(), conn, rx)
}

#[tokio::test]
async fn a_client_acknowledges_a_durable_stream_cumulatively_and_refuses_bad_records() {
    use quicx::StreamCode;
    let (_client, conn, mut rx) = hand_written_server(|b, tls| b.tls(tls)).await;

    // Three records, the second split across two writes, then the end: delivered in order,
    // the last acknowledgement covers all three, and the client finishes too.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut bytes = record(1, b"one");
    bytes.extend(record(2, b"two"));
    let (a, b) = bytes.split_at(bytes.len() - 2);
    send.write_all(a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    send.write_all(b).await.unwrap();
    send.write_all(&record(3, b"three")).await.unwrap();
    send.finish().unwrap();
    for (id, payload) in [(1, "one"), (2, "two"), (3, "three")] {
        let msg = next(&mut rx).await;
        assert_eq!(msg.durable_id(), Some(id));
        assert_eq!(&msg.payload[..], payload.as_bytes());
    }
    let ids = acks(&mut recv).await.expect("finished");
    assert_eq!(ids.last(), Some(&3));
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "acks grow: {ids:?}");

    // Ids acknowledged before (a redelivery) are acknowledged again, not delivered.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut bytes = record(2, b"two again");
    bytes.extend(record(3, b"three again"));
    send.write_all(&bytes).await.unwrap();
    send.finish().unwrap();
    assert_eq!(acks(&mut recv).await.expect("finished").last(), Some(&3));
    quiet(&mut rx, Duration::from_millis(200)).await;

    // An id that does not grow is malformed.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut bytes = record(4, b"four");
    bytes.extend(record(4, b"four again"));
    send.write_all(&bytes).await.unwrap();
    assert_eq!(&next(&mut rx).await.payload[..], b"four");
    assert_eq!(
        acks(&mut recv).await,
        Err(StreamCode::MALFORMED_FRAME.value())
    );
    quiet(&mut rx, Duration::from_millis(200)).await;

    // A payload above the limit is refused from its length, before its bytes come.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut big = record(5, b"");
    let at = big.len() - 4;
    big[at..].copy_from_slice(&(9u32 << 20).to_be_bytes());
    send.write_all(&big).await.unwrap();
    assert_eq!(
        acks(&mut recv).await,
        Err(StreamCode::PAYLOAD_TOO_LARGE.value())
    );

    // A stream that ends inside a record is malformed.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let cut = record(6, b"cut short");
    send.write_all(&cut[..cut.len() - 3]).await.unwrap();
    send.finish().unwrap();
    assert_eq!(
        acks(&mut recv).await,
        Err(StreamCode::MALFORMED_FRAME.value())
    );
    quiet(&mut rx, Duration::from_millis(200)).await;
}

/// Reads one durable record off `recv`: its id, whether it is marked redelivered, its payload;
/// `None` at the end of the stream.
async fn read_record(recv: &mut quinn::RecvStream) -> Option<(u64, bool, Vec<u8>)> {
    let mut prefix = [0u8; 5];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return None,
        Err(e) => panic!("reading a record: {e}"),
    }
    assert_eq!(prefix[0], 0x05, "a durable record");
    let mut header = vec![0u8; u32::from_be_bytes(prefix[1..].try_into().unwrap()) as usize];
    recv.read_exact(&mut header).await.unwrap();
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.unwrap();
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    recv.read_exact(&mut payload).await.unwrap();
    // PushHeader: path, method, metadata (short strings: one-byte lengths).
    let mut at = 0;
    let string = |at: &mut usize| {
        let n = header[*at] as usize;
        let s = String::from_utf8(header[*at + 1..*at + 1 + n].to_vec()).unwrap();
        *at += 1 + n;
        s
    };
    string(&mut at);
    string(&mut at);
    let pairs = header[at];
    at += 1;
    let (mut id, mut redelivered) = (None, false);
    for _ in 0..pairs {
        let (k, v) = (string(&mut at), string(&mut at));
        match k.as_str() {
            "quicx-msg-id" => id = v.parse().ok(),
            "quicx-msg-redelivered" => redelivered = v == "1",
            _ => {}
        }
    }
    assert_eq!(at, header.len(), "the header is used exactly");
    Some((id.expect("an id"), redelivered, payload))
}

#[tokio::test]
async fn a_server_removes_only_what_a_durable_stream_acknowledged() {
    let (dev, _store, server) = started(DurableLimits::default()).await;
    let ids = send_all(&server, "raw-1", (0..5u8).map(|i| vec![i])).await;
    let addr = server.local_addr().unwrap();
    let conn = quicx_tests::raw_connection(addr, &dev, quicx::ALPN_V2)
        .await
        .unwrap();
    // HELLO for raw-1 (`docs/PROTOCOL.md` §6).
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[4, 0, 0, 0, 8, 1, 5, b'r', b'a', b'w', b'-', b'1', 0])
        .await
        .unwrap();
    send.finish().unwrap();
    assert_eq!(
        recv.read_to_end(64).await.unwrap(),
        [2, 0, 0, 0, 2, 0, 0],
        "hello answered Ok"
    );

    // First run: all five arrive in order; the client acknowledges the third, repeats an older
    // acknowledgement (stale, ignored) and finishes without acknowledging the rest.
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    for (i, id) in ids.iter().enumerate() {
        let (got, redelivered, payload) = read_record(&mut recv).await.expect("a record");
        assert_eq!((got, redelivered, payload), (*id, false, vec![i as u8]));
    }
    assert!(
        read_record(&mut recv).await.is_none(),
        "the server finished"
    );
    send.write_all(&ids[2].to_be_bytes()).await.unwrap();
    send.write_all(&ids[0].to_be_bytes()).await.unwrap();
    send.finish().unwrap();
    assert!(
        pending_becomes(&server, "raw-1", 2, Duration::from_secs(5)).await,
        "the three acknowledged are removed, the two others stay"
    );

    // Second run (a second later): the two others, marked redelivered. An acknowledgement of
    // an id never sent makes the server stop the stream; nothing is removed.
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    for id in &ids[3..] {
        let (got, redelivered, _) = read_record(&mut recv).await.expect("a record");
        assert_eq!((got, redelivered), (*id, true));
    }
    send.write_all(&(ids[4] + 100).to_be_bytes()).await.unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped())
        .await
        .expect("stopped in time");
    assert_eq!(
        stopped.unwrap().map(quinn::VarInt::into_inner),
        Some(quicx::StreamCode::MALFORMED_FRAME.value())
    );
    assert_eq!(server.durable_pending("raw-1").await.unwrap().len(), 2);

    // Third run: acknowledged, finished: nothing pending.
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    let mut last = 0;
    while let Some((got, _, _)) = read_record(&mut recv).await {
        last = got;
    }
    assert_eq!(last, ids[4]);
    send.write_all(&last.to_be_bytes()).await.unwrap();
    send.finish().unwrap();
    assert!(pending_becomes(&server, "raw-1", 0, Duration::from_secs(5)).await);
    assert_eq!(server.stats().durable_delivered, 5);
    assert_eq!(server.stats().durable_redelivered, 2);
}

#[tokio::test]
async fn a_device_that_stalls_past_the_ack_timeout_still_sees_each_message_once() {
    // The application does not read its (one-slot) channel for longer than the server waits
    // for acknowledgements: the server gives up on its stream and sends again on new ones; the
    // streams it gave up on must not deliver late copies.
    let limits = DurableLimits::default().ack_timeout(Duration::from_millis(700));
    let (dev, _store, server) = started(limits).await;
    send_all(&server, "device-slow", (1..=3u8).map(|i| vec![i])).await;
    let (tx, mut rx) = push_channel(1);
    let _client = quicx::Client::builder()
        .tls(ClientTls::new().trust(dev.certificate()))
        .client_id("device-slow")
        .push_channel(tx)
        .connect_addr(server.local_addr().unwrap(), "localhost")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    while seen.len() < 3 {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(m)) => seen.push(m.payload[0]),
            _ => break,
        }
    }
    // Late copies from the streams it gave up on would come now.
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(2_500), rx.recv()).await {
        seen.push(m.payload[0]);
    }
    assert_eq!(seen, [1, 2, 3], "each once, in order");
    assert!(pending_becomes(&server, "device-slow", 0, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn an_unacknowledged_message_comes_again_even_behind_a_full_window() {
    // Manual ack: the application holds the first message and never acknowledges it, while
    // more messages are pending than a durable stream keeps in flight. The server must still
    // give up after its ack timeout and send the message again.
    let limits = DurableLimits::default().ack_timeout(Duration::from_millis(500));
    let (dev, _store, server) = started(limits).await;
    send_all(
        &server,
        "device-held",
        (0..5_000u32).map(|i| i.to_le_bytes().to_vec()),
    )
    .await;
    let (_d, mut rx) = device(&dev, server.local_addr().unwrap(), "device-held", true).await;
    let held = next(&mut rx).await;
    assert!(!held.is_redelivered());
    let again = next(&mut rx).await;
    assert_eq!(again.durable_id(), held.durable_id());
    assert!(again.is_redelivered());
}

#[tokio::test]
async fn a_durable_message_above_the_frame_limits_is_refused_at_once() {
    let (_dev, _store, server) = started(DurableLimits::default()).await;
    let too_large = server
        .send_durable(
            "device-x",
            "D",
            "M",
            Metadata::new(),
            vec![0u8; 9 << 20],
            Duration::from_secs(60),
        )
        .await;
    assert!(
        matches!(too_large, Err(Error::TooLarge { .. })),
        "{too_large:?}"
    );
    let huge_header = server
        .send_durable(
            "device-x",
            "D",
            "M",
            Metadata::new().with("k", "v".repeat(70_000)),
            b"x",
            Duration::from_secs(60),
        )
        .await;
    assert!(
        matches!(huge_header, Err(Error::TooLarge { .. })),
        "{huge_header:?}"
    );
    assert!(server.durable_pending("device-x").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_client_gives_up_on_a_durable_stream_that_stalls() {
    let (_client, conn, mut rx) = hand_written_server(|b, tls| {
        b.tls(tls)
            .transport(quicx::TransportOptions::default().frame_timeout(Duration::from_millis(300)))
    })
    .await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut bytes = record(1, b"one");
    let second = record(2, b"two");
    bytes.extend_from_slice(&second[..4]);
    send.write_all(&bytes).await.unwrap();
    assert_eq!(&next(&mut rx).await.payload[..], b"one");
    // The rest of the second record never comes: the client resets after its frame timeout,
    // having acknowledged the first.
    let started = Instant::now();
    let mut acked = Vec::new();
    let code = loop {
        let mut ack = [0u8; 8];
        match tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut ack)).await {
            Ok(Ok(())) => acked.push(u64::from_be_bytes(ack)),
            Ok(Err(quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code)))) => {
                break code.into_inner();
            }
            other => panic!("expected acks then a reset, got {other:?}"),
        }
    };
    assert_eq!(code, quicx::StreamCode::CANCELLED.value());
    assert_eq!(acked, [1]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    quiet(&mut rx, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_quicx1_client_refuses_durable_records() {
    use quicx::StreamCode;
    let (_client, conn, mut rx) =
        hand_written_server(|b, tls| b.tls(tls.with_alpn(vec![quicx::ALPN.to_vec()]))).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&record(1, b"one")).await.unwrap();
    send.finish().unwrap();
    assert_eq!(
        acks(&mut recv).await,
        Err(StreamCode::MALFORMED_FRAME.value())
    );
    quiet(&mut rx, Duration::from_millis(200)).await;
}

/// A `quicx/1` durable push frame (kind `0x03`): service `D`, method `M`, the message's id and
/// the one before it in metadata.
fn durable_push(id: u64, prev: u64, payload: &[u8]) -> Vec<u8> {
    let mut header = vec![1, b'D', 1, b'M', 2];
    for s in [
        "quicx-msg-id",
        id.to_string().as_str(),
        "quicx-msg-prev",
        prev.to_string().as_str(),
    ] {
        header.push(s.len() as u8);
        header.extend_from_slice(s.as_bytes());
    }
    let mut out = vec![0x03];
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    out
}

#[tokio::test]
async fn a_client_lets_at_most_64_durable_pushes_wait_for_the_ones_before_them() {
    let (_client, conn, mut rx) =
        hand_written_server(|b, tls| b.tls(tls.with_alpn(vec![quicx::ALPN.to_vec()]))).await;
    // Ids 2 to 67, each naming the one before it; id 1 never comes, so all of them wait.
    let mut streams = Vec::new();
    for id in 2..=67u64 {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&durable_push(id, id - 1, b"x"))
            .await
            .unwrap();
        send.finish().unwrap();
        streams.push((send, recv));
    }
    let answers = futures_util::future::join_all(streams.iter_mut().map(|(_, recv)| {
        tokio::time::timeout(Duration::from_millis(1500), recv.read_to_end(1 << 16))
    }))
    .await;
    // 64 wait (no answer); the two beyond them are refused at once: a response frame with
    // status Error { PUSH_REJECTED }.
    let refused: Vec<Vec<u8>> = answers
        .into_iter()
        .filter_map(Result::ok)
        .map(Result::unwrap)
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    for bytes in &refused {
        assert_eq!((bytes[0], bytes[5], bytes[6]), (0x02, 1, 10), "{bytes:?}");
    }
    quiet(&mut rx, Duration::from_millis(100)).await;
}

/// A `quicx-durable-server` child process on `listen` with its store in `store` (killed on
/// drop), with `Fsync::Interval(fsync_every)` when given.
fn durable_server_with(
    pem: &PemFiles,
    listen: &str,
    store: &TempStore,
    fsync_every: Option<Duration>,
) -> ChildServer {
    let mut command = Command::new(env!("CARGO_BIN_EXE_quicx-durable-server"));
    command
        .arg(&pem.cert)
        .arg(&pem.key)
        .arg(listen)
        .arg(store.file());
    if let Some(every) = fsync_every {
        command.arg(every.as_millis().to_string());
    }
    ChildServer::spawn(&mut command).unwrap()
}

/// Stores 1,000 messages for `id` on a `quicx-durable-server` child (with
/// `Fsync::Interval(fsync_every)` when given), waits `before_kill`, kills it with SIGKILL,
/// restarts it on the same store and port, and checks the device gets all 1,000 once, in order.
async fn thousand_survive_a_sigkill(
    id: &str,
    fsync_every: Option<Duration>,
    before_kill: Duration,
) {
    let dev = DevCertificate::localhost().unwrap();
    let pem = PemFiles::write(&dev).unwrap();
    let store = TempStore::new();
    let mut first = durable_server_with(&pem, "127.0.0.1:0", &store, fsync_every);
    let ops = quicx::Client::builder()
        .tls(ClientTls::new().trust(dev.certificate()))
        .reconnect(false)
        .connect_addr(first.addr, "localhost")
        .await
        .unwrap();
    ops.call::<_, ()>("Ops", "Send", &(id, 1000u32))
        .await
        .unwrap();
    ops.close().await;
    tokio::time::sleep(before_kill).await;
    // No chance to flush on its way out.
    first.kill();
    let restarted = durable_server_with(&pem, &first.addr.to_string(), &store, fsync_every);
    let (_d, mut rx) = device(&dev, restarted.addr, id, false).await;
    for i in 0..1000u32 {
        let msg = next(&mut rx).await;
        assert_eq!(
            std::str::from_utf8(&msg.payload).unwrap(),
            i.to_string(),
            "message {i} in order"
        );
    }
    quiet(&mut rx, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn a_thousand_messages_survive_a_sigkill_and_arrive_once_in_order() {
    // Stored means committed to the disk: kill the server at once.
    thousand_survive_a_sigkill("device-7", None, Duration::ZERO).await;
}

#[tokio::test]
async fn with_an_fsync_interval_what_was_flushed_survives_a_sigkill() {
    // Committed in memory, on the disk within the interval (the store flushes when it goes
    // idle): kill the server well after that.
    let every = Duration::from_millis(100);
    thousand_survive_a_sigkill("device-4", Some(every), every * 10).await;
}

/// With `Fsync::Interval`, a crash takes back what was committed since the last flush, ids
/// included; a device that saw those ids must not take the messages sent after the restart for
/// duplicates of them.
#[tokio::test]
async fn after_a_crash_with_an_fsync_interval_new_messages_get_ids_the_device_never_saw() {
    let dev = DevCertificate::localhost().unwrap();
    let pem = PemFiles::write(&dev).unwrap();
    let store = TempStore::new();
    // Nothing is flushed by the interval during the test.
    let every = Some(Duration::from_secs(600));
    let mut first = durable_server_with(&pem, "127.0.0.1:0", &store, every);
    let (_device, mut rx) = device(&dev, first.addr, "device-12", false).await;
    let ops = quicx::Client::builder()
        .tls(ClientTls::new().trust(dev.certificate()))
        .connect_addr(first.addr, "localhost")
        .await
        .unwrap();
    let send = async |n: u32| {
        ops.call::<_, ()>("Ops", "Send", &("device-12", n))
            .await
            .unwrap();
    };
    // The first commit reserves ids on the disk; the ones after it are in memory only.
    send(1).await;
    let msg = next(&mut rx).await;
    assert_eq!(&msg.payload[..], b"0");
    let mut seen = vec![msg.durable_id().unwrap()];
    send(5).await;
    for i in 0..5 {
        let msg = next(&mut rx).await;
        assert_eq!(std::str::from_utf8(&msg.payload).unwrap(), i.to_string());
        seen.push(msg.durable_id().unwrap());
    }
    first.kill();
    let _restarted = durable_server_with(&pem, &first.addr.to_string(), &store, every);
    // The device and the operator reconnect by themselves; the operator sends 5 more.
    assert!(
        // Each try is bounded by the call timeout; one cut short by the deadline could have
        // sent, so none is cut shorter.
        until(Duration::from_secs(10), async || {
            ops.call::<_, ()>("Ops", "Send", &("device-12", 5u32))
                .await
                .is_ok()
        })
        .await,
        "the operator reconnected and sent"
    );
    for i in 0..5 {
        let msg = next(&mut rx).await;
        assert_eq!(std::str::from_utf8(&msg.payload).unwrap(), i.to_string());
        let id = msg.durable_id().unwrap();
        assert!(
            !seen.contains(&id),
            "id {id} was handed out before the crash"
        );
    }
    quiet(&mut rx, Duration::from_millis(300)).await;
}

/// A client keeps what it acknowledged per store and identity: the same `Client` re-bound to
/// another identity (a handler's login) receives that identity's messages although their ids
/// are below ones it acknowledged for the first.
#[tokio::test]
async fn a_client_rebound_to_another_identity_receives_its_older_messages() {
    let (dev, _store, server) = started(DurableLimits::default()).await;
    // Stored for "user-b" while nobody is it: the lowest ids.
    let b_ids = send_numbered(&server, "user-b", 2).await;
    let (_client, mut rx) = device(&dev, server.local_addr().unwrap(), "user-a", false).await;
    let a_ids = send_numbered(&server, "user-a", 3).await;
    for i in 0..3 {
        assert_eq!(next(&mut rx).await.payload, i.to_string().as_bytes());
    }
    assert!(b_ids.iter().all(|b| a_ids.iter().all(|a| b < a)));
    // The server re-binds the connection (as a login handler would).
    let conn = server.client("user-a").unwrap();
    conn.bind_client_id("user-b");
    for (i, id) in b_ids.iter().enumerate() {
        let msg = next(&mut rx).await;
        assert_eq!(msg.payload, i.to_string().as_bytes());
        assert_eq!(msg.durable_id(), Some(*id));
    }
    assert!(nothing_pending(&server, Duration::from_secs(5)).await);
}

/// A delivery run follows its identity: once the connection it streams to is re-bound to
/// another identity and the device comes back on a new connection, the rest goes there; every
/// message reaches one of the two connections, once.
#[tokio::test]
async fn a_delivery_run_stops_sending_to_a_connection_its_identity_left() {
    const N: usize = 5000;
    let (dev, _store, server) = started(DurableLimits::default()).await;
    let addr = server.local_addr().unwrap();
    send_numbered(&server, "user-a", N as u32).await;
    // A small channel nobody reads yet: the run stalls on the first connection.
    let (tx, mut first_rx) = push_channel(4);
    let _first = quicx::Client::builder()
        .tls(ClientTls::new().trust(dev.certificate()))
        .client_id("user-a")
        .push_channel(tx)
        .connect_addr(addr, "localhost")
        .await
        .unwrap();
    let first_msg = next(&mut first_rx).await;
    server.client("user-a").unwrap().bind_client_id("user-b");
    let (_second, mut second_rx) = device(&dev, addr, "user-a", false).await;
    let mut seen = vec![0u32; N];
    let mut count = |msg: PushMessage| {
        let i: usize = std::str::from_utf8(&msg.payload).unwrap().parse().unwrap();
        seen[i] += 1;
    };
    count(first_msg);
    let (mut on_first, mut on_second) = (1usize, 0usize);
    // One bound for the whole drain, not one per message.
    let stuck = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(stuck);
    while on_first + on_second < N {
        tokio::select! {
            Some(m) = first_rx.recv() => { count(m); on_first += 1; }
            Some(m) = second_rx.recv() => { count(m); on_second += 1; }
            () = &mut stuck => {
                panic!("stuck at {on_first} + {on_second} of {N}");
            }
        }
    }
    assert!(on_second > 0, "the device's new connection got nothing");
    assert!(seen.iter().all(|&n| n == 1), "every message once");
    quiet(&mut second_rx, Duration::from_millis(300)).await;
    assert!(nothing_pending(&server, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_message_whose_ack_was_lost_is_redelivered_and_seen_once() {
    let dev = DevCertificate::localhost().unwrap();
    let store = TempStore::new();
    let server = server(
        &dev,
        &store,
        DurableLimits::default().ack_timeout(Duration::from_secs(30)),
    )
    .await;
    let relay = Relay::start(server.local_addr().unwrap(), Impairment::default())
        .await
        .unwrap();
    let (tx, mut rx) = push_channel(64);
    let client = quicx::Client::builder()
        .tls(ClientTls::new().trust(dev.certificate()))
        .client_id("device-3")
        .push_channel(tx)
        .max_backoff(Duration::from_millis(200))
        .connect_addr(relay.addr(), "localhost")
        .await
        .unwrap();
    let mut events = client.events();
    // From now on nothing from the device reaches the server: the push arrives, its ack does
    // not, and the server closes the silent connection.
    let sent = relay.stats();
    relay
        .set_impairment(Impairment::default().with_drops(
            Direction::ToServer,
            sent.to_server.received..sent.to_server.received + 1_000_000,
        ))
        .unwrap();
    server
        .send_durable(
            "device-3",
            "Device",
            "Once",
            Metadata::new(),
            b"only-once",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let msg = next(&mut rx).await;
    assert_eq!(&msg.payload[..], b"only-once");
    let lost = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(ClientEvent::Disconnected { .. }) = events.recv().await {
                return;
            }
        }
    })
    .await;
    assert!(lost.is_ok(), "the connection died");
    assert_eq!(
        server.durable_pending("device-3").await.unwrap().len(),
        1,
        "not acked"
    );
    relay.set_impairment(Impairment::default()).unwrap();
    // The device reconnects, the server sends it again, the client acks it without delivering.
    assert!(
        nothing_pending(&server, Duration::from_secs(20)).await,
        "acknowledged after the reconnect"
    );
    assert_eq!(server.stats().durable_redelivered, 1);
    quiet(&mut rx, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn in_manual_mode_a_device_that_crashes_before_acking_gets_the_message_again() {
    let (dev, _store, server) = started(DurableLimits::default()).await;
    let addr = server.local_addr().unwrap();
    server
        .send_durable(
            "device-4",
            "Device",
            "Update",
            Metadata::new(),
            b"v2",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let (crashing, mut rx) = device(&dev, addr, "device-4", true).await;
    let msg = next(&mut rx).await;
    assert_eq!(&msg.payload[..], b"v2");
    // The application "crashes" mid-processing: no ack, the process (its client) goes.
    drop(crashing);
    drop(rx);
    drop(msg);
    let (_again, mut rx) = device(&dev, addr, "device-4", true).await;
    let msg = next(&mut rx).await;
    assert_eq!(&msg.payload[..], b"v2");
    assert!(msg.is_redelivered());
    assert_eq!(server.durable_pending("device-4").await.unwrap().len(), 1);
    assert!(msg.ack());
    assert!(!msg.ack(), "a second ack does nothing");
    assert!(nothing_pending(&server, Duration::from_secs(5)).await);
}

/// Runs only as the child process of
/// `in_manual_mode_a_device_process_killed_before_acking_gets_the_message_again`: a device in
/// manual-ack mode that prints what it receives and never acknowledges it.
#[tokio::test]
#[ignore = "helper: runs as a child process"]
async fn child_device_that_never_acks() {
    let (Ok(addr), Ok(cert)) = (
        std::env::var("QUICX_DURABLE_CHILD_ADDR"),
        std::env::var("QUICX_DURABLE_CHILD_CERT"),
    ) else {
        return;
    };
    let path = std::env::temp_dir().join(format!("quicx-durable-child-{}.pem", std::process::id()));
    std::fs::write(&path, cert).unwrap();
    let tls = ClientTls::empty().trust_pem_file(&path).unwrap();
    let (_client, mut rx) = device_with(tls, addr.parse().unwrap(), "device-k", true).await;
    let msg = next(&mut rx).await;
    println!("RECEIVED {}", String::from_utf8_lossy(&msg.payload));
    // Processing, never finished: the process is killed here.
    tokio::time::sleep(Duration::from_secs(60)).await;
    drop(msg);
}

/// The device application is a process of its own, killed with SIGKILL while it holds the
/// message unacknowledged; the device comes back and gets it again.
#[tokio::test]
async fn in_manual_mode_a_device_process_killed_before_acking_gets_the_message_again() {
    let (dev, _store, server) = started(DurableLimits::default()).await;
    let addr = server.local_addr().unwrap();
    server
        .send_durable(
            "device-k",
            "Device",
            "Update",
            Metadata::new(),
            b"v3",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let mut child = quicx_tests::child::test_child(
        "child_device_that_never_acks",
        &[
            ("QUICX_DURABLE_CHILD_ADDR", addr.to_string()),
            ("QUICX_DURABLE_CHILD_CERT", dev.certificate_pem().to_owned()),
        ],
        "RECEIVED v3",
    )
    .await;
    child.kill().await.unwrap();
    // Still pending: the child never acknowledged it.
    assert_eq!(server.durable_pending("device-k").await.unwrap().len(), 1);
    let (_again, mut rx) = device(&dev, addr, "device-k", true).await;
    let msg = next(&mut rx).await;
    assert_eq!(&msg.payload[..], b"v3");
    assert!(msg.is_redelivered());
    assert!(msg.ack());
    assert!(nothing_pending(&server, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn expired_messages_are_dropped_not_delivered() {
    let (dev, _store, server) = started(DurableLimits::default()).await;
    server
        .send_durable(
            "device-5",
            "Device",
            "Old",
            Metadata::new(),
            b"old",
            Duration::from_millis(100),
        )
        .await
        .unwrap();
    server
        .send_durable(
            "device-5",
            "Device",
            "New",
            Metadata::new(),
            b"new",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pending = server.durable_pending("device-5").await.unwrap();
    assert_eq!(pending.len(), 1, "the expired one is not pending");
    assert_eq!(pending[0].service_method, "New");
    let (_d, mut rx) = device(&dev, server.local_addr().unwrap(), "device-5", false).await;
    assert_eq!(&next(&mut rx).await.payload[..], b"new");
    quiet(&mut rx, Duration::from_millis(300)).await;
    assert!(
        until(Duration::from_secs(5), async || server
            .stats()
            .durable_expired
            == 1)
        .await
    );
}

/// Under `Overflow::DropOldest`, a message that would not fit even with every older message of
/// its identity dropped (other identities fill the store) is refused, and nothing is dropped.
#[tokio::test]
async fn drop_oldest_drops_nothing_when_that_would_not_make_room() {
    let ttl = Duration::from_secs(60);
    let (_dev, _store, server) = started(
        DurableLimits::default()
            .total(100, 1400)
            .overflow(Overflow::DropOldest),
    )
    .await;
    let send = async |who: &str, size: usize| {
        server
            .send_durable(who, "Device", "M", Metadata::new(), vec![7u8; size], ttl)
            .await
    };
    for _ in 0..3 {
        send("other", 300).await.unwrap();
    }
    send("mine", 50).await.unwrap();
    let err = send("mine", 500).await.unwrap_err();
    assert!(matches!(err, Error::StoreFull(_)), "{err:?}");
    assert_eq!(server.durable_pending("mine").await.unwrap().len(), 1);
    assert_eq!(server.stats().durable_overflowed, 0);
    // One that fits once the older one goes still drops it.
    send("mine", 400).await.unwrap();
    assert_eq!(server.stats().durable_overflowed, 1);
}

/// The per-identity byte bound and the total message bound, under each policy; the backlog
/// names the identities with the most pending, most first.
#[tokio::test]
async fn per_identity_bytes_and_total_messages_are_bounds_too() {
    let ttl = Duration::from_secs(60);
    for overflow in [Overflow::Refuse, Overflow::DropOldest] {
        let (_dev, _store, server) = started(
            DurableLimits::default()
                .per_identity(100, 1000)
                .total(5, 1 << 30)
                .overflow(overflow),
        )
        .await;
        let send = async |who: &str, size: usize| {
            server
                .send_durable(who, "Device", "M", Metadata::new(), vec![7u8; size], ttl)
                .await
        };
        // Bytes of one identity: two 400-byte messages fit in 1,000, a third does not.
        let first = send("a", 400).await.unwrap();
        let second = send("a", 400).await.unwrap();
        let third = send("a", 400).await;
        let pending = |who: &'static str| pending_ids(&server, who);
        match overflow {
            Overflow::Refuse => {
                let err = third.unwrap_err();
                assert!(matches!(err, Error::StoreFull(_)), "{err:?}");
                assert_eq!(pending("a").await, [first, second]);
                assert_eq!(server.stats().durable_overflowed, 0);
            }
            _ => {
                assert_eq!(pending("a").await, [second, third.unwrap()]);
                assert_eq!(server.stats().durable_overflowed, 1);
            }
        }
        // Messages in all: 2 of `a` and 3 others make 5; a sixth, of a new identity, does not
        // fit. Dropping the oldest drops only the new identity's own messages, and it has none:
        // refused under both policies.
        for who in ["b", "c", "d"] {
            send(who, 10).await.unwrap();
        }
        let err = send("e", 10).await.unwrap_err();
        assert!(matches!(err, Error::StoreFull(_)), "{overflow:?}: {err:?}");
        let stats = server.stats();
        assert_eq!(stats.durable_pending, 5);
        assert_eq!(stats.durable_pending_identities, 4);
        let backlog = server.durable_backlog(2).unwrap();
        let names: Vec<(&str, u64)> = backlog
            .iter()
            .map(|b| (b.identity.as_str(), b.messages))
            .collect();
        assert_eq!(names, [("a", 2), ("b", 1)], "{overflow:?}");
        assert!(backlog[0].bytes >= 800, "{backlog:?}");
        // Under DropOldest, one of `a` makes room for another of `a`.
        if overflow == Overflow::DropOldest {
            send("a", 10).await.unwrap();
            assert_eq!(server.stats().durable_pending, 5);
            assert_eq!(server.stats().durable_overflowed, 2);
        }
    }
}

#[tokio::test]
async fn overflow_refuses_or_drops_the_oldest_and_cancel_removes() {
    let dev = DevCertificate::localhost().unwrap();
    let ttl = Duration::from_secs(60);
    // Refuse.
    let store = TempStore::new();
    let refusing = server(
        &dev,
        &store,
        DurableLimits::default().per_identity(3, 1 << 20),
    )
    .await;
    for i in 0..3 {
        refusing
            .send_durable("d", "Device", "M", Metadata::new(), format!("{i}"), ttl)
            .await
            .unwrap();
    }
    let err = refusing
        .send_durable("d", "Device", "M", Metadata::new(), "3", ttl)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StoreFull(_)), "{err:?}");
    // Another identity still has room.
    refusing
        .send_durable("e", "Device", "M", Metadata::new(), "x", ttl)
        .await
        .unwrap();

    // Drop the oldest.
    let store = TempStore::new();
    let dropping = server(
        &dev,
        &store,
        DurableLimits::default()
            .per_identity(3, 1 << 20)
            .overflow(Overflow::DropOldest),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            dropping
                .send_durable("d", "Device", "M", Metadata::new(), format!("{i}"), ttl)
                .await
                .unwrap(),
        );
    }
    assert_eq!(pending_ids(&dropping, "d").await, ids[2..].to_vec());
    assert_eq!(dropping.stats().durable_overflowed, 2);

    // Cancel one; the device gets the others.
    assert!(dropping.cancel_durable("d", ids[3]).await.unwrap());
    assert!(!dropping.cancel_durable("d", ids[3]).await.unwrap());
    let (_d, mut rx) = device(&dev, dropping.local_addr().unwrap(), "d", false).await;
    assert_eq!(&next(&mut rx).await.payload[..], b"2");
    assert_eq!(&next(&mut rx).await.payload[..], b"4");
    quiet(&mut rx, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_corrupt_or_truncated_store_is_a_clear_error_or_recovered() {
    let dev = DevCertificate::localhost().unwrap();
    // Not a store at all.
    let store = TempStore::new();
    std::fs::write(store.file(), vec![0x5a; 64 * 1024]).unwrap();
    let err = Server::builder()
        .dev_certificate(&dev)
        .durable_store(store.file(), DurableLimits::default())
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::Store(_)), "{err:?}");
    assert!(err.to_string().contains("store.redb"), "{err}");

    // A real store, cut at several points: each start either refuses with a clear error or
    // comes up with messages that are the ones sent (whole, in order) and takes new ones.
    let original = TempStore::new();
    {
        let server = server(&dev, &original, DurableLimits::default()).await;
        for i in 0..200 {
            server
                .send_durable(
                    "d",
                    "Device",
                    "M",
                    Metadata::new(),
                    vec![i as u8; 512],
                    Duration::from_secs(60),
                )
                .await
                .unwrap();
        }
        server.shutdown(Duration::ZERO).await;
    }
    let bytes = std::fs::read(original.file()).unwrap();
    let (mut recovered, mut refused) = (0, 0);
    for cut in [
        bytes.len() / 4,
        bytes.len() / 2,
        bytes.len() * 3 / 4,
        bytes.len() - 1,
    ] {
        let store = TempStore::new();
        std::fs::write(store.file(), &bytes[..cut]).unwrap();
        match Server::builder()
            .dev_certificate(&dev)
            .insecure_accept_unverified_client_ids()
            .durable_store(store.file(), DurableLimits::default())
            .build()
        {
            Ok(server) => {
                recovered += 1;
                let pending = server.durable_pending("d").await.unwrap();
                assert!(pending.len() <= 200, "cut at {cut}");
                assert!(
                    pending.windows(2).all(|w| w[0].id < w[1].id),
                    "cut at {cut}: ids in order"
                );
                assert!(
                    pending
                        .iter()
                        .all(|p| p.size == 512 && p.service_method == "M"),
                    "cut at {cut}: whole messages"
                );
                let id = server
                    .send_durable(
                        "d",
                        "Device",
                        "M",
                        Metadata::new(),
                        b"new",
                        Duration::from_secs(60),
                    )
                    .await
                    .unwrap_or_else(|e| {
                        panic!("cut at {cut}: a recovered store takes new messages: {e}")
                    });
                assert!(
                    pending.iter().all(|p| p.id < id),
                    "cut at {cut}: ids keep growing"
                );
                // What it lists, it delivers: whole and in order.
                server.bind("127.0.0.1:0").await.unwrap();
                let (_d, mut rx) = device(&dev, server.local_addr().unwrap(), "d", false).await;
                for p in &pending {
                    let m = next(&mut rx).await;
                    assert_eq!(m.durable_id(), Some(p.id), "cut at {cut}");
                    assert_eq!(m.payload.len(), 512);
                    assert!(m.payload.iter().all(|&b| b == m.payload[0]));
                }
                assert_eq!(&next(&mut rx).await.payload[..], b"new");
                server.shutdown(Duration::ZERO).await;
            }
            Err(e) => {
                refused += 1;
                assert!(matches!(e, Error::Store(_)), "cut at {cut}: {e:?}");
                assert!(e.to_string().contains("store.redb"), "cut at {cut}: {e}");
            }
        }
    }
    eprintln!("a truncated store: recovered {recovered} times, refused {refused} times of 4");
}

#[tokio::test]
async fn the_store_is_released_when_shutdown_returns() {
    let dev = DevCertificate::localhost().unwrap();
    let store = TempStore::new();
    let first = server(&dev, &store, DurableLimits::default()).await;
    // A live events receiver (and the connection handles its events hold) keep the server
    // object alive; the store must not depend on that.
    let _events = first.events();
    let (_d, _rx) = device(&dev, first.local_addr().unwrap(), "device-6", false).await;
    first
        .send_durable(
            "device-9",
            "Device",
            "Later",
            Metadata::new(),
            b"x",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    first.shutdown(Duration::from_secs(1)).await;
    let err = first
        .send_durable(
            "device-9",
            "Device",
            "Later",
            Metadata::new(),
            b"y",
            Duration::from_secs(60),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Store(_)), "{err:?}");
    let second = server(&dev, &store, DurableLimits::default()).await;
    assert_eq!(second.durable_pending("device-9").await.unwrap().len(), 1);
}

/// Delivery after a commit starts where the server runs, not on the first sender's runtime:
/// with the server on the caller's runtime (`Placement::CallerRuntime`), a first send from a
/// runtime that is gone right after it does not keep later messages from a connected device,
/// and a server with more I/O threads than cores delivers the same way.
#[tokio::test]
async fn delivery_starts_where_the_server_runs_not_where_the_first_sender_did() {
    for (placement, threads) in [
        (quicx::Placement::CallerRuntime, 1),
        (quicx::Placement::Auto, 4),
    ] {
        let dev = DevCertificate::localhost().unwrap();
        let store = TempStore::new();
        let server = Server::builder()
            .dev_certificate(&dev)
            .insecure_accept_unverified_client_ids()
            .placement(placement)
            .io_threads(threads)
            .durable_store(store.file(), DurableLimits::default())
            .build()
            .unwrap();
        server.bind("127.0.0.1:0").await.unwrap();
        let (_d, mut rx) = device(&dev, server.local_addr().unwrap(), "d", false).await;
        // The first send from a runtime of its own, dropped once it returns.
        let first = server.clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(send_numbered(&first, "d", 1))
        })
        .join()
        .unwrap();
        assert_eq!(&next(&mut rx).await.payload[..], b"0", "{placement:?}");
        for i in 1..20u32 {
            send_all(&server, "d", [i.to_string().into_bytes()]).await;
            let msg = next(&mut rx).await;
            assert_eq!(msg.payload, i.to_string().as_bytes(), "{placement:?}");
        }
        server.shutdown(Duration::from_secs(1)).await;
    }
}

/// Under `Fsync::Interval` a send returns once the store took the message, before its commit
/// (one commit takes many sends): a connected device still gets each at once and in order, a
/// message just sent can be cancelled and is listed once committed, and a shutdown puts
/// everything on the disk.
#[tokio::test]
async fn with_an_fsync_interval_sends_answered_before_their_commit_are_delivered_listed_and_kept() {
    let dev = DevCertificate::localhost().unwrap();
    let store = TempStore::new();
    // Never flushed by the interval during the test: only the shutdown puts it on the disk.
    let limits = DurableLimits::default().fsync(Fsync::Interval(Duration::from_secs(600)));
    let first = server(&dev, &store, limits).await;
    let (_d, mut rx) = device(&dev, first.local_addr().unwrap(), "online", false).await;
    let ids = send_numbered(&first, "online", 300).await;
    for (i, id) in ids.iter().enumerate() {
        let msg = next(&mut rx).await;
        assert_eq!(msg.payload, i.to_string().as_bytes());
        assert_eq!(msg.durable_id(), Some(*id));
    }
    let ids = send_numbered(&first, "offline", 50).await;
    // Cancelled right after its send returned, likely before its commit.
    assert!(first.cancel_durable("offline", ids[10]).await.unwrap());
    assert!(pending_becomes(&first, "offline", 49, Duration::from_secs(5)).await);
    first.shutdown(Duration::from_secs(1)).await;
    let second = server(&dev, &store, limits).await;
    let kept = pending_ids(&second, "offline").await;
    let expected: Vec<u64> = ids.iter().copied().filter(|&id| id != ids[10]).collect();
    assert_eq!(kept, expected);
    let (_d, mut rx) = device(&dev, second.local_addr().unwrap(), "offline", false).await;
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| *i != 10) {
        let msg = next(&mut rx).await;
        assert_eq!(msg.payload, i.to_string().as_bytes());
        assert_eq!(msg.durable_id(), Some(*id));
    }
    quiet(&mut rx, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn in_manual_mode_a_message_dropped_unacked_comes_back_before_the_next() {
    dropped_unacked_comes_back_first(false).await;
}

#[tokio::test]
async fn over_quicx1_a_message_dropped_unacked_comes_back_before_the_next() {
    dropped_unacked_comes_back_first(true).await;
}

async fn dropped_unacked_comes_back_first(v1_only: bool) {
    let (dev, _store, server) = started(DurableLimits::default()).await;
    send_all(
        &server,
        "device-10",
        [b"first".to_vec(), b"second".to_vec()],
    )
    .await;
    let mut tls = ClientTls::new().trust(dev.certificate());
    if v1_only {
        tls = tls.with_alpn(vec![quicx::ALPN.to_vec()]);
    }
    let (_d, mut rx) = device_with(tls, server.local_addr().unwrap(), "device-10", true).await;
    let version = server.client("device-10").unwrap().protocol_version();
    assert_eq!(version, if v1_only { 1 } else { 2 });
    let first = next(&mut rx).await;
    assert_eq!(&first.payload[..], b"first");
    // The application gives up on it without acking: the second must not pass it.
    drop(first);
    let again = next(&mut rx).await;
    assert_eq!(
        &again.payload[..],
        b"first",
        "the dropped one comes back first"
    );
    assert!(again.ack());
    let second = next(&mut rx).await;
    assert_eq!(&second.payload[..], b"second");
    assert!(second.ack());
    assert!(pending_becomes(&server, "device-10", 0, Duration::from_secs(5)).await);
}
