#!/usr/bin/env bash
# The main job on the embedded default: bring up 1 prefill + 1 decode + the proxy on this machine
# (builtin:tiny, CPU, KV moved through Mooncake over loopback TCP), send the README's request, show status.
set -euo pipefail
cd "$(dirname "$0")/.."
TOPOLOGY=${1:-topologies/local-1p1d.yaml}
.venv/bin/disaggctl up "$TOPOLOGY"
echo
echo '$ curl -X POST http://127.0.0.1:8000/generate -d '"'"'{"text": "Let me tell you a long story ", "sampling_params": {"temperature": 0}}'"'"
curl -sS --max-time 60 -X POST http://127.0.0.1:8000/generate \
  -d '{"text": "Let me tell you a long story ", "sampling_params": {"temperature": 0}}'
echo
echo
.venv/bin/disaggctl status
echo
echo "Stop it with: .venv/bin/disaggctl down"
