//! A hand-written tonic service (no protoc needed) for the gRPC example and its test:
//! `demo.Events` with a cacheable `GetEvent` and a mutating `UpdateEvent`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;
use tower_cache_aside::{CacheHint, InvalidateTags, RoutePolicy, RouteTable};

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetEventRequest {
    #[prost(int64, tag = "1")]
    pub id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateEventRequest {
    #[prost(int64, tag = "1")]
    pub id: i64,
    #[prost(string, tag = "2")]
    pub status: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(int64, tag = "1")]
    pub id: i64,
    #[prost(string, tag = "2")]
    pub status: String,
    #[prost(int64, tag = "3")]
    pub version: i64,
}

pub const GET_EVENT: &str = "/demo.Events/GetEvent";
pub const UPDATE_EVENT: &str = "/demo.Events/UpdateEvent";

/// The caching policy: `GetEvent` is an idempotent read, cached per request message for
/// 300 s and tagged by the handler; `UpdateEvent` is a mutation whose handler names the tag.
pub fn grpc_routes() -> RouteTable {
    RouteTable::new()
        .route(GET_EVENT, RoutePolicy::ttl(Duration::from_secs(300)).grpc())
        .route(UPDATE_EVENT, RoutePolicy::never())
        .fallback(RoutePolicy::never())
}

/// Events 1 to 100, and how many calls reached the service.
#[derive(Clone, Default)]
pub struct Events {
    store: Arc<Mutex<HashMap<i64, Event>>>,
    pub calls: Arc<AtomicUsize>,
}

impl Events {
    pub fn seeded() -> Self {
        let events = (1..=100)
            .map(|id| {
                (
                    id,
                    Event {
                        id,
                        status: "open".into(),
                        version: 1,
                    },
                )
            })
            .collect();
        Events {
            store: Arc::new(Mutex::new(events)),
            calls: Arc::default(),
        }
    }
}

impl NamedService for Events {
    const NAME: &'static str = "demo.Events";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

struct GetEvent(Events);

impl UnaryService<GetEventRequest> for GetEvent {
    type Response = Event;
    type Future = BoxFuture<Result<Response<Event>, Status>>;

    fn call(&mut self, request: Request<GetEventRequest>) -> Self::Future {
        let events = self.0.clone();
        Box::pin(async move {
            events.calls.fetch_add(1, Ordering::SeqCst);
            let id = request.get_ref().id;
            let found = events.store.lock().unwrap().get(&id).cloned();
            let event = found.ok_or_else(|| Status::not_found(format!("no event {id}")))?;
            let mut response = Response::new(event);
            // Tag the cached response so that UpdateEvent can clear it.
            response
                .extensions_mut()
                .insert(CacheHint::default().tag(format!("event:{id}")));
            Ok(response)
        })
    }
}

struct UpdateEvent(Events);

impl UnaryService<UpdateEventRequest> for UpdateEvent {
    type Response = Event;
    type Future = BoxFuture<Result<Response<Event>, Status>>;

    fn call(&mut self, request: Request<UpdateEventRequest>) -> Self::Future {
        let events = self.0.clone();
        Box::pin(async move {
            events.calls.fetch_add(1, Ordering::SeqCst);
            let change = request.into_inner();
            let updated = {
                let mut store = events.store.lock().unwrap();
                let event = store
                    .get_mut(&change.id)
                    .ok_or_else(|| Status::not_found("no such event"))?;
                event.status = change.status;
                event.version += 1;
                event.clone()
            };
            let mut response = Response::new(updated);
            response
                .extensions_mut()
                .insert(InvalidateTags::new([format!("event:{}", change.id)]));
            Ok(response)
        })
    }
}

impl tower::Service<http::Request<Body>> for Events {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let events = self.clone();
        Box::pin(async move {
            Ok(match req.uri().path() {
                GET_EVENT => {
                    Grpc::new(ProstCodec::default())
                        .unary(GetEvent(events), req)
                        .await
                }
                UPDATE_EVENT => {
                    Grpc::new(ProstCodec::default())
                        .unary(UpdateEvent(events), req)
                        .await
                }
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// A minimal client for the two methods, returning the message and the `x-cache` header.
pub struct EventsClient(tonic::client::Grpc<tonic::transport::Channel>);

impl EventsClient {
    pub async fn connect(addr: std::net::SocketAddr) -> Result<Self, tonic::transport::Error> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        Ok(EventsClient(tonic::client::Grpc::new(channel)))
    }

    async fn call<M: prost::Message + 'static>(
        &mut self,
        path: &'static str,
        message: M,
    ) -> Result<(Event, String), Status> {
        self.0
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let codec: ProstCodec<M, Event> = ProstCodec::default();
        let response = self
            .0
            .unary(
                Request::new(message),
                http::uri::PathAndQuery::from_static(path),
                codec,
            )
            .await?;
        let x_cache = response
            .metadata()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        Ok((response.into_inner(), x_cache))
    }

    pub async fn get_event(&mut self, id: i64) -> Result<(Event, String), Status> {
        self.call(GET_EVENT, GetEventRequest { id }).await
    }

    pub async fn update_event(&mut self, id: i64, status: &str) -> Result<(Event, String), Status> {
        self.call(
            UPDATE_EVENT,
            UpdateEventRequest {
                id,
                status: status.into(),
            },
        )
        .await
    }
}
