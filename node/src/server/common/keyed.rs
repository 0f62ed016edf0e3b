//! Locks per key: work on one key (activating a rain's pool, a quiz show's control
//! action) is serialized without making every other key wait behind it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type KeyLock = Arc<tokio::sync::Mutex<()>>;

/// A lock for each key in use; a key's entry goes when no one holds or waits for it, so
/// the map holds at most as many keys as there are tasks using it.
#[derive(Default)]
pub struct KeyedLocks {
    locks: Mutex<HashMap<String, KeyLock>>,
}

/// Holds the lock of one key; dropping it releases the key.
pub struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyLock>> {
        self.locks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for `key`'s lock (other keys are not affected).
    pub async fn lock(&self, key: &str) -> KeyedGuard<'_> {
        let lock = self.map().entry(key.to_string()).or_default().clone();
        let guard = lock.lock_owned().await;
        KeyedGuard {
            locks: self,
            key: key.to_string(),
            guard: Some(guard),
        }
    }

    /// Keys with an entry (held or waited for).
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether no key is held or waited for.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.map();
        // Only the map's own reference left: no one holds or waits for the key.
        if locks
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_key_waits_for_itself_only_and_entries_go_when_unused() {
        let locks = KeyedLocks::default();
        let a = locks.lock("a").await;
        // Another key is free while "a" is held.
        let b = tokio::time::timeout(std::time::Duration::from_secs(1), locks.lock("b"))
            .await
            .expect("b is not held up by a");
        drop(b);
        // "a" again waits until the first guard goes.
        let second = locks.lock("a");
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), &mut second)
                .await
                .is_err(),
            "a is held"
        );
        drop(a);
        let again = second.await;
        drop(again);
        assert!(locks.is_empty(), "no entry is left behind");
    }
}
