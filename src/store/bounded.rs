//! The in-process store's map: bounded by bytes, each entry with a lifetime of its own,
//! evicted by CLOCK (second chance).
//!
//! Sharded by a keyed hash of the key's digest, each shard behind a `RwLock` with an equal
//! share of the budget. A read takes the read lock, marks
//! the entry used (a flag written only when not set already, so readers of a hot entry
//! write nothing shared beyond the lock) and hands the caller a reference for the moment
//! the lock is held: it copies out what it needs. An insert that takes its shard over its
//! share evicts: a hand goes round the shard's slots, passing over (and unmarking) the
//! entries used since it last came by, and takes the first that was not, or has expired.
//! Expired entries are never read; they go when the hand reaches them, when their key is
//! written again, or when the map is counted.
//!
//! It replaced moka, whose reads (a concurrent hash table, an epoch pin, a read-event queue
//! and its maintenance, a clock read) were the largest single item of a near-cache hit:
//! 135 ns a read against 50 here, clock read included, on one thread; 820 against about
//! 400 with two threads reading one key (`examples` measured it once; `cargo bench --bench
//! hot_path -- memory` shows the hit as a whole). CLOCK keeps what is read again and lets
//! what was read once go first; it has no frequency sketch, so a scan of many new keys can
//! push out entries read only once since the hand last passed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use crate::key::EntryKey;
use crate::lock;

/// A shard's share of the budget is at least this much (fewer shards for small maps), so
/// that one large entry fits in the shard its key falls in.
const MIN_SHARD_BYTES: u64 = 8 << 20;
/// The most shards: enough that two cores writing rarely meet on one lock.
const MAX_SHARDS: usize = 16;

/// A concurrent map from keys to values, bounded by the weights its inserts declare.
pub(crate) struct Bounded<V> {
    shards: Box<[RwLock<Shard<V>>]>,
    /// What each shard may hold.
    share: u64,
    hasher: crate::Keyed,
}

struct Shard<V> {
    index: HashMap<EntryKey, u32, crate::Keyed>,
    slots: Vec<Slot<V>>,
    /// Slots whose entry went, to fill before growing.
    free: Vec<u32>,
    /// Where the hand is (an index into `slots`).
    hand: usize,
    /// The weights of the entries held.
    weight: u64,
}

struct Slot<V> {
    entry: Option<Held<V>>,
    /// Read since the hand last passed.
    used: AtomicBool,
}

struct Held<V> {
    key: EntryKey,
    value: V,
    weight: u32,
    /// When it expires, in ms of `monotonic_ms`.
    expires: u64,
}

/// Milliseconds on a monotonic clock, from the first call: a wall clock stepping back must
/// not keep an entry alive.
fn monotonic_ms() -> u64 {
    static BASE: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    u64::try_from(BASE.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl<V> Bounded<V> {
    /// A map holding at most `budget` of declared weight.
    pub(crate) fn new(budget: u64) -> Self {
        let shards = usize::try_from(budget / MIN_SHARD_BYTES)
            .unwrap_or(MAX_SHARDS)
            .clamp(1, MAX_SHARDS);
        // A power of two, so the shard is a mask of the digest.
        let shards = if shards.is_power_of_two() {
            shards
        } else {
            shards.next_power_of_two() / 2
        };
        Bounded {
            shards: (0..shards).map(|_| RwLock::new(Shard::new())).collect(),
            share: budget / shards as u64,
            hasher: crate::Keyed::default(),
        }
    }

    fn shard(&self, key: &EntryKey) -> &RwLock<Shard<V>> {
        use std::hash::BuildHasher;
        // Hashed rather than read off the digest: a key made with `EntryKey::new` can have
        // any digest, and its shard must still be anyone's. The high bits: the index's
        // table takes the low ones.
        let h = self.hasher.hash_one(key.digest());
        &self.shards[(h >> 48) as usize & (self.shards.len() - 1)]
    }

    /// Calls `f` with the value under `key`, unless there is none or it has expired; marks
    /// it used. `f` runs under the shard's read lock: it should copy out what it needs.
    pub(crate) fn read<R>(&self, key: &EntryKey, f: impl FnOnce(&V) -> R) -> Option<R> {
        let now = monotonic_ms();
        let shard = lock::read(self.shard(key));
        let at = *shard.index.get(key)?;
        let slot = &shard.slots[at as usize];
        let held = slot.entry.as_ref()?;
        if held.expires <= now {
            return None;
        }
        if !slot.used.load(Ordering::Relaxed) {
            slot.used.store(true, Ordering::Relaxed);
        }
        Some(f(&held.value))
    }

    /// Stores `value` under `key` for `ttl`, counted as `weight`; evicts what it must to
    /// stay within the budget. A value heavier than a shard's share is not stored (and any
    /// value the key had goes).
    pub(crate) fn insert(&self, key: EntryKey, value: V, weight: u32, ttl: Duration) {
        let now = monotonic_ms();
        let expires = now.saturating_add(crate::entry::millis(ttl));
        let shard = self.shard(&key);
        if u64::from(weight) > self.share {
            let gone = lock::write(shard).take_key(&key);
            drop(gone);
            return;
        }
        let mut s = lock::write(shard);
        let (at, old) = s.put(key, value, weight, expires);
        let mut evicted = Vec::new();
        while s.weight > self.share {
            match s.evict_one(at, now) {
                Some(held) => evicted.push(held),
                None => break,
            }
        }
        drop(s);
        // Dropped outside the lock: the last reference to a large body frees it.
        drop((old, evicted));
    }

    /// Takes the value under `key` out, if any (expired or not).
    pub(crate) fn remove(&self, key: &EntryKey) -> Option<V> {
        let held = lock::write(self.shard(key)).take_key(key)?;
        (held.expires > monotonic_ms()).then_some(held.value)
    }

    /// Drops every entry.
    pub(crate) fn clear(&self) {
        for shard in self.shards.iter() {
            let old = std::mem::replace(&mut *lock::write(shard), Shard::new());
            drop(old);
        }
    }

    /// Drops the expired entries; returns how many entries are left and their weight.
    pub(crate) fn count(&self) -> (u64, u64) {
        let now = monotonic_ms();
        let (mut entries, mut weight) = (0, 0);
        for shard in self.shards.iter() {
            let mut s = lock::write(shard);
            let expired: Vec<u32> = s
                .index
                .values()
                .copied()
                .filter(|&at| {
                    s.slots[at as usize]
                        .entry
                        .as_ref()
                        .is_some_and(|h| h.expires <= now)
                })
                .collect();
            let gone: Vec<_> = expired.into_iter().filter_map(|at| s.take(at)).collect();
            entries += s.index.len() as u64;
            weight += s.weight;
            drop(s);
            drop(gone);
        }
        (entries, weight)
    }
}

impl<V> Shard<V> {
    fn new() -> Self {
        Shard {
            index: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            hand: 0,
            weight: 0,
        }
    }

    /// Puts the entry in (over the key's old one, which it returns); where it is.
    fn put(
        &mut self,
        key: EntryKey,
        value: V,
        weight: u32,
        expires: u64,
    ) -> (usize, Option<Held<V>>) {
        self.weight += u64::from(weight);
        if let Some(&at) = self.index.get(&key) {
            let slot = &mut self.slots[at as usize];
            let new = Held {
                key,
                value,
                weight,
                expires,
            };
            let old = slot.entry.replace(new);
            if let Some(old) = &old {
                self.weight -= u64::from(old.weight);
            }
            return (at as usize, old);
        }
        let held = Held {
            key: key.clone(),
            value,
            weight,
            expires,
        };
        let at = match self.free.pop() {
            Some(at) => {
                let slot = &mut self.slots[at as usize];
                slot.entry = Some(held);
                *slot.used.get_mut() = false;
                at
            }
            None => {
                self.slots.push(Slot {
                    entry: Some(held),
                    used: AtomicBool::new(false),
                });
                // At most `u32::MAX` slots: a shard's share over 4 G entries is not a
                // budget anyone sets, and weights are at least the key's size.
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.index.insert(key, at);
        (at as usize, None)
    }

    /// Evicts one entry other than `keep`: the first the hand finds expired or not used
    /// since it last passed. `None` when there is nothing else to evict.
    fn evict_one(&mut self, keep: usize, now: u64) -> Option<Held<V>> {
        let n = self.slots.len();
        // Twice round at most: the first pass unmarks everything it passes.
        for _ in 0..2 * n {
            let at = self.hand;
            self.hand = (self.hand + 1) % n;
            if at == keep {
                continue;
            }
            let slot = &mut self.slots[at];
            let Some(held) = &slot.entry else { continue };
            let used = slot.used.get_mut();
            if *used && held.expires > now {
                *used = false;
                continue;
            }
            return self.take(u32::try_from(at).ok()?);
        }
        None
    }

    fn take_key(&mut self, key: &EntryKey) -> Option<Held<V>> {
        let at = *self.index.get(key)?;
        self.take(at)
    }

    fn take(&mut self, at: u32) -> Option<Held<V>> {
        let slot = self.slots.get_mut(at as usize)?;
        let held = slot.entry.take()?;
        *slot.used.get_mut() = false;
        self.index.remove(&held.key);
        self.weight -= u64::from(held.weight);
        self.free.push(at);
        Some(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> EntryKey {
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&i.to_le_bytes());
        EntryKey::new("t", d)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn get(m: &Bounded<u64>, i: u64) -> Option<u64> {
        m.read(&key(i), |v| *v)
    }

    #[test]
    fn reads_what_was_put_and_its_replacement() {
        let m = Bounded::new(1 << 20);
        assert_eq!(get(&m, 1), None);
        m.insert(key(1), 10, 100, HOUR);
        assert_eq!(get(&m, 1), Some(10));
        m.insert(key(1), 11, 300, HOUR);
        assert_eq!(get(&m, 1), Some(11));
        assert_eq!(
            m.count(),
            (1, 300),
            "the replacement's weight, counted once"
        );
        assert_eq!(m.remove(&key(1)), Some(11));
        assert_eq!(get(&m, 1), None);
        assert_eq!(m.count(), (0, 0));
    }

    #[test]
    fn stays_within_its_budget_whatever_is_inserted() {
        // (budget, heaviest entry): one shard, one shard, 4 shards holding everything, 8
        // shards over full. Keys with structured digests (as `EntryKey::new` allows) must
        // still use every shard.
        for (budget, heavy) in [
            (1_000u64, 400),
            (64 << 10, 400),
            (40 << 20, 400),
            (64 << 20, 8_000),
        ] {
            let m = Bounded::new(budget);
            let shards = m.shards.len() as u64;
            for i in 0..20_000u64 {
                let weight = heavy - (i % 7) as u32 * (heavy / 8);
                m.insert(key(i), i, weight, HOUR);
                if i % 13 == 0 {
                    let _ = get(&m, i / 2);
                }
            }
            let (entries, weight) = m.count();
            assert!(weight <= budget, "{weight} > {budget}");
            assert!(entries > 0);
            if budget == 40 << 20 {
                assert_eq!(entries, 20_000, "a budget this large holds everything");
            } else {
                // Every shard is full but for less than the heaviest entry.
                assert!(
                    weight + shards * u64::from(heavy) >= budget,
                    "{weight} of {budget}"
                );
            }
        }
    }

    #[test]
    fn an_entry_read_since_the_hand_passed_outlives_one_that_was_not() {
        // One shard of 1,000 bytes: ten entries of 100.
        let m = Bounded::new(1_000);
        for i in 0..10 {
            m.insert(key(i), i, 100, HOUR);
        }
        for i in 0..5 {
            assert_eq!(get(&m, i), Some(i));
        }
        // Five new entries push out the five never read, not the five read.
        for i in 10..15 {
            m.insert(key(i), i, 100, HOUR);
        }
        for i in 0..5 {
            assert_eq!(get(&m, i), Some(i), "read, so kept: {i}");
        }
        for i in 5..10 {
            assert_eq!(get(&m, i), None, "never read, so evicted: {i}");
        }
        for i in 10..15 {
            assert_eq!(get(&m, i), Some(i));
        }
    }

    #[test]
    fn the_entry_being_inserted_is_never_its_own_victim() {
        let m = Bounded::new(1_000);
        for i in 0..10 {
            m.insert(key(i), i, 100, HOUR);
            assert_eq!(get(&m, i), Some(i));
        }
        // Everything is marked used; the heavy newcomer still goes in.
        m.insert(key(99), 99, 900, HOUR);
        assert_eq!(get(&m, 99), Some(99));
        assert!(m.count().1 <= 1_000);
    }

    #[test]
    fn too_heavy_to_fit_is_not_stored_and_drops_the_old_value() {
        let m = Bounded::new(1_000);
        m.insert(key(1), 1, 100, HOUR);
        m.insert(key(1), 2, 1_001, HOUR);
        assert_eq!(get(&m, 1), None);
        assert_eq!(m.count(), (0, 0));
    }

    #[test]
    fn expired_entries_are_not_read_and_go_when_counted() {
        let m = Bounded::new(1 << 20);
        m.insert(key(1), 1, 100, Duration::from_millis(30));
        m.insert(key(2), 2, 100, HOUR);
        m.insert(key(3), 3, 100, Duration::ZERO);
        assert_eq!(get(&m, 1), Some(1));
        assert_eq!(get(&m, 3), None, "a zero lifetime is expired at once");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(get(&m, 1), None);
        assert_eq!(
            m.remove(&key(1)),
            None,
            "an expired value is not handed out"
        );
        assert_eq!(m.count(), (1, 100));
    }

    #[test]
    fn expired_entries_are_evicted_before_used_ones() {
        let m = Bounded::new(1_000);
        for i in 0..9 {
            m.insert(key(i), i, 100, HOUR);
            assert_eq!(get(&m, i), Some(i));
        }
        m.insert(key(9), 9, 100, Duration::from_millis(20));
        assert_eq!(get(&m, 9), Some(9));
        std::thread::sleep(Duration::from_millis(40));
        m.insert(key(10), 10, 100, HOUR);
        for i in 0..9 {
            assert_eq!(get(&m, i), Some(i), "{i}");
        }
        assert_eq!(get(&m, 10), Some(10));
    }

    #[test]
    fn cleared_means_empty_and_usable() {
        let m = Bounded::new(1 << 20);
        for i in 0..100 {
            m.insert(key(i), i, 100, HOUR);
        }
        m.clear();
        assert_eq!(m.count(), (0, 0));
        assert_eq!(get(&m, 5), None);
        m.insert(key(5), 5, 100, HOUR);
        assert_eq!(get(&m, 5), Some(5));
    }

    #[test]
    fn readers_and_writers_at_once_keep_it_consistent() {
        let m = std::sync::Arc::new(Bounded::<u64>::new(64 << 10));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        let k = (i * 7 + t) % 2_000;
                        if (i + t) % 3 == 0 {
                            m.insert(key(k), k, 64 + (k % 5) as u32 * 32, HOUR);
                        } else if let Some(v) = get(&m, k) {
                            assert_eq!(v, k, "a key reads its own value");
                        }
                        if i % 997 == 0 {
                            m.remove(&key(k));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (entries, weight) = m.count();
        assert!(weight <= 64 << 10);
        // The index and the slots agree: every indexed entry reads, and the weights add up.
        let mut seen = 0;
        let mut total = 0;
        for shard in m.shards.iter() {
            let s = lock::read(shard);
            for (k, &at) in &s.index {
                let held = s.slots[at as usize]
                    .entry
                    .as_ref()
                    .expect("indexed slot held");
                assert_eq!(&held.key, k);
                total += u64::from(held.weight);
                seen += 1;
            }
            assert_eq!(
                s.slots.iter().filter(|x| x.entry.is_some()).count(),
                s.index.len()
            );
        }
        assert_eq!((seen, total), (entries, weight));
    }
}
