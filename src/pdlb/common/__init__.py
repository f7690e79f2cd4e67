"""What the three services share: configuration, gRPC server hosting, etcd membership."""
