#!/bin/bash
# Works for a while, then marks the task complete by editing the prompt file.
log=${FAKE_LOG:-fake-runs.log}
shared=${FAKE_SHARED_LOG:-/dev/null}
echo "start $RALPH_QCHAT_TASK_ID $(date +%s.%N)" >> "$shared"
echo "run iteration=$RALPH_QCHAT_ITERATION pid=$$ time=$(date +%s.%N)" >> "$log"
n=$(wc -l < "$log")
echo "working on iteration $RALPH_QCHAT_ITERATION (run $n)"
if [ -n "$FAKE_DELAY" ]; then sleep "$FAKE_DELAY"; fi
echo "change $n" >> work.txt
if [ "$n" -ge "${FAKE_N:-3}" ]; then
  printf '\nTASK_COMPLETE\n' >> "$RALPH_QCHAT_PROMPT_FILE"
fi
echo "end $RALPH_QCHAT_TASK_ID $(date +%s.%N)" >> "$shared"
