"""Calls the Workload API with plain grpcio stubs (py-spiffe's generated ones), with and
without the `workload.spiffe.io: true` security header. argv[1]: a gRPC target
(`127.0.0.1:15101` or `unix:/path`). Prints the status code names as JSON."""
import json
import sys

import grpc
from spiffe._proto import workload_pb2, workload_pb2_grpc

HEADER = (("workload.spiffe.io", "true"),)


def code(call):
    try:
        r = call()
        if hasattr(r, "__next__"):
            next(r)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


with grpc.insecure_channel(sys.argv[1]) as ch:
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
    jwt = lambda md, aud=("a",): stub.FetchJWTSVID(
        workload_pb2.JWTSVIDRequest(audience=list(aud)), metadata=md, timeout=10
    )
    out = {
        "jwt_without_header": code(lambda: jwt(())),
        "x509_without_header": code(
            lambda: stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10)
        ),
        "jwt_with_header": code(lambda: jwt(HEADER)),
        "jwt_no_audience": code(lambda: jwt(HEADER, ())),
    }
print(json.dumps(out))
