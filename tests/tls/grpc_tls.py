"""gRPC over TLS through a balanced HTTPS listener, with grpcio at both ends
(tests/tls.rs): three plaintext grpcio servers answer a unary call with their
name; their ports go out as one line. Then a line `PORT CA NAME` comes in:
30 calls go over grpc.secure_channel to 127.0.0.1:PORT, verifying NAME
against CA, and how many each server answered (and failures) is printed as JSON.
"""

import json
import sys
from concurrent import futures

import grpc

METHOD = "/balanced.test.Echo/Name"


def server(name):
    handler = grpc.method_handlers_generic_handler(
        "balanced.test.Echo",
        {"Name": grpc.unary_unary_rpc_method_handler(lambda req, ctx: name.encode())},
    )
    s = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    s.add_generic_rpc_handlers((handler,))
    port = s.add_insecure_port("127.0.0.1:0")
    s.start()
    return s, port


def main():
    servers = [server(f"s{i}") for i in range(3)]
    print(" ".join(str(p) for _, p in servers), flush=True)
    port, ca, name = sys.stdin.readline().split()
    creds = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read())
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", name)]
    )
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    seen, failed = {}, []
    for _ in range(30):
        try:
            got = call(b"", timeout=5).decode()
            seen[got] = seen.get(got, 0) + 1
        except grpc.RpcError as e:
            failed.append(f"{e.code().name}: {e.details()}")
    print(json.dumps({"seen": seen, "failed": failed}), flush=True)
    channel.close()
    for s, _ in servers:
        s.stop(grace=None)


if __name__ == "__main__":
    main()
