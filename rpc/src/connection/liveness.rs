//! Noticing a dead peer in about a second while calls wait for it.
//!
//! QUIC notices a silent peer only at the idle timeout (15 s by default: long enough for
//! devices on poor links). A call whose server was killed would wait that long, or its whole
//! deadline. So while at least one call (or push with receipt) waits on a connection, a probe
//! watches what arrives from the peer: after a quiet tick it sends a QUIC DATAGRAM frame
//! (ack-eliciting, content ignored by the receiver), and a live peer acknowledges within a
//! round trip. If nothing at all arrives for the unresponsive timeout (default 1.5 s, never less
//! than 6 round trips), the connection is closed with `PEER_UNRESPONSIVE` and its calls fail with
//! [`Error::PeerUnresponsive`](crate::Error::PeerUnresponsive) — which fail modes retry
//! elsewhere. A peer that does not accept datagrams is never declared dead this way (its
//! silence cannot be told from a slow handler); the idle timeout still applies.
//!
//! The probe task runs only while calls wait: it is started by the first waiting call and ends
//! after two quiet ticks with none, so idle connections cost nothing. A tick that comes a whole
//! tick late means the runtime driving the connection stalled (a task blocked it): the socket
//! was not read meanwhile either, so that silence is not held against the peer.

use crate::sync::Lock;
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::{ConnInner, Connection};
use crate::wire::CloseCode;

/// Per-connection state of the probe.
#[derive(Debug, Default)]
pub(super) struct Liveness {
    /// Calls this side waits on now.
    waiting: AtomicU32,
    /// Whether a probe task runs.
    running: AtomicBool,
    /// Set when the probe closed the connection: how long the peer had been silent.
    gave_up: Mutex<Option<Duration>>,
}

impl Liveness {
    pub(super) fn gave_up_after(&self) -> Option<Duration> {
        *self.gave_up.locked()
    }
}

/// Counts one waiting call for as long as it lives.
pub(crate) struct Waiting(Arc<ConnInner>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.liveness.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Connection {
    /// Marks a call as waiting on the peer, starting the probe if none runs. The returned guard
    /// ends the wait when dropped.
    pub(crate) fn waiting(&self) -> Option<Waiting> {
        let limit = self.inner.side.unresponsive_timeout?;
        let liveness = &self.inner.liveness;
        liveness.waiting.fetch_add(1, Ordering::AcqRel);
        // Load first: on a busy connection the probe runs, and a plain load keeps the flag's
        // cache line shared between the threads that make calls.
        if !liveness.running.load(Ordering::Acquire)
            && !liveness.running.swap(true, Ordering::AcqRel)
        {
            let weak = Arc::downgrade(&self.inner);
            tokio::spawn(probe(weak, limit));
        }
        Some(Waiting(self.inner.clone()))
    }
}

/// The probe loop of one connection; see the module docs.
async fn probe(weak: std::sync::Weak<ConnInner>, limit: Duration) {
    let mut last_rx = None;
    let mut last_heard = Instant::now();
    let mut idle_ticks = 0;
    let mut tick = (limit / 10).max(Duration::from_millis(20));
    loop {
        let due = Instant::now() + tick;
        tokio::time::sleep(tick).await;
        let Some(inner) = weak.upgrade() else { return };
        if inner.quic.close_reason().is_some() {
            return;
        }
        let now = Instant::now();
        let stats = inner.quic.stats();
        let rx = stats.udp_rx.datagrams;
        if last_rx != Some(rx) {
            last_rx = Some(rx);
            last_heard = now;
        }
        // A tick a whole tick late means this runtime stalled (a task blocked it, the process
        // was stopped): the connection was not read meanwhile either, so the silence proves
        // nothing about the peer. Count it from now.
        if now.saturating_duration_since(due) > tick {
            last_heard = now;
        }
        // Until a client's handshake is confirmed (HANDSHAKE_DONE received) the server may
        // still be waiting for the client's last handshake packet and drop everything else,
        // probes included: silence then proves nothing, and QUIC retransmits that packet
        // itself. (A server's handshake is confirmed once the connection exists.)
        if inner.quic.side() == quinn::Side::Client && stats.frame_rx.handshake_done == 0 {
            last_heard = now;
        }
        let limit = limit.max(inner.quic.rtt() * 6);
        tick = (limit / 10).max(Duration::from_millis(20));
        if inner.liveness.waiting.load(Ordering::Acquire) == 0 {
            // Silence counts only while a call waits.
            last_heard = now;
            idle_ticks += 1;
            if idle_ticks >= 2 {
                inner.liveness.running.store(false, Ordering::Release);
                // A call that started meanwhile found the flag set and started no probe.
                if inner.liveness.waiting.load(Ordering::Acquire) == 0
                    || inner.liveness.running.swap(true, Ordering::AcqRel)
                {
                    return;
                }
                idle_ticks = 0;
            }
            continue;
        }
        idle_ticks = 0;
        let silent = now - last_heard;
        if silent < tick {
            continue;
        }
        // Ack-eliciting; the peer ignores the content. Fails if the peer takes no datagrams:
        // then its silence proves nothing.
        if inner.quic.send_datagram(Bytes::new()).is_err() {
            last_heard = now;
            continue;
        }
        if silent >= limit {
            *inner.liveness.gave_up.locked() = Some(silent);
            tracing::debug!(conn = inner.id, ?silent, "peer unresponsive: closing");
            inner
                .quic
                .close(CloseCode::PEER_UNRESPONSIVE.into(), b"peer unresponsive");
            inner.liveness.running.store(false, Ordering::Release);
            return;
        }
    }
}
