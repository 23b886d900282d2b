"""Call any method of a worker through gRPC server reflection alone (a tiny grpcurl).

No lrctl code and no generated stubs: the service and message definitions come from the
worker's reflection service (grpcio-reflection's descriptor database), the messages are
built by protobuf's dynamic message factory, and requests and replies are JSON.

    python examples/reflection_call.py 127.0.0.1:50051 list
    python examples/reflection_call.py 127.0.0.1:50051 describe lrctl.v1.LearningRateControl
    python examples/reflection_call.py 127.0.0.1:50051 call \\
        lrctl.v1.LearningRateControl/ListParameters '{"selector": "layer1.*"}'
    LRCTL_TOKEN=... python examples/reflection_call.py 127.0.0.1:50051 call \\
        lrctl.v1.LearningRateControl/SetLearningRates \\
        '{"updates": [{"selector": "layer1.bias", "value": 0.05}]}'

The token (LRCTL_TOKEN) is sent as `authorization: Bearer <token>` on every call,
reflection included (a worker with tokens serves reflection to readers and admins).
Needs: pip install grpcio grpcio-reflection protobuf.
"""

from __future__ import annotations

import os
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


class _Token(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the bearer token to every call (the reflection stream too)."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _with_token(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


def describe(pool: descriptor_pool.DescriptorPool, symbol: str) -> str:
    """A service's methods with their request and response types, or a message's fields."""
    try:
        service = pool.FindServiceByName(symbol)
    except KeyError:
        message = pool.FindMessageTypeByName(symbol)
        return "\n".join([f"message {message.full_name}"] + [f"  {f.name} = {f.number}" for f in message.fields])
    lines = [f"service {service.full_name}"]
    for m in service.methods:
        stream_in = "stream " if m.client_streaming else ""
        stream_out = "stream " if m.server_streaming else ""
        lines.append(f"  rpc {m.name}({stream_in}{m.input_type.full_name}) returns "
                     f"({stream_out}{m.output_type.full_name})")
    return "\n".join(lines)


def call(channel: grpc.Channel, pool: descriptor_pool.DescriptorPool, method: str, body: str) -> list[str]:
    """Call SERVICE/METHOD with a JSON request; the replies as JSON (several for a stream)."""
    service_name, _, method_name = method.partition("/")
    m = pool.FindServiceByName(service_name).FindMethodByName(method_name)
    request_class = message_factory.GetMessageClass(m.input_type)
    response_class = message_factory.GetMessageClass(m.output_type)
    request = json_format.Parse(body or "{}", request_class())
    path = f"/{service_name}/{method_name}"
    kwargs = dict(request_serializer=request_class.SerializeToString,
                  response_deserializer=response_class.FromString)
    if m.server_streaming:
        replies = list(channel.unary_stream(path, **kwargs)(request, timeout=30))
    else:
        replies = [channel.unary_unary(path, **kwargs)(request, timeout=30)]
    return [json_format.MessageToJson(r, indent=2) for r in replies]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in ("list", "describe", "call"):
        print(__doc__, file=sys.stderr)
        return 2
    address, verb, rest = argv[0], argv[1], argv[2:]
    channel = grpc.insecure_channel(address)
    token = os.environ.get("LRCTL_TOKEN")
    if token:
        channel = grpc.intercept_channel(channel, _Token(token))
    with channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        try:
            if verb == "list":
                print("\n".join(sorted(database.get_services())))
            elif verb == "describe":
                print(describe(pool, rest[0]))
            else:
                print("\n".join(call(channel, pool, rest[0], rest[1] if len(rest) > 1 else "{}")))
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        except (KeyError, json_format.ParseError) as err:  # an unknown symbol, a bad JSON body
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
