#!/bin/bash
# 50 MB on stdout and 50 MB on stderr at the same time.
echo "run pid=$$ time=$(date +%s.%N)" >> "${FAKE_LOG:-fake-runs.log}"
head -c 52428800 /dev/zero | tr '\0' 'e' >&2 &
head -c 52428800 /dev/zero | tr '\0' 'o'
wait
printf '\nTASK_COMPLETE\n' >> "$RALPH_QCHAT_PROMPT_FILE"
