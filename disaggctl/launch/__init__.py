"""Launching a plan: state, local and SSH backends, the supervisor, and the plan/up/status/logs/down commands."""
