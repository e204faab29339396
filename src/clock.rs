//! One clock read per request.
//!
//! A near hit read the clock five times: the wall clock for freshness, the metrics timer's
//! start, the near tier's liveness check, the in-process map's expiry check, and the
//! timer's end (about 20 ns each on this kind of machine, a tenth of what the layer adds to
//! a hit). `Cache::call` now reads the monotonic clock once, right before the lookup, and
//! *pins* it for the work it does without waiting (the lookup a store answers at once, and
//! the answer): whatever in the crate asks for the time in that span on that thread gets
//! the pinned instant, which is no more than that span old. The inner service runs after
//! the pin; the code of others that runs inside it (a store's `lookup_now`, a `metrics`
//! recorder, a `tracing` subscriber) must not wait, and cannot see the pin.
//!
//! The wall clock is derived from the monotonic one: an offset between the two, read again
//! whenever it is more than a second old. Both clocks are slewed alike, so the offset moves
//! only when the wall clock is stepped; a step shows within a second.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

thread_local! {
    static PINNED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The start of the monotonic milliseconds below.
static BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

/// The wall clock minus the monotonic one, in ms, and when (monotonic ms) it was read.
static OFFSET: AtomicI64 = AtomicI64::new(0);
static OFFSET_AT: AtomicU64 = AtomicU64::new(0);
/// How long an offset is used before it is read again.
const OFFSET_FOR_MS: u64 = 1_000;

/// Now: the pinned instant inside a pin on this thread, else the clock.
#[cfg_attr(not(any(feature = "memory", feature = "valkey")), allow(dead_code))]
pub(crate) fn instant() -> Instant {
    PINNED.with(Cell::get).unwrap_or_else(Instant::now)
}

/// Milliseconds on the monotonic clock, from 1 (0 can mean "never"). (Used by the stores.)
#[cfg_attr(not(any(feature = "memory", feature = "valkey")), allow(dead_code))]
pub(crate) fn monotonic_ms() -> u64 {
    mono_ms(instant())
}

fn mono_ms(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*BASE).as_millis())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

/// Milliseconds since the Unix epoch at `at` (within a millisecond of the wall clock
/// read at that instant, and within a second of a step).
pub(crate) fn wall_ms_at(at: Instant) -> u64 {
    let mono = mono_ms(at);
    let checked = OFFSET_AT.load(Ordering::Acquire);
    let offset = if checked == 0 || mono.saturating_sub(checked) > OFFSET_FOR_MS {
        // The wall clock between two monotonic reads, taken again (a few times at most)
        // when the thread was held up between them; measured against the clock now, not
        // `at` (which may be a pinned instant).
        let read = || {
            let before = Instant::now();
            let wall = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, crate::entry::millis);
            let after = Instant::now();
            (before + (after - before) / 2, wall, after - before)
        };
        let mut taken = read();
        for _ in 0..3 {
            if taken.2 < std::time::Duration::from_millis(1) {
                break;
            }
            taken = read();
        }
        let (now, wall) = (mono_ms(taken.0), taken.1);
        let offset = i64::try_from(wall).unwrap_or(i64::MAX) - i64::try_from(now).unwrap_or(0);
        OFFSET.store(offset, Ordering::Relaxed);
        OFFSET_AT.store(now, Ordering::Release);
        offset
    } else {
        OFFSET.load(Ordering::Relaxed)
    };
    u64::try_from(
        i64::try_from(mono)
            .unwrap_or(i64::MAX)
            .saturating_add(offset),
    )
    .unwrap_or(0)
}

/// Runs `f` with the clock pinned at `at` on this thread (restored after, even on a panic).
/// `f` must not wait, nor call the inner service; `at` should be read right before.
pub(crate) fn pinned<R>(at: Instant, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Instant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            PINNED.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(PINNED.with(|p| p.replace(Some(at))));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_pin_holds_inside_and_goes_after_even_on_a_panic() {
        let at = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
        pinned(at, || {
            assert_eq!(instant(), at);
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(instant(), at, "the pinned instant, not the clock");
        });
        assert!(instant() > at);
        let caught = std::panic::catch_unwind(|| pinned(at, || panic!("inside")));
        assert!(caught.is_err());
        assert!(instant() > at, "unpinned after a panic");
        // Another thread never sees this one's pin.
        pinned(at, || {
            let other = std::thread::spawn(instant).join().unwrap();
            assert!(other > at);
        });
    }

    #[test]
    fn the_derived_wall_clock_matches_the_wall_clock() {
        for _ in 0..3 {
            let before = crate::entry::now_ms();
            let derived = wall_ms_at(Instant::now());
            let after = crate::entry::now_ms();
            // Loose: the offset is shared with other tests' threads, and a loaded machine
            // can hold a thread up between its reads.
            assert!(
                before.saturating_sub(20) <= derived && derived <= after + 20,
                "{before} <= {derived} <= {after}"
            );
            std::thread::sleep(Duration::from_millis(3));
        }
        // An instant in the past reads as the past.
        let then = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        let now = wall_ms_at(Instant::now());
        let past = wall_ms_at(then);
        assert!((25..=300).contains(&(now - past)), "{now} - {past}");
    }
}
