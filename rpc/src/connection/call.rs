//! Outgoing calls: forward calls from a client, reverse calls from a server, and the client's
//! hello. Each is one bidirectional stream: request frame out, response frame back.

use std::{
    borrow::Cow,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use tracing::Instrument;

use super::Connection;
use crate::{
    Codec, Error, Metadata, OutgoingCall, Result,
    error::ProtocolError,
    io::within,
    trace::{self, TraceContext},
    wire::{
        self, Frame, FrameKind, HelloHeader, RequestHeaderRef, ResponseHeader, Status, StreamCode,
        flags,
    },
};

/// Options of one call: metadata, timeout, codec.
///
/// ```
/// use std::time::Duration;
/// let opts = quicx::CallOptions::new()
///     .metadata("trace-id", "42")
///     .timeout(Duration::from_secs(2));
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Request metadata.
    pub metadata: Metadata,
    /// How long to wait for the reply. `None` uses the side's default call timeout. The server
    /// learns it too and cancels the handler when it passes. Through an
    /// [`XClient`](crate::XClient) it bounds the whole call: connecting and every attempt.
    pub timeout: Option<Duration>,
    /// Payload codec. The reply comes back in the same codec.
    pub codec: Codec,
    /// Routing key for an [`XClient`](crate::XClient) with
    /// [`SelectMode::ConsistentHash`](crate::SelectMode::ConsistentHash): calls with the same key
    /// go to the same endpoint. Not sent on the wire.
    pub route_key: Option<String>,
}

impl CallOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// A timeout as the request header's `timeout_ms` (see `docs/PROTOCOL.md`): rounded up to
    /// whole milliseconds, at least 1 (`0` on the wire means no deadline), so the receiver,
    /// which counts from when it has read the request, never gives up before the caller.
    pub fn wire_timeout_ms(timeout: Duration) -> u64 {
        timeout
            .as_nanos()
            .div_ceil(1_000_000)
            .clamp(1, u128::from(u64::MAX)) as u64
    }

    /// Adds a metadata pair.
    #[must_use]
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key, value);
        self
    }

    /// Sets the timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the codec.
    #[must_use]
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Sets the routing key used by consistent hashing.
    #[must_use]
    pub fn route_key(mut self, key: impl Into<String>) -> Self {
        self.route_key = Some(key.into());
        self
    }
}

/// A reply as bytes, with its metadata.
#[derive(Debug, Clone)]
pub struct RawReply {
    /// Response metadata set by the handler.
    pub metadata: Metadata,
    /// The encoded reply.
    pub payload: Bytes,
}

impl RawReply {
    fn empty() -> Self {
        Self {
            metadata: Metadata::new(),
            payload: Bytes::new(),
        }
    }
}

/// What a round trip waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    /// A response frame.
    Wanted,
    /// Nothing: the request is handed to QUIC and the stream finished (oneway).
    None,
}

impl Connection {
    /// Calls `service_path.service_method` on the peer with postcard-encoded `args` and decodes the
    /// reply. From a server this is a reverse call to a client that registered the service.
    ///
    /// # When it returns
    /// When the reply arrived, or with an error: the remote handler's ([`Error::Remote`]), a
    /// protocol status ([`Error::UnknownService`], ...), the deadline
    /// ([`Error::DeadlineExceeded`]), or a transport failure ([`Error::ConnectionLost`];
    /// [`Error::PeerUnresponsive`] about 1.5 s after the peer went silent).
    ///
    /// # Cancel safety
    /// Dropping the future resets the stream with `CANCELLED`, and the remote handler is
    /// cancelled. Whether the handler had started (or finished) by then is unknown.
    pub async fn call<A, R>(&self, service_path: &str, service_method: &str, args: &A) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.call_with(service_path, service_method, args, &CallOptions::default())
            .await
    }

    /// [`call`](Self::call) with metadata, timeout and codec; same contract.
    pub async fn call_with<A, R>(
        &self,
        service_path: &str,
        service_method: &str,
        args: &A,
        options: &CallOptions,
    ) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let (frame, call) =
            self.typed_request(service_path, service_method, args, options, Reply::Wanted)?;
        let reply = self
            .round_trip(frame, call, options.timeout, Reply::Wanted)
            .await?;
        options.codec.decode(&reply.payload)
    }

    /// A oneway call: sends the request and returns once it is handed to QUIC; the handler runs
    /// but no reply (not even an error) comes back.
    ///
    /// # When it returns
    /// Once the request is queued in QUIC's send buffer, not when the peer received it. A
    /// oneway call followed at once by [`close`](Self::close) (or the end of the process) may be
    /// lost: closing discards unsent data. Use a normal call when delivery matters.
    ///
    /// # Cancel safety
    /// Dropping the future before it returns resets the stream; the handler does not run.
    pub async fn oneway<A>(&self, service_path: &str, service_method: &str, args: &A) -> Result<()>
    where
        A: Serialize + ?Sized,
    {
        let options = CallOptions::default();
        let (frame, call) =
            self.typed_request(service_path, service_method, args, &options, Reply::None)?;
        self.round_trip(frame, call, None, Reply::None)
            .await
            .map(drop)
    }

    /// A call with payload bytes the caller encoded (in `options.codec`); returns the reply's
    /// bytes and metadata undecoded. Same contract as [`call`](Self::call).
    pub async fn call_raw(
        &self,
        service_path: &str,
        service_method: &str,
        payload: &[u8],
        options: &CallOptions,
    ) -> Result<RawReply> {
        let payload = Bytes::copy_from_slice(payload);
        self.request_raw(
            service_path,
            service_method,
            payload,
            options,
            Reply::Wanted,
        )
        .await
    }

    /// Sends already encoded arguments; a oneway request returns an empty reply once handed to
    /// QUIC.
    pub(crate) async fn request_raw(
        &self,
        service_path: &str,
        service_method: &str,
        payload: Bytes,
        options: &CallOptions,
        reply: Reply,
    ) -> Result<RawReply> {
        // The header and metadata end here, not held across the round trip.
        let (frame, call) = {
            let (metadata, call) = self.outgoing(service_path, service_method, options)?;
            let header =
                self.request_header(service_path, service_method, &metadata, options, reply);
            let frame = Frame::encode(
                FrameKind::Request,
                &header,
                payload,
                &self.inner.side.limits,
            );
            (
                self.refused_locally(frame.map_err(Error::from), &call)?,
                call,
            )
        };
        self.round_trip(frame, call, options.timeout, reply).await
    }

    /// The metadata a call carries once the trace context and the call interceptors had their
    /// say (borrowed as given when they add nothing), and what the round trip needs to know.
    /// An interceptor's refusal is the call's error.
    fn outgoing<'a>(
        &self,
        service_path: &'a str,
        service_method: &'a str,
        options: &'a CallOptions,
    ) -> Result<(Cow<'a, Metadata>, Call<'a>)> {
        let side = &self.inner.side;
        let mut metadata = Cow::Borrowed(&options.metadata);
        let trace = match options.metadata.get(trace::TRACEPARENT) {
            Some(given) => TraceContext::parse(given),
            None => {
                let trace = trace::outgoing(side.trace_calls);
                if let Some(t) = &trace {
                    metadata.to_mut().insert(trace::TRACEPARENT, t.to_string());
                }
                trace
            }
        };
        let call = Call {
            service_path,
            service_method,
            trace,
            intercepted: !side.call_interceptors.is_empty(),
        };
        if call.intercepted {
            let borrowed = match &metadata {
                Cow::Borrowed(m) => Some(*m),
                Cow::Owned(_) => None,
            };
            let mut outgoing =
                OutgoingCall::new(service_path, service_method, &self.inner.quic, metadata);
            let refused = side.call_interceptors.before_call(&mut outgoing);
            metadata = match (outgoing.into_owned_metadata(), borrowed) {
                (Some(owned), _) => Cow::Owned(owned),
                (None, Some(m)) => Cow::Borrowed(m),
                (None, None) => unreachable!("owned metadata stays owned"),
            };
            if let Err(e) = refused {
                // Counted like any failed call, and seen by every `after_call`.
                self.finish_call(&call, Err(&e), Duration::ZERO);
                return Err(e);
            }
        }
        Ok((metadata, call))
    }

    /// Passes an encoding error on as the call's result, for the interceptors to see.
    fn refused_locally<T>(&self, result: Result<T>, call: &Call<'_>) -> Result<T> {
        result.inspect_err(|e| self.finish_call(call, Err(e), Duration::ZERO))
    }

    /// Tells the call interceptors how a call ended.
    fn finish_call(&self, call: &Call<'_>, result: Result<(), &Error>, elapsed: Duration) {
        if call.intercepted {
            self.inner.side.call_interceptors.after_call(
                call.service_path,
                call.service_method,
                result,
                elapsed,
            );
        }
    }

    fn typed_request<'a, A: Serialize + ?Sized>(
        &self,
        service_path: &'a str,
        service_method: &'a str,
        args: &A,
        options: &'a CallOptions,
        reply: Reply,
    ) -> Result<(Frame, Call<'a>)> {
        let (metadata, call) = self.outgoing(service_path, service_method, options)?;
        let header = self.request_header(service_path, service_method, &metadata, options, reply);
        let frame = wire::encode_frame_with(
            FrameKind::Request,
            &header,
            &self.inner.side.limits,
            |buf| options.codec.encode_into(args, buf),
        )
        .map(Frame::whole);
        Ok((self.refused_locally(frame, &call)?, call))
    }

    fn request_header<'a>(
        &self,
        service_path: &'a str,
        service_method: &'a str,
        metadata: &'a Metadata,
        options: &CallOptions,
        reply: Reply,
    ) -> RequestHeaderRef<'a> {
        let timeout = options.timeout.or(self.inner.side.call_timeout);
        RequestHeaderRef {
            service_path,
            service_method,
            metadata,
            timeout_ms: timeout.map_or(0, CallOptions::wire_timeout_ms),
            flags: if reply == Reply::None {
                flags::ONEWAY
            } else {
                0
            },
            codec: options.codec.to_wire(),
        }
    }

    /// Sends one frame on a new bidirectional stream and reads the response, within `timeout`
    /// (the side's default if `None`): inline where the connection is driven, else handed to
    /// its I/O runtime. Counted in the side's call counters; a call's interceptors see how it
    /// ended.
    pub(crate) async fn round_trip(
        &self,
        frame: Frame,
        call: Call<'_>,
        timeout: Option<Duration>,
        reply: Reply,
    ) -> Result<RawReply> {
        let started = call.intercepted.then(Instant::now);
        // The interceptors hear of a call whose future is dropped before it ends, too.
        let mut unfinished = Unfinished {
            conn: self,
            call: &call,
            started,
        };
        let timeout = timeout.or(self.inner.side.call_timeout);
        let span = tracing::debug_span!(
            "call",
            service = %call.service_path,
            method = %call.service_method,
            conn = self.inner.id,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        if let Some(t) = call.trace.as_ref().filter(|_| !span.is_disabled()) {
            span.record("trace_id", t.trace_id());
            span.record("span_id", t.span_id());
        }
        let io = &self.inner.io;
        let result = if io.is_current() {
            self.round_trip_here(
                frame,
                call.service_path,
                call.service_method,
                timeout,
                reply,
            )
            .instrument(span)
            .await
        } else {
            let conn = self.clone();
            let (path, method) = (call.service_path.to_owned(), call.service_method.to_owned());
            // Built on the I/O thread: this future holds what builds it, not the round trip.
            io.run_built(move || {
                async move {
                    conn.round_trip_here(frame, &path, &method, timeout, reply)
                        .await
                }
                .instrument(span)
            })
            .await
            .and_then(|r| r)
        };
        let counters = &self.inner.side.counters;
        counters.calls_sent.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            counters.call_errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(started) = unfinished.started.take() {
            self.finish_call(&call, result.as_ref().map(drop), started.elapsed());
        }
        result
    }

    /// [`round_trip`](Self::round_trip) where the connection is driven.
    async fn round_trip_here(
        &self,
        frame: Frame,
        service_path: &str,
        service_method: &str,
        timeout: Option<Duration>,
        reply: Reply,
    ) -> Result<RawReply> {
        let _waiting = (reply == Reply::Wanted).then(|| self.waiting());
        let fut = self.exchange(frame, service_path, service_method, reply);
        let result = match timeout {
            Some(t) => {
                let deadline = Instant::now().checked_add(t);
                match within(t, fut).await {
                    // The remote counts from when it has read the request, and the timeout it
                    // got was rounded up (`CallOptions::wire_timeout_ms`), so its deadline never
                    // passes before ours: its answer, read in the turn our timer fired (or
                    // before this thread got to it), means ours passed.
                    Ok(Err(Error::DeadlineExceeded { remote: true }))
                        if deadline.is_some_and(|d| Instant::now() >= d) =>
                    {
                        Err(Error::DeadlineExceeded { remote: false })
                    }
                    Ok(result) => result,
                    Err(_elapsed) => Err(Error::DeadlineExceeded { remote: false }),
                }
            }
            None => fut.await,
        };
        result.map_err(|e| match e {
            Error::ConnectionLost(lost) => self.lost(lost),
            other => other,
        })
    }

    /// The stream work of one call: open, write the request, finish, read the response.
    async fn exchange(
        &self,
        frame: Frame,
        service_path: &str,
        service_method: &str,
        reply: Reply,
    ) -> Result<RawReply> {
        let (send, recv) = self.inner.quic.open_bi().await?;
        let mut streams = CallStreams {
            send,
            recv,
            armed: true,
        };
        frame.write(&mut streams.send).await?;
        streams.send.finish()?;
        if reply == Reply::None {
            streams.armed = false;
            return Ok(RawReply::empty());
        }
        let raw = wire::read_frame(&mut streams.recv, &self.inner.side.limits)
            .await
            .map_err(|e| {
                if let Some(c) = e.stream_code() {
                    let _ = streams.recv.stop(c.into());
                }
                Error::from(e)
            })?;
        streams.armed = false;
        if raw.kind != FrameKind::Response {
            return Err(ProtocolError::UnexpectedFrame(raw.kind as u8).into());
        }
        let response: ResponseHeader = raw.header()?;
        match response.status {
            Status::Ok => Ok(RawReply {
                metadata: response.metadata,
                payload: raw.payload,
            }),
            Status::Error { code, message } => Err(Error::from_status(
                code,
                message,
                service_path,
                service_method,
            )),
        }
    }
}

/// A call on its way: dropped before it ended (its future cancelled), it tells the call
/// interceptors the call ended with [`Error::Cancelled`].
struct Unfinished<'c, 'a> {
    conn: &'c Connection,
    call: &'c Call<'a>,
    /// When it started; `None` once reported (or when nobody listens).
    started: Option<Instant>,
}

impl Drop for Unfinished<'_, '_> {
    fn drop(&mut self) {
        if let Some(started) = self.started.take() {
            self.conn
                .finish_call(self.call, Err(&Error::Cancelled), started.elapsed());
        }
    }
}

/// What a round trip carries, for its span and interceptors.
#[derive(Debug)]
pub(crate) struct Call<'a> {
    pub(crate) service_path: &'a str,
    pub(crate) service_method: &'a str,
    /// The trace context the request carries.
    pub(crate) trace: Option<TraceContext>,
    /// Whether the call interceptors see it (calls do; hellos and pushes with receipt do not).
    pub(crate) intercepted: bool,
}

impl<'a> Call<'a> {
    /// An exchange that is not a call (a hello, a push with receipt): no interceptors, no trace.
    pub(crate) fn plain(service_path: &'a str, service_method: &'a str) -> Self {
        Self {
            service_path,
            service_method,
            trace: None,
            intercepted: false,
        }
    }
}

/// The two halves of a call's stream; resets both with `CANCELLED` if dropped while armed.
struct CallStreams {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    armed: bool,
}

impl Drop for CallStreams {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.send.reset(StreamCode::CANCELLED.into());
            let _ = self.recv.stop(StreamCode::CANCELLED.into());
        }
    }
}

/// Sends a hello declaring `client_id` and waits for the server's answer, within `timeout`.
/// A refusal is [`Error::HelloRefused`].
pub(crate) async fn hello(
    conn: &Connection,
    client_id: Option<String>,
    metadata: Metadata,
    timeout: Duration,
) -> Result<()> {
    let header = HelloHeader {
        client_id: client_id.clone(),
        metadata,
    };
    let frame = Frame::whole(wire::encode_frame(
        FrameKind::Hello,
        &header,
        &[],
        &conn.inner.side.limits,
    )?);
    conn.round_trip(
        frame,
        Call::plain("", "hello"),
        Some(timeout),
        Reply::Wanted,
    )
    .await?;
    conn.set_client_id_local(client_id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The receiver's deadline is never shorter than the caller's.
    #[test]
    fn timeout_on_the_wire_rounds_up() {
        assert_eq!(
            CallOptions::wire_timeout_ms(Duration::from_millis(200)),
            200
        );
        assert_eq!(
            CallOptions::wire_timeout_ms(Duration::from_micros(199_001)),
            200
        );
        assert_eq!(CallOptions::wire_timeout_ms(Duration::from_nanos(1)), 1);
        assert_eq!(CallOptions::wire_timeout_ms(Duration::ZERO), 1);
        assert_eq!(CallOptions::wire_timeout_ms(Duration::MAX), u64::MAX);
    }
}
