#!/bin/bash
# Like `codex exec`: echoes the instruction it was given (coloured, after a
# header), then answers. Run N (FAKE_N, default 3) prints the output marker
# ($FAKE_MARKER) on a line of its own; earlier runs only mention it.
log=${FAKE_LOG:-./fake-runs.log}
echo "run iteration=$RALPH_QCHAT_ITERATION pid=$$" >> "$log"
n=$(wc -l < "$log")
instruction="${@: -1}"
printf '\033[1muser\033[0m\n%s\n\033[1mcodex\033[0m\n' "$instruction"
if [ "$n" -ge "${FAKE_N:-3}" ]; then
  printf 'Finished.\n\033[32m%s\033[0m\n' "$FAKE_MARKER"
else
  printf 'Not %s yet: more to do.\n' "$FAKE_MARKER"
fi
