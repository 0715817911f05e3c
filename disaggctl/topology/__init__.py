"""Topology files: schema (pydantic), load (YAML with line numbers), plan (Topology -> Plan), sglang
(SGLang command lines). Import the submodules directly; this package imports nothing on its own."""
