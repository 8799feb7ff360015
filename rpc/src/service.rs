//! Services: named sets of methods, each an async handler.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, RwLock},
};

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

use crate::{Codec, Context, ServiceError, wire::status};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
pub(crate) type HandlerFn =
    dyn Fn(Context, Codec, Bytes) -> BoxFuture<Result<Bytes, ServiceError>> + Send + Sync;

/// A named set of methods (rpcx's service). Register it on a [`Server`](crate::Server) under a
/// service path, or on a [`Client`](crate::Client) so the server can call it back.
///
/// A method is an async fn or closure taking the [`Context`] and the decoded arguments, returning
/// the reply or a [`ServiceError`]:
///
/// ```
/// use quicx::{Context, Service, ServiceError};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Args { a: i64, b: i64 }
///
/// async fn div(_ctx: Context, args: Args) -> Result<i64, ServiceError> {
///     if args.b == 0 {
///         return Err(ServiceError::new(4000, "divide by zero"));
///     }
///     Ok(args.a / args.b)
/// }
///
/// let arith = Service::new()
///     .method("Mul", |_ctx: Context, args: Args| async move { Ok(args.a * args.b) })
///     .method("Div", div);
/// assert!(arith.has_method("Div"));
/// ```
#[derive(Clone, Default)]
pub struct Service {
    methods: HashMap<String, Arc<HandlerFn>>,
}

impl Service {
    /// A service with no methods.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a typed method. Arguments are decoded and the reply encoded with the codec the caller
    /// chose; a decode failure is answered with status `DECODE_ERROR` without running the handler.
    #[must_use]
    pub fn method<A, R, F, Fut>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(Context, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, ServiceError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased = move |ctx: Context, codec: Codec, payload: Bytes| -> BoxFuture<_> {
            let args = match codec.decode::<A>(&payload) {
                Ok(args) => args,
                Err(e) => {
                    let err = ServiceError::status(status::DECODE_ERROR, e.to_string());
                    return Box::pin(async move { Err(err) });
                }
            };
            let fut = handler(ctx, args);
            Box::pin(async move {
                let reply = fut.await?;
                codec
                    .encode(&reply)
                    .map_err(|e| ServiceError::status(status::ENCODE_ERROR, e.to_string()))
            })
        };
        self.methods.insert(name.into(), Arc::new(erased));
        self
    }

    /// Adds a method that takes and returns raw payload bytes, whatever the codec.
    #[must_use]
    pub fn raw_method<F, Fut>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Context, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, ServiceError>> + Send + 'static,
    {
        let erased = move |ctx: Context, _codec: Codec, payload: Bytes| -> BoxFuture<_> {
            Box::pin(handler(ctx, payload))
        };
        self.methods.insert(name.into(), Arc::new(erased));
        self
    }

    /// Whether a method of this name is registered.
    pub fn has_method(&self, name: &str) -> bool {
        self.methods.contains_key(name)
    }

    pub(crate) fn handler(&self, name: &str) -> Option<Arc<HandlerFn>> {
        self.methods.get(name).cloned()
    }
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.methods.keys().collect();
        names.sort();
        f.debug_struct("Service").field("methods", &names).finish()
    }
}

/// The services registered on one side, shared with every connection of that side.
#[derive(Clone, Default, Debug)]
pub(crate) struct Services(Arc<RwLock<HashMap<String, Arc<Service>>>>);

/// The outcome of looking a method up.
/// A registered handler.
pub(crate) type Handler = Arc<HandlerFn>;

pub(crate) enum Lookup {
    Found(Arc<HandlerFn>),
    UnknownService,
    UnknownMethod,
}

impl Services {
    pub(crate) fn register(&self, path: impl Into<String>, service: Service) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.into(), Arc::new(service));
    }

    pub(crate) fn lookup(&self, path: &str, method: &str) -> Lookup {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        match map.get(path) {
            None => Lookup::UnknownService,
            Some(service) => match service.handler(method) {
                Some(h) => Lookup::Found(h),
                None => Lookup::UnknownMethod,
            },
        }
    }
}
