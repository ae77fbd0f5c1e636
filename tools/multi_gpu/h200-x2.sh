#!/usr/bin/env bash
# The issue 15 runs on nvidia-h200-x2 (one host, 2 H200s): see run.sh. One command, at most 10 minutes.
exec bash "$(dirname "$0")/run.sh" 2
