"""Generated protobuf and gRPC stubs for endcap.v1 (see `make proto`)."""
