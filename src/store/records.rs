//! The clear records, and the rule every store checks an entry against when it is read.
//!
//! A clear does not look for the entries it makes stale: it records, per tag, the
//! invalidation sequence at which the tag was last cleared. An entry remembers the fence its
//! data was read under (the epoch and sequence its lookup saw before the origin was called)
//! and its tags; it is served only while
//!
//! - its epoch is the records' epoch (a lost or flushed record set starts a new epoch, so
//!   nothing from before the loss is served),
//! - its fence is at or above the floor (purges, and pruning of old records, raise it), and
//! - none of its tags was cleared after its fence.
//!
//! So a clear costs O(tags) whatever the tags carry, and a record that is missing can only
//! make entries dead, never alive: the records are one unit (one map here, one sorted set in
//! Valkey), lost whole or not at all, and a loss shows as a new epoch.
//!
//! [`MemoryStore`](crate::store::MemoryStore) keeps its records here; the Valkey store keeps a
//! mirror of the server's record set here, per connection.

// Each store uses part of this; a build with one store (or none) leaves the rest unused.
#![cfg_attr(not(all(feature = "memory", feature = "valkey")), allow(dead_code))]

use std::collections::BTreeSet;
use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{RwLock, RwLockReadGuard};

use bytes::Bytes;

use super::Fence;

/// Most clear records kept by default. Beyond it the oldest are dropped and the floor rises
/// to them (entries fenced before are dead): memory stays bounded whatever the clear rate.
pub(crate) const DEFAULT_MAX_RECORDS: usize = 16_384;

/// A tag as the records know it: the first 8 bytes of its SHA-256. Two tags sharing an id
/// would clear each other: extra misses, never a stale hit.
pub(crate) fn tag_id(tag: &str) -> u64 {
    let digest = <sha2::Sha256 as sha2::Digest>::digest(tag.as_bytes());
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(id)
}

/// Keyed per process: tag ids are SHA-256 bits, but anyone can grind tags whose ids share
/// the low bits a plain table would index by, and make every lookup walk a long chain.
type IdMap = std::collections::HashMap<u64, u64>;

/// An epoch no record set has: 52 random bits (a Valkey score holds integers exactly up to
/// 2^53), never 0.
pub(crate) fn new_epoch() -> u64 {
    use std::hash::BuildHasher;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() & ((1 << 52) - 1)).max(1)
}

/// The invalidation state: epoch, sequence, floor and each recently cleared tag's last clear.
#[derive(Debug, Clone)]
pub(crate) struct Records {
    epoch: u64,
    seq: u64,
    floor: u64,
    by_tag: IdMap,
    /// The same records ordered by sequence, to drop the oldest.
    by_seq: BTreeSet<(u64, u64)>,
    max: usize,
}

impl Records {
    pub(crate) fn new(epoch: u64, max: usize) -> Self {
        Records {
            epoch,
            seq: 0,
            floor: 0,
            by_tag: IdMap::default(),
            by_seq: BTreeSet::new(),
            max: max.max(1),
        }
    }

    /// The fence a lookup made now hands to its fill.
    pub(crate) fn fence(&self) -> Fence {
        Fence::new(self.epoch, self.seq)
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    #[cfg(test)]
    pub(crate) fn floor(&self) -> u64 {
        self.floor
    }

    /// Number of tag records kept.
    pub(crate) fn len(&self) -> usize {
        self.by_tag.len()
    }

    /// Whether an entry filled under `fence` with tags `ids` may be served.
    pub(crate) fn is_current(&self, fence: Fence, ids: impl IntoIterator<Item = u64>) -> bool {
        // Epoch 0 is no epoch: nothing stamped with it, or checked against it, is current.
        fence.epoch() == self.epoch
            && self.epoch != 0
            && fence.seq() >= self.floor
            && ids
                .into_iter()
                .all(|id| self.by_tag.get(&id).is_none_or(|&s| s <= fence.seq()))
    }

    /// Starts over under another epoch: everything filled before is dead.
    pub(crate) fn reset(&mut self, epoch: u64) {
        *self = Records::new(epoch, self.max);
    }

    /// A clear of `ids` numbered `seq` (by this store, or by the far store for a near tier).
    pub(crate) fn clear(&mut self, ids: impl IntoIterator<Item = u64>, seq: u64) {
        self.seq = self.seq.max(seq);
        for id in ids {
            self.record(id, seq);
        }
    }

    /// The next sequence, for a clear or purge made here.
    pub(crate) fn advance(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Raises the sequence to one seen elsewhere (never lowers it).
    pub(crate) fn observe(&mut self, seq: u64) {
        self.seq = self.seq.max(seq);
    }

    /// Changes the bound, dropping the oldest records (and raising the floor) if over it.
    pub(crate) fn set_max(&mut self, max: usize) {
        self.max = max.max(1);
        self.prune();
    }

    /// Keeps `id`'s last clear at `seq` (or a later one already kept), then drops the
    /// oldest records beyond the bound, raising the floor to them.
    pub(crate) fn record(&mut self, id: u64, seq: u64) {
        if seq <= self.floor {
            return; // below the floor it can make nothing more dead
        }
        match self.by_tag.insert(id, seq) {
            Some(old) if old >= seq => {
                self.by_tag.insert(id, old); // a later clear is kept already
                return;
            }
            Some(old) => {
                self.by_seq.remove(&(old, id));
            }
            None => {}
        }
        self.by_seq.insert((seq, id));
        self.prune();
    }

    fn prune(&mut self) {
        while self.by_tag.len() > self.max {
            let Some((oldest, id)) = self.by_seq.pop_first() else {
                break;
            };
            self.by_tag.remove(&id);
            self.floor = self.floor.max(oldest);
        }
    }

    /// Every entry fenced before `floor` is dead (a purge, or records dropped elsewhere);
    /// records at or below it say nothing more and go.
    pub(crate) fn raise_floor(&mut self, floor: u64) {
        if floor <= self.floor {
            return;
        }
        self.floor = floor;
        self.seq = self.seq.max(floor);
        while let Some(&(seq, id)) = self.by_seq.first() {
            if seq > floor {
                break;
            }
            self.by_seq.pop_first();
            self.by_tag.remove(&id);
        }
    }
}

/// Records behind a lock, their epoch and newest sequence also published for reading
/// without it: an entry stamped at or after the newest clear (every entry filled since) is
/// checked without the lock, so cores serving hits write nothing they share. Older entries,
/// and readers that meet a change being published, take the lock.
#[derive(Debug)]
pub(crate) struct Shared {
    records: RwLock<Records>,
    /// Odd while a change is being published.
    version: AtomicU64,
    epoch: AtomicU64,
    /// The sequence at or above which no clear, purge or pruned record reaches.
    newest: AtomicU64,
}

impl Shared {
    pub(crate) fn new(records: Records) -> Self {
        let shared = Shared {
            records: RwLock::new(Records::new(0, 1)),
            version: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            newest: AtomicU64::new(0),
        };
        shared.write(|r| *r = records);
        shared
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Records> {
        crate::lock::read(&self.records)
    }

    /// Changes the records, and publishes what they became before anyone else may.
    pub(crate) fn write<R>(&self, change: impl FnOnce(&mut Records) -> R) -> R {
        let mut records = crate::lock::write(&self.records);
        let out = change(&mut records);
        let newest = (records.by_seq.last().map_or(0, |&(seq, _)| seq))
            .max(records.seq)
            .max(records.floor);
        // Writers hold the lock, so they publish one at a time.
        self.version.fetch_add(1, SeqCst);
        self.epoch.store(records.epoch, SeqCst);
        self.newest.store(newest, SeqCst);
        self.version.fetch_add(1, SeqCst);
        out
    }

    /// The epoch and newest sequence, unless a change is being published.
    pub(crate) fn newest(&self) -> Option<Fence> {
        let before = self.version.load(SeqCst);
        if before & 1 == 1 {
            return None;
        }
        let fence = Fence::new(self.epoch.load(SeqCst), self.newest.load(SeqCst));
        (self.version.load(SeqCst) == before).then_some(fence)
    }

    /// The fence a lookup made now hands to its fill.
    pub(crate) fn fence(&self) -> Fence {
        self.newest().unwrap_or_else(|| self.read().fence())
    }

    /// Whether no clear at all came after `fence` (in its epoch): current whatever its
    /// tags, told without the lock. `false` says nothing: ask [`is_current`](Self::is_current).
    pub(crate) fn surely_current(&self, fence: Fence) -> bool {
        self.newest().is_some_and(|newest| {
            newest.epoch() != 0 && fence.epoch() == newest.epoch() && fence.seq() >= newest.seq()
        })
    }

    /// [`Records::is_current`], without the lock for an entry no clear came after.
    pub(crate) fn is_current(&self, fence: Fence, ids: impl IntoIterator<Item = u64>) -> bool {
        if self.surely_current(fence) {
            return true;
        }
        self.read().is_current(fence, ids)
    }

    /// The entry after the stamp, when the stamp is readable and current.
    pub(crate) fn check(&self, value: Bytes) -> Option<Bytes> {
        let (fence, ids, start) = Stamp::read(&value)?;
        self.is_current(fence, ids.iter())
            .then(|| value.slice(start..))
    }
}

/// What a store keeps in front of an entry's bytes so that it can check the entry on read:
/// `"TCS" 0x01 | epoch u64 | fence u64 | tag count u16 | tag ids u64...` (little endian).
pub(crate) struct Stamp;

const STAMP_MAGIC: [u8; 4] = *b"TCS\x01";
const STAMP_FIXED: usize = 4 + 8 + 8 + 2;

impl Stamp {
    /// Writes the stamp for a fill (straight into a command's argument).
    pub(crate) fn write(
        out: &mut impl std::io::Write,
        fence: Fence,
        ids: &[u64],
    ) -> std::io::Result<()> {
        let count = ids.len().min(usize::from(u16::MAX));
        out.write_all(&STAMP_MAGIC)?;
        out.write_all(&fence.epoch().to_le_bytes())?;
        out.write_all(&fence.seq().to_le_bytes())?;
        out.write_all(&(count as u16).to_le_bytes())?;
        for id in &ids[..count] {
            out.write_all(&id.to_le_bytes())?;
        }
        Ok(())
    }

    /// Reads a stored value: its fence, its tag ids and where the entry starts. `None` for
    /// anything that is not a whole stamp (garbage, another version): a miss.
    pub(crate) fn read(value: &[u8]) -> Option<(Fence, StampIds<'_>, usize)> {
        let fixed = value.get(..STAMP_FIXED)?;
        if fixed[..4] != STAMP_MAGIC {
            return None;
        }
        let word = |at: usize| u64::from_le_bytes(fixed[at..at + 8].try_into().unwrap_or([0; 8]));
        let fence = Fence::new(word(4), word(12));
        let count = usize::from(u16::from_le_bytes([fixed[20], fixed[21]]));
        let end = STAMP_FIXED + 8 * count;
        let ids = value.get(STAMP_FIXED..end)?;
        Some((fence, StampIds(ids), end))
    }

    /// The entry after the stamp, when the stamp is readable and `records` say it is current.
    pub(crate) fn check(value: Bytes, records: &Records) -> Option<Bytes> {
        let (fence, ids, start) = Stamp::read(&value)?;
        records
            .is_current(fence, ids.iter())
            .then(|| value.slice(start..))
    }
}

/// The tag ids of a stamp, read in place.
#[derive(Clone, Copy)]
pub(crate) struct StampIds<'a>(&'a [u8]);

impl<'a> StampIds<'a> {
    pub(crate) fn iter(self) -> impl Iterator<Item = u64> + 'a {
        self.0
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamped(fence: Fence, tags: &[&str], body: &[u8]) -> Bytes {
        let ids: Vec<u64> = tags.iter().map(|t| tag_id(t)).collect();
        let mut out = Vec::new();
        Stamp::write(&mut out, fence, &ids).unwrap();
        out.extend_from_slice(body);
        Bytes::from(out)
    }

    #[test]
    fn a_clear_after_the_fence_kills_and_one_before_does_not() {
        let mut r = Records::new(7, 100);
        let seq = r.advance();
        r.clear([tag_id("a")], seq);
        let fence = r.fence();
        let entry = stamped(fence, &["a", "b"], b"body");
        assert_eq!(
            Stamp::check(entry.clone(), &r).as_deref(),
            Some(&b"body"[..])
        );
        let seq = r.advance();
        r.clear([tag_id("c")], seq); // unrelated
        assert!(Stamp::check(entry.clone(), &r).is_some());
        let seq = r.advance();
        r.clear([tag_id("b")], seq);
        assert!(Stamp::check(entry, &r).is_none());
    }

    #[test]
    fn another_epoch_a_floor_or_garbage_means_dead() {
        let mut r = Records::new(7, 100);
        r.advance();
        let entry = stamped(r.fence(), &["a"], b"x");
        assert!(Stamp::check(entry.clone(), &r).is_some());
        let mut other = r.clone();
        other.reset(8);
        assert!(Stamp::check(entry.clone(), &other).is_none());
        let seq = r.advance();
        r.raise_floor(seq);
        assert!(Stamp::check(entry.clone(), &r).is_none());
        for bad in [
            &b""[..],
            b"TCS",
            b"TCS\x02aaaaaaaaaaaaaaaaaaaaaa",
            &entry[..25],
        ] {
            assert!(Stamp::check(Bytes::copy_from_slice(bad), &r).is_none());
        }
    }

    #[test]
    fn records_stay_bounded_and_the_floor_covers_what_was_dropped() {
        let mut r = Records::new(1, 3);
        let old = stamped(r.fence(), &["t0"], b"x");
        for i in 0..10u64 {
            let seq = r.advance();
            r.clear([tag_id(&format!("t{i}"))], seq);
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.floor(), 7);
        // t0's record is gone, but the entry it cleared stays dead.
        assert!(Stamp::check(old, &r).is_none());
        let fresh = stamped(r.fence(), &["t0"], b"x");
        assert!(Stamp::check(fresh, &r).is_some());
    }

    #[test]
    fn a_record_never_moves_back() {
        let mut r = Records::new(1, 10);
        r.clear([5], 9);
        r.clear([5], 4);
        assert!(!r.is_current(Fence::new(1, 8), [5]));
        assert!(r.is_current(Fence::new(1, 9), [5]));
        r.raise_floor(9);
        assert_eq!(r.len(), 0);
        assert!(!r.is_current(Fence::new(1, 8), []));
    }

    /// The lock-free answer is the locked one, whatever the records went through: clears
    /// (here and merged from elsewhere, out of order), purges, pruning, new epochs.
    #[test]
    fn shared_answers_as_the_records_do() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let shared = Shared::new(Records::new(1, 8));
        for _ in 0..20_000 {
            match next(10) {
                0..=4 => shared.write(|r| {
                    let seq = r.advance();
                    r.clear([next(16), next(16)], seq);
                }),
                5 => shared.write(|r| {
                    // A clear seen elsewhere, possibly ahead of or behind this sequence.
                    let seq = r.fence().seq() + next(5);
                    r.record(next(16), seq.saturating_sub(2));
                    r.observe(seq);
                }),
                6 => shared.write(|r| {
                    let seq = r.advance();
                    r.raise_floor(seq);
                }),
                7 if next(20) == 0 => shared.write(|r| r.reset(r.epoch() + 1)),
                _ => {}
            }
            let now = shared.read().fence();
            assert!(shared.fence().seq() >= now.seq());
            for _ in 0..4 {
                let epoch = now.epoch() - next(2).min(now.epoch() - 1);
                let fence = Fence::new(epoch, now.seq().saturating_sub(next(6)) + next(3));
                let ids = [next(16), next(16)];
                assert_eq!(
                    shared.is_current(fence, ids),
                    shared.read().is_current(fence, ids),
                    "{fence:?} {ids:?}"
                );
            }
        }
    }
}
