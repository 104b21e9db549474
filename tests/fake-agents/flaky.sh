#!/bin/bash
# Fails while the file named by FAKE_FLAG exists (an outage), then completes.
echo "run $RALPH_QCHAT_TASK_ID $(date +%s.%N)" >> "${FAKE_SHARED_LOG:-/dev/null}"
if [ -e "$FAKE_FLAG" ]; then
  echo "error: service unavailable" >&2
  exit 1
fi
echo "all good"
printf '\nTASK_COMPLETE\n' >> "$RALPH_QCHAT_PROMPT_FILE"
