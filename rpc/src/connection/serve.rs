//! Serving what the peer opens: calls (forward or reverse), hellos (servers), pushes and pushes
//! with receipt (clients).

use std::{
    any::Any,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::atomic::Ordering,
    task::{Context as TaskContext, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{FutureExt, future::CatchUnwind};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{Connection, side::Role};
use crate::{
    Codec, Context, Metadata, PushMessage, PushSender, ServiceError,
    io::{INLINE_BUDGET, ThreadClock, handler_pool, within},
    push::Delivery,
    service::{BoxFuture, Handler, Lookup, panic_message},
    wire::{
        self, Frame, FrameError, FrameKind, HelloHeader, Incoming, PushHeader, RawFrame,
        RequestHeader, ResponseHeader, Status, StreamCode, flags, status,
    },
};

/// Serves everything the peer opens on `conn` until the connection ends: calls (and, on a
/// server, hellos; on a client, pushes with receipt) on bidirectional streams; pushes on
/// unidirectional ones (clients only: servers grant no unidirectional streams).
pub(crate) async fn serve(conn: Connection) {
    let side = conn.inner.side.clone();
    let pushes = async {
        if let Role::Client { push_sink, .. } = &side.role {
            accept_pushes(&conn, push_sink.as_ref()).await;
        }
    };
    let (initial, max) = side.call_limits;
    let calls = async {
        while let Ok((send, recv)) = conn.inner.quic.accept_bi().await {
            let in_flight = conn.inner.calls_in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            if in_flight >= initial - initial / 4
                && max > initial
                && !conn.inner.call_limit_raised.swap(true, Ordering::Relaxed)
            {
                // Busy: let the peer open up to the maximum, so calls never queue behind the
                // limit; idle connections keep the small starting limit (and quinn's state for
                // it).
                conn.inner.quic.set_max_concurrent_bi_streams(max.into());
            }
            let conn = conn.clone();
            side.tracker.spawn(async move {
                serve_bi(&conn, send, recv).await;
                conn.inner.calls_in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
    };
    tokio::join!(pushes, calls);
}

/// What a client answers a push with receipt it dropped.
const DROPPED_TEXT: &str =
    "dropped by the client (push channel full, or its push handler panicked)";

/// How long a durable message pushed with receipt (`quicx/1`, and a cluster's) waits at the
/// client for the one before it to be handed over. A server gives each receipt its
/// acknowledgement timeout (60 s by default) from the one before and resets the streams after
/// a failed one, so with 32 in flight the last may legitimately wait 31 of those for an
/// application acknowledging by hand: this bound only stops a server that never gives up.
const ADMIT_LIMIT: Duration = Duration::from_secs(3600);

/// Counts one durable push waiting for the one before it, for as long as it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Durable pushes with receipt that may wait at once on one connection for the ones before
/// them (servers send 32 at a time); more are refused, and what each holds (its frame) is
/// bounded by that.
const MAX_WAITING: u32 = 64;

/// The code for durable records where they do not belong: on a stream a client opened or a
/// unidirectional one (v2), or at all (v1, where kind `0x05` does not exist).
fn misplaced_records(conn: &Connection) -> StreamCode {
    if conn.protocol_version() >= 2 {
        StreamCode::UNEXPECTED_STREAM
    } else {
        StreamCode::MALFORMED_FRAME
    }
}

/// Rejects a stream: resets what we would send, stops what the peer sends.
fn reject(send: Option<&mut quinn::SendStream>, recv: &mut quinn::RecvStream, code: StreamCode) {
    if let Some(send) = send {
        let _ = send.reset(code.into());
    }
    let _ = recv.stop(code.into());
}

/// Reads the one frame the peer sends on a stream it opened, within the frame timeout. On a
/// bad frame or a timeout the stream is rejected with the matching code and `None` returned.
async fn read_incoming(
    conn: &Connection,
    send: Option<&mut quinn::SendStream>,
    recv: &mut quinn::RecvStream,
) -> Option<Incoming> {
    let side = &conn.inner.side;
    let both;
    let budgets: &[&wire::Budget] = match (side.limiters(), &conn.inner.buffered) {
        (Some(limiters), Some(own)) => {
            both = [own, &limiters.buffered];
            &both
        }
        _ => &[],
    };
    let read = wire::read_frame_within(recv, &side.limits, budgets);
    match within(side.frame_timeout, read).await {
        Ok(Ok(incoming)) => Some(incoming),
        Ok(Err(e)) => {
            tracing::debug!(conn = conn.id(), "bad incoming frame: {e:?}");
            if let Some(code) = e.stream_code() {
                reject(send, recv, code);
            }
            None
        }
        Err(_) => {
            reject(send, recv, StreamCode::CANCELLED);
            None
        }
    }
}

async fn serve_bi(conn: &Connection, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let side = &conn.inner.side;
    if side.shutting_down.load(Ordering::Acquire) {
        return reject(Some(&mut send), &mut recv, StreamCode::SHUTTING_DOWN);
    }
    let raw = match read_incoming(conn, Some(&mut send), &mut recv).await {
        None => return,
        Some(Incoming::Frame(raw)) => raw,
        Some(Incoming::Records(start)) => {
            return match &side.role {
                Role::Client {
                    push_sink,
                    inbox,
                    manual_ack,
                } if conn.protocol_version() >= 2 => {
                    let records = wire::RecordReader::new(recv, start);
                    serve_durable_stream(
                        conn,
                        send,
                        records,
                        push_sink.as_ref(),
                        (inbox, *manual_ack),
                    )
                    .await;
                }
                _ => reject(Some(&mut send), &mut recv, misplaced_records(conn)),
            };
        }
    };
    let outcome = match (raw.kind, &side.role) {
        (FrameKind::Request, _) => serve_request(conn, send, raw).await,
        (FrameKind::Hello, Role::Server { .. }) => serve_hello(conn, send, raw).await,
        (
            FrameKind::Push,
            Role::Client {
                push_sink,
                inbox,
                manual_ack,
            },
        ) => serve_receipt_push(conn, send, raw, push_sink.as_ref(), (inbox, *manual_ack)).await,
        _ => return reject(Some(&mut send), &mut recv, StreamCode::UNEXPECTED_STREAM),
    };
    if let Err(code) = outcome {
        reject(None, &mut recv, code);
    }
}

/// Writes a response frame and finishes the stream; a response above the limits resets it.
async fn respond(
    conn: &Connection,
    send: &mut quinn::SendStream,
    status: Status,
    metadata: Metadata,
    payload: Bytes,
) {
    let header = ResponseHeader { status, metadata };
    match Frame::encode(
        FrameKind::Response,
        &header,
        payload,
        &conn.inner.side.limits,
    ) {
        Ok(frame) => {
            if frame.write(send).await.is_ok() {
                let _ = send.finish();
            }
        }
        Err(e) => {
            let _ = send.reset(e.stream_code().unwrap_or(StreamCode::INTERNAL).into());
        }
    }
}

/// A request the dispatcher accepted: its header, codec and handler.
struct Dispatched {
    header: RequestHeader,
    codec: Codec,
    handler: Handler,
}

/// Why a request is not dispatched, and how it is answered.
enum Undispatched {
    /// With an error status (unknown service, method or codec).
    Answer(Status),
    /// By resetting the stream (a malformed header).
    Reset(StreamCode),
}

/// Hands a push to the application's channel, counting it in the client's metrics.
async fn deliver(conn: &Connection, sink: &PushSender, msg: PushMessage) -> Delivery {
    let delivery = sink.deliver(msg).await;
    counted(conn, delivery)
}

/// Counts a delivery in the client's metrics.
fn counted(conn: &Connection, delivery: Delivery) -> Delivery {
    let side = &conn.inner.side;
    side.record(crate::metrics::Event::ClientPushReceived);
    if delivery == Delivery::Dropped {
        side.record(crate::metrics::Event::ClientPushDropped);
    }
    delivery
}

/// Decodes a request header and finds its handler.
fn dispatch(conn: &Connection, raw: &RawFrame) -> Result<Dispatched, Undispatched> {
    let header = raw
        .request_header()
        .map_err(|e| Undispatched::Reset(e.stream_code().unwrap_or(StreamCode::INTERNAL)))?;
    let Some(codec) = Codec::from_wire(header.codec) else {
        let message = format!("unsupported codec {}", header.codec);
        return Err(Undispatched::Answer(Status::error(
            status::UNSUPPORTED_CODEC,
            message,
        )));
    };
    let services = &conn.inner.side.services;
    let handler = match services.lookup(&header.service_path, &header.service_method) {
        Lookup::Found(h) => h,
        Lookup::UnknownService => {
            let message = format!("unknown service `{}`", header.service_path);
            return Err(Undispatched::Answer(Status::error(
                status::UNKNOWN_SERVICE,
                message,
            )));
        }
        Lookup::UnknownMethod => {
            let message = format!(
                "unknown method `{}` on service `{}`",
                header.service_method, header.service_path
            );
            return Err(Undispatched::Answer(Status::error(
                status::UNKNOWN_METHOD,
                message,
            )));
        }
    };
    Ok(Dispatched {
        header,
        codec,
        handler,
    })
}

async fn serve_request(
    conn: &Connection,
    mut send: quinn::SendStream,
    raw: RawFrame,
) -> Result<(), StreamCode> {
    let Dispatched {
        header,
        codec,
        handler,
    } = match dispatch(conn, &raw) {
        Ok(d) => d,
        Err(Undispatched::Answer(status)) => {
            respond(conn, &mut send, status, Metadata::new(), Bytes::new()).await;
            return Ok(());
        }
        Err(Undispatched::Reset(code)) => {
            let _ = send.reset(code.into());
            return Err(code);
        }
    };
    let oneway = header.flags & flags::ONEWAY != 0;
    let started = Instant::now();
    let deadline =
        (header.timeout_ms > 0).then(|| started + Duration::from_millis(header.timeout_ms));
    // The call's own token (no registration with a shared parent, which would lock on every
    // call): cancelled when this task ends early — caller gone, deadline, shutdown (all
    // selected in `run_handler`) — or is dropped.
    let cancel = CancellationToken::new();
    let _cancel_on_exit = cancel.clone().drop_guard();
    let trace = if header.metadata.is_empty() {
        None
    } else {
        crate::trace::served(&header.metadata)
    };
    let span = tracing::debug_span!(
        "serve",
        service = %header.service_path,
        method = %header.service_method,
        conn = conn.id(),
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_id = tracing::field::Empty,
    );
    if let Some(t) = &trace {
        if !span.is_disabled() {
            span.record("trace_id", t.trace_id());
            span.record("span_id", t.span_id());
            if let Some(parent) = header.metadata.get(crate::trace::TRACEPARENT) {
                span.record("parent_id", parent.get(36..52).unwrap_or_default());
            }
        }
    }
    let ctx = Context::new(
        conn.clone(),
        (header.service_path, header.service_method),
        header.metadata,
        deadline,
        cancel.clone(),
        trace,
        handler.clone(),
    );
    let side = &conn.inner.side;
    let interceptors = &side.interceptors;
    let finish = |status: &Status, asked: usize| {
        if asked > 0 {
            let outcome = crate::CallOutcome {
                status: match status {
                    Status::Ok => 0,
                    Status::Error { code, .. } => *code,
                },
                elapsed: started.elapsed(),
            };
            interceptors.after_call(asked, &ctx, &outcome);
        }
    };
    if let Err((refusal, asked)) = interceptors.before_call(&ctx) {
        if matches!(
            refusal.code(),
            status::UNAUTHENTICATED | status::PERMISSION_DENIED
        ) {
            side.auth_failure();
        }
        let status = Status::error(refusal.code(), refusal.message());
        finish(&status, asked);
        if !oneway {
            respond(conn, &mut send, status, Metadata::new(), Bytes::new()).await;
        }
        return Ok(());
    }
    let asked = interceptors.len();
    let handler = run_handler(&handler, ctx.clone(), codec, raw.payload).instrument(span);
    side.counters.calls_served.fetch_add(1, Ordering::Relaxed);
    if oneway {
        let _ = send.finish();
        drop(send);
        let status = tokio::select! {
            result = handler => handler_status(conn, result).0,
            () = side.shutdown.cancelled() => Status::error(status::SHUTTING_DOWN, "shutting down"),
        };
        finish(&status, asked);
        return Ok(());
    }
    let stopped = send.stopped();
    let deadline_passed = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    // Biased, handler first: a handler that finishes in its first poll never arms the deadline
    // timer or registers for the stream's stop notification.
    let (status, payload) = tokio::select! {
        biased;
        result = handler => handler_status(conn, result),
        () = deadline_passed => {
            cancel.cancel();
            (Status::error(status::DEADLINE_EXCEEDED, "deadline exceeded"), Bytes::new())
        }
        _ = stopped => {
            // The caller gave up (timeout, dropped future) or the connection is gone.
            cancel.cancel();
            let _ = send.reset(StreamCode::CANCELLED.into());
            finish(&Status::error(status::CANCELLED, "cancelled"), asked);
            return Ok(());
        }
        () = side.shutdown.cancelled() => {
            let _ = send.reset(StreamCode::SHUTTING_DOWN.into());
            finish(&Status::error(status::SHUTTING_DOWN, "shutting down"), asked);
            return Ok(());
        }
    };
    if !matches!(status, Status::Ok) {
        side.counters
            .call_handler_errors
            .fetch_add(1, Ordering::Relaxed);
    }
    finish(&status, asked);
    respond(conn, &mut send, status, ctx.take_reply_metadata(), payload).await;
    if side.shutting_down.load(Ordering::Acquire) {
        // Draining: stay tracked until the client has the reply, so closing the connection
        // afterwards cannot discard it.
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    }
    Ok(())
}

/// The status and payload a handler's outcome answers with.
fn handler_status(conn: &Connection, result: HandlerOutcome) -> (Status, Bytes) {
    match result {
        Ok(Ok(payload)) => (Status::Ok, payload),
        Ok(Err(e)) => (Status::error(e.code(), e.message()), Bytes::new()),
        Err(panic) => {
            let message = panic_message(&*panic);
            tracing::error!(conn = conn.id(), "handler panicked: {message}");
            (Status::error(status::INTERNAL, message), Bytes::new())
        }
    }
}

/// What a handler's run gives: its result, or the panic it raised.
type HandlerOutcome = Result<Result<Bytes, ServiceError>, Box<dyn Any + Send>>;

/// Runs one call's handler where its method belongs: inline on this I/O thread, or on the
/// handler pool for a method that proved slow, or for a heavy one while this I/O thread is
/// overloaded (connections the kernel put on one thread then use the other cores too). Every
/// poll is timed either way (see `PollStats` in `service.rs`): a method moves to the pool when
/// its polls overrun the inline budget, and back when they no longer do. Dropping the returned
/// future cancels the handler either way.
fn run_handler(method: &Handler, ctx: Context, codec: Codec, payload: Bytes) -> HandlerRun {
    let conn = ctx.conn();
    let shed = method.is_heavy() && conn.io().overloaded_among(&conn.inner.side.io_threads);
    let trace = ctx.trace();
    let mut fut = method.call(ctx, codec, payload);
    if let Some(trace) = trace {
        // Calls the handler makes continue the caller's trace.
        fut = Box::pin(crate::trace::scope(trace, fut));
    }
    let timed = Timed {
        call: AssertUnwindSafe(fut).catch_unwind(),
        method: method.clone(),
    };
    if method.is_slow() || shed {
        if let Ok(pool) = handler_pool() {
            return HandlerRun::Pooled(AbortOnDrop(pool.spawn(timed)));
        }
    }
    HandlerRun::Inline(timed)
}

/// A handler's run, inline or on the pool (no allocation beyond the handler's own future).
enum HandlerRun {
    Inline(Timed),
    Pooled(AbortOnDrop<HandlerOutcome>),
}

impl Future for HandlerRun {
    type Output = HandlerOutcome;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<HandlerOutcome> {
        match self.get_mut() {
            Self::Inline(timed) => Pin::new(timed).poll(cx),
            Self::Pooled(task) => Pin::new(&mut task.0).poll(cx).map(|joined| match joined {
                Ok(outcome) => outcome,
                Err(e) if e.is_panic() => Err(e.into_panic()),
                Err(_) => Err(Box::new("handler task cancelled") as Box<dyn Any + Send>),
            }),
        }
    }
}

/// A handler's future with each poll timed into its method's statistics.
struct Timed {
    call: CatchUnwind<AssertUnwindSafe<BoxFuture<Result<Bytes, ServiceError>>>>,
    method: Handler,
}

impl Future for Timed {
    type Output = HandlerOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<HandlerOutcome> {
        let clock = if self.method.checks_preemption() {
            ThreadClock::now()
        } else {
            None
        };
        let started = Instant::now();
        let outcome = self.call.poll_unpin(cx);
        let mut took = started.elapsed();
        if took > INLINE_BUDGET {
            // Preempted rather than slow: what it ran is what it cost its thread's clients.
            if let Some(ran) = clock.and_then(ThreadClock::ran_without_blocking) {
                took = took.min(ran);
            }
        }
        match self.method.record_poll(took) {
            Some(true) => tracing::debug!(
                "a handler held its thread for {took:?} (twice): its method moves to the handler pool"
            ),
            Some(false) => {
                tracing::debug!("a pooled method's polls stay short: it runs inline again");
            }
            None => {}
        }
        outcome
    }
}

/// Aborts a pooled handler when the call no longer waits for it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A hello: binds the declared client id once a verified source vouches for it (see
/// `auth.rs`). An empty id is refused with `HELLO_REFUSED`, an unverified one with
/// `UNAUTHENTICATED` or `PERMISSION_DENIED`; a hello without an id, a late hello (after calls)
/// and a second hello are accepted when verified: the newest id declared wins.
async fn serve_hello(
    conn: &Connection,
    mut send: quinn::SendStream,
    raw: RawFrame,
) -> Result<(), StreamCode> {
    let Ok(hello) = raw.header::<HelloHeader>() else {
        let _ = send.reset(StreamCode::MALFORMED_FRAME.into());
        return Err(StreamCode::MALFORMED_FRAME);
    };
    if !raw.payload.is_empty() {
        let _ = send.reset(StreamCode::MALFORMED_FRAME.into());
        return Err(StreamCode::MALFORMED_FRAME);
    }
    let status = match hello.client_id {
        Some(id) if id.is_empty() => Status::error(status::HELLO_REFUSED, "empty client id"),
        Some(id) => match verify_hello(conn, id, hello.metadata).await {
            Ok(id) => {
                conn.bind_client_id(id);
                Status::Ok
            }
            Err(refused) => {
                conn.inner.side.auth_failure();
                tracing::info!(conn = conn.id(), remote = %conn.remote_address(), "hello refused: {refused:?}");
                refused
            }
        },
        None => Status::Ok,
    };
    respond(conn, &mut send, status, Metadata::new(), Bytes::new()).await;
    Ok(())
}

/// Whether `claimed` may bind on `conn`: the verified identity, or the status that refuses it.
async fn verify_hello(
    conn: &Connection,
    claimed: String,
    metadata: Metadata,
) -> Result<String, Status> {
    let Role::Server { identity, .. } = &conn.inner.side.role else {
        return Err(Status::error(
            status::HELLO_REFUSED,
            "only servers take hellos",
        ));
    };
    if let Some(name) = conn.peer_identity().and_then(|p| p.common_name.clone()) {
        // Under mTLS the certificate is the identity.
        return if name == claimed {
            Ok(claimed)
        } else {
            Err(Status::error(
                status::PERMISSION_DENIED,
                format!("the client certificate is for `{name}`, not `{claimed}`"),
            ))
        };
    }
    if let Some(authenticator) = &identity.authenticator {
        let hello = crate::Hello {
            remote: conn.remote_address(),
            peer_identity: conn.peer_identity().cloned(),
            client_id: claimed.clone(),
            token: metadata.get(crate::TOKEN_METADATA_KEY).map(str::to_owned),
            metadata,
        };
        return match authenticator.verify(hello).await {
            Ok(verified) if verified == claimed => Ok(claimed),
            Ok(verified) => Err(Status::error(
                status::PERMISSION_DENIED,
                format!("the credentials are for `{verified}`, not `{claimed}`"),
            )),
            Err(refusal) => {
                let e = ServiceError::from_refusal(refusal);
                Err(Status::error(e.code(), e.message()))
            }
        };
    }
    if identity.accept_unverified {
        return Ok(claimed);
    }
    Err(Status::error(
        status::UNAUTHENTICATED,
        "this server binds client ids only from mTLS or an authenticator",
    ))
}

/// A push with receipt: delivered to the channel, answered with the outcome.
async fn serve_receipt_push(
    conn: &Connection,
    mut send: quinn::SendStream,
    raw: RawFrame,
    sink: Option<&PushSender>,
    (inbox, manual_ack): (&crate::durable::Inbox, bool),
) -> Result<(), StreamCode> {
    let Ok(msg) = push_message(conn, raw) else {
        let _ = send.reset(StreamCode::MALFORMED_FRAME.into());
        return Err(StreamCode::MALFORMED_FRAME);
    };
    if let (Some(id), Some(sink)) = (msg.durable_id(), sink) {
        let status = durable_push(conn, msg, id, sink, inbox, manual_ack, &mut send).await;
        respond(conn, &mut send, status, Metadata::new(), Bytes::new()).await;
        return Ok(());
    }
    let status = match sink {
        None => Status::error(status::PUSH_REJECTED, "this client receives no pushes"),
        Some(sink) => match deliver(conn, sink, msg).await {
            Delivery::Delivered => Status::Ok,
            Delivery::Dropped => Status::error(status::PUSH_DROPPED, DROPPED_TEXT),
            Delivery::Closed => Status::error(status::PUSH_REJECTED, "push channel closed"),
        },
    };
    respond(conn, &mut send, status, Metadata::new(), Bytes::new()).await;
    Ok(())
}

/// The id space of a durable message: the one it names, else this server's; `None` for a
/// space name longer than [`MAX_SPACE_LEN`](crate::durable::MAX_SPACE_LEN).
fn id_space(conn: &Connection, msg: &PushMessage) -> Option<String> {
    space_or(msg, &conn.server_addr().to_string()).map(std::borrow::Cow::into_owned)
}

/// The id space a message names, or `server`'s; `None` for a name that is too long.
fn space_or<'a>(msg: &PushMessage, server: &'a str) -> Option<std::borrow::Cow<'a, str>> {
    match msg.metadata.get(crate::durable::MSG_SPACE_KEY) {
        Some(space) if space.len() > crate::durable::MAX_SPACE_LEN => None,
        Some(space) => Some(format!("space:{space}").into()),
        None => Some(server.into()),
    }
}

/// A durable message: delivered in its `prev` order, once per acknowledged id; answered once the
/// application has it (automatic ack) or acknowledged it (manual ack).
async fn durable_push(
    conn: &Connection,
    msg: PushMessage,
    id: u64,
    sink: &PushSender,
    inbox: &crate::durable::Inbox,
    manual_ack: bool,
    send: &mut quinn::SendStream,
) -> Status {
    use crate::durable::{Admission, MSG_PREV_KEY};
    let Some(space) = id_space(conn, &msg) else {
        return Status::error(status::PUSH_REJECTED, "the id space's name is too long");
    };
    let server = space.as_str();
    let prev = msg
        .metadata
        .get(MSG_PREV_KEY)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // The message before it is on its way on another stream: wait for it (bounded, and at
    // most `MAX_WAITING` at a time). A message whose stream the server gave up on (its run
    // stopped at an earlier failure) must not be delivered from here: the server sends it
    // again.
    let waiting = Waiting(&conn.inner.durable_waiting);
    if waiting.0.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
        return Status::error(
            status::PUSH_REJECTED,
            "too many durable messages wait for the ones before them",
        );
    }
    let admitted = {
        let stopped = send.stopped();
        tokio::select! {
            a = inbox.admit(server, conn.id(), id, prev, ADMIT_LIMIT) => a,
            _ = stopped => None,
        }
    };
    drop(waiting);
    match admitted {
        Some(Admission::Duplicate) => return Status::Ok,
        Some(Admission::Deliver) => {}
        None => {
            return Status::error(
                status::PUSH_REJECTED,
                "the durable message before this one never arrived (or the server gave up)",
            );
        }
    }
    if let Err(refused) = hand_over(conn, msg, sink, manual_ack, send).await {
        return refused;
    }
    // In manual-ack mode the next message waits for this acknowledgement: a message the
    // application drops unacknowledged must never be passed by an acknowledged later one (the
    // client would then take it for a duplicate when it comes again).
    inbox.delivered(server, conn.id(), id);
    inbox.acked(server, id);
    Status::Ok
}

/// Hands a durable message to the application: returns once it is in the channel (automatic
/// ack) or the application acknowledged it (manual ack); the status to refuse it with if not.
async fn hand_over(
    conn: &Connection,
    mut msg: PushMessage,
    sink: &PushSender,
    manual_ack: bool,
    send: &mut quinn::SendStream,
) -> Result<(), Status> {
    use crate::durable::Acker;
    let ack = if manual_ack {
        let (acker, acked) = Acker::new();
        msg.acker = Some(acker);
        Some(acked)
    } else {
        None
    };
    // A server that gave up on this message (its stream stopped: the device was too slow)
    // sends it again on a new stream: this one must not deliver it late as well.
    let delivery = tokio::select! {
        biased;
        _ = send.stopped() => {
            return Err(Status::error(status::PUSH_REJECTED, "server gave up"));
        }
        delivery = deliver(conn, sink, msg) => delivery,
    };
    match delivery {
        Delivery::Delivered => {}
        Delivery::Dropped => return Err(Status::error(status::PUSH_DROPPED, DROPPED_TEXT)),
        Delivery::Closed => {
            return Err(Status::error(status::PUSH_REJECTED, "push channel closed"));
        }
    }
    if let Some(acked) = ack {
        // Until the application acknowledges (or drops the message, or the server gives up).
        let stopped = send.stopped();
        tokio::select! {
            r = acked => if r.is_err() {
                return Err(Status::error(status::PUSH_REJECTED, "dropped without an ack"));
            },
            _ = stopped => return Err(Status::error(status::PUSH_REJECTED, "server gave up")),
        }
    }
    Ok(())
}

/// A durable stream (v2): records in increasing id order; each is handed to the application
/// unless its id was acknowledged before (a redelivery), and acknowledged cumulatively (the
/// id as 8 bytes, big-endian) whenever no further record is buffered. The server's FIN is
/// answered with the last acknowledgement and a FIN; a refused message, with `PUSH_REJECTED`
/// both ways (the messages before it stay acknowledged).
async fn serve_durable_stream(
    conn: &Connection,
    mut send: quinn::SendStream,
    mut records: wire::RecordReader,
    sink: Option<&PushSender>,
    (inbox, manual_ack): (&crate::durable::Inbox, bool),
) {
    let Some(sink) = sink else {
        return reject(Some(&mut send), records.recv(), StreamCode::PUSH_REJECTED);
    };
    let limits = conn.inner.side.limits;
    let server = conn.server_addr().to_string();
    // The space named by the last record, and its key in the inbox.
    let mut last_space: Option<(String, String)> = None;
    let (mut last, mut unacked) = (0u64, None);
    let frame_timeout = conn.inner.side.frame_timeout;
    loop {
        // Each record (and the end) within the frame timeout of asking for it: a server that
        // stalls mid-stream holds nothing here past that.
        let Ok(next) = within(frame_timeout, records.next(&limits)).await else {
            tracing::debug!(conn = conn.id(), "durable stream stalled: giving up");
            return reject(Some(&mut send), records.recv(), StreamCode::CANCELLED);
        };
        let raw = match next {
            Ok(Some(raw)) => raw,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(conn = conn.id(), "bad durable record: {e:?}");
                if let Some(code) = e.stream_code() {
                    reject(Some(&mut send), records.recv(), code);
                }
                return;
            }
        };
        let msg = match push_message(conn, raw) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::debug!(conn = conn.id(), "bad durable record header: {e:?}");
                return reject(Some(&mut send), records.recv(), StreamCode::MALFORMED_FRAME);
            }
        };
        let Some(id) = msg.durable_id().filter(|&id| id > last) else {
            tracing::debug!(conn = conn.id(), "durable record without a growing id");
            return reject(Some(&mut send), records.recv(), StreamCode::MALFORMED_FRAME);
        };
        last = id;
        // The records of a stream name one space as a rule: its key is made once.
        let named = msg.metadata.get(crate::durable::MSG_SPACE_KEY);
        if named != last_space.as_ref().map(|(name, _)| name.as_str()) {
            let Some(key) = space_or(&msg, &server) else {
                tracing::debug!(conn = conn.id(), "durable record with a too long id space");
                return reject(Some(&mut send), records.recv(), StreamCode::MALFORMED_FRAME);
            };
            last_space = named.map(|name| (name.to_owned(), key.into_owned()));
        }
        let space = last_space.as_ref().map_or(server.as_str(), |(_, key)| key);
        if !inbox.is_acked(space, id) {
            if let Err(refused) = hand_over(conn, msg, sink, manual_ack, &mut send).await {
                tracing::debug!(
                    conn = conn.id(),
                    "durable message {id} refused: {refused:?}"
                );
                return reject(Some(&mut send), records.recv(), StreamCode::PUSH_REJECTED);
            }
            inbox.acked(space, id);
        }
        unacked = Some(id);
        // One acknowledgement per run of buffered records; in manual-ack mode one per message
        // (the application may take its time with the next one).
        if (manual_ack || !records.has_record(&limits))
            && !acknowledge(&mut send, unacked.take()).await
        {
            return;
        }
    }
    if acknowledge(&mut send, unacked).await {
        let _ = send.finish();
    }
}

/// Writes the cumulative acknowledgement of `id`, if any; false if the stream failed.
async fn acknowledge(send: &mut quinn::SendStream, id: Option<u64>) -> bool {
    match id {
        Some(id) => send.write_all(&id.to_be_bytes()).await.is_ok(),
        None => true,
    }
}

fn push_message(conn: &Connection, raw: RawFrame) -> Result<PushMessage, FrameError> {
    let header: PushHeader = raw.header()?;
    Ok(PushMessage {
        service_path: header.service_path,
        service_method: header.service_method,
        metadata: header.metadata,
        payload: raw.payload,
        server: conn.server_addr(),
        acker: None,
    })
}

/// A connection whose server pushed three quarters of its starting push limit within this long
/// gets the maximum (`TransportOptions::max_concurrent_pushes`).
const PUSH_BURST: Duration = Duration::from_millis(100);

/// Raises a busy connection's push limit once: see [`PUSH_BURST`].
struct PushLimit {
    /// Pushes counted since `since`; `None` once raised (or nothing to raise to).
    counted: Option<(u32, std::time::Instant)>,
    threshold: u32,
    max: u32,
}

impl PushLimit {
    fn new((initial, max): (u32, u32)) -> Self {
        Self {
            counted: (max > initial).then(|| (0, std::time::Instant::now())),
            threshold: (initial - initial / 4).max(1),
            max,
        }
    }

    /// Counts one push (`now` tells the time, asked once per threshold's worth); the limit to
    /// raise the connection to when they came fast enough (once).
    fn count(&mut self, now: impl FnOnce() -> std::time::Instant) -> Option<u32> {
        let (n, since) = self.counted.as_mut()?;
        *n += 1;
        if *n < self.threshold {
            return None;
        }
        let now = now();
        if now.duration_since(*since) <= PUSH_BURST {
            self.counted = None;
            return Some(self.max);
        }
        *n = 0;
        *since = now;
        None
    }
}

/// Reads pushes in the order the server opened their streams and hands each to the push channel.
/// Under backpressure this loop waits, which stops QUIC from granting the server new streams.
async fn accept_pushes(conn: &Connection, sink: Option<&PushSender>) {
    let mut limit = PushLimit::new(conn.inner.side.push_limits);
    while let Ok(mut recv) = conn.inner.quic.accept_uni().await {
        // A client that takes no pushes rejects them: no reason to let more in at once.
        let Some(sink) = sink else {
            reject(None, &mut recv, StreamCode::PUSH_REJECTED);
            continue;
        };
        if let Some(max) = limit.count(std::time::Instant::now) {
            conn.inner.quic.set_max_concurrent_uni_streams(max.into());
        }
        let raw = match read_incoming(conn, None, &mut recv).await {
            Some(Incoming::Frame(raw)) => raw,
            // Rejected already.
            None => continue,
            Some(Incoming::Records(_)) => {
                reject(None, &mut recv, misplaced_records(conn));
                continue;
            }
        };
        if raw.kind != FrameKind::Push {
            reject(None, &mut recv, StreamCode::UNEXPECTED_STREAM);
            continue;
        }
        // A push the channel takes at once uses no cooperative budget (quinn's reads use none
        // either), so this loop keeps its thread until the pushes buffered so far are read or
        // the channel is full, and the reader then takes them as one batch: bounded by the
        // channel's capacity and the connection's push limit. Yielding every 128 pushes
        // instead (tokio's budget) measured 630-815k pushes/s against 763-893k
        // (BENCHMARKS.md). Handed over outside any future's state: the message is copied into
        // one only when the channel is full.
        let offered = match push_message(conn, raw) {
            Ok(msg) => sink.try_deliver(msg),
            Err(e) => {
                tracing::debug!(conn = conn.id(), "bad push header: {e:?}");
                reject(None, &mut recv, StreamCode::MALFORMED_FRAME);
                continue;
            }
        };
        let delivery = match offered {
            Ok(delivery) => counted(conn, delivery),
            Err((tx, msg)) => counted(conn, sink.deliver_when_room(tx, msg).await),
        };
        if delivery == Delivery::Dropped {
            tracing::debug!(
                conn = conn.id(),
                "push dropped: channel full or handler panicked"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_connection_gets_its_push_maximum_once_three_quarters_of_its_start_come_within_the_burst() {
        let start = Instant::now();
        let mut limit = PushLimit::new((1024, 8192));
        let at = |ms: u64| move || start + Duration::from_millis(ms);
        // 768 pushes over 150 ms: too slow, counting starts over at the 768th.
        for _ in 0..767 {
            assert_eq!(limit.count(at(0)), None);
        }
        assert_eq!(limit.count(at(150)), None);
        // The next 768 within 100 ms of that: raised, once.
        for _ in 0..767 {
            assert_eq!(limit.count(|| unreachable!("asked once per 768")), None);
        }
        assert_eq!(limit.count(at(240)), Some(8192));
        assert_eq!(limit.count(at(240)), None);

        // Nothing to raise to: never asks.
        let mut fixed = PushLimit::new((1024, 1024));
        for _ in 0..2000 {
            assert_eq!(fixed.count(|| unreachable!("nothing to raise")), None);
        }
    }
}
