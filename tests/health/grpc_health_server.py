"""A grpcio server with the standard health service (grpcio-health-checking),
for tests/prober.rs: prints its port, then sets statuses read from stdin as
`SERVICE STATUS` lines (`- SERVING` for the server as a whole), answering
`ok` to each. Ends when stdin closes."""

import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
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
