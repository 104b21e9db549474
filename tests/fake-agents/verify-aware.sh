#!/bin/bash
# Marks the task complete at once; told that the verification failed, it
# fixes what the failure names (creates the file `fixed`) and keeps the
# marker. Logs each instruction it got to $FAKE_LOG.instructions.
log=${FAKE_LOG:-./fake-runs.log}
echo "run iteration=$RALPH_QCHAT_ITERATION" >> "$log"
instruction="${@: -1}"
printf '%s\n=====\n' "$instruction" >> "$log.instructions"
p=$RALPH_QCHAT_PROMPT_FILE
if grep -q "verification command" <<< "$instruction"; then
  grep -q "test_parse" <<< "$instruction" && touch fixed
  echo "Fixed test_parse."
else
  grep -q TASK_COMPLETE "$p" || printf '\nTASK_COMPLETE\n' >> "$p"
  echo "Done, I think."
fi
