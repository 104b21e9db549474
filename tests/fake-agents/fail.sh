#!/bin/bash
# An agent that fails every time, the way a throttled or broken CLI does.
echo "run pid=$$ time=$(date +%s.%N)" >> "${FAKE_LOG:-fake-runs.log}"
echo "some output"
echo "error: service unavailable (throttled)" >&2
exit "${FAKE_EXIT:-1}"
