#!/usr/bin/env bash
# Device call 1 of 2: keep the carried .whl/a on the (warm) machine for call 2.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p /tmp/distill-wheels && cp .whl/a/* /tmp/distill-wheels/
ls /tmp/distill-wheels
