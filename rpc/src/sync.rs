//! Locks that outlive a panic.
//!
//! The locks in this crate guard state that stays consistent between statements (a map, a
//! counter, a slot), so a panic while one was held leaves nothing half-changed: the next holder
//! takes the lock as it is instead of spreading the panic to every connection of the process.
//! One exception: the durable store's pending sizes, which its writer thread holds for a whole
//! transaction. A panic there ends that thread (every later durable send fails with
//! `Error::Store`) and leaves the sizes, which `Stats` and the pending gauges read, half-counted
//! until the store is opened again.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// [`Mutex::lock`] that takes the lock also after a holder panicked.
pub(crate) trait Lock<T: ?Sized> {
    /// Waits for the lock and returns it; never fails.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> Lock<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// [`RwLock::read`] and [`RwLock::write`] that take the lock also after a holder panicked.
pub(crate) trait ReadWrite<T: ?Sized> {
    /// Waits for shared access and returns it; never fails.
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    /// Waits for exclusive access and returns it; never fails.
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> ReadWrite<T> for RwLock<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(|p| p.into_inner())
    }
}
