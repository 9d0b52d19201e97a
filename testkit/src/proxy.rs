//! A fault-injecting TCP proxy: forwards a loopback port to a node until told to cut the link.
//! Cutting drops every open connection and refuses new ones (accepts and closes at once, as a
//! partitioned network's RST would), so both sides see the peer as unreachable. It can also
//! delay what it forwards, for a link with latency where the kernel has no netem.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One proxied link, e.g. node 1's connection to node 3.
pub struct Proxy {
    addr: SocketAddr,
    /// Where connections go: settable, since a restarted node may listen somewhere new.
    target: Arc<Mutex<SocketAddr>>,
    cut: Arc<AtomicBool>,
    /// Bumped on every cut, so connection tasks notice and drop their sockets.
    epoch: watch::Sender<u64>,
    /// Latency added each way: a base and a jitter.
    delay: Arc<Mutex<Option<(Duration, Duration)>>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free loopback port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into(), target).await
    }

    /// A proxy on a free port of `ip` (a bridge between network namespaces, say).
    pub async fn start_on(ip: std::net::IpAddr, target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let (epoch, _) = watch::channel(0u64);
        let target = Arc::new(Mutex::new(target));
        let delay = Arc::new(Mutex::new(None));
        let task = {
            let cut = cut.clone();
            let epoch = epoch.clone();
            let target = target.clone();
            let delay = delay.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    // Subscribed first: a cut between the check and here still ends it.
                    let mut cuts = epoch.subscribe();
                    if cut.load(Ordering::Acquire) {
                        drop(client);
                        continue;
                    }
                    let target = *target.lock().unwrap_or_else(PoisonError::into_inner);
                    let delay = *delay.lock().unwrap_or_else(PoisonError::into_inner);
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(target).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        tokio::select! {
                            _ = forward(client, server, delay) => {}
                            _ = cuts.changed() => {}
                        }
                    });
                }
            })
        };
        Ok(Self {
            addr,
            target,
            cut,
            epoch,
            delay,
            task,
        })
    }

    /// Delays every byte by `base` plus or minus up to `jitter`, each way (None: no delay).
    /// Open connections are dropped, so that it holds for all from now on. Order is kept,
    /// as TCP's is: a chunk never overtakes the one before it.
    pub fn set_delay(&self, delay: Option<(Duration, Duration)>) {
        *self.delay.lock().unwrap_or_else(PoisonError::into_inner) = delay;
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Where to connect to reach the target through this proxy.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends new connections to `target` from now on (open ones stay where they are).
    pub fn set_target(&self, target: SocketAddr) {
        *self.target.lock().unwrap_or_else(PoisonError::into_inner) = target;
    }

    /// Cuts the link: open connections drop, new ones are refused.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Restores the link.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::Release);
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Copies both ways between `a` and `b` until either side closes, delayed if asked.
async fn forward(
    mut a: TcpStream,
    mut b: TcpStream,
    delay: Option<(Duration, Duration)>,
) -> std::io::Result<()> {
    let Some((base, jitter)) = delay else {
        tokio::io::copy_bidirectional(&mut a, &mut b).await?;
        return Ok(());
    };
    let (a_read, a_write) = a.into_split();
    let (b_read, b_write) = b.into_split();
    // Each way to its end: one side closing its half must not cut what the other still sends.
    let (ab, ba) = tokio::join!(
        delayed(a_read, b_write, base, jitter),
        delayed(b_read, a_write, base, jitter)
    );
    ab.and(ba)
}

/// Copies `from` to `to`, each chunk held until `base` +- `jitter` after it was read (and
/// not before the chunk ahead of it), so the link has latency but as much bandwidth as ever.
async fn delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    base: Duration,
    jitter: Duration,
) -> std::io::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut last = tokio::time::Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            let due = tokio::time::Instant::now() + jittered(base, jitter);
            last = last.max(due);
            if tx.send((last, buf[..n].to_vec())).is_err() {
                return Ok(());
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    let (read, write) = tokio::join!(reader, writer);
    read.and(write)
}

/// `base` plus or minus up to `jitter`, at random.
fn jittered(base: Duration, jitter: Duration) -> Duration {
    let spread = jitter.as_micros() as i64;
    let offset = rand::rng().random_range(-spread..=spread);
    if offset >= 0 {
        base + Duration::from_micros(offset as u64)
    } else {
        base.saturating_sub(Duration::from_micros(offset.unsigned_abs()))
    }
}
