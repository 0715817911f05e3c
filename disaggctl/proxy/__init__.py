"""The built-in proxy: `disaggctl serve proxy` (server.py), its worker pools and health (workers.py), and
the load-balancing policies (policy.py). No torch, no runtime imports: it only speaks HTTP."""
