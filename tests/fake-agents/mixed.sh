#!/bin/bash
# Behaves as the prompt says: SLOW works a while, FLAKY fails every other run,
# CHILD leaves a background process holding its output, HOLD works until the
# file FAKE_RELEASE exists; all complete the task on their FAKE_N-th run
# (default 4).
log=${FAKE_LOG:-fake-runs.log}
echo "run iteration=$RALPH_QCHAT_ITERATION pid=$$" >> "$log"
n=$(wc -l < "$log")
p=$RALPH_QCHAT_PROMPT_FILE
grep -q SLOW "$p" && sleep 0.3
if grep -q CHILD "$p"; then sleep 30 & fi
if grep -q HOLD "$p"; then
  while [ ! -e "${FAKE_RELEASE:?HOLD needs FAKE_RELEASE}" ]; do sleep 0.05; done
fi
if grep -q FLAKY "$p" && [ $((n % 2)) -eq 1 ]; then echo "flaky failure" >&2; exit 1; fi
echo "worked (run $n)"
if [ "$n" -ge "${FAKE_N:-4}" ]; then printf '\nTASK_COMPLETE\n' >> "$p"; fi
