#!/bin/bash
# Records what it was given: argument count, the instruction's length, the
# instruction itself; then completes the task.
echo "run pid=$$ time=$(date +%s.%N)" >> "${FAKE_LOG:-fake-runs.log}"
last="${!#}"
echo "$#" > args.count
printf '%s' "$last" > instruction.txt
echo "instruction of ${#last} characters"
printf '\nTASK_COMPLETE\n' >> "$RALPH_QCHAT_PROMPT_FILE"
