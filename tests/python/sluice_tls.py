#!/usr/bin/env python3
"""A Python gRPC client of a broker with TLS and token authentication.

Usage: sluice_tls.py <host:port> <proto root> <ca.pem> <token>

Connects with the broker's CA and `authorization: Bearer <token>` (grpcio's
access-token call credentials), creates a topic, produces and fetches a
record, checks that a call without the token is UNAUTHENTICATED and one
with a wrong token too, and exits non-zero on the first thing that is
wrong.
"""

import sys

import grpc

from sluice_smoke import generate_stubs


def main() -> None:
    address, proto_root, ca_path, token = sys.argv[1:5]
    sys.path.insert(0, generate_stubs(proto_root))
    from sluice.v1 import (  # noqa: E402  (generated above)
        admin_pb2,
        admin_pb2_grpc,
        consume_pb2,
        consume_pb2_grpc,
        produce_pb2,
        produce_pb2_grpc,
        records_pb2,
    )

    with open(ca_path, "rb") as f:
        tls = grpc.ssl_channel_credentials(root_certificates=f.read())

    def channel(call_token):
        credentials = tls
        if call_token is not None:
            credentials = grpc.composite_channel_credentials(
                tls, grpc.access_token_call_credentials(call_token)
            )
        # The broker's test certificate names localhost and 127.0.0.1.
        ch = grpc.secure_channel(address, credentials)
        grpc.channel_ready_future(ch).result(timeout=10)
        return ch

    authed = channel(token)
    admin = admin_pb2_grpc.AdminServiceStub(authed)
    admin.CreateTopic(admin_pb2.CreateTopicRequest(name="py-secure", config=admin_pb2.TopicConfig(partitions=1)))
    produced = produce_pb2_grpc.ProduceServiceStub(authed).Produce(
        produce_pb2.ProduceRequest(
            topic="py-secure", records=[records_pb2.Record(key=b"k", value=b"over tls")]
        )
    )
    offset = produced.positions[0].offset
    fetched = consume_pb2_grpc.ConsumeServiceStub(authed).Fetch(
        consume_pb2.FetchRequest(topic="py-secure", partition=0, offset=offset)
    )
    assert [r.value for r in fetched.records] == [b"over tls"], fetched

    for label, call_token in (("no token", None), ("a wrong token", "sluice_0_wrong")):
        stub = admin_pb2_grpc.AdminServiceStub(channel(call_token))
        try:
            stub.ListTopics(admin_pb2.ListTopicsRequest())
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (label, e.code(), e.details())
        else:
            raise SystemExit(f"{label}: ListTopics succeeded")
    print("python tls client: ok")


if __name__ == "__main__":
    main()
