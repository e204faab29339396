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
//! 400 with two threads reading one key (a throwaway comparison; `cargo bench --bench
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
/// A shard with this many slots or more drops its empty ones once fewer than a quarter
/// are held.
const COMPACT_FROM: usize = 64;

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
    /// When it expires, in ms of `clock::monotonic_ms`.
    expires: u64,
}

/// Expiry is on a monotonic clock: a wall clock stepping back must not keep an entry alive.
use crate::clock::monotonic_ms;

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
    /// it used. `f` runs under the shard's read lock: it should copy out what it needs, and
    /// must neither touch this map nor take a lock (a writer waiting on the shard would
    /// stall every reader of it behind `f`'s wait).
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
    /// stay within the budget. `false` when it was not stored: a value heavier than a
    /// shard's share; any value the key had goes then.
    pub(crate) fn insert(&self, key: EntryKey, value: V, weight: u32, ttl: Duration) -> bool {
        let now = monotonic_ms();
        let expires = now.saturating_add(crate::entry::millis(ttl));
        // Nothing weighs nothing: every entry can be evicted to make room.
        let weight = weight.max(1);
        let shard = self.shard(&key);
        if u64::from(weight) > self.share {
            let gone = lock::write(shard).take_key(&key);
            drop(gone);
            return false;
        }
        let mut s = lock::write(shard);
        let Some((at, old)) = s.put(key, value, weight, expires) else {
            return false;
        };
        let mut evicted = Vec::new();
        while s.weight > self.share {
            match s.evict_one(at, now) {
                Some(held) => evicted.push(held),
                None => break,
            }
        }
        s.settle();
        drop(s);
        // Dropped outside the lock: the last reference to a large body frees it.
        drop((old, evicted));
        true
    }

    /// Takes the value under `key` out, if any (expired or not).
    pub(crate) fn remove(&self, key: &EntryKey) -> Option<V> {
        let held = lock::write(self.shard(key)).take_key(key)?;
        (held.expires > monotonic_ms()).then_some(held.value)
    }

    /// Takes the value under `key` out if it is still the one `same` recognizes (not one a
    /// write put there since it was read); whether it did.
    pub(crate) fn remove_if(&self, key: &EntryKey, same: impl FnOnce(&V) -> bool) -> bool {
        let mut shard = lock::write(self.shard(key));
        let Some(&at) = shard.index.get(key) else {
            return false;
        };
        if !shard.slots[at as usize]
            .entry
            .as_ref()
            .is_some_and(|held| same(&held.value))
        {
            return false;
        }
        let held = shard.take_key(key);
        drop(shard);
        drop(held);
        true
    }

    /// Drops every entry.
    pub(crate) fn clear(&self) {
        for shard in self.shards.iter() {
            let old = std::mem::replace(&mut *lock::write(shard), Shard::new());
            drop(old);
        }
    }

    /// How many entries are held and their weight: exact, expired ones included until
    /// they are evicted or written over. Takes each shard's read lock in turn.
    pub(crate) fn count(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(entries, weight), shard| {
            let s = lock::read(shard);
            (entries + s.index.len() as u64, weight + s.weight)
        })
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

    /// Puts the entry in (over the key's old one, which it returns); where it is. `None`
    /// (and nothing put) when a new slot would not have an index.
    fn put(
        &mut self,
        key: EntryKey,
        value: V,
        weight: u32,
        expires: u64,
    ) -> Option<(usize, Option<Held<V>>)> {
        if let Some(&at) = self.index.get(&key) {
            let slot = &mut self.slots[at as usize];
            let new = Held {
                key,
                value,
                weight,
                expires,
            };
            let old = slot.entry.replace(new);
            self.weight += u64::from(weight);
            if let Some(old) = &old {
                self.weight -= u64::from(old.weight);
            }
            return Some((at as usize, old));
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
                // 4 G entries in one shard: not a budget anyone sets, but never a slot two
                // keys share.
                let at = u32::try_from(self.slots.len()).ok()?;
                self.slots.push(Slot {
                    entry: Some(held),
                    used: AtomicBool::new(false),
                });
                at
            }
        };
        self.weight += u64::from(weight);
        self.index.insert(key, at);
        Some((at as usize, None))
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

    /// Takes `key`'s entry out (and settles: see `settle`).
    fn take_key(&mut self, key: &EntryKey) -> Option<Held<V>> {
        let at = *self.index.get(key)?;
        let held = self.take(at);
        self.settle();
        held
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

    /// Drops the empty slots once fewer than a quarter of them hold an entry: a shard that
    /// held many small entries and now holds a few large ones keeps no room for the many.
    /// (Slot numbers change: never while an insert still needs its own.)
    fn settle(&mut self) {
        if self.slots.len() >= COMPACT_FROM && self.index.len() * 4 < self.slots.len() {
            self.compact();
        }
    }

    fn compact(&mut self) {
        let hand = self.hand;
        let mut kept = Vec::with_capacity(self.index.len());
        let mut new_hand = None;
        for (at, slot) in std::mem::take(&mut self.slots).into_iter().enumerate() {
            if slot.entry.is_some() {
                if new_hand.is_none() && at >= hand {
                    new_hand = Some(kept.len());
                }
                kept.push(slot);
            }
        }
        self.hand = new_hand.unwrap_or(0);
        self.index.clear();
        self.index.shrink_to(kept.len());
        for (at, slot) in kept.iter().enumerate() {
            if let Some(held) = &slot.entry {
                // Fewer slots than before: every index fits.
                self.index.insert(held.key.clone(), at as u32);
            }
        }
        self.slots = kept;
        self.free = Vec::new();
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
    fn expired_entries_are_not_read_nor_handed_out() {
        let m = Bounded::new(1 << 20);
        m.insert(key(1), 1, 100, Duration::from_millis(300));
        m.insert(key(2), 2, 100, HOUR);
        m.insert(key(3), 3, 100, Duration::ZERO);
        assert_eq!(get(&m, 1), Some(1));
        assert_eq!(get(&m, 3), None, "a zero lifetime is expired at once");
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(get(&m, 1), None);
        assert_eq!(get(&m, 2), Some(2));
        assert_eq!(m.count(), (3, 300), "counted until evicted or written over");
        assert_eq!(
            m.remove(&key(1)),
            None,
            "an expired value is not handed out"
        );
        assert_eq!(m.count(), (2, 200), "but removed all the same");
        m.insert(key(3), 33, 100, HOUR);
        assert_eq!(get(&m, 3), Some(33), "written over");
    }

    #[test]
    fn expired_entries_are_evicted_before_used_ones() {
        let m = Bounded::new(1_000);
        for i in 0..9 {
            m.insert(key(i), i, 100, HOUR);
            assert_eq!(get(&m, i), Some(i));
        }
        m.insert(key(9), 9, 100, Duration::from_millis(200));
        assert_eq!(get(&m, 9), Some(9));
        std::thread::sleep(Duration::from_millis(300));
        m.insert(key(10), 10, 100, HOUR);
        for i in 0..9 {
            assert_eq!(get(&m, i), Some(i), "{i}");
        }
        assert_eq!(get(&m, 10), Some(10));
    }

    #[test]
    fn absurd_sizes_and_lifetimes_neither_panic_nor_overflow() {
        let m = Bounded::new(1 << 20);
        assert!(m.insert(key(1), 1, 100, Duration::MAX));
        assert_eq!(get(&m, 1), Some(1));
        assert!(
            !m.insert(key(2), 2, u32::MAX, HOUR),
            "heavier than the budget"
        );
        assert!(m.insert(key(3), 3, 0, HOUR), "weightless is counted as 1");
        assert_eq!(m.count(), (2, 101));
        let none = Bounded::new(0);
        assert!(
            !none.insert(key(1), 1, 0, HOUR),
            "a zero budget holds nothing"
        );
        assert_eq!(none.count(), (0, 0));
        // A budget of many shards refuses what exceeds one shard's share, and keeps the rest.
        let big = Bounded::new(256 << 20);
        assert_eq!(big.shards.len(), MAX_SHARDS);
        assert!(big.insert(key(1), 1, 16 << 20, HOUR), "exactly a share");
        assert!(!big.insert(key(1), 2, (16 << 20) + 1, HOUR), "over it");
        assert_eq!(get(&big, 1), None, "the key's older value went too");
    }

    #[test]
    fn a_shard_drops_its_empty_slots_when_few_are_held() {
        let m = Bounded::new(100_000);
        for i in 0..1_000 {
            m.insert(key(i), i, 100, HOUR);
        }
        let slots = |m: &Bounded<u64>| lock::read(&m.shards[0]).slots.len();
        assert_eq!(slots(&m), 1_000);
        // Large entries push the small ones out: ten fit.
        for i in 0..10 {
            assert!(m.insert(key(10_000 + i), i, 10_000, HOUR));
            assert_eq!(get(&m, 10_000 + i), Some(i));
        }
        assert_eq!(m.count(), (10, 100_000));
        assert!(slots(&m) < 64, "{} slots for 10 entries", slots(&m));
        for i in 0..10 {
            assert_eq!(get(&m, 10_000 + i), Some(i), "kept through compaction");
        }
        // Removing most of what is held compacts too.
        for i in 0..1_000 {
            m.insert(key(i), i, 10, HOUR);
        }
        for i in 0..990 {
            m.remove(&key(i));
        }
        assert!(slots(&m) < 200, "{} slots", slots(&m));
        for i in 990..1_000 {
            assert_eq!(get(&m, i), Some(i));
        }
    }

    #[test]
    fn remove_if_spares_a_value_written_since() {
        let m = Bounded::new(1 << 20);
        m.insert(key(1), 1, 100, HOUR);
        assert!(!m.remove_if(&key(1), |v| *v == 2), "not the value read");
        assert_eq!(get(&m, 1), Some(1));
        assert!(m.remove_if(&key(1), |v| *v == 1));
        assert_eq!(get(&m, 1), None);
        assert!(!m.remove_if(&key(1), |_| true), "nothing to remove");
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
        // Four shards of 8 MiB, over full: eviction, removal and compaction on every shard
        // while others read.
        let m = std::sync::Arc::new(Bounded::<u64>::new(32 << 20));
        assert_eq!(m.shards.len(), 4);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        let k = (i * 7 + t * 13) % 3_001;
                        if (i + t) % 3 == 0 {
                            m.insert(key(k), k, 8_000 + (k % 5) as u32 * 4_000, HOUR);
                        } else if let Some(v) = get(&m, k) {
                            assert_eq!(v, k, "a key reads its own value");
                        }
                        if i % 97 == 0 {
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
        assert!(weight <= 32 << 20);
        assert!(weight > 24 << 20, "filled: {weight}");
        // The index, the slots and the free list agree, and the weights add up.
        let (mut seen, mut total) = (0, 0);
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
            let held = s.slots.iter().filter(|x| x.entry.is_some()).count();
            assert_eq!(held, s.index.len());
            let mut free = s.free.clone();
            free.sort_unstable();
            free.dedup();
            assert_eq!(free.len(), s.free.len(), "no slot freed twice");
            assert!(free.iter().all(|&at| s.slots[at as usize].entry.is_none()));
            assert_eq!(free.len() + held, s.slots.len(), "every empty slot is free");
            assert!(s.hand < s.slots.len().max(1));
        }
        assert_eq!((seen, total), (entries, weight));
    }
}
