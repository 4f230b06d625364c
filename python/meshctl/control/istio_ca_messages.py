"""Istio's CA service messages (istio.v1.auth), built from a descriptor at import: no generated code
ships for them, and these two messages are all the wire needs.

    message IstioCertificateRequest { string csr = 1; int64 validity_duration = 2;
                                      google.protobuf.Struct metadata = 3; }
    message IstioCertificateResponse { repeated string cert_chain = 1; }
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

CREATE_CERTIFICATE_METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"

_Field = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="meshctl/istio/v1/auth/ca.proto",  # not Istio's path: no clash if theirs is loaded
        package="istio.v1.auth",
        syntax="proto3",
        dependency=["google/protobuf/struct.proto"],
    )
    request = file.message_type.add(name="IstioCertificateRequest")
    request.field.add(name="csr", number=1, type=_Field.TYPE_STRING, label=_Field.LABEL_OPTIONAL)
    request.field.add(
        name="validity_duration", number=2, type=_Field.TYPE_INT64, label=_Field.LABEL_OPTIONAL
    )
    request.field.add(
        name="metadata", number=3, type=_Field.TYPE_MESSAGE, label=_Field.LABEL_OPTIONAL,
        type_name=".google.protobuf.Struct",
    )  # fmt: skip
    response = file.message_type.add(name="IstioCertificateResponse")
    response.field.add(
        name="cert_chain", number=1, type=_Field.TYPE_STRING, label=_Field.LABEL_REPEATED
    )
    return file


def _classes():
    pool = descriptor_pool.DescriptorPool()
    # Struct's own file first, so the request's metadata field resolves against it.
    pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(_file())
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateRequest")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateResponse")
        ),
    )


IstioCertificateRequest, IstioCertificateResponse = _classes()
