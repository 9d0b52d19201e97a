//! What load balancers and tools see of a node: `grpc.health.v1.Health`, NOT_SERVING while
//! the node replays its log, SERVING while it serves, NOT_SERVING as soon as it begins to stop,
//! for the node and each service; and server reflection (v1 and v1alpha), with which grpcurl
//! and Postman list and call every service without the proto.

mod common;

use std::time::Duration;

use common::TestCluster;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Generous: a node on a busy machine.
const WAIT: Duration = Duration::from_secs(30);

async fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn status_of(health: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let request = HealthCheckRequest {
        service: service.into(),
    };
    let answer = health.check(request).await.unwrap().into_inner();
    ServingStatus::try_from(answer.status).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_per_service_and_not_serving_once_a_stop_begins() {
    let mut cluster = TestCluster::start_with(1, |_| kvstore::NodeConfig {
        shutdown_grace: Duration::from_secs(2),
        ..common::patient()
    });
    let mut health = HealthClient::new(channel(cluster.addr(0)).await);
    // Serving, once started (the cluster's start does not wait for it).
    let started = std::time::Instant::now();
    while status_of(&mut health, "").await != ServingStatus::Serving {
        assert!(started.elapsed() < WAIT, "never serving");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for service in ["kvstore.v1.KVStore", "kvstore.v1.Replicator"] {
        assert_eq!(
            status_of(&mut health, service).await,
            ServingStatus::Serving
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "kvstore.v1.Nothing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // A watcher sees the node stop serving as soon as its stop begins, while the calls in
    // flight (the watch itself among them) are let finish.
    let request = HealthCheckRequest {
        service: "kvstore.v1.KVStore".into(),
    };
    let mut watch = health.watch(request).await.unwrap().into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let stopping = tokio::spawn(async move { cluster.nodes[0].stop().await });
    let next = tokio::time::timeout(WAIT, watch.next()).await.unwrap();
    assert_eq!(
        next.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    stopping.await.unwrap().unwrap();
}

/// A node whose log takes long to replay listens all the while: its health says it is not
/// serving until the replay is done, and calls wait for it. The replay is held here by
/// a snapshot that is a named pipe: reading it waits until the test writes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_replaying_its_log_listens_and_says_it_is_not_serving_yet() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    std::fs::create_dir_all(&data).unwrap();
    let snapshot = data.join("snapshot-0000000000000000.snap");
    let made = std::process::Command::new("mkfifo")
        .arg(&snapshot)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    let mut cluster = TestCluster::start_with(1, |_| kvstore::NodeConfig {
        data_dir: Some(data.clone()),
        ..common::patient()
    });
    let mut health = HealthClient::new(channel(cluster.addr(0)).await);
    assert_eq!(status_of(&mut health, "").await, ServingStatus::NotServing);
    assert_eq!(
        status_of(&mut health, "kvstore.v1.KVStore").await,
        ServingStatus::NotServing
    );
    // A call that comes meanwhile waits for the start, as on a node not yet listening.
    let client = cluster.client(0);
    let early = tokio::spawn(async move { client.put("k", "early").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!early.is_finished(), "answered before the node started");

    // The replay goes on: an empty snapshot comes through the pipe.
    let mut bytes = kvstore_actors::storage::record::snapshot_header().to_vec();
    kvstore_actors::storage::record::encode_end(0, &mut bytes);
    tokio::task::spawn_blocking(move || std::fs::write(&snapshot, bytes))
        .await
        .unwrap()
        .unwrap();
    let started = std::time::Instant::now();
    while status_of(&mut health, "").await != ServingStatus::Serving {
        assert!(started.elapsed() < WAIT, "never serving");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        early.await.unwrap().unwrap().ok,
        "the early call, once started"
    );
    assert!(cluster.client(0).put("k", "v").await.unwrap().ok);
    cluster.nodes[0].stop().await.unwrap();
}

/// The names of the services a reflection answer lists, and the services of the files it
/// sends for a symbol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes_every_service_in_both_versions() {
    let cluster = TestCluster::start(1);
    let expected = [
        "grpc.health.v1.Health",
        "kvstore.v1.KVStore",
        "kvstore.v1.Replicator",
    ];

    // v1
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel(cluster.addr(0)).await);
        let requests = [
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol("kvstore.v1.KVStore".into()),
        ]
        .map(|r| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(r),
        });
        let mut answers = client
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            answers.next().await.unwrap().unwrap().message_response
        else {
            panic!("not a list of services");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for service in expected {
            assert!(
                names.iter().any(|n| n == service),
                "{service} not in {names:?}"
            );
        }
        assert!(
            names
                .iter()
                .any(|n| n == "grpc.reflection.v1.ServerReflection"),
            "{names:?}"
        );
        let Some(MessageResponse::FileDescriptorResponse(files)) =
            answers.next().await.unwrap().unwrap().message_response
        else {
            panic!("not files");
        };
        let methods: Vec<String> = files
            .file_descriptor_proto
            .iter()
            .map(|bytes| prost_types::FileDescriptorProto::decode(&bytes[..]).unwrap())
            .flat_map(|file| file.service)
            .filter(|service| service.name() == "KVStore")
            .flat_map(|service| service.method)
            .map(|method| method.name().to_string())
            .collect();
        assert_eq!(
            methods,
            [
                "Put", "Get", "List", "Delete", "Status", "Backup", "Leave", "Remove"
            ]
        );
    }

    // v1alpha, which older tools still speak
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel(cluster.addr(0)).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            answers.next().await.unwrap().unwrap().message_response
        else {
            panic!("not a list of services");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for service in expected {
            assert!(
                names.iter().any(|n| n == service),
                "{service} not in {names:?}"
            );
        }
    }
}
