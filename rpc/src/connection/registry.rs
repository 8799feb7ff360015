//! The server's view of its clients: every connection, and the identity index.

use crate::sync::Lock;
use std::{collections::HashMap, fmt, sync::Mutex};

use tokio::sync::broadcast;

use super::Connection;
use crate::{DisconnectReason, ServerEvent};

/// Every connection of a server and the client identities bound to them. One lock guards both
/// maps and each connection's bound id, so a lookup never sees half a re-bind.
pub(crate) struct Registry {
    inner: Mutex<RegistryInner>,
    /// `None` once the server shut down: subscribers then see the stream end.
    events: Mutex<Option<broadcast::Sender<ServerEvent>>>,
    /// Signalled when the last connection leaves.
    emptied: tokio::sync::Notify,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("len", &self.len())
            .finish()
    }
}

#[derive(Default)]
struct RegistryInner {
    conns: HashMap<u64, Connection>,
    ids: HashMap<String, u64>,
    /// Connections another took an identity over from, until they leave: they bind nothing
    /// more (a hello of theirs still in flight would take the identity back and close the
    /// newer connection, and both clients would stop).
    taken_over: std::collections::HashSet<u64>,
}

impl Registry {
    pub(crate) fn new(events: usize) -> Self {
        Self {
            inner: Mutex::new(RegistryInner::default()),
            events: Mutex::new(Some(broadcast::channel(events).0)),
            emptied: tokio::sync::Notify::new(),
        }
    }

    /// Sends `event` to the subscribers (none once the events ended).
    pub(crate) fn emit(&self, event: ServerEvent) {
        if let Some(events) = self.events.locked().as_ref() {
            let _ = events.send(event);
        }
    }

    /// A new subscriber; one that is closed at once after the events ended.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ServerEvent> {
        match self.events.locked().as_ref() {
            Some(events) => events.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Ends the events: each subscriber gets what was sent so far, then `Closed`.
    pub(crate) fn end_events(&self) {
        drop(self.events.locked().take());
    }

    /// Returns once no connection is left (at once if none is).
    pub(crate) async fn emptied(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.len() == 0 {
                return;
            }
            emptied.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner.locked()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Adds `conn`. Events about the registry are sent while it is locked, so subscribers see
    /// them in the order the registry changed (binds on several I/O threads included).
    pub(crate) fn add(&self, conn: &Connection) {
        let mut inner = self.lock();
        inner.conns.insert(conn.id(), conn.clone());
        self.emit(ServerEvent::Connected(conn.clone()));
    }

    pub(crate) fn remove(&self, conn: &Connection, reason: DisconnectReason) {
        let empty = {
            let mut inner = self.lock();
            inner.conns.remove(&conn.id());
            inner.taken_over.remove(&conn.id());
            if let Some(id) = conn.client_id() {
                if inner.ids.get(&id) == Some(&conn.id()) {
                    inner.ids.remove(&id);
                }
            }
            self.emit(ServerEvent::Disconnected {
                conn: conn.clone(),
                reason,
            });
            inner.conns.is_empty()
        };
        if empty {
            self.emptied.notify_waiters();
        }
    }

    /// Binds `conn` to `client_id`: the id now finds `conn`, and the id `conn` held before, if
    /// any, no longer finds anything. Returns the live connection that held `client_id` before
    /// (for the caller to close as taken over). A connection that already left the registry, is
    /// closed (a hello answered after its client gave up), or that another connection took an
    /// identity over from, is not bound.
    pub(crate) fn bind(&self, client_id: String, conn: &Connection) -> Option<Connection> {
        let previous;
        {
            let mut inner = self.lock();
            if !inner.conns.contains_key(&conn.id())
                || inner.taken_over.contains(&conn.id())
                || conn.is_closed()
            {
                return None;
            }
            if let Some(old) = conn.client_id() {
                if old != client_id && inner.ids.get(&old) == Some(&conn.id()) {
                    inner.ids.remove(&old);
                }
            }
            conn.set_client_id_local(Some(client_id.clone()));
            previous = inner
                .ids
                .insert(client_id.clone(), conn.id())
                .filter(|&old| old != conn.id())
                .and_then(|old| inner.conns.get(&old).cloned());
            if let Some(old) = &previous {
                inner.taken_over.insert(old.id());
            }
            self.emit(ServerEvent::Bound {
                conn: conn.clone(),
                client_id,
            });
        }
        previous
    }

    pub(crate) fn get(&self, id: u64) -> Option<Connection> {
        self.lock().conns.get(&id).cloned()
    }

    pub(crate) fn by_client_id(&self, client_id: &str) -> Option<Connection> {
        let inner = self.lock();
        inner
            .ids
            .get(client_id)
            .and_then(|id| inner.conns.get(id))
            .cloned()
    }

    pub(crate) fn all(&self) -> Vec<Connection> {
        self.lock().conns.values().cloned().collect()
    }
}
