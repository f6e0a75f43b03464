"""A grpcio server with the standard health service (grpcio-health-checking),
for tests/prober.rs: prints its port, then sets statuses read from stdin as
`SERVICE STATUS` lines (`- SERVING` for the server as a whole), answering
`ok` to each. Ends when stdin closes. With `CERT KEY` arguments (PEM files)
it serves over TLS."""

import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if len(sys.argv) == 3:
        with open(sys.argv[1], "rb") as cert, open(sys.argv[2], "rb") as key:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        port = server.add_secure_port("127.0.0.1:0", credentials)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    for line in sys.stdin:
        service, status = line.split()
        servicer.set("" if service == "-" else service, health_pb2.HealthCheckResponse.ServingStatus.Value(status))
        print("ok", flush=True)
    server.stop(grace=None)


if __name__ == "__main__":
    main()
