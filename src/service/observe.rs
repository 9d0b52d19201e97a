//! The outermost layer of the node's server: it answers `GET /metrics` (HTTP/1.1 or HTTP/2, in
//! the clear or over TLS, on the node's one port, as etcd serves metrics on its client URL)
//! and records every other call's method, status code and duration.
//!
//! A gRPC call's status is in its response headers when it fails before any message (a
//! trailers-only response), else in the trailers after the last message; the layer reads it
//! from wherever it comes, and counts a call whose body is dropped before its trailers (the
//! client went away) as CANCELLED.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::{Code, Status};

use crate::metrics::{MethodMetrics, NodeMetrics};

/// Renders the exposition when a scrape comes.
pub type Scrape = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// The layer, for `Server::builder().layer(...)`, outermost so that it sees the status the
/// client gets.
#[derive(Clone)]
pub struct Observe {
    pub metrics: Arc<NodeMetrics>,
    pub scrape: Scrape,
}

impl<S> tower_layer::Layer<S> for Observe {
    type Service = ObserveService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ObserveService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ObserveService<S> {
    inner: S,
    layer: Observe,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for ObserveService<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Observed<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if request.uri().path() == "/metrics" && !is_grpc(&request) {
            let scrape = self.layer.scrape.clone();
            let get = request.method() == http::Method::GET;
            return Box::pin(async move {
                Ok(if get {
                    scraped(scrape().await)
                } else {
                    not_get()
                })
            });
        }
        let method = self.layer.metrics.rpc.method(request.uri().path());
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let mut call = Some(Call { method, started });
            // A trailers-only response: the status is all there is.
            if let Some(status) = Status::from_header_map(response.headers())
                && let Some(call) = call.take()
            {
                call.finish(status.code());
            }
            Ok(response.map(|inner| Observed::Call { inner, call }))
        })
    }
}

fn is_grpc<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"))
}

fn scraped<B>(text: String) -> http::Response<Observed<B>> {
    http::Response::builder()
        .header(http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)
        .body(Observed::Text(Some(Bytes::from(text))))
        .expect("a valid response")
}

fn not_get<B>() -> http::Response<Observed<B>> {
    http::Response::builder()
        .status(http::StatusCode::METHOD_NOT_ALLOWED)
        .header(http::header::ALLOW, "GET")
        .body(Observed::Text(Some(Bytes::from_static(
            b"/metrics answers GET only\n",
        ))))
        .expect("a valid response")
}

/// A call being answered, recorded once when it ends.
pub struct Call {
    method: Arc<MethodMetrics>,
    started: Instant,
}

impl Call {
    fn finish(self, code: Code) {
        self.method.record(code, self.started.elapsed());
    }
}

/// A response body: a call's, watched for its status, or the exposition.
pub enum Observed<B> {
    Call { inner: B, call: Option<Call> },
    Text(Option<Bytes>),
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        // Dropped before its trailers: the client cancelled, or the connection went.
        if let Observed::Call { call, .. } = self
            && let Some(call) = call.take()
        {
            call.finish(Code::Cancelled);
        }
    }
}

impl<B> Body for Observed<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.get_mut() {
            Observed::Text(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
            Observed::Call { inner, call } => {
                let frame = std::task::ready!(Pin::new(inner).poll_frame(cx));
                match &frame {
                    Some(Ok(frame)) => {
                        if let Some(trailers) = frame.trailers_ref()
                            && let Some(call) = call.take()
                        {
                            let status = Status::from_header_map(trailers);
                            call.finish(status.map_or(Code::Unknown, |s| s.code()));
                        }
                    }
                    // The body failed: the client sees a reset stream.
                    Some(Err(_)) => {
                        if let Some(call) = call.take() {
                            call.finish(Code::Unknown);
                        }
                    }
                    None => {
                        if let Some(call) = call.take() {
                            call.finish(Code::Unknown);
                        }
                    }
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Observed::Text(text) => text.is_none(),
            Observed::Call { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Observed::Text(Some(text)) => SizeHint::with_exact(text.len() as u64),
            Observed::Text(None) => SizeHint::with_exact(0),
            Observed::Call { inner, .. } => inner.size_hint(),
        }
    }
}
