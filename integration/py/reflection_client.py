"""gRPC server reflection client (PyPI grpcio-reflection, Google's): lists the services the
server at argv[1] (host:port, or unix:PATH) describes and the methods of SpiffeWorkloadAPI,
without the Workload API's security header and without any .proto of its own. Prints JSON."""
import json
import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

channel = grpc.insecure_channel(sys.argv[1])
db = ProtoReflectionDescriptorDatabase(channel)
out = {"services": sorted(db.get_services())}
svc = DescriptorPool(db).FindServiceByName("SpiffeWorkloadAPI")
out["methods"] = sorted(
    (
        {
            "name": m.name,
            "input": m.input_type.full_name,
            "output": m.output_type.full_name,
        }
        for m in svc.methods
    ),
    key=lambda m: m["name"],
)
print(json.dumps(out))
