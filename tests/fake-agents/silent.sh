#!/bin/bash
# Says one thing, then goes quiet forever (stuck waiting on something).
echo "run pid=$$ time=$(date +%s.%N)" >> "${FAKE_LOG:-fake-runs.log}"
echo "$$" > agent.pid
echo "let me look at this"
sleep "${FAKE_SLEEP:-300}"
