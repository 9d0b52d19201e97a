"""A client of the seed (the original Go system's proto, tests/compat/seed.proto) from another
toolchain, run against a real cluster by tests/wire_compat.rs.

The wire contract says a client generated from the seed's proto, by any toolchain, must work
against our nodes. This one is Python's grpcio, with stubs generated at run time from
tests/compat/seed.proto by grpcio-tools (which carries its own protoc: the Rust build still
needs none). It knows nothing of our additions, so every answer it reads also shows that the
added fields are ignored by an old client as proto3 promises.

Usage: seed_client.py [--tls-ca CA.pem] ADDR0 ADDR1 ADDR2 (three nodes of one cluster,
host:port). It prints a transcript of what it saw, one line per call, which the Rust test
compares with the expected one; it exits non-zero only when it cannot run at all. With
--tls-ca it talks TLS, checking the nodes' certificates against that CA, and first tries one
call in the clear, which a node serving TLS must refuse.
"""

import os
import sys
import tempfile

try:
    import grpc
    from grpc_tools import protoc
    import grpc_tools
except ImportError as error:
    print(
        f"seed_client.py needs grpcio and grpcio-tools ({error}); "
        "install them with: python3 -m pip install grpcio grpcio-tools",
        file=sys.stderr,
    )
    sys.exit(3)

HERE = os.path.dirname(os.path.abspath(__file__))


def generate(out):
    """Generates the seed's Python stubs into `out` and imports them."""
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    status = protoc.main(
        [
            "protoc",
            f"-I{HERE}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(HERE, "seed.proto"),
        ]
    )
    if status != 0:
        print(f"generating stubs from seed.proto failed ({status})", file=sys.stderr)
        sys.exit(4)
    sys.path.insert(0, out)
    import seed_pb2
    import seed_pb2_grpc

    return seed_pb2, seed_pb2_grpc


def code_of(call):
    """Runs `call`; returns its result, or the gRPC status it failed with and its details."""
    try:
        return call(), None
    except grpc.RpcError as error:
        return None, (error.code().name, error.details() or "")


def main():
    addrs = sys.argv[1:]
    ca = None
    if addrs[:1] == ["--tls-ca"] and len(addrs) > 1:
        with open(addrs[1], "rb") as f:
            ca = f.read()
        addrs = addrs[2:]
    if len(addrs) != 3:
        print("usage: seed_client.py [--tls-ca CA.pem] ADDR0 ADDR1 ADDR2", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as out:
        pb, rpc = generate(out)
        from google.protobuf import empty_pb2

        # grpc core would follow http_proxy even to 127.0.0.1.
        options = [("grpc.enable_http_proxy", 0)]
        # Calls take milliseconds; 5 s each keeps all 16 inside the Rust test's 120 s, so a
        # stuck call shows in the transcript rather than as a killed process.
        timeout = 5
        lines = []
        if ca is None:
            channels = [grpc.insecure_channel(a, options=options) for a in addrs]
        else:
            clear = grpc.insecure_channel(addrs[0], options=options)
            _, error = code_of(
                lambda: rpc.KVStoreStub(clear).Get(pb.Key(key="name"), timeout=timeout)
            )
            lines.append(f"get in the clear: {error[0] if error else 'answered'}")
            clear.close()
            credentials = grpc.ssl_channel_credentials(root_certificates=ca)
            channels = [grpc.secure_channel(a, credentials, options=options) for a in addrs]
        kv = [rpc.KVStoreStub(c) for c in channels]

        def put(node, key, value):
            ack, error = code_of(lambda: kv[node].Put(pb.KeyValue(key=key, value=value), timeout=timeout))
            if error:
                return f"put {key!r} on node {node}: {error[0]}: {error[1]}"
            return f"put {key!r} on node {node}: ok={ack.ok} message={ack.message}"

        def get(node, key):
            value, error = code_of(lambda: kv[node].Get(pb.Key(key=key), timeout=timeout))
            if error:
                names = key in error[1]
                return f"get {key!r} on node {node}: {error[0]} (message names the key: {names})"
            return f"get {key!r} on node {node}: {value.value}"

        def listing(node):
            pairs, error = code_of(
                lambda: [(p.key, p.value) for p in kv[node].List(empty_pb2.Empty(), timeout=timeout)]
            )
            if error:
                return f"list on node {node}: {error[0]}"
            return f"list on node {node}: " + ", ".join(f"{k}={v}" for k, v in pairs)

        # The seed's own session: put on one node, read it from every node, list it.
        lines.append(put(0, "name", "Adnan"))
        for node in range(3):
            lines.append(get(node, "name"))
        lines.append(put(1, "greeting", "héllo, wörld ✓"))
        lines.append(put(2, "name", "Adnan Khan"))
        for node in range(3):
            lines.append(listing(node))
        # Errors the seed client can see: each with its status code.
        lines.append(get(0, "no-such-key"))
        lines.append(put(0, "", "empty key"))
        lines.append(put(0, "big", "x" * (1024 * 1024 + 1)))
        lines.append(get(0, "big"))
        # The seed's Replicator: a versionless Replicate must be refused, and nothing applied.
        replicator = rpc.ReplicatorStub(channels[0])
        ack, error = code_of(
            lambda: replicator.Replicate(pb.KeyValue(key="forged", value="v"), timeout=timeout)
        )
        if error:
            lines.append(f"replicate without a version: {error[0]}: {error[1]}")
        else:
            lines.append(f"replicate without a version: ok={ack.ok} message={ack.message}")
        lines.append(get(0, "forged"))
        for channel in channels:
            channel.close()
        print("\n".join(lines))


if __name__ == "__main__":
    main()
