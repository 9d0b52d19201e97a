//! The connections a node accepts, bounded: at most `--max-connections` at once (one past it is
//! closed as it arrives), each closed once its client has sent nothing for `--idle-timeout`
//! (or, before its first byte, for `--request-body-timeout`), and, once the node begins to
//! stop, closed at once if its client never sent a byte (a connection opened and left silent
//! must not hold the stop for its whole grace).
//!
//! A live client is never idle for long: the node pings every connection over HTTP/2 (see
//! [`crate::server`]), and the client's answers are bytes received.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// Accepted connections, within the bound.
pub struct Incoming {
    inner: TcpIncoming,
    room: Arc<Semaphore>,
    max: usize,
    idle_timeout: Duration,
    stopped: watch::Receiver<bool>,
    /// How long a new connection may stay silent.
    first_byte_timeout: Duration,
    /// Connections closed for want of room, since the last warning about it.
    refused: Arc<AtomicU64>,
    last_warning: Option<Instant>,
    /// Set after an accept failed: no accepting until it is over.
    pause: Option<Pin<Box<Sleep>>>,
    last_accept_warning: Option<Instant>,
}

/// How long to wait after an accept fails before the next.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

impl Incoming {
    /// Connections from `inner`: at most `max` at once, each closed once its client has sent
    /// nothing for `idle_timeout`, or nothing at all for `first_byte_timeout`.
    pub fn new(
        inner: TcpIncoming,
        max: usize,
        idle_timeout: Duration,
        first_byte_timeout: Duration,
        stopped: watch::Receiver<bool>,
    ) -> Self {
        Self {
            inner,
            room: Arc::new(Semaphore::new(max)),
            max,
            idle_timeout,
            first_byte_timeout,
            stopped,
            refused: Arc::default(),
            last_warning: None,
            pause: None,
            last_accept_warning: None,
        }
    }

    /// Says, at most every ten seconds, that accepting failed.
    fn accept_failed(&mut self, error: io::Error) {
        let due = self
            .last_accept_warning
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(10));
        if due {
            self.last_accept_warning = Some(Instant::now());
            tracing::warn!(%error, "accepting a connection failed; pausing before the next");
        }
    }

    /// Says, at most every ten seconds, that connections are being closed for want of room.
    fn refused_one(&mut self, peer: Option<std::net::SocketAddr>) {
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let due = self
            .last_warning
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(10));
        if due {
            self.refused.store(0, Ordering::Relaxed);
            self.last_warning = Some(Instant::now());
            tracing::warn!(
                max_connections = self.max,
                refused,
                last_from = ?peer,
                "at the connection limit (--max-connections): closing new connections"
            );
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = &mut self.pause {
                std::task::ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            let stream = match std::task::ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                Some(Ok(stream)) => stream,
                // Out of file descriptors, say: the listener stays readable, so trying again
                // at once would spin. Wait a moment instead (connections close meanwhile).
                Some(Err(error)) => {
                    self.accept_failed(error);
                    self.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_PAUSE)));
                    continue;
                }
                None => return Poll::Ready(None),
            };
            match self.room.clone().try_acquire_owned() {
                Ok(permit) => {
                    let conn = Conn::new(
                        stream,
                        permit,
                        self.idle_timeout,
                        self.first_byte_timeout,
                        self.stopped.clone(),
                    );
                    return Poll::Ready(Some(Ok(conn)));
                }
                // Dropped, so closed: the client sees its connection reset and may retry.
                Err(_) => {
                    let peer = stream.peer_addr().ok();
                    drop(stream);
                    self.refused_one(peer);
                }
            }
        }
    }
}

/// One accepted connection.
pub struct Conn {
    io: TcpStream,
    _room: OwnedSemaphorePermit,
    idle_timeout: Duration,
    first_byte_timeout: Duration,
    /// Fires at the latest when the connection may have become idle: then the last read
    /// says whether it has.
    idle: Pin<Box<Sleep>>,
    last_read: Instant,
    /// Whether the client has sent anything at all.
    spoke: bool,
    stopping: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    stopped: bool,
}

impl Conn {
    fn new(
        io: TcpStream,
        room: OwnedSemaphorePermit,
        idle_timeout: Duration,
        first_byte_timeout: Duration,
        mut stopped: watch::Receiver<bool>,
    ) -> Self {
        Self {
            io,
            _room: room,
            idle_timeout,
            first_byte_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout.min(first_byte_timeout))),
            last_read: Instant::now(),
            spoke: false,
            stopping: Box::pin(async move {
                let _ = stopped.wait_for(|s| *s).await;
            }),
            stopped: false,
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.stopped && this.stopping.as_mut().poll(cx).is_ready() {
            this.stopped = true;
        }
        // The end of input closes the connection: a silent one once the node stops, and one
        // whose client has said nothing for the idle timeout (or, before its first byte, for
        // the first-byte timeout).
        if this.stopped && !this.spoke {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.spoke = true;
                this.last_read = Instant::now();
                return Poll::Ready(Ok(()));
            }
            Poll::Pending => {}
            // The client closed it, or it failed.
            done => return done,
        }
        // Nothing to read now: is the connection idle? The timer is moved only when it fires,
        // to the last read's deadline, rather than on every read: a busy connection reads
        // thousands of times a second.
        while this.idle.as_mut().poll(cx).is_ready() {
            let silence = match this.spoke {
                true => this.idle_timeout,
                false => this.idle_timeout.min(this.first_byte_timeout),
            };
            let due = this.last_read + silence;
            if due <= Instant::now() {
                return Poll::Ready(Ok(()));
            }
            this.idle.as_mut().reset(due);
        }
        Poll::Pending
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
