//! Server push, client side: the bounded channel that yields pushed messages.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::{Codec, Metadata, Result};

/// One message the server pushed (rpcx's `protocol.Message` on the client's channel).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PushMessage {
    /// Service path the server named (`"test_service_path"`).
    pub service_path: String,
    /// Service method the server named (`"test_service_method"`).
    pub service_method: String,
    /// Metadata the server attached.
    pub metadata: Metadata,
    /// The payload bytes, as sent.
    pub payload: Bytes,
    /// The server the message came from (its address as dialled).
    pub server: SocketAddr,
    /// In manual-ack mode, the acknowledgement of a durable message.
    pub(crate) acker: Option<crate::durable::Acker>,
}

impl PushMessage {
    /// Decodes the payload with postcard (what [`Connection::send_message_typed`] encodes with).
    ///
    /// [`Connection::send_message_typed`]: crate::Connection::send_message_typed
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        Codec::Postcard.decode(&self.payload)
    }

    /// The id of a durable message ([`Server::send_durable`](crate::Server::send_durable)),
    /// `None` for an ordinary push.
    pub fn durable_id(&self) -> Option<u64> {
        self.metadata.get(crate::durable::MSG_ID_KEY)?.parse().ok()
    }

    /// Whether the server sent this durable message before without getting its
    /// acknowledgement (the client may have seen it: in manual-ack mode a message not yet
    /// acknowledged comes again after a reconnect).
    pub fn is_redelivered(&self) -> bool {
        self.metadata.get(crate::durable::MSG_REDELIVERED_KEY) == Some("1")
    }

    /// Acknowledges a durable message received in manual-ack mode
    /// ([`ClientBuilder::manual_ack`](crate::ClientBuilder::manual_ack)): the server removes it
    /// from its store. Returns whether this call acknowledged it (false for an ordinary push, in
    /// automatic mode, for a second call, or when the connection it came on is gone — it then
    /// comes again after the reconnect). Dropping every clone of the message without acking
    /// refuses it; the server sends it again later.
    pub fn ack(&self) -> bool {
        self.acker.as_ref().is_some_and(crate::durable::Acker::ack)
    }
}

/// What a client does with a push when its channel is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FullPolicy {
    /// Stop reading pushes until the application makes room. Nothing is lost: QUIC flow control
    /// holds the server back, and its `send_message` eventually fails with
    /// [`Error::PushTimeout`](crate::Error::PushTimeout). Calls on the connection are not affected: they
    /// ride their own streams. The default.
    #[default]
    Backpressure,
    /// Drop the message and count it ([`PushReceiver::dropped`]). The server's plain
    /// `send_message` does not learn of it; `send_message_with_receipt` fails with
    /// [`Error::PushDropped`](crate::Error::PushDropped).
    Drop,
}

#[derive(Debug, Default)]
struct PushCounters {
    delivered: AtomicU64,
    dropped: AtomicU64,
}

/// Where a client hands pushed messages: give it to a [`Client`](crate::Client) or
/// [`XClient`](crate::XClient) builder's `push_channel`. Made by [`push_channel`] (a bounded
/// channel the application reads) or [`push_handler`] (a function called where the pushes are
/// read).
#[derive(Debug, Clone)]
pub struct PushSender {
    target: Target,
    policy: FullPolicy,
    counters: Arc<PushCounters>,
}

/// A handler of pushed messages, called where they are read.
type HandlerFn = Arc<dyn Fn(PushMessage) + Send + Sync>;

#[derive(Clone)]
enum Target {
    Channel(mpsc::Sender<PushMessage>),
    Handler(HandlerFn),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Channel(tx) => f.debug_tuple("Channel").field(tx).finish(),
            Self::Handler(_) => f.write_str("Handler"),
        }
    }
}

/// Pushed messages go to `handler`, called on the task that reads them, with no channel and no
/// task hand-off in between. On a 2-core machine, 32 B pushes reached 1.27-1.30M/s this way
/// against 0.89-0.92M/s through a [`push_channel`] read by a task (`BENCHMARKS.md`).
///
/// # Contract
/// - **Order and concurrency.** The plain pushes of one connection (`send_message`) are handled
///   one at a time, in the order the server sent them, and so are the messages of one durable
///   stream. Pushes with receipt ride streams of their own, and an
///   [`XClient`](crate::XClient) or several clients may share one sender: the handler can be
///   called from several tasks and threads at once.
/// - The handler must return quickly and must not block: while it runs, that connection reads
///   no further push (QUIC flow control then holds the server back, and its `send_message`
///   waits), and the other tasks of the thread it runs on wait too. Hand slow work to a task or
///   a channel of your own.
/// - A message counts as delivered when the handler returns: `send_message_with_receipt`
///   returns then, and a durable message is acknowledged then (in manual-ack mode, only when the
///   application calls [`PushMessage::ack`] on the message or a clone of it).
/// - A handler that panics drops that message, as a full channel with [`FullPolicy::Drop`]
///   does: the panic is caught and logged and the message counted in [`PushSender::dropped`];
///   the next push is handled as usual. A plain push is then lost; a push with receipt fails
///   with [`Error::PushDropped`](crate::Error::PushDropped); a durable message is refused and
///   comes again later, so a handler that panics on it every time holds that device's later
///   durable messages back until it expires or is cancelled.
/// - A handler that captures a [`Client`](crate::Client) keeps it alive: capture a weak handle
///   or close the client explicitly.
///
/// ```
/// use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
/// let seen = Arc::new(AtomicU64::new(0));
/// let counter = seen.clone();
/// let sender = quicx::push_handler(move |msg| {
///     counter.fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
/// });
/// let builder = quicx::Client::builder().push_channel(sender);
/// # let _ = builder;
/// ```
pub fn push_handler(handler: impl Fn(PushMessage) + Send + Sync + 'static) -> PushSender {
    PushSender {
        target: Target::Handler(Arc::new(handler)),
        policy: FullPolicy::Backpressure,
        counters: Arc::default(),
    }
}

/// Yields to the runtime, each followed by a look at the channel, before `recv` parks its task
/// on an empty channel.
const SPIN_BEFORE_PARK: usize = 4;

/// The receiving half of a push channel: the application reads pushed messages here.
#[derive(Debug)]
pub struct PushReceiver {
    rx: mpsc::Receiver<PushMessage>,
    counters: Arc<PushCounters>,
}

/// A push channel holding up to `capacity` messages, with the [`FullPolicy::Backpressure`] policy
/// (rpcx's `make(chan *protocol.Message, capacity)`).
///
/// ```
/// let (tx, mut rx) = quicx::push_channel(64);
/// assert_eq!(rx.dropped(), 0);
/// # drop(tx);
/// ```
pub fn push_channel(capacity: usize) -> (PushSender, PushReceiver) {
    push_channel_with(capacity, FullPolicy::Backpressure)
}

/// A push channel with an explicit full-channel policy.
pub fn push_channel_with(capacity: usize, policy: FullPolicy) -> (PushSender, PushReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let counters = Arc::new(PushCounters::default());
    (
        PushSender {
            target: Target::Channel(tx),
            policy,
            counters: counters.clone(),
        },
        PushReceiver { rx, counters },
    )
}

/// The outcome of handing one push to the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    Delivered,
    Dropped,
    /// The application dropped its receiver.
    Closed,
}

impl PushSender {
    /// The full-channel policy ([`FullPolicy::Backpressure`] for a [`push_handler`], which
    /// never fills).
    pub fn policy(&self) -> FullPolicy {
        self.policy
    }

    /// Messages handed over so far: put into the channel, or handled by the handler.
    pub fn delivered(&self) -> u64 {
        self.counters.delivered.load(Ordering::Relaxed)
    }

    /// Messages dropped so far: the channel was full under [`FullPolicy::Drop`], or the handler
    /// panicked.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Hands `msg` to the application and counts the outcome: waits while the channel is full
    /// under [`FullPolicy::Backpressure`]. Tried without waiting first, which uses none of the
    /// task's cooperative budget (`Sender::send` does).
    pub(crate) async fn deliver(&self, msg: PushMessage) -> Delivery {
        match self.try_deliver(msg) {
            Ok(delivery) => delivery,
            Err((tx, msg)) => self.deliver_when_room(tx, msg).await,
        }
    }

    /// The rest of [`deliver`](Self::deliver) after [`try_deliver`](Self::try_deliver) found
    /// the channel `tx` full: waits for room.
    pub(crate) async fn deliver_when_room(
        &self,
        tx: &mpsc::Sender<PushMessage>,
        msg: PushMessage,
    ) -> Delivery {
        let result = tx.send(msg).await.map_err(|_| Delivery::Closed);
        self.count(result)
    }

    /// [`deliver`](Self::deliver) without waiting: gives `msg` back, with the channel to wait
    /// on, when the channel is full under [`FullPolicy::Backpressure`]. Waiting senders hold
    /// the channel's permits (it is fair), so this never overtakes them.
    // The message comes back by value on the rare full path; boxing it would allocate per push.
    #[allow(clippy::result_large_err)]
    pub(crate) fn try_deliver(
        &self,
        msg: PushMessage,
    ) -> std::result::Result<Delivery, (&mpsc::Sender<PushMessage>, PushMessage)> {
        let result = match (&self.target, self.policy) {
            (Target::Handler(handler), _) => std::panic::catch_unwind(
                std::panic::AssertUnwindSafe(|| handler(msg)),
            )
            .map_err(|panic| {
                tracing::warn!(
                    "push handler panicked: {}",
                    crate::service::panic_message(panic.as_ref())
                );
                Delivery::Dropped
            }),
            (Target::Channel(tx), policy) => match tx.try_send(msg) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(msg)) => match policy {
                    FullPolicy::Backpressure => return Err((tx, msg)),
                    FullPolicy::Drop => Err(Delivery::Dropped),
                },
                Err(mpsc::error::TrySendError::Closed(_)) => Err(Delivery::Closed),
            },
        };
        Ok(self.count(result))
    }

    fn count(&self, result: std::result::Result<(), Delivery>) -> Delivery {
        match result {
            Ok(()) => {
                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                Delivery::Delivered
            }
            Err(outcome) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                outcome
            }
        }
    }
}

impl PushReceiver {
    /// The next pushed message; `None` once every client holding the sender is gone.
    ///
    /// On an empty channel it yields to the runtime up to 4 times, looking again after each,
    /// before its task parks: a reader that keeps up with a stream of pushes then takes the
    /// next one without being woken from another thread (on a 2-core machine, 32 B pushes to a
    /// task reading a channel went from 630-781k/s to 819-846k/s with a server in another
    /// process, `BENCHMARKS.md`). Each look takes the task's cooperative budget, as `recv`
    /// always did.
    ///
    /// Cancel safe: a message is never lost if the future is dropped before completing.
    pub async fn recv(&mut self) -> Option<PushMessage> {
        for _ in 0..SPIN_BEFORE_PARK {
            // `poll_recv`, not `try_recv`: it takes the task's cooperative budget (a reader of
            // a channel that never empties still yields to the other tasks) and never waits
            // for a send that is half done. With a waker that does nothing: a send meanwhile
            // must not wake this task from another thread (that wake-up is what this loop
            // saves); the yield reschedules it, and the last `recv` registers the real waker
            // before it looks a last time.
            let polled = {
                let mut noop = std::task::Context::from_waker(std::task::Waker::noop());
                self.rx.poll_recv(&mut noop)
            };
            match polled {
                std::task::Poll::Ready(msg) => return msg,
                std::task::Poll::Pending => tokio::task::yield_now().await,
            }
        }
        self.rx.recv().await
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<PushMessage> {
        self.rx.try_recv().ok()
    }

    /// Messages dropped because the channel was full ([`FullPolicy::Drop`]) or the receiver was
    /// closed.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Messages put into the channel so far.
    pub fn delivered(&self) -> u64 {
        self.counters.delivered.load(Ordering::Relaxed)
    }

    /// Messages waiting in the channel.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> PushMessage {
        PushMessage {
            service_path: "p".into(),
            service_method: "m".into(),
            metadata: Metadata::new(),
            payload: Bytes::from_static(b"x"),
            server: "127.0.0.1:1".parse().unwrap(),
            acker: None,
        }
    }

    #[tokio::test]
    async fn drop_policy_counts() {
        let (tx, mut rx) = push_channel_with(2, FullPolicy::Drop);
        for _ in 0..5 {
            tx.deliver(msg()).await;
        }
        assert_eq!(rx.delivered(), 2);
        assert_eq!(rx.dropped(), 3);
        assert_eq!(rx.recv().await.unwrap(), msg());
    }

    #[tokio::test]
    async fn a_handler_sees_each_message_in_order_and_survives_its_own_panic() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let tx = push_handler(move |m: PushMessage| {
            assert_ne!(&m.payload[..], b"boom", "the handler refuses this one");
            log.lock().unwrap().push(m.payload);
        });
        for payload in [&b"1"[..], b"2", b"boom", b"3"] {
            let mut m = msg();
            m.payload = Bytes::copy_from_slice(payload);
            let expected = if payload == b"boom" {
                Delivery::Dropped
            } else {
                Delivery::Delivered
            };
            assert_eq!(tx.deliver(m).await, expected);
        }
        assert_eq!(*seen.lock().unwrap(), [&b"1"[..], b"2", b"3"]);
        assert_eq!(tx.delivered(), 3);
        assert_eq!(tx.dropped(), 1);
    }

    #[tokio::test]
    async fn recv_takes_what_is_left_then_ends_once_every_sender_is_gone() {
        let (tx, mut rx) = push_channel(4);
        assert_eq!(tx.deliver(msg()).await, Delivery::Delivered);
        let later = tx.clone();
        drop(tx);
        // A message sent while the reader is waiting reaches it.
        let reader = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            let end = rx.recv().await;
            (first, second, end)
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(later.deliver(msg()).await, Delivery::Delivered);
        drop(later);
        let (first, second, end) = reader.await.unwrap();
        assert_eq!((first, second, end), (Some(msg()), Some(msg()), None));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_reader_of_a_channel_that_never_empties_still_lets_other_tasks_run() {
        let (tx, mut rx) = push_channel(1000);
        for _ in 0..1000 {
            assert_eq!(tx.deliver(msg()).await, Delivery::Delivered);
        }
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        tokio::spawn(async move { flag.store(true, Ordering::Relaxed) });
        let mut read_before = 0;
        for i in 0..1000 {
            rx.recv().await.unwrap();
            if !ran.load(Ordering::Relaxed) {
                read_before = i + 1;
            }
        }
        assert!(
            read_before < 1000,
            "the reader took all 1,000 messages without letting the other task run"
        );
    }

    #[tokio::test]
    async fn backpressure_waits_for_room() {
        let (tx, mut rx) = push_channel(1);
        assert_eq!(tx.deliver(msg()).await, Delivery::Delivered);
        let tx2 = tx.clone();
        let pending = tokio::spawn(async move { tx2.deliver(msg()).await });
        tokio::task::yield_now().await;
        assert!(!pending.is_finished());
        rx.recv().await.unwrap();
        assert_eq!(pending.await.unwrap(), Delivery::Delivered);
        assert_eq!(rx.dropped(), 0);
    }
}
