#!/bin/bash
# Leaves a background process that keeps stdout and stderr open, then exits
# successfully, like an agent that started a language server.
echo "run pid=$$ time=$(date +%s.%N)" >> "${FAKE_LOG:-fake-runs.log}"
sleep 300 &
echo "$!" > grandchild.pid
echo "started a helper, exiting"
printf '\nTASK_COMPLETE\n' >> "$RALPH_QCHAT_PROMPT_FILE"
exit 0
