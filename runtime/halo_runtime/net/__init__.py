"""The network shell around the core: wire framing, authenticated encryption, UDP/TCP transport, the
network exchanges (relaxed UDP, strict TCP), the worker, device recovery and the loss shim."""
