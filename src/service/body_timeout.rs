//! A bound on how long a request's body may take to arrive: a client that opens calls and
//! sends their bodies slowly, or not at all, would otherwise hold what arrived of each (up to a
//! message's size) for as long as it liked. Past `--request-body-timeout`, the body fails, and
//! the call with it.
//!
//! Every request is bounded but a peer's long-lived `ReplicateStream`, which may rightly go
//! quiet for hours between messages (and which only the cluster's nodes may call when the
//! cluster has a token or a CA). A reflection session is bounded like a call: the tools that
//! use it send their requests at once and close.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

/// The methods whose requests are streams that may pause.
const STREAMING_REQUESTS: [&str; 1] = ["/kvstore.v1.Replicator/ReplicateStream"];

/// The layer, for `Server::builder().layer(...)`.
#[derive(Clone, Copy, Debug)]
pub struct BodyTimeout {
    pub timeout: Duration,
}

impl<S> tower_layer::Layer<S> for BodyTimeout {
    type Service = BodyTimeoutService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyTimeoutService {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone, Debug)]
pub struct BodyTimeoutService<S> {
    inner: S,
    timeout: Duration,
}

impl<S, ReqBody> tower_service::Service<http::Request<ReqBody>> for BodyTimeoutService<S>
where
    S: tower_service::Service<http::Request<TimedBody<ReqBody>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let streaming = STREAMING_REQUESTS.contains(&request.uri().path());
        let timeout = self.timeout;
        self.inner.call(request.map(|inner| TimedBody {
            inner,
            deadline: (!streaming).then(|| Box::pin(tokio::time::sleep(timeout))),
            timeout,
        }))
    }
}

/// A request body that fails if it has not all arrived by its deadline.
pub struct TimedBody<B> {
    inner: B,
    deadline: Option<Pin<Box<Sleep>>>,
    timeout: Duration,
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if frame.is_none() {
                this.deadline = None;
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.deadline = None;
            let message = format!(
                "the request's body did not arrive within {} (--request-body-timeout)",
                humantime::format_duration(this.timeout)
            );
            // A Status, which tonic finds in the error and sends as it is.
            return Poll::Ready(Some(Err(Box::new(tonic::Status::deadline_exceeded(
                message,
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
