#!/bin/bash
# A slow agent: says it started, then works (sleeps) for a long time.
echo "run pid=$$ time=$(date +%s.%N)" >> "${FAKE_LOG:-fake-runs.log}"
echo "$$" > agent.pid
echo "thinking..."
sleep "${FAKE_SLEEP:-300}"
echo "done"
