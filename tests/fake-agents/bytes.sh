#!/bin/bash
# Output that is not valid UTF-8.
echo "run pid=$$ time=$(date +%s.%N)" >> "${FAKE_LOG:-fake-runs.log}"
printf 'before \xff\xfe\xc3\x28 after\n'
printf '\nTASK_COMPLETE\n' >> "$RALPH_QCHAT_PROMPT_FILE"
