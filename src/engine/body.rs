//! The response body the layer hands out: a stored body, the inner body untouched, or the
//! inner body streamed to the client while a copy is kept for the store (up to a limit).
//!
//! The copy is read at the origin's speed, not the client's: a task reads the inner body
//! (up to the limit) and feeds the client from a queue, so the fill lands, and requests
//! waiting on the same key are answered, when the origin is done, even if this client never
//! reads. Past the limit the copy is dropped and the client reads the rest straight from
//! the inner body, at its own pace (memory stays bounded by the limit).

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::sync::mpsc;

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::stats::count;
use crate::stats::CacheStats;

type OnComplete = Box<dyn FnOnce(Bytes, Option<HeaderMap>) + Send + Sync>;

/// Collects a copy of a streamed body; hands it over when the body ended within the limit.
pub(crate) struct Tee {
    chunks: Vec<Bytes>,
    size: usize,
    limit: usize,
    trailers: Option<HeaderMap>,
    stats: CacheStats,
    on_complete: OnComplete,
}

impl Tee {
    pub(crate) fn new(limit: usize, stats: CacheStats, on_complete: OnComplete) -> Self {
        Tee {
            chunks: Vec::new(),
            size: 0,
            limit,
            trailers: None,
            stats,
            on_complete,
        }
    }

    /// Records a frame; false when the body went over the limit (the copy is then dropped).
    fn observe(&mut self, frame: &Frame<Bytes>) -> bool {
        if let Some(data) = frame.data_ref() {
            self.size += data.len();
            if self.size > self.limit {
                count!(self.stats.inner, oversize);
                return false;
            }
            if !data.is_empty() {
                self.chunks.push(data.clone());
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            self.trailers = Some(trailers.clone());
        }
        true
    }

    fn complete(self) {
        let body = match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.into_iter().next().expect("one chunk"),
            _ => {
                let mut all = Vec::with_capacity(self.size);
                for c in &self.chunks {
                    all.extend_from_slice(c);
                }
                Bytes::from(all)
            }
        };
        (self.on_complete)(body, self.trailers);
    }
}

pin_project! {
    /// The body of a response that went through [`Cache`](crate::cache::Cache).
    pub struct CacheBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        // Boxed: a response is moved several times on its way out, so the body is kept small.
        Stored { data: Option<Bytes>, trailers: Option<Box<HeaderMap>> },
        // A 304's: nothing, and no size either (an exact 0 would make a framework add
        // `Content-Length: 0`, which a 304 must not say unless the 200's body was empty).
        NotModified { hint: SizeHint },
        Passthrough { #[pin] inner: B },
        // Read here, as the client polls (no runtime to run a reader task on).
        Filling { #[pin] inner: B, tee: Option<Box<Tee>> },
        // Read by a task at the origin's speed; the client is fed from `queue`.
        // `ended` once the reader said the body ended (or failed): a body polled again after
        // that answers `None`, as wrappers such as compression bodies expect.
        Driven { queue: Queue<B>, rest: Option<Pin<Box<B>>>, hint: SizeHint, ended: bool },
    }
}

/// What the reader task hands the client.
enum Fed<B> {
    Frame(Frame<Bytes>),
    /// The inner body ended: without it, a closed queue means the reader died.
    End,
    /// The inner body panicked while the reader polled it: the client's task panics too,
    /// as it would have polling the body itself (the connection is cut, never a body
    /// that looks whole).
    Panic(Box<dyn std::any::Any + Send>),
    /// The inner body's error (its type erased, so that `CacheBody<B>` needs no bound).
    Error(Box<dyn std::any::Any + Send>),
    /// Past the limit: the rest of the inner body, for the client to read itself.
    Rest(Pin<Box<B>>),
}

/// Reads `inner` to its end (or to the limit) into `tee`, handing every frame to the client.
/// By `deadline` the copy is given up: the client, if still there, reads the rest itself,
/// and a client that left no longer keeps a stalled origin body alive.
async fn read_for_fill<B>(
    mut inner: Pin<Box<B>>,
    mut tee: Tee,
    client: mpsc::UnboundedSender<Fed<B>>,
    deadline: tokio::time::Instant,
) where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Send + 'static,
{
    loop {
        let next = tokio::time::timeout_at(deadline, NextFrame(inner.as_mut())).await;
        let frame = match next {
            Err(_) => {
                // Too slow to wait for: no fill (the flight's waiters ask the origin).
                drop(tee);
                let _ = client.send(Fed::Rest(inner));
                return;
            }
            Ok(Err(panic)) => {
                let _ = client.send(Fed::Panic(panic));
                return;
            }
            Ok(Ok(next)) => next,
        };
        let frame = match frame {
            None => {
                tee.complete();
                let _ = client.send(Fed::End);
                return;
            }
            Some(Err(e)) => {
                let _ = client.send(Fed::Error(Box::new(e))); // the copy is dropped: not stored
                return;
            }
            Some(Ok(frame)) => frame.map_data(to_bytes),
        };
        let within = tee.observe(&frame);
        // A client that left is not waited for: the copy is still finished, for the fill.
        let _ = client.send(Fed::Frame(frame));
        if !within {
            let _ = client.send(Fed::Rest(inner));
            return;
        }
        if inner.is_end_stream() {
            tee.complete();
            let _ = client.send(Fed::End);
            return;
        }
    }
}

/// The next frame of a body, with a panic inside the body caught and returned.
struct NextFrame<'a, B>(Pin<&'a mut B>);

type Panicked = Box<dyn std::any::Any + Send>;

impl<B: Body> std::future::Future for NextFrame<'_, B> {
    type Output = Result<Option<Result<Frame<B::Data>, B::Error>>, Panicked>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let body = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body.poll_frame(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(frame)) => Poll::Ready(Ok(frame)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

impl<B: Body> CacheBody<B> {
    /// Whether a copy of this body is being kept for the store.
    pub(crate) fn is_filling(&self) -> bool {
        matches!(self.kind, Kind::Filling { .. } | Kind::Driven { .. })
    }

    pub(crate) fn stored(data: Bytes, trailers: Option<Box<HeaderMap>>) -> Self {
        CacheBody {
            kind: Kind::Stored {
                data: Some(data),
                trailers,
            },
        }
    }

    /// The body of a `304 Not Modified`.
    pub(crate) fn not_modified() -> Self {
        CacheBody {
            kind: Kind::NotModified {
                hint: SizeHint::default(),
            },
        }
    }

    pub(crate) fn passthrough(inner: B) -> Self {
        CacheBody {
            kind: Kind::Passthrough { inner },
        }
    }

    /// A body streamed to the client while a copy is kept; the copy is given up at
    /// `patience` from now if the origin has not finished by then.
    pub(crate) fn filling(inner: B, tee: Tee, patience: std::time::Duration) -> Self
    where
        B: Send + 'static,
        B::Data: Send,
        B::Error: Send + 'static,
    {
        if inner.is_end_stream() {
            // Nobody will poll an empty body: store it now.
            tee.complete();
            return Self::passthrough(inner);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return CacheBody {
                kind: Kind::Filling {
                    inner,
                    tee: Some(Box::new(tee)),
                },
            };
        };
        let hint = inner.size_hint();
        // What the body has ready now is read here: most handlers' bodies are whole at once,
        // need no reader task (nor a channel), and reach the client with the headers in one
        // write (a first poll that waited on a task would send the headers alone, and a
        // small body after them can then wait out a delayed ACK).
        let mut inner = Box::pin(inner);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut tee = tee;
        let mut queue = Queue::Held {
            data: None,
            ended: false,
        };
        loop {
            if inner.is_end_stream() {
                tee.complete();
                queue.push(Fed::End);
                break;
            }
            match inner.as_mut().poll_frame(&mut cx) {
                Poll::Pending => {
                    let deadline = tokio::time::Instant::now() + patience;
                    let client = queue.open_channel();
                    runtime.spawn(read_for_fill(inner, tee, client, deadline));
                    break;
                }
                Poll::Ready(None) => {
                    tee.complete();
                    queue.push(Fed::End);
                    break;
                }
                Poll::Ready(Some(Err(e))) => {
                    queue.push(Fed::Error(Box::new(e))); // not stored
                    break;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = frame.map_data(to_bytes);
                    let within = tee.observe(&frame);
                    queue.push(Fed::Frame(frame));
                    if !within {
                        queue.push(Fed::Rest(inner));
                        break;
                    }
                }
            }
        }
        CacheBody {
            kind: Kind::Driven {
                queue,
                rest: None,
                hint,
                ended: false,
            },
        }
    }
}

/// Where the client's frames come from: what `filling` read at once (one data frame, and
/// whether the body ended there), or a reader task's channel. Only data and the end are
/// held inline (anything else, rare, takes the channel), so that the body stays `Sync`
/// whenever the inner one is, as it was with the channel alone.
enum Queue<B> {
    Held {
        data: Option<Bytes>,
        ended: bool,
    },
    /// The sender, while `filling` still feeds it, and the receiver the client reads.
    Channel {
        tx: Option<mpsc::UnboundedSender<Fed<B>>>,
        rx: mpsc::UnboundedReceiver<Fed<B>>,
    },
}

impl<B> Queue<B> {
    /// Queues what comes next: held inline while that is one data frame and the end.
    fn push(&mut self, fed: Fed<B>) {
        if let Queue::Held { data, ended } = self {
            if !*ended {
                match fed {
                    Fed::Frame(frame) if data.is_none() && frame.is_data() => {
                        *data = frame.into_data().ok();
                        return;
                    }
                    Fed::End => {
                        *ended = true;
                        return;
                    }
                    fed => {
                        let _ = self.open_channel().send(fed);
                        return;
                    }
                }
            }
        }
        // Past the end (which `filling` never sends), or a channel already: in order.
        let _ = self.open_channel().send(fed);
    }

    /// Turns what is held into a channel (in order) and returns its sender, for a reader
    /// task (or `filling`) to go on feeding; the queue keeps a clone until it is read.
    fn open_channel(&mut self) -> mpsc::UnboundedSender<Fed<B>> {
        if let Queue::Channel { tx: Some(tx), .. } = self {
            return tx.clone();
        }
        debug_assert!(
            matches!(self, Queue::Held { .. }),
            "nothing is queued once the client reads"
        );
        let (tx, rx) = mpsc::unbounded_channel();
        if let Queue::Held { data, ended } = self {
            if let Some(d) = data.take() {
                let _ = tx.send(Fed::Frame(Frame::data(d)));
            }
            if *ended {
                let _ = tx.send(Fed::End);
            }
        }
        *self = Queue::Channel {
            tx: Some(tx.clone()),
            rx,
        };
        tx
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Fed<B>>> {
        match self {
            Queue::Held { data, ended } => Poll::Ready(match data.take() {
                Some(d) => Some(Fed::Frame(Frame::data(d))),
                None if *ended => Some(Fed::End),
                // Cannot happen: `filling` holds only a body that ended.
                None => None,
            }),
            Queue::Channel { tx, rx } => {
                // The queue's own sender must not keep the channel open once the reader
                // task (or `filling`) is done with it.
                tx.take();
                rx.poll_recv(cx)
            }
        }
    }
}

fn to_bytes<D: Buf>(mut d: D) -> Bytes {
    d.copy_to_bytes(d.remaining())
}

impl<B> Body for CacheBody<B>
where
    B: Body,
    B::Error: 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Stored { data, trailers } => {
                if let Some(d) = data.take().filter(|d| !d.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))))
            }
            KindProj::NotModified { .. } => Poll::Ready(None),
            KindProj::Passthrough { inner } => inner
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map(|f| f.map_data(to_bytes)))),
            KindProj::Filling { mut inner, tee } => {
                let polled = ready!(inner.as_mut().poll_frame(cx));
                let polled = polled.map(|r| r.map(|f| f.map_data(to_bytes)));
                match &polled {
                    Some(Ok(frame)) => {
                        if tee.as_mut().is_some_and(|t| !t.observe(frame)) {
                            *tee = None;
                        }
                        // hyper stops polling once the body says it ended: finish here.
                        if inner.is_end_stream() {
                            if let Some(t) = tee.take() {
                                t.complete();
                            }
                        }
                    }
                    Some(Err(_)) => *tee = None,
                    None => {
                        if let Some(t) = tee.take() {
                            t.complete();
                        }
                    }
                }
                Poll::Ready(polled)
            }
            KindProj::Driven {
                queue, rest, ended, ..
            } => {
                if *ended {
                    return Poll::Ready(None);
                }
                if let Some(inner) = rest {
                    let polled = ready!(inner.as_mut().poll_frame(cx));
                    *ended = polled.is_none();
                    return Poll::Ready(polled.map(|r| r.map(|f| f.map_data(to_bytes))));
                }
                match ready!(queue.poll_recv(cx)) {
                    Some(Fed::Frame(frame)) => Poll::Ready(Some(Ok(frame))),
                    Some(Fed::Error(e)) => {
                        *ended = true;
                        match e.downcast::<B::Error>() {
                            Ok(e) => Poll::Ready(Some(Err(*e))),
                            Err(_) => Poll::Ready(None), // cannot happen: the reader sends B::Error
                        }
                    }
                    Some(Fed::Rest(inner)) => {
                        let inner = rest.insert(inner);
                        let polled = ready!(inner.as_mut().poll_frame(cx));
                        *ended = polled.is_none();
                        Poll::Ready(polled.map(|r| r.map(|f| f.map_data(to_bytes))))
                    }
                    Some(Fed::End) => {
                        *ended = true;
                        Poll::Ready(None)
                    }
                    Some(Fed::Panic(panic)) => std::panic::resume_unwind(panic),
                    // The reader was cancelled (the runtime is shutting down): never let a
                    // cut body look whole.
                    None => panic!("the body's reader task ended before the body did"),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Stored { data, trailers } => {
                data.as_ref().is_none_or(|d| d.is_empty()) && trailers.is_none()
            }
            Kind::NotModified { .. } => true,
            Kind::Passthrough { inner } | Kind::Filling { inner, .. } => inner.is_end_stream(),
            Kind::Driven { rest, ended, .. } => {
                *ended || rest.as_ref().is_some_and(|r| r.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Stored { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::NotModified { hint } => *hint,
            Kind::Passthrough { inner } | Kind::Filling { inner, .. } => inner.size_hint(),
            Kind::Driven { hint, .. } => *hint,
        }
    }
}

impl<B> std::fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match &self.kind {
            Kind::Stored { .. } => "CacheBody::Stored",
            Kind::NotModified { .. } => "CacheBody::NotModified",
            Kind::Passthrough { .. } => "CacheBody::Passthrough",
            Kind::Filling { .. } => "CacheBody::Filling",
            Kind::Driven { .. } => "CacheBody::Driven",
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    type Stored = Arc<Mutex<Option<Bytes>>>;

    fn tee(stored: &Stored, limit: usize) -> Tee {
        let stored = stored.clone();
        let stats = CacheStats::new(Arc::new(crate::breaker::Breaker::new(
            3,
            std::time::Duration::from_secs(1),
        )));
        Tee::new(
            limit,
            stats,
            Box::new(move |body, _| *stored.lock().unwrap() = Some(body)),
        )
    }

    fn ready_body(chunks: &[&'static str]) -> impl Body<Data = Bytes, Error = Infallible> {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[test]
    fn the_body_is_as_sync_as_the_inner_one() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<CacheBody<http_body_util::Full<Bytes>>>();
    }

    /// Bodies whole at once (no frame, one, several) reach the client in order and whole,
    /// and the copy is kept; one over the limit reaches the client whole and is not kept.
    #[tokio::test]
    async fn bodies_ready_at_once_reach_the_client_in_order() {
        let cases: [(&[&str], usize, bool); 5] = [
            (&[], 100, true),
            (&["one"], 100, true),
            (&["one", "two", "three"], 100, true),
            (&["one", "two"], 4, false),
            (&["toolong"], 4, false),
        ];
        for (chunks, limit, kept) in cases {
            let stored = Stored::default();
            let body = CacheBody::filling(
                ready_body(chunks),
                tee(&stored, limit),
                std::time::Duration::from_secs(1),
            );
            let read = body.collect().await.unwrap().to_bytes();
            assert_eq!(read, chunks.concat().as_bytes(), "{chunks:?}");
            let copy = stored.lock().unwrap().take();
            assert_eq!(copy.is_some(), kept, "{chunks:?} within {limit}");
            if kept {
                assert_eq!(copy.unwrap(), chunks.concat().as_bytes());
            }
        }
    }

    /// A body whose first frame is ready and whose rest comes later is still copied whole
    /// (the reader task takes over from what was held) while its client reads nothing.
    #[tokio::test]
    async fn the_copy_lands_while_the_client_reads_nothing() {
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let frames = futures_util::stream::unfold((0, Some(released)), |(i, rx)| async move {
            let (data, rx) = match i {
                0 => ("first", rx),
                1 => {
                    rx?.await.ok()?;
                    ("second", None)
                }
                _ => return None,
            };
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(data))),
                (i + 1, rx),
            ))
        });
        let stored = Stored::default();
        let body = CacheBody::filling(
            StreamBody::new(frames),
            tee(&stored, 100),
            std::time::Duration::from_secs(5),
        );
        release.send(()).unwrap();
        for _ in 0..200 {
            if stored.lock().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(stored.lock().unwrap().take().unwrap(), "firstsecond");
        drop(body);
    }

    /// An error after a frame read at once reaches the client after that frame.
    #[tokio::test]
    async fn an_error_read_at_once_follows_the_frame_before_it() {
        let frames: Vec<Result<Frame<Bytes>, &'static str>> =
            vec![Ok(Frame::data(Bytes::from_static(b"a"))), Err("broken")];
        let stored = Stored::default();
        let mut body = CacheBody::filling(
            StreamBody::new(futures_util::stream::iter(frames)),
            tee(&stored, 100),
            std::time::Duration::from_secs(1),
        );
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        assert_eq!(body.frame().await.unwrap().unwrap_err(), "broken");
        assert!(
            stored.lock().unwrap().is_none(),
            "a broken body is not kept"
        );
    }
}
