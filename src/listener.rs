//! The connections a node accepts, bounded: at most `--max-connections` at once (one past it is
//! closed as it arrives), each closed once its client has sent nothing for `--idle-timeout`,
//! and, once the node begins to stop, closed at once if its client never sent a byte (a
//! connection opened and left silent must not hold the stop for its whole grace).
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
    /// Connections closed for want of room, since the last warning about it.
    refused: Arc<AtomicU64>,
    last_warning: Option<Instant>,
}

impl Incoming {
    pub fn new(
        inner: TcpIncoming,
        max: usize,
        idle_timeout: Duration,
        stopped: watch::Receiver<bool>,
    ) -> Self {
        Self {
            inner,
            room: Arc::new(Semaphore::new(max)),
            max,
            idle_timeout,
            stopped,
            refused: Arc::default(),
            last_warning: None,
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
            let stream = match std::task::ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                Some(Ok(stream)) => stream,
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => return Poll::Ready(None),
            };
            match self.room.clone().try_acquire_owned() {
                Ok(permit) => {
                    let conn = Conn::new(stream, permit, self.idle_timeout, self.stopped.clone());
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
    /// When the connection counts as idle if nothing more is read.
    idle: Pin<Box<Sleep>>,
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
        mut stopped: watch::Receiver<bool>,
    ) -> Self {
        Self {
            io,
            _room: room,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
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
        // whose client has said nothing for the idle timeout.
        if (this.stopped && !this.spoke) || this.idle.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.spoke = true;
            let at = Instant::now() + this.idle_timeout;
            this.idle.as_mut().reset(at);
        }
        read
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
