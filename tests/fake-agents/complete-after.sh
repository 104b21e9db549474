#!/bin/bash
# Works for a while, then marks the task complete by editing the prompt file.
log=${FAKE_LOG:-fake-runs.log}
echo "run iteration=$RALPH_QCHAT_ITERATION pid=$$ time=$(date +%s.%N)" >> "$log"
n=$(wc -l < "$log")
echo "working on iteration $RALPH_QCHAT_ITERATION (run $n)"
echo "change $n" >> work.txt
if [ "$n" -ge "${FAKE_N:-3}" ]; then
  printf '\nTASK_COMPLETE\n' >> "$RALPH_QCHAT_PROMPT_FILE"
fi
