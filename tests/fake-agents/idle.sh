#!/bin/bash
# Says it worked and changes nothing (its run log is $FAKE_LOG, outside the
# working directory); with FAKE_COMMIT set it commits a new file each run
# instead, leaving a clean tree.
log=${FAKE_LOG:?idle.sh logs outside the working directory: set FAKE_LOG}
echo "run iteration=$RALPH_QCHAT_ITERATION" >> "$log"
n=$(wc -l < "$log")
if [ -n "$FAKE_COMMIT" ]; then
  echo "step $n" > "step-$n.txt"
  git add "step-$n.txt" && git -c user.name=agent -c user.email=agent@example.org commit -q -m "step $n"
fi
echo "I looked at the task and everything seems fine."
