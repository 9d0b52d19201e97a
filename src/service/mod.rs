//! The node's gRPC services. Each handler validates its input, sends one message to the
//! node's actors, and maps the reply to a response; the logic lives in the actors.

pub mod kv;
pub mod replicator;
pub mod request_errors;
