"""The access-point daemon: lifecycle, gRPC servicers, data plane, forwarder, validation,
configuration, metrics and logs."""
