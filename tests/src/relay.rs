//! A userspace UDP relay that impairs the link between a client and a server: random loss, extra
//! delay with jitter, and reordering. The kernel of the test machines has no `netem` qdisc, so
//! lossy-link tests put this between the two ends instead.
//!
//! The relay listens on an ephemeral port of the loopback address of the server's family. Every
//! client address that sends to it gets its own upstream socket connected to the server, so
//! several clients (and a client that changes its port) each get a distinct address on the
//! server side. Datagrams are impaired independently in each direction, with random decisions
//! drawn from a seeded generator per client and direction: the same seed drops the same
//! datagrams of a flow, which makes failures reproducible as far as the traffic itself is.
//!
//! Dropping the [`Relay`] aborts all its tasks and closes its sockets; [`Relay::stop`] does the
//! same and waits until they are gone.
//!
//! ```no_run
//! # async fn demo(server: std::net::SocketAddr) -> std::io::Result<()> {
//! use quicx_tests::relay::{Impairment, Relay};
//! let relay = Relay::start(server, Impairment::loss(0.05).with_seed(7)).await?;
//! // Connect the client to `relay.addr()` instead of `server`.
//! # let _ = relay.addr();
//! # Ok(()) }
//! ```

use std::{
    cmp::Ordering as CmpOrdering,
    collections::{BinaryHeap, HashMap},
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rand::{RngExt, SeedableRng, rngs::StdRng};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot},
    task::{JoinHandle, JoinSet},
    time::Instant,
};

/// The largest datagram the relay carries (the UDP maximum).
const MAX_DATAGRAM: usize = 65_535;

/// How the relay treats each datagram, in both directions.
#[derive(Debug, Clone, PartialEq)]
pub struct Impairment {
    /// Probability in `[0, 1]` that a datagram is dropped.
    pub loss: f64,
    /// Extra delay every forwarded datagram gets. Any nonzero delay is rounded up to the tokio
    /// timer's granularity (1 ms).
    pub delay: Duration,
    /// Further delay drawn uniformly from `[0, jitter)` per datagram; a jitter larger than the
    /// gap between datagrams reorders them too.
    pub jitter: Duration,
    /// Probability in `[0, 1]` that a datagram is held back by
    /// [`reorder_delay`](Self::reorder_delay) more, so that the ones after it overtake it.
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_delay: Duration,
    /// Seed of the random decisions (mixed with the client's index and the direction).
    pub seed: u64,
    /// Datagrams dropped whatever the dice say: by direction and 0-based index among the
    /// datagrams of one client in that direction. For scripting one exact loss, such as a
    /// handshake packet.
    pub drops: Vec<(Direction, u64)>,
}

impl Default for Impairment {
    /// A perfect link: nothing dropped, delayed or reordered.
    fn default() -> Self {
        Self {
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(5),
            seed: 0x5eed_cafe,
            drops: Vec::new(),
        }
    }
}

impl Impairment {
    /// A link that drops each datagram with probability `loss`, and does nothing else.
    pub fn loss(loss: f64) -> Self {
        Self {
            loss,
            ..Self::default()
        }
    }

    /// The same, with `delay` plus up to `jitter` more on every datagram.
    pub fn with_delay(mut self, delay: Duration, jitter: Duration) -> Self {
        self.delay = delay;
        self.jitter = jitter;
        self
    }

    /// The same, holding a datagram back by `by` with probability `probability`.
    pub fn with_reorder(mut self, probability: f64, by: Duration) -> Self {
        self.reorder = probability;
        self.reorder_delay = by;
        self
    }

    /// The same, with another seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The same, also dropping the datagrams numbered `indices` (from 0) in `direction`.
    pub fn with_drops(
        mut self,
        direction: Direction,
        indices: impl IntoIterator<Item = u64>,
    ) -> Self {
        self.drops
            .extend(indices.into_iter().map(|index| (direction, index)));
        self
    }

    fn check(&self) -> io::Result<()> {
        let probability = |p: f64| (0.0..=1.0).contains(&p);
        if probability(self.loss) && probability(self.reorder) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "loss ({}) and reorder ({}) must be probabilities in [0, 1]",
                    self.loss, self.reorder
                ),
            ))
        }
    }
}

/// What happened to the datagrams of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Datagrams the relay received for this direction.
    pub received: u64,
    /// Datagrams dropped on purpose.
    pub dropped: u64,
    /// Datagrams held back to be reordered (they were forwarded too).
    pub reordered: u64,
    /// Datagrams forwarded (sent on, after their delay).
    pub forwarded: u64,
    /// Bytes forwarded.
    pub bytes: u64,
}

/// A snapshot of a relay's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Client to server.
    pub to_server: DirectionStats,
    /// Server to client.
    pub to_client: DirectionStats,
    /// Distinct client addresses seen.
    pub clients: u64,
}

#[derive(Debug, Default)]
struct DirectionCounters {
    received: AtomicU64,
    dropped: AtomicU64,
    reordered: AtomicU64,
    forwarded: AtomicU64,
    bytes: AtomicU64,
}

impl DirectionCounters {
    fn snapshot(&self) -> DirectionStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DirectionStats {
            received: get(&self.received),
            dropped: get(&self.dropped),
            reordered: get(&self.reordered),
            forwarded: get(&self.forwarded),
            bytes: get(&self.bytes),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    to_server: DirectionCounters,
    to_client: DirectionCounters,
    clients: AtomicU64,
}

/// State shared by the relay's handle and its tasks.
#[derive(Debug)]
struct Shared {
    impairment: Mutex<Impairment>,
    counters: Counters,
}

impl Shared {
    fn impairment(&self) -> Impairment {
        self.impairment
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A running relay. Dropping it stops it (its tasks are aborted, its sockets closed).
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    server: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay to `server` with `impairment`, listening on an ephemeral loopback port.
    /// Must run inside a tokio runtime.
    ///
    /// # Errors
    /// If a probability is out of `[0, 1]` or the socket cannot be bound.
    pub async fn start(server: SocketAddr, impairment: Impairment) -> io::Result<Self> {
        impairment.check()?;
        let front = Arc::new(UdpSocket::bind(loopback(server)).await?);
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            impairment: Mutex::new(impairment),
            counters: Counters::default(),
        });
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(front, server, shared.clone(), stopped));
        Ok(Self {
            addr,
            server,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Where clients should send: the relay's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server the relay forwards to.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Changes the impairment for the datagrams received from now on (datagrams already delayed
    /// keep their schedule).
    ///
    /// # Errors
    /// If a probability is out of `[0, 1]`; the impairment is then left as it was.
    pub fn set_impairment(&self, impairment: Impairment) -> io::Result<()> {
        impairment.check()?;
        *self
            .shared
            .impairment
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = impairment;
        Ok(())
    }

    /// The current impairment.
    pub fn impairment(&self) -> Impairment {
        self.shared.impairment()
    }

    /// The counters so far.
    pub fn stats(&self) -> RelayStats {
        let c = &self.shared.counters;
        RelayStats {
            to_server: c.to_server.snapshot(),
            to_client: c.to_client.snapshot(),
            clients: c.clients.load(Ordering::Relaxed),
        }
    }

    /// Stops the relay and waits until all its tasks have ended and its sockets are closed.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Aborting the main task drops its `JoinSet`, which aborts every per-client task.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The unspecified-port loopback address of `server`'s family.
fn loopback(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => (Ipv4Addr::LOCALHOST, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::LOCALHOST, 0).into(),
    }
}

/// The main task: reads from clients, creates a path per new client, and owns every other task.
async fn run(
    front: Arc<UdpSocket>,
    server: SocketAddr,
    shared: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut tasks = JoinSet::new();
    let mut clients: HashMap<SocketAddr, Path> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, from) = tokio::select! {
            _ = &mut stopped => break,
            received = front.recv_from(&mut buf) => match received {
                Ok(r) => r,
                // An ICMP error surfaced on the socket, or a datagram larger than the buffer:
                // a real link would lose it too.
                Err(_) => continue,
            },
        };
        while tasks.try_join_next().is_some() {}
        if !clients.contains_key(&from) {
            match new_client(
                &front,
                server,
                from,
                clients.len() as u64,
                &shared,
                &mut tasks,
            )
            .await
            {
                Ok(path) => {
                    shared.counters.clients.fetch_add(1, Ordering::Relaxed);
                    clients.insert(from, path);
                }
                Err(e) => {
                    eprintln!("relay: no upstream socket for {from}: {e}");
                    continue;
                }
            }
        }
        if let Some(path) = clients.get_mut(&from) {
            path.offer(&buf[..len], &shared.impairment());
        }
    }
    tasks.shutdown().await;
}

/// Binds the upstream socket of a new client and starts its tasks; returns the client-to-server
/// path.
async fn new_client(
    front: &Arc<UdpSocket>,
    server: SocketAddr,
    client: SocketAddr,
    index: u64,
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
) -> io::Result<Path> {
    let upstream = Arc::new(UdpSocket::bind(loopback(server)).await?);
    upstream.connect(server).await?;
    let seed = shared.impairment().seed;
    let to_server = Path::new(
        seed,
        index,
        Direction::ToServer,
        Target::Connected(upstream.clone()),
        shared.clone(),
        tasks,
    );
    let mut to_client = Path::new(
        seed,
        index,
        Direction::ToClient,
        Target::To(front.clone(), client),
        shared.clone(),
        tasks,
    );
    let shared = shared.clone();
    tasks.spawn(async move {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            match upstream.recv(&mut buf).await {
                Ok(len) => to_client.offer(&buf[..len], &shared.impairment()),
                // The server's port refused (ICMP): it may come back; keep listening.
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    });
    Ok(to_server)
}

/// One direction of the relayed flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client to the server.
    ToServer,
    /// From the server to the client.
    ToClient,
}

/// Where a path's datagrams go.
#[derive(Debug)]
enum Target {
    /// Out of a socket connected to the server.
    Connected(Arc<UdpSocket>),
    /// Out of the listening socket, to a client.
    To(Arc<UdpSocket>, SocketAddr),
}

impl Target {
    async fn send(&self, datagram: &[u8]) -> io::Result<usize> {
        match self {
            Self::Connected(socket) => socket.send(datagram).await,
            Self::To(socket, to) => socket.send_to(datagram, to).await,
        }
    }
}

/// One direction of one client: decides each datagram's fate and hands survivors to the delay
/// line.
#[derive(Debug)]
struct Path {
    rng: StdRng,
    direction: Direction,
    shared: Arc<Shared>,
    line: mpsc::UnboundedSender<Delayed>,
    /// Datagrams offered so far.
    offered: u64,
    next_seq: u64,
}

impl Path {
    fn new(
        seed: u64,
        index: u64,
        direction: Direction,
        target: Target,
        shared: Arc<Shared>,
        tasks: &mut JoinSet<()>,
    ) -> Self {
        let (line, queue) = mpsc::unbounded_channel();
        tasks.spawn(delay_line(queue, target, shared.clone(), direction));
        let stream = index * 2
            + match direction {
                Direction::ToServer => 0,
                Direction::ToClient => 1,
            };
        Self {
            rng: StdRng::seed_from_u64(seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            direction,
            shared,
            line,
            offered: 0,
            next_seq: 0,
        }
    }

    fn counters(&self) -> &DirectionCounters {
        counters(&self.shared, self.direction)
    }

    /// Drops, delays or reorders one datagram.
    fn offer(&mut self, datagram: &[u8], imp: &Impairment) {
        self.counters().received.fetch_add(1, Ordering::Relaxed);
        let index = self.offered;
        self.offered += 1;
        // Always draw, so that scripted drops leave the random pattern as it was.
        let lost = imp.loss > 0.0 && self.rng.random_bool(imp.loss);
        if lost || imp.drops.contains(&(self.direction, index)) {
            self.counters().dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut delay = imp.delay;
        if !imp.jitter.is_zero() {
            delay += imp.jitter.mul_f64(self.rng.random::<f64>());
        }
        if imp.reorder > 0.0 && self.rng.random_bool(imp.reorder) {
            delay += imp.reorder_delay;
            self.counters().reordered.fetch_add(1, Ordering::Relaxed);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let _ = self.line.send(Delayed {
            due: Instant::now() + delay,
            seq,
            datagram: datagram.to_vec(),
        });
    }
}

fn counters(shared: &Shared, direction: Direction) -> &DirectionCounters {
    match direction {
        Direction::ToServer => &shared.counters.to_server,
        Direction::ToClient => &shared.counters.to_client,
    }
}

/// A datagram waiting for its time; ordered by due time, then by arrival.
#[derive(Debug)]
struct Delayed {
    due: Instant,
    seq: u64,
    datagram: Vec<u8>,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}

impl Eq for Delayed {}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Delayed {
    /// Reversed, so that the `BinaryHeap` (a max-heap) pops the earliest first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// Sends each queued datagram when it is due.
async fn delay_line(
    mut queue: mpsc::UnboundedReceiver<Delayed>,
    target: Target,
    shared: Arc<Shared>,
    direction: Direction,
) {
    let mut waiting = BinaryHeap::new();
    loop {
        let next_due = waiting.peek().map(|d: &Delayed| d.due);
        let wake = async move {
            match next_due {
                Some(due) => tokio::time::sleep_until(due).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            queued = queue.recv() => match queued {
                Some(d) => waiting.push(d),
                None => break,
            },
            () = wake => {
                let now = Instant::now();
                while waiting.peek().is_some_and(|d| d.due <= now) {
                    let d = waiting.pop().expect("peeked");
                    // UDP: a failed send is a lost datagram.
                    if target.send(&d.datagram).await.is_ok() {
                        let c = counters(&shared, direction);
                        c.forwarded.fetch_add(1, Ordering::Relaxed);
                        c.bytes.fetch_add(d.datagram.len() as u64, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}
