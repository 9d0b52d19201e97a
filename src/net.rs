//! What the node and its clients share on the network: the address forms they accept, the
//! channels they open, and the words for a call that failed on the way.

use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::error::Error;

/// How often an HTTP/2 ping goes out while a call is open, and how long its answer may take
/// before the connection is given up. Without them a connection whose other end vanished
/// (a host gone, not a process) stays "open" until the kernel gives up on it, minutes later;
/// the peer links' long-lived replication streams would sit on it.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A node's address as given on a command line: a bare port means 127.0.0.1 (the original Go
/// system's convention); otherwise it must be `host:port`. Names are not resolved here: a peer
/// may be down or not yet in DNS at start.
pub fn parse_addr(addr: &str) -> Result<String, Error> {
    let addr = addr.trim();
    let bad = |reason: &str| Error::InvalidAddress {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    if let Ok(port) = addr.parse::<u16>() {
        return Ok(format!("127.0.0.1:{port}"));
    }
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port or a port"))?;
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    port.parse::<u16>()
        .map_err(|_| bad("port must be a number from 0 to 65535"))?;
    Ok(addr.to_string())
}

/// A channel to `addr` (`host:port`) that connects on first use and reconnects by itself, so it
/// can be made while the other side is down. Shared by the client and the node's peer links.
/// With `tls`, the other side's certificate must be valid for the host of `addr`, a name or an
/// IP address.
pub fn lazy_channel(
    addr: &str,
    connect_timeout: Duration,
    call_timeout: Duration,
    tls: Option<&ClientTlsConfig>,
) -> Result<Channel, Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let bad = |reason: String| Error::InvalidAddress {
        addr: addr.to_string(),
        reason,
    };
    let mut endpoint =
        Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| bad(e.to_string()))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| bad(format!("TLS: {e}")))?;
    }
    Ok(endpoint
        .connect_timeout(connect_timeout)
        .timeout(call_timeout)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Whether a call failed on the way, not at the other end: the status was made here, by the
/// transport, from an error it carries (a refused or broken connection), rather than sent by
/// the node.
pub fn failed_on_the_way(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// Whether a call ran out of time, rather than failing otherwise: a deadline, or the client's
/// own timeout (which tonic reports as CANCELLED). A connection closed under a call is
/// CANCELLED too, and is not a timeout.
pub fn timed_out(status: &Status) -> bool {
    match status.code() {
        Code::DeadlineExceeded => true,
        Code::Cancelled => {
            let mut source = std::error::Error::source(status);
            while let Some(err) = source {
                if err.is::<tonic::TimeoutExpired>() {
                    return true;
                }
                source = err.source();
            }
            // Said by the other end, or timed out without saying why.
            !failed_on_the_way(status)
        }
        _ => false,
    }
}

/// A short, stable reason for a failed call: the underlying I/O error where there is one
/// ("connection refused"; a TLS failure's own words, "received fatal alert: UnknownCA"), else
/// the innermost cause ("connection closed before message completed"), else the status
/// message. tonic's own messages for transport failures ("tcp connect error", "transport
/// error") say less than the cause they wrap.
pub fn status_reason(status: &Status) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    let mut innermost = None;
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return match io.get_ref() {
                Some(inner) => inner.to_string(),
                None => io.kind().to_string(),
            };
        }
        innermost = Some(err);
        source = err.source();
    }
    innermost.map_or_else(|| status.message().to_string(), ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_a_port_or_host_and_port() {
        assert_eq!(parse_addr("5001").unwrap(), "127.0.0.1:5001");
        assert_eq!(parse_addr(" db2:5001 ").unwrap(), "db2:5001");
        assert_eq!(parse_addr("[::1]:5001").unwrap(), "[::1]:5001");
        for (bad, why) in [
            ("db2", "host:port"),
            (":5001", "missing host"),
            ("db2:99999", "0 to 65535"),
        ] {
            let err = parse_addr(bad).unwrap_err().to_string();
            assert!(
                err.contains(&format!("'{bad}'")) && err.contains(why),
                "{err}"
            );
        }
    }

    #[test]
    fn a_status_sent_by_the_node_did_not_fail_on_the_way() {
        let sent = Status::unavailable("quorum read: 1 of 3 nodes answered");
        assert!(!failed_on_the_way(&sent));
        assert_eq!(status_reason(&sent), "quorum read: 1 of 3 nodes answered");
    }
}
