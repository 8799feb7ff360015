//! Outgoing pushes, server to client: one unidirectional stream per message, or a bidirectional
//! one when the server wants a receipt.

use std::{sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use serde::Serialize;

use super::{Connection, call::Reply, side::Role};
use crate::{
    Codec, Error, Metadata, Result,
    wire::{self, Frame, FrameKind, PushHeaderRef, StreamCode},
};

impl Connection {
    /// Pushes one message to the client (rpcx's `server.SendMessage`), on a new unidirectional
    /// stream.
    ///
    /// # When it returns
    /// Once the whole message is handed to QUIC (queued for sending and within flow control), not
    /// when the client read it; use [`send_message_with_receipt`](Self::send_message_with_receipt)
    /// for that. Pushes sent one after another from one task reach the client's channel in order.
    ///
    /// # Errors
    /// - [`Error::WrongSide`] at once on a client's connection: only servers push;
    /// - [`Error::ConnectionLost`] at once if the connection is closed or lost (the server also
    ///   drops it from its registry);
    /// - [`Error::PushTimeout`] if the client applies backpressure (its channel is full) for
    ///   longer than the push timeout; the partly sent stream is reset and the client never sees a
    ///   part;
    /// - [`Error::TooLarge`] if the message is above the payload limit.
    ///
    /// A push never delays call replies on the same connection: each rides its own stream.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes resets the stream; the client discards the
    /// partial message.
    ///
    /// # Scheduling
    /// On a tokio runtime each push that gets past encoding uses one unit of the task's
    /// cooperative budget (as tokio's channels and sockets use one per operation), so a task that
    /// pushes in a loop yields to its runtime after at most 128 pushes (tokio's budget per poll,
    /// shared with whatever else the task did in that poll), even though QUIC takes each push at
    /// once. Outside a tokio runtime, or in `tokio::task::unconstrained`, it never yields.
    pub async fn send_message(
        &self,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: impl AsRef<[u8]>,
    ) -> Result<()> {
        let frame = self.push_frame(service_path, service_method, metadata, data.as_ref())?;
        // quinn takes a push without waiting (it never returns `Pending` while the client
        // grants streams) and uses no budget of its own: a loop of pushes on the I/O thread that
        // drives the connection would keep that thread, queueing streams that the connection's
        // driver (a task of the same thread) sends only once the client's stream grant runs
        // out. Yielding every 128 pushes lets the driver send them meanwhile (BENCHMARKS.md:
        // 605-741k pushes/s before, 915-1,022k after, 3 alternating runs). Before the stream
        // is opened: a push dropped at this yield sends nothing.
        tokio::task::coop::consume_budget().await;
        self.push_here(frame, self.inner.side.push_timeout).await
    }

    /// [`send_message`](Self::send_message) with a postcard-encoded value (decode it with
    /// [`PushMessage::decode`](crate::PushMessage::decode)).
    pub async fn send_message_typed<T: Serialize + ?Sized>(
        &self,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        value: &T,
    ) -> Result<()> {
        let data = Codec::Postcard.encode(value)?;
        self.send_message(service_path, service_method, metadata, data)
            .await
    }

    /// Pushes one message and waits until the client put it into its push channel: on a
    /// bidirectional stream, answered by the client with a response frame.
    ///
    /// # Errors
    /// As [`send_message`](Self::send_message), plus [`Error::PushDropped`] when the client's
    /// [`FullPolicy::Drop`](crate::FullPolicy::Drop) dropped it and [`Error::PushRejected`] when
    /// the client has no push channel. The push timeout covers the whole exchange
    /// ([`Error::DeadlineExceeded`] when it passes).
    pub async fn send_message_with_receipt(
        &self,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: impl AsRef<[u8]>,
    ) -> Result<()> {
        self.send_message_with_receipt_within(
            service_path,
            service_method,
            metadata,
            data,
            self.inner.side.push_timeout,
        )
        .await
    }

    /// [`send_message_with_receipt`](Self::send_message_with_receipt) with its own `timeout`
    /// for the whole exchange instead of the server's push timeout: for a client that takes
    /// its time to accept a message (a device application that acknowledges after it acted on
    /// it). Dropping the future resets the stream; the client may have the message already.
    pub async fn send_message_with_receipt_within(
        &self,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<()> {
        let result = self
            .push_with_receipt_within(
                service_path,
                service_method,
                metadata,
                data.as_ref(),
                timeout,
            )
            .await;
        let side = &self.inner.side;
        side.record(crate::metrics::Event::Push { ok: result.is_ok() });
        if matches!(result, Err(Error::PushDropped)) {
            side.record(crate::metrics::Event::PushDropped);
        }
        result
    }

    /// [`send_message_with_receipt_within`](Self::send_message_with_receipt_within) without the
    /// push metrics (durable deliveries count in their own).
    pub(crate) async fn push_with_receipt_within(
        &self,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: &[u8],
        timeout: Duration,
    ) -> Result<()> {
        let frame = Frame::whole(self.push_frame(service_path, service_method, metadata, data)?);
        self.round_trip(
            frame,
            super::call::Call::plain(service_path, service_method),
            Some(timeout),
            Reply::Wanted,
        )
        .await
        .map(drop)
    }

    /// Encodes a push frame; [`Error::WrongSide`] on a client's connection.
    pub(crate) fn push_frame(
        &self,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: &[u8],
    ) -> Result<Bytes> {
        if matches!(self.inner.side.role, Role::Client { .. }) {
            return Err(Error::WrongSide("a push (only servers push)"));
        }
        let header = PushHeaderRef {
            service_path,
            service_method,
            metadata: &metadata,
        };
        Ok(wire::encode_frame(
            FrameKind::Push,
            &header,
            data,
            &self.inner.side.limits,
        )?)
    }

    /// Sends an already encoded push frame on a new unidirectional stream, within `timeout`,
    /// from the task that awaits it (broadcasts call it for many connections from one task on
    /// the thread that drives them). An application task pushes without a hand-over to the I/O
    /// thread that drives the connection (measured on 2 cores, 16 application tasks pushing
    /// 32 B to one client: 86-89k pushes/s handed over, 805-865k written by the task itself;
    /// BENCHMARKS.md). The push timer runs on the connection's I/O thread (a server on its own
    /// I/O threads, the default), so the caller's runtime needs no timers then.
    pub(crate) async fn push_here(&self, frame: Bytes, timeout: Duration) -> Result<()> {
        let push = async {
            // Fails at once if the connection is gone.
            let send = self.inner.quic.open_uni().await?;
            let mut send = ResetOnDrop(Some(send));
            let stream = send.0.as_mut().expect("present until disarmed");
            stream.write_chunk(frame).await?;
            stream.finish()?;
            send.0 = None;
            Ok(())
        };
        let result = self
            .inner
            .io
            .within(timeout, push)
            .await
            .unwrap_or(Err(Error::PushTimeout(timeout)));
        if let Err(e) = &result {
            tracing::debug!(conn = self.inner.id, "push failed: {e}");
        }
        let counters = &self.inner.side.counters;
        match &result {
            Ok(()) => counters.pushes_sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => counters.push_errors.fetch_add(1, Ordering::Relaxed),
        };
        self.inner
            .side
            .record(crate::metrics::Event::Push { ok: result.is_ok() });
        result
    }
}

/// A send stream that is reset with `CANCELLED` if dropped before it was taken out.
struct ResetOnDrop(Option<quinn::SendStream>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(s) = &mut self.0 {
            let _ = s.reset(StreamCode::CANCELLED.into());
        }
    }
}
