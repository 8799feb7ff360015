//! Identities bind only from a verified source: mTLS, an authenticator, or a handler. Refusals
//! are typed; a rogue client cannot take a device's identity; the real device can come back.

use std::time::Duration;

use quicx::{
    Authenticator, CallAuthorizer, ClientTls, DevCertificate, DevCertificateAuthority, Error,
    Hello, Metadata, Refusal, Server, ServerEvent, ServerTls, push_channel,
};
use quicx_tests::client_builder;

/// A server whose devices authenticate with `secret-of-<id>`.
async fn token_server() -> (Server, String, DevCertificate) {
    let dev = DevCertificate::localhost().unwrap();
    let server = Server::builder()
        .dev_certificate(&dev)
        .authenticator(Authenticator::new(|hello: Hello| async move {
            match hello.token.as_deref() {
                Some(t) if t == format!("secret-of-{}", hello.client_id) => Ok(hello.client_id),
                Some("admin-token") => Ok("admin".to_owned()),
                Some(_) => Err(Refusal::Unauthenticated("wrong token".into())),
                None => Err(Refusal::Unauthenticated("no token".into())),
            }
        }))
        .build()
        .unwrap();
    let addr = server.bind("127.0.0.1:0").await.unwrap().to_string();
    (server, addr, dev)
}

#[tokio::test]
async fn by_default_an_unverified_hello_is_refused() {
    let dev = DevCertificate::localhost().unwrap();
    let server = Server::builder().dev_certificate(&dev).build().unwrap();
    let addr = server.bind("127.0.0.1:0").await.unwrap().to_string();
    let err = client_builder(&dev)
        .client_id("device-1")
        .connect(&addr)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");
    assert!(server.client("device-1").is_none());
    assert_eq!(server.stats().auth_failures, 1);
    // A client without an identity still connects and calls.
    let anonymous = client_builder(&dev).connect(&addr).await.unwrap();
    assert!(anonymous.is_connected());
}

#[tokio::test]
async fn a_rogue_client_cannot_take_a_devices_identity() {
    let (server, addr, dev) = token_server().await;
    let (tx, mut pushes) = push_channel(8);
    let device = client_builder(&dev)
        .client_id("device-7")
        .token("secret-of-device-7")
        .push_channel(tx)
        .connect(&addr)
        .await
        .unwrap();
    let held = server.client("device-7").expect("bound");
    for (token, expected) in [(Some("guess"), "wrong token"), (None, "no token")] {
        let mut rogue = client_builder(&dev).client_id("device-7");
        if let Some(token) = token {
            rogue = rogue.token(token);
        }
        let err = rogue.connect(&addr).await.unwrap_err();
        assert!(
            matches!(err, Error::Unauthenticated(ref m) if m == expected),
            "{err:?}"
        );
    }
    // Valid credentials, but for another identity.
    let err = client_builder(&dev)
        .client_id("device-7")
        .token("admin-token")
        .connect(&addr)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
    // The device keeps its binding and its pushes.
    assert_eq!(server.client("device-7"), Some(held.clone()));
    assert!(!held.is_closed());
    server
        .send_to_client("device-7", "Cmd", "Still", Metadata::new(), b"yours")
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), pushes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&msg.payload[..], b"yours");
    assert_eq!(server.stats().auth_failures, 3);
    device.close().await;
}

#[tokio::test]
async fn the_real_device_takes_its_identity_over_with_the_right_credentials() {
    let (server, addr, dev) = token_server().await;
    let mut events = server.events();
    let first = client_builder(&dev)
        .client_id("device-9")
        .token("secret-of-device-9")
        .connect(&addr)
        .await
        .unwrap();
    let old = server.client("device-9").unwrap();
    // The same device again (a new process after a crash): verified, so it takes over.
    let second = client_builder(&dev)
        .client_id("device-9")
        .token("secret-of-device-9")
        .connect(&addr)
        .await
        .unwrap();
    let new = server.client("device-9").unwrap();
    assert_ne!(new, old);
    let taken = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.recv().await {
                Ok(ServerEvent::TakenOver {
                    client_id,
                    old: o,
                    new: n,
                }) => break (client_id, o, n),
                // Subscribers hear of the takeover before the old connection's end.
                Ok(ServerEvent::Disconnected { conn, .. }) => {
                    assert_ne!(conn, old, "Disconnected before TakenOver");
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(taken, ("device-9".to_owned(), old.clone(), new.clone()));
    // The old connection was closed for it (just after the event), and its client was told.
    let closed = tokio::time::timeout(Duration::from_secs(5), old.closed()).await;
    assert!(closed.is_ok(), "the old connection stays open");
    let lost = tokio::time::timeout(Duration::from_secs(5), async {
        while first.is_connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        lost.is_ok(),
        "the taken-over client still thinks it is connected"
    );
    // Replaced, it stands down instead of taking the identity back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.client("device-9"), Some(new));
    assert!(matches!(
        first.connection().await,
        Err(Error::NotConnected(quicx::NotConnected::Closed))
    ));
    second.close().await;
}

#[tokio::test]
async fn under_mtls_a_hello_may_only_repeat_the_certificate_name() {
    let ca = DevCertificateAuthority::generate("quicx security CA").unwrap();
    let server_cert = ca.issue("server", ["localhost"]).unwrap();
    let device_cert = ca.issue("device-42", Vec::<String>::new()).unwrap();
    let server = Server::builder()
        .tls(ServerTls::from_dev(&server_cert).require_client_certificates(vec![ca.certificate()]))
        .build()
        .unwrap();
    let addr = server.bind("127.0.0.1:0").await.unwrap().to_string();
    let tls = || {
        ClientTls::empty()
            .trust(ca.certificate())
            .client_dev_certificate(&device_cert)
    };
    let err = quicx::Client::builder()
        .tls(tls())
        .server_name("localhost")
        .client_id("device-1")
        .connect(&addr)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::PermissionDenied(ref m) if m.contains("device-42")),
        "{err:?}"
    );
    assert!(server.client("device-1").is_none());
    // Repeating the certificate's name is fine.
    let honest = quicx::Client::builder()
        .tls(tls())
        .server_name("localhost")
        .client_id("device-42")
        .connect(&addr)
        .await
        .unwrap();
    assert!(server.client("device-42").is_some());
    honest.close().await;
}

#[tokio::test]
async fn per_call_authorization_denies_one_method_and_allows_another() {
    let dev = DevCertificate::localhost().unwrap();
    let server = Server::builder()
        .dev_certificate(&dev)
        .authenticator(Authenticator::new(|hello: Hello| async move {
            match hello.token.as_deref() {
                Some("s3cret") => Ok(hello.client_id),
                _ => Err(Refusal::Unauthenticated("wrong token".into())),
            }
        }))
        .authorize_calls(CallAuthorizer::new(|ctx| {
            match (ctx.service_method(), ctx.conn().client_id().as_deref()) {
                ("Reset", Some("admin")) | ("Read", Some(_)) => Ok(()),
                ("Read", None) => Err(Refusal::Unauthenticated("say hello first".into())),
                _ => Err(Refusal::PermissionDenied("admins only".into())),
            }
        }))
        .build()
        .unwrap();
    server.register(
        "Device",
        quicx::Service::new()
            .method(
                "Read",
                |_ctx: quicx::Context, (): ()| async move { Ok(7u32) },
            )
            .method(
                "Reset",
                |_ctx: quicx::Context, (): ()| async move { Ok(()) },
            ),
    );
    let addr = server.bind("127.0.0.1:0").await.unwrap().to_string();
    let user = client_builder(&dev)
        .client_id("user-1")
        .token("s3cret")
        .connect(&addr)
        .await
        .unwrap();
    let value: u32 = user.call("Device", "Read", &()).await.unwrap();
    assert_eq!(value, 7);
    let err = user
        .call::<_, ()>("Device", "Reset", &())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::PermissionDenied(ref m) if m == "admins only"),
        "{err:?}"
    );
    let admin = client_builder(&dev)
        .client_id("admin")
        .token("s3cret")
        .connect(&addr)
        .await
        .unwrap();
    let () = admin.call("Device", "Reset", &()).await.unwrap();
    let anonymous = client_builder(&dev).connect(&addr).await.unwrap();
    let err = anonymous
        .call::<_, u32>("Device", "Read", &())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthenticated(_)), "{err:?}");
    assert_eq!(server.stats().auth_failures, 2);
}

#[tokio::test]
async fn a_reconnect_with_the_right_credentials_re_binds() {
    let (server, addr, dev) = token_server().await;
    let (tx, mut pushes) = push_channel(8);
    let device = client_builder(&dev)
        .client_id("device-3")
        .token("secret-of-device-3")
        .push_channel(tx)
        .connect(&addr)
        .await
        .unwrap();
    let first = server.client("device-3").unwrap();
    // The server drops the connection; the client reconnects and presents its token again.
    first.close();
    let rebound = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match server.client("device-3") {
                Some(conn) if conn != first => break conn,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await
    .expect("device-3 re-bound after its reconnect");
    assert!(!rebound.is_closed());
    server
        .send_to_client("device-3", "Cmd", "Again", Metadata::new(), b"back")
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), pushes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&msg.payload[..], b"back");
    assert_eq!(server.stats().auth_failures, 0);
    device.close().await;
}
