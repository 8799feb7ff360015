//! Who a client is: identities bind only from a verified source.
//!
//! A client declares an identity (a device id) in its hello. A server binds it — and lets it
//! take over a connection that holds it — only when a verified source vouches for it:
//!
//! 1. **mTLS**: the client certificate's common name is the identity; a hello may only repeat it;
//! 2. **an [`Authenticator`]** the application installs: it sees the hello (claimed id, token,
//!    metadata, peer address and certificate) and returns the verified identity or a refusal;
//! 3. **a handler** that calls [`Connection::bind_client_id`](crate::Connection::bind_client_id)
//!    after its own login logic.
//!
//! Anything else is refused with [`Error::Unauthenticated`](crate::Error::Unauthenticated) on
//! the client, unless the server opts out with
//! [`ServerBuilder::insecure_accept_unverified_client_ids`](crate::ServerBuilder::insecure_accept_unverified_client_ids).

use std::{fmt, future::Future, net::SocketAddr, sync::Arc};

use crate::{Context, Metadata, PeerIdentity, service::BoxFuture};

/// The hello metadata key that carries a client's token ([`ClientBuilder::token`]).
///
/// [`ClientBuilder::token`]: crate::ClientBuilder::token
pub const TOKEN_METADATA_KEY: &str = "quicx-token";

/// What a client presented when it said hello: the input of an [`Authenticator`].
#[derive(Debug, Clone)]
pub struct Hello {
    /// The client's address.
    pub remote: SocketAddr,
    /// Its verified certificate identity, under mTLS.
    pub peer_identity: Option<PeerIdentity>,
    /// The identity it claims.
    pub client_id: String,
    /// The token it presented ([`TOKEN_METADATA_KEY`]), if any.
    pub token: Option<String>,
    /// All of its hello metadata.
    pub metadata: Metadata,
}

/// Why an [`Authenticator`] refused a hello. The client gets the matching typed error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The credentials are missing or wrong ([`Error::Unauthenticated`](crate::Error::Unauthenticated),
    /// status `UNAUTHENTICATED`).
    Unauthenticated(String),
    /// The credentials are valid but not for this identity
    /// ([`Error::PermissionDenied`](crate::Error::PermissionDenied), status `PERMISSION_DENIED`).
    PermissionDenied(String),
}

type AuthFn = dyn Fn(Hello) -> BoxFuture<Result<String, Refusal>> + Send + Sync;

/// Verifies a client's hello and returns the identity to bind (which must be the one the client
/// claimed), or a refusal. Installed with
/// [`ServerBuilder::authenticator`](crate::ServerBuilder::authenticator); it runs once per hello
/// (so once per connection and reconnect), never per call.
///
/// ```
/// use quicx::{Authenticator, Refusal};
/// let auth = Authenticator::new(|hello: quicx::Hello| async move {
///     match hello.token.as_deref() {
///         Some(t) if t == format!("secret-of-{}", hello.client_id) => Ok(hello.client_id),
///         Some(_) => Err(Refusal::Unauthenticated("wrong token".into())),
///         None => Err(Refusal::Unauthenticated("no token".into())),
///     }
/// });
/// # let _ = auth;
/// ```
#[derive(Clone)]
pub struct Authenticator(Arc<AuthFn>);

impl Authenticator {
    /// An authenticator from an async function or closure.
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn(Hello) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, Refusal>> + Send + 'static,
    {
        Self(Arc::new(move |hello| Box::pin(f(hello))))
    }

    pub(crate) async fn verify(&self, hello: Hello) -> Result<String, Refusal> {
        (self.0)(hello).await
    }
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Authenticator")
    }
}

type AuthorizeFn = dyn Fn(&Context) -> Result<(), Refusal> + Send + Sync;

/// Decides, before its handler runs, whether a call may go ahead (rpcx's `AuthFunc`): it sees
/// the call's [`Context`] — the caller's verified identity (`ctx.conn().client_id()`), its
/// certificate, the service, method and metadata (a per-call token, say). A refusal answers the
/// call with status `UNAUTHENTICATED` or `PERMISSION_DENIED` without running the handler.
/// Installed with [`ServerBuilder::authorize_calls`](crate::ServerBuilder::authorize_calls); it
/// runs on every call, on the connection's I/O thread, so it must be quick (no I/O).
///
/// ```
/// use quicx::{CallAuthorizer, Refusal};
/// // Only the identity `admin` may call the `Admin` service.
/// let authorize = CallAuthorizer::new(|ctx| {
///     if ctx.service_path() == "Admin" && ctx.conn().client_id().as_deref() != Some("admin") {
///         return Err(Refusal::PermissionDenied("admins only".into()));
///     }
///     Ok(())
/// });
/// # let _ = authorize;
/// ```
#[derive(Clone)]
pub struct CallAuthorizer(Arc<AuthorizeFn>);

impl CallAuthorizer {
    /// An authorizer from a function or closure.
    pub fn new<F>(f: F) -> Self
    where
        F: Fn(&Context) -> Result<(), Refusal> + Send + Sync + 'static,
    {
        Self(Arc::new(f))
    }

    pub(crate) fn check(&self, ctx: &Context) -> Result<(), Refusal> {
        (self.0)(ctx)
    }
}

impl fmt::Debug for CallAuthorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallAuthorizer")
    }
}

/// How a server decides whether a claimed identity may bind, and whether a call may run.
#[derive(Debug, Clone, Default)]
pub(crate) struct IdentityPolicy {
    pub(crate) authenticator: Option<Authenticator>,
    /// The insecure opt-out: unverified hello ids bind (and take over).
    pub(crate) accept_unverified: bool,
    pub(crate) authorize_calls: Option<CallAuthorizer>,
}
