//! Stampede protection: concurrent misses for one key call the inner service once per
//! instance. The first becomes the leader; the others wait (bounded) for what it got. When
//! the leader's response turns out not to be storable, the key is remembered as
//! "hit-for-miss" for a while, as Varnish does, so later misses go straight to the origin
//! instead of queueing behind each other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use crate::key::EntryKey;
use crate::lock::lock;

/// What a leader's miss ended in, as its waiters see it.
#[derive(Clone, Debug)]
pub(crate) enum Landed {
    /// A storable response: the encoded entry, served to waiters as a hit.
    Entry(Bytes),
    /// Not storable (status, `Set-Cookie`, `private`...): waiters ask the origin themselves.
    Uncacheable,
    /// The leader failed, was cancelled, or its body was too large or broke.
    Failed,
    /// The leader's response varies on these request headers: each waiter's own values
    /// select its variant, whose flight it joins instead.
    Varies(Vec<http::HeaderName>),
}

type Slot = watch::Sender<Option<Landed>>;

/// Most keys remembered as hit-for-miss; past it the memory is dropped (it is only a hint).
const MAX_HIT_FOR_MISS: usize = 100_000;

/// A key's flight: the leader's result once it landed, and a channel once someone waits.
/// Most misses have no waiter, so the channel is made only for the first one.
#[derive(Debug, Default)]
struct Flight {
    slot: Option<Slot>,
    landed: Option<Landed>,
}

#[derive(Debug, Default)]
pub(crate) struct Flights {
    in_flight: Mutex<crate::Map<EntryKey, Flight>>,
    hit_for_miss: Mutex<crate::Map<EntryKey, Instant>>,
    /// Whether `hit_for_miss` may hold anything: most apps never fill it, and then a miss
    /// does not take its lock. A hint, like the map.
    any_hit_for_miss: AtomicBool,
}

pub(crate) enum Join {
    Leader(FlightGuard),
    Waiter(watch::Receiver<Option<Landed>>),
    /// Recently uncacheable: go to the origin without waiting.
    Alone,
}

impl Flights {
    pub(crate) fn join(self: &Arc<Self>, key: &EntryKey) -> Join {
        if self.any_hit_for_miss.load(Ordering::Relaxed) {
            if let Some(until) = lock(&self.hit_for_miss).get(key) {
                if *until > Instant::now() {
                    return Join::Alone;
                }
            }
        }
        let mut map = lock(&self.in_flight);
        if let Some(flight) = map.get_mut(key) {
            let rx = match (&flight.landed, &flight.slot) {
                // Landed, its entry not yet in the store: take it at once.
                (Some(landed), _) => watch::channel(Some(landed.clone())).1,
                (None, Some(slot)) => slot.subscribe(),
                (None, None) => {
                    let (tx, rx) = watch::channel(None);
                    flight.slot = Some(tx);
                    rx
                }
            };
            return Join::Waiter(rx);
        }
        map.insert(key.clone(), Flight::default());
        Join::Leader(FlightGuard {
            flights: self.clone(),
            key: key.clone(),
            landed: false,
            on_done: None,
        })
    }

    /// Starts a flight only if none is under way (for background refreshes).
    pub(crate) fn lead(self: &Arc<Self>, key: &EntryKey) -> Option<FlightGuard> {
        match self.join(key) {
            Join::Leader(g) => Some(g),
            _ => None,
        }
    }

    fn remember_uncacheable(&self, key: &EntryKey, window: Duration) {
        if window.is_zero() {
            return;
        }
        let mut hfm = lock(&self.hit_for_miss);
        let now = Instant::now();
        if hfm.len() >= MAX_HIT_FOR_MISS {
            hfm.retain(|_, until| *until > now);
            if hfm.len() >= MAX_HIT_FOR_MISS {
                hfm.clear();
            }
        }
        hfm.insert(key.clone(), now + window);
        self.any_hit_for_miss.store(true, Ordering::Relaxed);
    }

    fn forget_uncacheable(&self, key: &EntryKey) {
        if !self.any_hit_for_miss.load(Ordering::Relaxed) {
            return;
        }
        let mut hfm = lock(&self.hit_for_miss);
        hfm.remove(key);
        if hfm.is_empty() {
            self.any_hit_for_miss.store(false, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        lock(&self.in_flight).len()
    }
}

/// Held by the leader of a flight; tells the waiters how it ended, even if dropped.
pub(crate) struct FlightGuard {
    flights: Arc<Flights>,
    key: EntryKey,
    landed: bool,
    /// Runs once the flight is over (its entry stored, or given up): releases a lease.
    on_done: Option<OnDone>,
}

type OnDone = Box<dyn FnOnce() + Send + Sync>;

/// Keeps a landed flight visible until its entry is in the store, so that requests arriving
/// meanwhile take the landed entry (or, for a stale entry, do not start a second refresh)
/// instead of finding the store not yet filled.
pub(crate) struct Landing {
    flights: Arc<Flights>,
    key: EntryKey,
    on_done: Option<OnDone>,
}

impl Drop for Landing {
    fn drop(&mut self) {
        lock(&self.flights.in_flight).remove(&self.key);
        if let Some(done) = self.on_done.take() {
            done();
        }
    }
}

impl FlightGuard {
    /// Tells the waiters; the flight stays visible until the returned `Landing` is dropped.
    pub(crate) fn land(mut self, landed: Landed, hit_for_miss: Duration) -> Landing {
        match &landed {
            Landed::Uncacheable => self.flights.remember_uncacheable(&self.key, hit_for_miss),
            Landed::Entry(_) => self.flights.forget_uncacheable(&self.key),
            Landed::Failed | Landed::Varies(_) => {}
        }
        self.send(landed);
        Landing {
            flights: self.flights.clone(),
            key: self.key.clone(),
            on_done: self.on_done.take(),
        }
    }

    /// Runs `done` when the flight is over.
    pub(crate) fn on_done(&mut self, done: impl FnOnce() + Send + Sync + 'static) {
        self.on_done = Some(Box::new(done));
    }

    fn send(&mut self, landed: Landed) {
        self.landed = true;
        if let Some(flight) = lock(&self.flights.in_flight).get_mut(&self.key) {
            if let Some(slot) = &flight.slot {
                slot.send_replace(Some(landed.clone()));
            }
            flight.landed = Some(landed);
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if !self.landed {
            self.send(Landed::Failed);
            lock(&self.flights.in_flight).remove(&self.key);
            if let Some(done) = self.on_done.take() {
                done();
            }
        }
    }
}

/// Waits for the leader, at most `wait`; a timeout counts as a failure.
pub(crate) async fn wait_for(mut rx: watch::Receiver<Option<Landed>>, wait: Duration) -> Landed {
    let landed = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
    match landed {
        Ok(Ok(v)) => v.clone().unwrap_or(Landed::Failed),
        _ => Landed::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_many_waiters() {
        let flights = Arc::new(Flights::default());
        let key = EntryKey::new("r", [1; 32]);
        let Join::Leader(guard) = flights.join(&key) else {
            panic!("first is leader")
        };
        let waiters: Vec<_> = (0..3)
            .map(|_| match flights.join(&key) {
                Join::Waiter(rx) => tokio::spawn(wait_for(rx, Duration::from_secs(5))),
                _ => panic!("others wait"),
            })
            .collect();
        guard.land(
            Landed::Entry(Bytes::from_static(b"e")),
            Duration::from_secs(1),
        );
        for w in waiters {
            assert!(matches!(w.await.unwrap(), Landed::Entry(_)));
        }
        assert_eq!(flights.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_waiters_and_uncacheable_is_remembered() {
        let flights = Arc::new(Flights::default());
        let key = EntryKey::new("r", [2; 32]);
        let Join::Leader(guard) = flights.join(&key) else {
            panic!()
        };
        let Join::Waiter(rx) = flights.join(&key) else {
            panic!()
        };
        drop(guard);
        assert!(matches!(
            wait_for(rx, Duration::from_secs(5)).await,
            Landed::Failed
        ));
        let Join::Leader(guard) = flights.join(&key) else {
            panic!()
        };
        guard.land(Landed::Uncacheable, Duration::from_secs(60));
        assert!(matches!(flights.join(&key), Join::Alone));
        assert!(flights.lead(&key).is_none());
    }

    #[tokio::test]
    async fn a_waiter_arriving_after_the_landing_takes_the_entry_at_once() {
        let flights = Arc::new(Flights::default());
        let key = EntryKey::new("r", [4; 32]);
        let Join::Leader(guard) = flights.join(&key) else {
            panic!()
        };
        // Nobody waited: no channel was made, yet a late waiter must see the result.
        let landing = guard.land(
            Landed::Entry(Bytes::from_static(b"e")),
            Duration::from_secs(1),
        );
        let Join::Waiter(rx) = flights.join(&key) else {
            panic!("the flight stays visible until its entry is stored")
        };
        assert!(matches!(
            wait_for(rx, Duration::from_millis(50)).await,
            Landed::Entry(_)
        ));
        drop(landing);
        assert_eq!(flights.in_flight(), 0);
        assert!(matches!(flights.join(&key), Join::Leader(_)));
    }

    #[tokio::test]
    async fn waiting_is_bounded() {
        let flights = Arc::new(Flights::default());
        let key = EntryKey::new("r", [3; 32]);
        let _leader = flights.join(&key);
        let Join::Waiter(rx) = flights.join(&key) else {
            panic!()
        };
        assert!(matches!(
            wait_for(rx, Duration::from_millis(20)).await,
            Landed::Failed
        ));
    }
}
