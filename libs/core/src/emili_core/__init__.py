"""What every EMILI service shares: settings, logging, gRPC runner, auth, metrics, storage, queues."""
