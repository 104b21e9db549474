#!/bin/bash
# Ignores SIGTERM (and so do its children, which inherit the disposition).
trap '' TERM
echo "run pid=$$ time=$(date +%s.%N)" >> "${FAKE_LOG:-fake-runs.log}"
echo "$$" > agent.pid
echo "you cannot stop me"
while true; do sleep "${FAKE_SLEEP:-300}"; done
