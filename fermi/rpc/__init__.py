"""The gRPC front end: the fermi.v1.Fermi service, sessions with KV-cache reuse, health."""
