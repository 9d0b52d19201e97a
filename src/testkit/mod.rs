//! Tools for testing kvstore the way it fails in production: real node processes that can be
//! killed with SIGKILL and restarted on their data, TCP proxies between nodes that can cut
//! (partition) and heal links, and the seeded chaos run built from both. Used by the tests in
//! `tests/` and by `cargo xtask chaos`. Everything binds loopback addresses only.

pub mod chaos;
pub mod process;
pub mod proxy;

pub use process::ProcessCluster;
pub use proxy::Proxy;
