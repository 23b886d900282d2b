"""The thin lrctl client: grpcio and protobuf only, no torch."""
