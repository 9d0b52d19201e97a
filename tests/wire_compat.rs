//! The wire contract: the original Go system's proto (the seed, `tests/compat/seed.proto`,
//! package `kvstore.v1`) is what every client may have been generated from, so our proto may only add to
//! it, and a client generated from it by another toolchain must work against our nodes.
//!
//! Two checks: the descriptors of both protos, compiled by protox, are compared field by field
//! and method by method; and a Python grpcio client generated from the original proto runs the
//! original session (and its errors) against a real cluster. The Python side needs `grpcio`
//! and `grpcio-tools`, which [`common::python`] provides.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::TestCluster;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compile(dir: &str, file: &str) -> FileDescriptorSet {
    protox::compile([file], [root().join(dir)])
        .unwrap_or_else(|e| panic!("compiling {dir}/{file}: {e}"))
}

/// The file of `set` that defines package `kvstore.v1`.
fn contract_file(set: &FileDescriptorSet) -> &FileDescriptorProto {
    set.file
        .iter()
        .find(|f| f.package() == "kvstore.v1")
        .expect("a file of package kvstore.v1")
}

fn message<'a>(file: &'a FileDescriptorProto, name: &str) -> Option<&'a DescriptorProto> {
    file.message_type.iter().find(|m| m.name() == name)
}

/// Every way `ours` fails to be an additive extension of `seed`: each seed message keeps every
/// field with the same number, name, type and cardinality; each seed service keeps every method
/// with the same request and response types and streaming. Anything else in `ours` is new.
fn breaks_of_contract(seed: &FileDescriptorSet, ours: &FileDescriptorSet) -> Vec<String> {
    let (seed, ours) = (contract_file(seed), contract_file(ours));
    let mut breaks = Vec::new();
    // proto2 changes field presence and packing on the wire.
    if ours.syntax != seed.syntax {
        breaks.push(format!("syntax {:?} is now {:?}", seed.syntax, ours.syntax));
    }
    for old in &seed.message_type {
        let Some(new) = message(ours, old.name()) else {
            breaks.push(format!("message {} is gone", old.name()));
            continue;
        };
        for field in &old.field {
            let same_number = new.field.iter().find(|f| f.number() == field.number());
            match same_number {
                None => breaks.push(format!(
                    "{}.{} (field {}) is gone",
                    old.name(),
                    field.name(),
                    field.number()
                )),
                // Compared whole: name (JSON and text formats), type, type name, label and
                // proto3 `optional` presence all reach the wire or a generated API.
                Some(now) if now != field => breaks.push(format!(
                    "{}.{} (field {}) changed: {field:?} is now {now:?}",
                    old.name(),
                    field.name(),
                    field.number()
                )),
                Some(_) => {}
            }
        }
    }
    for old in &seed.service {
        let Some(new) = ours.service.iter().find(|s| s.name() == old.name()) else {
            breaks.push(format!("service {} is gone", old.name()));
            continue;
        };
        for method in &old.method {
            match new.method.iter().find(|m| m.name() == method.name()) {
                None => breaks.push(format!("rpc {}.{} is gone", old.name(), method.name())),
                Some(now)
                    if (
                        now.input_type(),
                        now.output_type(),
                        now.client_streaming(),
                        now.server_streaming(),
                    ) != (
                        method.input_type(),
                        method.output_type(),
                        method.client_streaming(),
                        method.server_streaming(),
                    ) =>
                {
                    breaks.push(format!(
                        "rpc {}.{} changed its types or streaming",
                        old.name(),
                        method.name()
                    ))
                }
                Some(_) => {}
            }
        }
    }
    breaks
}

#[test]
fn our_proto_only_adds_to_the_seeds() {
    let seed = compile("tests/compat", "seed.proto");
    let ours = compile("proto", "kvstore.proto");
    assert_eq!(breaks_of_contract(&seed, &ours), Vec::<String>::new());
}

/// Field `number` of message `msg` in `file`.
fn field_mut<'a>(
    file: &'a mut FileDescriptorProto,
    msg: &str,
    number: i32,
) -> &'a mut FieldDescriptorProto {
    let message = file.message_type.iter_mut().find(|m| m.name() == msg);
    let fields = &mut message.expect("the message").field;
    fields
        .iter_mut()
        .find(|f| f.number() == number)
        .expect("the field")
}

/// The check itself: each kind of break it exists for is reported.
#[test]
fn the_contract_check_reports_each_kind_of_break() {
    let seed = compile("tests/compat", "seed.proto");
    let ours = compile("proto", "kvstore.proto");
    let broken = |edit: &dyn Fn(&mut FileDescriptorProto)| {
        let mut changed = ours.clone();
        let file = changed
            .file
            .iter_mut()
            .find(|f| f.package() == "kvstore.v1")
            .unwrap();
        edit(file);
        breaks_of_contract(&seed, &changed)
    };
    let renumbered = broken(&|file| field_mut(file, "Ack", 1).number = Some(9));
    assert_eq!(renumbered.len(), 1, "{renumbered:?}");
    assert!(renumbered[0].contains("Ack.ok (field 1) is gone"));

    let retyped = broken(&|file| {
        field_mut(file, "KeyValue", 2).r#type = Some(Type::Bytes as i32);
    });
    assert_eq!(retyped.len(), 1, "{retyped:?}");
    assert!(retyped[0].contains("KeyValue.value (field 2) changed"));

    let unstreamed = broken(&|file| {
        let kv = file.service.iter_mut().find(|s| s.name() == "KVStore");
        let list = kv.unwrap().method.iter_mut().find(|m| m.name() == "List");
        list.unwrap().server_streaming = Some(false);
    });
    assert_eq!(
        unstreamed,
        ["rpc KVStore.List changed its types or streaming"]
    );

    let removed = broken(&|file| file.service.retain(|s| s.name() != "Replicator"));
    assert_eq!(removed, ["service Replicator is gone"]);

    let dropped = broken(&|file| file.message_type.retain(|m| m.name() != "Value"));
    assert!(
        dropped.contains(&"message Value is gone".to_string()),
        "{dropped:?}"
    );
}

async fn run_seed_client(script: &Path, args: &[&str]) -> String {
    let python = tokio::task::spawn_blocking(common::python::python)
        .await
        .unwrap();
    let mut command = tokio::process::Command::new(&python);
    command
        .arg(script)
        .args(args)
        .env("PYTHONIOENCODING", "utf-8")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the Python seed client did not finish in 120 s")
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python seed client failed ({}):\n{stderr}",
        output.status
    );
    String::from_utf8(output.stdout).expect("the transcript is UTF-8")
}

/// The session's transcript on a healthy cluster, as `seed_client.py` prints it; `replicate`
/// is what the versionless Replicate gets.
fn expected_session(replicate: &str) -> String {
    format!(
        "\
put 'name' on node 0: ok=True message=Stored and replicated
get 'name' on node 0: Adnan
get 'name' on node 1: Adnan
get 'name' on node 2: Adnan
put 'greeting' on node 1: ok=True message=Stored and replicated
put 'name' on node 2: ok=True message=Stored and replicated
list on node 0: greeting=héllo, wörld ✓, name=Adnan Khan
list on node 1: greeting=héllo, wörld ✓, name=Adnan Khan
list on node 2: greeting=héllo, wörld ✓, name=Adnan Khan
get 'no-such-key' on node 0: NOT_FOUND (message names the key: True)
put '' on node 0: INVALID_ARGUMENT: key must not be empty
put 'big' on node 0: INVALID_ARGUMENT: value is 1048577 bytes, over the limit of 1048576 bytes (--max-value-bytes)
get 'big' on node 0: NOT_FOUND (message names the key: True)
replicate without a version: {replicate}
get 'forged' on node 0: NOT_FOUND (message names the key: True)
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_generated_from_the_seed_proto_works() {
    let cluster = TestCluster::start(3);
    let script = root().join("tests/compat/seed_client.py");
    let transcript = run_seed_client(
        &script,
        &[cluster.addr(0), cluster.addr(1), cluster.addr(2)],
    )
    .await;
    let refused = "INVALID_ARGUMENT: Replicate requires a version (field 3); none was sent";
    assert_eq!(transcript, expected_session(refused));
}

/// The same client over TLS, with nothing but the cluster's CA: the whole session works, a
/// call in the clear is refused, and the Replicator refuses a caller with no certificate
/// before it looks at what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_with_the_ca_works_over_tls_and_none_works_in_the_clear() {
    let certs = tempfile::tempdir().unwrap();
    let pki = kvstore_testkit::tls::ClusterPki::create(certs.path(), 3).unwrap();
    let cluster = TestCluster::start_with(3, |i| kvstore::NodeConfig {
        tls: Some(pki.node_tls(i, kvstore::tls::ClientAuth::None).unwrap()),
        ..common::patient()
    });
    let script = root().join("tests/compat/seed_client.py");
    let ca = pki.ca.to_str().unwrap();
    let transcript = run_seed_client(
        &script,
        &[
            "--tls-ca",
            ca,
            cluster.addr(0),
            cluster.addr(1),
            cluster.addr(2),
        ],
    )
    .await;
    let refused = "UNAUTHENTICATED: this node's Replicator takes calls only from the cluster's \
                   nodes: the caller presented no certificate from the cluster's CA (--tls-ca)";
    let expected = format!(
        "get in the clear: UNAVAILABLE\n{}",
        expected_session(refused)
    );
    assert_eq!(transcript, expected);
}
