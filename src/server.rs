//! Starting and stopping a node.
//!
//! [`run`] takes a bound listener, the node's settings and a shutdown future: the binary passes
//! SIGTERM/Ctrl-C, tests pass a oneshot and a listener on `127.0.0.1:0`. On shutdown the node
//! stops accepting, lets in-flight calls finish (up to the grace period), then drains its
//! actors, so writes already queued for peers still go out.

use std::future::Future;
use std::sync::{Arc, PoisonError};

use kvstore_actors::membership::Phase;
use kvstore_actors::placement::Placement;
use kvstore_actors::{
    Clock, Coordinator, CoordinatorConfig, NodeId, Storage, StorageConfig, StoreActor,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tracing::Instrument;

use crate::Node;
use crate::config::NodeConfig;
use crate::error::Error;
use crate::gossip::{Gossip, GossipConfig};
use crate::listener::Incoming;
use crate::membership::{self, EVERYWHERE, Members};
use crate::metrics::{NodeMetrics, NodeState};
use crate::pb::kv_store_server::KvStoreServer;
use crate::pb::replicator_server::ReplicatorServer;
use crate::peer::{GrpcPeer, PeerSettings};
use crate::service::Starting;
use crate::service::body_timeout::BodyTimeout;
use crate::service::kv::KvService;
use crate::service::list::ListBounds;
use crate::service::observe::{Observe, Scrape};
use crate::service::replicator::{ReplicatorService, SenderCheck};
use crate::service::request_errors::RequestErrors;
use tonic_health::ServingStatus;

/// Runs a node on `listener` until `shutdown` completes, then stops it gracefully. Everything
/// the node logs is inside a `node` span with its id, so that nodes sharing a process (or a
/// log) can be told apart; each call it serves has an `rpc` span with its method inside that.
pub async fn run(
    listener: TcpListener,
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let addr = listener.local_addr()?;
    let node_id = config.node_id.clone().unwrap_or_else(|| addr.to_string());
    let span = tracing::info_span!("node", id = %node_id);
    serve(listener, config, shutdown, node_id, span.clone())
        .instrument(span)
        .await
}

async fn serve(
    listener: TcpListener,
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    node_id: String,
    span: tracing::Span,
) -> Result<(), Error> {
    let addr = listener.local_addr()?;
    let limits = config.limits;
    let max_message = limits.max_message_bytes();

    // Health: NOT_SERVING until the log is replayed and the node serves, SERVING while it
    // does, NOT_SERVING again as soon as it begins to stop. For the node ("") and each service.
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;

    // The shutdown signal is observed three times: by tonic (stop accepting, finish in-flight
    // calls), by the replication streams peers hold open (end them, or "finish" never comes),
    // and by the grace timer that bounds how long "finish" may take. The health service hears
    // first, so that load balancers stop sending calls while in-flight ones finish.
    // A watch, not a Notify: a signal that fires before anyone waits is still seen.
    let (stop, stopped) = watch::channel(false);
    let stop = Arc::new(stop);
    let signalled = tokio::spawn({
        let (stop, health) = (stop.clone(), health.clone());
        async move {
            shutdown.await;
            set_health(&health, ServingStatus::NotServing).await;
            let _ = stop.send(true);
        }
        .in_current_span()
    });

    // The node listens from the start: its health says it is starting, and its handlers answer
    // UNAVAILABLE until its actors are up.
    let starting = Starting::default();
    let rpc_spans = RpcSpans::new(span);
    let metrics = Arc::new(NodeMetrics::default());
    let scrape: Scrape = {
        let (metrics, starting, node_id) = (metrics.clone(), starting.clone(), node_id.clone());
        Arc::new(move || {
            let (metrics, starting, node_id) = (metrics.clone(), starting.clone(), node_id.clone());
            Box::pin(async move {
                let state = match starting.get() {
                    Some(node) => Some(NodeState::read(node).await),
                    None => None,
                };
                crate::metrics::render(&metrics, &node_id, state.as_ref())
            })
        })
    };
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let bounds = config.bounds;
    // Checked here as well as when the actors start: the Replicator checks each caller's ring
    // against this node's once it has started (see `SenderCheck::with_ring`). A ring recorded
    // in the data dir, or joined, replaces the one the flags give as soon as it is known.
    let ring = crate::peer::ring_tag(placement(&config, addr)?.fingerprint());
    let ring_known = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let members = Arc::new(Members::new(
        ring_id(&config, addr),
        ring.clone(),
        config.data_dir.clone(),
        starting.clone(),
        config.replication_deadline,
    ));
    let mut server = Server::builder()
        .max_concurrent_streams(Some(bounds.max_concurrent_streams))
        // A ping every 30 s on every connection: a client that does not answer within 20 s is
        // gone, and its connection closed; one that does is not idle (see `listener`).
        .http2_keepalive_interval(Some(keep_alive_interval(bounds.idle_timeout)))
        .http2_keepalive_timeout(Some(KEEP_ALIVE_TIMEOUT));
    if let Some(tls) = &config.tls {
        server = server.tls_config(tls.server_config())?;
    }
    // One bound for every List this node serves: its clients' and its share of the Lists of
    // other nodes of a ring.
    let lists = ListBounds::new(bounds.max_list_memory, bounds.list_idle_timeout);
    let serve = server
        // HTTP/1.1 as well as HTTP/2 on the one port, for `GET /metrics` from a scraper that
        // speaks only HTTP/1.1; gRPC calls need HTTP/2 and get it.
        .accept_http1(true)
        // Each call inside an `rpc` span naming its method, inside the node's (tonic serves
        // connections in tasks of their own, outside any span).
        .trace_fn(move |request| rpc_spans.span(request.uri().path()))
        .layer(Observe {
            metrics: metrics.clone(),
            scrape,
        })
        .layer(BodyTimeout {
            timeout: bounds.request_body_timeout,
        })
        .layer(RequestErrors {
            max_message_bytes: max_message,
        })
        .add_service(health_service)
        .add_service(
            reflection()
                .build_v1()
                .expect("this build's own descriptors decode"),
        )
        .add_service(
            reflection()
                .build_v1alpha()
                .expect("this build's own descriptors decode"),
        )
        .add_service(
            KvStoreServer::new(
                KvService::new(
                    starting.clone(),
                    limits,
                    lists.clone(),
                    node_id.clone(),
                    config
                        .data_dir
                        .as_ref()
                        .map_or_else(|| "(memory)".into(), |d| d.display().to_string()),
                    members.clone(),
                )
                .with_token(config.cluster_token.clone())
                .with_certificates(config.tls.as_ref().is_some_and(|tls| tls.checks_peers())),
            )
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        )
        .add_service(tonic::service::interceptor::InterceptedService::new(
            ReplicatorServer::new(ReplicatorService::new(
                starting.clone(),
                node_id.clone(),
                limits,
                lists,
                stopped.clone(),
                members.clone(),
            ))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
            SenderCheck::new(
                node_id.clone(),
                config.cluster_token.clone(),
                config.tls.as_ref().is_some_and(|tls| tls.checks_peers()),
            )
            .with_ring(ring.clone(), ring_known.clone())
            .with_cluster(config.cluster_name.clone()),
        ))
        .serve_with_incoming_shutdown(
            Incoming::new(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                connection_bound(bounds.max_connections),
                bounds.idle_timeout,
                bounds.request_body_timeout,
                stopped.clone(),
            ),
            {
                let mut stopped = stopped.clone();
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                }
            },
        );
    tokio::pin!(serve);

    let node = tokio::select! {
        node = start(&config, &node_id, addr, &metrics, &members, &starting) => node,
        // Stopped (or failed) before it started.
        served = &mut serve => {
            signalled.abort();
            served?;
            return Ok(());
        }
    };
    let node = match node {
        Ok(node) => node,
        Err(error) => {
            // A node that cannot start (a damaged log, say) stops serving, and says why.
            let _ = stop.send(true);
            let _ = serve.await;
            signalled.abort();
            return Err(error);
        }
    };
    // Gossip from the start, so that the others see this node live and it hears of newer
    // rings; a node that cannot gossip (its port is taken) does not start.
    let gossip = match node.ring_state() {
        Some(state) => start_gossip(&config, addr, &members, &state, &node, &node_id).await,
        None => Err(Error::FailedPrecondition("the node has no ring".into())),
    };
    match gossip {
        Ok(Some(gossip)) => members.gossiping(gossip),
        Ok(None) => {}
        Err(error) => {
            let _ = stop.send(true);
            let _ = serve.await;
            signalled.abort();
            node.shutdown().await;
            return Err(error);
        }
    }
    log_started(&config, addr, &node_id);
    starting.started(node.clone());
    ring_known.store(true, std::sync::atomic::Ordering::Release);
    // The ring the node started in, if it differs from the one its flags gave; then a newer
    // one a peer has, if the node missed a change while it was down.
    crate::peer::set_ring_tag(&ring, node.placement().and_then(|p| p.fingerprint()));
    let follow = tokio::spawn(
        members
            .clone()
            .follow(config.gossip_interval * 5, config.anti_entropy_interval)
            .in_current_span(),
    );
    // A node restarted in the middle of a change that gives it partitions goes on copying.
    if let Some(state) = node.ring_state() {
        members.fill_if_gaining(&state);
    }
    // Serving (by its health) once it has its peers' newest ring: the node serves its peers'
    // calls meanwhile, so nodes starting together do not wait on each other, and clients'
    // reads; a client's write waits (see `Starting::current`).
    let serving = tokio::spawn({
        let (members, health, stopped) = (members.clone(), health.clone(), stopped.clone());
        let (wait, starting) = (config.replication_deadline, starting.clone());
        async move {
            members.catch_up_once(wait).await;
            starting.caught_up();
            if !*stopped.borrow() {
                set_health(&health, ServingStatus::Serving).await;
            }
        }
        .in_current_span()
    });

    let mut stopped_for_grace = stopped.clone();
    let grace = async move {
        let _ = stopped_for_grace.wait_for(|s| *s).await;
        tracing::info!(grace = ?config.shutdown_grace, "shutting down: finishing in-flight calls");
        tokio::time::sleep(config.shutdown_grace).await;
    };
    let served = tokio::select! {
        served = serve => served,
        () = grace => {
            tracing::warn!("shutdown grace period over; abandoning in-flight calls");
            Ok(())
        }
    };
    signalled.abort();
    follow.abort();
    serving.abort();
    members.stop_gossip().await;

    // Drained even when serving failed: the log is synced and closed, and queued writes go
    // out, before the error is reported.
    node.shutdown().await;
    served?;
    tracing::info!(listen = %addr, "node stopped");
    Ok(())
}

/// Starts the node's gossip: received on its listen address at the gossip port (by default
/// its gRPC port, over UDP), sent to it at its advertised host, and first sent to the other
/// members of its ring at theirs, on the same rule. None when the node has no address to
/// give the others (it listens on every address, with no `--advertise`).
async fn start_gossip(
    config: &NodeConfig,
    addr: std::net::SocketAddr,
    members: &Members,
    state: &kvstore_actors::membership::RingState,
    node: &Node,
    node_id: &str,
) -> Result<Option<Gossip>, Error> {
    let port = |grpc: u16| config.gossip_port.unwrap_or(grpc);
    let me = members.me();
    let listen = std::net::SocketAddr::new(addr.ip(), port(addr.port()));
    // Where the others send this node gossip: its advertised host, of the listen address's
    // family, or the listen address itself if that is a specific one.
    let resolved: Vec<std::net::SocketAddr> = match tokio::net::lookup_host(me).await {
        Ok(found) => found.collect(),
        Err(_) => Vec::new(),
    };
    let fits =
        |a: &&std::net::SocketAddr| addr.ip().is_unspecified() || a.is_ipv4() == addr.is_ipv4();
    let advertise = match resolved.iter().find(fits) {
        Some(a) if !a.ip().is_unspecified() => std::net::SocketAddr::new(a.ip(), port(a.port())),
        _ if !addr.ip().is_unspecified() => listen,
        _ => {
            tracing::warn!(
                node = %me,
                "not gossiping: this node listens on every address and has no --advertise \
                 naming one the others can reach; it learns of ring changes only by asking a \
                 member each anti-entropy period, and its peers' liveness only by their links"
            );
            return Ok(None);
        }
    };
    let seeds = gossip_seeds(&state.members(), me, config.gossip_port);
    let role = node.placement().map_or("normal", |p| p.role());
    let gossip = GossipConfig {
        me: me.to_owned(),
        listen,
        advertise,
        seeds,
        interval: config.gossip_interval,
        cluster: config.cluster_name.clone(),
        node_id: node_id.to_owned(),
    };
    tracing::info!(listen = %gossip.listen, advertise = %gossip.advertise, "gossiping");
    Gossip::start(gossip, state, role).await.map(Some)
}

/// Where a node first gossips: each member but `me` at its gRPC port number (the default
/// gossip port), and at this node's own `gossip_port` if it has one. The others' gossip ports
/// are not known before gossip tells them, and a member may keep the default while this node
/// does not, or the other way round; once one side reaches the other, gossip carries each
/// node's own address.
fn gossip_seeds(members: &[String], me: &str, gossip_port: Option<u16>) -> Vec<String> {
    (members.iter())
        .filter(|m| *m != me)
        .filter_map(|m| {
            let (host, grpc) = m.rsplit_once(':')?;
            Some((host, grpc.parse::<u16>().ok()?))
        })
        .flat_map(|(host, grpc)| {
            let own = gossip_port.filter(|p| *p != grpc);
            std::iter::once(grpc)
                .chain(own)
                .map(move |p| format!("{host}:{p}"))
        })
        .collect()
}

/// How often the node pings each connection, and how long an answer may take.
const KEEP_ALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Files a node keeps open besides its clients' connections: its log and snapshots, its
/// peers' connections, the listener, with room to spare.
const FILES_BESIDES_CONNECTIONS: u64 = 256;

/// The connections the node can keep open: `wanted` (`--max-connections`), if the open-file
/// limit allows it. The soft limit is raised to the hard one first (often 1024 against
/// 524288): past the limit, accepting fails and so do the node's own files.
fn connection_bound(wanted: usize) -> usize {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(files) => {
            let room = files.saturating_sub(FILES_BESIDES_CONNECTIONS).max(1);
            let room = usize::try_from(room).unwrap_or(usize::MAX);
            if wanted > room {
                tracing::warn!(
                    max_connections = wanted,
                    open_files = files,
                    using = room,
                    "--max-connections is past what the open-file limit allows (raise it with \
                     ulimit -n or LimitNOFILE=): keeping fewer connections"
                );
            }
            wanted.min(room)
        }
        Err(error) => {
            tracing::warn!(%error, "could not read or raise the open-file limit");
            wanted
        }
    }
}

/// Pings come at least twice per idle timeout, so that a live client's answers always keep its
/// connection from counting as idle, however short the timeout is set.
fn keep_alive_interval(idle_timeout: std::time::Duration) -> std::time::Duration {
    KEEP_ALIVE_INTERVAL.min(idle_timeout / 2)
}

/// Sets the health of the node ("") and of each of its services.
async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for service in ["", KVSTORE_SERVICE, REPLICATOR_SERVICE] {
        health.set_service_status(service, status).await;
    }
}

/// The services whose health the node reports, by their gRPC names.
const KVSTORE_SERVICE: &str = "kvstore.v1.KVStore";
const REPLICATOR_SERVICE: &str = "kvstore.v1.Replicator";

/// Starts the node's actors: replays its log (if it keeps one), and starts the store and a
/// replication actor per peer.
async fn start(
    config: &NodeConfig,
    node_id: &str,
    addr: std::net::SocketAddr,
    metrics: &NodeMetrics,
    members: &Members,
    starting: &Starting,
) -> Result<Arc<Node>, Error> {
    let limits = config.limits;
    let max_message = limits.max_message_bytes();
    let node = NodeId::known(node_id);
    let clock = Arc::new(
        Clock::with_max_offset(node, config.max_clock_offset).skewed_by(config.clock_skew_nanos),
    );
    let first = placement(config, addr)?;
    let settings = PeerSettings {
        node_id: node_id.to_string(),
        token: config.cluster_token.clone(),
        ring: members.tag(),
        cluster: config.cluster_name.clone(),
        connect_timeout: config.peer_connect_timeout,
        call_timeout: config.replication_deadline,
        max_message_bytes: max_message,
        clock: clock.clone(),
        tls: config.tls.as_ref().and_then(|tls| tls.peer_config()),
    };
    // The ring: a changed one the data dir recorded, or one joined now, or the first.
    let me = ring_id(config, addr);
    let changed = match config.data_dir.as_deref().map(membership::recorded) {
        Some(Ok(Some(state))) if state.epoch() > (1, Phase::Settled) => Some(state),
        _ => None,
    };
    // A join asked for before, and maybe begun by the claimant, that the node stopped in
    // before it recorded the ring: it goes on, through the same member.
    let unfinished = match (&changed, &config.join, config.data_dir.as_deref()) {
        (None, None, Some(dir)) => membership::unfinished_join(dir)?,
        _ => None,
    };
    if let Some(seed) = &unfinished {
        tracing::warn!(%seed, "this node stopped while it asked to join: it goes on joining");
    }
    let join = config.join.clone().or(unfinished);
    let state = match (&changed, &join) {
        // Joining again on the data dir of a node that left would start it as one that left.
        (Some(state), Some(_)) if !state.members().contains(&me) => {
            return Err(Error::FailedPrecondition(format!(
                "this data dir holds ring version {}, which this node has left (or whose join \
                 of it was called off): give an empty --data-dir to join again",
                state.ring().version()
            )));
        }
        (Some(state), join) => {
            if join.is_some() {
                tracing::warn!(
                    ring_version = state.ring().version(),
                    "this data dir holds a ring this node is a member of: the node restarts in \
                     it, and --join is ignored"
                );
            }
            if state.ring().replicas() != config.replicas {
                return Err(Error::FailedPrecondition(format!(
                    "this node's data dir holds ring version {} with {} copies of each key: \
                     start it with --replicas {}",
                    state.ring().version(),
                    state.ring().replicas(),
                    state.ring().replicas()
                )));
            }
            state.clone()
        }
        (None, Some(seed)) => {
            let waiting = || starting.joining(seed);
            let dir = config.data_dir.as_deref();
            let patience = JOIN_PATIENCE;
            membership::join(
                dir,
                seed,
                &me,
                config.replicas,
                &settings,
                patience,
                waiting,
            )
            .await?
        }
        (None, None) => first.state().clone(),
    };
    let others: Vec<String> = (state.members().into_iter()).filter(|m| *m != me).collect();
    let placement =
        Placement::of(state, &me, &others).map_err(|e| Error::FailedPrecondition(e.to_string()))?;
    // The ring's fingerprint from the first call on, not the one the flags would give.
    crate::peer::set_ring_tag(&members.tag(), placement.fingerprint());
    let peers = (others.iter())
        .map(|peer| Ok((peer.clone(), GrpcPeer::new(peer, &settings)?)))
        .collect::<Result<Vec<_>, Error>>()?;
    // A restore seeds a new node: refused before the data dir is touched if it holds data,
    // or if the backup is damaged anywhere.
    if let Some(file) = &config.restore {
        if let Some(dir) = &config.data_dir {
            crate::backup::check_empty(dir)?;
        }
        let path = file.clone();
        let summary = tokio::task::spawn_blocking(move || crate::backup::verify(&path))
            .await
            .expect("checking a backup panicked")?;
        tracing::info!(backup = %file.display(), entries = summary.entries, "backup checked; restoring it");
    }
    let store = match &config.data_dir {
        None => StoreActor::new(clock),
        Some(dir) => {
            let storage = StorageConfig {
                sync: config.sync,
                compact_after_bytes: config.compact_after_bytes,
                repair: config.repair_truncate,
                tombstone_grace: config.tombstone_grace,
                metrics: metrics.storage.clone(),
            };
            let opened = std::time::Instant::now();
            let path = dir.clone();
            let in_node = tracing::Span::current();
            let recovered = tokio::task::spawn_blocking(move || {
                in_node.in_scope(|| Storage::open(&path, &storage))
            })
            .await
            .expect("storage recovery panicked")?;
            tracing::info!(
                data_dir = %dir.display(),
                keys = recovered.report.keys,
                snapshot = ?recovered.report.snapshot,
                snapshot_entries = recovered.report.snapshot_entries,
                log_records = recovered.report.log_records,
                torn_bytes = recovered.report.torn_bytes,
                took = ?opened.elapsed(),
                "storage recovered"
            );
            // Named once the dir is this node's (its lock held): a second node started on it
            // by mistake must not rename it.
            let claimed = membership::claim(dir, &me, changed.is_some());
            let recorded = claimed.and_then(|()| match changed.is_some() || join.is_some() {
                true => membership::record(dir, placement.state())
                    .and_then(|()| membership::join_recorded(dir)),
                false => record_ring(dir, &placement, !recovered.map.is_empty()),
            });
            if let Err(refused) = recorded {
                // Let the data dir go before saying so: whoever starts the node again right
                // away must find it unlocked.
                recovered.storage.close().await;
                return Err(refused);
            }
            StoreActor::recovered(clock, recovered)
        }
    };
    let node = Arc::new(Coordinator::start(
        store,
        peers,
        CoordinatorConfig {
            quorum: config.write_quorum,
            ack_after: config.ack_after,
            replication_deadline: config.replication_deadline,
            peer_mailbox: config.peer_mailbox,
            handoff_capacity: config.handoff_capacity,
            anti_entropy_interval: config.anti_entropy_interval,
            placement: Some(placement),
        },
    ));
    members.started(settings);
    if let Some(file) = &config.restore {
        let restored = restore(&node, file).await;
        if restored.is_err() {
            node.shutdown().await;
        }
        let summary = restored?;
        tracing::info!(
            backup = %file.display(),
            entries = summary.entries,
            tombstones = summary.tombstones,
            "restored; the peers get the data through anti-entropy"
        );
        node.resync_peers();
    }

    Ok(node)
}

/// One line with every setting in effect, so a log says how the node ran; said once the
/// node serves and gossips, so that a node that then fails to start never said it started.
/// The cluster token is only said to be set: a secret never reaches a log.
fn log_started(config: &NodeConfig, addr: std::net::SocketAddr, node_id: &str) {
    let limits = config.limits;
    let max_message = limits.max_message_bytes();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %addr,
        node_id = %node_id,
        peers = ?config.peers,
        replicas = config.replicas,
        advertise = ?config.advertise,
        data_dir = ?config.data_dir,
        write_quorum = %config.write_quorum,
        ack_after = %config.ack_after,
        replication_deadline = ?config.replication_deadline,
        peer_connect_timeout = ?config.peer_connect_timeout,
        peer_mailbox = config.peer_mailbox,
        handoff_capacity = config.handoff_capacity,
        anti_entropy_interval = ?config.anti_entropy_interval,
        max_key_bytes = limits.max_key_bytes,
        max_value_bytes = limits.max_value_bytes,
        max_message_bytes = max_message,
        sync = ?config.sync,
        compact_after_bytes = config.compact_after_bytes,
        repair_truncate = config.repair_truncate,
        tombstone_grace = ?config.tombstone_grace,
        max_clock_offset = ?config.max_clock_offset,
        shutdown_grace = ?config.shutdown_grace,
        cluster_token = match &config.cluster_token {
            Some(token) => format!("set ({} accepted)", token.accepted().count()),
            None => "none".into(),
        },
        tls = config.tls.as_ref().map_or_else(|| "none".into(), |tls| tls.describe()),
        restore = ?config.restore,
        max_list_memory = config.bounds.max_list_memory,
        list_idle_timeout = ?config.bounds.list_idle_timeout,
        max_concurrent_streams = config.bounds.max_concurrent_streams,
        request_body_timeout = ?config.bounds.request_body_timeout,
        max_connections = config.bounds.max_connections,
        idle_timeout = ?config.bounds.idle_timeout,
        "node started"
    );
}

/// How long a node started with `--join` keeps trying while the ring is changing or one of
/// its members does not answer.
const JOIN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

/// Refuses to start a node that holds only some keys on data placed by another first ring,
/// and records the ring otherwise. Every node of a cluster restarted with new members or
/// another `--replicas` agrees on the new ring, so no peer would object; but a partition whose
/// new holders all lacked it would never be filled, since the nodes holding its keys no longer
/// hold it, and its keys would be lost to clients (a ring grows by `--join` instead). A data
/// dir from before rings were recorded was written by a node holding every key. Going to
/// every node holding every key is safe: anti-entropy then spreads every key everywhere.
fn record_ring(
    dir: &std::path::Path,
    placement: &Placement,
    holds_data: bool,
) -> Result<(), Error> {
    let current = placement.fingerprint().unwrap_or_else(|| EVERYWHERE.into());
    let recorded = match membership::recorded(dir) {
        Ok(Some(state)) if state == *placement.state() => return Ok(()),
        Ok(Some(state)) => Some(membership::describe(&state)),
        Ok(None) => None,
        Err(text) => Some(text),
    };
    let recorded = recorded.or_else(|| holds_data.then(|| EVERYWHERE.to_string()));
    if let Some(recorded) = &recorded
        && *recorded != current
        && holds_data
        && !placement.is_everywhere()
    {
        return Err(Error::FailedPrecondition(format!(
            "{} holds data placed by another ring ({recorded}) than this node's ({current}): \
             some keys would be looked for only on nodes that do not have them. Start the node \
             with the --replicas and peers it had; a ring that holds data grows by --join",
            dir.display()
        )));
    }
    membership::record(dir, placement.state())
}

/// This node's id in the ring: the address the other nodes list it by.
fn ring_id(config: &NodeConfig, addr: std::net::SocketAddr) -> String {
    config.advertise.clone().unwrap_or_else(|| addr.to_string())
}

/// Which keys this node and its peers hold: the first ring of the node and its peers, each
/// named by the address the others list it by.
fn placement(config: &NodeConfig, addr: std::net::SocketAddr) -> Result<Placement, Error> {
    let me = ring_id(config, addr);
    if config.join.is_some() {
        // Not a member yet: alone in a ring of its own until it joins.
        return Placement::bootstrap(&me, &[], config.replicas)
            .map_err(|e| Error::InvalidArgument(e.to_string()));
    }
    Placement::bootstrap(&me, &config.peers, config.replicas)
        .map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// Applies the backup at `path` to `node`, a batch at a time, as replicated writes: versions
/// kept, logged like any other, not sent on to peers.
async fn restore(node: &Node, path: &std::path::Path) -> Result<crate::backup::Summary, Error> {
    const BATCH: usize = 1000;
    let (batches, mut to_apply) = tokio::sync::mpsc::channel(4);
    let path = path.to_path_buf();
    let reading = tokio::task::spawn_blocking(move || {
        crate::backup::read(&path, BATCH, |batch| {
            // The other end stops only when applying failed, which it reports.
            batches
                .blocking_send(batch)
                .map_err(|_| Error::InvalidArgument("restore stopped".into()))
        })
    });
    while let Some(batch) = to_apply.recv().await {
        node.apply(batch).await?;
    }
    reading.await.expect("reading a backup panicked")
}

/// The `rpc` span of each method, made once and entered by every call to it: the same name and
/// method in every log line of a call as a span made per call would give, without its cost (a
/// span of its own per call made a Get at one client 4 % slower, in an A/B of the release
/// build). Only this node's own methods get one, and a bounded number of them; a call to any
/// other path is logged in the node's span.
struct RpcSpans {
    node: tracing::Span,
    methods: std::sync::RwLock<std::collections::HashMap<String, tracing::Span>>,
}

/// Methods with spans of their own: the two services have eleven.
const MAX_RPC_SPANS: usize = 32;

impl RpcSpans {
    fn new(node: tracing::Span) -> Arc<Self> {
        Arc::new(Self {
            node,
            methods: std::sync::RwLock::default(),
        })
    }

    fn span(&self, path: &str) -> tracing::Span {
        if !path.starts_with("/kvstore.v1.") {
            return self.node.clone();
        }
        let known = self.methods.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(span) = known.get(path) {
            return span.clone();
        }
        drop(known);
        let span = tracing::info_span!(parent: &self.node, "rpc", method = %path);
        let mut methods = self.methods.write().unwrap_or_else(PoisonError::into_inner);
        if methods.len() < MAX_RPC_SPANS {
            methods
                .entry(path.to_string())
                .or_insert_with(|| span.clone());
        }
        span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_first_gossips_with_each_other_member_at_its_grpc_port_and_at_its_own() {
        let members = ["a:5001", "b:5002", "me:5003"].map(String::from);
        assert_eq!(
            gossip_seeds(&members, "me:5003", None),
            ["a:5001", "b:5002"]
        );
        assert_eq!(
            gossip_seeds(&members, "me:5003", Some(7946)),
            ["a:5001", "a:7946", "b:5002", "b:7946"]
        );
        // Its own port where that is a member's gRPC port already: once.
        assert_eq!(
            gossip_seeds(&members, "me:5003", Some(5002)),
            ["a:5001", "a:5002", "b:5002"]
        );
    }
}
