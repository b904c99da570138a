"""The network shell around the core: wire framing, authentication, UDP/TCP transport, the
network exchanges (relaxed UDP, strict TCP), the worker, device recovery and the loss shim."""
