#!/bin/bash
# Asks a question and waits for an answer on stdin.
echo "run pid=$$ time=$(date +%s.%N)" >> "${FAKE_LOG:-fake-runs.log}"
echo "Do you want to proceed? [y/N]"
if read -r answer; then echo "answer: $answer"; else echo "stdin: EOF"; fi
printf '\nTASK_COMPLETE\n' >> "$RALPH_QCHAT_PROMPT_FILE"
