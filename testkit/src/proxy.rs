//! A fault-injecting TCP proxy: forwards a loopback port to a node until told to cut the link.
//! Cutting drops every open connection and refuses new ones (accepts and closes at once, as a
//! partitioned network's RST would), so both sides see the peer as unreachable.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

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
    task: JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free loopback port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let (epoch, _) = watch::channel(0u64);
        let target = Arc::new(Mutex::new(target));
        let task = {
            let cut = cut.clone();
            let epoch = epoch.clone();
            let target = target.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if cut.load(Ordering::Acquire) {
                        drop(client);
                        continue;
                    }
                    let mut cuts = epoch.subscribe();
                    let target = *target.lock().unwrap_or_else(PoisonError::into_inner);
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(target).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let mut client = client;
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
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
            task,
        })
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
