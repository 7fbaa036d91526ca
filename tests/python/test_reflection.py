"""Server reflection through Python's grpc_reflection client, which speaks v1alpha (as older
grpcurl and grpcui do): the node serves both grpc.reflection.v1 and v1alpha."""

from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from google.protobuf.descriptor_pool import DescriptorPool


def test_v1alpha_reflection_lists_and_describes_the_service(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert "kvshare.v1.KvCache" in services, services
    assert "grpc.health.v1.Health" in services, services

    pool = DescriptorPool(db)
    svc = pool.FindServiceByName("kvshare.v1.KvCache")
    methods = {m.name for m in svc.methods}
    assert {"Lookup", "Put", "Get", "Delete", "Stats", "ClusterInfo"} <= methods, methods
    put = svc.FindMethodByName("Put")
    assert put.input_type.full_name == "kvshare.v1.PutRequest"
    header = pool.FindMessageTypeByName("kvshare.v1.BlockHeader")
    assert "checksum" in {f.name for f in header.fields}
