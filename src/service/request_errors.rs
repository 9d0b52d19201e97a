//! Requests that never reach a handler: a message over the node's size limit, or one that does
//! not decode. tonic answers those itself, with OUT_OF_RANGE and INTERNAL; this layer gives
//! them the codes a client can act on, and says what was wrong and which limit applies:
//! - a message over the receive limit is RESOURCE_EXHAUSTED, as grpc-go and grpc-java answer
//!   it, naming the limit and the flags it comes from;
//! - a message that does not decode (invalid UTF-8 in a string field, a truncated message, a
//!   bad wire type) is INVALID_ARGUMENT: the request is wrong, the node is fine.
//!
//! tonic refuses such a request before any handler runs and answers with the status in the
//! response's headers (a trailers-only response), which is where this layer finds it. A
//! streaming request meets the same errors in the middle of its stream, inside the handler,
//! which maps them with [`explain`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::{Code, Status};

/// The layer, for `Server::builder().layer(...)`.
#[derive(Clone, Copy, Debug)]
pub struct RequestErrors {
    /// The node's limit on one message, in bytes.
    pub max_message_bytes: usize,
}

impl<S> tower_layer::Layer<S> for RequestErrors {
    type Service = RequestErrorsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestErrorsService {
            inner,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

/// A service whose refusals of undecodable requests say what was wrong.
#[derive(Clone, Debug)]
pub struct RequestErrorsService<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for RequestErrorsService<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = request.uri().path().to_string();
        let limit = self.max_message_bytes;
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            let headers = response.headers_mut();
            if let Some(status) = Status::from_header_map(headers)
                && let Some(better) = explain(&status, &method, limit)
            {
                for header in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                    headers.remove(header);
                }
                // Only fails for a message that cannot be a header, which ours always can.
                let _ = better.add_header(headers);
            }
            Ok(response)
        })
    }
}

/// The status to answer instead of `status`, tonic's refusal of a request to `method`, if it
/// is one of those this module is about (see the module's doc).
pub fn explain(status: &Status, method: &str, max_message_bytes: usize) -> Option<Status> {
    let message = status.message();
    match status.code() {
        Code::OutOfRange if message.starts_with("Error, decoded message length too large") => {
            let size = message
                .split("found ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .map_or_else(String::new, |n| format!(" of {n} bytes"));
            Some(Status::resource_exhausted(format!(
                "{method}: a request message{size} is over this node's limit of \
                 {max_message_bytes} bytes for one message (--max-key-bytes plus \
                 --max-value-bytes plus 64 KiB)"
            )))
        }
        Code::Internal
            if message.starts_with("failed to decode Protobuf message")
                || message.starts_with("Unexpected EOF")
                || message.starts_with("protocol error: received message") =>
        {
            Some(Status::invalid_argument(format!(
                "{method}: the request does not decode: {message}"
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_of_undecodable_requests_say_what_was_wrong() {
        let big = Status::out_of_range(
            "Error, decoded message length too large: found 4194305 bytes, the limit is: \
             1118208 bytes",
        );
        let said = explain(&big, "/kvstore.v1.KVStore/Put", 1_118_208).unwrap();
        assert_eq!(said.code(), Code::ResourceExhausted);
        assert!(
            said.message().contains("of 4194305 bytes")
                && said.message().contains("limit of 1118208 bytes")
                && said.message().contains("--max-value-bytes"),
            "{said:?}"
        );
        let garbled = Status::internal(
            "failed to decode Protobuf message: KeyValue.key: invalid string value: data is \
             not UTF-8 encoded",
        );
        let said = explain(&garbled, "/kvstore.v1.KVStore/Put", 1).unwrap();
        assert_eq!(said.code(), Code::InvalidArgument);
        assert!(said.message().contains("not UTF-8"), "{said:?}");
        // Statuses of the node's own making are left as they are.
        for own in [
            Status::internal("a bug"),
            Status::out_of_range("something else"),
            Status::not_found("key not found: k"),
        ] {
            assert!(explain(&own, "/m", 1).is_none(), "{own:?}");
        }
    }
}
